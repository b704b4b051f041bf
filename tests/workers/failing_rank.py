"""Worker (under torchrun): wpipe on 2 ranks where rank 1 stops in its 3rd forward,
either hanging (`hang`) or exiting at once (`exit`). Rank 0 must fail, not wait forever."""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import wpipe  # noqa: E402

import toy  # noqa: E402


class Stops(torch.nn.Module):
    def __init__(self, inner, mode):
        super().__init__()
        self.inner, self.mode, self.calls = inner, mode, 0

    def forward(self, *args):
        self.calls += 1
        if self.calls == 3 and torch.distributed.get_rank() == 1:
            if self.mode == "exit":
                os._exit(3)
            time.sleep(600)
        return self.inner(*args)


if __name__ == "__main__":
    torch.set_num_threads(1)
    wpipe.init_distributed(timeout_s=60)
    cfg = wpipe.PipelineConfig(method="wpipe", pipeline_depth=2, timeout_s=3)
    pipe = wpipe.Pipeline(lambda i: Stops(toy.build_partition(i, 4), sys.argv[1]), toy.loss_fn,
                          toy.OPTIMIZERS["sgd"], cfg)
    pipe.train(toy.micro_batches(8))
