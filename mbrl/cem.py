"""The cross-entropy method over action sequences, and trajectory sampling through an ensemble.

:class:`CEMPlanner` optimises any objective of a ``(population, horizon, action_dim)`` batch of
action sequences (higher is better) inside box bounds. :func:`trajectory_returns` is the PETS
objective: each candidate is propagated as ``particles`` sampled trajectories, particle ``p``
always by member ``p % ensemble_size`` (TS-inf), every step of all particles one batched call of
the ensemble; the return is the known reward summed over the horizon (one batched call over all
steps at the end), averaged over particles.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mbrl.ensemble import GaussianEnsemble


class CEMPlanner:
    def __init__(self, horizon: int, population: int, elites: int, iterations: int, lower: torch.Tensor,
                 upper: torch.Tensor, alpha: float = 0.1):
        if not 1 <= elites <= population:
            raise ValueError(f"elites ({elites}) must be in 1..population ({population})")
        if horizon < 1 or iterations < 1:
            raise ValueError(f"horizon ({horizon}) and iterations ({iterations}) must be positive")
        self.horizon, self.population, self.elites, self.iterations = horizon, population, elites, iterations
        self.lower, self.upper, self.alpha = lower, upper, alpha

    def initial_mean(self) -> torch.Tensor:
        return ((self.lower + self.upper) / 2).expand(self.horizon, -1).clone()

    def optimize(self, objective: Callable[[torch.Tensor], torch.Tensor], mean: torch.Tensor,
                 generator: torch.Generator) -> torch.Tensor:
        """The optimised mean action sequence ``(horizon, action_dim)``, from ``mean`` and a std of a
        quarter of the action range; samples are clipped to the bounds."""
        std = ((self.upper - self.lower) / 4).expand_as(mean).clone()
        for _ in range(self.iterations):
            noise = torch.randn((self.population, *mean.shape), generator=generator, dtype=mean.dtype)
            samples = torch.maximum(torch.minimum(mean + std * noise, self.upper), self.lower)
            values = objective(samples)
            elite = samples[torch.topk(values, self.elites).indices]
            mean = self.alpha * mean + (1 - self.alpha) * elite.mean(0)
            std = self.alpha * std + (1 - self.alpha) * elite.std(0, unbiased=False)
        return mean


def trajectory_returns(ensemble: GaussianEnsemble, reward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                       obs: torch.Tensor, actions: torch.Tensor, particles: int,
                       generator: torch.Generator) -> torch.Tensor:
    """Expected return of each action sequence in ``actions`` ``(pop, horizon, act_dim)`` from ``obs``.

    The model predicts the change of the observation; each step samples it from the member's Gaussian.
    """
    e = ensemble.size
    if particles % e:
        raise ValueError(f"particles ({particles}) must be a multiple of the ensemble size ({e})")
    pop, horizon, act_dim = actions.shape
    per = particles // e
    n = pop * per
    # rows laid out (member, pop, per): row block m is propagated by member m; the actions of every
    # step as one view (horizon, e, n, act_dim), the noise of every step as one draw
    acts = actions.transpose(0, 1).repeat_interleave(per, dim=1).unsqueeze(1).expand(horizon, e, n, act_dim)
    state = obs.to(actions.dtype).expand(e, n, -1)
    noise = torch.randn((horizon, e, n, state.shape[-1]), generator=generator, dtype=actions.dtype)
    states = [state]
    for t in range(horizon - 1):  # the last step's next state earns no reward within the horizon
        mean, logvar = ensemble(torch.cat([state, acts[t]], dim=-1))
        state = torch.addcmul(state + mean, torch.exp(0.5 * logvar), noise[t])
        states.append(state)
    total = reward(torch.stack(states), acts).sum(0)  # the reward of every step in one batched call
    return total.reshape(e, pop, per).mean(dim=(0, 2))
