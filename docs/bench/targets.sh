#!/usr/bin/env bash
# Re-measure every efficiency target on this machine, then print them beside the targets.
# The CPU setting: forward+backward, batch 8, 2 heads, head dim 32, ratios to softmax (SDPA) in one run.
# Takes about 6 minutes on a quiet 2-core CPU (the Newton rows at n = 4096, m = 1024, dominate).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-docs/bench}
COMMON=(--batch 8 --heads 2 --head-dim 32 --warmup 1 --repeats ${REPEATS:-3} --out "$OUT" --no-progress)

# SOFT in the paper's LRA setting (avgpool window 4, m = n/4): Newton (with its matmul floor) and exact solve vs SDPA.
python cli.py bench --attn softmax --attn soft --attn soft:inverse=solve --lengths 1024,2048,4096 \
    "${COMMON[@]}" --name lra-setting
# SOFT with a fixed m = 64: linear growth in time and memory, speed-up over SDPA at n = 16384.
python cli.py bench --attn softmax --attn soft:num_landmarks=64 --lengths 4096,8192,16384 "${COMMON[@]}" \
    --name fixed-m64
# torch.compile against eager, side by side.
python cli.py bench --attn softmax --attn soft:num_landmarks=64 --lengths 4096 --compile --no-floors \
    "${COMMON[@]}" --name compile
# The LRA encoder (2 layers, d 64, 2 heads) training ListOps-sized batches: tokens/s and peak memory.
python cli.py bench --model lra --attn softmax --attn soft:num_landmarks=64 --attn soft --lengths 2048 --batch 32 \
    --warmup 1 \
    --repeats ${REPEATS:-3} --out "$OUT" --no-progress --name listops-encoder

python -m lra_soft.bench.targets "$OUT"
