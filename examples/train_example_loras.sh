#!/usr/bin/env bash
# The example LoRAs in examples/loras/, trained with `lorakit train` on the embedded demo model from the images
# that examples/make_training_data.py draws (16 each). Deterministic on a CPU (seeded); ~2–5 minutes each on 2 cores.
# --caption-dropout: a fifth of the steps see the empty caption, so the style holds under CFG (the demo model's
# unconditional branch otherwise pulls the image back to its own look). Each run also writes NAME.preview.png (the
# page's card picture: blueprint's from the README's prompt, sunset's from its first caption, lorakit train's
# default; drawn with the LoRA at weight 1 and the run's seed).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-examples/loras}
python examples/make_training_data.py
lorakit train examples/train/blueprint -o "$OUT/blueprint_style.safetensors" --network locon --rank 8 --alpha 8 \
    --steps 400 --batch 4 --lr 2e-3 --lr-schedule cosine --warmup 20 --caption-dropout 0.2 --seed 1 --device cpu \
    --preview-prompt "blueprint, a yellow star on the left"
lorakit train examples/train/sunset -o "$OUT/sunset_lokr.safetensors" --network lokr --rank 8 --alpha 8 \
    --steps 400 --batch 4 --lr 2e-3 --lr-schedule cosine --warmup 20 --caption-dropout 0.2 --seed 2 --device cpu
