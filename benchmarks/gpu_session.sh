#!/usr/bin/env bash
# One prepared GPU session (≈ 8–10 minutes on one H100/H200): the `gpu` tests, a CLI generation on CUDA in fp16
# and bf16, then benchmarks/gpu.py on full-size SD1.5 and SDXL shapes, benchmarks/train.py on SD1.5 (512 px) and
# benchmarks/serving.py (mixed-LoRA batches) on SD1.5 512 px. Logs and images go to $OUT.
#     OUT=/tmp/gpu_out bash benchmarks/gpu_session.sh        # from the repository root, lorakit importable
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT" /tmp/lorakit_shared/fixtures/real_loras
export PYTHONUNBUFFERED=1 LORAKIT_SHARED=${LORAKIT_SHARED:-/tmp/lorakit_shared}
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/src:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__,
'transformers', transformers.__version__)" | tee -a "$OUT/card.txt"
timeout 150 python3 -m pytest -m gpu tests/test_gpu.py -p no:cacheprovider -rs -q 2>&1 | tee "$OUT/gpu_tests.log" \
    | tail -15
for dt in fp16 bf16; do
    timeout 60 python3 -c "from lorakit.cli import main; main()" generate \
        "a cozy cabin in the woods <lora:demo_style:0.8>" --lora-dir examples/loras --steps 8 -W 256 -H 256 \
        --seed 1 --device cuda --dtype "$dt" -o "$OUT/cabin_$dt.png" 2>&1 | grep -v it/s | tail -4
done
cd benchmarks && timeout 240 python3 gpu.py 2>&1 | tee "$OUT/gpu_bench.log"
timeout 150 python3 train.py --model sd1 --device cuda --dtype fp16 --steps 20 2>&1 | grep -v Warn \
    | tee "$OUT/train_bench.log"
# mixed-LoRA batches vs one by one (issue 12): 8 requests, 8 LoRA sets, SD1.5 512 px, fp16
(cd .. && timeout 180 python3 benchmarks/serving.py --model sd15 --size 512 --steps 8 --repeats 2 --device cuda \
    2>&1 | grep -v Warn | tee "$OUT/serving_bench.log")
