# Sourced by the GPU perf scripts: OUT folder, PYTHONPATH, and the card / versions into $OUT/card.log.
# Usage: OUT_DEFAULT=runs/x; . "$(dirname "$0")/perf_env.sh"
OUT=${OUT:-$OUT_DEFAULT}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src:${PYTHONPATH:-}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } | tee "$OUT/card.log"
