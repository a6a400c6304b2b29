"""Partially observed CartPole (velocities hidden) with an MLP, GRU or SSM policy body, trained by
PPO (Stable-Baselines3): the policy body is chosen in the config (``pomdp.body``), so the memory
comparison of pomdp/cartpole.py runs as a sweep with MLflow runs. Classical backend only: the
bodies are torch modules. The score is the mean return of deterministic evaluation episodes."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from config_schema import ExperimentConfig
from tasks import Task, register_task


class PomdpConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)

    body: Literal["mlp", "gru", "ssm"] = "ssm"
    """Policy body over the window of frames: stacked-frame MLP, GRU, or models.SSM."""
    window: int = Field(4, ge=1, le=256)
    """Observations (cart position, pole angle) stacked as the body's input."""
    steps: int = Field(100_000, ge=256, le=100_000_000)
    """Environment steps of PPO (8 environments)."""
    hidden: int = Field(64, ge=2, le=4096)
    eval_episodes: int = Field(20, ge=1, le=10_000)
    ssm_state: int | None = Field(None, ge=1, le=4096)
    """SSM state size (unset: hidden / 2)."""
    ssm_dt: list[float] = Field(default_factory=lambda: [0.1, 1.0], min_length=2, max_length=2)
    """SSM initial step range (dt_min, dt_max) in frames."""

    @model_validator(mode="after")
    def _dt(self) -> PomdpConfig:
        if not 0 < self.ssm_dt[0] <= self.ssm_dt[1]:
            raise ValueError(f"ssm_dt: {self.ssm_dt}; need 0 < dt_min <= dt_max")
        return self


class CartPolePomdpExperiment(ExperimentConfig):
    task: Literal["cartpole_pomdp"] = "cartpole_pomdp"
    algorithm: str = "ppo"
    pomdp: PomdpConfig = PomdpConfig()

    @model_validator(mode="after")
    def _classical(self) -> CartPolePomdpExperiment:
        if self.backend != "classical" or self.gradient != "backprop":
            raise ValueError("field 'backend': cartpole_pomdp trains torch bodies with PPO; allowed: backend classical, gradient backprop")
        return self

    @property
    def total_steps(self) -> int:
        return self.pomdp.steps

    def description_extra(self) -> str:
        return f", {self.pomdp.body} body, {self.pomdp.window} frames, {self.pomdp.steps} steps"


register_task(Task(
    name="cartpole_pomdp",
    title="CartPole-v1, velocities hidden",
    config=CartPolePomdpExperiment,
    trainers={"ppo": "pomdp.cartpole:train_task"},
    progress_metric="rollout/avg_return_20",
    progress_label="avg return",
    step_unit="env step",
    score_column="eval_return",
    score_metric="final/eval_return",
    score_label="evaluation return",
    extra_columns={"train_return_last20": "final/train_return_last20"},
    sections=("pomdp",),
))
