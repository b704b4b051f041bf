"""The one launcher for multi-process tests: torchrun on loopback, a free port per
launch, a timeout around it, and clean-up of exactly the processes it started."""
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script, nproc: int, args=(), timeout: float = 180, env: dict | None = None):
    """Run `script` under torchrun with `nproc` processes; return (exit code, output).
    On timeout the whole process group it started is killed and AssertionError raised."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script), *map(str, args)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                **(env or {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=full_env, cwd=ROOT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"{' '.join(cmd)} did not finish in {timeout} s; output:\n{out[-6000:]}")
    return proc.returncode, out


def run_ok(script, nproc: int, args=(), timeout: float = 180, env=None) -> str:
    code, out = torchrun(script, nproc, args, timeout, env)
    assert code == 0, f"exit code {code}; output:\n{out[-8000:]}"
    return out
