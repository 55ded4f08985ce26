"""``lorakit train``: a LoRA from a folder of images, on any SD1/SD2/SDXL model (or the embedded demo model).

One optimizer step: ``grad_accum`` micro-batches of ``batch`` cached latents from one bucket → noise, timesteps
(``diffusion.py``) → the UNet with the network's hooks (the inference math) → (min-SNR-weighted) MSE → backward;
then gradient clipping, the optimizer and the LR schedule. Every random number comes from CPU generators seeded
from ``seed`` (the data order of epoch e from ``seed`` and e), so a run is reproducible, and bitwise so on the CPU —
also across ``--resume``.
"""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import TrainingError
from ..keymap.arch import Arch
from ..models.device import release_freed_memory
from ..models.loading import BaseModel, load_model
from . import diffusion as dif
from .buckets import bucket_sizes, choose, load_pixels
from .config import NATIVE, SAVE_DTYPES, TrainConfig, fingerprint
from .data import Dataset, scan
from .progress import progress as progress_reporter
from .encode import encode_image, encode_text, time_ids
from .network import Network, target_modules
from .output import base_metadata, load_state, network_metadata, save_state, write_lora

log = logging.getLogger("lorakit")


@dataclass
class Sample:
    latent: torch.Tensor  # (c, h, w) fp32 on the device
    caption: str
    size: tuple[int, int]


class Trainer:
    def __init__(self, cfg: TrainConfig, model: BaseModel | None = None) -> None:
        cfg.check()
        self.cfg = cfg
        self.data: Dataset = scan(cfg.data, cfg.trigger, cfg.bad_images)
        self.model = model or load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
        self.check_model()
        pipe = self.model.pipe
        self.device = self.model.device
        self.sdxl = self.model.arch == Arch.SDXL
        for name in ("unet", "transformer", "text_encoder", "text_encoder_2", "vae"):
            if getattr(pipe, name, None) is not None:
                getattr(pipe, name).requires_grad_(False)
        self.resolution = cfg.resolution or NATIVE.get(self.model.arch) or self.model.native_size
        self.net = self.setup()
        self.train_te = cfg.network.train in ("te", "both")
        self.samples = self._cache_latents()
        release_freed_memory(self.device)  # the VAE's activations: not carried into the training steps
        self._epoch_cache: tuple[int, list[list[int]]] = (-1, [])
        self._per_epoch = len(self._epoch_batches(0))  # micro-batches per epoch (the same every epoch)
        self.text_cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.optimizer = self._optimizer()
        self.total = cfg.steps or cfg.epochs * self.steps_per_epoch()  # type: ignore[operator]
        self.lr_sched = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.scaler = torch.amp.GradScaler("cuda") if self.device.type == "cuda" and \
            self.model.dtype == torch.float16 else None
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.losses: list[float] = []
        if cfg.resume:
            self._resume(cfg.resume)

    # -- what the family decides (``flux_loop.FluxTrainer`` overrides these) ---------------------------------------
    def check_model(self) -> None:
        if self.model.arch not in NATIVE:
            hint = " (lorakit.train.flux_loop.FluxTrainer trains FLUX.1)" if self.model.flux else ""
            raise TrainingError(f"the model {self.model.name} is not SD1, SD2 or SDXL ({self.model.arch}){hint}")
        flux_only = self.cfg.flow.given() + (["--train-t5"] if self.cfg.network.t5 else [])
        if flux_only:
            raise TrainingError(f"{', '.join(flux_only)}: for the flow-matching models only (FLUX.1, SD3, "
                                "Chroma, Qwen-Image)")

    def setup(self) -> Network:
        """The objective (ε/v: the scheduler's ᾱ_t) and the network."""
        pipe = self.model.pipe
        self.schedule = dif.NoiseSchedule.from_scheduler(pipe.scheduler)
        comps = {n: getattr(pipe, n) for n in ("unet", "text_encoder", "text_encoder_2")
                 if getattr(pipe, n, None) is not None}
        return Network(target_modules(comps, self.cfg.network), self.cfg.network, self.cfg.seed)

    @property
    def denoiser(self) -> Any:
        return self.model.pipe.unet

    def objective_metadata(self) -> dict[str, str]:
        return {**base_metadata(self.model.arch), "modelspec.prediction_type": self.schedule.prediction}

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """One image (3, h, w) in [-1, 1] → its latents (c, h/f, w/f), fp32 (Qwen-Image's 3-D VAE: its own)."""
        return encode_image(self.model.pipe.vae, pixels)

    # -- data ----------------------------------------------------------------------------------------------
    def _cache_latents(self) -> list[Sample]:
        """Every image encoded once (the VAE runs once per image, not per repeat or epoch)."""
        from PIL import Image

        sizes = bucket_sizes(self.resolution)
        out = []
        for item in self.data.items:
            with Image.open(item.image) as im:
                size = choose(im.width, im.height, sizes)
            latent = self.encode_pixels(load_pixels(item.image, size))
            if not torch.isfinite(latent).all():
                raise TrainingError(f"{item.image}: the VAE encoded it to NaN/inf (try --dtype fp32)")
            out.append(Sample(latent.to(self.device), item.caption, size))
        return out

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        """The micro-batches of one epoch: every image ``repeats`` times, shuffled, grouped by bucket."""
        rng = random.Random(self.cfg.seed * 1_000_003 + epoch)
        order = [i for i, it in enumerate(self.data.items) for _ in range(it.repeats)]
        rng.shuffle(order)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i in order:
            by_size.setdefault(self.samples[i].size, []).append(i)
        batches = [idx[k:k + self.cfg.batch] for idx in by_size.values() for k in range(0, len(idx), self.cfg.batch)]
        rng.shuffle(batches)
        return batches

    def steps_per_epoch(self) -> int:
        return max(1, self._per_epoch // self.cfg.grad_accum)

    def _micro_batch(self, n: int) -> list[int]:
        """The n-th micro-batch of the run (epochs follow each other)."""
        per = self._per_epoch
        epoch = n // per
        if self._epoch_cache[0] != epoch:
            self._epoch_cache = (epoch, self._epoch_batches(epoch))
        return self._epoch_cache[1][n % per]

    # -- optimisation ----------------------------------------------------------------------------------------
    def _optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        unet = [p for path, leaves in self.net.leaves.items() if not path.startswith("text_encoder")
                for p in leaves.values() if isinstance(p, torch.nn.Parameter)]
        te = [p for path, leaves in self.net.leaves.items() if path.startswith("text_encoder")
              for p in leaves.values() if isinstance(p, torch.nn.Parameter)]
        te_lr = cfg.te_lr if cfg.te_lr is not None else cfg.lr / 2
        groups = [g for g in ({"params": unet, "lr": cfg.lr}, {"params": te, "lr": te_lr}) if g["params"]]
        if cfg.optimizer == "prodigy":
            try:
                from prodigyopt import Prodigy  # type: ignore[import-not-found]
            except ImportError:
                raise TrainingError("--optimizer prodigy needs the prodigyopt package: "
                                    "pip install prodigyopt") from None
            return Prodigy(groups, lr=cfg.lr, weight_decay=0.01)  # type: ignore[no-any-return]
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.01)

    def _lr_factor(self, step: int) -> float:
        warm = self.cfg.warmup
        if warm and step < warm:
            return (step + 1) / warm
        if self.cfg.schedule == "cosine":
            progress = (step - warm) / max(1, self.total - warm)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    def _conditioning(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.train_te:
            return encode_text(self.model.pipe, captions, self.sdxl)
        for c in captions:
            if c not in self.text_cache:
                with torch.no_grad():
                    self.text_cache[c] = encode_text(self.model.pipe, [c], self.sdxl)
        hidden = torch.cat([self.text_cache[c][0] for c in captions])
        pooled = [self.text_cache[c][1] for c in captions]
        return hidden, None if pooled[0] is None else torch.cat(pooled)  # type: ignore[arg-type]

    def _captions(self, batch: list[int]) -> list[str]:
        captions = [self.samples[i].caption for i in batch]
        if self.cfg.caption_dropout:  # the empty caption is what CFG's unconditional branch sees
            drop = torch.rand(len(batch), generator=self.gen) < self.cfg.caption_dropout
            captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        return captions

    def loss(self, batch: list[int]) -> torch.Tensor:
        """The (weighted) diffusion loss of one micro-batch."""
        unet, dt = self.model.pipe.unet, self.model.dtype
        x0 = torch.stack([self.samples[i].latent for i in batch])
        noise = dif.sample_noise(x0, self.gen, self.cfg.noise_offset)
        t = dif.sample_timesteps(len(batch), self.schedule, self.gen, x0.device)
        noisy = dif.add_noise(self.schedule, x0, noise, t)
        hidden, pooled = self._conditioning(self._captions(batch))
        extra: dict[str, Any] = {}
        if self.sdxl:
            extra["added_cond_kwargs"] = {"text_embeds": pooled.to(dt),  # type: ignore[union-attr]
                                          "time_ids": time_ids(self.samples[batch[0]].size, len(batch), x0.device, dt)}
        pred = unet(noisy.to(dt), t, encoder_hidden_states=hidden.to(dt), **extra).sample
        weights = dif.loss_weights(self.schedule, t, self.cfg.min_snr_gamma)
        return dif.diffusion_loss(pred, dif.target(self.schedule, x0, noise, t), weights)

    def train_step(self) -> float:
        """One optimizer step; returns its mean loss."""
        total = 0.0
        for j in range(self.cfg.grad_accum):
            loss = self.loss(self._micro_batch(self.step * self.cfg.grad_accum + j)) / self.cfg.grad_accum
            if not torch.isfinite(loss):
                raise TrainingError(f"step {self.step + 1}: the loss is {loss.item()} — lower --lr or --alpha "
                                    "(NaN loss is what makes black or noise LoRAs)")
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += float(loss.detach())
        params = self.net.parameters()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_sched.step()
        self.step += 1
        return total

    # -- the run ----------------------------------------------------------------------------------------------
    def run(self, stop_at: int | None = None, progress: bool = True,
            on_step: Callable[[int, float], None] | None = None) -> Path:
        """Train to the last step (or ``stop_at``, as an interruption would) and write the LoRA."""
        cfg = self.cfg
        unet = self.denoiser
        if cfg.grad_checkpointing:
            unet.enable_gradient_checkpointing()
            unet.train()
        self.net.attach()
        log.info(self.data.summary())
        log.info(f"training {cfg.network.kind} rank {cfg.network.rank} (α {cfg.network.alpha:g}) on "
                 f"{len(self.net.leaves)} layers of {self.model.describe()}; {self.total} steps, "
                 f"{self.steps_per_epoch()} per epoch")
        bar = progress_reporter(self.total, self.step, progress)
        smooth = None
        try:
            while self.step < self.total and (stop_at is None or self.step < stop_at):
                loss = self.train_step()
                self.losses.append(loss)
                smooth = loss if smooth is None else 0.9 * smooth + 0.1 * loss
                if bar is not None:
                    bar.update(smooth)
                if on_step:
                    on_step(self.step, loss)
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total:
                    self.save_checkpoint()
                if cfg.sample_every and self.step % cfg.sample_every == 0:
                    self.write_sample()
        except KeyboardInterrupt:
            self.save_checkpoint()
            raise TrainingError(f"interrupted at step {self.step}/{self.total}; the state is saved: continue with "
                                f"--resume {self.checkpoint_path()}") from None
        finally:
            if bar is not None:
                bar.close()
            self.net.detach()
            if cfg.grad_checkpointing:
                unet.disable_gradient_checkpointing()
                unet.eval()
        if self.step < self.total:
            self.save_checkpoint()
            return self.checkpoint_path()
        self.write(cfg.output)
        if cfg.preview:
            from .preview import write_preview

            write_preview(self.model, cfg.output, cfg.preview_prompt or self.data.items[0].caption, cfg.seed)
        return cfg.output

    def write(self, path: Path) -> dict[str, str]:
        return write_lora(path, self.net, self.model.arch, self.metadata(), SAVE_DTYPES[self.cfg.save_dtype])

    def metadata(self) -> dict[str, str]:
        import json

        cfg = self.cfg
        words = ", ".join(self.data.trained_triggers(cfg.trigger))
        meta = {**self.objective_metadata(), **network_metadata(self.net),
                "ss_output_name": cfg.output.stem, "modelspec.title": cfg.output.stem,
                "ss_resolution": f"({self.resolution}, {self.resolution})",
                "modelspec.resolution": f"{self.resolution}x{self.resolution}",
                "ss_steps": str(self.step), "ss_max_train_steps": str(self.total),
                "ss_epoch": str(self.step // self.steps_per_epoch()), "ss_num_epochs": str(cfg.epochs or ""),
                "ss_learning_rate": f"{cfg.lr:g}", "ss_unet_lr": f"{cfg.lr:g}",
                "ss_text_encoder_lr": f"{cfg.te_lr if cfg.te_lr is not None else cfg.lr / 2:g}",
                "ss_lr_scheduler": cfg.schedule, "ss_lr_warmup_steps": str(cfg.warmup),
                "ss_optimizer": "torch.optim.AdamW" if cfg.optimizer == "adamw" else "prodigyopt.Prodigy",
                "ss_batch_size_per_device": str(cfg.batch), "ss_total_batch_size": str(cfg.batch * cfg.grad_accum),
                "ss_gradient_accumulation_steps": str(cfg.grad_accum),
                "ss_gradient_checkpointing": str(cfg.grad_checkpointing),
                "ss_max_grad_norm": f"{cfg.max_grad_norm:g}", "ss_seed": str(cfg.seed),
                "ss_noise_offset": f"{cfg.noise_offset:g}" if cfg.noise_offset else "None",
                "ss_min_snr_gamma": f"{cfg.min_snr_gamma:g}" if cfg.min_snr_gamma else "None",
                "ss_caption_dropout_rate": f"{cfg.caption_dropout:g}",
                "ss_mixed_precision": "no" if self.model.dtype == torch.float32 else str(self.model.dtype)[6:],
                "ss_cache_latents": "True", "ss_enable_bucket": "True", "ss_clip_skip": "None",
                "ss_num_train_images": str(sum(it.repeats for it in self.data.items)),
                "ss_num_batches_per_epoch": str(self.steps_per_epoch()),
                "ss_dataset_dirs": json.dumps(self.data.dataset_dirs()),
                "ss_tag_frequency": json.dumps(self.data.tag_frequency()),
                "ss_sd_model_name": self.model.name, "ss_new_sd_model_hash": self.model.hash,
                "ss_training_started_at": self.started,
                "ss_training_finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if words:
            meta["modelspec.trigger_phrase"] = words
        return meta

    # -- checkpoints and samples -----------------------------------------------------------------------------
    def checkpoint_path(self) -> Path:
        return self.cfg.state_path

    def save_checkpoint(self) -> None:
        """The LoRA as it is now (``NAME-000100.safetensors``) and the resume state (``NAME.state.pt``)."""
        out = self.cfg.output
        self.write(out.with_name(f"{out.stem}-{self.step:06d}.safetensors"))
        save_state(self.checkpoint_path(), {
            "step": self.step, "tensors": {k: v.detach().cpu() for k, v in self.net.named_tensors().items()},
            "optimizer": self.optimizer.state_dict(), "lr_sched": self.lr_sched.state_dict(),
            "gen": self.gen.get_state(), "losses": self.losses, "config": fingerprint(self.cfg),
            "scaler": self.scaler.state_dict() if self.scaler else None})

    def _resume(self, path: Path) -> None:
        state = load_state(path)
        if state.get("config") != fingerprint(self.cfg):
            raise TrainingError(f"{path}: made with other settings ({state.get('config')}); resume with the same "
                                "data, model, network and schedule flags")
        mine = self.net.named_tensors()
        saved = state["tensors"]
        if set(saved) != set(mine) or any(saved[k].shape != mine[k].shape for k in mine):
            raise TrainingError(f"{path}: its network does not match this model's layers")
        with torch.no_grad():
            for k, t in mine.items():
                t.copy_(saved[k])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_sched.load_state_dict(state["lr_sched"])
        self.gen.set_state(state["gen"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.losses = int(state["step"]), list(state["losses"])
        log.info(f"resumed from {path} at step {self.step}")

    def write_sample(self) -> Path:
        """An image of ``--sample-prompt`` with the LoRA as it is now (``samples/NAME-000100.png``)."""
        from ..files.output import atomic_file

        cfg = self.cfg
        pipe = self.model.pipe
        size = self.resolution
        with torch.no_grad():
            image = pipe(cfg.sample_prompt, num_inference_steps=20, width=size, height=size,
                         generator=torch.Generator().manual_seed(cfg.seed)).images[0]
        path = cfg.output.parent / "samples" / f"{cfg.output.stem}-{self.step:06d}.png"
        with atomic_file(path) as f:
            image.save(f, format="PNG")
        return path
