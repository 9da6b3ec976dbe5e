#!/usr/bin/env bash
# Round 3: times the fused expert path (model/skinny_gemm.py: fused_qkv = norm + QKV + rotary +
# cache write; norm + gate/up + GELU; FastPi0(expert_gemm="fused" / "triton")) with --check, a
# kernel profile of it, and the per-product tune (scripts/gemm_tune.py).
# Usage (repo root, one CUDA GPU): OUT=dir bash scripts/perf_next.sh   -> OUT/*.log, OUT/prof_*.txt
set -uo pipefail
OUT_DEFAULT=runs/perf_next; . "$(dirname "$0")/perf_env.sh"
B="python3 -m kvreuse.bench iters=20 reuse=0 lerobot=0 eager=0 check=1"
timeout 150 $B preset=pi0 compile=1 expert_gemm=fused profile="$OUT/prof_pi0_fused.txt" > "$OUT/pi0_fused.log" 2>&1
timeout 100 $B preset=pi05 compile=1 expert_gemm=fused > "$OUT/pi05_fused.log" 2>&1
timeout 100 $B preset=pi0 compile=1 expert_gemm=triton > "$OUT/pi0_triton.log" 2>&1
grep -h -E "^== |denoise alone|full inference|warm-up|check:|failed" "$OUT"/pi0*.log
timeout 110 python3 scripts/gemm_tune.py > "$OUT/gemm_tune.log" 2>&1
