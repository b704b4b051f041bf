"""Worker (under torchrun): nlp/main.py whose loss turns NaN at one micro-batch of the run
on one rank (a bad batch, or a loss that blew up).

Usage: poison.py RANK CALL [--key value ...]: on rank RANK, the CALL-th loss computed in
training (0-based; without recompute, micro-batch CALL of that replica's run) is NaN.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from nlp.main import NlpConfig, make_task  # noqa: E402
from wpipe.train import cli  # noqa: E402


def main():
    rank, call, *argv = sys.argv[1:]
    calls = [0]

    def poisoned_task(cfg):
        task = make_task(cfg)
        loss_fn = task.loss_fn

        def poisoned(output, target):
            loss = loss_fn(output, target)
            if int(os.environ["RANK"]) == int(rank) and calls[0] == int(call):
                loss = loss * float("nan")
            calls[0] += 1
            return loss
        task.loss_fn = poisoned
        return task
    cli(NlpConfig, poisoned_task, argv)


if __name__ == "__main__":
    main()
