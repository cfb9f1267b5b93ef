#!/usr/bin/env bash
# Every GPU check in one script, under 13 minutes on one GPU (each step has its own time limit):
#
#   bash bench/gpu.sh                 # results in $OUT (default: a new temporary folder), printed at the end
#   PYTHON=python3 bash bench/gpu.sh  # another interpreter with a CUDA build of torch and this project installed
#
# 1. bench/bench_trainer.py --device cuda: the trainer (Koopman off and on) and the plain loop in bf16 autocast
#    and fp32: tokens/s, step time, peak memory (torch.cuda.max_memory_allocated), share of the GPU's peak
#    FLOP rate; the LM head alone (plain, torch's chunked, this project's at several chunk sizes); the
#    throughput ratio to the plain loop and the Koopman overhead.                              at most 300 s
# 2. bench/bench_trainer.py --only epoch: whole epochs with validation, Koopman on and off (and without the
#    linearity measure), interleaved; BENCHMARKS.md, "A whole Koopman epoch".                at most 150 s
# 3. bench/bench_gpu_trials.py: trials per hour with --trials-per-gpu K for K = 1, 2, 4, 8.   at most 4 x 75 s
#
# Written without a GPU at hand and not yet run on one (BENCHMARKS.md, "GPU").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-$(mktemp -d -t koopman-gpu-XXXXXX)}
mkdir -p "$OUT"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu.sh: torch sees no CUDA device (torch ' + torch.__version__ + ')')"
"$PY" -c "import torch; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__)" | tee "$OUT/gpu_machine.txt"
started=$SECONDS

timeout 300 "$PY" bench/bench_trainer.py --device cuda --threads 0 --steps 20 --repeats 3 --tokens 512 \
  --chunks 512,1024,2048,4096 --only cuda,chunks,throughput,overhead \
  > "$OUT/gpu_trainer.md" 2> "$OUT/gpu_trainer.log" || echo "gpu.sh: bench_trainer.py failed or timed out (rc $?), see $OUT/gpu_trainer.log" >&2

timeout 150 "$PY" bench/bench_trainer.py --device cuda --threads 0 --repeats 3 --epoch-steps 100 \
  --epoch-eval-batches 10 --only epoch \
  > "$OUT/gpu_epoch.md" 2> "$OUT/gpu_epoch.log" || echo "gpu.sh: the epoch measure failed or timed out (rc $?), see $OUT/gpu_epoch.log" >&2

timeout 330 "$PY" bench/bench_gpu_trials.py --trials-per-gpu 1,2,4,8 --limit 75 \
  > "$OUT/gpu_trials.md" 2> "$OUT/gpu_trials.log" || echo "gpu.sh: bench_gpu_trials.py failed or timed out (rc $?), see $OUT/gpu_trials.log" >&2

cat "$OUT/gpu_trainer.md" "$OUT/gpu_epoch.md" "$OUT/gpu_trials.md"
echo "gpu.sh: done in $((SECONDS - started)) s; results in $OUT" >&2
