"""The ``qubit_meta`` task: meta-train a pulse policy across noise settings and evaluate it.

One run:

1. Baselines on the training distribution: the robust pulse (one pulse, never sees the task).
2. Meta-training for ``meta.iterations`` meta-batches (MAML / FOMAML / Reptile, see
   meta/algorithms.py); every ``meta.eval.every`` iterations a validation pass on held-out
   tasks (before and after ``inner_steps`` adaptation steps).
3. Final evaluation on the held-out tasks: fidelity after k adaptation steps for every k in
   ``meta.eval.k_values``, the robust pulse, the per-task optimum; per model type; and on a
   held-out set of each model type in ``meta.eval.model_types`` (generalisation).

Metrics (MLflow, with steps): ``meta/train_loss`` (query loss after adaptation, per
iteration), ``meta/support_loss_pre``, ``grad/norm``, ``grad/loss_evals``, ``grad/circuit_evals``
(circuits that served the meta-gradient), ``metric/circuit_evals`` (metric-only forwards: Reptile's
query loss); ``meta/val_fidelity_pre``, ``meta/val_fidelity_post``, ``meta/adaptation_gain``,
``eval/circuit_evals`` (per validation pass); ``meta/fidelity_vs_k`` (step = k); ``final/*`` (see
:meth:`MetaResult.final_metrics`). Circuit counts follow docs/CONVENTIONS.md §1.3 and add up:
``final/total_circuit_evals`` = grad + metric + eval (validation passes and the final evaluation).
Fidelities are average gate fidelities (exact) on the held-out tasks.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from config_schema import ExperimentConfig, MetaConfig, NoiseConfig
from meta.algorithms import Losses, TaskGradients, adapt, meta_gradient, per_task_optimum, robust_pulse
from meta.policies import PulsePolicy, build_pulse_policy
from meta.tasks import QubitTasks, TaskFactory
from models import compile_metrics
from noise import PSDToLindblad
from noise.models import FF_VALIDITY, SIMULATIONS, FidelityModel, build_model
from utils import NonFiniteError, seed_everything, seed_streams, select_device

#: A qubit_meta run's random streams (utils.seed_streams): support-loss shots, estimator directions,
#: the training task draws, the robust baseline's start, the held-out tasks (the same validation
#: tasks for every backend and method of a seed) and the cross-check's noise realisations. The
#: policy's initial parameters and the variance estimate come from the seed itself.
SEED_STREAMS = ("shots", "gradient", "train_tasks", "robust", "validation", "crosscheck")


#: Above this fraction of held-out tasks outside the filter function's validity, the run gets a ``warning`` tag.
FF_VALIDITY_WARN_FRACTION = 0.1


def converter_for(noise: NoiseConfig) -> PSDToLindblad:
    """Ramsey-filter dephasing rate (markovian model, gamma_phi features) and golden-rule relaxation at omega0."""
    return PSDToLindblad(omega0=noise.omega0, transverse_coupling=noise.transverse_coupling)


def fidelity_model(meta: MetaConfig, simulation: str | None = None) -> FidelityModel:
    return build_model(simulation or meta.noise.simulation, meta.fine_steps, meta.noise.trajectories)


def simulation_device(exp: ExperimentConfig) -> str:
    """The config's device for the noise simulation; MPS lacks complex128, so it falls back to the CPU."""
    device = select_device(exp.device)
    return "cpu" if device == "mps" else device


def task_factory(exp: ExperimentConfig, simulation: str | None = None, device: str = "cpu") -> TaskFactory:
    meta = exp.meta
    return TaskFactory(meta.noise.distribution(), converter_for(meta.noise), fidelity_model(meta, simulation),
                       meta.target_gate, meta.task_input, meta.fidelity, meta.support.states, meta.support.shots, device)


@dataclass
class Evaluation:
    """Fidelities on one set of held-out tasks (arrays over tasks)."""

    model_types: list[str]
    by_k: dict[int, np.ndarray]
    robust: np.ndarray | None = None
    optimum: np.ndarray | None = None
    pulses: dict[str, torch.Tensor] | None = None
    """Controls (B, N, 2) behind the numbers: ``k<k>`` after k adaptation steps, ``robust``, ``optimum``."""

    def mean(self, k: int, mask: np.ndarray | None = None) -> float:
        values = self.by_k[k] if mask is None else self.by_k[k][mask]
        return float(values.mean())


@dataclass
class MetaResult:
    """What a qubit_meta run hands back to the runner."""

    exp: ExperimentConfig
    theta: torch.Tensor
    robust_pulse: torch.Tensor | None
    policy: PulsePolicy
    train_loss: list[float]
    validation: list[tuple[int, float, float]]
    """(iteration, fidelity before, after inner_steps adaptation) per validation pass."""
    final: Evaluation
    heldout: dict[str, Evaluation]
    variance: dict[str, float]
    loss_evaluations: int
    """Task-loss evaluations that served meta-gradients (evaluation's adaptation excluded)."""
    grad_circuit_evals: int
    """Circuits that served meta-gradients."""
    metric_circuit_evals: int
    """Metric-only circuits of meta-training (Reptile's query loss)."""
    eval_circuit_evals: int
    """Circuits of the validation passes and the final evaluation."""
    wall_s: float
    baselines_s: float
    crosscheck: dict[str, float]
    """The final pulses re-evaluated under every fidelity model, and the model diagnostics (final/crosscheck/*, final/diag/*)."""

    @property
    def iterations(self) -> int:
        return len(self.train_loss)

    @property
    def k_post(self) -> int:
        return self.exp.meta.inner_steps if self.exp.meta.inner_steps in self.final.by_k else max(self.final.by_k)

    @property
    def final_fidelity(self) -> float:
        """Mean held-out fidelity after ``inner_steps`` adaptation steps (the headline number)."""
        return self.final.mean(self.k_post)

    def final_metrics(self) -> dict[str, float]:
        ev = self.final
        k = self.k_post
        m = {
            "final/fidelity_pre": ev.mean(0),
            "final/fidelity_post": ev.mean(k),
            "final/adaptation_gain": ev.mean(k) - ev.mean(0),
            "final/iterations": self.iterations,
            "final/loss_evaluations": self.loss_evaluations,
            "final/grad_circuit_evals": self.grad_circuit_evals,
            "final/metric_circuit_evals": self.metric_circuit_evals,
            "final/eval_circuit_evals": self.eval_circuit_evals,
            "final/total_circuit_evals": self.policy.circuit_evals,
            "final/train_s": self.wall_s,
            "time/baselines_s": self.baselines_s,
            **{f"final/task_variance_{key}": value for key, value in self.variance.items()},
            **{f"final/fidelity_k{kk}": ev.mean(kk) for kk in ev.by_k},
        }
        if ev.robust is not None:
            m["final/fidelity_robust"] = float(ev.robust.mean())
            m["final/gap_to_robust"] = ev.mean(k) - float(ev.robust.mean())
        if ev.optimum is not None:
            m["final/fidelity_optimum"] = float(ev.optimum.mean())
            m["final/gap_to_optimum"] = float(ev.optimum.mean()) - ev.mean(k)
        types = np.array(ev.model_types)
        for model in sorted(set(ev.model_types)):
            mask = types == model
            m[f"final/by_model/{model}/fidelity_pre"] = ev.mean(0, mask)
            m[f"final/by_model/{model}/fidelity_post"] = ev.mean(k, mask)
        for model, hev in self.heldout.items():
            m[f"final/heldout/{model}/fidelity_pre"] = hev.mean(0)
            m[f"final/heldout/{model}/fidelity_post"] = hev.mean(k)
            if hev.robust is not None:
                m[f"final/heldout/{model}/fidelity_robust"] = float(hev.robust.mean())
            if hev.optimum is not None:
                m[f"final/heldout/{model}/fidelity_optimum"] = float(hev.optimum.mean())
        m.update(self.crosscheck)
        m.update(compile_metrics(self.policy))
        return m

    @property
    def final_step(self) -> int:
        return self.iterations

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {"theta": self.theta.detach().cpu()}
        if self.robust_pulse is not None:
            out["robust_pulse"] = self.robust_pulse.cpu()
        return out

    def figures(self, title: str) -> dict:
        return {
            "learning_curve.png": _training_figure(self, title),
            "fidelity_vs_k.png": _fidelity_vs_k_figure(self, title),
            "fidelity_by_model.png": _by_model_figure(self, title),
        }


# ---------------------------------------------------------------------------------------------


def evaluate(
    losses: Losses, grads: TaskGradients, theta: torch.Tensor, tasks: QubitTasks, k_values: list[int], inner_lr: float,
    robust: torch.Tensor | None = None, optimum_steps: int = 0, optimum_lr: float = 0.05, max_amplitude: float = 1.0,
) -> Evaluation:
    """Fidelity on ``tasks`` after k adaptation steps (support loss) for every k in ``k_values``; the
    robust pulse's; and the per-task optimum (Adam from the better of the robust pulse and the pulse
    after max(k_values) adaptation steps, per task)."""
    by_k: dict[int, np.ndarray] = {}
    wanted = set(k_values)

    controls: dict[str, torch.Tensor] = {}

    def record(k: int, phi: torch.Tensor) -> None:
        if k in wanted:
            with torch.no_grad():
                controls[f"k{k}"] = losses.controls(phi, tasks).detach()
                by_k[k] = tasks.fidelity(controls[f"k{k}"]).cpu().numpy().copy()

    start = theta.detach().expand(len(tasks), -1).clone()
    adapt(losses, grads, start, tasks, max(k_values), inner_lr, on_step=record)
    ev = Evaluation(tasks.model_types, by_k, pulses=controls)
    if robust is not None:
        controls["robust"] = robust.expand(len(tasks), -1, -1)
        with torch.no_grad():
            ev.robust = tasks.fidelity(controls["robust"]).cpu().numpy()
        if optimum_steps > 0:
            # from the better of the robust pulse and the most-adapted pulse, task by task
            adapted = controls[f"k{max(k_values)}"]
            better = torch.as_tensor(by_k[max(k_values)] > ev.robust)[:, None, None]
            start_pulses = torch.where(better, adapted, controls["robust"])
            controls["optimum"] = per_task_optimum(tasks, start_pulses, max_amplitude, optimum_steps, optimum_lr)
            with torch.no_grad():
                ev.optimum = tasks.fidelity(controls["optimum"]).cpu().numpy()
    return ev


def model_diagnostics(tasks: QubitTasks, pulses: dict[str, torch.Tensor], prefix: str) -> dict[str, float]:
    """filter_function: fraction of tasks whose first-order noise infidelity exceeds FF_VALIDITY
    (outside the model's validity) per pulse; trajectories: standard error of the mean fidelity."""
    out = {}
    for name, controls in pulses.items():
        diag = tasks.diagnostics(controls)
        if "noise_infidelity" in diag:
            out[f"{prefix}/ff_outside_validity/{name}"] = float(np.mean(diag["noise_infidelity"] > FF_VALIDITY))
        if "stderr" in diag:
            out[f"{prefix}/stderr/{name}"] = float(np.sqrt(np.sum(diag["stderr"] ** 2)) / len(diag["stderr"]))
    return out


def crosscheck(exp: ExperimentConfig, factory: TaskFactory, tasks: QubitTasks, pulses: dict[str, torch.Tensor], seed: int) -> dict[str, float]:
    """The same pulses on the same tasks under every fidelity model (final/crosscheck/<model>/fidelity_<pulse>)."""
    out = {}
    for simulation in SIMULATIONS:
        model = fidelity_model(exp.meta, simulation)
        same = factory.make(tasks.tasks, seed_streams(seed, SEED_STREAMS)["crosscheck"].numpy(), model)
        with torch.no_grad():
            for name, controls in pulses.items():
                out[f"final/crosscheck/{simulation}/fidelity_{name}"] = float(same.fidelity(controls).mean())
        out.update(model_diagnostics(same, pulses, f"final/crosscheck/{simulation}"))
    return out


def robust_baseline(meta: MetaConfig, factory: TaskFactory, rng: np.random.Generator,
                    generator: torch.Generator) -> tuple[torch.Tensor | None, float]:
    """The robust pulse on the training distribution (None when ``meta.baselines.robust_steps`` is
    0) and the seconds it took."""
    t0 = time.monotonic()
    robust = None
    if meta.baselines.robust_steps > 0:
        robust = robust_pulse(lambda n: factory.sample(n, rng), meta.n_segments, meta.max_amplitude,
                              meta.baselines.robust_steps, meta.baselines.robust_batch, meta.baselines.lr, generator)
    return robust, time.monotonic() - t0


def final_checks(exp: ExperimentConfig, factory: TaskFactory, val_tasks: QubitTasks, final: Evaluation, k_post: int,
                 reporter, seed: int) -> dict[str, float]:
    """The final pulses (before and after ``k_post`` steps, robust, optimum) diagnosed under the
    run's fidelity model and re-evaluated under every model (``final/diag/*``,
    ``final/crosscheck/*``); a ``warning`` tag when too many held-out tasks lie outside the
    filter-function model's first-order validity."""
    final_pulses = {name: final.pulses[key] for name, key in (("pre", "k0"), ("post", f"k{k_post}"), ("robust", "robust"),
                                                                ("optimum", "optimum")) if key in final.pulses}
    checks = model_diagnostics(val_tasks, final_pulses, "final/diag")
    outside = checks.get("final/diag/ff_outside_validity/post", 0.0)
    if outside > FF_VALIDITY_WARN_FRACTION:
        reporter.tags({"warning": f"filter_function: {outside:.0%} of the held-out tasks have a first-order noise infidelity above "
                                  f"{FF_VALIDITY} (outside the model's validity); compare final/crosscheck/trajectories/* or use "
                                  "simulation: trajectories"})
    checks.update(crosscheck(exp, factory, val_tasks, final_pulses, seed))
    return checks


def train_meta(exp: ExperimentConfig, seed: int, reporter, resume: dict | None = None) -> MetaResult:
    if resume is not None:
        raise ValueError("qubit_meta runs have no checkpoints to resume from")
    meta = exp.meta
    seed_everything(seed)
    streams = seed_streams(seed, SEED_STREAMS)
    device = simulation_device(exp)
    reporter.tags({"device": device, "device_note": "noise simulation on this device (float64/complex128); the policy on the CPU",
                   "simulation": exp.meta.noise.simulation})
    factory = task_factory(exp, device=device)
    policy = build_pulse_policy(exp, factory.n_inputs)
    losses = Losses(policy, streams["shots"].torch())
    grads = TaskGradients(exp.gradient, streams["gradient"].torch(), exp.spsa.c, exp.spsa.n_directions,
                          exp.finite_diff.step, exp.finite_diff.scheme)
    train_rng = streams["train_tasks"].numpy()
    val_rng = streams["validation"].numpy()
    val_tasks = factory.sample(meta.eval.n_tasks, val_rng)
    heldout_tasks = {
        model: factory.make(meta.noise.distribution([model]).sample(meta.eval.n_tasks, val_rng), val_rng.spawn(1)[0])
        for model in (meta.eval.model_types or [])
    }
    reporter.tags({"n_params": str(policy.n_params), "task_inputs": str(factory.n_inputs)})

    robust, baselines_s = robust_baseline(meta, factory, train_rng, streams["robust"].torch())
    if robust is not None:
        with torch.no_grad():
            robust_val = float(val_tasks.fidelity(robust.expand(len(val_tasks), -1, -1)).mean())
        reporter.metrics({"baseline/robust_fidelity": robust_val, "time/baselines_s": baselines_s}, 0)

    theta = torch.nn.Parameter(policy.init_params(seed))
    optimizer = torch.optim.Adam([theta], lr=meta.meta_lr)
    train_loss: list[float] = []
    validation: list[tuple[int, float, float]] = []
    grad_circuit_evals = metric_circuit_evals = eval_circuit_evals = loss_evaluations = 0
    start = time.monotonic()
    for it in range(1, meta.iterations + 1):
        loss_evals_before = grads.loss_evaluations
        tasks = factory.sample(meta.meta_batch_size, train_rng)
        g, info = meta_gradient(exp.algorithm, losses, grads, theta, tasks, meta.inner_steps, meta.inner_lr)
        norm = float(torch.linalg.vector_norm(g))
        if not math.isfinite(info["query_loss_post"]):
            raise NonFiniteError(f"non-finite loss at iteration {it}")
        if not math.isfinite(norm):
            raise NonFiniteError(f"non-finite gradient at iteration {it}")
        if meta.max_grad_norm is not None and norm > meta.max_grad_norm:
            g = g * (meta.max_grad_norm / norm)
        optimizer.zero_grad()
        theta.grad = g.to(theta.dtype)
        optimizer.step()
        if not torch.isfinite(theta).all():
            raise NonFiniteError(f"non-finite parameter at iteration {it}")
        train_loss.append(info["query_loss_post"])
        loss_evaluations += grads.loss_evaluations - loss_evals_before
        metrics = {"meta/train_loss": info["query_loss_post"], "meta/support_loss_pre": info["support_loss_pre"],
                   "grad/norm": norm, "grad/loss_evals": grads.loss_evaluations - loss_evals_before}
        grad_circuit_evals += info["grad_circuit_evals"]
        metric_circuit_evals += info["metric_circuit_evals"]
        if exp.backend != "classical":
            metrics["grad/circuit_evals"] = info["grad_circuit_evals"]
            metrics["metric/circuit_evals"] = info["metric_circuit_evals"]
        if it % meta.eval.every == 0 or it == meta.iterations:
            eval_before = policy.circuit_evals
            ev = evaluate(losses, grads, theta, val_tasks, sorted({0, meta.inner_steps}), meta.inner_lr)
            eval_circuit_evals += policy.circuit_evals - eval_before
            if exp.backend != "classical":
                metrics["eval/circuit_evals"] = policy.circuit_evals - eval_before
            pre, post = ev.mean(0), ev.mean(meta.inner_steps)
            validation.append((it, pre, post))
            metrics.update({"meta/val_fidelity_pre": pre, "meta/val_fidelity_post": post, "meta/adaptation_gain": post - pre})
            metrics.update(model_diagnostics(val_tasks, {"post": ev.pulses[f"k{meta.inner_steps}"]}, "noise"))
            metrics["time/iterations_per_s"] = it / (time.monotonic() - start)
        reporter.metrics(metrics, it)
        reporter.progress(it, meta.iterations, validation[-1][2] if validation else float("nan"))
    wall_s = time.monotonic() - start

    t1 = time.monotonic()
    eval_before = policy.circuit_evals
    k_values = sorted(set(meta.eval.k_values) | {0, meta.inner_steps})
    common = dict(robust=robust, optimum_steps=meta.baselines.optimum_steps, optimum_lr=meta.baselines.lr,
                  max_amplitude=meta.max_amplitude)
    final = evaluate(losses, grads, theta, val_tasks, k_values, meta.inner_lr, **common)
    heldout = {m: evaluate(losses, grads, theta, t, k_values, meta.inner_lr, **common) for m, t in heldout_tasks.items()}
    eval_circuit_evals += policy.circuit_evals - eval_before
    for k in k_values:
        reporter.metrics({"meta/fidelity_vs_k": final.mean(k)}, k)
    variance = factory.distribution.compute_variance(factory.converter, n_samples=2000, seed=seed)
    checks = final_checks(exp, factory, val_tasks, final, meta.inner_steps, reporter, seed)
    result = MetaResult(exp, theta.detach(), robust, policy, train_loss, validation, final, heldout, variance,
                        loss_evaluations, grad_circuit_evals, metric_circuit_evals, eval_circuit_evals, wall_s,
                        baselines_s + time.monotonic() - t1, checks)
    return result


# ---------------------------------------------------------------------------------------------
# Figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _training_figure(result: MetaResult, title: str):
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax1.semilogy(np.arange(1, result.iterations + 1), result.train_loss, lw=0.8)
    ax1.set(xlabel="meta-iteration", ylabel="query loss after adaptation (1 - F)", title=title)
    if result.validation:
        its, pre, post = zip(*result.validation)
        ax2.plot(its, pre, "o-", label="before adaptation")
        ax2.plot(its, post, "o-", label=f"after {result.exp.meta.inner_steps} steps")
        ax2.legend()
    ax2.set(xlabel="meta-iteration", ylabel="held-out fidelity", title="validation")
    fig.tight_layout()
    return fig


def _fidelity_vs_k_figure(result: MetaResult, title: str):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    ks = sorted(result.final.by_k)
    ax.plot(ks, [result.final.mean(k) for k in ks], "o-", label="meta-learned, adapted k steps")
    if result.final.robust is not None:
        ax.axhline(float(result.final.robust.mean()), color="tab:orange", ls="--", label="robust pulse")
    if result.final.optimum is not None:
        ax.axhline(float(result.final.optimum.mean()), color="tab:green", ls=":", label="per-task optimum")
    ax.set(xlabel="adaptation steps k", ylabel="mean held-out fidelity", title=title)
    ax.legend()
    fig.tight_layout()
    return fig


def _by_model_figure(result: MetaResult, title: str):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    groups = {"validation (training mix)": result.final, **{f"held-out {m}": ev for m, ev in result.heldout.items()}}
    k = result.k_post
    labels, cols = list(groups), [("before", 0), (f"after {k}", k)]
    width = 0.2
    x = np.arange(len(labels))
    for i, (name, kk) in enumerate(cols):
        ax.bar(x + (i - 1.5) * width, [ev.mean(kk) for ev in groups.values()], width, label=name)
    ax.bar(x + 0.5 * width, [float(ev.robust.mean()) if ev.robust is not None else np.nan for ev in groups.values()],
           width, label="robust")
    ax.bar(x + 1.5 * width, [float(ev.optimum.mean()) if ev.optimum is not None else np.nan for ev in groups.values()],
           width, label="optimum")
    ax.set_xticks(x, labels, fontsize=8)
    lows = [min(ev.by_k[0].mean(), ev.by_k[k].mean()) for ev in groups.values()]
    ax.set_ylim(max(0.0, min(lows) - 0.05), 1.0)
    ax.set(ylabel="mean fidelity", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
