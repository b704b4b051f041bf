"""Worker (under torchrun): count, per op kind, wpipe's reads of tensor values by the host
(`item`, `tolist`, `bool`, `float`, `int`): on a GPU each one waits for the device.

Usage: host_reads.py OUT_DIR CASE [CASE ...], CASE = method:depth:dp:flags (flags as in
engine_cases.py, plus 'guard': an on_nonfinite check). Counted: reads made by wpipe's own
code (lib/wpipe), each in the innermost op it happens in, except its reads of values that
travel on CPU control groups (gloo) and never touch the device: the transport's headers and
metadata, and the fp16 verdict agreed over every rank (`Agreement._settle`); torch's own
(an optimizer's step count lives on the CPU) are not. Writes
OUT_DIR/<case>.rank<r>.json: {op kind: [reads per op]}.
"""
import json
import os
import sys
import traceback
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import wpipe  # noqa: E402
from wpipe.runtime.engine import Pipeline  # noqa: E402

import toy  # noqa: E402

READS = ("item", "tolist", "__bool__", "__float__", "__int__")
LIBRARY = os.path.dirname(wpipe.__file__)
TRANSPORT = os.path.join(LIBRARY, "runtime", "transport.py")
AGREED = (os.path.join(LIBRARY, "runtime", "precision.py"), "_settle")
state = {"op": None, "reads": 0}


def counting(name):
    original = getattr(torch.Tensor, name)

    def read(self, *args, **kwargs):
        caller = traceback.extract_stack(limit=2)[0]
        control = caller.filename == TRANSPORT or (caller.filename, caller.name) == AGREED
        if state["op"] is not None and caller.filename.startswith(LIBRARY) and not control:
            state["reads"] += 1
        return original(self, *args, **kwargs)
    return read


def per_op(kind, method):
    def run(self, *args):
        outer, reads = state["op"], state["reads"]
        state["op"], state["reads"] = kind, 0
        try:
            return method(self, *args)
        finally:
            self.reads[kind].append(state["reads"])
            state["op"], state["reads"] = outer, reads
    return run


def run_case(out_dir: str, case: str) -> None:
    method, depth, dp, *flags = case.split(":")
    cfg = wpipe.PipelineConfig(method=method, pipeline_depth=int(depth), data_parallel=int(dp), timeout_s=60,
                               **toy.precision_fields(flags))
    num_partitions = wpipe.schedule.num_partitions(method, int(depth))
    dtype = toy.model_dtype(flags)
    pipe = Pipeline(lambda i: toy.build_partition(i, num_partitions).to(dtype), toy.loss_fn, toy.OPTIMIZERS["adam"],
                    cfg, on_nonfinite=(lambda p, versions, grads: False) if "guard" in flags else None)
    pipe.reads = defaultdict(list)
    pipe.train(toy.cast(toy.micro_batches(4 * cfg.period, replica=pipe.replica), dtype))
    path = os.path.join(out_dir, f"{case}.rank{torch.distributed.get_rank()}.json")
    with open(path, "w") as f:
        json.dump(pipe.reads, f)


if __name__ == "__main__":
    torch.set_num_threads(1)
    for name in READS:
        setattr(torch.Tensor, name, counting(name))
    for kind, name in (("F", "_forward"), ("B", "_backward"), ("U", "_update"), ("finish", "_finish_update")):
        setattr(Pipeline, name, per_op(kind, getattr(Pipeline, name)))
    wpipe.init_distributed(timeout_s=60)
    for case in sys.argv[2:]:
        run_case(sys.argv[1], case)
