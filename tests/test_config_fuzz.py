"""Hostile and malformed config input never gives a traceback: exit 2 and one line per problem."""

import contextlib
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import run
from config_schema import (
    MAX_EXPANDED_VALUES,
    MAX_YAML_ALIASES,
    MAX_YAML_DEPTH,
    ConfigError,
    SweepConfig,
    expanded_size,
    load_config,
    safe_yaml_load,
)

ROOT = Path(__file__).resolve().parent.parent
FIELDS = ["name", "task", "algorithm", "backend", "gradient", "seed", "seeds", "timeout_s", "device", "model", "training",
          "spsa", "finite_diff", "pennylane", "tensorcircuit", "meta", "episodes", "n_qubits", "n_layers", "lr", "dqn",
          "noise", "ranges", "observables", "hidden_sizes", "batch_size", "buffer_size", "weights", "c", "step"]
VALID = {"name": "a", "backend": "classical", "gradient": "backprop", "training": {"episodes": 2}}

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.sampled_from(["classical", "pennylane", "tensorcircuit", "adjoint", "spsa", "dqn", "maml", "qubit_meta", "auto"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=8)), inner, max_size=5)),
    max_leaves=20)


def check_outcome(load):
    """``load()`` validates or raises ConfigError with single-line messages; nothing else escapes."""
    try:
        cfg = load()
    except ConfigError as exc:
        assert exc.lines and all(line and "\n" not in line for line in exc.lines), exc.lines
        return None
    assert isinstance(cfg, SweepConfig) and cfg.experiments
    return cfg


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000))
def test_arbitrary_bytes(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "config.yaml"
    path.write_bytes(data)
    check_outcome(lambda: load_config(path))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["mlflow", "defaults", "experiments", "other"]), values, max_size=4))
def test_arbitrary_structures(raw):
    check_outcome(lambda: load_config(raw=raw))


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(sorted(VALID) + ["training.episodes", "training.lr", "seed", "seeds", "timeout_s", "model.n_qubits",
                                        "model", "spsa.c", "training.dqn.batch_size", "meta"]), values)
def test_one_field_of_a_valid_config_replaced(field, value):
    experiment = yaml.safe_load(yaml.safe_dump(VALID))
    *parents, leaf = field.split(".")
    node = experiment
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    check_outcome(lambda: load_config(raw={"experiments": [experiment]}))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=500) | st.text(max_size=500).map(str.encode))
def test_cli_exit_code_and_single_line_errors(tmp_path, data):
    path = tmp_path / "c.yaml"
    path.write_bytes(data)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = run.main(["-c", str(path), "--dry-run"])
    assert code in (0, 2)
    if code == 2:
        lines = err.getvalue().splitlines()
        assert 1 <= len(lines) <= run.MAX_ERROR_LINES + 1 and all(line.startswith("error: ") for line in lines)


HOSTILE = {
    "empty": b"",
    "python_object_tag": b"experiments: !!python/object/apply:os.system ['echo pwned']\n",
    "non_utf8": b"experiments:\n  - {name: \xff\xfe, backend: classical, gradient: backprop}\n",
    "ten_megabytes": b"experiments:\n" + b"  - {name: a, backend: classical, gradient: backprop}\n" * 200_000,
    "duplicate_key": b"experiments:\n  - {name: a, backend: classical, backend: pennylane, gradient: backprop}\n",
    "huge_number": b"experiments:\n  - {name: a, backend: classical, gradient: backprop, training: {episodes: 99999999999999999999}}\n",
    "negative_count": b"experiments:\n  - {name: a, backend: classical, gradient: backprop, training: {episodes: -5}}\n",
    "unknown_enum": b"experiments:\n  - {name: a, backend: qiskit, gradient: backprop}\n",
    "infinite_lr": b"experiments:\n  - {name: a, backend: classical, gradient: backprop, training: {lr: {weights: .inf}}}\n",
    "billion_laughs": b"".join([b"defaults: {x: &a0 [1]}\nexperiments: [{name: a, backend: classical, gradient: backprop, model: {observables: ["]
                                + [b"*a0, " * 101] + [b"]}}]\n"]),
    "not_a_mapping": b"- 1\n- 2\n",
    # nine levels of mappings, each holding nine aliases of the level below: 839 bytes, 9^8 values expanded
    "merge_bomb": ("defaults:\n  x0: &l0 {a: 1}\n" + "".join(
        f"  x{lvl}: &l{lvl} {{{', '.join(f'k{i}: *l{lvl - 1}' for i in range(9))}}}\n" for lvl in range(1, 9))
        + "experiments: [{name: a, backend: classical, gradient: backprop, meta: {noise: {ranges: *l8}}}]\n").encode(),
    "deep_flow_lists": b"experiments: " + b"[" * 200_000 + b"]" * 200_000 + b"\n",
    "deep_flow_mappings": b"experiments: " + b"{a: " * 50_000 + b"1" + b"}" * 50_000 + b"\n",
    "deep_block_mapping": b"experiments:\n" + b"".join(b" " * (i + 1) + b"k:\n" for i in range(1200)) + b" " * 1201 + b"v\n",
    "name_with_newline": b'experiments:\n  - {name: "a\\nb", backend: classical, gradient: backprop}\n',
    "observable_with_newline": b'experiments:\n  - {name: a, backend: pennylane, gradient: backprop, model: {observables: ["Z0\\n", "Z1"]}}\n',
    "huge_hidden_layer": b"experiments:\n  - {name: a, backend: classical, gradient: backprop, model: {hidden_sizes: [100000000000]}}\n",
    "inverted_noise_range": b"experiments:\n  - {name: a, task: qubit_meta, backend: classical, gradient: backprop, "
                            b"meta: {noise: {ranges: {alpha: [0.5, 2], A: [1, 0], omega_c: [0.1, 10]}}}}\n",
    "vanishing_noise_range": b"experiments:\n  - {name: a, task: qubit_meta, backend: classical, gradient: backprop, "
                             b"meta: {noise: {ranges: {alpha: [0.5, 2], A: [1.0e-200, 1.0e-200], omega_c: [0.1, 10]}}}}\n",
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_files_through_the_command_line(tmp_path, case):
    path = tmp_path / f"{case}.yaml"
    path.write_bytes(HOSTILE[case])
    assert len(HOSTILE[case]) <= 1_000_000 or case == "ten_megabytes"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "-c", str(path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}") and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "pwned").exists()
    assert time.monotonic() - t0 < 30  # refused in seconds (the merge bomb took minutes and GBs before)


ALIAS_BOMB = "[&l0 [0, 0, 0, 0, 0, 0, 0, 0, 0], " + ", ".join(f"&l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 7)) + "]"


@pytest.mark.parametrize("expected,text", [
    ("nested more than 40 levels deep", "seeds=" + "[" * 50_000 + "]" * 50_000),
    ("expand it to more than 100000 values", "model.observables=" + ALIAS_BOMB),
])
def test_hostile_overrides_are_one_short_line(expected, text):
    with pytest.raises(ConfigError) as info:
        load_config(raw={"experiments": [VALID]}, overrides=[text])
    assert len(info.value.lines) == 1 and len(info.value.lines[0]) < 300 and expected in info.value.lines[0], info.value.lines


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(fifo)


def test_merge_keys_work_and_explicit_keys_win():
    text = ("defaults: {}\nbase: &base {backend: classical, gradient: backprop, training: {episodes: 2}}\n"
            "experiments:\n  - {<<: *base, name: y}\n  - {<<: *base, name: z, gradient: spsa}\n")
    raw = safe_yaml_load(text)
    raw.pop("base")
    cfg = load_config(raw=raw)
    assert [(e.name, e.gradient, e.training.episodes) for e in cfg.experiments] == [("y", "backprop", 2), ("z", "spsa", 2)]
    with pytest.raises(yaml.YAMLError, match="duplicate key"):
        safe_yaml_load("{<<: {a: 1}, b: 2, b: 3}")


nested = st.recursive(st.integers(0, 9), lambda inner: st.one_of(st.lists(inner, min_size=1, max_size=2),
                                                                   st.dictionaries(st.sampled_from("ab"), inner, min_size=1)),
                      max_leaves=60)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5000), st.sampled_from(["[", "{a: "]))
def test_any_nesting_depth_is_accepted_or_refused_in_one_line(depth, opener):
    closer = "]" if opener == "[" else "}"
    text = "experiments: " + opener * depth + "1" + closer * depth + "\n"
    try:
        safe_yaml_load(text)
    except yaml.YAMLError as exc:
        assert depth > MAX_YAML_DEPTH - 2 and "nested more than" in str(exc)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 12), st.integers(2, 12))
def test_alias_fan_out_is_bounded_without_expanding_it(levels, fan_out):
    lines = ["l0: &l0 [1]"] + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * fan_out)}]" for i in range(1, levels + 1)]
    text = "\n".join(lines) + "\n"
    aliases = levels * fan_out
    t0 = time.monotonic()
    try:
        value = safe_yaml_load(text)
    except yaml.YAMLError as exc:
        assert aliases > MAX_YAML_ALIASES or expanded_size(yaml.load(text, Loader=yaml.SafeLoader)) > MAX_EXPANDED_VALUES, exc
    else:
        assert expanded_size(value) <= MAX_EXPANDED_VALUES
    assert time.monotonic() - t0 < 5
