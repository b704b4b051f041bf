#!/bin/sh
# The accuracy-parity study on real data, on CPU: every method trains the same model with the
# same global batch, learning-rate schedule and number of samples, for several seeds, and
# tool/accuracy.py writes docs/accuracy.md (tables, curves, stable learning-rate ranges, and
# why the stale methods diverge: the delayed-momentum bound and the single-process oracle).
#
# * digits: resnext_tiny from random initialisation on scikit-learn's handwritten digits
#   (cv/main.py --dataset digits, network_conf/cv_tiny.yaml: 6 epochs, micro-batch 16, global
#   batch 32, SGD momentum 0.9, lr decayed 10x after epoch 4), over the learning rates LRS.
# * pairs: the MiniLM-L6 checkpoint fine-tuned on a generated 3-class MNLI-format pair set
#   (nlp.fixtures: entailment iff same topic and verb, neutral iff same topic only), small
#   enough (TRAIN_PAIRS pairs, 2 epochs) that the methods do not all reach 1.0.
#
# Pipeline methods run 2x1, data_parallel 1x2. A finished run (its summary.json exists) is
# not run again, so an interrupted study continues where it stopped; a run that stops on a
# non-finite loss (exit 3) is recorded as diverged (its log stays). Each run's output goes to
# its log.txt; one line per run is printed here. Then pipedream_2bw's first seed at every lr is
# replayed through the single-process oracle (tool/replay.py) under its own rule, under the
# synchronous rule (same data and initial weights), and at the largest lr without momentum.
# About 45 minutes on 2 idle cores (a run takes 38-50 s there; 90 minutes on a loaded machine).
#
# Variables (defaults): METHODS ("wpipe pipedream_2bw pipedream_flush gpipe data_parallel"),
# SEEDS ("1 2 3"), LRS ("0.01 0.03 0.1"), NLP_LRS ("1e-4"), TRAIN_PAIRS (400),
# SUITES ("digits pairs"), OUT (runs/accuracy_study), DOC (docs/accuracy.md).
# Arguments are extra --key value overrides for every run.
set -eu
cd "$(dirname "$0")/.."
. experiments/common.sh
METHODS=${METHODS:-wpipe pipedream_2bw pipedream_flush gpipe data_parallel}
SEEDS=${SEEDS:-1 2 3} LRS=${LRS:-0.01 0.03 0.1} NLP_LRS=${NLP_LRS:-1e-4}
TRAIN_PAIRS=${TRAIN_PAIRS:-400} SUITES=${SUITES:-digits pairs}
OUT=${OUT:-runs/accuracy_study} DOC=${DOC:-docs/accuracy.md}

study_run() {  # study_run SUITE LR SEED METHOD ENTRY [--key value ...]: one run, skipped if done
    suite=$1 lr=$2 seed=$3 method=$4 entry=$5; shift 5
    split_layout "$method" 2x$((WORLD / 2))
    out="$OUT/$suite/lr$lr/${method}_seed$seed"
    if [ -f "$out/summary.json" ] || [ -f "$out/diverged" ]; then
        return 0
    fi
    mkdir -p "$out"
    start=$(date +%s)
    status=0
    launch "$entry" "$out" --lr "$lr" --seed "$seed" --method "$method" --pipeline_depth "$depth" \
        --data_parallel "$dp" --checkpoint_dir "$out/checkpoints" --keep_checkpoints 1 "$@" \
        >"$out/log.txt" 2>&1 || status=$?
    rm -rf "$out/checkpoints"
    if [ "$status" = 3 ]; then
        echo "stopped on a non-finite loss or gradient (exit 3): see log.txt" >"$out/diverged"
    elif [ "$status" != 0 ]; then
        echo "FAILED ($status): $out/log.txt" >&2
        tail -n 5 "$out/log.txt" >&2
        exit "$status"
    fi
    echo "$suite lr $lr seed $seed $method: $(grep -o 'epoch [0-9]*/[0-9]* done.*' "$out/log.txt" | tail -n 1 || echo diverged) ($(($(date +%s) - start)) s)"
}

replay() {  # replay RUN_DIR NAME [--key value ...]: tool/replay.py, unless RUN_DIR/replay_NAME.json exists
    run=$1 name=$2; shift 2
    [ -f "$run/config.yaml" ] && [ ! -f "$run/replay_$name.json" ] || return 0
    echo "oracle replay of $run: $name"
    "$PY" tool/replay.py "$run" "$@" >"$run/replay_$name.log" 2>&1 || { tail -n 5 "$run/replay_$name.log" >&2; exit 1; }
}

replay_stale_runs() {  # pipedream_2bw's first seed at every lr, through the single-process oracle
    case " $METHODS " in *" pipedream_2bw "*) ;; *) return 0 ;; esac
    seed=${SEEDS%% *} top=
    for lr in $LRS; do
        run="$OUT/digits/lr$lr/pipedream_2bw_seed$seed" top=$run
        replay "$run" pipedream_2bw                                   # its own rule: equal to the run?
        replay "$run" pipedream_flush --method pipedream_flush        # same data, no delay
    done
    replay "$top" pipedream_2bw_momentum0.0 --momentum 0.0            # the delay without momentum
}

for suite in $SUITES; do
    case $suite in
        digits)
            for lr in $LRS; do for seed in $SEEDS; do for method in $METHODS; do
                study_run digits "$lr" "$seed" "$method" cv/main.py --config network_conf/cv_tiny.yaml \
                    --dataset digits --epochs 6 --max_periods_per_epoch null "$@"
            done; done; done
            replay_stale_runs ;;
        pairs)
            data="$OUT/pairs/data"
            [ -f "$data/MNLI/train.tsv" ] || "$PY" -m nlp.fixtures "$data" --task mnli --train "$TRAIN_PAIRS" --dev 200 >/dev/null
            for lr in $NLP_LRS; do for seed in $SEEDS; do for method in $METHODS; do
                study_run pairs "$lr" "$seed" "$method" nlp/main.py --config network_conf/nlp_finetune_minilm_pairs.yaml \
                    --task mnli --data_dir "$data" --model_name_or_path minilm "$@"
            done; done; done ;;
        *) echo "unknown suite $suite: choose from digits pairs" >&2; exit 2 ;;
    esac
done
"$PY" tool/accuracy.py "$OUT" --doc "$DOC"
