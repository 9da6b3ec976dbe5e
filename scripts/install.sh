#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian machine: headless GL for MuJoCo, a venv in .venv, a CPU
# build of torch (pinned: an unpinned torch pulls a multi-GB CUDA build), kvreuse with its
# Meta-World and test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! ldconfig -p 2>/dev/null | grep -q libOSMesa; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libosmesa6 libegl1 libgl1 >/dev/null
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
python -m pip install -q -e ".[metaworld,test]"
# Triton (no GPU needed): tests/test_kernels.py runs the attention kernel in its CPU interpreter.
python -m pip install -q "triton==${TRITON_VERSION:-3.9.0}"
# openpi's client (test peer of the policy server) pins numpy<2, which its code does not need.
python -m pip install -q --no-deps "openpi-client==0.1.2"
echo "kvreuse installed in $(pwd)/.venv"
