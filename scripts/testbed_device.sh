#!/usr/bin/env bash
# Reproduces the shipped testbed policies on one CUDA GPU machine (16 cores): demos, training of
# tiny-pi05 and tiny-pi0 side by side on the one GPU, and a quick closed-loop check.
# Usage (repo root, Python with torch + the Meta-World wheels importable):
#   OUT=/some/dir BUDGET_S=540 bash scripts/testbed_device.sh
# INIT_FROM=src/kvreuse/assets fine-tunes the shipped testbed-{pi05,pi0} instead of training from
# scratch (their norm stats are kept); LR and BATCH set the optimizer; DEMO_COUNTS="reach-v3=300 ..."
# records more demos of the named tasks.
# Writes OUT/testbed-pi05/, OUT/testbed-pi0/ (checkpoints), OUT/run.log, OUT/eval.json.
set -uo pipefail
OUT=${OUT:-runs/device}; BUDGET_S=${BUDGET_S:-540}; DEMOS_PER_TASK=${DEMOS_PER_TASK:-100}
TASKS=${TASKS:-}; INIT_FROM=${INIT_FROM:-}; DEMO_COUNTS=${DEMO_COUNTS:-}; LR=${LR:-5e-4}; BATCH=${BATCH:-256}; EVAL_HELDOUT=${EVAL_HELDOUT:-10}; EVAL_SEEN=${EVAL_SEEN:-5}; EVAL_RESERVE_S=${EVAL_RESERVE_S:-100}
START=$(date +%s); W=/tmp/testbed
case "$(realpath -m "$OUT")/ $(realpath -m "${INIT_FROM:-/nonexistent}")/" in
  *"$W/"*) echo "testbed_device.sh: OUT and INIT_FROM must lie outside $W (it is emptied first)" >&2; exit 2;;
esac
mkdir -p "$OUT"; LOG="$OUT/run.log"
rm -rf $W; mkdir -p $W  # a failed step must not leave an earlier run's files to be copied as this one's
fail() { log "FAILED: $*"; exit 1; }
export MUJOCO_GL=egl PYOPENGL_PLATFORM=egl PYTHONUNBUFFERED=1
log() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
gl_ok() { python3 -c "import mujoco; m=mujoco.MjModel.from_xml_string('<mujoco/>'); r=mujoco.Renderer(m,8,8); r.render()" >/dev/null 2>&1; }
if ! gl_ok; then
  export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
  export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
  gl_ok && log "EGL ok with the NVIDIA vendor file" || log "WARNING: EGL rendering not working"
else log "EGL ok"; fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$LOG"; nproc | tee -a "$LOG"

log "demos: $DEMOS_PER_TASK per task"
python3 -m kvreuse.train.demos --out $W/demos --overwrite --demos-per-task $DEMOS_PER_TASK --workers $(nproc) \
  --parts-per-task 4 ${TASKS:+--tasks $TASKS} ${DEMO_COUNTS:+--counts $DEMO_COUNTS} 2>&1 | tr '\r' '\n' | grep -v -i -E "warn|^demos: .*it/s|%\|" | tee -a "$LOG"
[ "${PIPESTATUS[0]}" = 0 ] || fail "demos (see above)"
du -sh $W/demos | tee -a "$LOG"

NOW=$(date +%s); MIN=$(python3 -c "print(round(max(1.0, ($BUDGET_S - ($NOW - $START) - $EVAL_RESERVE_S) / 60), 2))")
log "train both presets for $MIN min each, concurrently"
pids=()
for v in pi05 pi0; do
  python3 -m kvreuse.train.train --demos $W/demos --out $W/testbed-$v --overwrite --preset tiny-$v --steps 200000 \
    --max-minutes $MIN --batch-size $BATCH --lr $LR --log-every 500 ${INIT_FROM:+--init $INIT_FROM/testbed-$v} > $W/train-$v.log 2>&1 &
  pids+=($!)
done
ok=1; for p in "${pids[@]}"; do wait "$p" || ok=0; done
for v in pi05 pi0; do
  echo "=== train tiny-$v ===" >> "$LOG"; grep -v -i warn $W/train-$v.log >> "$LOG"
done
[ $ok = 1 ] || fail "training (see above)"
for v in pi05 pi0; do
  mkdir -p "$OUT/testbed-$v"; cp $W/testbed-$v/{model.safetensors,config.json,norm_stats.json,train_log.jsonl} "$OUT/testbed-$v/"
done
log "quick closed-loop check"
python3 scripts/testbed_eval.py $W/testbed-pi05 $W/testbed-pi0 --heldout $EVAL_HELDOUT --seen $EVAL_SEEN \
  --workers $(nproc) ${TASKS:+--tasks $TASKS} --out "$OUT/eval.json" 2>&1 | tr '\r' '\n' | grep -v -i -E "warn|episodes: .*%" | tee -a "$LOG"
[ "${PIPESTATUS[0]}" = 0 ] || fail "closed-loop check (see above)"
log "done"
