#!/usr/bin/env bash
# Round 3 comparison on one card, back to back: the expert's products through cuBLAS (torch) vs
# the fused Triton path (triton: fused_qkv + gated skinny GEMM + skinny residual products), Pi0
# and Pi0.5, torch.compile on, --check on; then (LEROBOT=1, the lerobot wheels installed) the
# winner side by side with lerobot 0.6.1 compiled.
# Usage (repo root, one CUDA GPU): OUT=dir bash scripts/perf_final.sh   -> OUT/*.log
set -uo pipefail
OUT_DEFAULT=runs/perf_final; . "$(dirname "$0")/perf_env.sh"
B="python3 -m kvreuse.bench iters=30 reuse=0 lerobot=0 eager=0 check=1 compile=1"
if [ "${LEROBOT:-0}" = 1 ]; then
  timeout 560 python3 -m kvreuse.bench preset=pi0 iters=10 reuse=0 eager=0 check=0 compile=1 expert_gemm=${GEMM:-triton} \
    lerobot=1 lerobot_compile=1 > "$OUT/pi0_lerobot_compiled.log" 2>&1
  grep -h -E "^== |full inference|lerobot|faster" "$OUT"/pi0_lerobot_compiled.log
  exit
fi
for p in pi0 pi05; do for g in torch triton; do
  timeout 140 $B preset=$p expert_gemm=$g > "$OUT/${p}_$g.log" 2>&1
done; done
grep -h -E "^== |denoise alone|full inference|vision|prefix LM|warm-up|check:|failed|peak" "$OUT"/pi0*.log
