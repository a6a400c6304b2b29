"""Hostile and malformed config input never gives a traceback: exit 2 and one line per problem."""

import contextlib
import io
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import run
from config_schema import ConfigError, SweepConfig, load_config

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
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_files_through_the_command_line(tmp_path, case):
    path = tmp_path / f"{case}.yaml"
    path.write_bytes(HOSTILE[case])
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "-c", str(path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}") and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "pwned").exists()
