#!/usr/bin/env bash
# Paired reuse sweeps of both shipped testbed policies on a many-core machine (what produced
# docs/RESULTS.md; run on the project's GPU machine, 16 cores, rollouts on the CPU workers).
# Usage (repo root, kvreuse + Meta-World importable): OUT=dir EPISODES=20 CAP_S=200 bash scripts/sweep_device.sh
# GRID_SET=confirm runs the settings that kept success (and the loose-threshold cliff as a control) on
# more episodes (docs/RESULTS.md, "Confirmation at n = 500"), GRID_SET=crossmodal the cross-modal
# gate at looser image thresholds, GRID_SET=crossmodal_state its looser state tests (image 0.80) and
# image tests (state 0.98);
# GRID_SET=age the cross-modal gate with a cap on the cache's age in calls (docs/RESULTS.md, "An age
# cap on the cross-modal gate"), GRID_SET=age_confirm the capped setting alone, GRID_SET=fresh_state
# that gate with the prompt (and Pi0.5's state tokens) recomputed on a reuse, GRID_SET=state_tests that gate's
# state test against the cameras' snapshot (vision_only, partial) and with an L2 bound on the state's change,
# GRID_SET=state_confirm the two of those that kept push, for fresh seeds, GRID_SET=state_both the modes that
# part the state's and the cameras' snapshots under the default state_reference=both,
# GRID_SET=keepers the three settings the README names as keeping success (threshold 0.98, period 2,
# partial with a refresh after 2 calls), for fresh seeds, GRID_SET=period2 the one of them the fresh seeds left
# least certain, for more seeds, GRID_SET=crossmodal_confirm the cross-modal gate at image 0.80 /
# state 0.98 (the Pi0-style policy's time-saving setting) for fresh seeds, GRID_SET=partial_confirm
# the same gate with partial reuse (the setting that kept Pi0.5's push) for fresh seeds,
# GRID_SET=readme the five settings of the README's "Which setting to use" (push again after the
# Meta-World reset fix, 5117baa), GRID_SET=push_rest the settings of "Push on two more seeds" that
# neither the main grid nor readme holds (push again after that fix).
# VARIANTS="pi05" runs one policy; TASKS="push-v3" some tasks only; SEED=1 other noise seeds (the
# pairs differ from seed 0's); DB=push another DB name (default sweep).
# A sweep cut off by CAP_S continues where it stopped when run again on the same DB.
set -uo pipefail
OUT=${OUT:-runs/sweeps}; EPISODES=${EPISODES:-20}; CAP_S=${CAP_S:-200}; VARIANTS=${VARIANTS:-pi05 pi0}
SEED=${SEED:-0}; DB=${DB:-sweep}; read -r -a TASK_ARGS <<< "${TASKS:+--tasks $TASKS}"
export MUJOCO_GL=${MUJOCO_GL:-egl} PYOPENGL_PLATFORM=${PYOPENGL_PLATFORM:-egl} PYTHONUNBUFFERED=1
GRID=('gate=threshold threshold=0.9,0.95,0.98 mode=full' 'gate=crossmodal threshold=0.9' 'gate=phase threshold=0.9'
      'gate=threshold threshold=0.9 mode=vision_only synchronized=False,True' 'gate=period period=2 mode=full'
      'gate=threshold threshold=0.9 mode=partial patch_max_diff=None')
if [ "${GRID_SET:-main}" = confirm ]; then
  GRID=('gate=threshold threshold=0.9 mode=full' 'gate=threshold threshold=0.98 mode=full' 'gate=crossmodal threshold=0.9'
        'gate=phase threshold=0.9' 'gate=period period=2 mode=full' 'gate=threshold threshold=0.9 mode=partial'
        'gate=always mode=partial max_age_calls=2,5')
elif [ "${GRID_SET:-main}" = crossmodal ]; then  # looser image thresholds of the cross-modal gate
  GRID=('gate=crossmodal threshold=0.8,0.85')
elif [ "${GRID_SET:-main}" = crossmodal_state ]; then  # the state test is what refuses most calls at 0.80
  GRID=('gate=crossmodal threshold=0.8 state_threshold=0.98,0.97,0.96' 'gate=crossmodal threshold=0.7,0.6,0.5 state_threshold=0.98')
elif [ "${GRID_SET:-main}" = age ]; then  # the gate's reuse bounded by the cache's age (1: never twice in a row)
  GRID=('gate=crossmodal threshold=0.8 state_threshold=0.98 max_age_calls=1,2'
        'gate=crossmodal threshold=0.8 max_age_calls=1')
elif [ "${GRID_SET:-main}" = age_confirm ]; then  # the capped setting alone, on more seeds / tasks
  GRID=('gate=crossmodal threshold=0.8 state_threshold=0.98 max_age_calls=1')
elif [ "${GRID_SET:-main}" = fresh_state ]; then  # Pi0.5's state tokens recomputed on a reuse (vision_only)
  GRID=('gate=crossmodal threshold=0.8 state_threshold=0.98 mode=full,vision_only')
elif [ "${GRID_SET:-main}" = state_tests ]; then  # which state a reuse is compared with, and how
  GRID=('gate=crossmodal threshold=0.8 state_threshold=0.98 mode=full' 'gate=crossmodal threshold=0.8 state_threshold=0.98 mode=partial state_reference=state'
        'gate=crossmodal threshold=0.8 state_threshold=0.98 mode=vision_only,partial state_reference=cameras'
        'gate=crossmodal threshold=0.8 state_threshold=0.98 state_max_l2=0.06,0.08')
elif [ "${GRID_SET:-main}" = state_confirm ]; then  # (run when cameras was the default reference)
  GRID=('gate=crossmodal threshold=0.8 state_threshold=0.98 mode=partial state_reference=cameras'
        'gate=crossmodal threshold=0.8 state_threshold=0.98 state_max_l2=0.06')
elif [ "${GRID_SET:-main}" = state_both ]; then
  GRID=('gate=crossmodal threshold=0.8 state_threshold=0.98 mode=partial,vision_only')
elif [ "${GRID_SET:-main}" = keepers ]; then  # chosen on seeds 0-2: checked on fresh ones
  GRID=('gate=threshold threshold=0.98 mode=full' 'gate=period period=2 mode=full' 'gate=always mode=partial max_age_calls=2')
elif [ "${GRID_SET:-main}" = period2 ]; then
  GRID=('gate=period period=2 mode=full')
elif [ "${GRID_SET:-main}" = crossmodal_confirm ]; then
  GRID=('gate=crossmodal threshold=0.8 state_threshold=0.98')
elif [ "${GRID_SET:-main}" = partial_confirm ]; then
  GRID=('gate=crossmodal threshold=0.8 state_threshold=0.98 mode=partial')
elif [ "${GRID_SET:-main}" = readme ]; then
  GRID=('gate=crossmodal threshold=0.8 state_threshold=0.98' 'gate=period period=2 mode=full'
        'gate=threshold threshold=0.98 mode=full' 'gate=always mode=partial max_age_calls=2'
        'gate=crossmodal threshold=0.8 state_threshold=0.98 mode=partial')
elif [ "${GRID_SET:-main}" = push_rest ]; then
  GRID=('gate=threshold threshold=0.9 mode=partial' 'gate=crossmodal threshold=0.8 state_threshold=0.99'
        'gate=crossmodal threshold=0.8 state_threshold=0.98' 'gate=always mode=partial max_age_calls=2')
elif [ "${GRID_SET:-main}" != main ]; then
  echo "sweep_device.sh: GRID_SET=$GRID_SET: expected main, confirm, crossmodal, crossmodal_state, age," \
    "age_confirm, fresh_state, state_tests, state_confirm, state_both, keepers, period2, crossmodal_confirm," \
    "partial_confirm, readme or push_rest" >&2
  exit 2
fi
mkdir -p "$OUT"  # after the checks: a bad GRID_SET leaves nothing behind
failed=0
for v in $VARIANTS; do
  db="$OUT/$DB-$v.db"; start=$(date +%s)
  echo "=== testbed-$v: paired sweep, $EPISODES held-out episodes per task and setting (cap ${CAP_S}s) ==="
  timeout "$CAP_S" python3 -m kvreuse.cli sweep --checkpoint "src/kvreuse/assets/testbed-$v" --episodes "$EPISODES" \
    --seed "$SEED" "${TASK_ARGS[@]}" --workers "$(nproc)" --db "$db" --no-progress --grid "${GRID[@]}" 2>&1 |
    grep -v -i warn | tail -5
  rc=${PIPESTATUS[0]}  # the sweep's, not the filter's: 124 is the time cap (a rerun continues), else a failure
  echo "sweep wall time: $(( $(date +%s) - start )) s on $(nproc) cores (exit $rc)"
  if [ "$rc" != 0 ] && [ "$rc" != 124 ]; then failed=$rc; fi
  [ -f "$db" ] || continue  # the sweep stopped before its DB: nothing to fold or report
  # fold the WAL into the file so one file carries the results
  python3 -c "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute('PRAGMA wal_checkpoint(TRUNCATE)'); c.execute('PRAGMA journal_mode=DELETE'); c.close()" "$db"
  python3 -m kvreuse.cli report --db "$db" --out "/tmp/report-$v" --no-plots 2>&1 | sed -n '/All tasks/,+14p' | head -20
done
exit "$failed"
