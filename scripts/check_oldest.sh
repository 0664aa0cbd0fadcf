#!/usr/bin/env bash
# The oldest end of the train extra's ranges: a separate virtual environment (.venv-oldest)
# with transformers at the lowest version pyproject.toml allows (accelerate as low as the
# dev extra's trl lets it be), then the training, export and foreign-model tests. CI runs the
# newest end (scripts/test.sh).
# Usage: bash scripts/check_oldest.sh [pytest args]   (about 10 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv-oldest/bin/python ]; then
  "$PYTHON" -m venv .venv-oldest
fi
. .venv-oldest/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.13.0"  # the CPU wheel first, as scripts/setup.sh does
python -m pip install --quiet -e ".[serve,train,dev]" "transformers==5.9.0"
python -m pip list 2>/dev/null | grep -E '^(torch|transformers|accelerate|tokenizers) '
if [ $# -eq 0 ]; then
  set -- tests/training tests/e2e/test_foreign_models.py tests/core -m "not slow"
fi
python -m pytest -q -p no:cacheprovider "$@"
