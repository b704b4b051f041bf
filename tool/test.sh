#!/bin/sh
# Set up (tool/init.sh), then run the whole test suite. Extra arguments go to pytest.
set -eu
cd "$(dirname "$0")/.."
PY="$(sh tool/init.sh | tail -n 1)"
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
exec "$PY" -m pytest -q "$@"
