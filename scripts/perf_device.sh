#!/usr/bin/env bash
# The GPU speed runs behind docs/PERFORMANCE.md's second round (one CUDA GPU; lerobot wheels optional).
# Usage (repo root): OUT=dir bash scripts/perf_device.sh   -> OUT/*.log
set -uo pipefail
OUT_DEFAULT=runs/perf; . "$(dirname "$0")/perf_env.sh"
B="python3 -m kvreuse.bench iters=20 reuse=0 lerobot=0 eager=0"
timeout 90 python3 scripts/attn_tune.py > "$OUT/attn_tune.log" 2>&1
timeout 110 $B preset=pi0 check=1 compile=0 variants=sdpa/fp32,sdpa/triton,triton/triton > "$OUT/pi0_variants.log" 2>&1
timeout 100 $B preset=pi0 check=1 compile=1 expert_attn=triton > "$OUT/pi0_compile_triton.log" 2>&1
timeout 100 $B preset=pi0 check=1 compile=1 expert_attn=fp32 > "$OUT/pi0_compile_fp32.log" 2>&1
timeout 100 $B preset=pi05 check=1 compile=1 expert_attn=triton > "$OUT/pi05_compile_triton.log" 2>&1
tail -n 40 "$OUT"/*.log
