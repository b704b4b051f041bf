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
PY=$(sh tool/init.sh | tail -n 1)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"

NNODES=${NNODES:-1} NODE_RANK=${NODE_RANK:-0} MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
NPROC_PER_NODE=${NPROC_PER_NODE:-2} CONFIG=${CONFIG:-network_conf/nlp_tiny.yaml}
LAYOUTS=${LAYOUTS:-2x1} METHODS=${METHODS:-wpipe pipedream_2bw} MICRO_BATCHES=${MICRO_BATCHES:-8}
RECOMPUTE=${RECOMPUTE:-false} OUT=${OUT:-runs/nlp_throughput}
WORLD=$((NNODES * NPROC_PER_NODE))

launch() {  # launch OUTPUT_DIR [--key value ...]: nlp/main.py under torchrun
    out=$1; shift
    port=${MASTER_PORT:-$([ "$NNODES" = 1 ] && "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' || echo 29500)}
    echo "== $out" >&2
    "$PY" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
        --master_addr "$MASTER_ADDR" --master_port "$port" nlp/main.py --output_dir "$out" "$@"
}

failed=0
for config in $CONFIG; do
    for layout in $LAYOUTS; do
        for method in $METHODS; do
            depth=${layout%x*} dp=${layout#*x}
            [ "$method" = data_parallel ] && dp=$((depth * dp)) depth=1
            if [ $((depth * dp)) -ne "$WORLD" ]; then
                echo "layout $layout needs $((depth * dp)) processes but NNODES x NPROC_PER_NODE = $WORLD: set LAYOUTS or NPROC_PER_NODE" >&2
                exit 2
            fi
            for mbs in $MICRO_BATCHES; do
                for recompute in $RECOMPUTE; do
                    suffix=; [ "$recompute" = true ] && suffix=_recompute
                    out="$OUT/$(basename "$config" .yaml)/${method}_${depth}x${dp}_mb${mbs}$suffix"
                    launch "$out" --config "$config" --mode throughput --method "$method" \
                        --pipeline_depth "$depth" --data_parallel "$dp" --micro_batch_size "$mbs" \
                        --recompute "$recompute" "$@" || { echo "FAILED: $out" >&2; failed=1; }
                done
            done
        done
    done
done
exit $failed
