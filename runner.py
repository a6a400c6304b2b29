"""Run a validated sweep: one OS process per experiment x seed, hard time limits, MLflow runs.

Structure in MLflow: one parent run per sweep invocation, one child run per experiment x seed
(tag ``mlflow.parentRunId``). The parent process creates each child run (params, tags, resolved
config) *before* starting its worker, so a run that times out or crashes still has everything
it logged. The worker logs metrics as it trains; the parent alone decides the final status:

- PASSED: the worker returned a result.
- FAILED: the worker raised (message in tag ``error``, ``traceback.txt`` artifact) or died.
- TIMED_OUT: still running at ``timeout_s``; the process is killed wherever it is.
- KILLED: the sweep was interrupted (Ctrl-C) while the run was going.

Workers come from a ``forkserver`` that has already imported torch, gymnasium, PennyLane,
TensorCircuit and MLflow, so a run starts in milliseconds instead of seconds.
"""

from __future__ import annotations

import csv
import io
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_for_any
from pathlib import Path

import yaml

from config_schema import ExperimentConfig, SweepConfig
from utils import flatten_dict, get_or_create_experiment, git_commit, library_versions, log_metrics, log_params, mlflow_client

#: Test hook: ``NAME:hang`` or ``NAME:raise`` (comma-separated) makes the worker of run NAME block
#: forever inside a C call or raise, after it has logged its first episode.
FAULT_ENV = "QMLBENCH_INJECT_FAULT"
PRELOAD = [
    "train",
    "models",
    "gradients",
    "meta.train",
    "mlflow",
    "mlflow.store.tracking.sqlalchemy_store",  # 0.7 s of imports on a worker's first MLflow call otherwise
    "mlflow.store.tracking.rest_store",
    "pennylane",
    "tensorcircuit",
    "matplotlib.pyplot",
]
STATUSES = ("PASSED", "FAILED", "TIMED_OUT", "KILLED")
MLFLOW_STATUS = {"PASSED": "FINISHED", "FAILED": "FAILED", "TIMED_OUT": "KILLED", "KILLED": "KILLED"}
#: The metric that shows a run's progress (comparison plot; last value of a run that did not pass).
PROGRESS_METRIC = {"cartpole": "rollout/avg_return_10", "qubit_meta": "meta/val_fidelity_post"}
PROGRESS_LABEL = {"cartpole": "avg return", "qubit_meta": "val fidelity"}


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


def expand(cfg: SweepConfig) -> list[RunSpec]:
    return [RunSpec(exp, seed) for exp in cfg.experiments for seed in exp.seed_list]


# ---------------------------------------------------------------------------------------------
# Worker (runs in its own process)


class _WorkerReporter:
    """Logs metrics straight to the run (nothing is lost if the process is killed) and sends progress."""

    def __init__(self, client, run_id: str, run_name: str, events):
        self.client, self.run_id, self.events = client, run_id, events
        self.fault = _injected_fault(run_name)

    def metrics(self, values: dict[str, float], step: int) -> None:
        log_metrics(self.client, self.run_id, values, step)

    def tags(self, values: dict[str, str]) -> None:
        for key, value in values.items():
            self.client.set_tag(self.run_id, key, value)

    def progress(self, episode: int, total: int, avg_return: float) -> None:
        self.events.send(("progress", episode, total, avg_return))
        if self.fault is not None and episode >= 1:
            self.fault(episode)


def _injected_fault(run_name: str):
    """The fault ``$QMLBENCH_INJECT_FAULT`` asks for in this run, as a callable, or None."""
    for item in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        name, _, kind = item.partition(":")
        if name != run_name:
            continue
        if kind == "hang":

            def hang(episode: int):
                import ctypes

                libc = ctypes.CDLL(None)
                while True:  # pause() returns only when a handled signal arrives
                    libc.pause()

            return hang
        if kind == "raise":

            def fail(episode: int):
                raise RuntimeError(f"injected failure in {run_name} at episode {episode}")

            return fail
    return None


def _log_figure(client, run_id: str, fig, artifact_file: str) -> None:
    import matplotlib.pyplot as plt

    client.log_figure(run_id, fig, artifact_file, save_kwargs={"dpi": 110})
    plt.close(fig)


def _worker(exp_data: dict, seed: int, run_name: str, tracking_uri: str, run_id: str, events: Connection) -> None:
    """Train one run; ``events`` (the sending end of a pipe) carries progress, then the result or the error."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C for the sweep
    import torch

    from train import train

    client = mlflow_client(tracking_uri)
    try:
        exp = ExperimentConfig.model_validate(exp_data)
        reporter = _WorkerReporter(client, run_id, run_name, events)
        result = train(exp, seed, reporter)
        log_metrics(client, run_id, result.final_metrics(), result.final_step)
        with tempfile.TemporaryDirectory() as tmp:
            weights = Path(tmp) / "weights.pt"
            torch.save(result.state_dict(), weights)
            client.log_artifact(run_id, str(weights), "model")
        for artifact, fig in result.figures(run_name).items():
            _log_figure(client, run_id, fig, artifact)
        events.send(("done", result.summary()))
    except BaseException as exc:  # noqa: BLE001 - recorded as FAILED by the parent, never swallowed
        message = f"{type(exc).__name__}: {exc}"
        try:
            client.log_text(run_id, traceback.format_exc(), "traceback.txt")
        finally:
            events.send(("error", message))
        sys.exit(1)


# ---------------------------------------------------------------------------------------------
# Display


class _Display:
    """Live progress: rich bars on a terminal, plain lines otherwise."""

    def __init__(self, total: int, live: bool):
        self.total, self.live, self.done = total, live, 0
        self.label = "avg return"
        self._last_line = 0.0
        if live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
            )
            self.sweep_task = self.progress.add_task("runs", total=total)
            self.run_task = None
            self.progress.start()

    def start_run(self, name: str, episodes: int, label: str = "avg return") -> None:
        self.label = label
        if self.live:
            if self.run_task is not None:
                self.progress.remove_task(self.run_task)
            self.run_task = self.progress.add_task(f"  {name}", total=episodes)
        else:
            print(f"[{self.done + 1}/{self.total}] {name}: started", flush=True)

    def update(self, name: str, episode: int, total: int, avg_return: float) -> None:
        if self.live:
            self.progress.update(self.run_task, completed=episode, description=f"  {name} {self.label} {avg_return:6.4g}")
        elif time.monotonic() - self._last_line > 2.0 or episode == total:
            self._last_line = time.monotonic()
            print(f"[{self.done + 1}/{self.total}] {name}: step {episode}/{total}, {self.label} {avg_return:.4g}", flush=True)

    def end_run(self, outcome: RunOutcome) -> None:
        self.done += 1
        if self.live:
            self.progress.update(self.sweep_task, completed=self.done)
            self.progress.console.print(f"{outcome.spec.name}: {outcome.status} in {outcome.wall_s:.1f} s")
        else:
            extra = f" ({outcome.error})" if outcome.error else ""
            print(f"[{self.done}/{self.total}] {outcome.spec.name}: {outcome.status} in {outcome.wall_s:.1f} s{extra}", flush=True)

    def close(self) -> None:
        if self.live:
            self.progress.stop()


# ---------------------------------------------------------------------------------------------
# Summary


BASE_COLUMNS = ("run", "backend", "gradient", "status", "wall_s")
COUNT_COLUMNS = ("grad_circuit_evals", "total_circuit_evals")


def _rounded(value: float, digits: int) -> float | None:
    return None if value != value else round(value, digits)


def summary_rows(outcomes: list[RunOutcome]) -> list[dict]:
    rows = []
    for o in outcomes:
        rows.append({
            "run": o.spec.name,
            "backend": o.spec.exp.backend,
            "gradient": o.spec.exp.gradient,
            "status": o.status,
            "wall_s": round(o.wall_s, 2),
            "final_avg_return": _rounded(o.final_avg_return, 1),
            "final_fidelity": _rounded(o.final_fidelity, 5),
            "grad_circuit_evals": o.grad_circuit_evals,
            "total_circuit_evals": o.total_circuit_evals,
        })
    return rows


def summary_columns(tasks: set[str]) -> tuple[str, ...]:
    """The score columns of the tasks present (avg return for CartPole, fidelity for qubit tasks)."""
    scores = []
    if "cartpole" in tasks:
        scores.append("final_avg_return")
    if "qubit_meta" in tasks:
        scores.append("final_fidelity")
    return BASE_COLUMNS + tuple(scores) + COUNT_COLUMNS


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
    if not console.is_terminal:
        console = Console(width=200)
    console.print(table)


def comparison_figure(client, outcomes: list[RunOutcome]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    for o in outcomes:
        if o.run_id is None:
            continue
        history = sorted(client.get_metric_history(o.run_id, PROGRESS_METRIC[o.spec.exp.task]), key=lambda m: m.step)
        if history:
            ax1.plot([m.step for m in history], [m.value for m in history], label=o.spec.name, lw=1.3)
    tasks = {o.spec.exp.task for o in outcomes}
    if tasks == {"qubit_meta"}:
        ax1.set(xlabel="meta-iteration", ylabel="held-out fidelity after adaptation", title="Fidelity against meta-iteration")
    else:
        ax1.set(xlabel="episode (CartPole) / meta-iteration", ylabel="mean return (last 10) / fidelity", title="Progress")
    if ax1.lines:
        ax1.legend(fontsize=7, loc="upper left")
    names = [o.spec.name for o in outcomes]
    colors = {"PASSED": "tab:green", "FAILED": "tab:red", "TIMED_OUT": "tab:orange", "KILLED": "tab:gray"}
    ax2.barh(names, [o.wall_s for o in outcomes], color=[colors.get(o.status, "tab:gray") for o in outcomes])
    ax2.invert_yaxis()
    ax2.tick_params(axis="y", labelsize=7)
    ax2.set(xlabel="wall time (s)", title="Wall time per run (colour = status)")
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


class Sweep:
    def __init__(self, cfg: SweepConfig, tracking_uri: str, experiment_name: str, live: bool | None = None):
        self.cfg = cfg
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.live = sys.stdout.isatty() if live is None else live
        self.runs = expand(cfg)
        self.interrupted = False
        self.parent_run_id: str | None = None
        #: Tags shared by the parent and every child run, computed once per sweep.
        self.environment_tags = {f"version.{k}": v for k, v in library_versions().items()}
        commit = git_commit(Path(__file__).parent)
        if commit:
            self.environment_tags["git_commit"] = commit

    def _context(self):
        # Python 3.11's forkserver does not apply the parent's sys.path before preloading and
        # skips modules it cannot import without a word; run.py started from another directory
        # would then preload none of the project's modules. The forkserver inherits the environment.
        project = str(Path(__file__).resolve().parent)
        paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
        if project not in paths:
            os.environ["PYTHONPATH"] = os.pathsep.join([project, *filter(None, paths)])
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        # Start it now: its imports (several seconds) overlap the parent's MLflow set-up.
        from multiprocessing import forkserver

        forkserver.ensure_running()
        return ctx

    def _create_child(self, client, experiment_id: str, spec: RunSpec) -> str:
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
            **self.environment_tags,
        }
        run = client.create_run(experiment_id, tags=tags, run_name=spec.name)
        resolved = exp.model_dump(mode="json")
        resolved["seed"] = spec.seed
        resolved.pop("seeds", None)
        log_params(client, run.info.run_id, flatten_dict(resolved))
        client.log_text(run.info.run_id, yaml.safe_dump(resolved, sort_keys=False), "config.yaml")
        return run.info.run_id

    def _finish(self, client, outcome: RunOutcome) -> None:
        run_id = outcome.run_id
        client.set_tag(run_id, "status", outcome.status)
        if outcome.error:
            client.set_tag(run_id, "error", outcome.error[:5000])
        log_metrics(client, run_id, {"time/wall_s": outcome.wall_s}, outcome.episodes_done)
        client.set_terminated(run_id, MLFLOW_STATUS[outcome.status])

    def _execute(self, ctx, client, experiment_id: str, spec: RunSpec, display: _Display) -> RunOutcome:
        run_id = self._create_child(client, experiment_id, spec)
        receiver, events = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=_worker,
            args=(spec.exp.model_dump(mode="json"), spec.seed, spec.name, self.tracking_uri, run_id, events),
            name=spec.name,
        )
        display.start_run(spec.name, spec.exp.total_steps, PROGRESS_LABEL[spec.exp.task])
        start = time.monotonic()
        outcome = RunOutcome(spec, "FAILED", 0.0, run_id=run_id)
        received: dict = {}

        def handle(event) -> None:
            kind = event[0]
            if kind == "progress":
                outcome.episodes_done = event[1]
                display.update(spec.name, event[1], event[2], event[3])
            else:  # "done" with the result, or "error" with the message
                received[kind] = event[1]

        deadline = start + spec.exp.timeout_s
        try:
            proc.start()  # inside the try: the first start waits for the forkserver to preload, Ctrl-C may come then
            events.close()  # the worker holds the sending end now: its exit shows here as end of file
            while True:
                try:
                    while receiver.poll():
                        handle(receiver.recv())
                except EOFError:  # the worker has exited and everything it sent is handled
                    break
                if not proc.is_alive() and not receiver.poll():
                    break
                if time.monotonic() >= deadline:
                    outcome.status = "TIMED_OUT"
                    outcome.error = f"exceeded timeout_s={spec.exp.timeout_s:g} at episode {outcome.episodes_done}"
                    _stop(proc)
                    break
                # Sleep until a message, the worker's exit or the deadline, whichever comes first.
                wait_for_any([receiver, proc.sentinel], timeout=max(0.0, deadline - time.monotonic()))
        except KeyboardInterrupt:
            _stop(proc)
            self.interrupted = True
            outcome.status = "KILLED"
            outcome.error = f"sweep interrupted at episode {outcome.episodes_done}"
        if proc.pid is not None:  # started
            proc.join()
        outcome.wall_s = time.monotonic() - start
        receiver.close()  # (a killed writer may have left half a message: it is not read)
        if outcome.status not in ("TIMED_OUT", "KILLED"):  # the worker ended on its own
            result, error = received.get("done"), received.get("error")
            if result is not None and proc.exitcode == 0:
                outcome.status = "PASSED"
                outcome.final_avg_return = result["final_avg_return"]
                outcome.final_fidelity = result["final_fidelity"]
                outcome.episodes_done = result["episodes_done"]
                outcome.grad_circuit_evals = result["grad_circuit_evals"]
                outcome.total_circuit_evals = result["total_circuit_evals"]
            else:
                outcome.status = "FAILED"
                outcome.error = error or f"worker exited with code {proc.exitcode} without a result"
        if spec.exp.backend == "classical":
            outcome.grad_circuit_evals = outcome.total_circuit_evals = None
        if outcome.status != "PASSED" and outcome.run_id:
            history = client.get_metric_history(run_id, PROGRESS_METRIC[spec.exp.task])
            if history:
                last = max(history, key=lambda m: m.step).value
                if spec.exp.task == "cartpole":
                    outcome.final_avg_return = last
                else:
                    outcome.final_fidelity = last
        self._finish(client, outcome)
        return outcome

    def run(self) -> list[RunOutcome]:
        from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

        client = mlflow_client(self.tracking_uri)
        experiment_id = get_or_create_experiment(client, self.experiment_name)
        sweep_name = f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
        parent = client.create_run(
            experiment_id,
            tags={MLFLOW_RUN_NAME: sweep_name, "kind": "sweep", "config": self.cfg.source, "status": "RUNNING",
                  **self.environment_tags},
            run_name=sweep_name,
        )
        self.parent_run_id = parent.info.run_id
        log_params(client, self.parent_run_id, {"config": self.cfg.source, "n_runs": len(self.runs)})
        client.log_text(self.parent_run_id, yaml.safe_dump(
            {"experiments": [e.model_dump(mode="json") for e in self.cfg.experiments]}, sort_keys=False), "sweep_config.yaml")
        ctx = self._context()
        display = _Display(len(self.runs), self.live)
        outcomes: list[RunOutcome] = []
        t0 = time.monotonic()
        try:
            for spec in self.runs:
                outcome = self._execute(ctx, client, experiment_id, spec, display)
                outcomes.append(outcome)
                display.end_run(outcome)
                if self.interrupted:
                    break
        finally:
            display.close()
        total_s = time.monotonic() - t0
        rows = summary_rows(outcomes)
        columns = summary_columns({spec.exp.task for spec in self.runs})
        print_summary(rows, columns, total_s)
        skipped = len(self.runs) - len(outcomes)
        if skipped:
            print(f"{skipped} run(s) not started because the sweep was interrupted.")
        counts = {s: sum(o.status == s for o in outcomes) for s in STATUSES}
        sweep_metrics = {"sweep/wall_s": total_s, "sweep/n_not_started": skipped, **{f"sweep/n_{k.lower()}": v for k, v in counts.items()}}
        log_metrics(client, self.parent_run_id, sweep_metrics, 0)
        client.log_text(self.parent_run_id, summary_markdown(rows, columns), "summary.md")
        client.log_text(self.parent_run_id, summary_csv(rows, columns), "summary.csv")
        _log_figure(client, self.parent_run_id, comparison_figure(client, outcomes), "comparison.png")
        meta_runs = [o for o in outcomes if o.spec.exp.task == "qubit_meta" and o.status == "PASSED"]
        if meta_runs:
            _log_figure(client, self.parent_run_id, gap_vs_variance_figure(client, meta_runs), "gap_vs_variance.png")
        all_passed = not self.interrupted and all(o.status == "PASSED" for o in outcomes)
        sweep_status = "KILLED" if self.interrupted else ("PASSED" if all_passed else "FAILED")
        client.set_tag(self.parent_run_id, "status", sweep_status)
        client.set_terminated(self.parent_run_id, MLFLOW_STATUS[sweep_status])
        return outcomes


def _stop(proc) -> None:
    """Terminate a worker, then kill it if it does not die within a second."""
    if proc.is_alive():
        proc.terminate()
        proc.join(1.0)
    if proc.is_alive():
        proc.kill()
