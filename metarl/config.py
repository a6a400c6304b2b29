"""Settings of ``task: pendulum_meta``: the family's parameter ranges and split sizes, the dynamics
model, the meta-learner and the CEM planner used during evaluation.

Ranges are ``[low, high]``; the out-of-distribution range of a parameter must contain its training
range strictly on both sides (OOD tasks are drawn from the wider range minus the training range).
Bad values are refused with one line naming the field, before any run starts.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PARAMETERS = ("g", "m", "l")


class PendulumMetaConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    # --- the family (CARL's Pendulum defaults g = 10, m = 1, l = 1 at the centre)
    g_range: list[float] = Field(default_factory=lambda: [8.0, 12.0])
    m_range: list[float] = Field(default_factory=lambda: [0.8, 1.2])
    l_range: list[float] = Field(default_factory=lambda: [0.8, 1.2])
    g_ood_range: list[float] = Field(default_factory=lambda: [5.0, 15.0])
    m_ood_range: list[float] = Field(default_factory=lambda: [0.5, 1.6])
    l_ood_range: list[float] = Field(default_factory=lambda: [0.5, 1.6])
    n_train_tasks: int = 6
    n_heldout_tasks: int = 3
    n_ood_tasks: int = 3
    episode_steps: int = Field(200, ge=10, le=1000)
    """Steps of one episode (Pendulum-v1's time limit is 200)."""

    # --- meta-training data: episodes of uniformly random torques per train task
    data_episodes: int = Field(4, ge=1, le=1000)

    policy_rounds: int = Field(2, ge=0, le=100)
    """Rounds of on-policy data after the random episodes: each round trains ``iterations``
    meta-iterations, then runs one planner episode per train task (the model adapted on that task's
    latest episode) and adds it to the data (Nagabandi et al.'s iterative collection)."""

    # --- the dynamics model (a GaussianEnsemble from mbrl/)
    ensemble_size: int = Field(1, ge=1, le=16)
    hidden: int = Field(64, ge=1, le=4096)
    layers: int = Field(2, ge=1, le=8)
    latent_dim: int = Field(5, ge=1, le=64)
    """context only: dimension of the task latent (PEARL uses 5)."""
    encoder_hidden: int = Field(64, ge=1, le=4096)
    kl_weight: float = Field(0.1, ge=0)
    """context only: weight of KL(q(z | context) || N(0, I)) in the training loss."""

    # --- meta-training
    iterations: int = Field(1000, ge=1, le=1_000_000)
    """Meta-iterations per round, ``(policy_rounds + 1) * iterations`` in all (pooled: gradient
    steps on batches of the pooled data)."""
    meta_batch: int = Field(4, ge=1)
    """Tasks per meta-iteration."""
    support_size: int = Field(32, ge=1)
    """Consecutive transitions the inner step (or the encoder) sees."""
    query_size: int = Field(32, ge=1)
    """The transitions right after the support ones, on which the adapted model is scored."""
    inner_lr: float = Field(0.01, gt=0)
    """MAML: the inner SGD step's learning rate (in training and at evaluation)."""
    inner_steps: int = Field(1, ge=1, le=100)
    """MAML: SGD steps of the adaptation (in training and at evaluation)."""
    outer_lr: float = Field(1e-3, gt=0)
    """Adam's learning rate (MAML, context, pooled)."""
    reptile_step: float = Field(1.0, gt=0, le=1)
    """Reptile's epsilon: theta <- theta + epsilon * mean_i (theta_i - theta) (1: the mean of the tasks' adapted weights)."""
    reptile_inner_lr: float = Field(0.03, gt=0)
    reptile_inner_steps: int = Field(5, ge=1, le=100)
    """Reptile: SGD steps per task in training and of the adaptation at evaluation (one step would
    make Reptile joint training)."""

    # --- evaluation: the CEM planner with the known Pendulum reward
    adapt_episodes: int = Field(2, ge=0, le=20)
    """Returns are reported after 0 .. adapt_episodes adaptation episodes."""
    horizon: int = 15
    population: int = 100
    elites: int = 10
    cem_iterations: int = 3
    particles: int = 1
    alpha: float = Field(0.1, ge=0, lt=1)

    @field_validator("g_range", "m_range", "l_range", "g_ood_range", "m_ood_range", "l_ood_range")
    @classmethod
    def _range(cls, value: list[float], info) -> list[float]:
        if len(value) != 2:
            raise ValueError(f"{info.field_name} must be [low, high], got {value}")
        low, high = value
        if not (low < high):
            raise ValueError(f"{info.field_name} needs low < high, got {value}")
        if low <= 0:
            raise ValueError(f"{info.field_name} must be positive (a physical g, m or l), got {value}")
        return value

    @field_validator("n_train_tasks", "n_heldout_tasks", "n_ood_tasks", "horizon", "population", "elites",
                     "cem_iterations", "particles")
    @classmethod
    def _at_least_one(cls, value: int, info) -> int:
        if value < 1:
            raise ValueError(f"{info.field_name} must be at least 1, got {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> PendulumMetaConfig:
        for p in PARAMETERS:
            lo, hi = getattr(self, f"{p}_range")
            wlo, whi = getattr(self, f"{p}_ood_range")
            if not (wlo < lo and hi < whi):
                raise ValueError(f"{p}_ood_range ({[wlo, whi]}) must contain {p}_range ({[lo, hi]}) strictly on both sides")
        if self.elites > self.population:
            raise ValueError(f"elites ({self.elites}) must be at most population ({self.population})")
        if self.particles % self.ensemble_size:
            raise ValueError(f"particles ({self.particles}) must be a multiple of ensemble_size ({self.ensemble_size})")
        if self.meta_batch > self.n_train_tasks:
            raise ValueError(f"meta_batch ({self.meta_batch}) must be at most n_train_tasks ({self.n_train_tasks})")
        if self.support_size + self.query_size > self.episode_steps:
            raise ValueError(f"support_size + query_size ({self.support_size + self.query_size}) must fit in one episode "
                             f"(episode_steps {self.episode_steps})")
        return self

    @property
    def total_iterations(self) -> int:
        return (self.policy_rounds + 1) * self.iterations

    def range(self, parameter: str) -> tuple[float, float]:
        return tuple(getattr(self, f"{parameter}_range"))

    def ood_range(self, parameter: str) -> tuple[float, float]:
        return tuple(getattr(self, f"{parameter}_ood_range"))
