"""Config loading: defaults merge, overrides, and one clear line per problem."""

import pytest

from config_schema import ConfigError, deep_merge, load_config


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


GOOD = """
mlflow: {experiment_name: x}
defaults:
  algorithm: dqn
  training: {episodes: 3, dqn: {batch_size: 8}}
experiments:
  - {name: a, backend: classical, gradient: backprop}
  - {name: b, backend: pennylane, gradient: adjoint, training: {episodes: 7}, seeds: [1, 2]}
"""


def test_defaults_merge_deeply_and_experiment_wins(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    a, b = cfg.experiments
    assert a.algorithm == b.algorithm == "dqn"
    assert a.training.episodes == 3 and b.training.episodes == 7
    assert b.training.dqn.batch_size == 8  # merged, not replaced
    assert a.seed_list == [0] and b.seed_list == [1, 2]
    assert cfg.mlflow.experiment_name == "x"


def test_set_overrides_and_only(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), overrides=["training.episodes=500", "pennylane.device=default.qubit",
                                                          "mlflow.experiment_name=y"], only=["b"])
    assert [e.name for e in cfg.experiments] == ["b"]
    assert cfg.experiments[0].training.episodes == 500
    assert cfg.experiments[0].pennylane.device == "default.qubit"
    assert cfg.mlflow.experiment_name == "y"


def test_deep_merge_does_not_mutate():
    base = {"a": {"b": 1, "c": 2}}
    out = deep_merge(base, {"a": {"b": 3}})
    assert out == {"a": {"b": 3, "c": 2}} and base == {"a": {"b": 1, "c": 2}}


def errors(tmp_path, text, **kw):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), **kw)
    return info.value.lines


@pytest.mark.parametrize("experiment,expected", [
    ("{name: e, backend: torch, gradient: backprop}", ["experiments[0] (e)", "'backend'", "allowed: classical, pennylane, tensorcircuit"]),
    ("{name: e, backend: tensorcircuit, gradient: adjoint}", ["(e)", "'gradient'", "allowed: backprop, parameter-shift, spsa, finite-diff"]),
    ("{name: e, backend: classical, gradient: parameter-shift}", ["'gradient'", "allowed: backprop, spsa, finite-diff"]),
    ("{name: e, backend: classical, gradient: adjoint}", ["'gradient'", "backend 'classical'"]),
    ("{name: e, backend: pennylane, gradient: backprop, pennylane: {device: lightning.qubit}}", ["'pennylane.device'", "allowed with backprop"]),
    ("{name: e, backend: pennylane, gradient: backprop, training: {episodes: -3}}", ["'training.episodes'", "greater than or equal to 1", "-3"]),
    ("{name: e, backend: pennylane, gradient: backprop, training: {episodes: '5'}}", ["'training.episodes'", "integer"]),
    ("{name: e, backend: pennylane, gradient: backprop, epochs: 3}", ["unknown field 'epochs'"]),
    ("{name: e, backend: pennylane, gradient: backprop, model: {n_qbits: 3}}", ["unknown field 'model.n_qbits'"]),
    ("{name: e, backend: pennylane, gradient: backprop, seed: 1, seeds: [2]}", ["'seed' and 'seeds'"]),
    ("{name: e, backend: pennylane, gradient: spsa, spsa: {c: 0}}", ["'spsa.c'"]),
    ("{name: e, backend: pennylane, gradient: backprop, model: {observables: [Z0, X1]}}", ["'model.observables'", "Pauli-Z"]),
    ("{name: e, backend: pennylane, gradient: backprop, model: {n_qubits: 2, observables: [Z0, Z5]}}", ["'model.observables'", "0..1"]),
    ("{name: e, backend: pennylane, gradient: backprop, device: tpu}", ["'device'", "'auto', 'cpu', 'cuda' or 'mps'"]),
    ("{name: 'bad name', backend: pennylane, gradient: backprop}", ["'name'"]),
])
def test_invalid_experiment_gives_one_line_naming_field(tmp_path, experiment, expected):
    lines = errors(tmp_path, f"experiments:\n  - {experiment}\n")
    assert len(lines) == 1, lines
    for text in expected:
        assert text in lines[0], lines[0]


def test_every_problem_is_reported(tmp_path):
    lines = errors(tmp_path, """
experiments:
  - {name: a, backend: torch, gradient: backprop}
  - {name: b, backend: classical, gradient: adjoint}
  - {name: a, backend: classical, gradient: backprop}
  - {name: a, backend: classical, gradient: spsa}
""")
    assert len(lines) == 3
    assert "experiments[0] (a)" in lines[0] and "experiments[1] (b)" in lines[1]
    assert "used by experiments[2]" in lines[2]


@pytest.mark.parametrize("text,expected", [
    ("", "empty"),
    ("- 1\n- 2\n", "top level must be a mapping"),
    ("experiments: []\n", "non-empty list"),
    ("experiments: [{name: a, backend: classical, gradient: backprop}]\nextra: 1\n", "unknown top-level field 'extra'"),
    ("experiments: [{name: a, backend: classical, gradient: backprop, name: b}]\n", "duplicate key 'name'"),
    ("experiments: [{name: a\n", "invalid YAML"),
    ("experiments: !!python/object:os.system [ls]\n", "invalid YAML"),
    ("experiments: [7]\n", "must be a mapping"),
    ("mlflow: {tracking_url: x}\nexperiments: [{name: a, backend: classical, gradient: backprop}]\n", "unknown field 'tracking_url'"),
])
def test_malformed_files(tmp_path, text, expected):
    lines = errors(tmp_path, text)
    assert any(expected in line for line in lines), lines


def test_non_utf8_and_missing_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"experiments: \xff\xfe\n")
    with pytest.raises(ConfigError, match="UTF-8"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_only_and_set_errors(tmp_path):
    assert "no such experiment or run; allowed: a, b" in errors(tmp_path, GOOD, only=["zz"])[0]
    assert "dotted.key=value" in errors(tmp_path, GOOD, overrides=["training.episodes"])[0]
    assert "'training.episodes'" in errors(tmp_path, GOOD, overrides=["training.episodes=-1"])[0]


def test_shipped_configs_are_valid():
    from conftest import ROOT

    for path in [ROOT / "config.yaml", *sorted((ROOT / "configs").glob("*.yaml"))]:
        cfg = load_config(path)
        assert cfg.experiments, path
