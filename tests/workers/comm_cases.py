"""Worker (under torchrun, 2 processes): messages whose shapes change.

Usage: comm_cases.py OUT_DIR METHOD P2P_BACKEND. Trains the toy model for two calls of
train(), the second on micro-batches of another size (every stream's metadata changes;
over gloo the receivers posted receives of the old shapes, over nccl_emulated they post
them only when their op runs), then evaluates micro-batches of sizes that change from one
to the next. Writes OUT_DIR/<method>.rank<r>.pt with the local
partitions' state dicts and the evaluation outputs.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import wpipe  # noqa: E402

import toy  # noqa: E402

TRAIN_BATCHES = (3, 2)       # micro-batch size of the first and the second train() call
EVAL_BATCHES = (4, 4, 3, 4, 1, 1, 5)


def main(out_dir: str, method: str, p2p_backend: str) -> None:
    cfg = wpipe.PipelineConfig(method=method, pipeline_depth=2, timeout_s=60, p2p_backend=p2p_backend)
    n = wpipe.schedule.num_partitions(method, 2)
    pipe = wpipe.Pipeline(lambda i: toy.build_partition(i, n), toy.loss_fn, toy.OPTIMIZERS["sgd"], cfg)
    for call, batch in enumerate(TRAIN_BATCHES):
        pipe.train(toy.micro_batches(2 * cfg.period, batch=batch, seed=call))
    outputs = [out for out, _ in pipe.evaluate([toy.micro_batches(1, batch=b, seed=10 + i)[0]
                                                for i, b in enumerate(EVAL_BATCHES)])]
    torch.save({"state": {p: m.state_dict() for p, m in pipe.local_partitions.items()}, "outputs": outputs},
               os.path.join(out_dir, f"{method}.rank{torch.distributed.get_rank()}.pt"))


if __name__ == "__main__":
    torch.set_num_threads(1)
    wpipe.init_distributed(timeout_s=60, p2p_backend=sys.argv[3])
    main(*sys.argv[1:4])
    torch.distributed.destroy_process_group()
