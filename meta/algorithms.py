"""MAML, first-order MAML and Reptile over a batch of qubit tasks, plus the pulse baselines.

Notation: meta-parameters theta (P,); a meta-batch of B tasks; per-task fast weights phi (B, P);
K inner steps phi <- phi - inner_lr * grad support_loss(phi) (plain gradient steps, as in Finn et
al. 2017), starting from phi = theta for every task.

- ``maml``: meta-gradient = d/d theta mean_b query_loss(phi_b(theta)), differentiating through
  the K inner steps (``torch.autograd.grad(create_graph=True)``; second order, autograd only).
- ``fomaml``: the same with the inner gradients treated as constants: meta-gradient =
  mean_b grad query_loss(phi_b) evaluated at the adapted phi_b.
- ``reptile`` (Nichol et al. 2018): meta-gradient = theta - mean_b phi_b; the query loss is
  reported, not differentiated.

Costs (docs/CONVENTIONS.md §1.3; B tasks, K inner steps; a circuit evaluation is one row through
the policy's circuit, one per task per parameter point). One call of :class:`TaskGradients` costs
c = B (backprop, adjoint: the forward pass; the backward pass runs no circuit of ours), B (1 + 2G)
(parameter shift over the G gate angles of the circuit), B (2m + 1) (SPSA, m directions),
B (2P + 1) or B (P + 1) (central or forward differences, P parameters). Meta-gradient:

- ``maml``: (K + 1) B: K support forwards and the query forward, differentiated through;
- ``fomaml``: (K + 1) c: K support gradients and the query gradient;
- ``reptile``: K c, plus B apart (``metric_circuit_evals``): the query loss after adaptation is
  only a metric, evaluated without gradient.

The support loss before adaptation (``support_loss_pre``) is the first inner step's own loss at
theta, for every method: it costs nothing extra.

The meta-gradient goes to Adam, after clipping its norm. Per-task gradients come from
:class:`TaskGradients`: autograd (one backward over the sum of the task losses: task b's loss
depends on row b only), or SPSA / finite differences from gradients.py, each task's shifted
points evaluated as one batched call.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

import gradients
from meta.policies import PulsePolicy
from meta.tasks import QubitTasks

#: loss(params (M, P), tasks of length M) -> (M,)
TaskLoss = Callable[[torch.Tensor, QubitTasks], torch.Tensor]


class TaskGradients:
    """Per-task gradients of a per-task loss, by the experiment's gradient method."""

    def __init__(self, method: str, generator: torch.Generator, spsa_c: float = 0.1, spsa_directions: int = 1,
                 fd_step: float = 1e-4, fd_scheme: str = "central"):
        self.method, self.generator = method, generator
        self.spsa_c, self.spsa_directions = spsa_c, spsa_directions
        self.fd_step, self.fd_scheme = fd_step, fd_scheme
        self.loss_evaluations = 0

    @property
    def estimated(self) -> bool:
        return self.method in ("spsa", "finite-diff")

    def __call__(self, loss: TaskLoss, params: torch.Tensor, tasks: QubitTasks, create_graph: bool = False):
        """(losses (B,), grads (B, P)); with autograd and ``create_graph`` the grads carry a graph."""
        if not self.estimated:
            if not params.requires_grad:
                params = params.detach().requires_grad_(True)
            losses = loss(params, tasks)
            (grads,) = torch.autograd.grad(losses.sum(), params, create_graph=create_graph)
            self.loss_evaluations += len(tasks)
            return losses, grads
        if create_graph:
            raise ValueError(f"gradient {self.method!r} cannot differentiate through adaptation; use fomaml or reptile")
        losses, grads = [], []
        for b in range(len(tasks)):
            one = tasks.select([b])

            def batched(points: torch.Tensor, one=one) -> torch.Tensor:
                with torch.no_grad():
                    return loss(points, one.repeat_each(points.shape[0]))

            x = params[b].detach()
            if self.method == "spsa":
                est = gradients.spsa(batched, x, self.spsa_c, self.spsa_directions, self.generator)
            else:
                est = gradients.finite_difference(batched, x, self.fd_step, self.fd_scheme)
            self.loss_evaluations += est.n_points
            losses.append(est.loss)
            grads.append(est.grad)
        return torch.stack(losses), torch.stack(grads)


@dataclass
class Losses:
    """The two task losses of a policy, as functions of (params (M, P), tasks)."""

    policy: PulsePolicy
    generator: torch.Generator

    def controls(self, params: torch.Tensor, tasks: QubitTasks) -> torch.Tensor:
        return self.policy.pulses(params, tasks.inputs)

    def query(self, params: torch.Tensor, tasks: QubitTasks) -> torch.Tensor:
        return tasks.query_loss(self.controls(params, tasks))

    def support(self, params: torch.Tensor, tasks: QubitTasks) -> torch.Tensor:
        return tasks.support_loss(self.controls(params, tasks), self.generator)


def adapt(
    losses: Losses,
    grads: TaskGradients,
    params: torch.Tensor,
    tasks: QubitTasks,
    steps: int,
    lr: float,
    create_graph: bool = False,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    on_loss: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """K plain gradient steps on the support loss from ``params`` (B, P); returns the adapted (B, P).

    ``on_step(k, phi)`` is called with the parameters after k = 0..steps steps; ``on_loss(k, losses)``
    with the support losses (B,) at the parameters after k steps, as step k + 1 computed them for
    its gradient (k = 0..steps - 1).
    """
    phi = params
    if on_step is not None:
        on_step(0, phi)
    for k in range(1, steps + 1):
        support, g = grads(losses.support, phi, tasks, create_graph=create_graph)
        if on_loss is not None:
            on_loss(k - 1, support.detach())
        phi = phi - lr * g
        if not create_graph:
            phi = phi.detach()
        if on_step is not None:
            on_step(k, phi)
    return phi


def meta_gradient(
    algorithm: str,
    losses: Losses,
    grads: TaskGradients,
    theta: torch.Tensor,
    tasks: QubitTasks,
    inner_steps: int,
    inner_lr: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Meta-gradient (P,) of one meta-batch, and its metrics: the support loss before and the query
    loss after adaptation, and the circuit evaluations split into ``grad_circuit_evals`` (they serve
    the meta-gradient) and ``metric_circuit_evals`` (metric-only forwards); see the module's costs."""
    if algorithm not in ("maml", "fomaml", "reptile"):
        raise ValueError(f"algorithm {algorithm!r}; allowed: maml, fomaml, reptile")
    b = len(tasks)
    start = theta.detach().expand(b, -1)
    counter = losses.policy
    evals_before, metric_evals = counter.circuit_evals, 0
    support_pre: list[float] = []

    def first_support(k: int, values: torch.Tensor) -> None:
        if k == 0:
            support_pre.append(float(values.mean()))

    if algorithm == "maml":
        theta_var = theta.detach().clone().requires_grad_(True)
        phi = adapt(losses, grads, theta_var.expand(b, -1), tasks, inner_steps, inner_lr, create_graph=True,
                    on_loss=first_support)
        query = losses.query(phi, tasks).mean()
        grads.loss_evaluations += b  # the query forward serves the meta-gradient
        (meta_grad,) = torch.autograd.grad(query, theta_var)
        query_value = float(query.detach())
    elif algorithm == "fomaml":
        phi = adapt(losses, grads, start.clone(), tasks, inner_steps, inner_lr, on_loss=first_support)
        query_losses, query_grads = grads(losses.query, phi, tasks)
        meta_grad = query_grads.mean(0)
        query_value = float(query_losses.detach().mean())
    else:  # reptile
        phi = adapt(losses, grads, start.clone(), tasks, inner_steps, inner_lr, on_loss=first_support)
        meta_grad = theta.detach() - phi.mean(0)
        metric_before = counter.circuit_evals
        with torch.no_grad():  # a metric only: Reptile's meta-gradient does not use the query loss
            query_value = float(losses.query(phi, tasks).mean())
        metric_evals = counter.circuit_evals - metric_before
    total = counter.circuit_evals - evals_before
    return meta_grad.detach(), {"support_loss_pre": support_pre[0] if support_pre else float("nan"),
                                "query_loss_post": query_value,
                                "grad_circuit_evals": total - metric_evals, "metric_circuit_evals": metric_evals}


# ---------------------------------------------------------------------------------------------
# Baselines: they optimise pulse amplitudes directly (u = u_max tanh(raw)), with autograd.


def _amplitudes(raw: torch.Tensor, max_amplitude: float) -> torch.Tensor:
    return max_amplitude * torch.tanh(raw)


def robust_pulse(
    sample_tasks: Callable[[int], QubitTasks], n_segments: int, max_amplitude: float, steps: int, batch: int,
    lr: float, generator: torch.Generator,
) -> torch.Tensor:
    """One pulse (N, 2) for the whole distribution: Adam on the mean query loss over a fresh batch of
    tasks each step, from the plain pi pulse about x (plus 0.01 noise to break its symmetry), the
    learning rate decayed to zero on a cosine. It never sees which task it is applied to."""
    start = torch.zeros(n_segments, 2, dtype=torch.float64)
    start[:, 0] = min(math.pi, 0.9 * max_amplitude)
    raw = (torch.atanh(start / max_amplitude) + 0.01 * torch.randn(n_segments, 2, generator=generator, dtype=torch.float64))
    raw.requires_grad_(True)
    opt = torch.optim.Adam([raw], lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    for _ in range(steps):
        tasks = sample_tasks(batch)
        loss = tasks.query_loss(_amplitudes(raw, max_amplitude).expand(len(tasks), -1, -1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    return _amplitudes(raw.detach(), max_amplitude)


def per_task_optimum(tasks: QubitTasks, start: torch.Tensor, max_amplitude: float, steps: int, lr: float) -> torch.Tensor:
    """Every task's own pulse (B, N, 2): Adam on its exact query loss from ``start`` ((N, 2), or (B, N, 2)
    per task), the learning rate decayed to zero on a cosine — the upper bound."""
    clipped = start.clamp(-max_amplitude * (1 - 1e-9), max_amplitude * (1 - 1e-9))
    raw = torch.atanh(clipped / max_amplitude).expand(len(tasks), -1, -1).clone().requires_grad_(True)
    opt = torch.optim.Adam([raw], lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    for _ in range(steps):
        loss = tasks.query_loss(_amplitudes(raw, max_amplitude)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    return _amplitudes(raw.detach(), max_amplitude)
