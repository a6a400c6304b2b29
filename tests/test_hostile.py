"""The sweep survives signals, broken stores, full disks and parallel TensorCircuit workers.

Every test runs the real command line (run.py) on a real SQLite store. The processes a sweep
starts are found through a marker in their environment, which every descendant inherits. Full
disks and read-only files are real: a tmpfs or a read-only bind mount in a private mount
namespace (``unshare -m``; needs Linux and root, which CI has).
"""

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from mlflow.tracking import MlflowClient

TINY = {"algorithm": "dqn", "backend": "classical", "gradient": "backprop", "timeout_s": 120,
        "model": {"n_qubits": 2, "n_layers": 1, "hidden_sizes": [8]},
        "training": {"episodes": 3, "dqn": {"batch_size": 8, "buffer_size": 100}}}
LONG = {"name": "long", "algorithm": "reinforce", "training": {"episodes": 10_000_000, "checkpoint_every": None}}


def write_config(tmp_path: Path, experiments: list[dict], defaults: dict = TINY) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"mlflow": {"experiment_name": "hostile"}, "defaults": defaults, "experiments": experiments}))
    return path


def sweep_env(mark: str = "") -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QMLBENCH_TEST_MARK": mark or uuid.uuid4().hex}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def marked_processes(mark: str) -> list[int]:
    """Live processes (zombies have no environment) that carry the marker."""
    needle = f"QMLBENCH_TEST_MARK={mark}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def wait_until(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def episodes_logged(tmp_path: Path, run_name: str) -> int:
    """Read with sqlite3 read-only: an MLflow client would race the sweep creating its tables."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{tmp_path / 'mlflow.db'}?mode=ro", uri=True, timeout=10)) as db:
            return db.execute("SELECT COUNT(*) FROM metrics m JOIN runs r ON r.run_uuid = m.run_uuid "
                              "WHERE r.name = ? AND m.key = 'rollout/episode_return'", (run_name,)).fetchone()[0]
    except sqlite3.Error:
        return 0


def runs(tmp_path: Path) -> dict:
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    found = client.search_runs([client.get_experiment_by_name("hostile").experiment_id], max_results=1000)
    return {r.info.run_name if r.data.tags.get("kind") != "sweep" else "sweep": r for r in found}


def start_sweep(tmp_path: Path, mark: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "run.py"), "-c", str(tmp_path / "sweep.yaml"), *args],
                            cwd=tmp_path, env=sweep_env(mark), stdout=(tmp_path / "out.log").open("w"),
                            stderr=(tmp_path / "err.log").open("w"))


# ---------------------------------------------------------------------------------------------
# Signals and processes


def test_sigkill_of_the_sweep_leaves_no_process_and_nothing_logged_after(tmp_path):
    write_config(tmp_path, [LONG])
    mark = uuid.uuid4().hex
    sweep = start_sweep(tmp_path, mark)
    wait_until(lambda: episodes_logged(tmp_path, "long-seed0") >= 3, 120, "the run to log")
    assert len(marked_processes(mark)) >= 3  # the sweep, its forkserver and the worker
    sweep.kill()
    sweep.wait(10)
    wait_until(lambda: not marked_processes(mark), 5, "every process of the sweep to die")
    logged = episodes_logged(tmp_path, "long-seed0")
    time.sleep(2)
    assert episodes_logged(tmp_path, "long-seed0") == logged


def test_sigkill_while_the_forkserver_imports_leaves_no_process(tmp_path):
    write_config(tmp_path, [LONG])
    mark = uuid.uuid4().hex
    sweep = start_sweep(tmp_path, mark)
    wait_until(lambda: len(marked_processes(mark)) >= 2, 60, "the forkserver to start")  # still importing torch & co
    sweep.kill()
    sweep.wait(10)
    wait_until(lambda: not marked_processes(mark), 3, "the forkserver to die with the sweep")


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_sigterm_marks_the_running_run_and_the_sweep_killed(tmp_path, signum, code):
    write_config(tmp_path, [LONG, {"name": "never"}])
    mark = uuid.uuid4().hex
    sweep = start_sweep(tmp_path, mark)
    wait_until(lambda: episodes_logged(tmp_path, "long-seed0") >= 3, 120, "the run to log")
    sweep.send_signal(signum)
    assert sweep.wait(60) == code, (tmp_path / "err.log").read_text()[-2000:]
    wait_until(lambda: not marked_processes(mark), 5, "every process of the sweep to end")
    found = runs(tmp_path)
    assert found["long-seed0"].data.tags["status"] == "KILLED" and found["long-seed0"].info.status == "KILLED"
    assert signal.Signals(signum).name in found["long-seed0"].data.tags["error"]
    assert found["sweep"].data.tags["status"] == "KILLED" and found["sweep"].info.status == "KILLED"
    assert "never-seed0" not in found
    assert "not started" in (tmp_path / "out.log").read_text()


def test_a_normal_exit_leaves_no_forkserver_even_when_no_run_started(tmp_path):
    write_config(tmp_path, [{"name": "short"}])
    mark = uuid.uuid4().hex
    for args in ((), ("--resume",)):  # the second sweep only reuses the first's run: the forkserver is still importing
        proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "-c", str(tmp_path / "sweep.yaml"), *args],
                              cwd=tmp_path, env=sweep_env(mark), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert not marked_processes(mark)
    assert "1 run(s) had PASSED earlier" in proc.stdout


def test_the_fault_hook_is_not_reachable_from_production(tmp_path):
    write_config(tmp_path, [{"name": "r"}])
    env = {**sweep_env(), "QMLBENCH_INJECT_FAULT": "r-seed0:raise"}
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "-c", str(tmp_path / "sweep.yaml")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert runs(tmp_path)["r-seed0"].data.tags["status"] == "PASSED"


# ---------------------------------------------------------------------------------------------
# Stores the sweep cannot use: refused before anything starts


def run_cli(tmp_path: Path, *args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, str(ROOT / "run.py"), "-c", str(tmp_path / "sweep.yaml"), *args],
                          cwd=tmp_path, env=sweep_env(), capture_output=True, text=True, timeout=300)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


def test_a_corrupt_store_is_refused_and_left_as_it_was(tmp_path):
    write_config(tmp_path, [{"name": "a"}])
    junk = b"not a database at all " * 100
    (tmp_path / "mlflow.db").write_bytes(junk)
    line = one_error_line(run_cli(tmp_path))
    assert "not a usable SQLite database" in line and "mv mlflow.db mlflow.db.broken" in line
    assert (tmp_path / "mlflow.db").read_bytes() == junk


def test_a_foreign_sqlite_database_is_refused(tmp_path):
    write_config(tmp_path, [{"name": "a"}])
    with contextlib.closing(sqlite3.connect(tmp_path / "mlflow.db")) as db:
        db.execute("CREATE TABLE invoices (id INTEGER)")
        db.commit()
    assert "not an MLflow store" in one_error_line(run_cli(tmp_path))


def test_an_out_of_date_schema_is_refused_with_the_upgrade_command(tmp_path):
    write_config(tmp_path, [{"name": "a"}])
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    client.create_experiment("hostile")  # a real store of the installed MLflow, then made one revision older
    import mlflow
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory(str(Path(mlflow.__file__).parent / "store" / "db_migrations"))
    older = scripts.get_revision(scripts.get_current_head()).down_revision
    with contextlib.closing(sqlite3.connect(tmp_path / "mlflow.db")) as db:
        db.execute("UPDATE alembic_version SET version_num = ?", (older,))
        db.commit()
    line = one_error_line(run_cli(tmp_path))
    assert "out of date" in line and "mlflow db upgrade sqlite:///mlflow.db" in line
    with contextlib.closing(sqlite3.connect(tmp_path / "mlflow.db")) as db:
        db.execute("UPDATE alembic_version SET version_num = 'ffffffffffff'")
        db.commit()
    assert "another MLflow version" in one_error_line(run_cli(tmp_path))


def _unshare_works() -> bool:
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=16k tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


needs_mounts = pytest.mark.skipif(not _unshare_works(), reason="needs Linux, root and unshare -m with tmpfs (CI has them)")


def in_namespace(script: str) -> tuple[str, ...]:
    """A command prefix: ``script`` (mounts) runs in a private mount namespace, then the command."""
    return ("unshare", "-m", "sh", "-c", f'{script} && exec "$@"', "sh")


@needs_mounts
def test_a_read_only_store_file_is_refused(tmp_path):
    write_config(tmp_path, [{"name": "a"}])
    MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").create_experiment("hostile")
    db = tmp_path / "mlflow.db"
    line = one_error_line(run_cli(tmp_path, prefix=in_namespace(f"mount --bind {db} {db} && mount -o remount,bind,ro {db}")))
    assert "read-only" in line and "chmod" in line


@needs_mounts
def test_a_read_only_directory_is_refused_at_once(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    write_config(tmp_path, [{"name": "a"}])
    t0 = time.monotonic()
    proc = run_cli(tmp_path, "--tracking-uri", f"sqlite:///{store}/mlflow.db",
                   prefix=in_namespace(f"mount --bind {store} {store} && mount -o remount,bind,ro {store}"))
    assert "cannot create the store" in one_error_line(proc) and time.monotonic() - t0 < 30
    assert not (store / "mlflow.db").exists()


@needs_mounts
def test_a_full_disk_ends_every_run_and_the_sweep_with_a_status(tmp_path):
    """The artifact store (./mlruns beside a SQLite store) is a full 64 KB tmpfs; the SQLite store has room."""
    write_config(tmp_path, [{"name": "a"}, {"name": "b"}])
    artifacts = tmp_path / "mlruns"
    artifacts.mkdir()
    fill = f"mount -t tmpfs -o size=64k tmpfs {artifacts} && (dd if=/dev/zero of={artifacts}/fill bs=4k 2>/dev/null || true)"
    proc = run_cli(tmp_path, prefix=in_namespace(fill))
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if " INFO mlflow." not in line]  # MLflow creating its tables
    assert len(lines) == 1 and lines[0].startswith("error: the tracking store failed") and "No space left" in lines[0], lines
    assert "Traceback" not in proc.stderr + proc.stdout
    found = runs(tmp_path)
    assert set(found) == {"a-seed0", "b-seed0", "sweep"}
    for name, run in found.items():
        assert run.info.status == "FAILED" and run.data.tags["status"] == "FAILED", name
    assert "No space left" in found["a-seed0"].data.tags["error"]


# ---------------------------------------------------------------------------------------------
# TensorCircuit in parallel workers


def test_tensorcircuit_never_switches_backends_on_a_traced_path(monkeypatch):
    import tensorcircuit as tc
    import torch
    from conftest import experiment

    from models import build_model

    model = build_model(experiment(backend="tensorcircuit", gradient="backprop", model={"n_qubits": 2, "n_layers": 1}), 4, 2, 0)
    model(torch.zeros(1, 4, dtype=torch.float64))

    def forbidden(*args, **kwargs):
        raise AssertionError("TensorCircuit backend switched on the hot path (it walks sys.modules)")

    for name in ("set_backend", "set_dtype", "runtime_backend"):
        monkeypatch.setattr(tc, name, forbidden)
    obs = torch.randn(37, 4, dtype=torch.float64, requires_grad=True)  # new shapes: traced and compiled now
    model(obs).sum().backward()
    model(torch.randn(3, 4, dtype=torch.float64))


def test_tensorcircuit_pairs_many_times_in_parallel_workers(tmp_path):
    pairs = [("backprop", "dqn"), ("parameter-shift", "dqn"), ("spsa", "dqn"), ("finite-diff", "dqn"), ("backprop", "reinforce")]
    write_config(tmp_path, [{"name": f"tc_{g}_{a}", "backend": "tensorcircuit", "gradient": g, "algorithm": a, "seeds": [0, 1]}
                            for g, a in pairs], defaults={**TINY, "training": {"episodes": 2, "episodes_per_batch": 2,
                                                                                "dqn": {"batch_size": 4}}})
    proc = run_cli(tmp_path, "--jobs", "3")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    statuses = {name: r.data.tags["status"] for name, r in runs(tmp_path).items()}
    assert len(statuses) == 11 and set(statuses.values()) == {"PASSED"}, statuses


def test_an_unreadable_heartbeat_is_unknown_never_dead():
    """A passing tracking-server error while reading a remote sweep's heartbeat must not get
    its live runs marked KILLED; a readable, stale heartbeat does."""
    from types import SimpleNamespace

    from sweep.core import Sweep

    run = SimpleNamespace(info=SimpleNamespace(run_id="child", run_name="r-seed0"),
                          data=SimpleNamespace(tags={"mlflow.parentRunId": "parent", "sweep.owner": "elsewhere|boot|42|7"}))

    class Client:
        def __init__(self, heartbeat):
            self.heartbeat, self.terminated = heartbeat, []

        def search_runs(self, *args, **kwargs):
            return [run]

        def get_run(self, run_id):
            if self.heartbeat is None:
                raise ConnectionError("502 Bad Gateway")
            return SimpleNamespace(data=SimpleNamespace(tags={"sweep.heartbeat": str(self.heartbeat)}))

        def set_tag(self, *args):
            pass

        def set_terminated(self, run_id, status):
            self.terminated.append(run_id)

    unreadable, stale = Client(None), Client(time.time() - 3600)
    assert Sweep.mark_stale_runs(None, unreadable, "0") == [] and unreadable.terminated == []
    assert Sweep.mark_stale_runs(None, stale, "0") == ["r-seed0"] and stale.terminated == ["child"]
