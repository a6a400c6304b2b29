"""What a sweep runs and what each run ended with: run specs, outcomes, statuses, the config hash."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from backends import BACKENDS
from config_schema import ExperimentConfig, SweepConfig
from tasks import Task, task_of

STATUSES = ("PASSED", "FAILED", "TIMED_OUT", "KILLED")
MLFLOW_STATUS = {"PASSED": "FINISHED", "FAILED": "FAILED", "TIMED_OUT": "KILLED", "KILLED": "KILLED"}


@dataclass
class RunSpec:
    exp: ExperimentConfig
    seed: int

    @property
    def name(self) -> str:
        return f"{self.exp.name}-seed{self.seed}"

    @property
    def task(self) -> Task:
        return task_of(self.exp)


@dataclass
class RunOutcome:
    spec: RunSpec
    status: str
    wall_s: float
    score: float = float("nan")
    """The task's score (its ``score_metric``; for a run that did not pass, the last progress value)."""
    steps_done: int = 0
    """Progress steps done, in the task's unit (episodes, meta-iterations)."""
    grad_circuit_evals: int | None = None
    total_circuit_evals: int | None = None
    run_id: str | None = None
    error: str | None = None
    reused: bool = False
    """PASSED in an earlier sweep with the same resolved config (``--resume``): not run again."""
    columns: dict[str, float] = field(default_factory=dict)
    """The task's other summary columns (qubit_meta: the robust pulse, the per-task optimum)."""

    @property
    def cost_per_step(self) -> tuple[float | None, float | None]:
        """Wall seconds and circuit evaluations per progress step (episode, meta-iteration)."""
        steps = self.steps_done
        if not steps:
            return None, None
        evals = None if self.total_circuit_evals is None else self.total_circuit_evals / steps
        return self.wall_s / steps, evals


def expand(cfg: SweepConfig) -> list[RunSpec]:
    return [RunSpec(exp, seed) for exp in cfg.experiments for seed in exp.seed_list]


def run_description(spec: RunSpec) -> str:
    """One line for the run's description in the MLflow UI (tag ``mlflow.note.content``)."""
    exp = spec.exp
    what = (f"{exp.model.n_qubits}-qubit, {exp.model.n_layers}-layer circuit" if BACKENDS.get(exp.backend).is_circuit
            else "MLP")
    return (f"{exp.algorithm.upper()} on {spec.task.title}: {what} on {exp.backend}, gradient {exp.gradient}, "
            f"seed {spec.seed}{exp.description_extra()}. Config: artifact config.yaml.")


def config_hash(spec: RunSpec) -> str:
    """Hash of everything that decides a run's result: the resolved experiment and the seed
    (the time limit and the seed list excluded). Tag ``config_hash`` of every child run."""
    resolved = spec.exp.model_dump(mode="json")
    for key in ("timeout_s", "seeds", "seed"):
        resolved.pop(key, None)
    resolved["seed"] = spec.seed
    return hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:16]
