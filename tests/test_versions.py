"""The supported versions: pyproject.toml declares ranges whose lower ends are the oldest
versions the suite passes on (torch 2.11, transformers 5.17: what GPU machines here have),
requirements.txt pins exact versions inside them (what CI installs), and the torch and
transformers running this suite are inside them."""
import pytest
import torch
import transformers
from packaging.requirements import Requirement
from packaging.version import Version

from launch import ROOT

tomllib = pytest.importorskip("tomllib")


def declared() -> dict:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {r.name: r.specifier for r in map(Requirement, project["dependencies"])}


def pinned() -> dict:
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    return {r.name: next(iter(r.specifier)).version for r in map(Requirement, filter(None, lines))}


def test_the_oldest_supported_versions():
    ranges = declared()
    assert Version("2.11.0") in ranges["torch"] and Version("2.10.0") not in ranges["torch"]
    assert Version("5.17.0") in ranges["transformers"] and Version("5.16.0") not in ranges["transformers"]
    assert Version("0.26.0") in ranges["torchvision"]      # torch 2.11's torchvision


def test_requirements_pin_exact_versions_inside_the_ranges():
    pins, ranges = pinned(), declared()
    assert all(str(Requirement(f"{name}=={version}").specifier) == f"=={version}" for name, version in pins.items())
    for name, spec in ranges.items():
        assert name in pins, f"{name} is declared in pyproject.toml but not pinned in requirements.txt"
        assert Version(pins[name]) in spec, f"requirements.txt pins {name} {pins[name]}, outside {spec}"


def test_this_suite_runs_on_supported_versions():
    ranges = declared()
    assert Version(Version(torch.__version__).base_version) in ranges["torch"]
    assert Version(transformers.__version__) in ranges["transformers"]
