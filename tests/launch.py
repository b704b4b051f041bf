"""The one launcher for multi-process tests: torchrun on loopback, a free port per
launch, a timeout around it, and clean-up of exactly the processes it started
(wpipe.launch)."""
from pathlib import Path

from wpipe.launch import run, torchrun_command

ROOT = Path(__file__).resolve().parent.parent


def torchrun(script, nproc: int, args=(), timeout: float = 180, env: dict | None = None, options=()):
    """Run `script` under torchrun with `nproc` processes (`options`: torchrun's own);
    return (exit code, output). A launch that outlives `timeout` is killed and fails the test."""
    try:
        return run(torchrun_command(script, nproc, args, options), timeout,
                   {"HF_HUB_OFFLINE": "1", **(env or {})}, ROOT)
    except TimeoutError as error:
        raise AssertionError(str(error)) from None


def run_ok(script, nproc: int, args=(), timeout: float = 180, env=None, options=()) -> str:
    code, out = torchrun(script, nproc, args, timeout, env, options)
    assert code == 0, f"exit code {code}; output:\n{out[-8000:]}"
    return out
