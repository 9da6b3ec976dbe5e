#!/usr/bin/env bash
# Install (if needed) and run a real closed-loop evaluation of the shipped testbed policy on
# Meta-World; results go to runs/kvreuse.db (SQLite) and a table is printed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
export MUJOCO_GL=${MUJOCO_GL:-osmesa} PYOPENGL_PLATFORM=${PYOPENGL_PLATFORM:-osmesa}
kvreuse eval --episodes 5 "$@"   # 5 held-out layouts x 10 tasks; pass --episodes 50 for the full run
