"""What a sweep runs and what each run ended with: run specs, outcomes, statuses, the config hash."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from config_schema import ExperimentConfig, SweepConfig

STATUSES = ("PASSED", "FAILED", "TIMED_OUT", "KILLED")
MLFLOW_STATUS = {"PASSED": "FINISHED", "FAILED": "FAILED", "TIMED_OUT": "KILLED", "KILLED": "KILLED"}
#: The metric that shows a run's progress (comparison plot; last value of a run that did not pass).
PROGRESS_METRIC = {"cartpole": "rollout/avg_return_10", "qubit_meta": "meta/val_fidelity_post"}
PROGRESS_LABEL = {"cartpole": "avg return", "qubit_meta": "validation fidelity"}

#: What the summary table and the parent's note show of a qubit run besides its fidelity.
BASELINE_METRICS = {"fidelity_robust": "final/fidelity_robust", "fidelity_optimum": "final/fidelity_optimum",
                    "gap_to_robust": "final/gap_to_robust"}


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


def config_hash(spec: RunSpec) -> str:
    """Hash of everything that decides a run's result: the resolved experiment and the seed
    (the time limit and the seed list excluded). Tag ``config_hash`` of every child run."""
    resolved = spec.exp.model_dump(mode="json")
    for key in ("timeout_s", "seeds", "seed"):
        resolved.pop(key, None)
    resolved["seed"] = spec.seed
    return hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:16]
