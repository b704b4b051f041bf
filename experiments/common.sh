# Sourced by the experiment scripts, from the repository root: set-up (tool/init.sh), the
# launch variables with their defaults, and the helpers below.
#   NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), MASTER_PORT (a free port on one node,
#   else 29500), NPROC_PER_NODE (2)
PY=$(sh tool/init.sh | tail -n 1)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
NNODES=${NNODES:-1} NODE_RANK=${NODE_RANK:-0} MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
NPROC_PER_NODE=${NPROC_PER_NODE:-2}
WORLD=$((NNODES * NPROC_PER_NODE))

launch() {  # launch ENTRY OUTPUT_DIR [--key value ...]: ENTRY (cv/main.py, nlp/main.py) under torchrun
    entry=$1 out=$2; shift 2
    port=${MASTER_PORT:-$([ "$NNODES" = 1 ] && "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' || echo 29500)}
    echo "== $out" >&2
    "$PY" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
        --master_addr "$MASTER_ADDR" --master_port "$port" "$entry" --output_dir "$out" "$@"
}

split_layout() {  # split_layout METHOD NxD: sets depth and dp (data_parallel runs 1 x N*D)
    depth=${2%x*} dp=${2#*x}
    if [ "$1" = data_parallel ]; then dp=$((depth * dp)) depth=1; fi
    if [ $((depth * dp)) -ne "$WORLD" ]; then
        echo "layout $2 needs $((depth * dp)) processes but NNODES x NPROC_PER_NODE = $WORLD: set the layout or NPROC_PER_NODE" >&2
        exit 2
    fi
}

throughput_sweep() {  # throughput_sweep ENTRY [--key value ...]: every CONFIG x LAYOUTS x METHODS x MICRO_BATCHES x RECOMPUTE
    entry=$1; shift
    failed=0
    for config in $CONFIG; do
        for layout in $LAYOUTS; do
            for method in $METHODS; do
                split_layout "$method" "$layout"
                for mbs in $MICRO_BATCHES; do
                    for recompute in $RECOMPUTE; do
                        suffix=; [ "$recompute" = true ] && suffix=_recompute
                        out="$OUT/$(basename "$config" .yaml)/${method}_${depth}x${dp}_mb${mbs}$suffix"
                        launch "$entry" "$out" --config "$config" --mode throughput --method "$method" \
                            --pipeline_depth "$depth" --data_parallel "$dp" --micro_batch_size "$mbs" \
                            --recompute "$recompute" "$@" || { echo "FAILED: $out" >&2; failed=1; }
                    done
                done
            done
        done
    done
    "$PY" tool/report.py "$OUT" || true
    return $failed
}
