"""The sweep configuration: a typed schema, a strict YAML loader and one-line error messages.

A sweep file has three top-level keys::

    mlflow:       {tracking_uri, experiment_name}
    defaults:     {...}   merged deeply into every experiment (the experiment's own keys win)
    experiments:  [{name, backend, gradient, ...}, ...]

Everything is validated before the first run starts. Each problem becomes one line naming the
experiment, the field and the allowed values; :class:`ConfigError` carries those lines and
``run.py`` prints them and exits with code 2.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator

from backends import BACKENDS, GRADIENT_METHODS
from noise.psd import TaskDistribution

MAX_HIDDEN_WIDTH, MAX_HIDDEN_LAYERS = 4096, 8


class ConfigError(Exception):
    """Invalid configuration; ``lines`` holds one human-readable line per problem."""

    def __init__(self, lines: list[str]):
        # A problem is one line even when it quotes input that holds line breaks (a name, a key).
        lines = [line.replace("\r", "\\r").replace("\n", "\\n") for line in lines]
        super().__init__("\n".join(lines))
        self.lines = lines


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class MLflowConfig(_Strict):
    tracking_uri: str | None = None
    """Tracking URI; unset means $MLFLOW_TRACKING_URI, else ``sqlite:///mlflow.db`` in the cwd."""
    experiment_name: str = Field("qml-cartpole", min_length=1)
    """MLflow experiment that receives the sweep's parent run and its child runs."""


class ModelConfig(_Strict):
    n_qubits: int = Field(4, ge=1, le=16)
    """Qubits of the data re-uploading circuit."""
    n_layers: int = Field(5, ge=1, le=50)
    """Re-uploading layers (each: variational Rx Ry Rz, CZ ring, encoding); a final variational layer follows."""
    observables: Literal["auto"] | list[str] = "auto"
    """One Pauli-Z product per action, e.g. ``["Z0Z1", "Z2Z3"]``; a leading ``-`` flips the sign.
    ``auto``: REINFORCE uses +/- Z0...Zn-1 (Jerbi et al.), DQN splits the qubits in two halves (Skolik et al.)."""
    init: Literal["uniform", "normal", "zeros"] = "uniform"
    """Variational angles: U(0, pi) (TFQ tutorial), N(0, 0.1^2), or all zero. Input scalings and output weights start at 1."""
    beta: float = Field(1.0, gt=0)
    """Inverse temperature of the softmax policy (REINFORCE)."""
    hidden_sizes: list[int] = Field(default_factory=lambda: [64, 64])
    """Widths of the classical MLP's hidden layers (classical backend only)."""

    @field_validator("hidden_sizes")
    @classmethod
    def _positive_widths(cls, v: list[int]) -> list[int]:
        if not v or len(v) > MAX_HIDDEN_LAYERS or any(w < 1 or w > MAX_HIDDEN_WIDTH for w in v):
            raise ValueError(f"must be 1 to {MAX_HIDDEN_LAYERS} widths, each in 1..{MAX_HIDDEN_WIDTH}")
        return v


class PennyLaneConfig(_Strict):
    device: Literal["auto", "default.qubit", "lightning.qubit"] = "auto"
    """``auto``: lightning.qubit for adjoint, default.qubit otherwise."""
    interface: Literal["auto", "jax", "torch"] = "auto"
    """``jax``: default.qubit under ``jax.jit`` (PennyLane's fastest path; padded shapes, persistent
    compilation cache); ``torch``: a torch-interface QNode with parameter broadcasting, no
    compilation. ``auto``: jax, except torch for adjoint (lightning.qubit), for MAML (it
    differentiates twice, which the jax bridge does not) and for a pinned lightning.qubit."""
    scan_layers: bool = True
    """jax interface: one compiled re-uploading layer under ``jax.lax.scan`` (compiles about 5x
    faster) instead of the whole circuit as one unrolled QNode."""


class TensorCircuitConfig(_Strict):
    math_backend: Literal["jax", "pytorch"] = "jax"
    """jax: scanned layers, jit + vmap, padded batch shapes; pytorch: torch autograd directly (MAML)."""
    fuse_gates: bool = True
    """jax: one closed-form 2x2 gate per qubit and layer (encodings folded in) and a probability
    readout; false: one TensorCircuit gate per rotation (the earlier path, for comparison)."""


class RayConfig(_Strict):
    num_cpus: float = Field(1.0, gt=0, le=1024)
    """CPUs Ray reserves for one run of this experiment (``run.py --executor ray``)."""


class LearningRates(_Strict):
    weights: float = Field(0.01, gt=0)
    """Variational angles (quantum) or all MLP weights (classical)."""
    input_scaling: float = Field(0.1, gt=0)
    """Trainable input scalings lambda of the encoding gates."""
    output: float = Field(0.1, gt=0)
    """Trainable output weights of the readout."""


class DQNConfig(_Strict):
    buffer_size: int = Field(10_000, ge=1, le=10_000_000)
    batch_size: int = Field(16, ge=1, le=1_000_000)
    epsilon_start: float = Field(1.0, ge=0, le=1)
    epsilon_end: float = Field(0.01, ge=0, le=1)
    epsilon_decay: float = Field(0.99, gt=0, le=1)
    """Multiplicative decay of epsilon after every episode."""
    target_update_every: int = Field(30, ge=1, le=10**9)
    target_update_unit: Literal["steps", "episodes"] = "steps"
    train_every: int = Field(1, ge=1, le=10**9)
    """Environment steps between gradient updates."""
    learning_starts: int | None = Field(None, ge=1, le=10**9)
    """Transitions in the buffer before the first update; unset means one batch."""


class TrainingConfig(_Strict):
    episodes: int = Field(5, ge=1, le=10_000_000)
    episodes_per_batch: int = Field(1, ge=1, le=4096)
    """REINFORCE: episodes stepped together through a vector environment per update."""
    gamma: float = Field(0.99, ge=0, le=1)
    lr: LearningRates = LearningRates()
    max_grad_norm: float | None = Field(None, gt=0)
    """Clip the total gradient norm (unset: no clipping)."""
    normalize_returns: bool = True
    """REINFORCE: standardise the returns-to-go of each episode."""
    stop_avg_return: float | None = None
    """Stop early once the mean return of the last 10 episodes reaches this (500 = CartPole-v1 maximum)."""
    checkpoint_every: int | None = Field(50, ge=1, le=10**9)
    """Save a checkpoint (weights, optimiser, RNG states, counters, DQN replay buffer) as the run's
    artifact ``checkpoint/checkpoint.pt`` every this many episodes (REINFORCE: at the first batch
    boundary past each multiple); ``run.py --resume`` continues a TIMED_OUT or KILLED run from it.
    Unset: no checkpoints."""
    dqn: DQNConfig = DQNConfig()


class SPSAConfig(_Strict):
    """Simultaneous perturbation (Spall 1998): c_k = c/(k+1)^gamma, a_k = a/(A+k+1)^alpha."""

    c: float = Field(0.1, gt=0)
    a: float | None = Field(None, gt=0)
    """Learning-rate multiplier numerator; unset means (A+1)^alpha, so a_0 = 1."""
    A: float = Field(10.0, ge=0)
    alpha: float = Field(0.602, ge=0)
    gamma: float = Field(0.101, ge=0)
    n_directions: int = Field(1, ge=1, le=10_000)


class FiniteDiffConfig(_Strict):
    step: float = Field(1e-4, gt=0, lt=1)
    scheme: Literal["central", "forward"] = "central"


LOG_SCALE_PARAMETERS = ("A", "gamma_phi", "omega_c", "A2", "omega_c2")
#: Bounds on every noise parameter (units of T = 1): beyond them rates under- or overflow.
MIN_SCALE_VALUE, MAX_SCALE_VALUE = 1e-12, 1e12


class NoiseConfig(_Strict):
    """The task distribution of the qubit tasks and the fidelity model (units of docs/CONVENTIONS.md §3: T = 1)."""

    dist_type: Literal["uniform", "log_uniform", "gaussian"] = "log_uniform"
    """log_uniform: A or gamma_phi, omega_c (A2, omega_c2) uniform in log, alpha and detuning uniform."""
    ranges: dict[str, list[float]] = Field(
        default_factory=lambda: {"alpha": [0.5, 2.0], "A": [0.03, 1.5], "omega_c": [0.1, 10.0]}
    )
    """(low, high) per parameter: alpha, omega_c, and one strength: A (PSD amplitude) or gamma_phi
    (Ramsey dephasing rate in 1/T, A solved per task: mixes shapes, not strengths); A2, omega_c2
    for double_exp; optional detuning (1/T)."""
    range_scale: float = Field(1.0, gt=0, le=1)
    """Shrink every range about its centre (geometric centre for log-uniform parameters): sweeps task variance."""
    model_types: list[Literal["one_over_f", "lorentzian", "double_exp"]] = Field(default_factory=lambda: ["one_over_f"])
    model_probs: list[float] | None = None
    simulation: Literal["trajectories", "filter_function", "markovian"] = "filter_function"
    """Fidelity model (noise/models.py): filter_function (first order, the pulse's own filter
    function against the PSD), trajectories (Monte Carlo over Gaussian noise from the PSD, exact),
    markovian (one Ramsey-filter Lindblad rate per task, the same for every pulse)."""
    time_steps: int | None = Field(None, ge=1, le=100_000)
    """Fine time steps per gate (filter_function, trajectories); a multiple of meta.n_segments,
    fine enough that dt * max(sqrt(2) max_amplitude, omega_c high) <= 0.25. Unset: the smallest
    multiple of n_segments that is at least 50 and fine enough (see MetaConfig.fine_steps)."""
    trajectories: int = Field(1000, ge=1, le=1_000_000)
    """Noise trajectories per task (trajectories model; at least 64), fixed per task (common random numbers)."""
    omega0: float = Field(100.0, gt=0)
    """Qubit frequency (1/T) where the transverse spectrum sets relaxation; at least
    10 sqrt(2) max_amplitude, so that rotating-wave relaxation holds under the drive."""
    transverse_coupling: float = Field(1.0, ge=0)
    """Transverse noise amplitude relative to the dephasing noise: Gamma_down = Gamma_up = c^2 S(omega0)/4."""

    @model_validator(mode="before")
    @classmethod
    def _removed_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in ("sequence", "n_pulses"):
                if key in data:
                    raise ValueError(
                        f"field {key!r} was removed: it chose a filter for a pulse sequence that was never applied; "
                        "the pulse's own filter function is used now (simulation: filter_function or trajectories)"
                    )
        return data

    @field_validator("ranges")
    @classmethod
    def _ranges_are_pairs(cls, v: dict[str, list[float]]) -> dict[str, list[float]]:
        for key, bounds in v.items():
            if len(bounds) != 2:
                raise ValueError(f"{key}: need [low, high], got {bounds}")
            lo, hi = bounds
            if lo > hi:
                raise ValueError(f"{key}: inverted range [{lo:g}, {hi:g}]; need low <= high")
            if key in LOG_SCALE_PARAMETERS and not (MIN_SCALE_VALUE <= lo and hi <= MAX_SCALE_VALUE):
                raise ValueError(f"{key}: [{lo:g}, {hi:g}] is outside [{MIN_SCALE_VALUE:g}, {MAX_SCALE_VALUE:g}] "
                                 "(a noise amplitude or corner frequency in units of T = 1)")
            if key in ("alpha", "detuning") and not (-MAX_SCALE_VALUE <= lo and hi <= MAX_SCALE_VALUE):
                raise ValueError(f"{key}: [{lo:g}, {hi:g}] is outside [{-MAX_SCALE_VALUE:g}, {MAX_SCALE_VALUE:g}]")
        return v

    @model_validator(mode="after")
    def _distribution_valid(self) -> NoiseConfig:
        if len(set(self.model_types)) != len(self.model_types) or not self.model_types:
            raise ValueError("field 'model_types': list distinct models from one_over_f, lorentzian, double_exp")
        try:
            self.distribution()
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        return self

    def omega_c_high(self) -> float:
        """The largest corner frequency of the (scaled) task distribution."""
        ranges = self.scaled_ranges()
        return max(ranges[k][1] for k in ("omega_c", "omega_c2") if k in ranges)

    def distribution(self, model_types: list[str] | None = None) -> TaskDistribution:
        """The task distribution, ranges shrunk by ``range_scale``; ``model_types`` replaces the
        configured models (and their probabilities) for held-out evaluation."""
        models = tuple(model_types or self.model_types)
        probs = tuple(self.model_probs) if self.model_probs is not None and model_types is None else None
        return TaskDistribution(self.dist_type, self.scaled_ranges(), models, probs)

    def scaled_ranges(self) -> dict[str, tuple[float, float]]:
        """The ranges shrunk by ``range_scale`` about their centre (geometric centre where sampled in log)."""
        out = {}
        s = self.range_scale
        for key, (lo, hi) in self.ranges.items():
            if self.dist_type == "log_uniform" and key in LOG_SCALE_PARAMETERS and lo > 0:
                log_lo, log_hi = math.log(lo), math.log(hi)  # in logs: no underflow of lo * hi
                centre = (log_lo + log_hi) / 2
                scaled = (math.exp(centre - s * (centre - log_lo)), math.exp(centre + s * (log_hi - centre)))
                out[key] = (lo, hi) if s == 1 else (max(lo, scaled[0]), min(hi, scaled[1]))  # no round-off past the ends
            else:
                centre = (lo + hi) / 2
                out[key] = (centre - s * (centre - lo), centre + s * (hi - centre))
        return out


class SupportConfig(_Strict):
    """The support (adaptation) loss: what an experiment measures, not the exact fidelity."""

    states: int = Field(2, ge=1, le=6)
    """Pauli eigenstates drawn at random (of the 6) per task and evaluation."""
    shots: int = Field(256, ge=0, le=10**9)
    """Measurement shots per state; 0 = exact probabilities."""


class MetaEvalConfig(_Strict):
    n_tasks: int = Field(32, ge=1, le=100_000)
    """Held-out validation tasks (from a seed of their own)."""
    every: int = Field(25, ge=1, le=10**9)
    """Meta-iterations between validation passes."""
    k_values: list[int] = Field(default_factory=lambda: [0, 1, 2, 5, 10])
    """Adaptation steps at which fidelity is reported (fidelity vs K)."""
    model_types: list[Literal["one_over_f", "lorentzian", "double_exp"]] | None = None
    """Held-out evaluation per model type (generalisation); unset: the training model types."""

    @field_validator("k_values")
    @classmethod
    def _k_valid(cls, v: list[int]) -> list[int]:
        if not v or any(k < 0 or k > 1000 for k in v) or sorted(set(v)) != v:
            raise ValueError("must be distinct increasing integers in 0..1000")
        return v


class BaselineConfig(_Strict):
    robust_steps: int = Field(300, ge=0, le=10**7)
    """Adam steps of the robust fixed pulse (fresh task batch each step); 0 skips it."""
    robust_batch: int = Field(32, ge=1, le=100_000)
    optimum_steps: int = Field(300, ge=0, le=10**7)
    """Adam steps of the per-task optimised pulse on every validation task; 0 skips it."""
    lr: float = Field(0.05, gt=0)


class ContextConfig(_Strict):
    """Context-based adaptation (meta/context.py): the policy reads z = encoder(support measurements)."""

    encoder: Literal["mean", "lstm", "ssm", "attention"] = "mean"
    """mean: permutation-invariant (PEARL-like); lstm; ssm (models.SSM); attention: the pooled task
    embedding is the query of multi-head attention over the measurement tokens."""
    fusion: Literal["attention", "gating", "film"] = "attention"
    """attention encoder only: z = attended tokens; gating: sigmoid gate between the task embedding and
    the attended tokens; film: gamma(embedding) * attended + beta(embedding)."""
    probes: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    """Probe pulses, one measurement token each: a constant drive u_x = probe * max_amplitude over the
    gate (fractions in [0, 1]), measured like the support loss (support.states, support.shots)."""
    ramsey: bool = True
    """Add a Ramsey token (|+> idle over the gate, read out in the y basis): the sign of the detuning,
    which no fidelity of an x drive shows."""
    embed_dim: int = Field(16, ge=2, le=512)
    heads: int = Field(2, ge=1, le=16)
    """Attention heads (attention encoder); embed_dim must be a multiple."""
    context_dim: int = Field(4, ge=1, le=64)
    """Size of z, the policy's input."""
    inner_steps: int = Field(0, ge=0, le=1000)
    """Gradient steps on the support loss after the context, in training and in the headline number (0: context only)."""
    attention_every: int = Field(25, ge=1, le=10**9)
    """Meta-iterations between attention statistics and heat maps (attention encoder)."""

    @model_validator(mode="after")
    def _tokens(self) -> ContextConfig:
        if any(not 0 <= p <= 1 for p in self.probes) or not self.probes:
            raise ValueError("probes: need at least one drive fraction, each in [0, 1]")
        if self.encoder == "attention" and len(self.probes) + self.ramsey < 2:
            raise ValueError(f"probes: attention needs at least two tokens (softmax over one is always 1); "
                             f"got {len(self.probes) + self.ramsey} (probes {len(self.probes)}, ramsey {self.ramsey})")
        if self.encoder == "attention" and self.embed_dim % self.heads:
            raise ValueError(f"heads: embed_dim {self.embed_dim} is not a multiple of {self.heads} heads")
        return self


class MetaConfig(_Strict):
    target_gate: Literal["identity", "x", "y", "h", "sqrt_x"] = "x"
    fidelity: Literal["average", "state_transfer"] = "average"
    """Query loss: average gate fidelity, or the earlier work's |0> state-transfer fidelity."""
    n_segments: int = Field(10, ge=1, le=200)
    max_amplitude: float = Field(2 * 3.141592653589793, gt=0)
    """Bound on |u_x|, |u_y| (1/T); a pi pulse needs pi."""
    task_input: Literal["features", "none"] = "features"
    """features: normalised (alpha, log A, log omega_c[, model]); none: the policy never sees the task."""
    noise: NoiseConfig = NoiseConfig()
    iterations: int = Field(200, ge=1, le=10_000_000)
    """Meta-iterations (one meta-batch of tasks each)."""
    meta_batch_size: int = Field(8, ge=1, le=4096)
    inner_steps: int = Field(5, ge=1, le=1000)
    inner_lr: float = Field(0.05, gt=0)
    """Plain gradient steps on the support loss (also used at evaluation)."""
    meta_lr: float = Field(0.01, gt=0)
    """Adam learning rate of the meta-parameters."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the meta-gradient norm (unset: no clipping)."""
    support: SupportConfig = SupportConfig()
    eval: MetaEvalConfig = MetaEvalConfig()
    baselines: BaselineConfig = BaselineConfig()
    context: ContextConfig | None = None
    """Context-based adaptation (meta/context.py) instead of gradient steps from a task-blind start; unset: off."""

    @model_validator(mode="after")
    def _context_input(self) -> MetaConfig:
        if self.context is not None and self.task_input != "none":
            raise ValueError("field 'task_input': with a context encoder the policy reads z, not the task's features; set task_input: none")
        return self

    @property
    def fine_steps(self) -> int:
        """Fine time steps of the non-Markovian models: ``noise.time_steps``, or when unset the smallest
        multiple of n_segments that is at least 50 and resolves the drive and the PSD corner."""
        if self.noise.time_steps is not None:
            return self.noise.time_steps
        from noise.models import min_time_steps

        need = max(50, min_time_steps(self.max_amplitude, self.noise.omega_c_high()))
        return self.n_segments * math.ceil(need / self.n_segments)

    @model_validator(mode="after")
    def _noise_model_valid(self) -> MetaConfig:
        from noise.models import MIN_TRAJECTORIES, check_drive, min_time_steps

        noise = self.noise
        try:
            check_drive(noise.omega0, self.max_amplitude)
        except ValueError as exc:
            raise ValueError(f"noise.omega0: {exc}") from None
        if noise.simulation == "trajectories" and noise.trajectories < MIN_TRAJECTORIES:
            raise ValueError(f"noise.trajectories: {noise.trajectories} is too few for a standard error; need at least {MIN_TRAJECTORIES}")
        if noise.simulation == "markovian" or noise.time_steps is None:
            return self
        if noise.time_steps % self.n_segments:
            raise ValueError(f"noise.time_steps: {noise.time_steps} is not a multiple of n_segments {self.n_segments}")
        need = min_time_steps(self.max_amplitude, noise.omega_c_high())
        if noise.time_steps < need:
            raise ValueError(
                f"noise.time_steps: {noise.time_steps} steps do not resolve the drive and the PSD corner "
                f"(max_amplitude {self.max_amplitude:.4g}, omega_c up to {noise.omega_c_high():.4g}); need at least {need}"
            )
        return self


class ExperimentConfig(_Strict):
    """What every experiment has, whatever its task. Each task (``tasks/``) subclasses this with
    ``task: Literal[name]``, its algorithms and its own sections; :func:`parse_experiment` picks
    the class from ``task``."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$", max_length=200)
    task: str
    algorithm: str
    backend: str
    gradient: str
    model: ModelConfig = ModelConfig()
    pennylane: PennyLaneConfig = PennyLaneConfig()
    tensorcircuit: TensorCircuitConfig = TensorCircuitConfig()
    spsa: SPSAConfig = SPSAConfig()
    finite_diff: FiniteDiffConfig = FiniteDiffConfig()
    seed: int | None = Field(None, ge=0, lt=2**32)
    seeds: list[int] | None = None
    timeout_s: float = Field(600.0, gt=0, le=7 * 24 * 3600)
    """Hard wall-clock limit of one run (its own process is killed at this time)."""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    ray: RayConfig = RayConfig()
    """Resources of one run under ``run.py --executor ray``."""

    @field_validator("backend")
    @classmethod
    def _backend_registered(cls, v: str) -> str:
        BACKENDS.get(v)
        return v

    @field_validator("gradient")
    @classmethod
    def _gradient_registered(cls, v: str) -> str:
        GRADIENT_METHODS.get(v)
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds_valid(cls, v: list[int] | None) -> list[int] | None:
        if v is not None:
            if not v:
                raise ValueError("must list at least one seed")
            if any(s < 0 or s >= 2**32 for s in v):
                raise ValueError("seeds must be integers in [0, 2**32)")
            if len(set(v)) != len(v):
                raise ValueError("seeds must be distinct")
        return v

    @model_validator(mode="after")
    def _backend_and_gradient(self) -> ExperimentConfig:
        backend = BACKENDS.get(self.backend)
        if self.gradient not in backend.gradients:
            raise ValueError(
                f"field 'gradient': {self.gradient!r} is not available on backend {self.backend!r}; "
                f"allowed: {', '.join(backend.gradients)}"
            )
        backend.check(self)
        from tasks import TASKS  # the task's registration names its algorithms (and trains them)

        algorithms = TASKS.get(self.task).algorithms
        if self.algorithm not in algorithms:
            raise ValueError(f"field 'algorithm': {self.algorithm!r} does not apply to task {self.task!r}; "
                             f"allowed: {', '.join(algorithms)}")
        if self.seed is not None and self.seeds is not None:
            raise ValueError("fields 'seed' and 'seeds': give one or the other, not both")
        return self

    @property
    def seed_list(self) -> list[int]:
        if self.seeds is not None:
            return list(self.seeds)
        return [self.seed if self.seed is not None else 0]

    @property
    def total_steps(self) -> int:
        """Length of the progress bar, in the task's step unit."""
        raise NotImplementedError(f"task {self.task!r} does not say how long it runs")

    # What the model builder (models.build_model) asks the task; a task overrides what differs.
    @property
    def policy_head(self) -> str:
        """``policy``: softmax over the outputs; ``q``: the outputs are action values."""
        return "policy"

    def observation_scale(self, n_inputs: int) -> tuple[float, ...] | None:
        """Inputs are divided by this (None: used as they are)."""
        return None

    def default_observables(self, n_qubits: int) -> list[str]:
        """Readouts for ``model.observables: auto``: +/- the Z product of all qubits."""
        all_z = "".join(f"Z{q}" for q in range(n_qubits))
        return [all_z, "-" + all_z]

    def drop_unused(self, data: dict) -> None:
        """Remove from ``data`` (this experiment as plain data) what its algorithm does not read."""

    def description_extra(self) -> str:
        """What the run's one-line description adds about the task (``", 500 episodes"``)."""
        return ""

    @property
    def second_order_capable(self) -> bool:
        """Whether autograd can differentiate the model's gradient again (needed by MAML)."""
        return BACKENDS.get(self.backend).second_order(self)

    @property
    def pennylane_interface(self) -> str:
        """The PennyLane interface this experiment uses (``pennylane.interface`` with ``auto`` resolved)."""
        if self.pennylane.interface != "auto":
            return self.pennylane.interface
        if self.gradient == "adjoint" or self.algorithm == "maml" or self.pennylane.device == "lightning.qubit":
            return "torch"
        return "jax"

    @property
    def gradient_is_estimated(self) -> bool:
        """True when the gradient comes from the black-box estimators (SPSA, finite differences)."""
        return GRADIENT_METHODS.get(self.gradient).estimated


def parse_experiment(data: Any) -> ExperimentConfig:
    """Validate one experiment with its task's config class (``task`` missing: ``cartpole``)."""
    from tasks import TASKS

    if not isinstance(data, dict):
        raise ValueError("an experiment must be a mapping")
    task = data.get("task", DEFAULT_TASK)
    if not isinstance(task, str) or task not in TASKS:
        raise ConfigError([f"field 'task': {task!r} is not a registered task; allowed: {', '.join(TASKS.names())}"])
    _check_task_family(data, task)
    return TASKS.get(task).config.model_validate({**data, "task": task})


def _check_task_family(data: dict, task: str) -> None:
    """``meta_algorithm`` only on a task with a family of tasks (a config class that has the field)."""
    from tasks import TASKS

    if "meta_algorithm" in data and "meta_algorithm" not in TASKS.get(task).config.model_fields:
        families = [t.name for t in TASKS if "meta_algorithm" in t.config.model_fields]
        raise ConfigError([f"field 'meta_algorithm': task {task!r} has no task family; "
                           f"meta_algorithm applies to: {', '.join(families)}"])


DEFAULT_TASK = "cartpole"


def applicable_fields(exp: ExperimentConfig) -> dict:
    """The resolved experiment as plain data without the sections it does not use (what
    ``run.py --dry-run`` prints): the backend's own section, the estimator's own settings, the
    circuit's or the MLP's model fields; the task's class has only its own sections already and
    may drop more (:meth:`ExperimentConfig.drop_unused`)."""
    data = exp.model_dump(mode="json")
    unused = {"pennylane": exp.backend != "pennylane", "tensorcircuit": exp.backend != "tensorcircuit",
              "spsa": exp.gradient != "spsa", "finite_diff": exp.gradient != "finite-diff"}
    for key, drop in unused.items():
        if drop:
            data.pop(key)
    model_only = ("hidden_sizes",) if BACKENDS.get(exp.backend).is_circuit else ("n_qubits", "n_layers", "observables", "init")
    for key in model_only:
        data["model"].pop(key)
    exp.drop_unused(data)
    return data


def task_sections() -> dict[str, tuple[str, ...]]:
    """Config section -> the tasks that read it (a ``--set`` into a section no experiment of the
    sweep reads is refused; one only some read applies to those)."""
    from tasks import TASKS

    owners: dict[str, tuple[str, ...]] = {}
    for task in TASKS:
        for section in task.sections:
            owners[section] = owners.get(section, ()) + (task.name,)
    return owners


class SweepConfig(_Strict):
    mlflow: MLflowConfig = MLflowConfig()
    experiments: list[SerializeAsAny[ExperimentConfig]]
    """Each an instance of its task's config class (see :func:`parse_experiment`)."""
    source: str = "<memory>"
    """Where the config came from (for messages and the parent run)."""


# ---------------------------------------------------------------------------------------------
# Loading


#: A sweep config is a few kilobytes; anything this large is a mistake (or an attack).
MAX_CONFIG_BYTES = 1_000_000
MAX_YAML_ALIASES = 100
#: Deepest nesting of mappings and lists accepted (a sweep needs about 6 levels).
MAX_YAML_DEPTH = 40
#: Values a config may hold once every alias is expanded ("billion laughs" and merge bombs stay
#: a few kilobytes on disk but expand exponentially).
MAX_EXPANDED_VALUES = 100_000


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader with bounded work: at most MAX_YAML_ALIASES aliases (``*name``), nesting at most
    MAX_YAML_DEPTH deep (the composer recurses once per level; deeper input would end in
    RecursionError), duplicate keys refused instead of silently keeping the last one. Merge keys
    (``<<: *base``) work as in YAML 1.1: explicit keys win over merged ones."""

    n_aliases = 0
    depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.n_aliases += 1
            if self.n_aliases > MAX_YAML_ALIASES:
                raise yaml.YAMLError(f"more than {MAX_YAML_ALIASES} aliases (*name)")
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                raise yaml.YAMLError(f"nested more than {MAX_YAML_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _construct_mapping(loader: _BoundedLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, f"unhashable key {key!r}", key_node.start_mark
            ) from None
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    loader.flatten_mapping(node)  # merged keys first, explicit keys after them (the last one wins)
    return loader.construct_mapping(node, deep=deep)


_BoundedLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def expanded_size(value: Any) -> int:
    """How many values ``value`` holds with every shared (aliased) part counted each time it is
    referenced: the work a walk over it does. Computed once per distinct object, so a bomb is
    measured without being expanded."""
    sizes: dict[int, int] = {}

    def size(v: Any) -> int:
        if not isinstance(v, (dict, list)):
            return 1
        if id(v) not in sizes:
            children = v.values() if isinstance(v, dict) else v
            sizes[id(v)] = 1 + sum(size(c) for c in children)
        return sizes[id(v)]

    return size(value)  # depth is bounded by the loader, so the recursion is too


def safe_yaml_load(text: str) -> Any:
    """Parse YAML with bounded time and memory (see :class:`_BoundedLoader`); raises
    ``yaml.YAMLError`` for input past the bounds."""
    value = yaml.load(text, Loader=_BoundedLoader)
    if expanded_size(value) > MAX_EXPANDED_VALUES:
        raise yaml.YAMLError(f"aliases expand it to more than {MAX_EXPANDED_VALUES} values")
    return value


def deep_merge(base: dict, override: dict) -> dict:
    """Return ``base`` updated recursively by ``override`` (neither is modified)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``dotted.key=value`` (value is YAML: ``5``, ``0.1``, ``[1, 2]``, ``lightning.qubit``)."""
    shown = text if len(text) <= 80 else text[:77] + "..."
    if "=" not in text:
        raise ConfigError([f"--set {shown!r}: expected dotted.key=value"])
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError([f"--set {shown!r}: empty key"])
    try:
        value = safe_yaml_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError([f"--set {shown!r}: value is not valid YAML ({_one_line(str(exc))})"]) from None
    return parts, value


def _blame_override(line: str, override_text: dict[str, str]) -> str:
    """A validation error about a field that ``--set`` changed, attributed to the command line."""
    match = re.search(r"field '([^']+)': (.*)$", line)
    if match:
        field_path, rest = match.groups()
        for key, text in override_text.items():
            if field_path == key or field_path.startswith(key + ".") or key.startswith(field_path + "."):
                shown = text if len(text) <= 80 else text[:77] + "..."
                return f"--set {shown!r}: field {field_path!r}: {rest}"
    return line


def _select(experiments: list[ExperimentConfig], only: list[str] | tuple[str, ...]) -> list[ExperimentConfig]:
    """``--only``: experiment names, or run names as the summary prints them (``NAME-seedN``:
    that experiment with that seed alone). Unknown names get the closest ones suggested."""
    import difflib

    by_name = {e.name: e for e in experiments}
    run_names = {f"{e.name}-seed{seed}": (e.name, seed) for e in experiments for seed in e.seed_list}
    wanted: dict[str, list[int] | None] = {}  # None: every seed of the experiment
    lines = []
    for item in only:
        if item in by_name:
            wanted[item] = None
        elif item in run_names:
            name, seed = run_names[item]
            if wanted.get(name, []) is not None:
                wanted.setdefault(name, []).append(seed)
        else:
            close = difflib.get_close_matches(item, [*by_name, *run_names], n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}?" if close else f"allowed: {', '.join(by_name)}"
            lines.append(f"--only {item!r}: no such experiment or run; {hint}")
    if lines:
        raise ConfigError(lines)
    return [e if wanted[e.name] is None else e.model_copy(update={"seed": None, "seeds": wanted[e.name]})
            for e in experiments if e.name in wanted]


def _set_dotted(target: dict, parts: list[str], value: Any) -> None:
    node = target
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _format_validation_error(prefix: str, exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if err["type"] == "extra_forbidden":
            lines.append(f"{prefix}: unknown field {loc!r}")
        elif loc:
            got = err.get("input")
            shown = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
            if len(shown) > 60:
                shown = shown[:57] + "..."
            lines.append(f"{prefix}: field {loc!r}: {msg} (got {shown})")
        else:
            lines.append(f"{prefix}: {msg}")
    return lines


def _read_yaml(path: Path) -> Any:
    try:
        if not path.is_file():  # a FIFO or a device would block the read or never end
            what = "no such file" if not path.exists() else "not a regular file"
            raise ConfigError([f"{path}: cannot read config file ({what})"])
        with path.open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config file ({exc.strerror or exc})"]) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError([f"{path}: config file is larger than {MAX_CONFIG_BYTES // 1_000_000} MB; a sweep config is a few KB"])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: config file is not valid UTF-8"]) from None
    try:
        return safe_yaml_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: invalid YAML: {_one_line(str(exc))}"]) from None


def load_config(
    path: str | Path | None = None,
    *,
    raw: Any = None,
    overrides: list[str] | tuple[str, ...] = (),
    only: list[str] | tuple[str, ...] = (),
) -> SweepConfig:
    """Load, merge and validate a sweep; raise :class:`ConfigError` listing every problem.

    ``overrides`` are ``dotted.key=value`` strings: keys under ``mlflow.`` change the mlflow
    section, any other key is set in every experiment (after the defaults are merged in).
    ``only`` keeps the named experiments (unknown names are an error).
    """
    source = str(path) if path is not None else "<memory>"
    if raw is None:
        if path is None:
            raise ValueError("load_config needs a path or raw data")
        raw = _read_yaml(Path(path))
    if raw is None:
        raise ConfigError([f"{source}: config file is empty; expected keys: mlflow, defaults, experiments"])
    if not isinstance(raw, dict):
        raise ConfigError([f"{source}: top level must be a mapping with keys mlflow, defaults, experiments"])
    unknown = sorted(set(map(str, raw)) - {"mlflow", "defaults", "experiments"})
    if unknown:
        raise ConfigError(
            [f"{source}: unknown top-level field {k!r}; allowed: mlflow, defaults, experiments" for k in unknown]
        )
    mlflow_raw = raw.get("mlflow") or {}
    defaults = raw.get("defaults") or {}
    experiments_raw = raw.get("experiments")
    lines: list[str] = []
    if not isinstance(mlflow_raw, dict):
        lines.append(f"{source}: field 'mlflow' must be a mapping")
    if not isinstance(defaults, dict):
        lines.append(f"{source}: field 'defaults' must be a mapping")
    if not isinstance(experiments_raw, list) or not experiments_raw:
        lines.append(f"{source}: field 'experiments' must be a non-empty list")
    if lines:
        raise ConfigError(lines)

    experiment_overrides = []
    override_text: dict[str, str] = {}
    mlflow_raw = copy.deepcopy(mlflow_raw)
    for text in overrides:
        parts, value = parse_override(text)
        override_text[".".join(parts)] = text
        if parts[0] == "mlflow":
            if len(parts) < 2:
                raise ConfigError([f"--set {text!r}: name a field under mlflow"])
            _set_dotted(mlflow_raw, parts[1:], value)
        else:
            experiment_overrides.append((parts, value))

    try:
        mlflow_cfg = MLflowConfig.model_validate(mlflow_raw)
    except ValidationError as exc:
        lines.extend(_format_validation_error(f"{source}: mlflow", exc))
        mlflow_cfg = None

    experiments: list[ExperimentConfig] = []
    names: dict[str, int] = {}
    try:
        sections = task_sections()  # imports the task plug-ins
    except ImportError as exc:
        raise ConfigError([str(exc)]) from None
    for i, item in enumerate(experiments_raw):
        label = f"{source}: experiments[{i}]"
        if not isinstance(item, dict):
            lines.append(f"{label}: must be a mapping with at least name, backend, gradient")
            continue
        merged = deep_merge(defaults, item)
        for parts, value in experiment_overrides:
            _set_dotted(merged, parts, value)
        task = merged.get("task", DEFAULT_TASK)
        for section, readers in sections.items():  # defaults and --set for other tasks do not apply here
            if task not in readers and section not in item:
                merged.pop(section, None)
        name = merged.get("name")
        if isinstance(name, str):
            label += f" ({name})"
        try:
            exp = parse_experiment(merged)
        except ConfigError as exc:
            lines.extend(f"{label}: {line}" for line in exc.lines)
            continue
        except ValidationError as exc:
            for line in _format_validation_error(label, exc):
                blamed = _blame_override(line, override_text)
                if blamed not in lines:  # an override's error once, not once per experiment
                    lines.append(blamed)
            continue
        if exp.name in names:
            lines.append(f"{label}: field 'name': {exp.name!r} is used by experiments[{names[exp.name]}] too")
            continue
        names[exp.name] = i
        experiments.append(exp)
    if lines:
        raise ConfigError(lines)

    for key, text in override_text.items():
        tasks = sections.get(key.split(".")[0])
        if tasks and not any(e.task in tasks for e in experiments):
            lines.append(f"--set {text if len(text) <= 80 else text[:77] + '...'!r}: {key.split('.')[0]}.* applies to "
                         f"task {' / '.join(tasks)}, and no experiment of {source} has that task")
    if lines:
        raise ConfigError(lines)

    if only:
        experiments = _select(experiments, only)
    assert mlflow_cfg is not None
    return SweepConfig(mlflow=mlflow_cfg, experiments=experiments, source=source)
