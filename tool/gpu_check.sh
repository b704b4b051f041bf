#!/bin/sh
# The prepared device check (tool/gpu_check.py says what it runs, docs/gpu_check.md how to
# read it): at most 8 minutes on one GPU; on a machine without CUDA it runs what applies and
# says what it skipped. Writes <out-dir>/gpu_check.json and gpu_check.log (default
# runs/gpu_check); exit 0 when every check that ran passed. Arguments go to tool/gpu_check.py.
#
# PY=python3 sh tool/gpu_check.sh: that python as it is (torch, transformers, numpy, pyyaml,
# pytest), nothing installed, nothing downloaded; its children find this checkout through
# PYTHONPATH. Without PY, tool/init.sh first sets up the pinned requirements (pip).
set -eu
cd "$(dirname "$0")/.."
PY="${PY:-$(sh tool/init.sh | tail -n 1)}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE=1
exec "$PY" tool/gpu_check.py "$@"
