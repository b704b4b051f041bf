"""experiments/slurm/multi_node.sbatch's dry run: the command each node of an allocation
would run (the multi-node sweep with its NODE_RANK, the first node as master, the interface
variables passed on), without Slurm or GPUs."""
import os
import subprocess

import pytest

from launch import ROOT

pytestmark = pytest.mark.distributed   # it starts sh

SBATCH = ROOT / "experiments" / "slurm" / "multi_node.sbatch"


def dry_run(env: dict, *args):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NCCL_", "GLOO_", "MASTER_", "NPROC"))}
    return subprocess.run(["sh", str(SBATCH), *args], env={**clean, "DRY_RUN": "1", **env}, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_prints_each_nodes_command():
    out = dry_run({"NODES": "gpu01 gpu02 gpu03", "NCCL_SOCKET_IFNAME": "=eth0", "GLOO_SOCKET_IFNAME": "eth0",
                   "SLURM_GPUS_ON_NODE": "4", "SCRIPT": "cv_throughput_multi_node.sh"}, "--micro_batch_size", "8")
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    assert out.stdout.splitlines() == [
        f"gpu0{i + 1}: NNODES=3 NODE_RANK={i} MASTER_ADDR=gpu01 MASTER_PORT=29500 NPROC_PER_NODE=4 "
        f"NCCL_SOCKET_IFNAME==eth0 GLOO_SOCKET_IFNAME=eth0 sh experiments/cv_throughput_multi_node.sh --micro_batch_size 8"
        for i in range(3)]
    for line in out.stdout.splitlines():   # each names a script that exists
        assert (ROOT / line.split(" sh ", 1)[1].split()[0]).is_file()


def test_warns_without_interface_variables_and_refuses_an_unknown_script():
    out = dry_run({"NODES": "a b"})
    assert out.returncode == 0
    assert out.stdout.splitlines()[1] == ("b: NNODES=2 NODE_RANK=1 MASTER_ADDR=a MASTER_PORT=29500 NPROC_PER_NODE=8 "
                                          "sh experiments/nlp_throughput_multi_node.sh")
    assert "warning: NCCL_SOCKET_IFNAME is not set" in out.stderr and "warning: GLOO_SOCKET_IFNAME is not set" in out.stderr
    out = dry_run({"NODES": "a", "SCRIPT": "nlp_throughput.sh"})
    assert out.returncode == 2 and out.stderr.startswith("error: SCRIPT=nlp_throughput.sh: no experiments/nlp_throughput.sh")
