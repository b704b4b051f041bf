"""Worker (under torchrun): for each case, an uninterrupted run of nlp/main.py with
checkpoints, then runs resumed from some of its checkpoints, in one process group.

Usage: resume_cases.py OUT_DIR CASE [CASE ...], CASE = method:depth:dp:resume_period[,...][:flag]
flag: recompute, or m<K> (K micro-batches per update). Writes OUT_DIR/<method>_<depth>x<dp>[_flag]/
full/ and .../from<P>/ (each with summary.json and checkpoints/).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import torch  # noqa: E402

import wpipe  # noqa: E402
from nlp.main import NlpConfig, make_task  # noqa: E402
from wpipe.train import checkpoint, main  # noqa: E402

# A tiny BERT (dropout on: the RNG states matter), 2 epochs of 3 updates, a checkpoint
# every 2 updates: checkpoints after updates 2, 3 (epoch end), 4 and 6.
TINY = ["--num_layers", "4", "--hidden", "16", "--heads", "2", "--ffn", "32", "--vocab_size", "50",
        "--max_seq_length", "12", "--micro_batch_size", "4", "--synthetic_samples", "64",
        "--max_eval_batches", "2", "--lr", "1e-2", "--warmup_periods", "1", "--epochs", "2",
        "--max_periods_per_epoch", "3", "--checkpoint_every", "2", "--keep_checkpoints", "0",
        "--log_every", "100", "--timeout_s", "60"]


def run_case(out_dir: str, case: str) -> None:
    method, depth, dp, starts, *flags = case.split(":")
    base = os.path.join(out_dir, "_".join([f"{method}_{depth}x{dp}", *flags]))
    layout = ["--method", method, "--pipeline_depth", depth, "--data_parallel", dp]
    for flag in flags:
        layout += ["--recompute", "true"] if flag == "recompute" else ["--micro_batches_per_update", flag[1:]]
    main(NlpConfig, make_task, [*TINY, *layout, "--output_dir", os.path.join(base, "full")])
    for start in starts.split(","):
        saved = os.path.join(base, "full", "checkpoints", checkpoint.folder_name(int(start)))
        main(NlpConfig, make_task, [*TINY, *layout, "--output_dir", os.path.join(base, f"from{start}"),
                                    "--resume", saved])


if __name__ == "__main__":
    wpipe.init_distributed(timeout_s=60)
    for case in sys.argv[2:]:
        run_case(sys.argv[1], case)
    torch.distributed.destroy_process_group()
