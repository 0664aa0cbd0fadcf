#!/usr/bin/env bash
# Create .venv (if missing) and install rmserve with the extras for training, serving and
# development. torch is installed first, pinned to 2.13.0: on this machine pip takes the
# local CPU wheel; an unpinned torch would pull a CUDA build and several GB of nvidia packages.
# Elsewhere, set PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu for the CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[serve,train,dev]"
# Fail loudly if anything pulled CUDA packages onto a CPU machine.
if python -m pip list 2>/dev/null | grep -qiE '^nvidia-'; then
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "setup: nvidia-* packages were installed on a machine without a GPU" >&2
    exit 1
  fi
fi
