#!/bin/sh
# Quick start: train a small BERT with wpipe on 2 CPU processes (gloo, loopback), on data
# it generates itself; prints the schedule, then loss, learning rates and samples/s, then
# the dev accuracy. Sets itself up (tool/init.sh). Arguments are --key value overrides,
# e.g. `sh experiments/quickstart.sh --method pipedream_2bw`.
set -eu
cd "$(dirname "$0")/.."
. experiments/common.sh

echo "== the wpipe schedule on 2 devices (4 partitions; a period is 2 micro-batches):"
"$PY" -m wpipe --method wpipe --depth 2 --micro-batches 4
launch nlp/main.py runs/quickstart --config network_conf/quickstart.yaml "$@"
