#!/bin/sh
# Where WPipe's memory buys speed over PipeDream-2BW, predicted by the cost model on CPU in a
# few minutes: writes docs/paper_scale.md and docs/paper_scale_map.png (tool/paper_scale.py):
# the map of best WPipe / best 2BW over BERT and ResNeXt sizes, V100 16/32 GB, H100, H200,
# fp32 and fp16, the ratio's factors, memory like for like, the released scripts' sweeps,
# and the op-time fits with their sources (network_conf/profiles/).
#
# Variables (defaults): HARDWARE (network_conf/hardware/v100_16gb_8x.yaml: the preset of the
# released scripts' section; the map covers every GPU preset), VALIDATE (0; 1 first runs
# tool/validate_model.py, about 17 minutes: the real 2-process CPU runs the chain is checked
# against, and adds its measured figures to the document).
# Block costs are measured once per model and precision on this CPU and cached under runs/cache.
set -eu
cd "$(dirname "$0")/.."
PY=$(sh tool/init.sh | tail -n 1)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
HARDWARE=${HARDWARE:-network_conf/hardware/v100_16gb_8x.yaml}
VALIDATE=${VALIDATE:-0}
if [ "$VALIDATE" = 1 ]; then
    "$PY" tool/validate_model.py --output-dir runs/validate
fi
if [ -f runs/validate/validate.json ]; then
    exec "$PY" tool/paper_scale.py --hardware "$HARDWARE" --validation runs/validate/validate.json
fi
exec "$PY" tool/paper_scale.py --hardware "$HARDWARE"
