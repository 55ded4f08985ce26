#!/usr/bin/env bash
# One prepared GPU session, in priority order and inside one deadline (a lent machine runs one command for at most
# 10 minutes, out of 15 minutes of device time all told): the `gpu` tests, benchmarks/gpu.py on full-size SD1.5 and
# SDXL shapes, a CLI generation on CUDA in fp16 and bf16, benchmarks/train.py on SD1.5 (512 px),
# benchmarks/serving.py (mixed-LoRA batches) on SD1.5 512 px, full-size FLUX.1-dev rows (benchmarks/flux.py,
# benchmarks/quant.py: GGUF, fp8 and — with bitsandbytes — NF4) and full-size SD3.5-Large rows (benchmarks/sd3.py).
# A step that no longer fits before the deadline is skipped and says so. Logs and images go to $OUT (11 files).
#     OUT=/tmp/gpu_out DEADLINE=500 bash benchmarks/gpu_session.sh   # from the repository root, lorakit importable
set -u
OUT=${OUT:-/tmp/gpu_out}
DEADLINE=${DEADLINE:-500}  # seconds from the start; leave the device call's timeout_s some room above it
mkdir -p "$OUT" /tmp/lorakit_shared/fixtures/real_loras
export PYTHONUNBUFFERED=1 LORAKIT_SHARED=${LORAKIT_SHARED:-/tmp/lorakit_shared}
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/src:$PWD
START=$SECONDS

# step LIMIT LOG COMMAND…: run COMMAND with at most LIMIT seconds (less when the deadline is nearer), its output
# appended to $OUT/LOG and echoed
step() {
    local limit=$1 log=$2 left=$((DEADLINE - (SECONDS - START)))
    shift 2
    ((left < limit)) && limit=$left
    if ((limit < 20)); then
        echo "SKIPPED (deadline): $*" | tee -a "$OUT/$log"
        return
    fi
    echo "== $* (at most ${limit} s, at $((SECONDS - START)) s)" | tee -a "$OUT/$log"
    timeout "$limit" "$@" 2>&1 | grep -v -e "it/s]" -e "Warn" | tee -a "$OUT/$log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__,
'transformers', transformers.__version__)" | tee -a "$OUT/card.txt"
step 150 gpu_tests.log python3 -m pytest -m gpu tests/test_gpu.py tests/test_gpu_nf4.py -p no:cacheprovider -rs -q
(cd benchmarks && step 240 gpu_bench.log python3 gpu.py)
for dt in fp16 bf16; do
    step 45 cli.log python3 -c "from lorakit.cli import main; main()" generate \
        "a cozy cabin in the woods <lora:demo_style:0.8>" --lora-dir examples/loras --steps 8 -W 256 -H 256 \
        --seed 1 --device cuda --dtype "$dt" -o "$OUT/cabin_$dt.png"
done
(cd benchmarks && step 120 train_bench.log python3 train.py --model sd1 --device cuda --dtype fp16 --steps 20)
# mixed-LoRA batches vs one by one (issue 12): 8 requests, 8 LoRA sets, SD1.5 512 px, fp16
step 150 serving_bench.log python3 benchmarks/serving.py --model sd15 --size 512 --steps 8 --repeats 2 --device cuda
# FLUX.1 (issues 19, 20): full-size FLUX.1-dev (19+38 blocks, random weights) in bf16 — apply/switch/restore of a
# rank-16 kohya BFL LoRA and a LoKr vs diffusers' load+fuse; then one 512-px step on GGUF Q8_0 / Q4_K and fp8 bases
# (merge path, side path, base alone)
(cd benchmarks && step 150 flux_bench.log python3 flux.py --device cuda --dtype bf16 --double 19 --single 38)
(cd benchmarks && step 150 quant_bench.log python3 quant.py --device cuda --dtype bf16 --double 19 --single 38 \
    --quant Q8_0 Q4_K fp8 --random-blocks --skip-diffusers)
# NF4 (bitsandbytes Linear4bit, nested absmax) rows, the same step; only where bitsandbytes imports (the quant extra)
if python3 -c "import bitsandbytes" 2>/dev/null; then
    (cd benchmarks && step 120 quant_bench.log python3 quant.py --device cuda --dtype bf16 --double 19 --single 38 \
        --quant nf4 --skip-diffusers)
else
    echo "SKIPPED (bitsandbytes not installed): NF4 rows" | tee -a "$OUT/quant_bench.log"
fi
# SD3.5-Large (issue 22): full size (38 joint blocks, random weights) in bf16 — a rank-16 diffusers-format LoRA over
# diffusers' default SD3 targets (and the same layers in kohya SAI names): apply/switch/restore vs load+fuse
(cd benchmarks && step 120 sd3_bench.log python3 sd3.py --device cuda --dtype bf16 --blocks 38)
echo "session done in $((SECONDS - START)) s" | tee -a "$OUT/card.txt"
