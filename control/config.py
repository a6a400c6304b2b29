"""The ``control`` section of the continuous-control tasks (pendulum, qubit_pulse): pydantic only,
so validating a config imports no simulator and no Stable-Baselines3."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from config_schema import MAX_HIDDEN_LAYERS, MAX_HIDDEN_WIDTH, _Strict


class ControlConfig(_Strict):
    """Stable-Baselines3 SAC, TD3 or DDPG with this project's actor (control/sb3.py). Unset
    hyperparameters keep Stable-Baselines3's default for the algorithm."""

    total_steps: int = Field(20_000, ge=1, le=10**9)
    """Environment steps of training."""
    learning_rate: float | None = Field(None, gt=0)
    buffer_size: int | None = Field(None, ge=1, le=10**8)
    learning_starts: int | None = Field(None, ge=0, le=10**9)
    batch_size: int | None = Field(None, ge=1, le=1_000_000)
    tau: float | None = Field(None, gt=0, le=1)
    gamma: float | None = Field(None, ge=0, le=1)
    train_freq: int | None = Field(None, ge=1, le=10**6)
    gradient_steps: int | None = Field(None, ge=1, le=10**6)
    action_noise_std: float | None = Field(None, gt=0)
    """Gaussian exploration noise on the [-1, 1]-scaled action (the zoo's TD3/DDPG: 0.1); unset: none."""
    ent_coef: Literal["auto"] | float = "auto"
    """SAC: the entropy coefficient, or ``auto`` (tuned to a target entropy)."""
    policy_delay: int | None = Field(None, ge=1, le=1000)
    """TD3: critic updates per actor update."""
    critic_net_arch: list[int] | None = None
    """Hidden widths of the classical critics; unset: SB3's default (SAC [256, 256], TD3/DDPG [400, 300])."""
    eval_every: int = Field(5_000, ge=1, le=10**9)
    """Environment steps between deterministic evaluations (and one at the end)."""
    eval_episodes: int = Field(10, ge=10, le=10_000)
    """Episodes per evaluation (one vector environment of this many copies, reseeded identically each time)."""
    threshold: float | None = None
    """Mean evaluation return whose first crossing is reported as ``final/steps_to_threshold``;
    unset: the task's (pendulum -200, qubit_pulse none)."""
    checkpoint_every: int | None = Field(5_000, ge=1, le=10**9)
    """Checkpoint (SB3 weights and optimisers, replay buffer, RNG states, counters) at the first
    episode end past every multiple of this many steps; unset: none."""
    reward: Literal["fidelity", "log_infidelity"] = "fidelity"
    """qubit_pulse: final reward F or -log10(1 - F)."""

    @field_validator("critic_net_arch")
    @classmethod
    def _widths(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or len(v) > MAX_HIDDEN_LAYERS or any(w < 1 or w > MAX_HIDDEN_WIDTH for w in v)):
            raise ValueError(f"must be 1 to {MAX_HIDDEN_LAYERS} widths, each in 1..{MAX_HIDDEN_WIDTH}")
        return v


def check_control(exp) -> None:
    """What a continuous-control experiment cannot combine (one ``field '...'`` line each)."""
    if exp.model.observables != "auto":
        raise ValueError("field 'model.observables': continuous control reads out <Z_i> on every qubit; leave it 'auto'")
    if exp.algorithm != "td3" and exp.control.policy_delay is not None:
        raise ValueError(f"field 'control.policy_delay': applies to algorithm 'td3' only; got {exp.algorithm!r}")
    if exp.algorithm not in ("sac", "dyna") and exp.control.ent_coef != "auto":
        raise ValueError(f"field 'control.ent_coef': applies to algorithms 'sac' and 'dyna' only; got {exp.algorithm!r}")
