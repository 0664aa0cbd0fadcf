#!/usr/bin/env bash
# Mutation testing of the core with mutmut, on demand (not run in CI): docs/mutation-testing.md.
#
#   bash scripts/mutation.sh [encoding|formatting|batcher|manifest|retry|all]   (default: all)
#
# mutmut copies the tree into a mutants/ folder and runs the tests from there, where the tests
# would look for the shared data in the wrong place (they resolve ../shared from their own
# path). So this script runs mutmut from a fresh copy, mutants/<module>/, of rmserve/, tests/
# and pyproject.toml beside a link named shared -> ../shared: the copy's own mutants/ folder
# then sits where the tests expect the checkout. Nothing in the checkout is changed.
# The configuration is pyproject.toml's [tool.mutmut]; for one module the copy's only_mutate is
# narrowed to that module's file. Each run starts from scratch (no cached results), so the
# counts always match the current tests. Results stay in mutants/<module>/ (git-ignored):
#   cd mutants/<module> && mutmut results          # the survivors' names
#   cd mutants/<module> && mutmut show <name>      # one mutant's diff
# Environment: MUTATION_JOBS (parallel mutants; default: the number of CPUs).
set -euo pipefail

MUTMUT_VERSION=3.8.1
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target="${1:-all}"

case "$target" in
  encoding) files=(rmserve/encoding.py) ;;
  formatting) files=(rmserve/formatting.py) ;;
  batcher) files=(rmserve/service/batcher.py) ;;
  manifest) files=(rmserve/manifest.py) ;;
  retry) files=(rmserve/client/_retry.py) ;;
  all) files=() ;;  # pyproject's only_mutate: the five modules
  *)
    echo "usage: bash scripts/mutation.sh [encoding|formatting|batcher|manifest|retry|all]" >&2
    exit 2
    ;;
esac

if [[ -z "${VIRTUAL_ENV:-}" && -f "$ROOT/.venv/bin/activate" ]]; then
  # shellcheck disable=SC1091
  . "$ROOT/.venv/bin/activate"
fi
installed="$(python -c 'import importlib.metadata as m; print(m.version("mutmut"))' 2>/dev/null ||
  true)"
if [[ "$installed" != "$MUTMUT_VERSION" ]]; then
  python -m pip install --quiet "mutmut==$MUTMUT_VERSION"
fi

shared="$(cd "$ROOT/.." && pwd)/shared"
if [[ ! -f "$shared/data/hh-harmless/train.jsonl.gz" ]]; then
  echo "the shared HH data is missing ($shared/data/hh-harmless); see the README's set-up" >&2
  exit 1
fi

stage="$ROOT/mutants/$target"
rm -rf "$stage"
mkdir -p "$stage"
cp -R "$ROOT/rmserve" "$ROOT/tests" "$ROOT/pyproject.toml" "$stage/"
find "$stage" -name __pycache__ -type d -prune -exec rm -rf {} +
ln -s "$shared" "$stage/shared"

# The copy's [tool.mutmut]: only_mutate narrowed to the module asked for, a timeout
# allowance for cold workers, and test files that do not exist
# left out of the selection (a warning).
python - "$stage/pyproject.toml" "${files[@]}" <<'PY'
import json
import sys
import tomllib
from pathlib import Path

path = Path(sys.argv[1])
files = sys.argv[2:]
text = path.read_text(encoding="utf-8")
config = tomllib.loads(text)["tool"]["mutmut"]
if files:
    config["only_mutate"] = files
# A worker builds the session fixtures again and a property test that fails shrinks its
# example, so a killed mutant can take seconds more than the tests' measured time: a fixed
# allowance, (time + 20 s) x 3, rather than mutmut's (time + 1 s) x 15.
config.setdefault("timeout_multiplier", 3.0)
config.setdefault("timeout_constant", 20.0)
selection = []
for test in config.get("pytest_add_cli_args_test_selection", []):
    if (path.parent / test.split("::")[0]).exists():
        selection.append(test)
    else:
        print(f"mutation.sh: {test} does not exist; left out of the test selection")
config["pytest_add_cli_args_test_selection"] = selection
head, marker, _ = text.partition("\n[tool.mutmut]\n")
assert marker, "[tool.mutmut] must be the last section of pyproject.toml"
lines = ["", "[tool.mutmut]"]
for key, value in config.items():
    assert isinstance(value, (str, list, bool, int, float)), key
    lines.append(f"{key} = {json.dumps(value)}")
path.write_text(head + "\n".join(lines) + "\n", encoding="utf-8")
PY

jobs="${MUTATION_JOBS:-$(nproc)}"
cd "$stage"
started=$SECONDS
# mutmut forks a worker per mutant from the process that ran the tests once. Thread pools
# and fork() do not mix: without these, workers hung on a futex (a lock held at fork time,
# most likely torch's OpenMP pool, started by the model zoo) until mutmut's timeout; with one
# thread each, none did.
# RMSERVE_TEST_HANG_GUARD_S: the tests' guard against a hang (tests/waiting.py; 60 s by
# default) cut to 10 s, so that a mutant under which the batcher never answers fails its test
# (killed) in seconds rather than running into mutmut's timeout a minute later.
TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 RMSERVE_TEST_HANG_GUARD_S=10 \
  mutmut run --max-children "$jobs"
mutmut export-cicd-stats >/dev/null
python - mutants/mutmut-cicd-stats.json "$target" $((SECONDS - started)) <<'PY'
import json
import sys

stats = json.load(open(sys.argv[1]))
tested = stats["total"] - stats["skipped"] - stats["no_tests"]
score = 100.0 * stats["killed"] / tested if tested else 0.0
print(
    f"{sys.argv[2]}: {stats['total']} mutants, {stats['killed']} killed, "
    f"{stats['survived']} survived, {stats['timeout']} timeout, "
    f"{stats['suspicious']} suspicious, {stats['no_tests']} no tests, "
    f"{stats['skipped']} skipped; score {score:.1f}% (killed / (total - skipped - no tests)); "
    f"{sys.argv[3]} s"
)
PY
echo "survivors: cd ${stage#"$ROOT"/} && mutmut results; one diff: mutmut show <name>"
