"""What ``lorakit train`` is asked to do: ``TrainConfig`` (every flag, checked before anything loads) and the
fingerprint a resumed run must share with the run it continues."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import TrainingError
from ..files.output import check_target, check_writable
from ..keymap.arch import Arch
from ..prompt import lone_surrogate
from .flow import FlowSpec
from .network import NetworkSpec

NATIVE = {Arch.SD1: 512, Arch.SD2: 768, Arch.SDXL: 1024, Arch.DEMO: 64}
OPTIMIZERS = ("adamw", "prodigy")
SCHEDULES = ("constant", "cosine")
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class TrainConfig:
    data: Path
    output: Path
    model: str | None = None
    network: NetworkSpec = field(default_factory=NetworkSpec)
    flow: FlowSpec = field(default_factory=FlowSpec)  # flow-matching models (FLUX.1): sampling, shift, guidance
    steps: int | None = None
    epochs: int | None = None
    lr: float = 1e-4
    te_lr: float | None = None  # None: lr / 2 (kohya's advice: the text encoder wants less)
    batch: int = 1
    grad_accum: int = 1
    resolution: int | None = None  # None: the model's native size
    trigger: str | None = None
    seed: int = 0
    optimizer: str = "adamw"
    schedule: str = "constant"
    warmup: int = 0
    min_snr_gamma: float | None = None
    noise_offset: float = 0.0
    caption_dropout: float = 0.0  # share of samples trained with an empty caption (kohya's caption_dropout_rate)
    grad_checkpointing: bool = False
    max_grad_norm: float = 1.0
    save_every: int | None = None
    sample_every: int | None = None
    sample_prompt: str | None = None
    preview: bool = False  # NAME.preview.png beside the LoRA (on by default in `lorakit train`)
    preview_prompt: str | None = None  # what it draws; None: the first image's caption
    save_dtype: str = "fp16"
    bad_images: str = "skip"
    resume: Path | None = None
    device: str | None = None
    dtype: str | None = None

    def check(self) -> None:
        self.network.check()
        self.flow.check()
        if (self.steps is None) == (self.epochs is None):
            if self.steps is None and self.epochs is None:
                self.steps = 1000
            else:
                raise TrainingError("give --steps or --epochs, not both")
        for name, v, lo in (("--steps", self.steps, 1), ("--epochs", self.epochs, 1), ("--batch", self.batch, 1),
                            ("--grad-accum", self.grad_accum, 1), ("--warmup", self.warmup, 0),
                            ("--save-every", self.save_every, 1), ("--sample-every", self.sample_every, 1)):
            if v is not None and not lo <= v <= 10_000_000:
                raise TrainingError(f"{name} must be {lo}…10000000, got {v}")
        for name, f in (("--lr", self.lr), ("--te-lr", self.te_lr), ("--noise-offset", self.noise_offset),
                        ("--min-snr-gamma", self.min_snr_gamma), ("--max-grad-norm", self.max_grad_norm)):
            if f is not None and not (math.isfinite(f) and f >= 0):
                raise TrainingError(f"{name} must be a finite number ≥ 0, got {f}")
        if self.optimizer not in OPTIMIZERS or self.schedule not in SCHEDULES or self.save_dtype not in SAVE_DTYPES:
            raise TrainingError(f"--optimizer {'|'.join(OPTIMIZERS)}, --lr-schedule {'|'.join(SCHEDULES)}, "
                                f"--save-dtype {'|'.join(SAVE_DTYPES)}; got {self.optimizer}, {self.schedule}, "
                                f"{self.save_dtype}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise TrainingError(f"--caption-dropout must be 0…1, got {self.caption_dropout}")
        for name, text in (("--trigger", self.trigger), ("--sample-prompt", self.sample_prompt)):
            column = lone_surrogate(text or "")
            if column is not None:
                raise TrainingError(f"{name}: not valid Unicode text (a lone surrogate at character {column}: bytes "
                                    "that are not UTF-8?)")
        if self.sample_every and not self.sample_prompt:
            raise TrainingError("--sample-every needs --sample-prompt")
        if self.output.suffix != ".safetensors":
            raise TrainingError(f"{self.output}: the output must be a .safetensors file")
        check_writable(self.output)  # before the model loads: not after an hour of training
        check_target(self.state_path)

    @property
    def state_path(self) -> Path:
        """Where the resume state goes (``NAME.state.pt`` beside the output)."""
        return self.output.with_name(self.output.stem + ".state.pt")


def fingerprint(cfg: TrainConfig) -> str:
    """The settings a resumed run must share with the one it continues."""
    keep = ("data", "model", "network", "flow", "steps", "epochs", "lr", "te_lr", "batch", "grad_accum",
            "resolution", "trigger", "seed", "optimizer", "schedule", "warmup", "min_snr_gamma", "noise_offset",
            "caption_dropout")
    d = asdict(cfg)
    return repr({k: str(d[k]) for k in keep})
