#!/bin/sh
# BERT-L throughput sweep (the paper's single-node experiment): samples/s and memory of each
# method on synthetic QQP-shaped tokens, for every CONFIG x LAYOUT x METHOD x micro-batch size
# x recompute. Runs as is on a CPU machine (2 processes, the tiny BERT of nlp_tiny.yaml).
#
# Paper scale, one node of 8 GPUs (BERT-96 and BERT-192, sequence 128):
#   NPROC_PER_NODE=8 LAYOUTS="8x1 4x2 2x4" MICRO_BATCHES="1 2 4 8 16 32 64 128 256 512" \
#   RECOMPUTE="false true" CONFIG="network_conf/nlp_throughput_bert96.yaml \
#   network_conf/nlp_throughput_bert192.yaml" sh experiments/nlp_throughput_single_node.sh
# Several nodes: see nlp_throughput_multi_node.sh (the same sweep).
#
# Variables (defaults): NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), MASTER_PORT (a free
# port on one node, else 29500), NPROC_PER_NODE (2), CONFIG (network_conf/nlp_tiny.yaml; several
# files separated by spaces), LAYOUTS ("2x1": pipeline_depth x data_parallel; data_parallel
# runs 1 x (N*D) instead), METHODS ("wpipe pipedream_2bw"), MICRO_BATCHES (8), RECOMPUTE (false),
# OUT (runs/nlp_throughput). Arguments are extra --key value overrides of nlp/main.py.
# A run that fails (e.g. out of memory at a large micro-batch) does not stop the sweep; the exit
# status is 1 if any failed. Results: $OUT/<config>/<method>_<N>x<D>_mb<size>[_recompute]/summary.json
set -eu
cd "$(dirname "$0")/.."
. experiments/common.sh
CONFIG=${CONFIG:-network_conf/nlp_tiny.yaml}
LAYOUTS=${LAYOUTS:-2x1} METHODS=${METHODS:-wpipe pipedream_2bw} MICRO_BATCHES=${MICRO_BATCHES:-8}
RECOMPUTE=${RECOMPUTE:-false} OUT=${OUT:-runs/nlp_throughput}

throughput_sweep nlp/main.py "$@"
