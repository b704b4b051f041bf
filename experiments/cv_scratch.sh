#!/bin/sh
# Convergence from random initialisation: wpipe, pipedream_2bw and data_parallel train the
# same ResNeXt with the same global batch, each evaluated on the test split after every epoch
# (the curves are summary.json's "history": epoch, mean loss, test_top1). Runs as is on a CPU
# machine: resnext_tiny at 32 px on learnable synthetic images (noise plus a per-class colour).
#
# Paper scale, one node of 8 GPUs (layout 2x4; data_parallel runs 1x8):
#   NPROC_PER_NODE=8 DATA_DIR=/data DATASET=cifar10 \
#   CONFIG=network_conf/cv_scratch_resnext50_cifar.yaml sh experiments/cv_scratch.sh
#
# Variables (defaults): NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), MASTER_PORT (a free
# port on one node, else 29500), NPROC_PER_NODE (2), CONFIG (network_conf/cv_tiny.yaml),
# DATA_DIR (none: synthetic images), DATASET (the config's), METHODS ("wpipe pipedream_2bw
# data_parallel"), LAYOUT (2 x the rest: 2x1 on 2 processes, 2x4 on 8), OUT (runs/cv_scratch).
# Arguments are extra --key value overrides of cv/main.py, e.g. --epochs 5.
# Results: $OUT/<method>_<N>x<D>/summary.json.
set -eu
cd "$(dirname "$0")/.."
. experiments/common.sh
CONFIG=${CONFIG:-network_conf/cv_tiny.yaml}
METHODS=${METHODS:-wpipe pipedream_2bw data_parallel} OUT=${OUT:-runs/cv_scratch}
LAYOUT=${LAYOUT:-2x$((WORLD / 2))}


for method in $METHODS; do
    split_layout "$method" "$LAYOUT"
    # An empty DATA_DIR or DATASET leaves the config's value (null data_dir: synthetic images).
    launch cv/main.py "$OUT/${method}_${depth}x${dp}" --config "$CONFIG" ${DATA_DIR:+--data_dir "$DATA_DIR"} \
        ${DATASET:+--dataset "$DATASET"} --pretrained null --method "$method" \
        --pipeline_depth "$depth" --data_parallel "$dp" "$@"
done
