"""How far a hardware preset's FLOP model is from a measured profile, point by point.

    python tool/flop_model_error.py --hardware network_conf/hardware/h200_141gb_8x.yaml
        --profile network_conf/profiles/h200_measured.yaml
        --configs network_conf/nlp_throughput_bert96.yaml,network_conf/cv_throughput_resnext200.yaml

For each configuration's model and every curve the profile measured of it (its `network`),
prints a Markdown table: at each measured batch size, the FLOP model's samples/s over the
measured ones (above 1: the FLOP model is too fast). The FLOP model times the model's chain
block after block, as tool/profile_device.py measured it.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from model_chains import CACHE, ROOT, load_model  # noqa: E402

from wpipe.planning.hardware import load_hardware  # noqa: E402
from wpipe.planning.measure import cached_blocks  # noqa: E402
from wpipe.planning.optimes import PASSES, FlopTimes, load_profile  # noqa: E402


def ratios(hw, profile, model, blocks) -> list[tuple[str, str, dict[int, float]]]:
    """(precision, pass, {batch: FLOP model samples/s / measured}) per curve of `model`."""
    rows = []
    for curve in profile.curves:
        if curve.network != model.description or curve.precision not in hw.peak_tflops:
            continue
        times = FlopTimes(hw, curve.precision)
        column = PASSES.index(curve.pass_)        # forward, backward: block_seconds' order
        rows.append((curve.precision, curve.pass_, {
            b: b / sum(times.block_seconds(block, b)[column] for block in blocks) / measured
            for b, measured in sorted(curve.points.items())}))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hardware", required=True, help="a preset YAML (network_conf/hardware/)")
    parser.add_argument("--profile", required=True, help="a measured profile YAML (network_conf/profiles/)")
    parser.add_argument("--configs", required=True, help="cv or nlp YAMLs, comma-separated")
    parser.add_argument("--cache-dir", default=str(CACHE), help="where measured block FLOPs are kept")
    args = parser.parse_args(argv)
    try:
        hw = load_hardware(args.hardware)
        profile = load_profile(args.profile)
        models = [load_model(ROOT / c if not Path(c).is_absolute() else c)[0] for c in args.configs.split(",")]
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"FLOP model of {hw.label} over {args.profile} (samples/s ratio; above 1: the model is too fast)\n")
    for model in models:
        rows = ratios(hw, profile, model, cached_blocks(model, Path(args.cache_dir) if args.cache_dir else None))
        if not rows:
            print(f"error: {args.profile} measured no curve of {model.description}", file=sys.stderr)
            return 2
        sizes = sorted({b for _, _, row in rows for b in row})
        print(f"{model.description}\n")
        print("| precision | pass | " + " | ".join(f"b={b}" for b in sizes) + " |")
        print("| --- | --- |" + " --- |" * len(sizes))
        for precision, pass_, row in rows:
            print(f"| {precision} | {pass_} | " + " | ".join(f"{row[b]:.2f}" if b in row else "" for b in sizes)
                  + " |")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
