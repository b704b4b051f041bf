"""Run a command (usually torchrun) on this machine with a timeout, and on timeout or
interrupt kill exactly the processes it started.

torchrun starts its workers in sessions of their own, so killing its process group is not
enough: the processes to kill are found by walking the process tree from the launched pid
(Linux /proc) before anything is killed.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    """A TCP port free on the loopback address right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(script, nproc: int, args=(), options=()) -> list[str]:
    """torchrun on loopback with a free port, `nproc` processes on this machine; `options`
    are torchrun's own (e.g. --max-restarts=1)."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}", *options, str(script), *map(str, args)]


def run(cmd: list[str], timeout: float, env: dict | None = None, cwd=None) -> tuple[int, str]:
    """Run `cmd`, return (exit code, stdout and stderr together). On timeout, raise
    TimeoutError with the output so far; on timeout or interrupt, first kill every process
    it started."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=full_env, cwd=cwd, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except BaseException as error:
        kill_tree(proc.pid)
        out, _ = proc.communicate()
        if isinstance(error, subprocess.TimeoutExpired):
            raise TimeoutError(f"{' '.join(cmd)} did not finish within {timeout:g} s; output:\n"
                               f"{out[-6000:]}") from None
        raise
    return proc.returncode, out


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and all its descendants (found before any is killed)."""
    victims = [pid, *_descendants(pid)]
    for victim in victims:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found
