"""`python -m wpipe`: print a method's schedule, checked and simulated.

    python -m wpipe --method wpipe --depth 4 --micro-batches 8

Imports only the pure side (wpipe.schedule), never torch.
"""
from __future__ import annotations

import argparse
from fractions import Fraction

from .schedule import METHODS, build_schedule, device_of, format_schedule, num_partitions, simulate, validate


def main(argv: list[str] | None = None) -> None:
    """Print a method's op grid, the weight versions each partition uses, and its
    simulated time and memory. Bad arguments exit with status 2 and validate's message."""
    def cost(text: str) -> Fraction:
        value = Fraction(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"costs must be >= 0, got {text}")
        return value

    parser = argparse.ArgumentParser(
        prog="python -m wpipe", description=main.__doc__,
        epilog="Costs are per micro-batch through the whole model, split evenly over the "
               "partitions, so every method is timed on the same work.")
    parser.add_argument("--method", required=True, metavar="METHOD",
                        help=f"one of {', '.join(METHODS)}")
    parser.add_argument("--depth", type=int, required=True, metavar="N",
                        help="pipeline depth N: devices per pipeline (1 for data_parallel)")
    parser.add_argument("--micro-batches", type=int, required=True, metavar="M",
                        help="micro-batches in the run, a whole number of periods")
    parser.add_argument("--micro-batches-per-update", type=int, metavar="K",
                        help="the period: micro-batches per update (default N; wpipe needs N, "
                             "pipedream_2bw >= N)")
    parser.add_argument("--forward-cost", type=cost, default=Fraction(1), metavar="T",
                        help="forward time of one micro-batch through the whole model, any unit, "
                             "fractions like 1/3 allowed (default 1)")
    parser.add_argument("--backward-cost", type=cost, default=Fraction(2), metavar="T",
                        help="backward time of one micro-batch (default 2)")
    parser.add_argument("--transfer-cost", type=cost, default=Fraction(0), metavar="T",
                        help="time to move one micro-batch's activations or gradients between "
                             "two devices (default 0)")
    args = parser.parse_args(argv)
    try:
        period = validate(args.method, args.depth, args.micro_batches, args.micro_batches_per_update)
    except ValueError as error:
        parser.error(str(error))

    n = num_partitions(args.method, args.depth)
    forward, backward = args.forward_cost / n, args.backward_cost / n
    schedule = build_schedule(args.method, args.depth, args.micro_batches, period)
    sim = simulate(schedule, args.method, args.depth, args.micro_batches, forward, backward,
                   args.transfer_cost, micro_batches_per_update=period)

    def show(x) -> str:
        return str(x.numerator) if x.denominator == 1 else f"{float(x):.4g}"

    print(f"{args.method}: depth {args.depth}, {args.micro_batches} micro-batches, {period} per "
          f"update, {n} partitions; per partition op: forward {show(forward)}, backward "
          f"{show(backward)}, transfer {show(args.transfer_cost)}\n")
    print(format_schedule(schedule) + "\n")
    print("partition  device  semantics  always newest  versions alive")
    for p in range(n):
        part = sim.report.partitions[p]
        print(f"{p:>9}  {device_of(args.method, p, args.depth):>6}  {part.semantics:<9}  "
              f"{'yes' if part.always_newest else 'no':<13}  {part.max_versions_alive}")
    print(f"\nmakespan {show(sim.makespan)}, ideal {show(sim.ideal)} (the busiest device's work), "
          f"bubble fraction {float(sim.bubble_fraction):.3f}\n")
    print("device  busy  idle  stash peak [A]  weight copies [W]")
    for d in range(args.depth):
        print(f"{d:>6}  {show(sim.busy[d]):>4}  {show(sim.idle[d]):>4}  {show(sim.stash_peak[d]):>14}  "
              f"{show(sim.weight_copies[d]):>17}")


if __name__ == "__main__":
    main()
