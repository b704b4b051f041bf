#!/bin/sh
# Quick start: train a small BERT with wpipe on 2 CPU processes (gloo, loopback), on data
# it generates itself; prints the schedule, then loss, learning rates and samples/s, then
# the dev accuracy. Sets itself up (tool/init.sh). Arguments are --key value overrides,
# e.g. `sh experiments/quickstart.sh --method pipedream_2bw`.
set -eu
cd "$(dirname "$0")/.."
PY=$(sh tool/init.sh | tail -n 1)
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1

echo "== the wpipe schedule on 2 devices (4 partitions; a period is 2 micro-batches):"
"$PY" -m wpipe.schedule --method wpipe --depth 2 --micro-batches 4

PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
echo "== training (runs/quickstart/summary.json at the end)"
"$PY" -m torch.distributed.run --nproc_per_node=2 --master_addr=127.0.0.1 --master_port="$PORT" \
    nlp/main.py --config network_conf/quickstart.yaml "$@"
