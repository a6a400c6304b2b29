"""``task: pendulum_meta``: model-based meta-RL on a family of Pendulum-v1 tasks varying g, m, l
(metarl/). ``meta_algorithm: maml | reptile | context`` meta-learns the dynamics model across the
train tasks; ``pooled`` is the baseline (one model on the pooled data, never adapted). The CEM
planner with the known reward acts; returns after 0, 1, 2 adaptation episodes on held-out and
out-of-distribution tasks are the results. The score is the held-out return after the last
adaptation episode (``final/eval_return``)."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from config_schema import ExperimentConfig
from metarl.config import PendulumMetaConfig
from tasks import Task, register_task

META_ALGORITHMS = ("maml", "reptile", "context", "pooled")


class PendulumMetaExperiment(ExperimentConfig):
    task: Literal["pendulum_meta"] = "pendulum_meta"
    algorithm: str = "pets"
    meta_algorithm: Literal["maml", "reptile", "context", "pooled"] = "maml"
    """What is meta-learned about the dynamics model (``pooled``: nothing, the baseline)."""
    pendulum_meta: PendulumMetaConfig = PendulumMetaConfig()
    """The family, its splits, the model, the meta-learner and the planner."""

    @model_validator(mode="after")
    def _classical_only(self) -> PendulumMetaExperiment:
        if self.backend != "classical" or self.gradient != "backprop":
            raise ValueError("field 'backend': pendulum_meta's dynamics model is classical (backend 'classical', "
                             f"gradient 'backprop'); got backend {self.backend!r}, gradient {self.gradient!r}")
        return self

    @property
    def total_steps(self) -> int:
        return self.pendulum_meta.total_iterations

    def description_extra(self) -> str:
        return f", {self.meta_algorithm}, {self.pendulum_meta.total_iterations} meta-iterations"

    def drop_unused(self, data: dict) -> None:
        data.pop("model", None)


register_task(Task(
    name="pendulum_meta",
    title="Pendulum-v1 family (g, m, l)",
    config=PendulumMetaExperiment,
    trainers={"pets": "metarl.train:train_pendulum_meta"},
    progress_metric="meta/loss",
    progress_label="meta loss",
    step_unit="meta-iteration",
    score_column="final_eval_return",
    score_metric="final/eval_return",
    score_label="held-out return after adaptation",
    extra_columns={"ood_return": "final/ood_return", "heldout_ep0": "adapt/heldout/return_ep0",
                   "ood_ep0": "adapt/ood/return_ep0"},
    sections=("pendulum_meta",),
))
