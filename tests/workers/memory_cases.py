"""Worker (under torchrun): run cv/main.py or nlp/main.py in throughput mode for each case,
all in one process group, each writing its own summary.json.

Usage: memory_cases.py OUT_DIR CASE [CASE ...], CASE = entry:method:depth:dp:recompute:micro_batch,
entry cv or nlp (the tiny configurations). Writes OUT_DIR/<case>/summary.json.
"""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))

import torch.distributed  # noqa: E402

import wpipe  # noqa: E402
from cv.main import CvConfig  # noqa: E402
from cv.main import make_task as cv_task  # noqa: E402
from nlp.main import NlpConfig  # noqa: E402
from nlp.main import make_task as nlp_task  # noqa: E402
from wpipe.train import main  # noqa: E402

ENTRIES = {"cv": (CvConfig, cv_task, "cv_tiny.yaml"), "nlp": (NlpConfig, nlp_task, "nlp_tiny.yaml")}
PERIODS, WARMUP = 2, 1


def run_case(out_dir: Path, case: str) -> None:
    entry, method, depth, dp, recompute, micro_batch = case.split(":")
    config_class, make_task, config = ENTRIES[entry]
    main(config_class, make_task, [
        "--config", str(ROOT / "network_conf" / config), "--mode", "throughput", "--method", method,
        "--pipeline_depth", depth, "--data_parallel", dp, "--recompute", recompute,
        "--micro_batch_size", micro_batch, "--throughput_periods", str(PERIODS),
        "--throughput_warmup_periods", str(WARMUP), "--timeout_s", "60",
        "--output_dir", str(out_dir / case.replace(":", "_"))])


if __name__ == "__main__":
    wpipe.init_distributed(timeout_s=60)
    for name in sys.argv[2:]:
        run_case(Path(sys.argv[1]), name)
    torch.distributed.destroy_process_group()
    os._exit(0)
