#!/bin/sh
# Convergence from random initialisation: wpipe, pipedream_2bw and data_parallel train the
# same randomly initialised BERT with the same global batch, each evaluated on the dev split(s)
# after every epoch (the curves are summary.json's "history": epoch, mean loss, dev metrics).
# Runs as is on a CPU machine: the tiny BERT of nlp_tiny.yaml for 6 epochs on learnable
# synthetic tokens (dev accuracy rises from chance to 1.0).
#
# Paper scale (BERT-Base shape), one node of 8 GPUs (layout 4x2; data_parallel runs 1x8):
#   NPROC_PER_NODE=8 LAYOUT=4x2 DATA_DIR=/data/glue TOKENIZER=/models/bert-base-uncased \
#   TASK=qqp CONFIG=network_conf/nlp_scratch_bert_base.yaml sh experiments/nlp_scratch.sh
# TOKENIZER: a WordPiece vocab.txt or a folder holding one; required with DATA_DIR.
#
# Variables (defaults): NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), MASTER_PORT (a free
# port on one node, else 29500), NPROC_PER_NODE (2), CONFIG (network_conf/nlp_tiny.yaml),
# DATA_DIR (none: the config's data_dir, null meaning synthetic tokens), TOKENIZER, TASK (qqp),
# METHODS ("wpipe pipedream_2bw data_parallel"), LAYOUT (2 x the rest: 2x1 on 2 processes, 2x4
# on 8), OUT (runs/nlp_scratch). Arguments are extra --key value overrides of nlp/main.py,
# e.g. --epochs 5.
# Results: $OUT/<task>/<method>_<N>x<D>/summary.json.
set -eu
cd "$(dirname "$0")/.."
. experiments/common.sh
CONFIG=${CONFIG:-network_conf/nlp_tiny.yaml}
TASK=${TASK:-qqp} METHODS=${METHODS:-wpipe pipedream_2bw data_parallel}
OUT=${OUT:-runs/nlp_scratch}
LAYOUT=${LAYOUT:-2x$((WORLD / 2))}


if [ -n "${DATA_DIR:-}" ] && [ -z "${TOKENIZER:-}" ]; then
    echo "DATA_DIR is set but TOKENIZER is not: give a WordPiece vocab.txt or a folder holding one" >&2
    exit 2
fi

for method in $METHODS; do
    split_layout "$method" "$LAYOUT"
    launch nlp/main.py "$OUT/$TASK/${method}_${depth}x${dp}" --config "$CONFIG" --task "$TASK" \
        ${DATA_DIR:+--data_dir "$DATA_DIR" --tokenizer "$TOKENIZER"} --model_name_or_path null \
        --method "$method" --pipeline_depth "$depth" --data_parallel "$dp" "$@"
done
