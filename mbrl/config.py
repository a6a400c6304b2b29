"""PETS and Dyna settings: small pydantic models the task plug-in embeds as its ``pets`` and ``dyna`` sections.

Settings that cannot plan (elites above the population, a zero horizon, particles that do not
split evenly over the ensemble) are refused with one line naming the field, before any run starts.
Defaults are the issue's anchors (Chua et al. 2018; mbrl-lib's pets configs) cut down so that one
planning step stays near 50 ms on one CPU core; the README's PETS section gives the measurement.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class EnsembleSettings(BaseModel):
    """The Gaussian ensemble and its fit (mbrl/ensemble.py), shared by the PETS, pulse and Dyna sections."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    ensemble_size: int = Field(5, ge=1, le=64)
    hidden: int = Field(64, ge=1, le=4096)
    layers: int = Field(3, ge=1, le=8)
    """Hidden layers per member."""
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(5e-5, ge=0)
    epochs: int = Field(5, ge=1)
    """Passes over each member's bootstrap sample at every fit."""
    batch_size: int = Field(64, ge=1)
    """The model's minibatch size."""
    holdout_fraction: float = Field(0.1, ge=0, lt=1)
    """Share of the model's data never fitted on; the held-out NLL metric is measured on it."""


class PETSConfig(EnsembleSettings):
    """The ``pets`` section of a ``pendulum`` experiment (the ensemble fits after every episode)."""

    env_steps: int = Field(5000, ge=1, le=10_000_000)
    """Environment steps of the whole run, the random seed episodes included."""
    seed_steps: int = Field(200, ge=1)
    """Steps of uniformly random actions before the first model is trained."""
    horizon: int = Field(15)
    population: int = Field(200)
    elites: int = Field(20)
    iterations: int = Field(3)
    particles: int = Field(10)
    """Trajectory-sampling particles per candidate; each is propagated by one member throughout (TS-inf)."""
    alpha: float = Field(0.1, ge=0, lt=1)
    """CEM smoothing: new mean/std = alpha * old + (1 - alpha) * elites'."""
    eval_episodes: int = Field(3, ge=1, le=1000)

    @field_validator("horizon", "population", "elites", "iterations", "particles")
    @classmethod
    def _positive(cls, value: int, info) -> int:
        if value < 1:
            raise ValueError(f"{info.field_name} must be a positive integer, got {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> PETSConfig:
        if self.elites > self.population:
            raise ValueError(f"elites ({self.elites}) must be at most population ({self.population})")
        if self.particles % self.ensemble_size:
            raise ValueError(f"particles ({self.particles}) must be a multiple of ensemble_size ({self.ensemble_size}) "
                             "so each member propagates as many particles")
        if self.seed_steps > self.env_steps:
            raise ValueError(f"seed_steps ({self.seed_steps}) must be at most env_steps ({self.env_steps})")
        return self


class PulsePETSConfig(EnsembleSettings):
    """The ``pets`` section of a ``qubit_pulse`` experiment (one (pulse, reward) sample per episode,
    the ensemble fits after every episode, episodes are held out whole)."""

    env_steps: int = Field(2000, ge=1, le=10_000_000)
    """Environment steps of the whole run (``n_segments`` per episode), the random episodes included."""
    seed_episodes: int = Field(10, ge=2)
    """Episodes of uniformly random pulses before the first model is trained."""
    hidden: int = Field(128, ge=1, le=4096)
    layers: int = Field(2, ge=1, le=8)
    weight_decay: float = Field(1e-4, ge=0)
    epochs: int = Field(60, ge=1)
    batch_size: int = Field(32, ge=1)
    population: int = Field(300, ge=1)
    elites: int = Field(30, ge=1)
    iterations: int = Field(5, ge=1)
    alpha: float = Field(0.1, ge=0, lt=1)
    reward: Literal["fidelity", "log_infidelity"] = "log_infidelity"
    """What the environment returns at the end of an episode, and so what the ensemble learns."""
    eval_every: int = Field(10, ge=1)
    """Episodes between two held-out evaluations of the mean-model plan."""

    @model_validator(mode="after")
    def _consistent(self) -> PulsePETSConfig:
        if self.elites > self.population:
            raise ValueError(f"elites ({self.elites}) must be at most population ({self.population})")
        return self


class DynaConfig(EnsembleSettings):
    """Dyna (MBPO-style, Janner et al. 2019) on top of SB3's SAC: the model settings and the
    model-rollout schedule. SAC's own settings (batch size, ``gradient_steps`` = updates per
    environment step, learning rate, ``total_steps``) stay in the ``control`` section.

    Rollout length: ``k_min`` up to env step ``schedule_start``, then linear up to ``k_max`` at
    ``schedule_end`` (rounded down), ``k_max`` after; ``k_min == k_max`` is a fixed length.
    The ensemble fits on the real buffer every ``model_train_every`` steps; ``batch_size`` is the
    model's (SAC's is ``control.batch_size``); held out are real transitions by replay-buffer slot.
    """

    model_train_every: int = Field(250)
    """Environment steps between model fits; each fit is followed by a batch of model rollouts."""
    rollouts_per_step: int = Field(20)
    """Model rollouts per environment step: ``rollouts_per_step * model_train_every`` after every fit."""
    k_min: int = Field(1)
    k_max: int = Field(5)
    schedule_start: int = Field(1000)
    schedule_end: int = Field(4000)
    model_buffer_size: int = Field(100_000)
    """Model transitions kept (oldest dropped first)."""
    real_ratio: float = Field(0.1)
    """Share of every SAC batch drawn from the real buffer (rounded to whole rows); the rest from the model buffer."""

    @field_validator("model_train_every", "rollouts_per_step", "k_min", "k_max", "model_buffer_size")
    @classmethod
    def _positive(cls, value: int, info) -> int:
        if value < 1:
            raise ValueError(f"{info.field_name} must be a positive integer, got {value}")
        return value

    @field_validator("schedule_start", "schedule_end")
    @classmethod
    def _non_negative(cls, value: int, info) -> int:
        if value < 0:
            raise ValueError(f"{info.field_name} must be a non-negative environment step, got {value}")
        return value

    @field_validator("real_ratio")
    @classmethod
    def _ratio(cls, value: float) -> float:
        if not 0 < value <= 1:
            raise ValueError(f"real_ratio must be in (0, 1], got {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> DynaConfig:
        if self.k_min > self.k_max:
            raise ValueError(f"k_min ({self.k_min}) must be at most k_max ({self.k_max})")
        if self.schedule_start >= self.schedule_end:
            raise ValueError(f"schedule_start ({self.schedule_start}) must be below schedule_end ({self.schedule_end})")
        return self
