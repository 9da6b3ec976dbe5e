#!/usr/bin/env bash
# Prepared for the next GPU session (NOT run yet): times what session 2 built but could not
# measure — Triton skinny GEMMs for the expert (model/skinny_gemm.py) and inductor max-autotune —
# against the current default (compile + Triton expert attention), with --check for correctness.
# Usage (repo root, one CUDA GPU): OUT=dir bash scripts/perf_next.sh   -> OUT/*.log
set -uo pipefail
OUT=${OUT:-runs/perf_next}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src:${PYTHONPATH:-}
B="python3 -m kvreuse.bench iters=20 reuse=0 lerobot=0 eager=0 check=1"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.log"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/card.log"
timeout 150 python3 scripts/gemm_tune.py > "$OUT/gemm_tune.log" 2>&1
timeout 110 $B preset=pi0 compile=1 > "$OUT/pi0_default.log" 2>&1
timeout 110 $B preset=pi0 compile=1 expert_gemm=triton > "$OUT/pi0_skinny_gemm.log" 2>&1
timeout 200 $B preset=pi0 compile=1 compile_mode=max-autotune-no-cudagraphs > "$OUT/pi0_max_autotune.log" 2>&1
timeout 110 $B preset=pi05 compile=1 expert_gemm=triton > "$OUT/pi05_skinny_gemm.log" 2>&1
grep -h -E "^== |denoise alone|full inference|warm-up|check:|failed" "$OUT"/pi0*.log "$OUT"/pi05*.log
