#!/bin/sh
# BERT-L throughput sweep on several nodes (the paper's 64-GPU experiment): the same sweep as
# nlp_throughput_single_node.sh (same variables and arguments; see there), whose defaults run
# as is on one CPU machine. At paper scale, on each of 8 nodes of 8 GPUs, with its NODE_RANK
# (0..7) and the address of node 0:
#   NNODES=8 NODE_RANK=$I MASTER_ADDR=node0 MASTER_PORT=29500 NPROC_PER_NODE=8 \
#   LAYOUTS="64x1 32x2 16x4 8x8 4x16" MICRO_BATCHES="1 2 4 8 16 32 64 128 256 512" \
#   RECOMPUTE="false true" \
#   CONFIG="network_conf/nlp_throughput_bert384.yaml network_conf/nlp_throughput_bert768.yaml" \
#   sh experiments/nlp_throughput_multi_node.sh
# Every node must be given the same variables except NODE_RANK; rank_layout pipeline_major (the
# default) keeps pipelines of depth <= 8 inside a node.
set -eu
exec sh "$(dirname "$0")/nlp_throughput_single_node.sh" "$@"
