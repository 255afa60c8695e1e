#!/usr/bin/env bash
# The GPU check in one command: run it from the checkout on a CUDA machine, nothing to install
# (torch, typer, tqdm, matplotlib; timm for part 3; Hugging Face datasets is not needed).
#
#   OUT=gpu_check bash scripts/gpu_check.sh                 # CUDA, full sizes, about 9 minutes
#   OUT=/tmp/gc bash scripts/gpu_check.sh --device cpu      # tiny sizes on CPU, what CI runs (about a minute)
#
# Parts, in order of value; each prints one summary line, and one that fails does not stop the next:
#   1. pytest -m gpu (the contract tests on CUDA: CUDA output = CPU output, bf16 autocast; bench and train on CUDA)
#   2. attention benchmark at LRA shapes, forward+backward under bf16 autocast, time and peak memory: softmax (SDPA),
#      SOFT in the paper's setting (window 4, Newton 20), SOFT m = 64, Nystrom, at n = 1024, 4096, 16384
#   3. timm.create_model("soft_tiny") through our registration, one training step
#   4. ListOps under --protocol paper for softmax and SOFT (paper setting): 5,000 steps where the time allows, else the
#      steps that fit, reported as such (on a generated 20,000-example train set, so listed as not comparable)
# Everything is written under $OUT (default: gpu_check/); summary.txt holds the summary lines.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

DEVICE=cuda
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --device=*) DEVICE="${1#*=}"; shift ;;
    *) echo "error: unknown argument '$1'; usage: bash scripts/gpu_check.sh [--device cuda|cpu]" >&2; exit 2 ;;
  esac
done
case "$DEVICE" in
  cuda|cpu) ;;
  *) echo "error: --device must be cuda or cpu, got '$DEVICE'" >&2; exit 2 ;;
esac

OUT="${OUT:-gpu_check}"
BUDGET_S="${BUDGET_S:-540}"            # whole check, machine start excluded
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
: > "$OUT/summary.txt"
CACHE="$(mktemp -d "${TMPDIR:-/tmp}/lra_gpu_check.XXXXXX")"   # data cache: never under $OUT
trap 'rm -rf "$CACHE"' EXIT
START=$SECONDS

summary() { echo "$*" | tee -a "$OUT/summary.txt"; }
left() { echo $(( BUDGET_S - (SECONDS - START) )); }

if [ "$DEVICE" = cuda ]; then
  LENGTHS=1024,4096,16384; BATCH=8; REPEATS=5; STEPS=5000; EVAL_EVERY=50; NUM_TRAIN=20000
  BENCH_S=150; TRAIN_SOURCE=()
else
  LENGTHS=64,128; BATCH=2; REPEATS=1; STEPS=2; EVAL_EVERY=2; NUM_TRAIN=0
  BENCH_S=120; TRAIN_SOURCE=(--source data/fixtures/listops --batch-size 4)
fi
"$PY" -c "import torch, sys; sys.exit(0 if '$DEVICE' == 'cpu' or torch.cuda.is_available() else 1)" || {
  summary "setup: FAILED, torch sees no CUDA device; run with --device cpu for the tiny CPU check"; exit 1; }
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" > "$OUT/versions.txt" 2>&1
summary "setup: $(tr '\n' ' ' < "$OUT/versions.txt")on $DEVICE, budget ${BUDGET_S}s"

# 1. pytest -m gpu ---------------------------------------------------------------------------------------------
timeout 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests > "$OUT/pytest_gpu.txt" 2>&1
rc=$?
summary "1 pytest -m gpu: $( [ $rc -eq 0 ] && echo ok || echo "FAILED (exit $rc)"), $(grep -E '(passed|failed|skipped|error|deselected)' "$OUT/pytest_gpu.txt" | tail -1)"

# 2. attention benchmark ---------------------------------------------------------------------------------------
timeout "$BENCH_S" "$PY" cli.py bench --attn softmax --attn soft --attn soft:num_landmarks=64 --attn nystrom \
  --lengths "$LENGTHS" --batch "$BATCH" --autocast bfloat16 --device "$DEVICE" --repeats "$REPEATS" --warmup 1 \
  --no-flops --no-floors --no-progress --out "$OUT/bench" --name lra-shapes > "$OUT/bench.txt" 2>&1
rc=$?
if [ $rc -eq 0 ] && [ -f "$OUT/bench/lra-shapes.json" ]; then
  summary "2 bench: ok, $("$PY" -c "
import json; rows = json.load(open('$OUT/bench/lra-shapes.json'))['rows']
print(f'{len(rows)} rows; ' + ', '.join(f\"{r['attention']} n={r['n']} {r['fwdbwd_ms']:.1f} ms\"
      for r in rows if r['n'] == max(x['n'] for x in rows)))") (bench/lra-shapes.md)"
else
  summary "2 bench: FAILED (exit $rc), see bench.txt"
fi

# 3. timm soft_tiny, one training step -------------------------------------------------------------------------
timeout 120 "$PY" - "$DEVICE" > "$OUT/timm.txt" 2>&1 <<'EOF'
import sys, time
import torch
try:
    import timm
except ImportError:
    print("3 timm soft_tiny: skipped, timm is not installed"); sys.exit(0)
import lra_soft.vision.timm_models  # noqa: F401  (registers soft_tiny with timm)
device = torch.device(sys.argv[1])
tiny = device.type == "cpu"
model = timm.create_model("soft_tiny", num_classes=10 if tiny else 1000).to(device).train()
size = 224
x = torch.randn(2 if tiny else 32, 3, size, size, device=device)
y = torch.randint(0, 10 if tiny else 1000, (x.shape[0],), device=device)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
tic = time.perf_counter()
with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
    loss = torch.nn.functional.cross_entropy(model(x).float(), y)
loss.backward()
opt.step()
if device.type == "cuda":
    torch.cuda.synchronize()
ok = torch.isfinite(loss).item() and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
print(f"3 timm soft_tiny: {'ok' if ok else 'FAILED (non-finite)'}, one training step on {device} batch {x.shape[0]}, "
      f"loss {loss.item():.3f}, {time.perf_counter() - tic:.2f} s, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params")
sys.exit(0 if ok else 1)
EOF
rc=$?
line=$(grep '^3 timm' "$OUT/timm.txt" | tail -1)
summary "${line:-3 timm soft_tiny: FAILED (exit $rc), see timm.txt}"

# 4. ListOps under the paper protocol --------------------------------------------------------------------------
data_opts=()
if [ "$NUM_TRAIN" -gt 0 ]; then
  data_opts=(--data-option "num_train=$NUM_TRAIN")
  tic=$SECONDS
  timeout "$(( $(left) > 60 ? $(left) - 30 : 30 ))" "$PY" cli.py prepare listops --data-dir "$CACHE" \
    --data-option "num_train=$NUM_TRAIN" --no-progress > "$OUT/listops_prepare.txt" 2>&1
  summary "4 listops data: $( [ $? -eq 0 ] && echo ok || echo FAILED), $NUM_TRAIN/2000/2000 generated in $(( SECONDS - tic )) s"
fi
for attn in softmax soft; do
  runs_left=$([ "$attn" = softmax ] && echo 2 || echo 1)
  allowed=$(( ($(left) - 15) / runs_left ))
  if [ "$allowed" -lt 30 ]; then summary "4 listops $attn: skipped, ${allowed}s left"; continue; fi
  run="$OUT/listops/$attn"
  rm -rf "$run"
  timeout "$allowed" "$PY" cli.py train listops --attn "$attn" --protocol paper --steps "$STEPS" \
    --eval-every "$EVAL_EVERY" --device "$DEVICE" --data-dir "$CACHE" "${data_opts[@]}" "${TRAIN_SOURCE[@]}" \
    --out "$run" --no-progress > "$OUT/listops_$attn.txt" 2>&1
  rc=$?
  rm -f "$run"/*.pt   # results, config, metrics and curve come back; checkpoints stay behind
  if [ $rc -eq 0 ]; then
    summary "4 listops $attn: ok, $(tail -1 "$OUT/listops_$attn.txt")"
  elif [ -s "$run/metrics.jsonl" ]; then
    summary "4 listops $attn: stopped after ${allowed}s (not finished), $("$PY" -c "
import json; r = [json.loads(l) for l in open('$run/metrics.jsonl')][-1]
print(f\"step {r['step']} of $STEPS: train loss {r['loss']:.4f}, dev acc {100 * r['val_acc']:.2f}%, {r['tokens_per_s']:,.0f} tokens/s\")")"
  else
    summary "4 listops $attn: FAILED (exit $rc), see listops_$attn.txt"
  fi
done
summary "done in $(( SECONDS - START )) s; files under $OUT"
