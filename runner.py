"""Run a validated sweep: one OS process per experiment x seed, hard time limits, MLflow runs.

Structure in MLflow: one parent run per sweep invocation, one child run per experiment x seed
(tag ``mlflow.parentRunId``). The parent process creates each child run (params, tags, resolved
config) *before* starting its worker, so a run that times out or crashes still has everything
it logged. The worker logs metrics as it trains; the parent alone decides the final status:

- PASSED: the worker returned a result.
- FAILED: the worker raised (message in tag ``error``, ``traceback.txt`` artifact) or died.
- TIMED_OUT: still running at ``timeout_s``; the process is killed wherever it is.
- KILLED: the sweep was interrupted (Ctrl-C) while the run was going, or the sweep process died
  (the next invocation finds the run left RUNNING and marks it).

Executors: :class:`LocalExecutor` (processes from a ``forkserver`` that has already imported
torch, gymnasium, PennyLane, TensorCircuit and MLflow, so a run starts in milliseconds) and
:class:`RayExecutor` (Ray tasks on a cluster). Up to ``jobs`` runs go at once, each with its own
deadline. ``resume`` reuses runs that PASSED with the same :func:`config_hash` and continues
TIMED_OUT / KILLED ones from their checkpoints in the same MLflow run.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_for_any
from pathlib import Path
from typing import Any

import yaml

from config_schema import ExperimentConfig, SweepConfig
from sweep.lifeline import SWEEP_PID_ENV, die_with_parent
from utils import (
    flatten_dict,
    get_or_create_experiment,
    git_commit,
    library_versions,
    log_metrics,
    log_params,
    mlflow_client,
    owner_alive,
    prepare_store,
    process_owner,
)

#: Modules every worker imports before it trains: empty in production; the tests add their
#: fault-injection plugin here (tests/fault_injection.py), so no fault can be switched on otherwise.
WORKER_PLUGINS: list[str] = []
PRELOAD = [
    "sweep.lifeline",  # first: the forkserver ties its life to the sweep's before the slow imports
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
STATUSES = ("PASSED", "FAILED", "TIMED_OUT", "KILLED")
CHECKPOINT_DIR, CHECKPOINT_FILE = "checkpoint", "checkpoint.pt"
MLFLOW_STATUS = {"PASSED": "FINISHED", "FAILED": "FAILED", "TIMED_OUT": "KILLED", "KILLED": "KILLED"}
#: The metric that shows a run's progress (comparison plot; last value of a run that did not pass).
PROGRESS_METRIC = {"cartpole": "rollout/avg_return_10", "qubit_meta": "meta/val_fidelity_post"}
PROGRESS_LABEL = {"cartpole": "avg return", "qubit_meta": "validation fidelity"}


@dataclass
class RunSpec:
    exp: ExperimentConfig
    seed: int

    @property
    def name(self) -> str:
        return f"{self.exp.name}-seed{self.seed}"


@dataclass
class RunOutcome:
    spec: RunSpec
    status: str
    wall_s: float
    final_avg_return: float = float("nan")
    final_fidelity: float = float("nan")
    episodes_done: int = 0
    grad_circuit_evals: int | None = None
    total_circuit_evals: int | None = None
    run_id: str | None = None
    error: str | None = None
    reused: bool = False
    """PASSED in an earlier sweep with the same resolved config (``--resume``): not run again."""
    baselines: dict[str, float] = field(default_factory=dict)
    """qubit_meta: fidelity of the robust pulse and of the per-task optimum, gap to the robust pulse."""

    @property
    def cost_per_step(self) -> tuple[float | None, float | None]:
        """Wall seconds and circuit evaluations per episode (CartPole) or meta-iteration."""
        steps = self.episodes_done
        if not steps:
            return None, None
        evals = None if self.total_circuit_evals is None else self.total_circuit_evals / steps
        return self.wall_s / steps, evals


def expand(cfg: SweepConfig) -> list[RunSpec]:
    return [RunSpec(exp, seed) for exp in cfg.experiments for seed in exp.seed_list]


TASK_TITLES = {"cartpole": "CartPole-v1", "qubit_meta": "noisy-qubit pulses"}


def run_description(spec: RunSpec) -> str:
    """One line for the run's description in the MLflow UI (tag ``mlflow.note.content``)."""
    exp = spec.exp
    what = "MLP" if exp.backend == "classical" else f"{exp.model.n_qubits}-qubit, {exp.model.n_layers}-layer circuit"
    extra = f", {exp.meta.noise.model_types} noise" if exp.task == "qubit_meta" else f", {exp.total_steps} episodes"
    return (f"{exp.algorithm.upper()} on {TASK_TITLES[exp.task]}: {what} on {exp.backend}, gradient {exp.gradient}, "
            f"seed {spec.seed}{extra}. Config: artifact config.yaml.")


# ---------------------------------------------------------------------------------------------
# Worker (runs in its own process)


class _WorkerReporter:
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


def _log_figure(client, run_id: str, fig, artifact_file: str) -> None:
    import matplotlib.pyplot as plt

    client.log_figure(run_id, fig, artifact_file, save_kwargs={"dpi": 110})
    plt.close(fig)


def _load_checkpoint(client, run_id: str) -> tuple[dict, int]:
    """The run's last checkpoint (``weights_only``: nothing but tensors and plain data is
    unpickled) and the last step the run has logged."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run_id, f"{CHECKPOINT_DIR}/{CHECKPOINT_FILE}", tmp)
        state = torch.load(path, weights_only=True)
    history = client.get_metric_history(run_id, "rollout/episode_return")
    return state, max((m.step for m in history), default=-1)


#: Headline metrics under short names (the columns a reader adds in the MLflow UI), from the
#: run's own final metrics; ``final/wall_s`` is added by the sweep when the run ends.
HEADLINE_METRICS = {"final/return": "final/avg_return_10", "final/fidelity": "final/fidelity_post",
                    "final/circuit_evals": "final/total_circuit_evals"}
#: Seconds between samples of ``--system-metrics``.
SYSTEM_METRICS_S = 2.0
#: What the summary table and the parent's note show of a qubit run besides its fidelity.
BASELINE_METRICS = {"fidelity_robust": "final/fidelity_robust", "fidelity_optimum": "final/fidelity_optimum",
                    "gap_to_robust": "final/gap_to_robust"}


def final_metrics_to_log(final: dict[str, float], quantum: bool) -> tuple[dict[str, float], dict[str, float]]:
    """Split a run's final metrics into (``final/*`` at step 0, so they read as one value per
    run, with the short headline names added; the rest, at the last step)."""
    headline = {k: v for k, v in final.items() if k.startswith("final/")}
    for short, source in HEADLINE_METRICS.items():
        if source in final and (quantum or short != "final/circuit_evals"):
            headline[short] = final[source]
    return headline, {k: v for k, v in final.items() if not k.startswith("final/")}


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


def _log_policy_model(tracking_uri: str, run_id: str, model) -> None:
    """The trained policy as an MLflow model named ``policy`` (the run's Models column), with a
    signature and an input example: ``mlflow.pytorch.load_model(f"runs:/{run_id}/policy")`` gives
    it back, circuit included, in any process that can import this project. Pickled, not
    ``torch.export``-ed: that fixes the batch size and cannot trace the jitted circuits."""
    import gymnasium as gym
    import mlflow
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    from train import ENV_ID

    example = np.zeros((1, *gym.spec(ENV_ID).make().observation_space.shape))
    with torch.no_grad():
        output = model(torch.as_tensor(example)).cpu().numpy()
    requirements = [f"{name}=={version}" for name, version in library_versions().items() if version != "not installed"]
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id, log_system_metrics=False):
        mlflow.pytorch.log_model(model, name="policy", signature=infer_signature(example, output), input_example=example,
                                 pip_requirements=requirements, serialization_format="pickle")


def _run_worker(exp_data: dict, seed: int, run_name: str, tracking_uri: str, run_id: str, resume: bool, events,
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
        exp = ExperimentConfig.model_validate(exp_data)
        if system_metrics:  # CPU, memory, disk, network every SYSTEM_METRICS_S as system/* metrics
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_S, resume_logging=resume,
                                           tracking_uri=tracking_uri)
            monitor.start()
        state, logged_through = _load_checkpoint(client, run_id) if resume else (None, -1)
        reporter = _WorkerReporter(client, run_id, run_name, events, logged_through)
        result = train(exp, seed, reporter, resume=state)
        final = result.final_metrics()
        headline, rest = final_metrics_to_log(final, exp.backend != "classical")
        log_metrics(client, run_id, headline, 0)
        log_metrics(client, run_id, {**rest, "time/mlflow_lock_retries": client.retries}, result.final_step)
        with tempfile.TemporaryDirectory() as tmp:
            weights = Path(tmp) / "weights.pt"
            torch.save(result.state_dict(), weights)
            client.log_artifact(run_id, str(weights), "model")
        if isinstance(getattr(result, "model", None), torch.nn.Module):
            _log_policy_model(tracking_uri, run_id, result.model)
        for artifact, fig in result.figures(run_name).items():
            _log_figure(client, run_id, fig, artifact)
        summary = {**result.summary(), **{k: final[m] for k, m in BASELINE_METRICS.items() if m in final}}
        events.send(("done", json_safe(summary)))
        return True
    except BaseException as exc:  # noqa: BLE001 - recorded as FAILED by the parent, never swallowed
        message = f"{type(exc).__name__}: {exc}"
        try:
            client.log_text(run_id, traceback.format_exc(), "traceback.txt")
        finally:
            events.send(("error", message))
        return False
    finally:
        if monitor is not None:
            monitor.finish()


def _worker(exp_data: dict, seed: int, run_name: str, tracking_uri: str, run_id: str, resume: bool,
            system_metrics: bool, output_path: str | None, events: Connection) -> None:
    """The local executor's worker process; ``events`` is the sending end of a pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C for the sweep
    die_with_parent()  # its parent is the forkserver, which dies with the sweep (see sweep.lifeline)
    _capture_output(output_path)
    if not _run_worker(exp_data, seed, run_name, tracking_uri, run_id, resume, events, system_metrics=system_metrics):
        sys.exit(1)


# ---------------------------------------------------------------------------------------------
# Display


class _Display:
    """Live progress: rich bars on a terminal (one per running run), plain lines otherwise."""

    def __init__(self, total: int, live: bool):
        self.total, self.live, self.done = total, live, 0
        self._labels: dict[str, str] = {}
        self._tasks: dict[str, int] = {}
        self._last_line: dict[str, float] = {}
        if live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
            )
            self.sweep_task = self.progress.add_task("runs", total=total)
            self.progress.start()

    def start_run(self, name: str, episodes: int, label: str = "avg return", note: str = "") -> None:
        self._labels[name] = label
        if self.live:
            self._tasks[name] = self.progress.add_task(f"  {name}", total=episodes)
        else:
            print(f"[{self.done + 1}/{self.total}] {name}: started{note}", flush=True)

    def update(self, name: str, episode: int, total: int, avg_return: float) -> None:
        label = self._labels.get(name, "avg return")
        shown = f"{label} {avg_return:.4g}" if avg_return == avg_return else f"{label} not measured yet"
        if self.live:
            self.progress.update(self._tasks[name], completed=episode, description=f"  {name} {shown}")
        elif time.monotonic() - self._last_line.get(name, 0.0) > 2.0 or episode == total:
            self._last_line[name] = time.monotonic()
            print(f"[{self.done + 1}/{self.total}] {name}: step {episode}/{total}, {shown}", flush=True)

    def end_run(self, outcome: RunOutcome) -> None:
        self.done += 1
        name = outcome.spec.name
        reused = " (PASSED earlier with the same config; skipped)" if outcome.reused else ""
        if self.live:
            if name in self._tasks:
                self.progress.remove_task(self._tasks.pop(name))
            self.progress.update(self.sweep_task, completed=self.done)
            self.progress.console.print(f"{name}: {outcome.status} in {outcome.wall_s:.1f} s{reused}")
        else:
            extra = f" ({outcome.error})" if outcome.error else reused
            print(f"[{self.done}/{self.total}] {name}: {outcome.status} in {outcome.wall_s:.1f} s{extra}", flush=True)

    def message(self, text: str) -> None:
        if self.live:
            self.progress.console.print(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.live:
            self.progress.stop()


# ---------------------------------------------------------------------------------------------
# Summary


BASE_COLUMNS = ("run", "backend", "gradient", "status", "wall_s")
COST_COLUMNS = ("s_per_step", "evals_per_step", "grad_circuit_evals", "total_circuit_evals")
SCORE_COLUMNS = {"cartpole": ("final_avg_return",),
                 "qubit_meta": ("heldout_fidelity", "fidelity_robust", "fidelity_optimum", "gap_to_robust")}


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None or value != value else round(value, digits)


def summary_rows(outcomes: list[RunOutcome]) -> list[dict]:
    """One row per run. ``s_per_step`` and ``evals_per_step``: wall seconds and circuit
    evaluations per episode (CartPole) or meta-iteration (qubit tasks), the cost a reader compares
    when scores are equal by design; ``heldout_fidelity``: after adaptation, on the held-out
    validation tasks (the progress display shows the periodic validation passes)."""
    rows = []
    for o in outcomes:
        seconds, evals = o.cost_per_step
        rows.append({
            "run": o.spec.name,
            "backend": o.spec.exp.backend,
            "gradient": o.spec.exp.gradient,
            "status": o.status,
            "wall_s": round(o.wall_s, 2),
            "s_per_step": _rounded(seconds, 3),
            "evals_per_step": _rounded(evals, 1),
            "final_avg_return": _rounded(o.final_avg_return, 1),
            "heldout_fidelity": _rounded(o.final_fidelity, 5),
            **{k: _rounded(o.baselines.get(k), 5) for k in BASELINE_METRICS},
            "grad_circuit_evals": o.grad_circuit_evals,
            "total_circuit_evals": o.total_circuit_evals,
        })
    return rows


def summary_columns(tasks: set[str]) -> tuple[str, ...]:
    """The score columns of the tasks present, then the cost columns."""
    scores = tuple(c for task in SCORE_COLUMNS if task in tasks for c in SCORE_COLUMNS[task])
    return BASE_COLUMNS + scores + COST_COLUMNS


def headline(outcomes: list[RunOutcome]) -> list[str]:
    """Plain-language lines for the parent run's note and the terminal: per backend the cheapest
    passed run (seconds per step) and the best score."""
    lines = []
    passed = [o for o in outcomes if o.status == "PASSED" and o.cost_per_step[0] is not None]
    scores = {_score(o) for o in passed}
    equal = len(passed) > 1 and len(scores) == 1 and None not in scores
    if equal:
        lines.append(f"every run: {_score_label(passed[0])} {_score(passed[0]):.4g} (equal by design here: compare the cost)")
    for backend in dict.fromkeys(o.spec.exp.backend for o in passed):
        mine = [o for o in passed if o.spec.exp.backend == backend]
        cheapest = min(mine, key=lambda o: o.cost_per_step[0])
        line = f"{backend}: cheapest {cheapest.spec.name} ({cheapest.cost_per_step[0]:.3g} s per step"
        if cheapest.cost_per_step[1] is not None:
            line += f", {cheapest.cost_per_step[1]:.4g} circuits per step"
        line += ")"
        scored = [o for o in mine if _score(o) is not None]
        if scored and not equal:
            best = max(scored, key=_score)
            line += f"; best {best.spec.name} ({_score_label(best)} {_score(best):.4g})"
        lines.append(line)
    return lines


def failure_lines(outcomes: list[RunOutcome]) -> list[str]:
    return [f"{o.spec.name} {o.status}: {o.error or 'no error recorded'}" for o in outcomes if o.status != "PASSED"]


def _score(o: RunOutcome) -> float | None:
    value = o.final_fidelity if o.spec.exp.task == "qubit_meta" else o.final_avg_return
    return None if value != value else value


def _score_label(o: RunOutcome) -> str:
    return "held-out fidelity" if o.spec.exp.task == "qubit_meta" else "mean return"


def summary_markdown(rows: list[dict], columns: tuple[str, ...]) -> str:
    header = "| " + " | ".join(columns) + " |"
    lines = [header, "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join("-" if r[c] is None else str(r[c]) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def summary_csv(rows: list[dict], columns: tuple[str, ...]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def print_summary(rows: list[dict], columns: tuple[str, ...], total_s: float) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Sweep summary ({total_s:.1f} s)")
    for col in columns:
        table.add_column(col, justify="right" if col not in ("run", "backend", "gradient", "status") else "left")
    for r in rows:
        table.add_row(*("-" if r[c] is None else str(r[c]) for c in columns))
    console = Console()
    if not console.is_terminal:  # a log file: whole lines, never wrapped cells
        console = Console(width=100_000)
    console.print(table)


def comparison_figure(client, outcomes: list[RunOutcome]):
    """Progress of every run (markers where a curve has few points), and what each run cost:
    wall seconds and circuit evaluations per episode or meta-iteration, coloured by status. When
    the progress curves coincide (a smoke sweep whose returns are equal by design), the title says
    so and the cost panels carry the comparison."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height = max(4.5, 0.28 * len(outcomes) + 1.5)
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, height), gridspec_kw={"width_ratios": [3, 2, 2]})
    curves = []
    for o in outcomes:
        if o.run_id is None:
            continue
        history = sorted(client.get_metric_history(o.run_id, PROGRESS_METRIC[o.spec.exp.task]), key=lambda m: m.step)
        if history:
            steps, values = [m.step for m in history], [m.value for m in history]
            curves.append(values)
            ax1.plot(steps, values, label=o.spec.name, lw=1.3, marker="o" if len(steps) <= 20 else None, ms=4)
    tasks = {o.spec.exp.task for o in outcomes}
    if tasks == {"qubit_meta"}:
        ax1.set(xlabel="meta-iteration", ylabel="validation fidelity after adaptation", title="Fidelity against meta-iteration")
    else:
        ax1.set(xlabel="episode (CartPole) / meta-iteration", ylabel="mean return (last 10) / fidelity", title="Progress")
    if len(curves) > 1 and all(c == curves[0] for c in curves):
        ax1.set_title("Progress: identical in every run (equal by design); compare the cost")
    if ax1.lines:
        ax1.legend(fontsize=7, loc="best")
    else:
        ax1.text(0.5, 0.5, "no run logged progress", ha="center", va="center", transform=ax1.transAxes)
    names = [o.spec.name for o in outcomes]
    colors = {"PASSED": "tab:green", "FAILED": "tab:red", "TIMED_OUT": "tab:orange", "KILLED": "tab:gray"}
    bar_colors = [colors.get(o.status, "tab:gray") for o in outcomes]
    seconds = [o.cost_per_step[0] or 0.0 for o in outcomes]
    evals = [o.cost_per_step[1] or 0.0 for o in outcomes]
    ax2.barh(names, seconds, color=bar_colors)
    ax2.set(xlabel="wall seconds per step", title="Time per episode / iteration (colour = status)")
    ax3.barh(names, evals, color=bar_colors)
    ax3.set(xlabel="circuit evaluations per step", title="Circuits per episode / iteration")
    if any(evals):
        ax3.set_xscale("log")
    for ax in (ax2, ax3):
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
    ax3.tick_params(axis="y", labelleft=False)
    fig.tight_layout()
    return fig


def gap_vs_variance_figure(client, outcomes: list[RunOutcome]):
    """Gap (after adaptation minus robust pulse) against task variance in rates, one point per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for o in outcomes:
        metrics = client.get_run(o.run_id).data.metrics
        if "final/gap_to_robust" in metrics and "final/task_variance_rates" in metrics:
            ax.scatter(metrics["final/task_variance_rates"], metrics["final/gap_to_robust"], label=o.spec.name)
    ax.axhline(0.0, color="gray", lw=0.8)
    ax.set(xlabel="task variance in rates ((1/T)^2)", ylabel="fidelity gain over robust pulse",
           title="Gap vs task variance", xscale="log")
    if ax.collections:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# The sweep


def config_hash(spec: RunSpec) -> str:
    """Hash of everything that decides a run's result: the resolved experiment and the seed
    (the time limit and the seed list excluded). Tag ``config_hash`` of every child run."""
    resolved = spec.exp.model_dump(mode="json")
    for key in ("timeout_s", "seeds", "seed"):
        resolved.pop(key, None)
    resolved["seed"] = spec.seed
    return hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class _Job:
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
    project = str(Path(__file__).resolve().parent)
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

    def submit(self, job: _Job, args: tuple) -> None:
        if self.startup_s is None:
            self._wait_for_forkserver()
        receiver, sender = self.ctx.Pipe(duplex=False)
        job.receiver = receiver
        fd, job.output_path = tempfile.mkstemp(prefix=f"{job.spec.name}-", suffix=".log")
        os.close(fd)
        job.handle = self.ctx.Process(target=_worker, args=(*args, job.output_path, sender), name=job.spec.name)
        job.start = time.monotonic()
        job.deadline = job.start + job.spec.exp.timeout_s
        try:
            job.handle.start()
        finally:
            sender.close()  # the worker holds the sending end now: its exit shows here as end of file

    def events(self, job: _Job) -> tuple[list, bool]:
        """What the worker sent since the last call, and whether it has ended."""
        out = []
        try:
            while job.receiver.poll():
                out.append(job.receiver.recv())
        except EOFError:  # the worker has exited and everything it sent is read
            return out, True
        return out, not job.handle.is_alive() and not job.receiver.poll()

    def kill(self, job: _Job) -> None:
        if job.handle is not None:
            _stop(job.handle)

    def finish(self, job: _Job) -> bool:
        """Reap the worker; whether it exited cleanly."""
        if job.handle is None:
            return False
        if job.handle.pid is not None:  # started
            job.handle.join()
        job.receiver.close()  # (a killed writer may have left half a message: it is not read)
        return job.handle.exitcode == 0

    def wait(self, jobs: list[_Job], timeout: float) -> None:
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
    return _run_worker(exp_data, seed, run_name, tracking_uri, run_id, resume, events, tags={"ray.node_id": node_id},
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

        project = str(Path(__file__).resolve().parent)
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

    def submit(self, job: _Job, args: tuple) -> None:
        job.start = time.monotonic()
        job.handle = self.remote.options(num_cpus=job.spec.exp.ray.num_cpus, scheduling_strategy="SPREAD").remote(
            *args, self.queue, job.index, list(WORKER_PLUGINS))

    def _drain(self) -> None:
        size = self.queue.qsize()
        if size:
            for index, event in self.queue.get_nowait_batch(size):
                self.pending.setdefault(index, []).append(event)

    def events(self, job: _Job) -> tuple[list, bool]:
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

    def kill(self, job: _Job) -> None:
        if job.handle is not None:
            self.ray.cancel(job.handle, force=True)

    def finish(self, job: _Job) -> bool:
        if job.handle is None:
            return False
        try:
            return bool(self.ray.get(job.handle, timeout=30))
        except Exception:  # noqa: BLE001 - cancelled or crashed: the status is decided from what was received
            return False

    def wait(self, jobs: list[_Job], timeout: float) -> None:
        time.sleep(max(0.0, min(timeout, self.POLL_S)))

    def close(self) -> None:
        self.ray.shutdown()


class Sweep:
    #: Seconds between the parent's ``sweep.heartbeat`` tags (how other hosts tell a live sweep).
    HEARTBEAT_S = 30.0

    def __init__(self, cfg: SweepConfig, tracking_uri: str, experiment_name: str, live: bool | None = None,
                 jobs: int = 1, resume: bool = False, executor: LocalExecutor | RayExecutor | None = None,
                 system_metrics: bool = False):
        if jobs < 1:
            raise ValueError(f"jobs must be at least 1, got {jobs}")
        self.cfg = cfg
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.live = sys.stdout.isatty() if live is None else live
        self.jobs = jobs
        self.resume = resume
        self.executor = executor
        self.system_metrics = system_metrics
        """Log CPU, memory, disk and network use of every run as ``system/*`` metrics (MLflow's monitor)."""
        self.runs = expand(cfg)
        self.interrupted = 0
        """The signal that interrupted the sweep (SIGINT, SIGTERM, SIGHUP), 0 when none did."""
        self.store_errors: list[str] = []
        """Writes to the tracking store that failed (the runs still got their statuses where possible)."""
        self.parent_run_id: str | None = None
        self.experiment_id: str | None = None
        self.owner = process_owner()
        self._last_heartbeat = 0.0
        #: Tags shared by the parent and every child run, computed once per sweep.
        self.environment_tags = {f"version.{k}": v for k, v in library_versions().items()}
        self.environment_tags.update({"mlflow.source.name": str(Path(__file__).resolve().parent / "run.py"),
                                      "mlflow.source.type": "LOCAL"})
        commit = git_commit(Path(__file__).parent)
        if commit:
            self.environment_tags["mlflow.source.git.commit"] = commit

    # -- before any run starts ------------------------------------------------------------------

    def mark_stale_runs(self, client, experiment_id: str) -> list[str]:
        """Mark KILLED every run of the experiment left RUNNING by a sweep process that no longer
        exists (killed with SIGKILL, or the machine rebooted); returns their names."""
        marked = []
        unknown = object()
        heartbeats: dict[str, Any] = {}
        for run in client.search_runs([experiment_id], filter_string="tags.status = 'RUNNING'", max_results=50_000):
            tags = run.data.tags
            parent_id = tags.get("mlflow.parentRunId", run.info.run_id)
            if parent_id not in heartbeats:
                try:
                    beat = client.get_run(parent_id).data.tags.get("sweep.heartbeat")
                    heartbeats[parent_id] = float(beat) if beat else None
                except Exception:  # noqa: BLE001 - unreadable now (a passing server error): unknown, never "dead"
                    heartbeats[parent_id] = unknown
            owner = tags.get("sweep.owner", "")
            if heartbeats[parent_id] is unknown or owner_alive(owner, heartbeats[parent_id]):
                continue
            pid_host = owner.split("|")
            who = f"pid {pid_host[2]} on {pid_host[0]}" if len(pid_host) == 4 else "an unknown process"
            client.set_tag(run.info.run_id, "status", "KILLED")
            client.set_tag(run.info.run_id, "error", f"left RUNNING by a sweep that no longer runs ({who})")
            client.set_terminated(run.info.run_id, MLFLOW_STATUS["KILLED"])
            marked.append(run.info.run_name)
        return marked

    def _plan(self, client, experiment_id: str, spec: RunSpec) -> tuple[str, Any]:
        """("new", None), or with --resume ("reuse", run) for a run that PASSED with the same
        config, or ("resume", run) for the latest TIMED_OUT / KILLED one with a checkpoint."""
        if not self.resume:
            return "new", None
        found = client.search_runs([experiment_id], filter_string=f"tags.config_hash = '{config_hash(spec)}'",
                                   order_by=["attributes.start_time DESC"], max_results=1000)
        found = [r for r in found if r.info.run_name == spec.name]
        for run in found:
            if run.data.tags.get("status") == "PASSED":
                return "reuse", run
        for run in found:
            if run.data.tags.get("status") in ("TIMED_OUT", "KILLED") and "checkpoint_episode" in run.data.tags:
                return "resume", run
        return "new", None

    def _create_child(self, client, experiment_id: str, spec: RunSpec, outcome: RunOutcome) -> None:
        """Create the child run (``outcome.run_id`` is set as soon as it exists), its params and config."""
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

        exp = spec.exp
        tags = {
            MLFLOW_PARENT_RUN_ID: self.parent_run_id,
            MLFLOW_RUN_NAME: spec.name,
            "status": "RUNNING",
            "experiment": exp.name,
            "seed": str(spec.seed),
            "task": exp.task,
            "algorithm": exp.algorithm,
            "backend": exp.backend,
            "gradient": exp.gradient,
            "config_hash": config_hash(spec),
            "sweep.owner": self.owner,
            **self.environment_tags,
        }
        tags["mlflow.note.content"] = run_description(spec)
        outcome.run_id = client.create_run(experiment_id, tags=tags, run_name=spec.name).info.run_id
        resolved = exp.model_dump(mode="json")
        resolved["seed"] = spec.seed
        resolved.pop("seeds", None)
        log_params(client, outcome.run_id, flatten_dict(resolved))
        client.log_text(outcome.run_id, yaml.safe_dump(resolved, sort_keys=False), "config.yaml")

    def _reopen(self, client, run, outcome: RunOutcome) -> None:
        """Take over an interrupted run for ``--resume``: it continues in the same MLflow run,
        now a child of this sweep."""
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        run_id = outcome.run_id = run.info.run_id
        tags = run.data.tags
        client.set_tag(run_id, "resumed_from_sweep", tags.get(MLFLOW_PARENT_RUN_ID, ""))
        client.set_tag(run_id, "resumed_from_episode", tags["checkpoint_episode"])
        client.set_tag(run_id, MLFLOW_PARENT_RUN_ID, self.parent_run_id)
        client.set_tag(run_id, "sweep.owner", self.owner)
        client.set_tag(run_id, "status", "RUNNING")
        if "error" in tags:
            client.delete_tag(run_id, "error")
        client.update_run(run_id, status="RUNNING")

    @staticmethod
    def _reused(spec: RunSpec, run) -> RunOutcome:
        summary = {k: v for k, v in json.loads(run.data.tags.get("summary", "{}")).items() if v is not None}
        return RunOutcome(
            spec, "PASSED", run.data.metrics.get("time/wall_s", 0.0),
            final_avg_return=summary.get("final_avg_return", float("nan")),
            final_fidelity=summary.get("final_fidelity", float("nan")),
            baselines={k: summary[k] for k in BASELINE_METRICS if k in summary},
            episodes_done=summary.get("episodes_done", 0),
            grad_circuit_evals=summary.get("grad_circuit_evals"),
            total_circuit_evals=summary.get("total_circuit_evals"),
            run_id=run.info.run_id, reused=True,
        )

    # -- executing ------------------------------------------------------------------------------

    def _start(self, client, experiment_id: str, spec: RunSpec, index: int, action: str, prior, display: _Display,
               active: list[_Job]) -> bool:
        """Set up the run in the store and submit its worker; whether it is now running. A run
        whose set-up fails (a full disk, a store error, a worker that cannot start) is completed
        FAILED with the reason, and the sweep goes on."""
        job = _Job(spec, index, RunOutcome(spec, "FAILED", 0.0))
        active.append(job)  # before anything is created: an interrupt from here on finds it
        note = f" (resuming from episode {prior.data.tags['checkpoint_episode']})" if action == "resume" else ""
        display.start_run(spec.name, spec.exp.total_steps, PROGRESS_LABEL[spec.exp.task], note)
        stage = "set up the run in the tracking store"
        try:
            if action == "resume":
                self._reopen(client, prior, job.outcome)
            else:
                self._create_child(client, experiment_id, spec, job.outcome)
            stage = "start the worker"
            args = (spec.exp.model_dump(mode="json"), spec.seed, spec.name, self.tracking_uri, job.outcome.run_id,
                    action == "resume", self.system_metrics)
            self.executor.submit(job, args)
            return True
        except Exception as exc:  # noqa: BLE001 - the run ends FAILED with the reason; the sweep goes on
            job.outcome.error = f"could not {stage}: {_one_line(exc)}"
            self._complete(client, job)
            return False

    def _handle(self, job: _Job, event, display: _Display) -> None:
        kind = event[0]
        if kind == "progress":
            job.outcome.episodes_done = event[1]
            display.update(job.spec.name, event[1], event[2], event[3])
        else:  # "done" with the result, or "error" with the message
            job.received[kind] = event[1]

    def _poll(self, client, job: _Job, display: _Display) -> bool:
        """Handle what the worker sent; complete the job if it ended or is past its deadline."""
        events, ended = self.executor.events(job)
        for event in events:
            self._handle(job, event, display)
        if not ended:
            if time.monotonic() < job.deadline:
                return False
            job.outcome.status = "TIMED_OUT"
            job.outcome.error = f"exceeded timeout_s={job.spec.exp.timeout_s:g} at episode {job.outcome.episodes_done}"
            self.executor.kill(job)
        self._complete(client, job)
        return True

    def _complete(self, client, job: _Job) -> None:
        outcome, spec = job.outcome, job.spec
        clean_exit = self.executor.finish(job)
        outcome.wall_s = time.monotonic() - job.start if job.start else 0.0
        if outcome.status not in ("TIMED_OUT", "KILLED"):  # the worker ended on its own
            result, error = job.received.get("done"), job.received.get("error")
            if result is not None and clean_exit:
                outcome.status = "PASSED"
                outcome.final_avg_return = result["final_avg_return"]
                outcome.final_fidelity = result["final_fidelity"]
                outcome.episodes_done = result["episodes_done"]
                outcome.grad_circuit_evals = result["grad_circuit_evals"]
                outcome.total_circuit_evals = result["total_circuit_evals"]
                outcome.baselines = {k: result[k] for k in BASELINE_METRICS if result.get(k) is not None}
            else:
                outcome.status = "FAILED"
                outcome.error = outcome.error or error or "the worker ended without a result (crashed or killed)"
        if spec.exp.backend == "classical":
            outcome.grad_circuit_evals = outcome.total_circuit_evals = None
        run_id = outcome.run_id
        if run_id is None:  # never created in the store
            return
        if job.output_path is not None:
            if os.path.getsize(job.output_path):
                self._store(spec.name, client.log_text, run_id, Path(job.output_path).read_text(errors="replace"),
                            "worker_output.txt")
            os.unlink(job.output_path)
        if outcome.status == "PASSED":
            self._store(spec.name, client.set_tag, run_id, "summary", json.dumps(job.received["done"]))
        else:
            history = self._store(spec.name, client.get_metric_history, run_id, PROGRESS_METRIC[spec.exp.task]) or []
            if history:
                last = max(history, key=lambda m: m.step).value
                if spec.exp.task == "cartpole":
                    outcome.final_avg_return = last
                else:
                    outcome.final_fidelity = last
        if outcome.error:
            self._store(spec.name, client.set_tag, run_id, "error", outcome.error[:5000])
        self._store(spec.name, log_metrics, client, run_id, {"time/wall_s": outcome.wall_s}, outcome.episodes_done)
        self._store(spec.name, log_metrics, client, run_id, {"final/wall_s": outcome.wall_s}, 0)
        self._store(spec.name, client.set_tag, run_id, "status", outcome.status)
        self._store(spec.name, client.set_terminated, run_id, MLFLOW_STATUS[outcome.status])

    def _store(self, what: str, call, *args, **kwargs):
        """One write to (or read from) the tracking store on the sweep's way to a status. A failure
        (a full disk, a broken store) is recorded in ``store_errors`` rather than ending the sweep,
        so every run still gets its status where the store takes one; ``run.py`` reports the
        failures in one line and exits 1. Returns the call's result, None when it failed."""
        try:
            return call(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - recorded and reported, never swallowed
            self.store_errors.append(f"{what}: {_one_line(exc)}")
            return None

    def _wait(self, active: list[_Job]) -> None:
        """Sleep until a worker sends something or exits, a deadline passes, or a heartbeat is due."""
        now = time.monotonic()
        self.executor.wait(active, max(0.0, min([j.deadline - now for j in active] + [self.HEARTBEAT_S])))

    def _heartbeat(self, client) -> None:
        if time.monotonic() - self._last_heartbeat >= self.HEARTBEAT_S:
            self._last_heartbeat = time.monotonic()
            client.set_tag(self.parent_run_id, "sweep.heartbeat", f"{time.time():.0f}")

    def run(self) -> list[RunOutcome]:
        """Run the sweep; always ends every run it created and its parent run with a status."""
        if self.executor is None:
            self.executor = LocalExecutor()
        try:
            return self._run()
        finally:
            self.executor.close()

    def _run(self) -> list[RunOutcome]:
        from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

        client = mlflow_client(self.tracking_uri)
        experiment_id = self.experiment_id = get_or_create_experiment(client, self.experiment_name)
        describe_experiment(client, experiment_id, self.cfg)
        prepare_store(self.tracking_uri)
        stale = self.mark_stale_runs(client, experiment_id)
        if stale:
            print(f"Marked KILLED {len(stale)} run(s) left RUNNING by a sweep that died: {', '.join(stale)}", flush=True)
        plan = [(spec, *self._plan(client, experiment_id, spec)) for spec in self.runs]
        sweep_name = f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
        outcomes: dict[int, RunOutcome] = {}
        pending = deque(enumerate(plan))
        active: list[_Job] = []
        display = _Display(len(self.runs), self.live)
        t0 = time.monotonic()
        try:
            self.parent_run_id = client.create_run(
                experiment_id,
                tags={MLFLOW_RUN_NAME: sweep_name, "kind": "sweep", "config": self.cfg.source, "status": "RUNNING",
                      "sweep.owner": self.owner, **self.environment_tags},
                run_name=sweep_name,
            ).info.run_id
            self._heartbeat(client)
            self._store("sweep params", log_params, client, self.parent_run_id, {
                "config": self.cfg.source, "n_runs": len(self.runs), "jobs": self.jobs, "resume": self.resume,
                "executor": self.executor.name})
            self._store("sweep_config.yaml", client.log_text, self.parent_run_id, yaml.safe_dump(
                {"experiments": [e.model_dump(mode="json") for e in self.cfg.experiments]}, sort_keys=False), "sweep_config.yaml")
            while pending or active:
                while pending and len(active) < self.jobs:
                    index, (spec, action, prior) = pending.popleft()
                    if action == "reuse":
                        outcomes[index] = self._reused(spec, prior)
                        display.end_run(outcomes[index])
                        continue
                    if not self._start(client, experiment_id, spec, index, action, prior, display, active):
                        job = active.pop()
                        outcomes[index] = job.outcome
                        display.end_run(job.outcome)
                if not active:
                    continue
                self._wait(active)
                for job in list(active):
                    if self._poll(client, job, display):
                        active.remove(job)
                        outcomes[job.index] = job.outcome
                        display.end_run(job.outcome)
                self._heartbeat(client)
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM / SIGHUP (run.py raises a subclass with .signum)
            self.interrupted = getattr(exc, "signum", signal.SIGINT)
            with _signals_ignored():  # a second Ctrl-C must not leave runs RUNNING halfway through
                for job in active:
                    self.executor.kill(job)
                    job.outcome.status = "KILLED"
                    job.outcome.error = f"sweep interrupted ({signal.Signals(self.interrupted).name}) at episode {job.outcome.episodes_done}"
                    self._complete(client, job)
                    outcomes[job.index] = job.outcome
                    display.end_run(job.outcome)
        except Exception as exc:  # a store that fails mid-sweep: end what runs, then report it
            self.store_errors.append(f"sweep: {_one_line(exc)}")
            for job in active:
                self.executor.kill(job)
                job.outcome.error = f"the sweep stopped: {_one_line(exc)}"
                self._complete(client, job)
                outcomes[job.index] = job.outcome
        finally:
            display.close()
        total_s = time.monotonic() - t0
        finished = [outcomes[i] for i in sorted(outcomes)]
        with _signals_ignored():
            self._report(client, finished, len(pending), total_s)
        return finished

    def _report(self, client, outcomes: list[RunOutcome], not_started: int, total_s: float) -> None:
        """Summary on the terminal and in the parent run, figures, and the parent's status. Every
        write goes through :meth:`_store`: a full disk costs the artifacts, never the statuses."""
        rows = summary_rows(outcomes)
        columns = summary_columns({spec.exp.task for spec in self.runs})
        print_summary(rows, columns, total_s)
        lines = headline(outcomes)
        for line in lines:
            print(f"  {line}")
        if not_started:
            print(f"{not_started} run(s) not started because the sweep was interrupted.")
        reused = sum(o.reused for o in outcomes)
        if reused:
            print(f"{reused} run(s) had PASSED earlier with the same config and were not run again (--resume).")
        if self.parent_run_id is None:
            return
        parent = self.parent_run_id
        note = "\n".join([f"**{self.cfg.source}**: {len(outcomes)} run(s) in {total_s:.1f} s.", "",
                           *[f"- {line}" for line in lines + failure_lines(outcomes)], "", summary_markdown(rows, columns)])
        self._store("sweep note", client.set_tag, parent, "mlflow.note.content", note)
        counts = {s: sum(o.status == s for o in outcomes) for s in STATUSES}
        sweep_metrics = {"sweep/wall_s": total_s, "sweep/n_not_started": not_started, "sweep/n_reused": reused,
                         **{f"sweep/n_{k.lower()}": v for k, v in counts.items()}}
        if self.executor.startup_s is not None:
            sweep_metrics["sweep/startup_s"] = self.executor.startup_s
        self._store("sweep metrics", log_metrics, client, parent, sweep_metrics, 0)
        self._store("summary.md", client.log_text, parent, summary_markdown(rows, columns), "summary.md")
        self._store("summary.csv", client.log_text, parent, summary_csv(rows, columns), "summary.csv")
        self._store("comparison.png", lambda: _log_figure(client, parent, comparison_figure(client, outcomes), "comparison.png"))
        meta_runs = [o for o in outcomes if o.spec.exp.task == "qubit_meta" and o.status == "PASSED"]
        if meta_runs:
            self._store("gap_vs_variance.png",
                        lambda: _log_figure(client, parent, gap_vs_variance_figure(client, meta_runs), "gap_vs_variance.png"))
        all_passed = not self.interrupted and all(o.status == "PASSED" for o in outcomes)
        sweep_status = "KILLED" if self.interrupted else ("PASSED" if all_passed and not self.store_errors else "FAILED")
        if self.store_errors:
            self._store("sweep", client.set_tag, parent, "error", "; ".join(self.store_errors)[:5000])
        self._store("sweep", client.set_tag, parent, "status", sweep_status)
        self._store("sweep", client.set_terminated, parent, MLFLOW_STATUS[sweep_status])
        self._print_where(outcomes)

    def _print_where(self, outcomes: list[RunOutcome]) -> None:
        """Where the results are, how to open them, and where each failure's traceback is."""
        uri, exp_id = self.tracking_uri, self.experiment_id
        print(f"Results: experiment {self.experiment_name!r} (id {exp_id}) in {uri}, sweep run {self.parent_run_id}")
        page = f"#/experiments/{exp_id}/runs/{self.parent_run_id}?workflowType=machine_learning"  # not the GenAI pages
        if uri.startswith(("http://", "https://")):
            print(f"Open: {uri.rstrip('/')}/{page}")
        else:
            print(f"Open: mlflow ui --backend-store-uri {uri}   then http://127.0.0.1:5000/{page}")
        for o in outcomes:
            if o.status in ("FAILED", "TIMED_OUT") and o.run_id is not None:
                where = ("traceback: mlflow artifacts download -r " + o.run_id + " -a traceback.txt"
                         if o.status == "FAILED" else "cut at its time limit")
                print(f"  {o.spec.name} {o.status}: {o.error} ({where})")


def describe_experiment(client, experiment_id: str, cfg: SweepConfig) -> None:
    """Make the MLflow UI open the experiment on its runs (MLflow 3 shows "GenAI" pages unless the
    experiment says it is model training) and give it a description, unless it has one."""
    tags = client.get_experiment(experiment_id).tags
    if "mlflow.experimentKind" not in tags:
        client.set_experiment_tag(experiment_id, "mlflow.experimentKind", "custom_model_development")
    if "mlflow.note.content" not in tags:
        tasks = sorted({TASK_TITLES[e.task] for e in cfg.experiments})
        client.set_experiment_tag(experiment_id, "mlflow.note.content", (
            f"Quantum-circuit simulator stacks compared on {', '.join(tasks)}: one parent run per sweep (its "
            "description holds the summary table), one child run per experiment x seed. Useful columns: tags "
            "backend, gradient, algorithm, status; metrics final/return or final/fidelity, final/wall_s, "
            "final/circuit_evals."))


@contextlib.contextmanager
def _signals_ignored():
    """Ignore Ctrl-C, SIGTERM and SIGHUP inside the block (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _one_line(exc: BaseException, limit: int = 300) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:limit]}"


def _stop(proc) -> None:
    """Terminate a worker, then kill it if it does not die within a second."""
    if proc.is_alive():
        proc.terminate()
        proc.join(1.0)
    if proc.is_alive():
        proc.kill()
