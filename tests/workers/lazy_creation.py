"""Worker (under torchrun, 2 processes): wpipe at depth 2, one call of three periods, on
p2p_backend nccl_emulated with communicators argv[1] (eager or lazy) and a 3 s timeout.
Under lazy it deadlocks: a rank whose wait times out prints its CommError and waits as long
again before it exits, so that the other rank's own error is printed too."""
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import wpipe  # noqa: E402
from wpipe.errors import CommError  # noqa: E402

import toy  # noqa: E402

TIMEOUT_S = 3

if __name__ == "__main__":
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")   # communicators lazy warns that it may deadlock: that is the point
    wpipe.init_distributed(timeout_s=60, p2p_backend="nccl_emulated")
    cfg = wpipe.PipelineConfig(method="wpipe", pipeline_depth=2, timeout_s=TIMEOUT_S, p2p_backend="nccl_emulated",
                               communicators=sys.argv[1])
    pipe = wpipe.Pipeline(lambda i: toy.build_partition(i, 4), toy.loss_fn, toy.OPTIMIZERS["sgd"], cfg)
    try:
        pipe.train(toy.micro_batches(6))
    except CommError as error:
        print(f"CommError: {error}", flush=True)
        time.sleep(TIMEOUT_S + 1)
        sys.exit(1)
    torch.distributed.destroy_process_group()
