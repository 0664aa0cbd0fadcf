#!/usr/bin/env bash
# The test command of the README: set up, lint, type-check, run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/install_kustomize.sh
. .venv/bin/activate
ruff check .
ruff format --check .
mypy
python -m pytest "$@"
