#!/bin/sh
# The paper's comparison at its scale (8 and 64 GPUs), predicted by the cost model on CPU in a
# few minutes: writes docs/paper_scale.md and docs/paper_scale_*.png (tool/paper_scale.py).
#
# Variables (defaults): HARDWARE (network_conf/hardware/v100_32gb_8x.yaml: the paper's era,
# assumed), VALIDATE (0; 1 first runs tool/validate_model.py, about 17 minutes: the real
# 2-process CPU runs the chain is checked against, and adds its measured figures to the document).
# Block costs are measured once per model on this CPU and cached under runs/cache.
set -eu
cd "$(dirname "$0")/.."
PY=$(sh tool/init.sh | tail -n 1)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
HARDWARE=${HARDWARE:-network_conf/hardware/v100_32gb_8x.yaml}
VALIDATE=${VALIDATE:-0}
if [ "$VALIDATE" = 1 ]; then
    "$PY" tool/validate_model.py --output-dir runs/validate
fi
if [ -f runs/validate/validate.json ]; then
    exec "$PY" tool/paper_scale.py --hardware "$HARDWARE" --validation runs/validate/validate.json
fi
exec "$PY" tool/paper_scale.py --hardware "$HARDWARE"
