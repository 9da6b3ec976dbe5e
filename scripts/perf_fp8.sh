#!/usr/bin/env bash
# Round 5 on one card: the chain micro-benchmark (PDL, attention K/V prefetch, fp8 weights, then
# the fp8 tiling sweeps; SWEEP=0 skips them), then the full bench with bf16 vs fp8 expert weights,
# torch.compile on, --check on (fp8 changes the numbers; the check says by how much).
# PRESETS="pi0 pi05" (default pi0); EXTRA="key=value ..." goes to every bench run.
# Usage (repo root, one sm_90 GPU): OUT=dir bash scripts/perf_fp8.sh   -> OUT/*.log
set -uo pipefail
OUT_DEFAULT=runs/perf_fp8; . "$(dirname "$0")/perf_env.sh"
[ "${MICRO:-1}" = 1 ] && timeout 300 python3 scripts/chain_micro.py 2>&1 | tee "$OUT/chain_micro.log"
B="python3 -m kvreuse.bench iters=30 reuse=${REUSE:-0} lerobot=0 eager=0 check=1 compile=${COMPILE:-1} ${EXTRA:-}"
for p in ${PRESETS:-pi0}; do
  timeout 200 $B preset=$p > "$OUT/${p}_bf16.log" 2>&1
  timeout 200 $B preset=$p expert_fp8=1 > "$OUT/${p}_fp8.log" 2>&1
done
for f in "$OUT"/*_bf16.log "$OUT"/*_fp8.log; do
  echo "== $f"; grep -h -E "expert|denoise alone|full inference|warm-up|check|failed|Error|error" "$f" | head -20
done
