#!/bin/bash
# The resident-rank GPU benches on one GPU machine, in the order they matter, each bounded in time, each writing
# its JSON into $OUT as it goes (run from a folder holding arthur_cluster/ and bench/; MLX for CUDA installed and
# on PYTHONPATH).
#   bash bench/gpu_run.sh pipeline   # 2 pipeline ranks: 32k document, 4 questions; then a 262k single pass
#   bash bench/gpu_run.sh single     # one rank: 32k document, 4 questions; then first-call costs per shape
set -o pipefail
OUT=${OUT:-.}
export PYTHONUNBUFFERED=1
python3 -c "import mlx.core as mx, mlx_lm; print('mlx', mx.__version__, 'mlx-lm', mlx_lm.__version__, mx.default_device())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
case "$1" in
pipeline)
  ARTHUR_CLUSTER_HOME=/tmp/arthur-pipeline ARTHUR_BENCH_TIMINGS=/tmp/timings-pipeline timeout "${T_PIPE:-540}" \
    python3 bench/gpu_resident.py --doc-tokens 32768 --mode pipeline --timings --again --time-budget 0.1 \
    --long-tokens 262100 --load-timeout 900 --out "$OUT/pipeline.json" 2>&1 | tee "$OUT/pipeline.log"
  grep -h progress /tmp/timings-pipeline/*.jsonl | tail -n 6
  ;;
single)
  ARTHUR_CLUSTER_HOME=/tmp/arthur-single timeout "${T_SINGLE:-200}" python3 bench/gpu_resident.py \
    --doc-tokens 32768 --mode single --ranks 1 --timings --again --time-budget 0.1 --out "$OUT/single.json" 2>&1 \
    | tee "$OUT/single.log"
  timeout "${T_FIRST:-60}" python3 bench/gpu_firstcall.py --context 32384 --out "$OUT/firstcall.json" 2>&1 \
    | tee "$OUT/firstcall.log"
  ;;
esac
for f in $(find /tmp/arthur-* -name 'rank*.log' 2>/dev/null); do echo "== $f"; tail -n 4 "$f"; done
