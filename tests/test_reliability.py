"""Reliable sweeps: parallel jobs on one SQLite store, SIGKILL then --resume, NaN, a live MLflow server."""

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import pytest
import yaml
from conftest import ROOT, experiment
from mlflow.tracking import MlflowClient

from train import train

FAST = {"algorithm": "dqn", "backend": "classical", "gradient": "backprop",
        "model": {"hidden_sizes": [8]}, "training": {"episodes": 40, "dqn": {"batch_size": 8, "buffer_size": 200}}}


def write_config(tmp_path, experiments, defaults=FAST, name="rel"):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"mlflow": {"experiment_name": name}, "defaults": defaults, "experiments": experiments}))
    return path


def env_for(**extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def run_py(tmp_path, *args, env=None, timeout=600):
    env = env or env_for()
    script = ROOT / "tests" / "run_with_faults.py" if "QMLBENCH_INJECT_FAULT" in env else ROOT / "run.py"
    return subprocess.run([sys.executable, str(script), "-c", str(tmp_path / "sweep.yaml"), *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=timeout, env=env)


def children(tmp_path, name="rel", uri=None):
    client = MlflowClient(uri or f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id], max_results=1000)
    return client, [r for r in runs if r.data.tags.get("kind") != "sweep"]


def test_parallel_jobs_log_every_metric_and_keep_time_limits(tmp_path):
    experiments = [{"name": f"r{i}", "seeds": [0, 1]} for i in range(3)] + [{"name": "hangs", "timeout_s": 10}]
    write_config(tmp_path, experiments)
    t0 = time.monotonic()
    proc = run_py(tmp_path, "--jobs", "3", env=env_for(QMLBENCH_INJECT_FAULT="hangs-seed0:hang"))
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    client, runs = children(tmp_path)
    by_name = {r.info.run_name: r for r in runs}
    assert len(runs) == 7 and by_name["hangs-seed0"].data.tags["status"] == "TIMED_OUT"
    assert by_name["hangs-seed0"].data.metrics["time/wall_s"] < 10 + 5
    for run in runs:
        if run.info.run_name == "hangs-seed0":
            continue
        assert run.data.tags["status"] == "PASSED", run.data.tags.get("error")
        for key in ("rollout/episode_return", "rollout/avg_return_10", "time/episode_s"):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert sorted(steps) == list(range(40)), (run.info.run_name, key)  # every episode exactly once
        assert "time/mlflow_lock_retries" in run.data.metrics
    assert time.monotonic() - t0 < 150


def wait_for(predicate, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception:  # noqa: BLE001 - the store may be mid-creation
            value = None
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_sigkill_of_the_sweep_then_resume_continues_from_the_checkpoint(tmp_path):
    long_run = {"name": "long", "algorithm": "reinforce", "training": {"episodes": 300, "episodes_per_batch": 5,
                                                                       "checkpoint_every": 25, "gamma": 0.99}}
    write_config(tmp_path, [long_run, {"name": "after", "training": {"episodes": 3}}])
    sweep = subprocess.Popen([sys.executable, str(ROOT / "run.py"), "-c", str(tmp_path / "sweep.yaml")], cwd=tmp_path,
                             env=env_for(), stdout=(tmp_path / "sweep.log").open("w"), stderr=subprocess.STDOUT)

    def checkpointed_long_run():  # read with sqlite3: an MLflow client would race the sweep creating the tables
        with contextlib.closing(sqlite3.connect(f"file:{tmp_path / 'mlflow.db'}?mode=ro", uri=True, timeout=10)) as db:
            row = db.execute("SELECT run_uuid, value FROM tags WHERE key = 'checkpoint_episode'").fetchone()
        return row[0] if row and int(row[1]) >= 50 else None

    run_id = wait_for(checkpointed_long_run, 180, "a checkpoint of the long run")  # generous: a loaded machine
    sweep.send_signal(signal.SIGKILL)
    sweep.wait(10)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    time.sleep(2)
    count = len(client.get_metric_history(run_id, "rollout/episode_return"))
    time.sleep(3)  # the worker died with the sweep: nothing more is logged
    assert len(client.get_metric_history(run_id, "rollout/episode_return")) == count < 300
    assert client.get_run(run_id).data.tags["status"] == "RUNNING"

    proc = run_py(tmp_path, "--resume")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Marked KILLED 2 run(s)" in proc.stdout  # the long run and its sweep
    client, runs = children(tmp_path)
    assert sorted(r.info.run_name for r in runs) == ["after-seed0", "long-seed0"]  # resumed in the same run
    resumed = client.get_run(run_id)
    assert resumed.data.tags["status"] == "PASSED" and int(resumed.data.tags["resumed_from_episode"]) >= 50
    history = sorted(client.get_metric_history(run_id, "rollout/episode_return"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(300))  # steps continue; nothing logged twice
    exp = experiment(**{**FAST, **long_run, "training": {**FAST["training"], **long_run["training"]}})
    uninterrupted = train(exp, 0)
    assert [m.value for m in history] == uninterrupted.episode_returns

    again = run_py(tmp_path, "--resume")
    assert again.returncode == 0 and "2 run(s) had PASSED earlier" in again.stdout
    assert len(children(tmp_path)[1]) == 2


def test_nan_ends_the_run_failed_with_the_episode(tmp_path):
    write_config(tmp_path, [{"name": "n"}, {"name": "fine", "training": {"episodes": 3}}])
    proc = run_py(tmp_path, env=env_for(QMLBENCH_INJECT_FAULT="n-seed0:nan"))
    assert proc.returncode == 1
    _, runs = children(tmp_path)
    by_name = {r.info.run_name: r for r in runs}
    assert by_name["n-seed0"].data.tags["status"] == "FAILED"
    assert by_name["n-seed0"].data.tags["error"] == "NonFiniteError: non-finite loss at episode 1"
    assert by_name["fine-seed0"].data.tags["status"] == "PASSED"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--artifacts-destination", str(tmp_path / "artifacts")],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        import urllib.request

        wait_for(lambda: urllib.request.urlopen(f"{uri}/health", timeout=1).status == 200, 90, "mlflow server")
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def test_sweep_logs_to_a_live_mlflow_server(tmp_path, mlflow_server):
    write_config(tmp_path, [{"name": "c", "training": {"episodes": 3}},
                            {"name": "q", "backend": "tensorcircuit", "model": {"n_qubits": 2, "n_layers": 1},
                             "training": {"episodes": 3}}])
    proc = run_py(tmp_path, "--tracking-uri", mlflow_server, "--jobs", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not (tmp_path / "mlflow.db").exists()
    client, runs = children(tmp_path, uri=mlflow_server)
    assert sorted(r.info.run_name for r in runs) == ["c-seed0", "q-seed0"]
    for run in runs:
        assert run.data.tags["status"] == "PASSED"
        assert len(client.get_metric_history(run.info.run_id, "rollout/episode_return")) == 3
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.yaml", "learning_curve.png", "model"}
