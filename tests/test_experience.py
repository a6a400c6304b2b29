"""What a user sees: MLflow opens on the comparison, the terminal says where results went, the
command line answers mistakes in one line. Real run.py, real SQLite store."""

import json
import math
import os
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT
from mlflow.tracking import MlflowClient

from config_schema import ConfigError, applicable_fields, load_config

TINY = {"algorithm": "dqn", "timeout_s": 120, "model": {"n_qubits": 2, "n_layers": 1, "hidden_sizes": [8]},
        "training": {"episodes": 3, "dqn": {"batch_size": 8, "buffer_size": 100}}}


def run_py(tmp_path, experiments, *args, defaults=TINY):
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"mlflow": {"experiment_name": "ux"}, "defaults": defaults,
                                                         "experiments": experiments}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, str(ROOT / "run.py"), "-c", str(tmp_path / "sweep.yaml"), *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, env=env)


def test_a_sweep_in_mlflow_reads_as_model_training_with_notes_sources_and_short_headline_metrics(tmp_path, monkeypatch):
    proc = run_py(tmp_path, [{"name": "mlp", "backend": "classical", "gradient": "backprop"},
                             {"name": "tc", "backend": "tensorcircuit", "gradient": "backprop"},
                             {"name": "tc_spsa", "backend": "tensorcircuit", "gradient": "spsa"},
                             {"name": "pl_adjoint", "backend": "pennylane", "gradient": "adjoint"}])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("ux")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "one parent run per sweep" in exp.tags["mlflow.note.content"]
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    parent = next(r for r in runs.values() if r.data.tags.get("kind") == "sweep")
    note = parent.data.tags["mlflow.note.content"]
    assert "| run |" in note and "tensorcircuit: cheapest" in note and "classical: cheapest mlp-seed0" in note
    for name in ("mlp-seed0", "tc-seed0", "tc_spsa-seed0", "pl_adjoint-seed0"):
        run = runs[name]
        tags, metrics = run.data.tags, run.data.metrics
        assert tags["mlflow.source.name"].endswith("run.py") and tags["mlflow.source.type"] == "LOCAL"
        assert "seed 0" in tags["mlflow.note.content"] and tags["backend"] in tags["mlflow.note.content"]
        summary = json.loads(tags["summary"])  # valid JSON: NaN is null
        assert summary["score"] == metrics["final/avg_return_10"] and summary["steps_done"] == metrics["final/episodes"]
        assert summary["columns"] == {}  # CartPole has no columns beyond its score
        for key in ("final/return", "final/wall_s", "final/avg_return_10", "final/env_steps"):
            history = client.get_metric_history(run.info.run_id, key)
            assert [m.step for m in history] == [0], key  # one value per run, not a dot at the last episode
        assert metrics["final/return"] == metrics["final/avg_return_10"]
        assert metrics["final/wall_s"] == pytest.approx(metrics["time/wall_s"])
        assert ("final/circuit_evals" in metrics) == (tags["backend"] != "classical")
        if tags["backend"] != "classical":
            assert metrics["final/circuit_evals"] == metrics["final/total_circuit_evals"] > 0
    # The trained policies are MLflow models that load back and reproduce the saved weights' outputs.
    import mlflow
    import torch
    from conftest import experiment

    from models import build_model

    # mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI, which later tests' sweeps would inherit
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)
    obs = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(3, 4)
    for name, backend, gradient in (("mlp-seed0", "classical", "backprop"), ("tc-seed0", "tensorcircuit", "backprop"),
                                    ("pl_adjoint-seed0", "pennylane", "adjoint")):
        loaded = mlflow.pytorch.load_model(f"runs:/{runs[name].info.run_id}/policy")
        weights = torch.load(client.download_artifacts(runs[name].info.run_id, "model/weights.pt", str(tmp_path)),
                             weights_only=True)
        rebuilt = build_model(experiment(**{**TINY, "backend": backend, "gradient": gradient}), 4, 2, 0)
        rebuilt.load_state_dict(weights)
        assert torch.allclose(loaded(obs), rebuilt(obs), atol=1e-12, rtol=0), name
    assert {m.name for m in mlflow.search_logged_models(experiment_ids=[exp.experiment_id], output_format="list")} == {"policy"}
    # Worker output never reaches the terminal: it is the run's artifact.
    assert "optax" not in proc.stdout + proc.stderr
    for name in ("tc-seed0", "tc_spsa-seed0"):
        artifacts = {a.path for a in client.list_artifacts(runs[name].info.run_id)}
        assert "worker_output.txt" not in artifacts or "Traceback" not in open(
            client.download_artifacts(runs[name].info.run_id, "worker_output.txt", str(tmp_path))).read()
    # The terminal says where the results are and how to open them.
    assert f"sweep run {parent.info.run_id}" in proc.stdout
    assert f"mlflow ui --backend-store-uri sqlite:///mlflow.db   then http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs/" \
           f"{parent.info.run_id}?workflowType=machine_learning" in proc.stdout
    assert "s_per_step" in proc.stdout and "evals_per_step" in proc.stdout


def test_a_failed_run_is_named_with_its_error_and_where_its_traceback_is(tmp_path):
    proc = run_py(tmp_path, [{"name": "ok", "backend": "classical", "gradient": "backprop"},
                             {"name": "bad", "backend": "pennylane", "gradient": "backprop",
                              "pennylane": {"device": "default.qubit"}, "device": "cuda"}])
    assert proc.returncode == 1
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("ux").experiment_id])}
    bad = runs["bad-seed0"]
    assert bad.data.tags["status"] == "FAILED"
    line = next(line for line in proc.stdout.splitlines() if line.strip().startswith("bad-seed0 FAILED"))
    assert f"mlflow artifacts download -r {bad.info.run_id} -a traceback.txt" in line and "cuda" in line
    parent = next(r for r in runs.values() if r.data.tags.get("kind") == "sweep")
    assert "bad-seed0 FAILED" in parent.data.tags["mlflow.note.content"]


def test_the_comparison_figure_has_cost_panels_and_markers():
    from types import SimpleNamespace

    from conftest import experiment

    from sweep.plan import RunOutcome, RunSpec
    from sweep.report import comparison_figure

    class Client:
        def get_metric_history(self, run_id, key):
            return [SimpleNamespace(step=0, value=20.6)]

    outcomes = [RunOutcome(RunSpec(experiment(name=n, backend=b, gradient="backprop"), 0), "PASSED", w, steps_done=5,
                           total_circuit_evals=e, run_id=n) for n, b, w, e in
                (("a", "classical", 1.0, None), ("b", "tensorcircuit", 2.0, 500), ("c", "pennylane", 4.0, 500))]
    fig = comparison_figure(Client(), outcomes)
    progress, seconds, circuits = fig.axes
    assert all(line.get_marker() == "o" for line in progress.lines) and len(progress.lines) == 3
    assert "identical in every run" in progress.get_title()
    assert [p.get_width() for p in seconds.patches] == [0.2, 0.4, 0.8]
    assert [p.get_width() for p in circuits.patches] == [0.0, 100.0, 100.0]


def test_only_accepts_run_names_and_suggests_close_ones(tmp_path):
    raw = {"experiments": [{"name": "tc_backprop", "backend": "tensorcircuit", "gradient": "backprop", "seeds": [0, 1, 2]},
                           {"name": "pl_backprop", "backend": "pennylane", "gradient": "backprop"}]}
    cfg = load_config(raw=raw, only=["tc_backprop-seed1", "tc_backprop-seed2"])
    assert [(e.name, e.seed_list) for e in cfg.experiments] == [("tc_backprop", [1, 2])]
    cfg = load_config(raw=raw, only=["tc_backprop-seed1", "tc_backprop"])
    assert cfg.experiments[0].seed_list == [0, 1, 2]
    with pytest.raises(ConfigError) as info:
        load_config(raw=raw, only=["tc_backprp"])
    assert len(info.value.lines) == 1
    assert info.value.lines[0].startswith("--only 'tc_backprp': no such experiment or run; did you mean tc_backprop, ")


def test_set_errors_are_reported_once_against_the_command_line(tmp_path):
    raw = {"experiments": [{"name": f"e{i}", "backend": "classical", "gradient": "backprop"} for i in range(10)]}
    with pytest.raises(ConfigError) as info:
        load_config(raw=raw, overrides=["training.episodes=abc"])
    assert info.value.lines == ["--set 'training.episodes=abc': field 'training.episodes': Input should be a valid integer "
                                "(got 'abc')"]
    with pytest.raises(ConfigError) as info:
        load_config(raw=raw, overrides=["meta.iterations=20"])
    assert info.value.lines == ["--set 'meta.iterations=20': meta.* applies to task qubit_meta / qubit_pulse, and no experiment of "
                                "<memory> has that task"]
    qubit = {"experiments": [{"name": "q", "task": "qubit_meta", "backend": "classical", "gradient": "backprop"}]}
    with pytest.raises(ConfigError, match="training.* applies to task cartpole"):
        load_config(raw=qubit, overrides=["training.episodes=3"])


@pytest.mark.parametrize("fields,absent,present", [
    ({"backend": "classical", "gradient": "backprop", "algorithm": "reinforce"},
     ["meta", "pennylane", "tensorcircuit", "spsa", "finite_diff", "training.dqn", "model.n_qubits"],
     ["training", "model.hidden_sizes"]),
    ({"backend": "tensorcircuit", "gradient": "spsa", "algorithm": "dqn"},
     ["meta", "pennylane", "finite_diff", "model.hidden_sizes"], ["spsa", "tensorcircuit", "training.dqn", "model.n_qubits"]),
    ({"backend": "pennylane", "gradient": "finite-diff", "task": "qubit_meta", "algorithm": "fomaml"},
     ["training", "tensorcircuit", "spsa"], ["meta", "pennylane", "finite_diff"]),
])
def test_dry_run_shows_only_what_applies(fields, absent, present):
    from conftest import experiment

    data = applicable_fields(experiment(**fields))

    def has(path):
        node = data
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    assert not any(has(p) for p in absent), [p for p in absent if has(p)]
    assert all(has(p) for p in present), [p for p in present if not has(p)]


def test_headline_names_cheapest_and_best_per_backend_and_every_failure():
    from conftest import experiment

    from sweep.plan import RunOutcome, RunSpec
    from sweep.report import failure_lines, headline

    def outcome(name, backend, status, wall, ret, evals=None, error=None):
        return RunOutcome(RunSpec(experiment(name=name, backend=backend, gradient="backprop" if backend != "tensorcircuit"
                                             else "spsa"), 0), status, wall, score=ret, steps_done=10,
                          total_circuit_evals=evals, error=error)

    outcomes = [outcome("a", "tensorcircuit", "PASSED", 10.0, 100.0, 1000), outcome("b", "tensorcircuit", "PASSED", 5.0, 50.0, 2000),
                      outcome("c", "classical", "PASSED", 1.0, 200.0), outcome("d", "pennylane", "FAILED", 3.0, math.nan, error="boom")]
    assert failure_lines(outcomes) == ["d-seed0 FAILED: boom"]
    assert headline(outcomes) == ["tensorcircuit: cheapest b-seed0 (0.5 s per step, 200 circuits per step); best a-seed0 (mean return 100)",
                     "classical: cheapest c-seed0 (0.1 s per step); best c-seed0 (mean return 200)"]


def test_system_metrics_behind_a_flag(tmp_path):
    long = {"name": "mlp", "backend": "classical", "gradient": "backprop", "algorithm": "reinforce",
            "training": {"episodes": 60, "episodes_per_batch": 5}}
    proc = run_py(tmp_path, [long], "--system-metrics")
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("ux").experiment_id])}
    metrics = runs["mlp-seed0"].data.metrics
    assert metrics["system/cpu_utilization_percentage"] >= 0 and metrics["system/system_memory_usage_megabytes"] > 0
    proc = run_py(tmp_path, [{**long, "name": "plain"}])
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("ux").experiment_id])}
    assert not any(k.startswith("system/") for k in runs["plain-seed0"].data.metrics)
