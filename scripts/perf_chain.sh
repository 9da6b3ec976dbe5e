#!/usr/bin/env bash
# Round 4 comparison on one card, back to back: the round-3 expert ("triton") vs the all-Triton
# "chain" layer (norms inside the reduce kernels) without and with programmatic dependent launch
# (PDL: each kernel prefetches its weights into L2 while the previous one runs), torch.compile on
# for the rest, --check on. PRESETS="pi0 pi05" (default pi0).
# Usage (repo root, one sm_90 GPU): OUT=dir bash scripts/perf_chain.sh   -> OUT/*.log
set -uo pipefail
OUT_DEFAULT=runs/perf_chain; . "$(dirname "$0")/perf_env.sh"
python3 -c "import torch; from kvreuse.model.kernels import pdl_supported as p; print('pdl_supported', p(torch.device('cuda')))" | tee -a "$OUT/card.log"
B="python3 -m kvreuse.bench iters=30 reuse=0 lerobot=0 eager=0 check=1 compile=${COMPILE:-1}"
for p in ${PRESETS:-pi0}; do
  timeout 150 $B preset=$p expert_gemm=triton > "$OUT/${p}_triton.log" 2>&1
  timeout 150 $B preset=$p expert_gemm=chain expert_pdl=0 > "$OUT/${p}_chain.log" 2>&1
  timeout 150 $B preset=$p expert_gemm=chain expert_pdl=1 > "$OUT/${p}_chain_pdl.log" 2>&1
done
for f in "$OUT"/*.log; do echo "== $f"; grep -h -E "expert|denoise alone|full inference|warm-up|check:|failed|Error|error" "$f" | head -20; done
