"""Worker (under torchrun): real throughput runs of the entry points, all in one process group.

Usage: memory_runs.py OUT_DIR CASES_JSON, CASES_JSON = {name: [entry, [arg, ...]]} with entry
"nlp" or "cv"; each run writes OUT_DIR/<name>/summary.json.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import torch  # noqa: E402

import wpipe  # noqa: E402
from cv.main import CvConfig  # noqa: E402
from cv.main import make_task as cv_task  # noqa: E402
from nlp.main import NlpConfig  # noqa: E402
from nlp.main import make_task as nlp_task  # noqa: E402
from wpipe.train import main  # noqa: E402

ENTRIES = {"nlp": (NlpConfig, nlp_task), "cv": (CvConfig, cv_task)}

if __name__ == "__main__":
    out_dir, cases = sys.argv[1], json.loads(open(sys.argv[2]).read())
    wpipe.init_distributed(timeout_s=60)
    for name, (entry, argv) in cases.items():
        main(*ENTRIES[entry], [*argv, "--output_dir", os.path.join(out_dir, name)])
    torch.distributed.destroy_process_group()
