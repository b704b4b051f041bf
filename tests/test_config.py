"""`PipelineConfig` validation and `load_config`, the one merger (overrides > YAML >
defaults). Messages are contract: each is asserted with `match=`."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

import pytest

from wpipe.config import PipelineConfig, load_config

DEFAULTS = PipelineConfig()


def write(tmp_path, text: str, name: str = "run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@dataclass
class TrainConfig(PipelineConfig):
    """An entry point's configuration: the runtime's fields plus its own."""
    lr: float = 0.1
    """Learning rate."""
    model: str = "bert"
    """Model name."""
    layers: list[int] = field(default_factory=lambda: [3, 4])
    """Blocks per stage of the model."""
    seed: int | None = None
    """Random seed; None: nondeterministic."""


# --------------------------------------------------------------------------- load_config

def test_defaults_without_file_or_overrides():
    assert load_config(PipelineConfig) == DEFAULTS
    assert DEFAULTS.method == "wpipe" and DEFAULTS.pipeline_depth == 2 and DEFAULTS.data_parallel == 1


def test_precedence_overrides_then_yaml_then_defaults(tmp_path):
    path = write(tmp_path, "method: pipedream_2bw\npipeline_depth: 4\ntimeout_s: 60\n")
    cfg = load_config(PipelineConfig, path, {"pipeline_depth": "3", "recompute": "true"})
    assert cfg.pipeline_depth == 3          # override beats YAML
    assert cfg.method == "pipedream_2bw"    # YAML beats default
    assert cfg.timeout_s == 60.0 and isinstance(cfg.timeout_s, float)
    assert cfg.recompute is True            # override beats default
    assert cfg.data_parallel == 1 and cfg.rank_layout == "pipeline_major"  # defaults
    assert load_config(PipelineConfig, str(path)).pipeline_depth == 4      # str paths too


def test_empty_yaml_gives_defaults(tmp_path):
    assert load_config(PipelineConfig, write(tmp_path, "")) == DEFAULTS
    assert load_config(PipelineConfig, write(tmp_path, "# nothing\n")) == DEFAULTS


@pytest.mark.parametrize("key, text, expected", [
    ("pipeline_depth", "3", 3),
    ("data_parallel", "2", 2),
    ("micro_batches_per_update", "2", 2),
    ("micro_batches_per_update", "none", None),
    ("micro_batches_per_update", "null", None),
    ("timeout_s", "2.5", 2.5),
    ("timeout_s", "7", 7.0),
    ("recompute", "true", True),
    ("recompute", "False", False),
    ("recompute", "1", True),
    ("recompute", "0", False),
    ("backend", "gloo", "gloo"),
    ("backend", "None", None),
    ("rank_layout", "replica_major", "replica_major"),
    ("method", "gpipe", "gpipe"),
])
def test_string_overrides_are_converted(key, text, expected):
    cfg = load_config(PipelineConfig, None, {key: text})
    assert getattr(cfg, key) == expected
    assert type(getattr(cfg, key)) is type(expected)


def test_typed_overrides_pass_through():
    cfg = load_config(PipelineConfig, None, {"pipeline_depth": 3, "timeout_s": 5, "recompute": True,
                                             "micro_batches_per_update": None})
    assert cfg.pipeline_depth == 3 and cfg.timeout_s == 5.0 and cfg.recompute is True
    assert cfg.micro_batches_per_update is None
    assert isinstance(cfg.timeout_s, float)


def test_unknown_key_names_key_source_and_valid_keys(tmp_path):
    path = write(tmp_path, "pipeline_dept: 4\n")
    valid = ", ".join(sorted(f.name for f in dataclasses.fields(PipelineConfig)))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: unknown config key 'pipeline_dept'; "
                                         rf"valid keys: {valid}$"):
        load_config(PipelineConfig, path)
    with pytest.raises(ValueError, match=r"^overrides: unknown config key 'depth'; valid keys: backend, "
                                         r".*\bdata_parallel, .*\bmethod, micro_batches_per_update, .*\bpipeline_depth"):
        load_config(PipelineConfig, None, {"depth": "4"})


@pytest.mark.parametrize("yaml_text, message", [
    ("pipeline_depth: two\n", r"config key 'pipeline_depth' expects int, got 'two'"),
    ("pipeline_depth: 2.5\n", r"config key 'pipeline_depth' expects int, got 2\.5"),
    ("pipeline_depth: true\n", r"config key 'pipeline_depth' expects int, got True"),
    ("recompute: 1\n", r"config key 'recompute' expects bool, got 1"),
    ("recompute: 'true'\n", r"config key 'recompute' expects bool, got 'true'"),   # YAML strings stay strings
    ("timeout_s: fast\n", r"config key 'timeout_s' expects float, got 'fast'"),
    ("method: 3\n", r"config key 'method' expects str, got 3"),
    ("micro_batches_per_update: 2.0\n",
     r"config key 'micro_batches_per_update' expects int \| None, got 2\.0"),
    ("backend: [gloo]\n", r"config key 'backend' expects str \| None, got \['gloo'\]"),
    ("method: null\n", r"config key 'method' expects str, got None"),
])
def test_wrong_type_in_yaml_names_key_file_and_type(tmp_path, yaml_text, message):
    path = write(tmp_path, yaml_text)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: {message}$"):
        load_config(PipelineConfig, path)


@pytest.mark.parametrize("key, text, message", [
    ("pipeline_depth", "2.5", r"'pipeline_depth' expects int, got '2\.5'"),
    ("pipeline_depth", "", r"'pipeline_depth' expects int, got ''"),
    ("recompute", "yes", r"'recompute' expects bool, got 'yes'"),
    ("timeout_s", "soon", r"'timeout_s' expects float, got 'soon'"),
    ("micro_batches_per_update", "four", r"'micro_batches_per_update' expects int \| None, got 'four'"),
])
def test_wrong_type_in_overrides_names_key_and_type(key, text, message):
    with pytest.raises(ValueError, match=rf"^overrides: config key {message}$"):
        load_config(PipelineConfig, None, {key: text})


def test_yaml_must_be_a_mapping(tmp_path):
    for text in ("- method: wpipe\n", "wpipe\n", "3\n"):
        path = write(tmp_path, text)
        with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: expected a mapping of field: "
                                             r"value at the top level$"):
            load_config(PipelineConfig, path)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(FileNotFoundError, match=rf"config file {re.escape(str(path))} does not exist"):
        load_config(PipelineConfig, path)
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        load_config(PipelineConfig, tmp_path)   # a directory is not a config file


def test_validation_runs_on_the_merged_values(tmp_path):
    path = write(tmp_path, "method: wpipe\npipeline_depth: 2\n")
    with pytest.raises(ValueError, match=r"micro_batches_per_update must equal depth \(2\) for wpipe"):
        load_config(PipelineConfig, path, {"micro_batches_per_update": "3"})


def test_subclass_loads_its_own_and_inherited_fields(tmp_path):
    path = write(tmp_path, "lr: 0.5\nmodel: resnext\nlayers: [1, 2, 3]\nmethod: gpipe\npipeline_depth: 4\n")
    cfg = load_config(TrainConfig, path, {"seed": "42", "data_parallel": "2", "model": "bert"})
    assert isinstance(cfg, TrainConfig)
    assert (cfg.lr, cfg.model, cfg.layers, cfg.seed) == (0.5, "bert", [1, 2, 3], 42)
    assert (cfg.method, cfg.pipeline_depth, cfg.data_parallel) == ("gpipe", 4, 2)
    assert cfg.world_size == 8 and cfg.period == 4
    assert load_config(TrainConfig, None, {"layers": "5,6", "lr": "1e-3"}).layers == [5, 6]
    assert load_config(TrainConfig, None, {"lr": "1e-3"}).lr == 1e-3
    assert load_config(TrainConfig).layers == [3, 4] and load_config(TrainConfig).seed is None
    runtime = cfg.pipeline_fields()
    assert type(runtime) is PipelineConfig
    assert runtime == PipelineConfig(method="gpipe", pipeline_depth=4, data_parallel=2)
    with pytest.raises(ValueError, match=r"unknown config key 'lrr'; valid keys: backend, .*\blayers, .*\blr, "
                                         r"method, micro_batches_per_update, model, .*\bpipeline_depth"):
        load_config(TrainConfig, None, {"lrr": "1"})
    with pytest.raises(ValueError, match=r"config key 'layers' expects list\[int\], got \['a'\]"):
        load_config(TrainConfig, write(tmp_path, "layers: [a]\n"))
    with pytest.raises(ValueError, match=r"unknown method 'bogus'"):   # the runtime's checks still run
        load_config(TrainConfig, None, {"method": "bogus"})


# --------------------------------------------------------------------------- PipelineConfig

@pytest.mark.parametrize("kwargs, message", [
    (dict(method="wpipe2"), r"unknown method 'wpipe2': choose one of wpipe, pipedream_2bw, "
                            r"pipedream_flush, gpipe, data_parallel"),
    (dict(pipeline_depth=0), r"pipeline_depth must be an integer >= 1, got 0"),
    (dict(pipeline_depth=-1), r"pipeline_depth must be an integer >= 1, got -1"),
    (dict(pipeline_depth=2.0), r"pipeline_depth must be an integer >= 1, got 2\.0"),
    (dict(pipeline_depth=True), r"pipeline_depth must be an integer >= 1, got True"),
    (dict(data_parallel=0), r"data_parallel must be an integer >= 1, got 0"),
    (dict(method="data_parallel", pipeline_depth=2),
     r"pipeline_depth must be 1 for data_parallel \(got 2\): set data_parallel to the number of devices"),
    (dict(method="wpipe", pipeline_depth=2, micro_batches_per_update=4),
     r"micro_batches_per_update must equal depth \(2\) for wpipe .*got 4"),
    (dict(method="wpipe", pipeline_depth=3, micro_batches_per_update=1),
     r"micro_batches_per_update must equal depth \(3\) for wpipe .*got 1"),
    (dict(method="pipedream_2bw", pipeline_depth=4, micro_batches_per_update=3),
     r"micro_batches_per_update must be >= depth \(4\) for pipedream_2bw .*got 3"),
    (dict(method="gpipe", micro_batches_per_update=0),
     r"micro_batches_per_update must be an integer >= 1, got 0"),
    (dict(rank_layout="row_major"),
     r"rank_layout must be one of pipeline_major, replica_major, got 'row_major'"),
    (dict(backend="mpi"), r"backend must be gloo, nccl or null \(auto\), got 'mpi'"),
    (dict(timeout_s=0), r"timeout_s must be > 0 seconds, got 0"),
    (dict(timeout_s=-1.5), r"timeout_s must be > 0 seconds, got -1\.5"),
    (dict(timeout_s=float("nan")), r"timeout_s must be > 0 seconds, got nan"),
])
def test_validation_messages(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PipelineConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(method="data_parallel", pipeline_depth=1, data_parallel=8),
    dict(method="pipedream_2bw", pipeline_depth=4, micro_batches_per_update=8),
    dict(method="pipedream_flush", pipeline_depth=4, micro_batches_per_update=2),
    dict(method="gpipe", pipeline_depth=2, micro_batches_per_update=16, backend="gloo"),
    dict(method="wpipe", pipeline_depth=1, rank_layout="replica_major", backend="nccl", timeout_s=0.5),
])
def test_valid_configurations(kwargs):
    PipelineConfig(**kwargs)


@pytest.mark.parametrize("method, depth, period", [
    ("wpipe", 3, 3), ("pipedream_2bw", 3, 3), ("pipedream_flush", 3, 3), ("gpipe", 3, 3),
    ("wpipe", 1, 1), ("gpipe", 5, 5), ("data_parallel", 1, 1),
])
def test_period_defaults(method, depth, period):
    cfg = PipelineConfig(method=method, pipeline_depth=depth)
    assert cfg.micro_batches_per_update is None
    assert cfg.period == period


def test_explicit_period_and_world_size():
    cfg = PipelineConfig(method="pipedream_2bw", pipeline_depth=2, data_parallel=3,
                         micro_batches_per_update=5)
    assert cfg.period == 5 and cfg.world_size == 6
    assert PipelineConfig(method="gpipe", pipeline_depth=4, micro_batches_per_update=1).period == 1
    assert PipelineConfig(method="data_parallel", pipeline_depth=1, data_parallel=4,
                          micro_batches_per_update=3).period == 3


def test_rare_2bw_updates_warn():
    with pytest.warns(UserWarning, match=r"micro_batches_per_update = 9 is much larger than "
                                         r"pipeline_depth = 2: updates become rare"):
        PipelineConfig(method="pipedream_2bw", pipeline_depth=2, micro_batches_per_update=9)


def test_every_field_has_a_docstring():
    # style.md guideline 7: a one-line docstring under each field, with units.
    import ast
    import inspect

    import wpipe.config
    tree = ast.parse(inspect.getsource(wpipe.config))
    body = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "PipelineConfig").body
    documented = {a.target.id for a, d in zip(body, body[1:]) if isinstance(a, ast.AnnAssign)
                  and isinstance(d, ast.Expr) and isinstance(d.value, ast.Constant)}
    assert documented == {f.name for f in dataclasses.fields(PipelineConfig)}
