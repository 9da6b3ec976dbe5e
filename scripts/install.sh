#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian machine: headless GL for MuJoCo, a venv in .venv, a CPU
# build of torch (pinned: an unpinned torch pulls a multi-GB CUDA build), kvreuse with its
# Meta-World and test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# (grep without -q: under pipefail, -q quitting at the first match left ldconfig to die of SIGPIPE
# on a long library list, and the check failed with OSMesa installed)
if ! ldconfig -p 2>/dev/null | grep libOSMesa >/dev/null || ! "$PY" -c "import ensurepip" 2>/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libosmesa6 libegl1 libgl1 python3-venv >/dev/null
fi

# A venv without a working pip (python3-venv missing when it was made) is made again.
if ! { [ -x .venv/bin/python ] && .venv/bin/python -m pip --version >/dev/null 2>&1; }; then
  rm -rf .venv
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
. .venv/bin/activate
# PyPI's torch is the CUDA build (~0.5 GB plus several GB of CUDA libraries): the CPU build is
# `+cpu`, from PyTorch's own index when no local wheel or index has it. A torch of the pinned version
# already in the venv (e.g. a CUDA build installed there for a GPU) is kept; TORCH_VERSION with a local
# tag (2.13.0+cu128) is installed as given.
TV=${TORCH_VERSION:-2.13.0}
HAVE=$(python -c "import torch; print(torch.__version__)" 2>/dev/null || true)
if [ "${HAVE%%+*}" != "${TV%%+*}" ] || { [ "$TV" != "${TV%%+*}" ] && [ "$HAVE" != "$TV" ]; }; then
  case "$TV" in *+*) TORCH="torch==$TV" ;; *) TORCH="torch==$TV+cpu" ;; esac
  python -m pip install -q "$TORCH" 2>/dev/null \
    || python -m pip install -q "$TORCH" --extra-index-url "https://download.pytorch.org/whl/${TORCH##*+}"
fi
python -m pip install -q -e ".[metaworld,test]"
# Triton (no GPU needed): tests/test_kernels.py runs the attention kernel in its CPU interpreter.
python -m pip install -q "triton==${TRITON_VERSION:-3.9.0}"
# openpi's client (test peer of the policy server) pins numpy<2, which its code does not need.
python -m pip install -q --no-deps "openpi-client==0.1.2"
echo "kvreuse installed in $(pwd)/.venv"
