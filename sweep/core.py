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
import json
import os
import signal
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import yaml

from backends import BACKENDS
from config_schema import SweepConfig
from sweep.display import Display
from sweep.executors import Job, LocalExecutor, RayExecutor
from sweep.plan import (
    MLFLOW_STATUS,
    STATUSES,
    RunOutcome,
    RunSpec,
    config_hash,
    expand,
    run_description,
)
from sweep.report import (
    comparison_figure,
    failure_lines,
    headline,
    log_figure,
    print_summary,
    summary_columns,
    summary_csv,
    summary_markdown,
    summary_rows,
)
from sweep.tracking import (
    get_or_create_experiment,
    log_metrics,
    log_params,
    mlflow_client,
    owner_alive,
    prepare_store,
    process_owner,
)
from tasks import task_of
from utils import flatten_dict, git_commit, library_versions


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
        self.environment_tags.update({"mlflow.source.name": str(Path(__file__).resolve().parents[1] / "run.py"),
                                      "mlflow.source.type": "LOCAL"})
        commit = git_commit(Path(__file__).resolve().parents[1])
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
        outcome = RunOutcome(spec, "PASSED", run.data.metrics.get("time/wall_s", 0.0), run_id=run.info.run_id, reused=True)
        _apply_summary(outcome, json.loads(run.data.tags.get("summary", "{}")))
        return outcome

    # -- executing ------------------------------------------------------------------------------

    def _start(self, client, experiment_id: str, spec: RunSpec, index: int, action: str, prior, display: Display,
               active: list[Job]) -> bool:
        """Set up the run in the store and submit its worker; whether it is now running. A run
        whose set-up fails (a full disk, a store error, a worker that cannot start) is completed
        FAILED with the reason, and the sweep goes on."""
        job = Job(spec, index, RunOutcome(spec, "FAILED", 0.0))
        active.append(job)  # before anything is created: an interrupt from here on finds it
        note = f" (resuming from {spec.task.step_unit} {prior.data.tags['checkpoint_episode']})" if action == "resume" else ""
        display.start_run(spec.name, spec.exp.total_steps, spec.task.progress_label, note)
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
            job.outcome.error = f"could not {stage}: {one_line(exc)}"
            self._complete(client, job)
            return False

    def _handle(self, job: Job, event, display: Display) -> None:
        kind = event[0]
        if kind == "progress":
            job.outcome.steps_done = event[1]
            display.update(job.spec.name, event[1], event[2], event[3])
        else:  # "done" with the result, or "error" with the message
            job.received[kind] = event[1]

    def _poll(self, client, job: Job, display: Display) -> bool:
        """Handle what the worker sent; complete the job if it ended or is past its deadline."""
        events, ended = self.executor.events(job)
        for event in events:
            self._handle(job, event, display)
        if not ended:
            if time.monotonic() < job.deadline:
                return False
            job.outcome.status = "TIMED_OUT"
            job.outcome.error = f"exceeded timeout_s={job.spec.exp.timeout_s:g} at {job.spec.task.step_unit} {job.outcome.steps_done}"
            self.executor.kill(job)
        self._complete(client, job)
        return True

    def _complete(self, client, job: Job) -> None:
        outcome, spec = job.outcome, job.spec
        clean_exit = self.executor.finish(job)
        outcome.wall_s = time.monotonic() - job.start if job.start else 0.0
        if outcome.status not in ("TIMED_OUT", "KILLED"):  # the worker ended on its own
            result, error = job.received.get("done"), job.received.get("error")
            if result is not None and clean_exit:
                outcome.status = "PASSED"
                _apply_summary(outcome, result)
            else:
                outcome.status = "FAILED"
                outcome.error = outcome.error or error or "the worker ended without a result (crashed or killed)"
        if not BACKENDS.get(spec.exp.backend).is_circuit:
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
            history = self._store(spec.name, client.get_metric_history, run_id, spec.task.progress_metric) or []
            if history:
                outcome.score = max(history, key=lambda m: m.step).value
        if outcome.error:
            self._store(spec.name, client.set_tag, run_id, "error", outcome.error[:5000])
        self._store(spec.name, log_metrics, client, run_id, {"time/wall_s": outcome.wall_s}, outcome.steps_done)
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
            self.store_errors.append(f"{what}: {one_line(exc)}")
            return None

    def _wait(self, active: list[Job]) -> None:
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
        active: list[Job] = []
        display = Display(len(self.runs), self.live)
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
                    job.outcome.error = f"sweep interrupted ({signal.Signals(self.interrupted).name}) at {job.spec.task.step_unit} {job.outcome.steps_done}"
                    self._complete(client, job)
                    outcomes[job.index] = job.outcome
                    display.end_run(job.outcome)
        except Exception as exc:  # a store that fails mid-sweep: end what runs, then report it
            self.store_errors.append(f"sweep: {one_line(exc)}")
            for job in active:
                self.executor.kill(job)
                job.outcome.error = f"the sweep stopped: {one_line(exc)}"
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
        self._store("comparison.png", lambda: log_figure(client, parent, comparison_figure(client, outcomes), "comparison.png"))
        for task in {o.spec.task.name: o.spec.task for o in outcomes}.values():
            passed = [o for o in outcomes if o.spec.task is task and o.status == "PASSED"]
            for name, figure in task.sweep_figures.items():
                if passed:
                    self._store(name, lambda f=figure, n=name, runs=passed: log_figure(client, parent, f(client, runs), n))
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


def _apply_summary(outcome: RunOutcome, summary: dict) -> None:
    """Fill a passed run's outcome from the summary its worker sent (tag ``summary``)."""
    score = summary.get("score")
    outcome.score = float("nan") if score is None else score
    outcome.steps_done = summary.get("steps_done", 0)
    outcome.grad_circuit_evals = summary.get("grad_circuit_evals")
    outcome.total_circuit_evals = summary.get("total_circuit_evals")
    outcome.columns = {k: v for k, v in summary.get("columns", {}).items() if v is not None}


def describe_experiment(client, experiment_id: str, cfg: SweepConfig) -> None:
    """Make the MLflow UI open the experiment on its runs (MLflow 3 shows "GenAI" pages unless the
    experiment says it is model training) and give it a description, unless it has one."""
    tags = client.get_experiment(experiment_id).tags
    if "mlflow.experimentKind" not in tags:
        client.set_experiment_tag(experiment_id, "mlflow.experimentKind", "custom_model_development")
    if "mlflow.note.content" not in tags:
        tasks = sorted({task_of(e).title for e in cfg.experiments})
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


def one_line(exc: BaseException, limit: int = 300) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:limit]}"
