"""Shared fixtures and rules: every test starts from the same torch seed, and only tests
marked `distributed` may start a process, in their fixtures (module-scoped ones included)
or in their body, so that `pytest -m "not distributed"` launches none."""
import contextlib
import subprocess

import pytest
import torch


@pytest.fixture(autouse=True)
def manual_seed_zero():
    torch.manual_seed(0)


@contextlib.contextmanager
def _processes_allowed(item):
    if item.get_closest_marker("distributed") is not None:
        yield
        return

    def refuse(*args, **kwargs):
        raise AssertionError(f"{item.nodeid} starts a process: mark it @pytest.mark.distributed")
    original, subprocess.Popen.__init__ = subprocess.Popen.__init__, refuse
    try:
        yield
    finally:
        subprocess.Popen.__init__ = original


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    with _processes_allowed(item):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    with _processes_allowed(item):
        yield
