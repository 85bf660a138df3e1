#!/bin/bash
# The resident-rank GPU benches on one GPU machine, in the order they matter, each bounded in time, each writing
# its JSON into $OUT as it goes (run from a folder holding arthur_cluster/ and bench/; MLX for CUDA installed and
# on PYTHONPATH).
#   bash bench/gpu_run.sh questions   # 32k document: 2 pipeline ranks, then one rank; then first-call costs
#   bash bench/gpu_run.sh long        # one 262k-token single pass on 2 pipeline ranks
set -o pipefail
OUT=${OUT:-.}
export PYTHONUNBUFFERED=1
python3 -c "import mlx.core as mx, mlx_lm; print('mlx', mx.__version__, 'mlx-lm', mlx_lm.__version__, mx.default_device())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
case "$1" in
questions)
  ARTHUR_CLUSTER_HOME=/tmp/arthur-pipeline timeout "${T_PIPE:-360}" python3 bench/gpu_resident.py --doc-tokens 32768 --mode pipeline --timings --again \
    --time-budget 0.1 --out "$OUT/pipeline32k.json" 2>&1 | tee "$OUT/pipeline32k.log"
  ARTHUR_CLUSTER_HOME=/tmp/arthur-single timeout "${T_SINGLE:-150}" python3 bench/gpu_resident.py --doc-tokens 32768 --mode single --ranks 1 --timings \
    --again --time-budget 0.1 --out "$OUT/single32k.json" 2>&1 | tee "$OUT/single32k.log"
  timeout "${T_FIRST:-60}" python3 bench/gpu_firstcall.py --context 32384 --out "$OUT/firstcall.json" 2>&1 \
    | tee "$OUT/firstcall.log"
  ;;
long)
  ARTHUR_CLUSTER_HOME=/tmp/arthur-long timeout "${T_LONG:-420}" python3 bench/gpu_resident.py --doc-tokens 262100 --mode pipeline --questions 1 \
    --no-warmup --max-tokens 4 --timings --load-timeout 900 --out "$OUT/pipeline262k.json" 2>&1 \
    | tee "$OUT/pipeline262k.log"
  ;;
esac
for f in $(find /tmp/arthur-* -name 'rank*.log' 2>/dev/null); do echo "== $f"; tail -n 4 "$f"; done
