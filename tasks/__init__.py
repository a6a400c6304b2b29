"""The task registry: what a workload is, to the runner.

A task is one module here that defines its experiment config (a subclass of
``config_schema.ExperimentConfig`` with ``task: Literal["<name>"]``, its algorithms and its own
sections) and registers a :class:`Task`: which algorithm trains how, the metric that shows
progress, the score and summary columns, titles and the run description. The sweep, the worker,
the report and ``run.py`` ask the task; none of them names one. Importing this package imports
no simulator and no torch: trainers are ``"module:function"`` strings, imported in the worker.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from registry import Registry, discover, load_external_plugins


@dataclass(frozen=True)
class Task:
    name: str
    title: str
    """What the task is, for people (``"CartPole-v1"``)."""
    config: type
    """The experiment config class (``task: Literal[name]``)."""
    trainers: dict[str, str]
    """algorithm -> ``"module:function"`` with signature ``(exp, seed, reporter, resume) -> result``;
    the result has ``final_metrics()``, ``final_step``, ``state_dict()``, ``figures(title)`` and,
    for a torch policy the worker logs as an MLflow model, ``model``."""
    progress_metric: str
    """Logged while training; the live display, the comparison figure and a cut run's score read it."""
    progress_label: str
    step_unit: str
    """What one progress step is (``"episode"``, ``"meta-iteration"``)."""
    score_column: str
    score_metric: str
    """The final metric that is the run's score, shown as ``score_column``."""
    score_label: str
    extra_columns: dict[str, str] = field(default_factory=dict)
    """More summary columns: column -> final metric."""
    sections: tuple[str, ...] = ()
    """Config sections only this task reads (a ``defaults`` entry for them is ignored by other tasks)."""
    short_metrics: dict[str, str] = field(default_factory=dict)
    """Short names under which headline final metrics are logged too (``final/return``)."""
    sweep_figures: dict[str, Callable[[Any, list], Any]] = field(default_factory=dict)
    """Figures of the parent run over this task's passed runs: file name -> f(client, outcomes)."""
    observation_example: tuple[int, ...] | None = None
    """Shape of one observation, for the logged policy model's signature (None: no MLflow model)."""

    @property
    def algorithms(self) -> tuple[str, ...]:
        return tuple(self.trainers)

    def trainer(self, algorithm: str):
        try:
            target = self.trainers[algorithm]
        except KeyError:
            raise ValueError(f"algorithm {algorithm!r} does not apply to task {self.name!r}; allowed: "
                             f"{', '.join(self.trainers)}") from None
        module, _, function = target.partition(":")
        return getattr(importlib.import_module(module), function)

    @property
    def summary_columns(self) -> dict[str, str]:
        return {self.score_column: self.score_metric, **self.extra_columns}


TASKS: Registry[Task] = Registry("task")


def register_task(task: Task) -> Task:
    return TASKS.register(task.name, task)


def task_of(exp: Any) -> Task:
    return TASKS.get(exp.task)


discover(__name__)
load_external_plugins()  # after the built-ins: a plug-in may build on them
