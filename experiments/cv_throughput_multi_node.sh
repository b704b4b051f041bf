#!/bin/sh
# ResNeXt throughput sweep on several nodes (the paper's 64-GPU experiment): the same sweep
# as cv_throughput_single_node.sh (same variables and arguments; see there), whose defaults
# run as is on one CPU machine. At paper scale, on each of 8 nodes of 8 GPUs, with its
# NODE_RANK (0..7) and the address of node 0:
#   NNODES=8 NODE_RANK=$I MASTER_ADDR=node0 MASTER_PORT=29500 NPROC_PER_NODE=8 \
#   LAYOUTS="64x1 32x2 16x4 8x8 4x16" MICRO_BATCHES="1 2 4 8 16 32 64 128 256 512" \
#   RECOMPUTE="false true" \
#   CONFIG="network_conf/cv_throughput_resnext500.yaml network_conf/cv_throughput_resnext800.yaml" \
#   sh experiments/cv_throughput_multi_node.sh
# Every node must be given the same variables except NODE_RANK; rank_layout pipeline_major (the
# default) keeps pipelines of depth <= 8 inside a node. Under Slurm, experiments/slurm/
# multi_node.sbatch sets them from the allocation (SCRIPT=cv_throughput_multi_node.sh).
#
# Interfaces: set NCCL_SOCKET_IFNAME (NCCL's bootstrap, and its traffic where no InfiniBand is
# found) and GLOO_SOCKET_IFNAME (gloo: every stream's headers and metadata, the CPU process
# groups) to the interface that joins the nodes, e.g. NCCL_SOCKET_IFNAME==eth0
# GLOO_SOCKET_IFNAME=eth0 (ip addr lists them). Without them each library picks one itself:
# gloo takes the address the host name resolves to, 127.0.1.1 on many systems, so the other
# nodes cannot reach this one and the run waits in its first process group until timeout_s;
# NCCL may take docker0 or a management network, and then hangs at its first communicator or
# carries the traffic over the slow link.
set -eu
if [ "${NNODES:-1}" -gt 1 ]; then
    for name in NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME; do
        eval "value=\${$name:-}"
        [ -n "$value" ] || echo "warning: $name is not set: each library picks an interface itself (see $0)" >&2
    done
fi
exec sh "$(dirname "$0")/cv_throughput_single_node.sh" "$@"
