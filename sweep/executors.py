"""Where runs execute: :class:`LocalExecutor` (one process per run, forked from a ``forkserver``
that has already imported torch, gymnasium, PennyLane, TensorCircuit and MLflow, so a run starts
in milliseconds; past its deadline the process is killed) and :class:`RayExecutor` (Ray tasks on
a cluster). Both run :func:`sweep.worker.run_worker`."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_for_any
from pathlib import Path
from typing import Any

from sweep.lifeline import SWEEP_PID_ENV
from sweep.plan import RunOutcome, RunSpec
from sweep.worker import local_worker, run_worker

#: Modules every worker imports before it trains: empty in production; the tests add their
#: fault-injection plugin here (tests/fault_injection.py), so no fault can be switched on otherwise.
WORKER_PLUGINS: list[str] = []
PRELOAD = [
    "sweep.lifeline",  # first: the forkserver ties its life to the sweep's before the slow imports
    "sweep.worker",
    "train",
    "models",
    "gradients",
    "meta.train",
    "mlflow",
    "mlflow.store.tracking.sqlalchemy_store",  # 0.7 s of imports on a worker's first MLflow call otherwise
    "mlflow.store.tracking.rest_store",
    "mlflow.pytorch",  # several seconds of imports on a worker's first log_model otherwise
    "pennylane",
    "tensorcircuit",
    "matplotlib.pyplot",
]


@dataclass
class Job:
    """A run being executed: what its executor tracks it by, its deadline, what it reported."""

    spec: RunSpec
    index: int
    outcome: RunOutcome
    handle: Any = None
    """The local executor's worker process, or the Ray executor's object reference."""
    receiver: Connection | None = None
    start: float = 0.0
    deadline: float = float("inf")
    received: dict = field(default_factory=dict)
    output_path: str | None = None
    """The local worker's stdout and stderr (logged as ``worker_output.txt`` when the run ends)."""


def _forkserver_context():
    # Python 3.11's forkserver does not apply the parent's sys.path before preloading and
    # skips modules it cannot import without a word; run.py started from another directory
    # would then preload none of the project's modules. The forkserver inherits the environment.
    project = str(Path(__file__).resolve().parents[1])
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if project not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([project, *filter(None, paths)])
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD + WORKER_PLUGINS)
    # Start it now: its imports (several seconds) overlap the parent's MLflow set-up. Only the
    # forkserver's environment names this process: it dies with it (sweep.lifeline).
    from multiprocessing import forkserver

    os.environ[SWEEP_PID_ENV] = str(os.getpid())
    try:
        forkserver.ensure_running()
    finally:
        del os.environ[SWEEP_PID_ENV]
    return ctx


class LocalExecutor:
    """Every run in its own process, forked from a server that has preloaded the heavy libraries;
    the worker reports over a pipe; past its deadline the process is killed."""

    name = "local"

    def __init__(self):
        self.ctx = _forkserver_context()
        self.startup_s: float | None = None
        """Seconds the first submission waited for the forkserver's imports (once per sweep)."""

    def _wait_for_forkserver(self) -> None:
        """Fork one empty process, so the forkserver has finished its imports before the first
        run's clock starts: no run is charged with them (or timed out by them)."""
        t0 = time.monotonic()
        probe = self.ctx.Process(target=os.getpid, name="forkserver-ready")
        probe.start()
        probe.join()
        self.startup_s = time.monotonic() - t0

    def submit(self, job: Job, args: tuple) -> None:
        if self.startup_s is None:
            self._wait_for_forkserver()
        receiver, sender = self.ctx.Pipe(duplex=False)
        job.receiver = receiver
        fd, job.output_path = tempfile.mkstemp(prefix=f"{job.spec.name}-", suffix=".log")
        os.close(fd)
        job.handle = self.ctx.Process(target=local_worker, args=(*args, job.output_path, sender), name=job.spec.name)
        job.start = time.monotonic()
        job.deadline = job.start + job.spec.exp.timeout_s
        try:
            job.handle.start()
        finally:
            sender.close()  # the worker holds the sending end now: its exit shows here as end of file

    def events(self, job: Job) -> tuple[list, bool]:
        """What the worker sent since the last call, and whether it has ended."""
        out = []
        try:
            while job.receiver.poll():
                out.append(job.receiver.recv())
        except EOFError:  # the worker has exited and everything it sent is read
            return out, True
        return out, not job.handle.is_alive() and not job.receiver.poll()

    def kill(self, job: Job) -> None:
        if job.handle is not None:
            _stop(job.handle)

    def finish(self, job: Job) -> bool:
        """Reap the worker; whether it exited cleanly."""
        if job.handle is None:
            return False
        if job.handle.pid is not None:  # started
            job.handle.join()
        job.receiver.close()  # (a killed writer may have left half a message: it is not read)
        return job.handle.exitcode == 0

    def wait(self, jobs: list[Job], timeout: float) -> None:
        started = [j for j in jobs if j.handle is not None and j.handle.pid is not None]
        handles = [j.receiver for j in started if not j.receiver.closed] + [j.handle.sentinel for j in started]
        wait_for_any(handles, timeout=timeout)

    def close(self) -> None:
        """Stop the forkserver now; one still busy with its imports would outlive the sweep by
        seconds. (CPython keeps it in ``multiprocessing.forkserver._forkserver``; its ``_stop``
        waits for it to exit, so it is killed first.)"""
        from multiprocessing import forkserver

        server = forkserver._forkserver
        pid = getattr(server, "_forkserver_pid", None)
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        server._stop()


class _QueueEvents:
    """``send`` for a Ray task: events go to the driver through a Ray queue, tagged with the run."""

    def __init__(self, queue, index: int):
        self.queue, self.index = queue, index

    def send(self, event) -> None:
        self.queue.put((self.index, event))


def _ray_task(exp_data: dict, seed: int, run_name: str, tracking_uri: str, run_id: str, resume: bool,
              system_metrics: bool, queue, index: int, plugins: list[str]) -> bool:
    """One run as a Ray task: the same worker as the local executor, tagged with its node."""
    import importlib

    import ray

    for plugin in plugins:
        importlib.import_module(plugin)
    node_id = ray.get_runtime_context().get_node_id()
    events = _QueueEvents(queue, index)
    events.send(("started", node_id))
    return run_worker(exp_data, seed, run_name, tracking_uri, run_id, resume, events, tags={"ray.node_id": node_id},
                       system_metrics=system_metrics)


class RayExecutor:
    """Every run as a Ray task (``ray.num_cpus`` CPUs each, spread over the nodes). The deadline
    counts from when the task starts on a node; past it the task is cancelled by force (its
    worker process is killed) and the run is TIMED_OUT. Ray is imported only here."""

    name = "ray"
    POLL_S = 0.2

    def __init__(self, address: str | None = None):
        import ray
        from ray.util.queue import Queue

        project = str(Path(__file__).resolve().parents[1])
        paths = [project, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        env = {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths)), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
               **{k: v for k, v in os.environ.items() if k.startswith("QMLBENCH_")}}  # the project's own settings
        ray.init(address=address, runtime_env={"env_vars": env}, logging_level="ERROR", log_to_driver=False,
                 configure_logging=False)
        self.ray = ray
        self.startup_s: float | None = None
        self.queue = Queue(actor_options={"num_cpus": 0})
        self.remote = ray.remote(max_retries=0)(_ray_task)
        self.pending: dict[int, list] = {}

    def nodes(self) -> list[dict]:
        return [n for n in self.ray.nodes() if n.get("Alive")]

    def total_cpus(self) -> int:
        return max(1, int(sum(n.get("Resources", {}).get("CPU", 0) for n in self.nodes())))

    def submit(self, job: Job, args: tuple) -> None:
        job.start = time.monotonic()
        job.handle = self.remote.options(num_cpus=job.spec.exp.ray.num_cpus, scheduling_strategy="SPREAD").remote(
            *args, self.queue, job.index, list(WORKER_PLUGINS))

    def _drain(self) -> None:
        size = self.queue.qsize()
        if size:
            for index, event in self.queue.get_nowait_batch(size):
                self.pending.setdefault(index, []).append(event)

    def events(self, job: Job) -> tuple[list, bool]:
        ready, _ = self.ray.wait([job.handle], timeout=0)  # first: a finished task's events are all queued
        self._drain()
        out = []
        for event in self.pending.pop(job.index, []):
            if event[0] == "started":
                job.start = time.monotonic()
                job.deadline = job.start + job.spec.exp.timeout_s
            else:
                out.append(event)
        return out, bool(ready)

    def kill(self, job: Job) -> None:
        if job.handle is not None:
            self.ray.cancel(job.handle, force=True)

    def finish(self, job: Job) -> bool:
        if job.handle is None:
            return False
        try:
            return bool(self.ray.get(job.handle, timeout=30))
        except Exception:  # noqa: BLE001 - cancelled or crashed: the status is decided from what was received
            return False

    def wait(self, jobs: list[Job], timeout: float) -> None:
        time.sleep(max(0.0, min(timeout, self.POLL_S)))

    def close(self) -> None:
        self.ray.shutdown()


def _stop(proc) -> None:
    """Terminate a worker, then kill it if it does not die within a second."""
    if proc.is_alive():
        proc.terminate()
        proc.join(1.0)
    if proc.is_alive():
        proc.kill()
