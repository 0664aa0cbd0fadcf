#!/usr/bin/env bash
# The main job: set up, make a bundle if there is none, and serve it.
#
#   bash scripts/main.sh
#
# Without a bundle at $RMSERVE_BUNDLE (default artifacts/bundle), it trains the default
# recipe (MiniLM on ../shared/data/hh-harmless) into artifacts/checkpoint and exports it with
# its int8 variant (about 5 minutes on 2 free CPU cores, more on a busy machine); then it
# serves the bundle on $RMSERVE_HOST:$RMSERVE_PORT (default 0.0.0.0:8000).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate

BUNDLE=${RMSERVE_BUNDLE:-artifacts/bundle}
CHECKPOINT=${RMSERVE_CHECKPOINT:-artifacts/checkpoint}
if [ ! -f "$BUNDLE/rmserve.json" ]; then
  echo "main: no bundle at $BUNDLE; training the default recipe into $CHECKPOINT" >&2
  rmserve train --out "$CHECKPOINT"
  # int8 is checked against fp32 on the eval set that training recorded (dev.jsonl.gz); if
  # it fails that check (decisions must agree on >= 99% of pairs), serve fp32 rather than
  # nothing.
  if ! rmserve export "$CHECKPOINT" --out "$BUNDLE" --int8; then
    echo "main: the int8 variant failed its parity check; exporting fp32 only" >&2
    rmserve export "$CHECKPOINT" --out "$BUNDLE"
  fi
fi
exec rmserve serve "$BUNDLE" --host "${RMSERVE_HOST:-0.0.0.0}" --port "${RMSERVE_PORT:-8000}"
