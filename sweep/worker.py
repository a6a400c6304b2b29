"""The worker side of a run (its own process, or a Ray task): train, log metrics, the model,
figures and checkpoints to the run's MLflow run, report progress and the result to the sweep."""

from __future__ import annotations

import math
import os
import signal
import sys
import tempfile
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path

from backends import BACKENDS
from config_schema import parse_experiment
from sweep.lifeline import die_with_parent
from sweep.report import log_figure
from sweep.tracking import log_metrics, mlflow_client
from tasks import Task, task_of
from utils import library_versions

CHECKPOINT_DIR, CHECKPOINT_FILE = "checkpoint", "checkpoint.pt"


class WorkerReporter:
    """Logs metrics straight to the run (nothing is lost if the process is killed), sends progress
    and uploads checkpoints. After a resume, steps the interrupted process had already logged
    (recomputed identically from the checkpoint) are not logged twice."""

    def __init__(self, client, run_id: str, run_name: str, events, logged_through_step: int = -1):
        self.client, self.run_id, self.events = client, run_id, events
        self.logged_through_step = logged_through_step

    def metrics(self, values: dict[str, float], step: int) -> None:
        if step > self.logged_through_step:
            log_metrics(self.client, self.run_id, values, step)

    def tags(self, values: dict[str, str]) -> None:
        for key, value in values.items():
            self.client.set_tag(self.run_id, key, value)

    def progress(self, episode: int, total: int, avg_return: float) -> None:
        self.events.send(("progress", episode, total, avg_return))

    def checkpoint(self, state: dict, episode: int) -> None:
        import torch

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / CHECKPOINT_FILE
            torch.save(state, path)
            self.client.log_artifact(self.run_id, str(path), CHECKPOINT_DIR)  # replaces the previous one
        self.client.set_tag(self.run_id, "checkpoint_episode", str(episode))


def _load_checkpoint(client, run_id: str) -> tuple[dict, int]:
    """The run's last checkpoint (``weights_only``: nothing but tensors and plain data is
    unpickled) and the last step the run has logged."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run_id, f"{CHECKPOINT_DIR}/{CHECKPOINT_FILE}", tmp)
        state = torch.load(path, weights_only=True)
    history = client.get_metric_history(run_id, "rollout/episode_return")
    return state, max((m.step for m in history), default=-1)


#: Headline metric under a short name (a column a reader adds in the MLflow UI) for circuit runs;
#: the task adds its own (``final/return``, ``final/fidelity``); ``final/wall_s`` is added by the
#: sweep when the run ends.
CIRCUIT_HEADLINE = {"final/circuit_evals": "final/total_circuit_evals"}
#: Seconds between samples of ``--system-metrics``.
SYSTEM_METRICS_S = 2.0


def final_metrics_to_log(final: dict[str, float], task: Task, quantum: bool) -> tuple[dict[str, float], dict[str, float]]:
    """Split a run's final metrics into (``final/*`` at step 0, so they read as one value per
    run, with the short headline names added; the rest, at the last step)."""
    headline = {k: v for k, v in final.items() if k.startswith("final/")}
    short_names = {**task.short_metrics, **(CIRCUIT_HEADLINE if quantum else {})}
    for short, source in short_names.items():
        if source in final:
            headline[short] = final[source]
    return headline, {k: v for k, v in final.items() if not k.startswith("final/")}


def run_summary(final: dict[str, float], steps_done: int, task: Task, quantum: bool) -> dict:
    """What the sweep's summary shows of a passed run (tag ``summary``), from its final metrics."""
    def value(metric: str):
        return final.get(metric)

    return json_safe({
        "score": value(task.score_metric),
        "steps_done": steps_done,
        "grad_circuit_evals": value("final/grad_circuit_evals") if quantum else None,
        "total_circuit_evals": value("final/total_circuit_evals") if quantum else None,
        "columns": {column: value(metric) for column, metric in task.extra_columns.items()},
    })


def json_safe(value):
    """``value`` with NaN and infinities as None, so ``json.dumps`` writes valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    return value


def _capture_output(path: str | None) -> None:
    """Send this process's stdout and stderr (file descriptors 1 and 2, so C libraries and
    third-party prints too) to ``path``: a worker never writes into the sweep's live display.
    The sweep logs the file as the run's ``worker_output.txt``."""
    if path is None:
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _log_policy_model(tracking_uri: str, run_id: str, model, observation_shape: tuple[int, ...]) -> None:
    """The trained policy as an MLflow model named ``policy`` (the run's Models column), with a
    signature and an input example: ``mlflow.pytorch.load_model(f"runs:/{run_id}/policy")`` gives
    it back, circuit included, in any process that can import this project. Pickled, not
    ``torch.export``-ed: that fixes the batch size and cannot trace the jitted circuits."""
    import mlflow
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    model.to("cpu")  # training is over; a logged model loads on any machine, and the example is a CPU tensor
    example = np.zeros((1, *observation_shape))
    with torch.no_grad():
        output = model(torch.as_tensor(example)).cpu().numpy()
    requirements = [f"{name}=={version}" for name, version in library_versions().items() if version != "not installed"]
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id, log_system_metrics=False):
        mlflow.pytorch.log_model(model, name="policy", signature=infer_signature(example, output), input_example=example,
                                 pip_requirements=requirements, serialization_format="pickle")


def run_worker(exp_data: dict, seed: int, run_name: str, tracking_uri: str, run_id: str, resume: bool, events,
               tags: dict[str, str] | None = None, system_metrics: bool = False) -> bool:
    """Train one run, logging to its MLflow run; ``events`` (anything with ``send``) carries
    progress, then ("done", summary) or ("error", message). Returns whether it succeeded."""
    import torch

    from train import train

    if exp_data.get("backend") == "tensorcircuit":  # before any thread starts (see models.use_tensorcircuit)
        from models import use_tensorcircuit

        use_tensorcircuit(exp_data["tensorcircuit"]["math_backend"])
    client = mlflow_client(tracking_uri)
    monitor = None
    try:
        for key, value in (tags or {}).items():
            client.set_tag(run_id, key, value)
        exp = parse_experiment(exp_data)
        task, quantum = task_of(exp), BACKENDS.get(exp.backend).is_circuit
        if system_metrics:  # CPU, memory, disk, network every SYSTEM_METRICS_S as system/* metrics
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_S, resume_logging=resume,
                                           tracking_uri=tracking_uri)
            monitor.start()
            monitor_start = time.monotonic()
        state, logged_through = _load_checkpoint(client, run_id) if resume else (None, -1)
        reporter = WorkerReporter(client, run_id, run_name, events, logged_through)
        result = train(exp, seed, reporter, resume=state)
        final = result.final_metrics()
        headline, rest = final_metrics_to_log(final, task, quantum)
        log_metrics(client, run_id, headline, 0)
        log_metrics(client, run_id, {**rest, "time/mlflow_lock_retries": client.retries}, result.final_step)
        with tempfile.TemporaryDirectory() as tmp:
            weights = Path(tmp) / "weights.pt"
            torch.save(result.state_dict(), weights)
            client.log_artifact(run_id, str(weights), "model")
        if task.observation_example is not None and isinstance(getattr(result, "model", None), torch.nn.Module):
            _log_policy_model(tracking_uri, run_id, result.model, task.observation_example)
        for artifact, fig in result.figures(run_name).items():
            log_figure(client, run_id, fig, artifact)
        events.send(("done", run_summary(final, result.final_step, task, quantum)))
        return True
    except BaseException as exc:  # noqa: BLE001 - recorded as FAILED by the parent, never swallowed
        message = f"{type(exc).__name__}: {exc}"
        try:
            client.log_text(run_id, traceback.format_exc(), "traceback.txt")
        finally:
            events.send(("error", message))
        return False
    finally:
        if monitor is not None:  # one last sample, so a run shorter than the interval has one too
            monitor.finish()
            monitor.collect_metrics()
            last = {f"system/{k}": v for k, v in monitor.aggregate_metrics().items()}
            try:
                log_metrics(client, run_id, last, int((time.monotonic() - monitor_start) / SYSTEM_METRICS_S) + 1)
            except Exception as exc:  # noqa: BLE001 - the run's result stands; the loss is reported in worker_output.txt
                print(f"warning: the last system-metrics sample was not logged: {type(exc).__name__}: {exc}", file=sys.stderr)


def local_worker(exp_data: dict, seed: int, run_name: str, tracking_uri: str, run_id: str, resume: bool,
                 system_metrics: bool, output_path: str | None, events: Connection) -> None:
    """The local executor's worker process; ``events`` is the sending end of a pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C for the sweep
    die_with_parent()  # its parent is the forkserver, which dies with the sweep (see sweep.lifeline)
    _capture_output(output_path)
    if not run_worker(exp_data, seed, run_name, tracking_uri, run_id, resume, events, system_metrics=system_metrics):
        sys.exit(1)
