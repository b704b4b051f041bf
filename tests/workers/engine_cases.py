"""Worker (under torchrun): train the toy model under each case, save what came out.

Usage: engine_cases.py OUT_DIR CASE [CASE ...], CASE = method:depth:dp:layout:optimizer:periods[:flags]
flags: 'recompute', 'twice' (train() called twice, periods each), 'resume' (the second
call on a new Pipeline loaded with the first one's state_dict), 'm<K>' (K micro-batches
per update), the precision flags of toy.precision_fields (a float32 model under autocast),
'cuda' (ranks on the GPU, sharing it, point to point through gloo: p2p_backend gloo),
'emulated' (p2p_backend nccl_emulated: NCCL's rules on gloo).
Writes OUT_DIR/<case>.rank<r>.pt with the local partitions' state dicts and the losses.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import wpipe  # noqa: E402

import toy  # noqa: E402


def p2p_backend(flags) -> str:
    return "gloo" if "cuda" in flags else "nccl_emulated" if "emulated" in flags else "auto"


def run_case(out_dir: str, case: str) -> None:
    method, depth, dp, layout, optimizer, periods, *flags = case.split(":")
    period = next((int(f[1:]) for f in flags if f.startswith("m")), None)
    cfg = wpipe.PipelineConfig(method=method, pipeline_depth=int(depth), data_parallel=int(dp),
                               rank_layout=layout, timeout_s=60, recompute="recompute" in flags,
                               micro_batches_per_update=period, **toy.precision_fields(flags),
                               p2p_backend=p2p_backend(flags))
    num_partitions = wpipe.schedule.num_partitions(method, int(depth))
    dtype = toy.model_dtype(flags)
    pipe = wpipe.Pipeline(lambda i: toy.build_partition(i, num_partitions).to(dtype), toy.loss_fn,
                          toy.OPTIMIZERS[optimizer], cfg)
    count = int(periods) * cfg.period
    twice = "twice" in flags or "resume" in flags
    data = toy.cast(toy.micro_batches(2 * count if twice else count, replica=pipe.replica), dtype)
    seen = []
    losses = pipe.train(data[:count], on_period=lambda t, loss: seen.append((t, loss)))
    if "twice" in flags:
        losses += pipe.train(data[count:])
    if "resume" in flags:  # a new Pipeline continues from the first one's state
        state = pipe.state_dict()
        pipe = wpipe.Pipeline(lambda i: toy.build_partition(i, num_partitions, seed=7).to(dtype), toy.loss_fn,
                              toy.OPTIMIZERS[optimizer], cfg)
        pipe.load_state_dict(state)
        losses += pipe.train(data[count:])
    result = {"losses": losses, "periods_seen": seen, "replica": pipe.replica,
              "memory": pipe.memory_report(), "precision": pipe.precision_report(),
              "state": {p: {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}
                        for p, m in pipe.local_partitions.items()}}
    torch.save(result, os.path.join(out_dir, f"{case}.rank{torch.distributed.get_rank()}.pt"))


if __name__ == "__main__":
    torch.set_num_threads(1)
    on_gpu = any("cuda" in case.split(":") for case in sys.argv[2:])
    wpipe.init_distributed(timeout_s=60, p2p_backend="gloo" if on_gpu else "auto")
    for case in sys.argv[2:]:
        run_case(sys.argv[1], case)
    torch.distributed.destroy_process_group()
