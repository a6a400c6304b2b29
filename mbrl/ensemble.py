"""A probabilistic ensemble of dynamics models (PETS, Chua et al. 2018).

Each member is an MLP giving a Gaussian over the change of the observation, trained by its
negative log-likelihood on its own bootstrap sample of the data. The log-variance is bounded by
learned ``max_logvar`` / ``min_logvar`` (shared by the members) through the usual soft clamp,
with a small penalty pulling the bounds together. ``torch.func.stack_module_state`` stacks the
members' parameters; all members run as one batched call, each layer one ``torch.baddbmm`` over the
stacked weights (``forward``), or ``torch.func.vmap`` of ``functional_call`` of one template member
(``forward_vmap``, the same numbers, twice the time on one CPU thread).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap
from torch.nn import functional as F


def _member(in_dim: int, out_dim: int, hidden: int, layers: int) -> nn.Sequential:
    mods: list[nn.Module] = []
    width = in_dim
    for _ in range(layers):
        mods += [nn.Linear(width, hidden), nn.SiLU()]
        width = hidden
    mods.append(nn.Linear(width, 2 * out_dim))
    return nn.Sequential(*mods)


def soft_clamp_logvar(raw: torch.Tensor, max_logvar: torch.Tensor, min_logvar: torch.Tensor) -> torch.Tensor:
    """``max - softplus(max - raw)`` then ``min + softplus(. - min)``: smooth, within the learned bounds."""
    logvar = max_logvar - F.softplus(max_logvar - raw)
    return min_logvar + F.softplus(logvar - min_logvar)


class GaussianEnsemble(nn.Module):
    """``size`` Gaussian MLPs from ``in_dim`` inputs to ``out_dim`` means and log-variances.

    Inputs are standardised with statistics set by :meth:`fit_normalizer` (shared by the members).
    ``forward(x)`` takes ``x`` of shape ``(size, batch, in_dim)``, member ``i`` seeing ``x[i]``.
    """

    def __init__(self, size: int, in_dim: int, out_dim: int, hidden: int = 200, layers: int = 3,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.size, self.in_dim, self.out_dim = size, in_dim, out_dim
        # torch's initialisers draw from the global generator: seed it from ours, then restore it
        with torch.random.fork_rng(devices=[]):
            if generator is not None:
                torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
            members = [_member(in_dim, out_dim, hidden, layers) for _ in range(size)]
        params, buffers = stack_module_state(members)
        if buffers:
            raise ValueError("ensemble members with buffers are not supported")
        self.params = nn.ParameterDict({k.replace(".", "__"): nn.Parameter(v) for k, v in params.items()})
        self._names = list(params)
        # the member is Linear, SiLU, ..., Linear: the Linear layers' names in order
        self._linear = [name for name, mod in members[0].named_children() if isinstance(mod, nn.Linear)]
        if any(not isinstance(mod, (nn.Linear, nn.SiLU)) for mod in members[0]):
            raise ValueError("ensemble members must be Linear and SiLU layers")
        # the template holds no data of its own: functional_call supplies every parameter
        self._template = [copy.deepcopy(members[0]).to("meta")]
        self.max_logvar = nn.Parameter(torch.full((out_dim,), 0.5))
        self.min_logvar = nn.Parameter(torch.full((out_dim,), -10.0))
        self.register_buffer("in_mean", torch.zeros(in_dim))
        self.register_buffer("in_std", torch.ones(in_dim))

    def stacked(self) -> dict[str, torch.Tensor]:
        return {name: self.params[name.replace(".", "__")] for name in self._names}

    def member_params(self, i: int) -> dict[str, torch.Tensor]:
        return {name: p[i] for name, p in self.stacked().items()}

    @torch.no_grad()
    def fit_normalizer(self, x: torch.Tensor) -> None:
        self.in_mean.copy_(x.mean(0))
        self.in_std.copy_(x.std(0).clamp_min(1e-6) if len(x) > 1 else torch.ones_like(self.in_std))

    def _raw(self, x: torch.Tensor) -> torch.Tensor:
        """All members at once: each layer one ``torch.baddbmm`` over the stacked weights
        ``(size, out, in)``, the same arithmetic as :meth:`forward_vmap` at half its time on one CPU
        thread (the README's PETS section gives the measurement)."""
        h = (x - self.in_mean) / self.in_std
        params = self.stacked()
        last = len(self._linear) - 1
        for i, name in enumerate(self._linear):
            h = torch.baddbmm(params[f"{name}.bias"].unsqueeze(1), h, params[f"{name}.weight"].transpose(1, 2))
            if i < last:
                h = F.silu(h)
        return h

    def _raw_vmap(self, x: torch.Tensor) -> torch.Tensor:
        template = self._template[0]

        def one(params, xi):
            return functional_call(template, params, (xi,))

        return vmap(one)(self.stacked(), (x - self.in_mean) / self.in_std)

    def forward_vmap(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same as :meth:`forward` through ``torch.func.vmap`` of ``functional_call`` of one template member."""
        out = self._raw_vmap(x)
        mean, raw = out[..., : self.out_dim], out[..., self.out_dim :]
        return mean, soft_clamp_logvar(raw, self.max_logvar, self.min_logvar)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 3 or x.shape[0] != self.size:
            raise ValueError(f"expected input of shape ({self.size}, batch, {self.in_dim}), got {tuple(x.shape)}")
        out = self._raw(x)
        mean, raw = out[..., : self.out_dim], out[..., self.out_dim :]
        return mean, soft_clamp_logvar(raw, self.max_logvar, self.min_logvar)

    def forward_member_loop(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same as :meth:`forward`, one member at a time (the tests' reference)."""
        template = self._template[0]
        outs = [functional_call(template, self.member_params(i), ((x[i] - self.in_mean) / self.in_std,))
                for i in range(self.size)]
        out = torch.stack(outs)
        mean, raw = out[..., : self.out_dim], out[..., self.out_dim :]
        return mean, soft_clamp_logvar(raw, self.max_logvar, self.min_logvar)

    def nll(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Gaussian negative log-likelihood per member, averaged over batch and dimensions (constant
        0.5 log 2 pi included), shape ``(size,)``; ``x``: ``(size, batch, in)``, ``y``: ``(size, batch, out)``."""
        mean, logvar = self(x)
        return gaussian_nll(mean, logvar, y).mean(dim=(1, 2))

    def loss(self, x: torch.Tensor, y: torch.Tensor, bound_weight: float = 0.01) -> torch.Tensor:
        """Training loss: the members' NLLs summed, plus ``bound_weight * (sum max_logvar - sum min_logvar)``."""
        return self.nll(x, y).sum() + bound_weight * (self.max_logvar.sum() - self.min_logvar.sum())


def gaussian_nll(mean: torch.Tensor, logvar: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logvar + (y - mean) ** 2 * torch.exp(-logvar) + torch.log(torch.tensor(2 * torch.pi, dtype=mean.dtype)))


def fit_bootstrap(ensemble: GaussianEnsemble, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                  epochs: int, batch_size: int, rng: np.random.Generator) -> None:
    """Refit the input normaliser on ``x`` ``(n, in)``, then ``epochs`` passes of minibatch NLL over each
    member's own bootstrap sample of ``(x, y)`` (drawn afresh at every call, all members in one batch)."""
    ensemble.fit_normalizer(x)
    n, e = len(x), ensemble.size
    boot = rng.integers(0, n, size=(e, n))
    for _ in range(epochs):
        order = np.stack([rng.permutation(row) for row in boot])
        for start in range(0, n, batch_size):
            idx = torch.as_tensor(order[:, start : start + batch_size])
            loss = ensemble.loss(x[idx], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"ensemble loss is not finite ({loss.item()})")


@torch.no_grad()
def holdout_metrics(ensemble: GaussianEnsemble, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """On held-out ``(x, y)``: the NLL (per dimension, members averaged) and the disagreement (variance
    of the members' means across members, summed over dimensions, averaged over transitions)."""
    mean, logvar = ensemble(x.expand(ensemble.size, -1, -1))
    nll = gaussian_nll(mean, logvar, y.expand(ensemble.size, -1, -1)).mean().item()
    disagreement = mean.var(0, unbiased=False).sum(-1).mean().item()
    return nll, disagreement


class HoldoutData:
    """Model inputs and targets split once, at insertion, into training and held-out sets
    (``holdout_fraction`` of them held out at random): what PETS and the pulse planner fit and score."""

    def __init__(self, holdout_fraction: float, rng: np.random.Generator):
        self.fraction, self.rng = holdout_fraction, rng
        self.train_x: list[np.ndarray] = []
        self.train_y: list[np.ndarray] = []
        self.hold_x: list[np.ndarray] = []
        self.hold_y: list[np.ndarray] = []

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        x, y = np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.float32)
        if self.fraction and self.rng.random() < self.fraction:
            self.hold_x.append(x)
            self.hold_y.append(y)
        else:
            self.train_x.append(x)
            self.train_y.append(y)

    def fit(self, ensemble: GaussianEnsemble, opt: torch.optim.Optimizer, epochs: int, batch_size: int) -> None:
        """:func:`fit_bootstrap` on the training set, drawing from this data's generator."""
        fit_bootstrap(ensemble, opt, torch.as_tensor(np.stack(self.train_x)), torch.as_tensor(np.stack(self.train_y)),
                      epochs, batch_size, self.rng)

    @torch.no_grad()
    def holdout_metrics(self, ensemble: GaussianEnsemble) -> tuple[float, float]:
        """:func:`holdout_metrics` on the held-out set; nan, nan while it is empty."""
        if not self.hold_x:
            return float("nan"), float("nan")
        return holdout_metrics(ensemble, torch.as_tensor(np.stack(self.hold_x)), torch.as_tensor(np.stack(self.hold_y)))


def plot_model_quality(ax, holdout_nll: list[tuple[int, float]], disagreement: list[tuple[int, float]],
                       title: str = "model") -> None:
    """Held-out NLL (left axis) and ensemble disagreement (right axis, log) against environment
    steps, as the PETS-style runs record them: ``(step, value)`` pairs."""
    if holdout_nll:
        s, v = zip(*holdout_nll)
        ax.plot(s, v, marker=".", color="C0")
        ax.set_ylabel("held-out NLL per dimension", color="C0")
        twin = ax.twinx()
        s, d = zip(*disagreement)
        twin.plot(s, d, marker=".", color="C1")
        twin.set_yscale("log")
        twin.set_ylabel("ensemble disagreement", color="C1")
    ax.set(xlabel="environment steps", title=title)
