"""The runs behind tool/gpu_check.py's checks that need a GPU, each in a process of its own
(a check of the GPU must be killable: tool/gpu_check.py itself never touches the device).

    python tool/gpu_check_worker.py environment OUT_FILE
        what this python and its devices are, as JSON (torch, transformers, CUDA, GPUs, bf16)
    torchrun ... tool/gpu_check_worker.py resume OUT_DIR P[,P ...] [nlp/main.py arguments]
        OUT_DIR/full: the run, with checkpoints; OUT_DIR/from<P>: the same run resumed from
        full's checkpoint after update P
    torchrun ... tool/gpu_check_worker.py recompute OUT_DIR [nlp/main.py arguments]
        OUT_DIR/plain and OUT_DIR/recompute: the run with --recompute false and true
    torchrun ... tool/gpu_check_worker.py fp16 OUT_DIR CASE
        tests/workers/engine_cases.py's CASE (OUT_DIR/<CASE>.rank<r>.pt), then on rank 0 the
        single-process reference of the same case on the same device (OUT_DIR/reference.pt:
        losses, partition states, the loss scaler's changes and skips)

The training runs use deterministic kernels (torch.use_deterministic_algorithms and the
cuBLAS workspace setting it needs): the checks compare two runs bit for bit, which CUDA's
default kernels do not promise (some backwards add with atomics, in a varying order).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # before cuBLAS starts

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def environment(out_file: str) -> None:
    import transformers

    import wpipe

    cuda = torch.cuda.is_available()
    info = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "wpipe": str(Path(wpipe.__file__).parent), "cuda_available": cuda,
            "gpus": torch.cuda.device_count() if cuda else 0, "cpu_count": os.cpu_count(),
            "load_average": list(os.getloadavg())}
    if cuda:
        info.update(gpu_names=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                    cuda_version=torch.version.cuda, bf16_supported=torch.cuda.is_bf16_supported(),
                    nccl_version=str(torch.cuda.nccl.version()))
    Path(out_file).write_text(json.dumps(info, indent=1))


def resume(out_dir: str, starts: str, *args: str) -> None:
    from nlp.main import NlpConfig, make_task
    from wpipe.train import checkpoint, main

    shared_group(args)
    full = Path(out_dir) / "full"
    main(NlpConfig, make_task, [*args, "--output_dir", str(full)])
    for start in starts.split(","):
        saved = full / "checkpoints" / checkpoint.folder_name(int(start))
        main(NlpConfig, make_task, [*args, "--output_dir", str(Path(out_dir) / f"from{start}"),
                                    "--resume", str(saved)])


def recompute(out_dir: str, *args: str) -> None:
    from nlp.main import NlpConfig, make_task
    from wpipe.train import main

    shared_group(args)
    for name, flag in (("plain", "false"), ("recompute", "true")):
        main(NlpConfig, make_task, [*args, "--recompute", flag, "--output_dir", str(Path(out_dir) / name)])


def fp16(out_dir: str, case: str) -> None:
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "workers")]
    from engine_cases import run_case

    import wpipe

    # As engine_cases.py's own launch: gloo, and with the cuda flag every rank on the GPU.
    wpipe.init_distributed("gloo", timeout_s=60, p2p_backend="gloo" if "cuda" in case.split(":") else "auto")
    run_case(out_dir, case)
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        torch.save(reference_of(case), Path(out_dir) / "reference.pt")


def shared_group(args) -> None:
    """One process group for every run of this worker (a run uses the group it finds and
    leaves it), with the backends the runs' arguments name."""
    import wpipe
    from wpipe.train import parse_cli

    _, fields = parse_cli(args)
    wpipe.init_distributed(fields.get("backend"), 60, fields.get("p2p_backend", "auto"))


def reference_of(case: str) -> dict:
    """wpipe.runtime.reference.train on engine_cases.py's `case` (method:depth:dp:layout:
    optimizer:periods[:flags]), on the device the engine ran on, with its precision policy."""
    import wpipe
    from wpipe.runtime import precision, reference

    import toy

    method, depth, dp, _, optimizer, periods, *flags = case.split(":")
    if dp != "1":
        raise ValueError(f"{case}: the reference here runs one replica (data_parallel 1)")
    device = torch.device("cuda" if "cuda" in flags else "cpu")
    cfg = wpipe.PipelineConfig(method=method, pipeline_depth=int(depth), **toy.precision_fields(flags))
    num_partitions = wpipe.schedule.num_partitions(method, int(depth))
    dtype = toy.model_dtype(flags)
    partitions = [toy.build_partition(i, num_partitions).to(dtype).to(device) for i in range(num_partitions)]
    data = [(tuple(x.to(device) for x in inputs), target.to(device))
            for inputs, target in toy.cast(toy.micro_batches(int(periods) * cfg.period), dtype)]
    policy = precision.Policy.from_config(cfg, device.type)
    scaler = policy.make_scaler(method, int(depth))
    losses = reference.train(partitions, toy.loss_fn, toy.OPTIMIZERS[optimizer], data, method, int(depth),
                             policy=policy, scaler=scaler)
    result = {"losses": losses, "state": {p: {k: v.detach().cpu() for k, v in m.state_dict().items()}
                                          for p, m in enumerate(partitions)}}
    if scaler:
        result.update(loss_scale_changes=scaler.changes(int(periods)), overflow_skips=scaler.skipped())
    return result


RUNS = {"resume": resume, "recompute": recompute, "fp16": fp16}


if __name__ == "__main__":
    kind, *arguments = sys.argv[1:]
    if kind == "environment":
        environment(*arguments)
    else:
        torch.use_deterministic_algorithms(True, warn_only=True)
        RUNS[kind](*arguments)
        torch.distributed.destroy_process_group()
