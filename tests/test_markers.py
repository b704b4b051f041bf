"""Tests that start processes are marked `distributed`, also those skipped on this machine
(the CUDA ones): conftest.py refuses a process to an unmarked test only when it runs, so a
test skipped here is read from its source instead. Calls in the test's own body count:
run_ok, torchrun and subprocess (a fixture's run in the setup of the tests that use it,
which the guard checks when they run)."""
import ast
from pathlib import Path

TESTS = Path(__file__).parent
LAUNCHERS = {"run_ok", "torchrun"}


def _marked(decorators) -> bool:
    return any("distributed" in ast.unparse(d) for d in decorators)


def _launches(function: ast.FunctionDef) -> bool:
    for node in ast.walk(function):
        if isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            if name in LAUNCHERS or name.startswith("subprocess."):
                return True
    return False


def unmarked_launchers(source: str) -> list[str]:
    """Names of the tests in `source` that start a process but carry no
    `distributed` marker (their own, or the module's pytestmark)."""
    tree = ast.parse(source)
    if any(isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in node.targets)
           and "distributed" in ast.unparse(node.value) for node in tree.body):
        return []
    return [node.name for node in tree.body
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_") and _launches(node) and not _marked(node.decorator_list)]


def test_tests_that_start_processes_are_marked():
    found = {path.name: names for path in sorted(TESTS.glob("test_*.py"))
             if (names := unmarked_launchers(path.read_text()))}
    assert not found, f"start a process without @pytest.mark.distributed: {found}"


def test_an_unmarked_launcher_is_found():
    source = ("import pytest\n@pytest.mark.skipif(True, reason='no CUDA')\n"
              "def test_cuda(tmp_path):\n    run_ok('w.py', 2)\n")
    assert unmarked_launchers(source) == ["test_cuda"]
    assert unmarked_launchers(source.replace("@pytest.mark.skipif", "@pytest.mark.distributed\n@pytest.mark.skipif")) == []
