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


#: Shifted parameter points are generated and evaluated in chunks of at most this many entries
#: (points x parameters), so memory grows as O(chunk x P), not P x P: a 67k-parameter MLP with
#: central differences would otherwise build two 67k x 67k shift matrices (36.5 GB). 2^22 float64
#: entries are 32 MB; models of up to 2,048 parameters (every circuit here) still take one call.
POINT_ENTRIES_PER_CALL = 1 << 22


def points_per_call(n_params: int, chunk: int | None = None) -> int:
    """Shifted points per batched call: ``chunk`` if given, else POINT_ENTRIES_PER_CALL / P (at least 1)."""
    if chunk is not None:
        if chunk < 1:
            raise ValueError(f"chunk must be a positive number of points, got {chunk}")
        return chunk
    return max(1, POINT_ENTRIES_PER_CALL // max(1, n_params))


def finite_difference(f: BatchedLoss, x: torch.Tensor, step: float = 1e-4, scheme: str = "central",
                      chunk: int | None = None) -> GradientEstimate:
    """Finite-difference gradient in float64.

    central: g_i = (f(x + h e_i) - f(x - h e_i)) / (2h), error O(h^2), cost 2P + 1 points.
    forward: g_i = (f(x + h e_i) - f(x)) / h, error O(h), cost P + 1 points.
    The default h = 1e-4 balances truncation (~h^2) against float64 round-off (~1e-16 / h).
    The coordinates are shifted ``chunk`` at a time (default :func:`points_per_call`): each call
    of ``f`` gets the unshifted point (first call only) and the +h (and -h) points of one chunk,
    so memory is O(chunk x P); the result does not depend on the chunk for a row-wise ``f``.
    """
    if step <= 0:
        raise ValueError(f"finite-difference step must be positive, got {step}")
    if scheme not in ("central", "forward"):
        raise ValueError(f"finite-difference scheme {scheme!r}; allowed: central, forward")
    x = x.detach().to(torch.float64)
    n = x.numel()
    per_call = points_per_call(n, chunk)
    grad = torch.empty(n, dtype=torch.float64, device=x.device)
    loss = None
    n_points = 0
    for start in range(0, n, per_call):
        stop = min(start + per_call, n)
        rows = torch.arange(stop - start, device=x.device)
        plus = x.repeat(stop - start, 1)
        plus[rows, start + rows] += step
        shifted = [plus]
        if scheme == "central":
            minus = x.repeat(stop - start, 1)
            minus[rows, start + rows] -= step
            shifted.append(minus)
        points = torch.cat(([x[None]] if loss is None else []) + shifted)
        values = f(points).to(torch.float64)
        n_points += points.shape[0]
        if loss is None:
            loss, values = values[0], values[1:]
        if scheme == "central":
            grad[start:stop] = (values[: stop - start] - values[stop - start :]) / (2 * step)
        else:
            grad[start:stop] = (values - loss) / step
    if loss is None:  # no parameters
        loss = f(x[None]).to(torch.float64)[0]
        n_points = 1
    return GradientEstimate(loss, grad, n_points)


# ---------------------------------------------------------------------------------------------
# SPSA


def rademacher_directions(n_directions: int, n_params: int, generator: torch.Generator, rows: slice | None = None) -> torch.Tensor:
    """(n_directions, n_params) of independent +/-1 entries: E[d d^T] = I.

    ``rows``: only these directions (SPSA asks for its directions chunk by chunk); each call draws
    fresh entries from ``generator``, chunk after chunk.
    """
    count = n_directions if rows is None else len(range(n_directions)[rows])
    bits = torch.randint(0, 2, (count, n_params), generator=generator, dtype=torch.int64)
    return (2 * bits - 1).to(torch.float64)


def coordinate_directions(n_directions: int, n_params: int, generator: torch.Generator | None = None,
                          rows: slice | None = None) -> torch.Tensor:
    """All coordinate axes scaled by sqrt(P) (deterministic; needs ``n_directions == n_params``).

    E[d d^T] = I as for Rademacher directions; with these, SPSA equals central differences with
    step c * sqrt(P), which is what the tests use to make SPSA deterministic. ``rows``: only
    these axes, ``(len(rows), P)``, never the whole P x P matrix.
    """
    if n_directions != n_params:
        raise ValueError(f"coordinate directions need n_directions == n_params ({n_params}), got {n_directions}")
    axes = torch.arange(n_params)[rows if rows is not None else slice(None)]
    out = torch.zeros(len(axes), n_params, dtype=torch.float64)
    out[torch.arange(len(axes)), axes] = math.sqrt(n_params)
    return out


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
    sampler: Callable[..., torch.Tensor] = rademacher_directions,
    chunk: int | None = None,
) -> GradientEstimate:
    """SPSA gradient: g = (1/m) sum_j (f(x + c d_j) - f(x - c d_j)) / (2c) * d_j.

    Unbiased up to O(c^2) for any direction law with E[d d^T] = I; exact in expectation for a
    quadratic. Cost: 2m + 1 points, independent of the number of parameters. The directions are
    drawn and evaluated ``chunk`` at a time (default :func:`points_per_call`; ``sampler(m, P,
    generator, rows=slice)``), so memory is O(chunk x P) even for coordinate directions (m = P).
    """
    x = x.detach().to(torch.float64)
    n = x.numel()
    per_call = points_per_call(n, chunk)
    total = torch.zeros(n, dtype=torch.float64, device=x.device)
    loss = None
    n_points = 0
    for start in range(0, n_directions, per_call):
        stop = min(start + per_call, n_directions)
        d = sampler(n_directions, n, generator, rows=slice(start, stop)).to(device=x.device, dtype=torch.float64)
        points = torch.cat(([x[None]] if loss is None else []) + [x + c * d, x - c * d])
        values = f(points).to(torch.float64)
        n_points += points.shape[0]
        if loss is None:
            loss, values = values[0], values[1:]
        m = stop - start
        total += ((values[:m] - values[m:]) / (2 * c)) @ d
    if loss is None:
        raise ValueError(f"SPSA needs at least one direction, got {n_directions}")
    return GradientEstimate(loss, total / n_directions, n_points)


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
