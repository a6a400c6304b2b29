"""SAC, TD3 and DDPG from Stable-Baselines3 with this project's policy model as the actor.

The actor is built by :func:`models` pieces (an :class:`models.MLPPolicy`, or the data
re-uploading circuit on PennyLane or TensorCircuit with a linear map from <Z_i> on every qubit to
the action parameters, as in QuantumSAC, Lan 2021) inside custom SB3 policy classes whose
``make_actor`` returns it: the critics (and their targets) stay SB3's classical MLPs, and no
circuit is copied into them (a features extractor would be). SB3 runs everything else:
replay buffer, twin critics, entropy tuning (SAC), delayed policy updates and target smoothing
(TD3), target networks, exploration noise.

The actor's gradient follows the experiment's method: autograd through the circuit backend
(backprop, adjoint, parameter shift: models.py), or SPSA / finite differences of gradients.py
applied to the vector-Jacobian product: when SB3 back-propagates ``g = dL/d outputs`` into the
actor, the estimator differentiates the scalar ``theta -> sum(g * outputs(theta))``, whose
gradient is exactly that product, with all its shifted points in one batched call. (The
circuit's linear readout map is classical post-processing and is differentiated exactly.)

Circuit evaluations: ``grad/circuit_evals`` counts the circuits that served the actor's gradient
(the actor's forward passes with autograd on, and the estimators' shifted points);
``final/total_circuit_evals`` every circuit (acting, critic targets, evaluation included).

Metrics go through an SB3 logger output (:class:`ReporterOutput`) to the run's reporter, against
the environment step: ``rollout/`` (SB3's ``ep_rew_mean``, ``ep_len_mean``, and
``rollout/episode_return`` per episode), ``train/`` (``actor_loss``, ``critic_loss``,
``ent_coef``, ``ent_coef_loss``, ``n_updates``), ``eval/return`` (mean of a deterministic
evaluation over ``control.eval_episodes`` episodes every ``control.eval_every`` steps),
``grad/`` (``circuit_evals``, ``norm``), ``time/``.

Checkpoints (``control.checkpoint_every``) are taken between two environment steps at an
episode boundary: SB3's policy and optimiser states, the SAC entropy coefficient, the replay
buffer, the counters, every RNG (torch, numpy's global generator that SB3 samples the buffer and
the action noise from, the action space's, the environment's before its last reset), the
estimators' generators. A resumed run continues exactly where the checkpoint was taken.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3 import DDPG, SAC, TD3
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.distributions import SquashedDiagGaussianDistribution
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.logger import KVWriter, Logger
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.noise import NormalActionNoise
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.preprocessing import get_action_dim
from stable_baselines3.common.vec_env import DummyVecEnv
from stable_baselines3.sac import policies as sac_policies
from stable_baselines3.td3 import policies as td3_policies
from torch import nn

import gradients
from backends import BACKENDS
from config_schema import ExperimentConfig
from models import DTYPE, CircuitSpec, MLPPolicy, ReUploadingPQC, compile_metrics
from tasks import pendulum, qubit_pulse
from utils import NonFiniteError, seed_streams

ALGORITHMS = {"sac": SAC, "td3": TD3, "ddpg": DDPG}
ENV_IDS = {"pendulum": pendulum.ENV_ID, "qubit_pulse": qubit_pulse.ENV_ID}
THRESHOLDS = {"pendulum": pendulum.THRESHOLD, "qubit_pulse": None}
#: A continuous-control run's own random streams (utils.seed_streams): the actor's SPSA directions
#: and the evaluation environments' reset seeds (the same episodes at every evaluation). Stable-
#: Baselines3 seeds the rest itself from the run's seed (``seed=``: python, numpy's and torch's
#: global generators, the training environment, the action space), as its users expect.
SEED_STREAMS = ("actor_spsa", "eval_env")
CHECKPOINT_FORMAT = 1


# ---------------------------------------------------------------------------------------------
# The actor: this project's policy model, its gradient by the experiment's method


class _EstimatedOutputs(torch.autograd.Function):
    """Outputs ``(B, O)`` of the body's policy model at the flat parameters; backward estimates
    the vector-Jacobian product with SPSA or finite differences (see the module docstring)."""

    @staticmethod
    def forward(ctx, flat: torch.Tensor, obs: torch.Tensor, body: ActorBody) -> torch.Tensor:
        ctx.body = body
        ctx.save_for_backward(flat, obs)
        return body.model.functional_forward(flat.detach()[None], obs)[0]

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        flat, obs = ctx.saved_tensors
        body = ctx.body
        g = grad_output.to(DTYPE)

        def surrogate(points: torch.Tensor) -> torch.Tensor:  # (M, P) -> (M,)
            return (body.model.functional_forward(points, obs) * g).sum((1, 2))

        return body.estimate(surrogate, flat.detach()).grad.to(flat.dtype), None, None


class ActorBody(nn.Module):
    """Observations ``(B, d)`` -> action parameters ``(B, n_out)`` (float64): the classical MLP,
    or the re-uploading circuit read out as <Z_i> on every qubit followed by a linear map.
    Observations are divided by ``input_scale`` (the observation space's bound) first."""

    def __init__(self, exp: ExperimentConfig, n_inputs: int, n_out: int, input_scale: np.ndarray, seed: int):
        super().__init__()
        self.method = exp.gradient
        scale = tuple(float(x) for x in input_scale)
        backend = BACKENDS.get(exp.backend)
        if not backend.is_circuit:
            self.model = MLPPolicy(n_inputs, n_out, exp.model.hidden_sizes, "q", 1.0, seed, scale)
            self.head = None
        else:
            n = exp.model.n_qubits
            spec = CircuitSpec(n, exp.model.n_layers, n_inputs, tuple((1.0, (q,)) for q in range(n)))
            self.model = ReUploadingPQC(spec, backend.build_circuit(spec, exp), "q", 1.0, exp.model.init, seed, scale)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.head = nn.Linear(n, n_out, dtype=DTYPE)
        self.spsa_gains = gradients.SPSAGains(**exp.spsa.model_dump(exclude={"n_directions"}))
        self.spsa_directions = exp.spsa.n_directions
        self.fd_step, self.fd_scheme = exp.finite_diff.step, exp.finite_diff.scheme
        self.generator = seed_streams(seed, SEED_STREAMS)["actor_spsa"].torch()
        self.k = 0
        self.no_grad_evals = 0
        """Circuits evaluated without autograd (acting, critic targets, evaluation)."""

    @property
    def estimated(self) -> bool:
        return self.method in ("spsa", "finite-diff")

    def estimate(self, surrogate, x: torch.Tensor) -> gradients.GradientEstimate:
        if self.method == "spsa":
            est = gradients.spsa(surrogate, x, self.spsa_gains.c_k(self.k), self.spsa_directions, self.generator)
        else:
            est = gradients.finite_difference(surrogate, x, self.fd_step, self.fd_scheme)
        self.k += 1
        return est

    @property
    def grad_evals(self) -> int:
        return self.model.circuit_evals - self.no_grad_evals

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        obs = obs.to(DTYPE)
        before = self.model.circuit_evals
        if torch.is_grad_enabled() and self.estimated:
            flat = torch.cat([p.reshape(-1) for p in self.model.parameters()])
            out = _EstimatedOutputs.apply(flat, obs, self)
        else:
            out = self.model(obs)
        if not torch.is_grad_enabled():
            self.no_grad_evals += self.model.circuit_evals - before
        return out if self.head is None else self.head(out)

    def counters(self) -> dict:
        return {"k": self.k, "generator": self.generator.get_state(), "no_grad_evals": self.no_grad_evals,
                "circuit_evals": self.model.circuit_evals}

    def load_counters(self, state: dict) -> None:
        self.k, self.no_grad_evals = state["k"], state["no_grad_evals"]
        self.generator.set_state(state["generator"])
        self.model.circuit_evals = state["circuit_evals"]


def _init_base(actor: BasePolicy, observation_space, action_space, features_extractor, normalize_images: bool) -> None:
    BasePolicy.__init__(actor, observation_space, action_space, features_extractor=features_extractor,
                        normalize_images=normalize_images, squash_output=True)


class ProjectSACActor(sac_policies.Actor):
    """SB3's SAC actor interface (squashed Gaussian) on an :class:`ActorBody` with 2 x action_dim
    outputs: means, then log standard deviations (clamped as SB3 does)."""

    def __init__(self, observation_space, action_space, features_extractor, features_dim: int, body: ActorBody,
                 normalize_images: bool = True):
        _init_base(self, observation_space, action_space, features_extractor, normalize_images)
        self.use_sde, self.sde_features_extractor, self.net_arch = False, None, []
        self.features_dim, self.activation_fn = features_dim, nn.Identity
        self.log_std_init, self.use_expln, self.full_std, self.clip_mean = 0.0, False, True, 0.0
        self.body = body
        self.action_dist = SquashedDiagGaussianDistribution(get_action_dim(action_space))

    def get_action_dist_params(self, obs):
        out = self.body(self.extract_features(obs, self.features_extractor)).to(torch.float32)
        a = out.shape[1] // 2
        return out[:, :a], torch.clamp(out[:, a:], sac_policies.LOG_STD_MIN, sac_policies.LOG_STD_MAX), {}


class ProjectTD3Actor(td3_policies.Actor):
    """SB3's TD3/DDPG actor interface on an :class:`ActorBody`: action = tanh(body(obs))."""

    def __init__(self, observation_space, action_space, features_extractor, features_dim: int, body: ActorBody,
                 normalize_images: bool = True):
        _init_base(self, observation_space, action_space, features_extractor, normalize_images)
        self.net_arch, self.features_dim, self.activation_fn = [], features_dim, nn.Identity
        self.body = body

    def forward(self, obs):
        return torch.tanh(self.body(self.extract_features(obs, self.features_extractor))).to(torch.float32)


class _ProjectActorMixin:
    """``make_actor`` builds this project's actor from ``actor_body`` (a factory: a fresh body per
    call, identical initial weights: the actor and TD3's actor target)."""

    actor_class: type

    def __init__(self, *args, actor_body, **kwargs):
        object.__setattr__(self, "_actor_body", actor_body)  # before nn.Module.__init__, which _build follows
        super().__init__(*args, **kwargs)

    def make_actor(self, features_extractor=None):
        kwargs = self._update_features_extractor(self.actor_kwargs, features_extractor)
        return self.actor_class(kwargs["observation_space"], kwargs["action_space"], kwargs["features_extractor"],
                                kwargs["features_dim"], self._actor_body(), kwargs["normalize_images"]).to(self.device)


class ProjectSACPolicy(_ProjectActorMixin, sac_policies.SACPolicy):
    actor_class = ProjectSACActor


class ProjectTD3Policy(_ProjectActorMixin, td3_policies.TD3Policy):
    actor_class = ProjectTD3Actor


def actor_bodies(model) -> list[ActorBody]:
    """The actor's body, and the actor target's (TD3, DDPG)."""
    out = [model.policy.actor.body]
    target = getattr(model.policy, "actor_target", None)
    if target is not None:
        out.append(target.body)
    return out


# ---------------------------------------------------------------------------------------------
# Environments


class RecordResetRng(gym.Wrapper):
    """Keeps the environment's generator state from just before its last reset, so a checkpoint
    taken at an episode boundary can redo that reset exactly."""

    rng_before_reset: dict | None = None

    def reset(self, **kwargs):
        if kwargs.get("seed") is None:
            self.rng_before_reset = self.unwrapped.np_random.bit_generator.state
        out = self.env.reset(**kwargs)
        if kwargs.get("seed") is not None:  # seeded now: the state the seed set, before the draw
            self.rng_before_reset = None
        return out


def make_env(exp: ExperimentConfig) -> gym.Env:
    """The task's environment: Pendulum-v1, or QubitPulse-v0 over the experiment's meta section."""
    if exp.task == "pendulum":
        return gym.make(ENV_IDS["pendulum"])
    if exp.task == "qubit_pulse":
        import envs  # noqa: F401 - registers QubitPulse-v0

        return gym.make(ENV_IDS["qubit_pulse"], meta=exp.meta, reward=exp.control.reward)
    raise ValueError(f"task {exp.task!r}; allowed: {', '.join(ENV_IDS)}")


def input_scale(space: gym.spaces.Box) -> np.ndarray:
    """Per observation: its bound max(|low|, |high|) where finite and positive, else 1."""
    bound = np.maximum(np.abs(space.low), np.abs(space.high)).astype(np.float64)
    return np.where(np.isfinite(bound) & (bound > 0), bound, 1.0)


# ---------------------------------------------------------------------------------------------
# Logging, evaluation, checkpoints


class ReporterOutput(KVWriter):
    """An SB3 logger output that forwards every numeric value to the run's reporter (MLflow),
    at the step SB3 dumps with (the environment step). A non-finite training loss ends the run."""

    def __init__(self, reporter):
        self.reporter = reporter
        self.last_step: int | None = None

    def write(self, key_values: dict, key_excluded: dict, step: int = 0) -> None:  # noqa: ARG002
        values = {}
        for key, value in key_values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                continue
            value = float(value)
            if not math.isfinite(value) and key.startswith("train/"):
                raise NonFiniteError(f"non-finite {key} at step {step}")
            values[key] = value
        if "time/fps" in values:
            values["time/env_steps_per_s"] = values["time/fps"]
        if values:
            self.reporter.metrics(values, step)
        self.last_step = step

    def close(self) -> None:
        pass


@dataclass
class History:
    """What a run has measured so far (checkpointed with it)."""

    evals: list[tuple[int, float, float]] = field(default_factory=list)
    """(env step, mean, std) of every deterministic evaluation."""
    episodes: list[tuple[int, float]] = field(default_factory=list)
    """(env step at its end, return) of every training episode."""
    threshold_step: int | None = None
    grad_evals_logged: int = 0

    def state(self) -> dict:
        return {"evals": torch.tensor(self.evals, dtype=torch.float64).reshape(-1, 3),
                "episodes": torch.tensor(self.episodes, dtype=torch.float64).reshape(-1, 2),
                "threshold_step": -1 if self.threshold_step is None else self.threshold_step,
                "grad_evals_logged": self.grad_evals_logged}

    @classmethod
    def from_state(cls, state: dict) -> History:
        return cls([(int(s), m, d) for s, m, d in state["evals"].tolist()],
                   [(int(s), r) for s, r in state["episodes"].tolist()],
                   None if state["threshold_step"] < 0 else state["threshold_step"], state["grad_evals_logged"])


class ControlCallback(BaseCallback):
    """Between two environment steps (after the update of the step before): the deterministic
    evaluation every ``eval_every`` steps, then, when an episode has ended or an evaluation ran,
    every metric of this step in one dump (SB3's ``rollout/`` and ``time/`` statistics, the last
    update's ``train/`` values, ``rollout/episode_return``, ``eval/``, ``grad/``), then a
    checkpoint at the first episode boundary past every ``checkpoint_every`` steps. One dump per
    step keeps a resumed run's logging exact: the worker skips the steps up to the last
    ``rollout/episode_return`` it finds, and those steps were logged whole."""

    def __init__(self, run: ContinuousRun):
        super().__init__()
        self.run = run
        self._norms: list[float] = []
        self._ended: list[tuple[int, dict]] = []

    def grad_norm_hook(self, optimizer, args, kwargs) -> None:  # noqa: ARG002 - torch's step pre-hook signature
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach().double()) for g in grads])))
        if not math.isfinite(norm):
            raise NonFiniteError(f"non-finite actor gradient at step {self.model.num_timesteps}")
        self._norms.append(norm)

    def _on_step(self) -> bool:
        for done, info in zip(self.locals["dones"], self.locals["infos"]):
            if done and "episode" in info:
                self._ended.append((self.model.num_timesteps, info))
        return True

    def _on_rollout_start(self) -> None:
        self.flush()

    def flush(self, final: bool = False) -> None:
        """Evaluate if due (or ``final`` and not yet at this step), dump this step's metrics if
        there are any, report progress, checkpoint if due."""
        run, step = self.run, self.model.num_timesteps
        if step >= run.next_eval or (final and (not run.history.evals or run.history.evals[-1][0] < step)):
            run.evaluate()
            run.next_eval = (step // run.cfg.eval_every + 1) * run.cfg.eval_every
        logged = self.run.output.last_step == step
        if self._ended or (run.history.evals and run.history.evals[-1][0] == step and not logged) or (final and not logged):
            for end_step, info in self._ended:
                ret = float(info["episode"]["r"])
                run.history.episodes.append((end_step, ret))
                self.logger.record("rollout/episode_return", ret)
                if "fidelity" in info:
                    self.logger.record("rollout/fidelity", float(info["fidelity"]))
            self._ended.clear()
            self.record_counters()
            self.model.dump_logs()
            last = run.history.evals[-1][1] if run.history.evals else float("nan")
            run.reporter.progress(step, run.total_steps, last)
        every = run.cfg.checkpoint_every
        if not final and every is not None and step >= run.next_checkpoint and bool(self.model._last_episode_starts[0]):
            run.next_checkpoint = (step // every + 1) * every
            run.reporter.checkpoint(run.checkpoint(), step)

    def record_counters(self) -> None:
        """Circuits behind the actor's gradients since the last dump, the mean actor gradient norm."""
        run = self.run
        grad = run.grad_evals
        self.logger.record("grad/circuit_evals", grad - run.history.grad_evals_logged)
        run.history.grad_evals_logged = grad
        if self._norms:
            self.logger.record("grad/norm", float(np.mean(self._norms)))
            self._norms.clear()
        if run.quantum:
            self.logger.record("time/total_circuit_evals", run.total_evals)
            for key, value in compile_metrics(run.bodies[0].model).items():
                self.logger.record(key, value)


def initialise_jax() -> None:
    """Start jax's backends now. The first start imports ``jax._src.clusters.k8s_cluster``, which
    draws from numpy's *global* generator at import (``np.random.rand(5)``, jax 0.10); SB3 samples
    its replay buffer and action noise from that generator, so a first circuit compilation in the
    middle of training would shift every later sample (and a resumed run would differ from an
    uninterrupted one). Called before SB3 seeds the generator."""
    import jax

    jax.devices()


class ContinuousRun:
    """One run: the SB3 model, its environments, the evaluation and the checkpoints."""

    def __init__(self, exp: ExperimentConfig, seed: int, reporter, algorithm: str | None = None,
                 sb3_kwargs: dict | None = None):
        """``algorithm``: the SB3 algorithm when it is not ``exp.algorithm`` (Dyna runs SAC);
        ``sb3_kwargs``: extra arguments of its constructor (Dyna's replay buffer class)."""
        algorithm = algorithm or exp.algorithm
        self.algorithm = algorithm
        self.quantum = BACKENDS.get(exp.backend).is_circuit
        if self.quantum:
            initialise_jax()
        self.exp, self.seed, self.reporter, self.cfg = exp, seed, reporter, exp.control
        self.total_steps = self.cfg.total_steps
        self.env = DummyVecEnv([lambda: Monitor(RecordResetRng(make_env(exp)))])
        self.eval_env = DummyVecEnv([lambda: Monitor(make_env(exp)) for _ in range(self.cfg.eval_episodes)])
        obs_space, act_space = self.env.observation_space, self.env.action_space
        n_inputs, n_actions = int(np.prod(obs_space.shape)), get_action_dim(act_space)
        n_out = 2 * n_actions if algorithm == "sac" else n_actions
        scale = input_scale(obs_space)

        def body() -> ActorBody:
            return ActorBody(exp, n_inputs, n_out, scale, seed)

        policy_kwargs: dict = {"actor_body": body}
        if self.cfg.critic_net_arch is not None:
            policy_kwargs["net_arch"] = {"pi": [], "qf": list(self.cfg.critic_net_arch)}
        kwargs = {k: getattr(self.cfg, k) for k in ("learning_rate", "buffer_size", "learning_starts", "batch_size",
                                                     "tau", "gamma", "train_freq", "gradient_steps")
                  if getattr(self.cfg, k) is not None}
        if algorithm == "sac":
            kwargs["ent_coef"] = self.cfg.ent_coef
        if algorithm == "td3" and self.cfg.policy_delay is not None:
            kwargs["policy_delay"] = self.cfg.policy_delay
        if self.cfg.action_noise_std is not None:
            kwargs["action_noise"] = NormalActionNoise(np.zeros(n_actions), self.cfg.action_noise_std * np.ones(n_actions))
        kwargs.update(sb3_kwargs or {})
        policy = ProjectSACPolicy if algorithm == "sac" else ProjectTD3Policy
        self.model = ALGORITHMS[algorithm](policy, self.env, policy_kwargs=policy_kwargs, seed=seed, device="cpu",
                                           verbose=0, **kwargs)
        self.output = ReporterOutput(reporter)
        self.model.set_logger(Logger(folder=None, output_formats=[self.output]))
        self.bodies = actor_bodies(self.model)
        self.callback = ControlCallback(self)
        self.extra_callbacks: list[BaseCallback] = []
        """Called after :attr:`callback` at every environment step (Dyna's model fits and rollouts)."""
        self.model.actor.optimizer.register_step_pre_hook(self.callback.grad_norm_hook)
        self.history = History()
        self.threshold = self.cfg.threshold if self.cfg.threshold is not None else THRESHOLDS[exp.task]
        self.eval_seed = seed_streams(seed, SEED_STREAMS)["eval_env"].int() % 2**31
        self.next_eval = self.cfg.eval_every
        self.next_checkpoint = self.cfg.checkpoint_every or 0
        self.elapsed_before = 0.0
        self.t_start = time.perf_counter()

    # -- counters

    @property
    def grad_evals(self) -> int:
        return sum(b.grad_evals for b in self.bodies)

    @property
    def total_evals(self) -> int:
        return sum(b.model.circuit_evals for b in self.bodies)

    @property
    def elapsed_s(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t_start

    # -- evaluation

    def evaluate(self) -> tuple[float, float]:
        """Deterministic policy, ``eval_episodes`` episodes (the same initial states every time)."""
        t0 = time.perf_counter()
        self.eval_env.seed(self.eval_seed)
        returns, _ = evaluate_policy(self.model, self.eval_env, n_eval_episodes=self.cfg.eval_episodes,
                                     deterministic=True, return_episode_rewards=True, warn=False)
        mean, std = float(np.mean(returns)), float(np.std(returns))
        step = self.model.num_timesteps
        self.history.evals.append((step, mean, std))
        if self.threshold is not None and self.history.threshold_step is None and mean >= self.threshold:
            self.history.threshold_step = step
        values = {"eval/return": mean, "eval/return_std": std, "time/eval_s": time.perf_counter() - t0}
        if self.exp.task == "qubit_pulse":
            values["eval/fidelity"] = float(np.mean([episode_fidelity(r, self.cfg.reward) for r in returns]))
        for key, value in values.items():  # dumped with the other metrics of this step (ControlCallback.flush)
            self.model.logger.record(key, value)
        return mean, std

    # -- checkpoints

    def checkpoint(self) -> dict:
        """Everything a resumed run needs (tensors and plain data: ``torch.load(weights_only=True)``)."""
        m = self.model
        buf = m.replay_buffer
        size = buf.buffer_size if buf.full else buf.pos
        arrays = ("observations", "next_observations", "actions", "rewards", "dones", "timeouts")
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        wrapper = self.env.envs[0].env
        state = {
            "format": CHECKPOINT_FORMAT, "kind": f"continuous-{self.exp.algorithm}",
            "num_timesteps": m.num_timesteps, "n_updates": m._n_updates, "episode_num": m._episode_num,
            "policy": {k: v.detach().cpu().clone() for k, v in m.policy.state_dict().items()},
            "actor_optimizer": m.actor.optimizer.state_dict(), "critic_optimizer": m.critic.optimizer.state_dict(),
            "buffer": {name: torch.from_numpy(getattr(buf, name)[:size].copy()) for name in arrays},
            "buffer_pos": buf.pos, "buffer_full": buf.full,
            "ep_info": torch.tensor([[e["r"], e["l"], e["t"]] for e in m.ep_info_buffer], dtype=torch.float64).reshape(-1, 3),
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                          "has_gauss": has_gauss, "cached_gaussian": cached},
            "action_space_rng": m.action_space.np_random.bit_generator.state,
            "env_rng_before_reset": wrapper.rng_before_reset,
            "bodies": [b.counters() for b in self.bodies],
            "history": self.history.state(),
            "next_eval": self.next_eval, "next_checkpoint": self.next_checkpoint, "elapsed_s": self.elapsed_s,
        }
        if self.exp.algorithm == "sac" and m.ent_coef_optimizer is not None:
            state["log_ent_coef"] = m.log_ent_coef.detach().clone()
            state["ent_coef_optimizer"] = m.ent_coef_optimizer.state_dict()
        return state

    def restore(self, state: dict) -> None:
        """Continue from :meth:`checkpoint`'s state (call before :meth:`learn`)."""
        if state.get("format") != CHECKPOINT_FORMAT or state.get("kind") != f"continuous-{self.exp.algorithm}":
            raise ValueError(f"checkpoint is not a continuous-{self.exp.algorithm} checkpoint of format {CHECKPOINT_FORMAT}")
        m = self.model
        m.policy.load_state_dict(state["policy"])
        m.actor.optimizer.load_state_dict(state["actor_optimizer"])
        m.critic.optimizer.load_state_dict(state["critic_optimizer"])
        if "log_ent_coef" in state:
            with torch.no_grad():
                m.log_ent_coef.copy_(state["log_ent_coef"])
            m.ent_coef_optimizer.load_state_dict(state["ent_coef_optimizer"])
        buf = m.replay_buffer
        for name, value in state["buffer"].items():
            getattr(buf, name)[: value.shape[0]] = value.numpy()
        buf.pos, buf.full = state["buffer_pos"], state["buffer_full"]
        m.num_timesteps, m._n_updates, m._episode_num = state["num_timesteps"], state["n_updates"], state["episode_num"]
        m.ep_info_buffer = deque(({"r": r, "l": int(length), "t": t} for r, length, t in state["ep_info"].tolist()),
                                 maxlen=m._stats_window_size)
        m.ep_success_buffer = deque(maxlen=m._stats_window_size)
        # Redo the reset the interrupted run did after its last checkpointed episode.
        self.env.reset()  # consumes the seed SB3 gave the environment at construction
        if state["env_rng_before_reset"] is not None:
            self.env.envs[0].unwrapped.np_random.bit_generator.state = state["env_rng_before_reset"]
            m._last_obs = self.env.reset()
        else:  # the checkpoint came before any episode ended: the first, seeded reset
            self.env.seed(self.seed)
            m._last_obs = self.env.reset()
        m._last_episode_starts = np.ones((1,), dtype=bool)
        torch.set_rng_state(state["torch_rng"])
        rng = state["numpy_rng"]
        np.random.set_state((rng["kind"], rng["keys"].numpy().astype(np.uint32), rng["pos"], rng["has_gauss"],
                             rng["cached_gaussian"]))
        m.action_space.np_random.bit_generator.state = state["action_space_rng"]
        for body, counters in zip(self.bodies, state["bodies"], strict=True):
            body.load_counters(counters)
        self.history = History.from_state(state["history"])
        self.next_eval, self.next_checkpoint = state["next_eval"], state["next_checkpoint"]
        self.elapsed_before = state["elapsed_s"]

    # -- training

    def learn(self) -> None:
        self.t_start = time.perf_counter()
        if getattr(self.callback, "model", None) is None:
            self.callback.init_callback(self.model)
        remaining = self.total_steps - self.model.num_timesteps
        if remaining > 0:
            # log_interval=None: SB3 dumps nothing itself; ControlCallback.flush dumps once per step
            callback = [self.callback, *self.extra_callbacks] if self.extra_callbacks else self.callback
            self.model.learn(remaining, callback=callback, log_interval=None,
                             reset_num_timesteps=self.model._last_obs is None)
        self.callback.flush(final=True)  # the last evaluation, episode and updates

    def close(self) -> None:
        self.env.close()
        self.eval_env.close()


def episode_fidelity(episode_return: float, reward: str) -> float:
    """The fidelity behind a QubitPulse episode's return (its only non-zero reward is the last)."""
    return episode_return if reward == "fidelity" else 1.0 - 10.0 ** (-episode_return)


# ---------------------------------------------------------------------------------------------
# qubit_pulse: the learned pulse beside the qubit baselines


def deterministic_pulse(model, exp: ExperimentConfig) -> torch.Tensor:
    """The pulse (N, 2) the deterministic policy plays: its observations (segment index, controls
    so far) do not depend on the task, so it is one pulse for every task."""
    import envs  # noqa: F401

    env = gym.make(ENV_IDS["qubit_pulse"], meta=exp.meta, reward=exp.control.reward).unwrapped
    obs, _ = env.reset(seed=0)
    for _ in range(env.n_segments):
        action, _ = model.predict(obs, deterministic=True)
        obs, *_ = env.step(action)
    return torch.as_tensor(env.controls.copy(), dtype=torch.float64)


def pulse_reference(exp: ExperimentConfig, seed: int) -> tuple:
    """The validation tasks of ``qubit_meta`` with the same seed and the robust pulse trained on its
    training tasks (None when ``meta.baselines.robust_steps`` is 0): the same streams, so the same
    tasks, fidelity model and robust pulse as the qubit_meta run of that seed."""
    from envs.qubit_pulse import pulse_task_factory
    from meta.algorithms import robust_pulse
    from meta.train import SEED_STREAMS as META_STREAMS

    meta = exp.meta
    factory = pulse_task_factory(meta)
    streams = seed_streams(seed, META_STREAMS)
    train_rng = streams["train_tasks"].numpy()
    val_tasks = factory.sample(meta.eval.n_tasks, streams["validation"].numpy())
    robust = None
    if meta.baselines.robust_steps > 0:
        robust = robust_pulse(lambda n: factory.sample(n, train_rng), meta.n_segments, meta.max_amplitude,
                              meta.baselines.robust_steps, meta.baselines.robust_batch, meta.baselines.lr,
                              streams["robust"].torch())
    return val_tasks, robust


def pulse_baselines(exp: ExperimentConfig, seed: int, learned: torch.Tensor, reference: tuple | None = None) -> dict[str, float]:
    """Held-out fidelity of the learned pulse, the robust pulse and the per-task optimum on the
    tasks of :func:`pulse_reference` (``reference``: its result, if already computed)."""
    from meta.algorithms import per_task_optimum

    meta = exp.meta
    val_tasks, robust = reference if reference is not None else pulse_reference(exp, seed)
    with torch.no_grad():
        f_learned = val_tasks.fidelity(learned.expand(len(val_tasks), -1, -1)).numpy()
    out = {"final/fidelity": float(f_learned.mean())}
    if robust is not None:
        with torch.no_grad():
            f_robust = val_tasks.fidelity(robust.expand(len(val_tasks), -1, -1)).numpy()
        out["final/fidelity_robust"] = float(f_robust.mean())
        out["final/gap_to_robust"] = out["final/fidelity"] - out["final/fidelity_robust"]
        if meta.baselines.optimum_steps > 0:
            better = torch.as_tensor(f_learned > f_robust)[:, None, None]
            start = torch.where(better, learned.expand(len(val_tasks), -1, -1), robust.expand(len(val_tasks), -1, -1))
            optimum = per_task_optimum(val_tasks, start, meta.max_amplitude, meta.baselines.optimum_steps, meta.baselines.lr)
            with torch.no_grad():
                out["final/fidelity_optimum"] = float(val_tasks.fidelity(optimum).mean())
            out["final/gap_to_optimum"] = out["final/fidelity_optimum"] - out["final/fidelity"]
    return out


# ---------------------------------------------------------------------------------------------
# The result and the entry point


@dataclass
class ContinuousResult:
    """What a pendulum / qubit_pulse run hands back to the runner."""

    exp: ExperimentConfig
    history: History
    env_steps: int
    updates: int
    episodes: int
    grad_circuit_evals: int
    total_circuit_evals: int
    wall_s: float
    threshold: float | None
    policy_state: dict[str, torch.Tensor]
    compile: dict[str, float]
    extra: dict[str, float] = field(default_factory=dict)
    pulse: torch.Tensor | None = None

    @property
    def final_eval_return(self) -> float:
        return self.history.evals[-1][1] if self.history.evals else float("nan")

    @property
    def final_step(self) -> int:
        return self.env_steps

    def final_metrics(self) -> dict[str, float]:
        m = {
            "final/eval_return": self.final_eval_return,
            "final/eval_return_std": self.history.evals[-1][2] if self.history.evals else float("nan"),
            "final/env_steps": self.env_steps,
            "final/episodes": self.episodes,
            "final/updates": self.updates,
            "final/grad_circuit_evals": self.grad_circuit_evals,
            "final/total_circuit_evals": self.total_circuit_evals,
            "final/train_s": self.wall_s,
        }
        if self.threshold is not None:
            reached = self.history.threshold_step is not None
            m["final/reached_threshold"] = float(reached)
            if reached:
                m["final/steps_to_threshold"] = self.history.threshold_step
        m.update(self.extra)
        m.update(self.compile)
        return m

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = dict(self.policy_state)
        if self.pulse is not None:
            out["learned_pulse"] = self.pulse
        return out

    def figures(self, title: str) -> dict:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 3.8))
        if self.history.episodes:
            steps, returns = zip(*self.history.episodes)
            ax.plot(steps, returns, lw=0.7, alpha=0.5, label="training episode return")
        if self.history.evals:
            steps, means, stds = map(np.array, zip(*self.history.evals))
            ax.errorbar(steps, means, yerr=stds, marker="o", ms=4, capsize=3, label="deterministic evaluation")
        if self.threshold is not None:
            ax.axhline(self.threshold, color="gray", ls=":", lw=1, label=f"threshold {self.threshold:g}")
        ax.set(xlabel="environment step", ylabel="return", title=title)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        return {"learning_curve.png": fig}


def finish_continuous(run: ContinuousRun) -> ContinuousResult:
    """The result of a run that has learned (also Dyna's, mbrl/dyna.py)."""
    m = run.model
    return ContinuousResult(run.exp, run.history, m.num_timesteps, m._n_updates, m._episode_num, run.grad_evals,
                            run.total_evals, run.elapsed_s, run.threshold,
                            {k: v.detach().cpu().clone() for k, v in m.policy.state_dict().items()},
                            compile_metrics(run.bodies[0].model))


def train_continuous(exp: ExperimentConfig, seed: int, reporter, resume: dict | None = None) -> ContinuousResult:
    """Train one pendulum / qubit_pulse experiment with one seed (``resume``: a checkpoint of it)."""
    run = ContinuousRun(exp, seed, reporter)
    reporter.tags({"device": "cpu", "env_id": ENV_IDS[exp.task], "sb3_algorithm": type(run.model).__name__,
                   "n_actor_params": str(sum(p.numel() for p in run.model.actor.parameters()))})
    try:
        if resume is not None:
            run.restore(resume)
        run.learn()
        m = run.model
        result = finish_continuous(run)
        if exp.task == "qubit_pulse":
            result.pulse = deterministic_pulse(m, exp)
            result.extra = pulse_baselines(exp, seed, result.pulse)
        return result
    finally:
        run.close()
