"""The library's layers (wpipe/__init__.py): dependencies run one way, and the pure side
imports no torch. Read from the sources' import statements, and checked once in a fresh
interpreter."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

import wpipe

LIB = Path(wpipe.__file__).parent
SHARED = {"wpipe", "wpipe.config", "wpipe.errors", "wpipe.files", "wpipe.trace", "wpipe.launch"}
ALLOWED = {   # layer -> the layers it may import (besides itself and SHARED)
    "schedule": set(),
    "runtime": {"schedule"},
    "train": {"runtime", "schedule", "planning"},
    "planning": {"schedule", "runtime.memory"},
}
PURE = ["wpipe.schedule", "wpipe.config", "wpipe.errors", "wpipe.files", "wpipe.trace", "wpipe.__main__",
        "wpipe.planning.partition", "wpipe.planning.blockcost"]


def module_name(path: Path) -> str:
    parts = path.relative_to(LIB.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level_only: bool = False) -> set[str]:
    """The wpipe modules (and other top-level packages) `path` imports, absolute."""
    tree = ast.parse(path.read_text())
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    nodes = tree.body if top_level_only else ast.walk(tree)
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            module = node.module
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            for alias in node.names:   # a name that is a module of the library is what is imported
                out.add(f"{module}.{alias.name}" if is_module(f"{module}.{alias.name}") else module)
    return out


def is_module(name: str) -> bool:
    path = LIB.parent / Path(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "wpipe" and parts[1] in ALLOWED else None


def test_dependencies_run_one_way():
    wrong = []
    for path in sorted(LIB.rglob("*.py")):
        mine = layer(module_name(path))
        if mine is None:
            continue
        for target in imports(path):
            other = layer(target)
            if other is None or other == mine:
                if target.startswith("wpipe") and other is None and target not in SHARED:
                    wrong.append(f"{module_name(path)} imports {target}")
                continue
            allowed = ALLOWED[mine]
            if other not in allowed and ".".join(target.split(".")[1:3]) not in allowed:
                wrong.append(f"{module_name(path)} imports {target}")
    assert not wrong, wrong


def test_the_pure_side_imports_no_torch_at_module_level():
    for name in PURE:
        path = LIB.parent / Path(*name.split("."))
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path.with_suffix(".py")]
        for file in files:
            assert not {m for m in imports(file, top_level_only=True) if m.split(".")[0] == "torch"}, file


@pytest.mark.distributed   # a fresh interpreter
def test_importing_the_pure_side_loads_no_torch():
    code = f"import sys; import {', '.join(PURE)}; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
