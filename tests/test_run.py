"""run.py end to end: real processes, a real SQLite MLflow store, real environments and simulators."""

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import yaml
from conftest import ROOT
from mlflow.tracking import MlflowClient

from backends import BACKENDS

#: Every registered backend x every gradient method it declares.
PAIRS = [(b.name, g) for b in BACKENDS for g in b.gradients]
TINY_DEFAULTS = {"algorithm": "dqn", "timeout_s": 120,
                 "model": {"n_qubits": 2, "n_layers": 1, "hidden_sizes": [8]},
                 "training": {"episodes": 2, "episodes_per_batch": 2, "dqn": {"batch_size": 8}}}


def run_py(tmp_path, config: dict | str, *args, env_extra=None, timeout=600):
    path = tmp_path / "sweep.yaml"
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    env.pop("MLFLOW_TRACKING_URI", None)
    script = ROOT / "tests" / "run_with_faults.py" if "QMLBENCH_INJECT_FAULT" in env else ROOT / "run.py"
    return subprocess.run([sys.executable, str(script), "-c", str(path), *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=timeout, env=env)


def runs_by_name(tmp_path, experiment="e2e"):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return client, {r.info.run_name: r for r in runs}


def test_sweep_of_every_backend_and_gradient_pair(tmp_path):
    config = {"mlflow": {"experiment_name": "e2e"}, "defaults": TINY_DEFAULTS,
              "experiments": [{"name": f"{b}_{g}", "backend": b, "gradient": g} for b, g in PAIRS]
              + [{"name": "tc_reinforce", "backend": "tensorcircuit", "gradient": "backprop", "algorithm": "reinforce"}]}
    proc = run_py(tmp_path, config)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Sweep summary" in proc.stdout
    client, runs = runs_by_name(tmp_path)
    parents = [r for r in runs.values() if r.data.tags.get("kind") == "sweep"]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs.values() if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(PAIRS) + 1
    for child in children:
        tags, params, metrics = child.data.tags, child.data.params, child.data.metrics
        assert tags["status"] == "PASSED" and child.info.status == "FINISHED", (child.info.run_name, tags.get("error"))
        for key in ("task", "algorithm", "backend", "gradient", "version.torch", "version.pennylane",
                    "version.tensorcircuit-ng", "version.gymnasium", "version.mlflow"):
            assert key in tags
        assert tags["device"] == "cpu"  # auto -> cpu on a machine without cuda or mps
        assert params["training.episodes"] == "2" and params["backend"] == tags["backend"]
        assert "model.n_qubits" in params and "spsa.c" in params and "seed" in params
        for key in ("rollout/episode_return", "rollout/avg_return_10", "train/loss", "grad/norm", "grad/circuit_evals",
                    "time/episode_s", "time/env_steps_per_s", "final/avg_return_10", "time/wall_s"):
            assert key in metrics, (child.info.run_name, key)
        assert len(client.get_metric_history(child.info.run_id, "rollout/episode_return")) == 2
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"config.yaml", "learning_curve.png", "model"} <= artifacts
        if tags["backend"] != "classical":
            assert metrics["final/grad_circuit_evals"] > 0
    assert parent.data.tags["status"] == "PASSED"
    assert {"summary.md", "summary.csv", "comparison.png"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    summary = client.download_artifacts(parent.info.run_id, "summary.csv", str(tmp_path))
    assert open(summary).read().count("PASSED") == len(PAIRS) + 1


def test_timeouts_failures_and_the_sweep_goes_on(tmp_path):
    config = {"mlflow": {"experiment_name": "e2e"}, "defaults": {**TINY_DEFAULTS, "timeout_s": 6},
              "experiments": [
                  {"name": "hangs", "backend": "classical", "gradient": "backprop", "training": {"episodes": 50}},
                  {"name": "slow", "backend": "classical", "gradient": "backprop", "algorithm": "reinforce",
                   "training": {"episodes": 10_000_000}, "timeout_s": 5},
                  {"name": "raises", "backend": "classical", "gradient": "backprop", "training": {"episodes": 50}},
                  {"name": "fine", "backend": "classical", "gradient": "backprop"},
              ]}
    t0 = time.monotonic()
    proc = run_py(tmp_path, config, env_extra={"QMLBENCH_INJECT_FAULT": "hangs-seed0:hang,raises-seed0:raise"})
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    client, runs = runs_by_name(tmp_path)
    hang, slow, fail, fine = (runs[f"{n}-seed0"] for n in ("hangs", "slow", "raises", "fine"))
    for run, limit in ((hang, 6), (slow, 5)):
        assert run.data.tags["status"] == "TIMED_OUT" and run.info.status == "KILLED"
        assert limit <= run.data.metrics["time/wall_s"] <= limit + 5
        assert "rollout/episode_return" in run.data.metrics  # what it logged before the kill is kept
        assert "exceeded timeout_s" in run.data.tags["error"]
    assert len(client.get_metric_history(hang.info.run_id, "rollout/episode_return")) == 1  # blocked after episode 1
    assert fail.data.tags["status"] == "FAILED" and fail.info.status == "FAILED"
    assert fail.data.tags["error"] == "RuntimeError: injected failure in raises-seed0 at episode 1"
    tb_path = client.download_artifacts(fail.info.run_id, "traceback.txt", str(tmp_path))
    assert "Traceback" in open(tb_path).read()
    assert fine.data.tags["status"] == "PASSED"
    assert time.monotonic() - t0 < 120


def test_ctrl_c_marks_the_running_run_killed_and_prints_the_summary(tmp_path):
    config = {"mlflow": {"experiment_name": "e2e"}, "defaults": TINY_DEFAULTS,
              "experiments": [{"name": "long", "backend": "classical", "gradient": "backprop", "algorithm": "reinforce",
                               "training": {"episodes": 10_000_000}},
                              {"name": "never", "backend": "classical", "gradient": "backprop"}]}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), "-c", str(path)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until the first run is logging (read with sqlite3: an MLflow
        try:                            # client would race the sweep creating the store's tables)
            with contextlib.closing(sqlite3.connect(f"file:{tmp_path / 'mlflow.db'}?mode=ro", uri=True, timeout=10)) as db:
                logged = db.execute("SELECT COUNT(*) FROM metrics m JOIN runs r ON r.run_uuid = m.run_uuid "
                                    "WHERE r.name = 'long-seed0'").fetchone()[0]
        except sqlite3.Error:
            logged = 0
        if logged:
            time.sleep(2)
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out[-2000:] + err[-2000:]
    assert "Sweep summary" in out and "not started" in out
    _, runs = runs_by_name(tmp_path)
    assert runs["long-seed0"].data.tags["status"] == "KILLED"
    assert "never-seed0" not in runs
    parent = next(r for r in runs.values() if r.data.tags.get("kind") == "sweep")
    assert parent.data.tags["status"] == "KILLED"


@pytest.mark.parametrize("experiment,field", [
    ({"name": "x", "backend": "tensorcircuit", "gradient": "adjoint"}, "'gradient'"),
    ({"name": "x", "backend": "quantum", "gradient": "backprop"}, "'backend'"),
    ({"name": "x", "backend": "classical", "gradient": "backprop", "training": {"episodes": -1}}, "'training.episodes'"),
])
def test_invalid_config_exits_2_and_writes_nothing(tmp_path, experiment, field):
    proc = run_py(tmp_path, {"experiments": [{"name": "ok", "backend": "classical", "gradient": "backprop"}, experiment]})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0] and "experiments[1] (x)" in lines[0], proc.stderr
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "mlruns").exists()


def test_malformed_yaml_and_unknown_only_exit_2(tmp_path):
    proc = run_py(tmp_path, "experiments: [{name: a, backend: classical, gradient: backprop}\n")
    assert proc.returncode == 2 and "invalid YAML" in proc.stderr
    proc = run_py(tmp_path, {"experiments": [{"name": "a", "backend": "classical", "gradient": "backprop"}]}, "--only", "b")
    assert proc.returncode == 2 and "allowed: a" in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_unreachable_tracking_server_fails_fast(tmp_path):
    t0 = time.monotonic()
    proc = run_py(tmp_path, {"experiments": [{"name": "a", "backend": "classical", "gradient": "backprop"}]},
                  "--tracking-uri", "http://127.0.0.1:9")
    assert proc.returncode == 2 and "unreachable" in proc.stderr
    assert time.monotonic() - t0 < 30


def test_list_and_dry_run_touch_nothing(tmp_path):
    config = {"experiments": [{"name": "a", "backend": "classical", "gradient": "backprop", "seeds": [1, 2]}]}
    proc = run_py(tmp_path, config, "--list")
    assert proc.returncode == 0 and "a-seed1" in proc.stdout and "a-seed2" in proc.stdout
    proc = run_py(tmp_path, config, "--dry-run", "--set", "training.episodes=9")
    assert proc.returncode == 0 and "episodes: 9" in proc.stdout
    assert not (tmp_path / "mlflow.db").exists()
