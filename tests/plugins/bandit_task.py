"""A task plug-in kept outside the repository's ``tasks/`` (the tests load it with
``QMLBENCH_PLUGINS=bandit_task``): a two-armed Bernoulli bandit, a softmax policy over the arms
trained by REINFORCE. It is the README's worked example of adding a task: one module with its
config class, its trainer and its registration; nothing else in the project names it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from config_schema import ExperimentConfig
from tasks import Task, register_task


class BanditConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    pulls: int = Field(200, ge=1, le=1_000_000)
    p: list[float] = Field(default_factory=lambda: [0.2, 0.8], min_length=2, max_length=2)
    """Probability of a reward of 1 for each arm."""
    lr: float = Field(0.2, gt=0)


class BanditExperiment(ExperimentConfig):
    task: Literal["bandit"] = "bandit"
    algorithm: str = "reinforce"
    bandit: BanditConfig = BanditConfig()

    @property
    def total_steps(self) -> int:
        return self.bandit.pulls


@dataclass
class BanditResult:
    logits: torch.Tensor
    rewards: list[float]
    best_arm: int

    @property
    def final_step(self) -> int:
        return len(self.rewards)

    def final_metrics(self) -> dict[str, float]:
        p_best = torch.softmax(self.logits, 0)[self.best_arm].item()
        return {"final/avg_reward": float(np.mean(self.rewards[-50:])), "final/p_best": p_best}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"logits": self.logits.detach().clone()}

    def figures(self, title: str) -> dict:
        return {}


def train_bandit(exp: BanditExperiment, seed: int, reporter, resume=None) -> BanditResult:
    if resume is not None:
        raise ValueError("bandit runs have no checkpoints")
    rng = np.random.default_rng(seed)
    logits = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([logits], lr=exp.bandit.lr)
    rewards: list[float] = []
    for pull in range(1, exp.bandit.pulls + 1):
        probs = torch.softmax(logits, 0)
        arm = int(rng.random() < probs[1].item())
        reward = float(rng.random() < exp.bandit.p[arm])
        loss = -reward * torch.log(probs[arm])
        opt.zero_grad()
        loss.backward()
        opt.step()
        rewards.append(reward)
        if pull % 10 == 0:
            avg = float(np.mean(rewards[-50:]))
            reporter.metrics({"bandit/avg_reward": avg}, pull)
            reporter.progress(pull, exp.bandit.pulls, avg)
    if not all(math.isfinite(v) for v in logits.tolist()):
        raise FloatingPointError("logits are not finite")
    return BanditResult(logits, rewards, int(np.argmax(exp.bandit.p)))


register_task(Task(
    name="bandit",
    title="two-armed bandit",
    config=BanditExperiment,
    trainers={"reinforce": "bandit_task:train_bandit"},
    progress_metric="bandit/avg_reward",
    progress_label="avg reward",
    step_unit="pull",
    score_column="avg_reward",
    score_metric="final/avg_reward",
    score_label="mean reward",
    extra_columns={"p_best": "final/p_best"},
    sections=("bandit",),
))
