"""``lorakit train DATA_DIR -o out.safetensors …``: the command line of ``loop.Trainer``."""
from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from .config import OPTIMIZERS, SAVE_DTYPES, SCHEDULES, TrainConfig
from .flow import SAMPLINGS, FlowSpec
from .flux_loop import trainer_for
from .network import NETWORKS, NetworkSpec


def add_train_command(sub: "argparse._SubParsersAction[argparse.ArgumentParser]",
                      add_device_args: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("train", help="train a LoRA from a folder of images (kohya layout: captions in .txt or "
                                     ".caption, repeat folders like 10_name)")
    p.add_argument("data", metavar="DATA_DIR", help="images with NAME.txt / NAME.caption captions, or kohya repeat "
                                                     "folders such as 10_name")
    p.add_argument("-o", "--output", required=True, help="the LoRA to write (.safetensors, kohya format)")
    p.add_argument("-m", "--model", help="SD1/SD2/SDXL/FLUX.1/SD3 model folder or single file (a FLUX.1 or SD3 single "
                                         "file with --components DIR); default: the embedded demo model")
    p.add_argument("--network", choices=NETWORKS, default="lora", help="lora (attention layers), locon (+ ResNet "
                                                                       "convolutions), loha, lokr, dora")
    p.add_argument("--rank", type=int, default=16, help="network dim (default 16)")
    p.add_argument("--alpha", type=float, default=8.0, help="network alpha (default 8; scale = alpha/rank)")
    p.add_argument("--conv-rank", type=int, help="rank of 3×3 convolutions (locon and LyCORIS types; default "
                                                 "--rank; 0 leaves them out)")
    p.add_argument("--conv-alpha", type=float, help="alpha of 3×3 convolutions (default --alpha)")
    p.add_argument("--train", choices=("unet", "te", "both"), default="both", help="what to train (default both)")
    p.add_argument("--only-layers", help="comma-separated layer names to keep (e.g. to_q,to_k,to_v,to_out.0: "
                                         "the diffusers/PEFT recipe's attention-only LoRA)")
    p.add_argument("--train-t5", action="store_true", help="FLUX.1, SD3, Chroma: with --train te|both, train T5 as "
                                                           "well as the CLIP encoders (kohya's train_t5xxl; off by "
                                                           "default; Chroma's only encoder)")
    n = p.add_mutually_exclusive_group()
    n.add_argument("--steps", type=int, help="optimizer steps (default 1000)")
    n.add_argument("--epochs", type=int, help="passes over the data (with repeats)")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate (default 1e-4; ~1 for Prodigy)")
    p.add_argument("--te-lr", type=float, help="text-encoder learning rate (default --lr / 2)")
    p.add_argument("--batch", type=int, default=1, help="images per micro-batch (default 1)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--resolution", type=int, help="training size (multiple of 64; default: the model's native "
                                                  "size: 512 SD1, 768 SD2, 1024 SDXL, 64 demo)")
    p.add_argument("--trigger", help="trigger word: put in front of every caption (and the caption of images "
                                     "without one); written as modelspec.trigger_phrase")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    p.add_argument("--lr-schedule", dest="schedule", choices=SCHEDULES, default="constant")
    p.add_argument("--warmup", type=int, default=0, help="LR warm-up steps")
    p.add_argument("--min-snr-gamma", type=float, help="min-SNR-γ loss weighting (5 is the paper's value)")
    p.add_argument("--noise-offset", type=float, default=0.0, help="noise offset (~0.05–0.1 for darker darks)")
    p.add_argument("--caption-dropout", type=float, default=0.0,
                   help="share of samples trained with an empty caption, so that the style also holds under CFG "
                        "(kohya's --caption_dropout_rate; 0.1 is common)")
    f = p.add_argument_group("flow matching (FLUX.1, SD3, Chroma, Qwen-Image)")
    f.add_argument("--timestep-sampling", choices=SAMPLINGS, help="how noise levels σ are drawn: sigmoid (default: "
                                                                "sigmoid of N(0,1)·--sigmoid-scale), uniform, shift "
                                                                "(sigmoid, then --discrete-flow-shift), flux_shift "
                                                                "(sigmoid, then FLUX's resolution-dependent shift)")
    f.add_argument("--sigmoid-scale", type=float, help="scale of the normal sample in sigmoid/shift/flux_shift "
                                                       "(default 1)")
    f.add_argument("--discrete-flow-shift", dest="shift", type=float, help="the shift of --timestep-sampling shift "
                                                                         "(default 3; kohya recommends 3.1582)")
    f.add_argument("--guidance", type=float, help="embedded guidance while training FLUX.1-dev (default 1, as "
                                                  "kohya and ai-toolkit; schnell has none)")
    f.add_argument("--max-sequence-length", type=int, help="T5 tokens per caption (default: FLUX.1-dev and Chroma 512, "
                                                                 "schnell and SD3 256)")
    p.add_argument("--grad-checkpointing", action="store_true", help="less memory, ~30 %% slower")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--save-every", type=int, help="every N steps: NAME-00000N.safetensors and the resume state "
                                                  "NAME.state.pt")
    p.add_argument("--sample-every", type=int, help="every N steps: samples/NAME-00000N.png of --sample-prompt")
    p.add_argument("--sample-prompt")
    p.add_argument("--preview-prompt", help="draw NAME.preview.png beside the LoRA from this prompt (A1111's "
                                            "card preview; default: the first image's caption)")
    p.add_argument("--no-preview", dest="preview", action="store_false", help="write no NAME.preview.png")
    p.add_argument("--save-dtype", choices=list(SAVE_DTYPES), default="fp16")
    p.add_argument("--bad-images", choices=("skip", "fail"), default="skip",
                   help="unreadable images: skip them (listed) or stop")
    p.add_argument("--resume", help="continue from NAME.state.pt (same flags)")
    add_device_args(p)
    p.set_defaults(func=_train, verbose_default=True)


def _train(args: argparse.Namespace) -> int:
    from ..models.loading import load_model
    from ..settings import load_settings

    settings = load_settings(None)
    only = tuple(o.strip() for o in (args.only_layers or "").split(",") if o.strip())
    spec = NetworkSpec(args.network, args.rank, args.alpha, args.conv_rank, args.conv_alpha, args.train, only,
                       args.train_t5)
    flow = FlowSpec(args.timestep_sampling, args.sigmoid_scale, args.shift, args.guidance, args.max_sequence_length)
    fields = ("steps", "epochs", "lr", "te_lr", "batch", "grad_accum", "resolution", "trigger", "seed", "optimizer",
              "schedule", "warmup", "min_snr_gamma", "noise_offset", "caption_dropout", "grad_checkpointing",
              "max_grad_norm", "save_every", "sample_every", "sample_prompt", "preview_prompt", "preview", "save_dtype",
              "bad_images")
    cfg = TrainConfig(Path(args.data), Path(args.output), args.model, spec, flow,
                      resume=Path(args.resume) if args.resume else None, **{f: getattr(args, f) for f in fields})
    cfg.check()
    model = load_model(args.model or settings.model, **settings.device_options(args))
    out = trainer_for(cfg, model).run()
    print(out)
    return 0
