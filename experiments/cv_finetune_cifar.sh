#!/bin/sh
# ResNeXt fine-tuning (the paper's accuracy parity of wpipe, pipedream_2bw and data_parallel)
# on CIFAR-10 and CIFAR-100: every DATASET x METHOD, evaluated on the test split after each
# epoch. Runs as is on a CPU machine: with no DATA_DIR it trains resnext_tiny at 32 px for a
# few updates on tiny generated copies in the official formats (random pixels and labels,
# cv.fixtures; loaded with verify_data false): a smoke run, not a result.
# cv_finetune_oxfordflowers.sh runs this script with DATASETS=flowers102.
#
# Paper scale, one node of 8 GPUs (layout 2x4; data_parallel runs 1x8), for each model:
#   NPROC_PER_NODE=8 DATA_DIR=/data PRETRAINED=resnext50_32x4d.pth \
#   CONFIG=network_conf/cv_finetune_resnext50_cifar.yaml sh experiments/cv_finetune_cifar.sh
#   (then PRETRAINED=resnext101_32x8d.pth CONFIG=network_conf/cv_finetune_resnext101_cifar.yaml)
# DATA_DIR holds cifar-10-batches-py/ and cifar-100-python/ (flowers-102/ for Flowers).
# PRETRAINED: torchvision's ImageNet state dict of the config's model (the config says how to
# save one), or `none` for random initialisation; required with DATA_DIR, so that a forgotten
# path cannot turn a long fine-tuning run into training from scratch.
#
# Variables (defaults): NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), MASTER_PORT (a free
# port on one node, else 29500), NPROC_PER_NODE (2), CONFIG (network_conf/cv_tiny.yaml),
# DATA_DIR (none: generated copies in WORK_DIR, a temporary folder removed at the end unless
# WORK_DIR is given), PRETRAINED, DATASETS ("cifar10 cifar100"), METHODS ("wpipe
# pipedream_2bw data_parallel"), LAYOUT (2 x the rest: 2x1 on 2 processes, 2x4 on 8),
# OUT (runs/cv_finetune_cifar). Arguments are extra --key value overrides of cv/main.py.
# Results: $OUT/<dataset>/<method>_<N>x<D>/summary.json ("eval": test_top1; "history": per epoch).
set -eu
cd "$(dirname "$0")/.."
. experiments/common.sh
CONFIG=${CONFIG:-network_conf/cv_tiny.yaml}
DATASETS=${DATASETS:-cifar10 cifar100} METHODS=${METHODS:-wpipe pipedream_2bw data_parallel}
OUT=${OUT:-runs/cv_finetune_cifar}
LAYOUT=${LAYOUT:-2x$((WORLD / 2))}


verify=true
if [ -n "${DATA_DIR:-}" ]; then
    if [ -z "${PRETRAINED:-}" ]; then
        echo "DATA_DIR is set but PRETRAINED is not: give the torchvision state dict to fine-tune, or PRETRAINED=none" >&2
        exit 2
    fi
else
    if [ -z "${WORK_DIR:-}" ]; then
        WORK_DIR=$(mktemp -d)
        trap 'rm -rf "$WORK_DIR"' EXIT
    fi
    DATA_DIR=$WORK_DIR verify=false
    "$PY" - "$DATA_DIR" $DATASETS <<'PY'
import sys
from cv.fixtures import write_cifar_copy, write_flowers_copy
for name in sys.argv[2:]:
    if name == "flowers102":
        write_flowers_copy(sys.argv[1], num_images=306, seed=0)
    else:
        write_cifar_copy(sys.argv[1], name, num_train=512, num_test=128, seed=0)
PY
    echo "no DATA_DIR: generated tiny copies of $DATASETS (random pixels and labels, cv.fixtures) in $DATA_DIR; training on them with verify_data false" >&2
fi
pretrained=${PRETRAINED:-none}
[ "$pretrained" = none ] && pretrained=null

for dataset in $DATASETS; do
    for method in $METHODS; do
        split_layout "$method" "$LAYOUT"
        launch cv/main.py "$OUT/$dataset/${method}_${depth}x${dp}" --config "$CONFIG" --dataset "$dataset" \
            --data_dir "$DATA_DIR" --verify_data "$verify" --pretrained "$pretrained" \
            --method "$method" --pipeline_depth "$depth" --data_parallel "$dp" "$@"
    done
done
