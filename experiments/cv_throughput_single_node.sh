#!/bin/sh
# ResNeXt throughput sweep (the paper's single-node experiment): samples/s and memory of
# each method on synthetic images, for every CONFIG x LAYOUT x METHOD x micro-batch size x
# recompute. Runs as is on a CPU machine (2 processes, resnext_tiny at 32 px, a few periods).
#
# Paper scale, one node of 8 GPUs (Flowers-102-sized images, 224 px):
#   NPROC_PER_NODE=8 LAYOUTS="8x1 4x2 2x4" MICRO_BATCHES="1 2 4 8 16 32 64 128 256 512" \
#   RECOMPUTE="false true" CONFIG="network_conf/cv_throughput_resnext50.yaml \
#   network_conf/cv_throughput_resnext101.yaml network_conf/cv_throughput_resnext152.yaml \
#   network_conf/cv_throughput_resnext200.yaml network_conf/cv_throughput_resnext302.yaml" \
#   sh experiments/cv_throughput_single_node.sh
# Several nodes: see cv_throughput_multi_node.sh (the same sweep).
#
# Variables (defaults): NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), MASTER_PORT (a free
# port on one node, else 29500), NPROC_PER_NODE (2), CONFIG (network_conf/cv_tiny.yaml; several
# files separated by spaces), LAYOUTS ("2x1": pipeline_depth x data_parallel; data_parallel
# runs 1 x (N*D) instead), METHODS ("wpipe pipedream_2bw"), MICRO_BATCHES (16), RECOMPUTE (false),
# OUT (runs/cv_throughput). Arguments are extra --key value overrides of cv/main.py.
# A run that fails (e.g. out of memory at a large micro-batch) does not stop the sweep; the exit
# status is 1 if any failed. Results: $OUT/<config>/<method>_<N>x<D>_mb<size>[_recompute]/summary.json
set -eu
cd "$(dirname "$0")/.."
. experiments/common.sh
CONFIG=${CONFIG:-network_conf/cv_tiny.yaml}
LAYOUTS=${LAYOUTS:-2x1} METHODS=${METHODS:-wpipe pipedream_2bw} MICRO_BATCHES=${MICRO_BATCHES:-16}
RECOMPUTE=${RECOMPUTE:-false} OUT=${OUT:-runs/cv_throughput}

throughput_sweep cv/main.py "$@"
