"""The NCCL path's settings and device choices, without a GPU: p2p_backend nccl_emulated and
its fields, the refusal of a GPU node whose CUDA torch cannot use (the probes injected),
one visible GPU per rank, and the transport's proven rules. No process is started."""
import re

import pytest
import torch

import wpipe
from cv.main import CvConfig, make_task
from wpipe.runtime import distributed
from wpipe.runtime.distributed import cuda_unusable, gpus_shared, resolve_backends
from wpipe.train import cli

from launch import ROOT


@pytest.mark.parametrize("fields, message", [
    ({"p2p_backend": "nccl_emulated", "backend": "nccl"},
     r"p2p_backend nccl_emulated runs on gloo, got backend nccl: set backend gloo or null"),
    ({"communicators": "early"}, r"communicators must be eager or lazy, got 'early'"),
])
def test_bad_nccl_settings_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        wpipe.PipelineConfig(**fields)


def test_lazy_communicators_warn():
    with pytest.warns(UserWarning, match=r"communicators lazy: .* wpipe deadlocks once a call spans two periods"):
        wpipe.PipelineConfig(p2p_backend="nccl_emulated", communicators="lazy")


def test_nccl_emulated_runs_on_gloo():
    assert resolve_backends(None, "nccl_emulated") == ("gloo", "nccl_emulated")
    assert resolve_backends("gloo", "nccl_emulated") == ("gloo", "nccl_emulated")


@pytest.mark.parametrize("backend, cuda_available, found, refused", [
    (None, False, "/dev/nvidia0", True),       # a GPU node whose driver torch's CUDA cannot use
    ("nccl", False, "nvidia-smi", True),
    ("gloo", False, "/dev/nvidia0", False),    # the CPU was asked for
    (None, True, "/dev/nvidia0", False),       # CUDA works
    (None, False, None, False),                # a CPU machine
])
def test_a_gpu_node_torch_cannot_use_is_refused(backend, cuda_available, found, refused):
    problem = cuda_unusable(backend, cuda_available, found)
    assert (problem is not None) == refused
    if refused:
        assert problem.startswith(f"this node has NVIDIA GPUs ({found}) but torch.cuda.is_available() is false, "
                                  f"so the run would train on the CPU: ")
        assert problem.endswith("or pass --backend gloo to run on the CPU")
        cause = ("is built without CUDA" if torch.version.cuda is None else
                 f"the likely cause is an NVIDIA driver older than the CUDA {torch.version.cuda}")
        assert cause in problem


def test_the_entry_point_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    """Under torchrun on such a node (the probes say GPUs, torch says no CUDA): `error: ...`,
    exit status 2, before any process group exists."""
    monkeypatch.setattr(distributed, "nvidia_devices", lambda: "/dev/nvidia0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "9"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit:
        cli(CvConfig, make_task, ["--config", str(ROOT / "network_conf" / "cv_tiny.yaml"),
                                  "--output_dir", str(tmp_path / "out")])
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(r"error: this node has NVIDIA GPUs \(/dev/nvidia0\) but "
                                      r"torch.cuda.is_available\(\) is false", err[0]), err
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("local_ranks, visible, cuda_visible_devices, shared", [
    (8, 8, None, False),
    (8, 1, "3", False),          # one GPU per rank, set by the launcher (Slurm's --gpus-per-task=1)
    (8, 1, None, True),          # eight ranks, one GPU
    (4, 2, "0,1", True),
    (2, 1, "", True),
])
def test_one_visible_gpu_per_rank_is_one_gpu_per_rank(local_ranks, visible, cuda_visible_devices, shared):
    problem = gpus_shared(local_ranks, visible, cuda_visible_devices)
    assert (problem is not None) == shared
    if shared:
        assert problem.startswith(f"NCCL needs one GPU per rank: {local_ranks} ranks on this node, {visible} GPU(s)")
