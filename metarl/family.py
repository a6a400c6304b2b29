"""A family of Pendulum-v1 tasks varying gravity ``g``, mass ``m`` and length ``l`` (CARL's
Pendulum context features), and its splits.

gymnasium's Pendulum-v1 takes ``g`` as a keyword; its unwrapped environment reads ``m`` and ``l``
as attributes in every step (``thdot += (3 g / (2 l) sin th + 3 / (m l^2) u) dt``), so setting them
after ``make`` changes the dynamics. The reward does not depend on them.

Splits, all from one seeded generator: ``train`` and ``heldout`` tasks are drawn uniformly from
the training ranges (distinct draws); ``ood`` tasks draw every parameter uniformly from its wider
range minus the training range, so each OOD task lies outside the training box in all three.
"""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import numpy as np

from metarl.config import PARAMETERS, PendulumMetaConfig

ENV_ID = "Pendulum-v1"
SPLITS = ("train", "heldout", "ood")


@dataclass(frozen=True)
class PendulumTask:
    g: float
    m: float
    l: float  # noqa: E741 (the pendulum's length, as gymnasium names it)

    def as_dict(self) -> dict[str, float]:
        return {"g": self.g, "m": self.m, "l": self.l}

    def make_env(self, episode_steps: int = 200) -> gym.Env:
        env = gym.make(ENV_ID, g=self.g, max_episode_steps=episode_steps)
        env.unwrapped.m = self.m
        env.unwrapped.l = self.l
        return env


def _outside(rng: np.random.Generator, inner: tuple[float, float], outer: tuple[float, float]) -> float:
    """Uniform on ``[outer_lo, inner_lo) U (inner_hi, outer_hi]``."""
    (lo, hi), (wlo, whi) = inner, outer
    left, right = lo - wlo, whi - hi
    u = rng.uniform(0.0, left + right)
    if u < left:
        return wlo + u
    value = hi + (u - left)
    return value if value > hi else float(np.nextafter(hi, np.inf))


def make_splits(cfg: PendulumMetaConfig, rng: np.random.Generator) -> dict[str, list[PendulumTask]]:
    def inside() -> PendulumTask:
        return PendulumTask(**{p: float(rng.uniform(*cfg.range(p))) for p in PARAMETERS})

    train = [inside() for _ in range(cfg.n_train_tasks)]
    heldout: list[PendulumTask] = []
    while len(heldout) < cfg.n_heldout_tasks:
        task = inside()
        if task not in train and task not in heldout:  # continuous draws: a repeat is (almost) impossible, but refuse it
            heldout.append(task)
    ood = [PendulumTask(**{p: float(_outside(rng, cfg.range(p), cfg.ood_range(p))) for p in PARAMETERS})
           for _ in range(cfg.n_ood_tasks)]
    return {"train": train, "heldout": heldout, "ood": ood}
