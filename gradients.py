"""Backend-agnostic gradient estimators, each evaluating all its shifted points in one batched call.

Shape of every estimator (as in PennyLane's gradient transforms): generate all shifted points,
evaluate them as one batch, contract with coefficients. They work on a flat parameter vector
``x`` (P,) and a *batched* loss ``f: (M, P) -> (M,)``, and return a :class:`GradientEstimate`
holding the loss at ``x`` (row 0 of the batch), the gradient and the number of function
evaluations (parameter points) used; multiplied by the circuits per point (the data batch),
that is the circuit-evaluation count.

:func:`estimated_loss` hooks an estimator into torch: it returns the loss as a tensor whose
backward pass writes the estimated gradient into ``.grad`` of the parameters, so an ordinary
``loss.backward(); optimizer.step()`` steps on it. :func:`parameter_shift_expvals` does the same
for circuits whose parameters enter as rotation angles.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

BatchedLoss = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class GradientEstimate:
    loss: torch.Tensor
    """Loss at the unshifted point (scalar)."""
    grad: torch.Tensor
    """Estimated gradient (P,), float64."""
    n_points: int
    """Parameter points evaluated (the unshifted one included)."""


# ---------------------------------------------------------------------------------------------
# Finite differences


def finite_difference(f: BatchedLoss, x: torch.Tensor, step: float = 1e-4, scheme: str = "central") -> GradientEstimate:
    """Finite-difference gradient in float64.

    central: g_i = (f(x + h e_i) - f(x - h e_i)) / (2h), error O(h^2), cost 2P + 1 points.
    forward: g_i = (f(x + h e_i) - f(x)) / h, error O(h), cost P + 1 points.
    The default h = 1e-4 balances truncation (~h^2) against float64 round-off (~1e-16 / h).
    """
    if step <= 0:
        raise ValueError(f"finite-difference step must be positive, got {step}")
    x = x.detach().to(torch.float64)
    n = x.numel()
    eye = torch.eye(n, dtype=torch.float64, device=x.device) * step
    if scheme == "central":
        points = torch.cat([x[None], x + eye, x - eye])
        values = f(points).to(torch.float64)
        grad = (values[1 : n + 1] - values[n + 1 :]) / (2 * step)
    elif scheme == "forward":
        points = torch.cat([x[None], x + eye])
        values = f(points).to(torch.float64)
        grad = (values[1:] - values[0]) / step
    else:
        raise ValueError(f"finite-difference scheme {scheme!r}; allowed: central, forward")
    return GradientEstimate(values[0], grad, points.shape[0])


# ---------------------------------------------------------------------------------------------
# SPSA


def rademacher_directions(n_directions: int, n_params: int, generator: torch.Generator) -> torch.Tensor:
    """(n_directions, n_params) of independent +/-1 entries: E[d d^T] = I."""
    bits = torch.randint(0, 2, (n_directions, n_params), generator=generator, dtype=torch.int64)
    return (2 * bits - 1).to(torch.float64)


def coordinate_directions(n_directions: int, n_params: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """All coordinate axes scaled by sqrt(P) (deterministic; needs ``n_directions == n_params``).

    E[d d^T] = I as for Rademacher directions; with these, SPSA equals central differences with
    step c * sqrt(P), which is what the tests use to make SPSA deterministic.
    """
    if n_directions != n_params:
        raise ValueError(f"coordinate directions need n_directions == n_params ({n_params}), got {n_directions}")
    return torch.eye(n_params, dtype=torch.float64) * math.sqrt(n_params)


@dataclass(frozen=True)
class SPSAGains:
    """Spall's gain sequences: c_k = c/(k+1)^gamma (perturbation), a_k = a/(A+k+1)^alpha (step).

    Defaults are Spall's recommendations (alpha 0.602, gamma 0.101). ``a`` unset means
    (A+1)^alpha, so a_0 = 1 and the optimiser's learning rates are the first step sizes.
    """

    c: float = 0.1
    a: float | None = None
    A: float = 10.0
    alpha: float = 0.602
    gamma: float = 0.101

    def c_k(self, k: int) -> float:
        return self.c / (k + 1) ** self.gamma

    def a_k(self, k: int) -> float:
        a = self.a if self.a is not None else (self.A + 1) ** self.alpha
        return a / (self.A + k + 1) ** self.alpha


def spsa(
    f: BatchedLoss,
    x: torch.Tensor,
    c: float,
    n_directions: int,
    generator: torch.Generator,
    sampler: Callable[[int, int, torch.Generator], torch.Tensor] = rademacher_directions,
) -> GradientEstimate:
    """SPSA gradient: g = (1/m) sum_j (f(x + c d_j) - f(x - c d_j)) / (2c) * d_j.

    Unbiased up to O(c^2) for any direction law with E[d d^T] = I; exact in expectation for a
    quadratic. Cost: 2m + 1 points, independent of the number of parameters.
    """
    x = x.detach().to(torch.float64)
    d = sampler(n_directions, x.numel(), generator).to(device=x.device, dtype=torch.float64)
    points = torch.cat([x[None], x + c * d, x - c * d])
    values = f(points).to(torch.float64)
    m = d.shape[0]
    diffs = (values[1 : m + 1] - values[m + 1 :]) / (2 * c)
    grad = (diffs[:, None] * d).mean(0)
    return GradientEstimate(values[0], grad, points.shape[0])


# ---------------------------------------------------------------------------------------------
# Hooking estimators into torch


class _EstimatedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, flat: torch.Tensor, estimate: GradientEstimate) -> torch.Tensor:  # noqa: ARG004
        ctx.save_for_backward(estimate.grad.to(flat.dtype))
        return estimate.loss.to(flat.dtype).clone()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad_output * grad, None


def estimated_loss(params: list[torch.Tensor], estimator: Callable[[torch.Tensor], GradientEstimate]) -> tuple[torch.Tensor, GradientEstimate]:
    """Run ``estimator`` on the flattened ``params``; return (loss tensor, estimate).

    ``loss.backward()`` then writes the estimated gradient into each parameter's ``.grad``.
    """
    flat = torch.cat([p.reshape(-1) for p in params])
    estimate = estimator(flat.detach())
    return _EstimatedLoss.apply(flat, estimate), estimate


# ---------------------------------------------------------------------------------------------
# Parameter shift


class _ParameterShift(torch.autograd.Function):
    @staticmethod
    def forward(ctx, angles: torch.Tensor, evaluate: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        ctx.evaluate = evaluate
        ctx.save_for_backward(angles)
        return evaluate(angles.detach())

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (angles,) = ctx.saved_tensors
        n, g = angles.shape
        shift = torch.eye(g, dtype=angles.dtype, device=angles.device) * (math.pi / 2)
        # (2G, N, G): every angle shifted by +pi/2 then by -pi/2, for every row at once.
        shifted = torch.cat([angles[None] + shift[:, None, :], angles[None] - shift[:, None, :]])
        values = ctx.evaluate(shifted.reshape(2 * g * n, g)).reshape(2, g, n, -1)
        jacobian = (values[0] - values[1]) / 2  # (G, N, O): d<O>/d angle
        return torch.einsum("gno,no->ng", jacobian, grad_output.to(jacobian.dtype)), None


def parameter_shift_expvals(angles: torch.Tensor, evaluate: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Expectation values ``evaluate(angles)`` (N, O) whose gradient is the parameter-shift rule.

    For a gate exp(-i angle P/2) with a Pauli P (Rx, Ry, Rz): d<O>/d angle =
    (<O>(angle + pi/2) - <O>(angle - pi/2)) / 2, exact. Each row of ``angles`` is one circuit;
    row b's outputs depend only on row b, so shifting column g in every row at once gives the
    derivative for all rows. All 2G shifted batches go to ``evaluate`` as one call of 2*G*N
    circuits. Gradients to anything upstream (input scalings, shared angles) follow by autograd.
    """
    return _ParameterShift.apply(angles, evaluate)
