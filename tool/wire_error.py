"""The error a reduced-precision wire (wire_dtype fp16 / bf16) adds, measured on the oracle.

    python tool/wire_error.py [--layers 4 --hidden 64 --seq 32 --micro-batch 8 --depth 2
                               --periods 5 --methods wpipe,pipedream_2bw]

The engine equals wpipe.reference exactly with a wire dtype (tests/test_engine.py), so the
reference, in one process, measures what the casts do: the same BERT-like model as
tool/bench.py (TransformerEncoderLayer blocks, MSE loss, AdamW), float32, trained for
--periods updates with no wire cast and with each wire dtype. Printed per method and wire
dtype: the relative error of the first period's gradients (before any update, so only the
casts differ), max |g_wire - g| / max |g| per parameter, and of the final weights relative
to how far training moved them, max |w_wire - w| / max |w - w_0| per parameter (each the
max and the mean over parameters), and the final loss of each run. Written to --output-dir/wire_error.json.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from torch import nn

from wpipe import schedule
from wpipe.planning import partition
from wpipe.runtime import precision, reference


def partitions(args, method: str) -> list[nn.Module]:
    """The same blocks (seeded) cut into the method's partitions."""
    torch.manual_seed(0)
    layers = [nn.TransformerEncoderLayer(args.hidden, nhead=4, dim_feedforward=4 * args.hidden, dropout=0.0,
                                         batch_first=True) for _ in range(args.layers)]
    return [nn.Sequential(*(layers[i] for i in r))
            for r in partition.uniform(args.layers, schedule.num_partitions(method, args.depth))]


def data(args, count: int):
    g = torch.Generator().manual_seed(1)
    shape = (args.micro_batch, args.seq, args.hidden)
    return [(torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in range(count)]


class _KeepGradients(torch.optim.SGD):
    """Keeps the gradients it is given instead of stepping."""

    def step(self, closure=None):
        self.kept = [p.grad.clone() for group in self.param_groups for p in group["params"]]


def first_gradients(args, method: str, wire: str | None) -> list[torch.Tensor]:
    """The first period's gradients (before any update), partition by partition."""
    optimizers = []

    def make_optimizer(params):
        optimizers.append(_KeepGradients(params, lr=0.0))
        return optimizers[-1]
    reference.train(partitions(args, method), nn.functional.mse_loss, make_optimizer, data(args, args.depth),
                    method, args.depth, policy=precision.Policy(wire_dtype=wire))
    return [g for optimizer in optimizers for g in optimizer.kept]


def trained(args, method: str, wire: str | None):
    """(final weights, final loss) after --periods updates."""
    parts = partitions(args, method)
    losses = reference.train(parts, nn.functional.mse_loss, lambda ps: torch.optim.AdamW(ps, lr=1e-3),
                             data(args, args.periods * args.depth), method, args.depth,
                             policy=precision.Policy(wire_dtype=wire))
    return [p.detach().clone() for m in parts for p in m.parameters()], losses[-1]


def relative(got: list[torch.Tensor], want: list[torch.Tensor], scale: list[torch.Tensor]) -> dict:
    """max |got - want| / max |scale| per tensor: the max and the mean over tensors."""
    errors = [((a - b).abs().max() / s.abs().max().clamp_min(1e-30)).item() for a, b, s in zip(got, want, scale)]
    return {"max": max(errors), "mean": sum(errors) / len(errors)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("layers", 4), ("hidden", 64), ("seq", 32), ("micro-batch", 8), ("depth", 2), ("periods", 5)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--methods", default="wpipe,pipedream_2bw")
    parser.add_argument("--output-dir", default="runs/wire_error")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))
    results = {}
    lines = [f"wire error on the oracle: {args.layers} layers x hidden {args.hidden} x seq {args.seq}, micro-batch "
             f"{args.micro_batch}, depth {args.depth}, float32, {args.periods} AdamW updates (lr 1e-3)",
             f"{'method':<15} {'wire':<5} {'grad max':>9} {'grad mean':>9} {'weight max':>10} {'weight mean':>11} "
             f"{'final loss':>10}"]
    for method in [m for m in args.methods.split(",") if m]:
        exact_grads = first_gradients(args, method, None)
        exact_weights, exact_loss = trained(args, method, None)
        initial = [p.detach() for m in partitions(args, method) for p in m.parameters()]
        moved = [w - w0 for w, w0 in zip(exact_weights, initial)]
        lines.append(f"{method:<15} {'none':<5} {0:>9.2e} {0:>9.2e} {0:>10.2e} {0:>11.2e} {exact_loss:>10.6f}")
        for wire in ("fp16", "bf16"):
            grads = relative(first_gradients(args, method, wire), exact_grads, exact_grads)
            weights, loss = trained(args, method, wire)
            weight_error = relative(weights, exact_weights, moved)
            results[f"{method}/{wire}"] = {"gradients": grads, "weights": weight_error, "final_loss": loss,
                                           "final_loss_no_cast": exact_loss}
            lines.append(f"{method:<15} {wire:<5} {grads['max']:>9.2e} {grads['mean']:>9.2e} "
                         f"{weight_error['max']:>10.2e} {weight_error['mean']:>11.2e} {loss:>10.6f}")
    print("\n".join(lines))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {"args": vars(args), "results": results, "report": lines}
    (out / "wire_error.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out / 'wire_error.json'}")


if __name__ == "__main__":
    main()
