"""Meta-learned dynamics models for model-based meta-RL (Nagabandi et al. 2019, "Learning to adapt
in dynamic, real-world environments through meta-reinforcement learning": GrBAL; and PEARL's
context encoder, Rakelly et al. 2019).

Every learner owns a :class:`mbrl.ensemble.GaussianEnsemble` predicting the change of the
observation from ``(observation, action)`` (plus a task latent for ``context``) and exposes
``adapt(x, y) -> planner model``: what the CEM planner (:func:`mbrl.cem.trajectory_returns`) uses
after seeing the transitions ``(x, y)`` of the current task. An empty context means no adaptation.

- :class:`MAMLModel`: MAML over all the model's parameters. The inner step is SGD on the Gaussian
  NLL of ``support_size`` consecutive transitions (``torch.func.grad`` of a
  ``torch.func.functional_call``), the outer loss the NLL of the ``query_size`` transitions right
  after them, differentiated through the inner step (second order) and minimised by Adam.
- :class:`ReptileModel`: Reptile over the same parameters: per task ``reptile_inner_steps`` SGD
  steps on a window of that task (support and query transitions together), then ``theta <- theta + epsilon * mean_i (theta_i - theta)``.
- :class:`ContextModel`: a permutation-invariant encoder: each transition gives a Gaussian factor
  ``N(mu_n, sigma_n^2)`` over the latent; the posterior is the normalised product of the prior
  ``N(0, I)`` and the factors. The model reads the latent (its mean at planning time); adapting is
  encoding, no gradient step. Trained on the query NLL with the latent sampled from the posterior
  of the support transitions plus ``kl_weight * KL(q || N(0, I))``.
- :class:`PooledModel`: the baseline: one model trained on the pooled transitions of all train
  tasks, never adapted.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad

from mbrl.ensemble import GaussianEnsemble, gaussian_nll
from metarl.config import PendulumMetaConfig

OBS, ACT = 3, 1
BOUND_WEIGHT = 0.01


def model_nll(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean Gaussian NLL of ``y`` (batch, out) given ``x`` (batch, in) under ``params`` (members averaged)."""
    e = model.size
    mean, logvar = functional_call(model, params, (x.expand(e, *x.shape),))
    return gaussian_nll(mean, logvar, y.expand(e, *y.shape)).mean()


def sgd_adapt(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, lr: float,
              steps: int) -> dict[str, torch.Tensor]:
    """``steps`` plain gradient steps on :func:`model_nll` (differentiable: MAML's inner loop)."""
    for _ in range(steps):
        g = grad(lambda p: model_nll(model, p, x, y))(params)
        params = {k: params[k] - lr * g[k] for k in params}
    return params


def reptile_update(params: dict[str, torch.Tensor], adapted: list[dict[str, torch.Tensor]], epsilon: float) -> dict[str, torch.Tensor]:
    """``theta + epsilon * mean_i (theta_i - theta)``."""
    return {k: params[k] + epsilon * torch.stack([a[k] - params[k] for a in adapted]).mean(0) for k in params}


def product_of_gaussians(mu: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised product of the Gaussian factors ``N(mu[n], var[n])`` (shape ``(n, d)``):
    precision ``sum 1/var``, mean ``sum(mu/var) / sum(1/var)``."""
    precision = (1.0 / var).sum(0)
    out_var = 1.0 / precision
    return out_var * (mu / var).sum(0), out_var


class _Functional:
    """A GaussianEnsemble under given parameters, with an optional latent appended to its input:
    what :func:`mbrl.cem.trajectory_returns` calls (``size`` and ``__call__``)."""

    def __init__(self, model: GaussianEnsemble, params: dict[str, torch.Tensor] | None = None,
                 latent: torch.Tensor | None = None):
        self.model, self.params, self.latent = model, params, latent
        self.size = model.size

    def __call__(self, x: torch.Tensor):
        if self.latent is not None:
            x = torch.cat([x, self.latent.to(x.dtype).expand(*x.shape[:-1], -1)], dim=-1)
        if self.params is None:
            return self.model(x)
        return functional_call(self.model, self.params, (x,))


def _ensemble(cfg: PendulumMetaConfig, in_dim: int, generator: torch.Generator) -> GaussianEnsemble:
    return GaussianEnsemble(cfg.ensemble_size, in_dim, OBS, cfg.hidden, cfg.layers, generator=generator)


class _Base:
    def __init__(self, cfg: PendulumMetaConfig, generator: torch.Generator, in_dim: int = OBS + ACT):
        self.cfg = cfg
        self.model = _ensemble(cfg, in_dim, generator)

    def set_normalizer(self, x: torch.Tensor) -> None:
        """Input statistics from the pooled train transitions (the latent inputs keep 0 / 1)."""
        d = x.shape[-1]
        with torch.no_grad():
            self.model.in_mean[:d].copy_(x.mean(0))
            self.model.in_std[:d].copy_(x.std(0).clamp_min(1e-6))

    def params(self) -> dict[str, torch.Tensor]:
        return dict(self.model.named_parameters())

    def bound_penalty(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return BOUND_WEIGHT * (params["max_logvar"].sum() - params["min_logvar"].sum())

    @torch.no_grad()
    def query_nll(self, x_support, y_support, x_query, y_query) -> float:
        """NLL of the query transitions under the model adapted on the support ones."""
        planner_model = self.adapt(x_support, y_support)
        mean, logvar = planner_model(x_query.expand(self.model.size, *x_query.shape))
        return gaussian_nll(mean, logvar, y_query.expand(self.model.size, *y_query.shape)).mean().item()


class PooledModel(_Base):
    def __init__(self, cfg, generator):
        super().__init__(cfg, generator)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.outer_lr)

    def step(self, batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]) -> float:
        x = torch.cat([torch.cat([xs, xq]) for xs, _, xq, _ in batches])
        y = torch.cat([torch.cat([ys, yq]) for _, ys, _, yq in batches])
        params = self.params()
        loss = model_nll(self.model, params, x, y) + self.bound_penalty(params)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return loss.item()

    def adapt(self, x, y) -> _Functional:
        return _Functional(self.model)


class MAMLModel(_Base):
    def __init__(self, cfg, generator):
        super().__init__(cfg, generator)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.outer_lr)

    def step(self, batches) -> float:
        params = self.params()
        losses = []
        for xs, ys, xq, yq in batches:
            adapted = sgd_adapt(self.model, params, xs, ys, self.cfg.inner_lr, self.cfg.inner_steps)
            losses.append(model_nll(self.model, adapted, xq, yq))
        loss = torch.stack(losses).mean() + self.bound_penalty(params)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return loss.item()

    def adapt(self, x, y) -> _Functional:
        if len(x) == 0:
            return _Functional(self.model)
        with torch.enable_grad():
            params = {k: v.detach() for k, v in self.params().items()}
            adapted = sgd_adapt(self.model, params, x, y, self.cfg.inner_lr, self.cfg.inner_steps)
        return _Functional(self.model, {k: v.detach() for k, v in adapted.items()})


class ReptileModel(_Base):
    def step(self, batches) -> float:
        params = {k: v.detach() for k, v in self.params().items()}
        adapted, losses = [], []
        for xs, ys, xq, yq in batches:
            x, y = torch.cat([xs, xq]), torch.cat([ys, yq])
            adapted.append(sgd_adapt(self.model, params, x, y, self.cfg.reptile_inner_lr, self.cfg.reptile_inner_steps))
            with torch.no_grad():
                losses.append(model_nll(self.model, adapted[-1], x, y).item())
        new = reptile_update(params, adapted, self.cfg.reptile_step)
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.copy_(new[name])
        return float(sum(losses) / len(losses))

    def adapt(self, x, y) -> _Functional:
        if len(x) == 0:
            return _Functional(self.model)
        params = {k: v.detach() for k, v in self.params().items()}
        adapted = sgd_adapt(self.model, params, x, y, self.cfg.reptile_inner_lr, self.cfg.reptile_inner_steps)
        return _Functional(self.model, {k: v.detach() for k, v in adapted.items()})


class ContextEncoder(nn.Module):
    """Per-transition factors ``(mu_n, var_n)`` from ``(obs, action, delta obs)``; the posterior is
    the product of ``N(0, I)`` and the factors (so no transitions give the prior)."""

    def __init__(self, latent_dim: int, hidden: int):
        super().__init__()
        self.latent_dim = latent_dim
        self.net = nn.Sequential(nn.Linear(OBS + ACT + OBS, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 2 * latent_dim))
        self.register_buffer("in_mean", torch.zeros(OBS + ACT + OBS))
        self.register_buffer("in_std", torch.ones(OBS + ACT + OBS))

    def factors(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net((torch.cat([x, y], -1) - self.in_mean) / self.in_std)
        mu, raw = out[..., : self.latent_dim], out[..., self.latent_dim :]
        return mu, nn.functional.softplus(raw) + 1e-4

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, var = self.factors(x, y)
        prior_mu = torch.zeros(1, self.latent_dim, dtype=mu.dtype)
        prior_var = torch.ones(1, self.latent_dim, dtype=mu.dtype)
        return product_of_gaussians(torch.cat([prior_mu, mu]), torch.cat([prior_var, var]))


class ContextModel(_Base):
    def __init__(self, cfg, generator):
        super().__init__(cfg, generator, in_dim=OBS + ACT + cfg.latent_dim)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
            self.encoder = ContextEncoder(cfg.latent_dim, cfg.encoder_hidden)
        self.generator = generator
        self.opt = torch.optim.Adam([*self.model.parameters(), *self.encoder.parameters()], lr=cfg.outer_lr)

    def set_normalizer(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        super().set_normalizer(x)
        if y is not None:
            xy = torch.cat([x, y], -1)
            with torch.no_grad():
                self.encoder.in_mean.copy_(xy.mean(0))
                self.encoder.in_std.copy_(xy.std(0).clamp_min(1e-6))

    def step(self, batches) -> float:
        params = self.params()
        losses = []
        for xs, ys, xq, yq in batches:
            mu, var = self.encoder(xs, ys)
            z = mu + var.sqrt() * torch.randn(mu.shape, generator=self.generator, dtype=mu.dtype)
            xz = torch.cat([xq, z.expand(len(xq), -1)], -1)
            kl = 0.5 * (var + mu**2 - 1 - var.log()).sum()
            losses.append(model_nll(self.model, params, xz, yq) + self.cfg.kl_weight * kl / len(xq))
        loss = torch.stack(losses).mean() + self.bound_penalty(params)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return loss.item()

    @torch.no_grad()
    def latent(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if len(x) == 0:
            return torch.zeros(self.cfg.latent_dim)
        return self.encoder(x, y)[0]

    def adapt(self, x, y) -> _Functional:
        return _Functional(self.model, latent=self.latent(x, y))


LEARNERS = {"maml": MAMLModel, "reptile": ReptileModel, "context": ContextModel, "pooled": PooledModel}
