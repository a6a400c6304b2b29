"""Noisy-qubit pulses: meta-learn a pulse policy (MAML, first-order MAML, Reptile) across noise
settings drawn from power spectral densities, and evaluate it on held-out tasks against the robust
pulse and the per-task optimum. Its config section is ``meta``; the score is the held-out fidelity
after ``meta.inner_steps`` adaptation steps."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from config_schema import ExperimentConfig, MetaConfig
from tasks import Task, register_task


class QubitMetaExperiment(ExperimentConfig):
    task: Literal["qubit_meta"] = "qubit_meta"
    algorithm: str = "maml"
    meta: MetaConfig = MetaConfig()
    """The tasks, the meta-learner and its evaluation."""

    @model_validator(mode="after")
    def _meta_combinations(self) -> QubitMetaExperiment:
        if self.algorithm == "maml" and not self.second_order_capable:
            raise ValueError(
                "field 'algorithm': 'maml' differentiates through the inner loop (second order), which needs "
                "gradient 'backprop' on classical, pennylane with interface 'auto' or 'torch', or tensorcircuit with math_backend 'pytorch'; "
                f"got backend {self.backend!r}, gradient {self.gradient!r}; allowed instead: fomaml, reptile"
            )
        if self.model.observables != "auto":
            raise ValueError("field 'model.observables': qubit_meta reads out <Z_i> and <Z_i Z_i+1>; leave it 'auto'")
        return self

    @model_validator(mode="after")
    def _context_combinations(self) -> QubitMetaExperiment:
        if self.meta.context is not None and (self.algorithm == "reptile" or self.gradient_is_estimated):
            raise ValueError(
                "field 'meta.context': the encoder trains by autograd through the query loss; "
                "allowed: algorithm maml or fomaml with gradient backprop, adjoint or parameter-shift"
            )
        return self

    @property
    def total_steps(self) -> int:
        return self.meta.iterations

    def description_extra(self) -> str:
        return f", {self.meta.noise.model_types} noise"


def gap_vs_variance_figure(client, outcomes: list) -> object:
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


def train(exp, seed: int, reporter, resume: dict | None = None):
    """The trainer of every algorithm: the context-conditioned policy pi(pulse | encoder(support
    measurements)) when ``meta.context`` is set (meta/context.py), else the gradient
    meta-learner (meta/train.py)."""
    if resume is not None:
        raise ValueError("qubit_meta runs have no checkpoints to resume from")
    if exp.meta.context is not None:
        from meta.context import train_context

        return train_context(exp, seed, reporter)
    from meta.train import train_meta

    return train_meta(exp, seed, reporter)


TRAIN_META = "tasks.qubit_meta:train"

register_task(Task(
    name="qubit_meta",
    title="noisy-qubit pulses",
    config=QubitMetaExperiment,
    trainers={"maml": TRAIN_META, "fomaml": TRAIN_META, "reptile": TRAIN_META},
    progress_metric="meta/val_fidelity_post",
    progress_label="validation fidelity",
    step_unit="meta-iteration",
    score_column="heldout_fidelity",
    score_metric="final/fidelity_post",
    score_label="held-out fidelity",
    extra_columns={"fidelity_robust": "final/fidelity_robust", "fidelity_optimum": "final/fidelity_optimum",
                   "gap_to_robust": "final/gap_to_robust"},
    sections=("meta",),
    short_metrics={"final/fidelity": "final/fidelity_post"},
    sweep_figures={"gap_vs_variance.png": gap_vs_variance_figure},
))
