"""Dyna in the MBPO style (Janner et al. 2019) on gymnasium's Pendulum-v1: Stable-Baselines3's SAC
(with this project's actor, control/sb3.py) whose gradient batches mix real transitions with
transitions imagined by the probabilistic ensemble of mbrl/ensemble.py.

Every ``dyna.model_train_every`` environment steps :class:`DynaCallback` refits the ensemble on the
real replay buffer (each member on its own bootstrap sample; a fixed share of buffer slots is held
out for the NLL metric), then branches ``rollouts_per_step * model_train_every`` rollouts of
:func:`rollout_length` steps from real states drawn from the buffer, acting with SAC's current
stochastic actor, each step's next state drawn from a member picked at random per row, the reward
the environment's own (:func:`mbrl.pets.pendulum_reward`). They go into the bounded model buffer
that :class:`MixedReplayBuffer` keeps beside SB3's real one; its ``sample`` (called by SB3's own
``SAC.train``, ``control.gradient_steps`` times per environment step) returns
``round(real_ratio * batch)`` real rows and the rest model rows.

Pendulum-v1 never terminates (episodes end by the time limit), so model transitions carry
``done = 0``. Metrics (against the environment step): SAC's ``rollout/``, ``train/``, ``eval/``
(control/sb3.py), and per model fit ``dyna/model_nll_holdout``, ``dyna/ensemble_disagreement``,
``dyna/rollout_length``, ``dyna/model_transitions_added``, ``dyna/model_transitions`` (cumulative),
``dyna/model_buffer_fill``, ``dyna/model_fit_s``, ``dyna/rollout_s``; at the end ``final/eval_return``,
``final/env_steps`` (SAC's) and ``final/model_nll_holdout``, ``final/ensemble_disagreement``,
``final/model_fits``, ``final/model_transitions``.

The actor is classical: the task refuses Dyna on circuit backends (the SAC circuit actor of
control/sb3.py would run every model rollout through the circuit; not measured).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.type_aliases import ReplayBufferSamples

from mbrl.config import DynaConfig
from mbrl.ensemble import GaussianEnsemble, fit_bootstrap, holdout_metrics
from mbrl.pets import pendulum_reward
from utils import seed_streams

#: Dyna's own random streams (utils.seed_streams); SB3 seeds SAC, the buffers' sampling and the actor's noise.
SEED_STREAMS = ("dyna/init", "dyna/holdout", "dyna/fit", "dyna/rollout_starts", "dyna/model_noise")


def rollout_length(step: int, cfg: DynaConfig) -> int:
    """MBPO's linear schedule: ``k_min`` up to ``schedule_start``, ``k_max`` from ``schedule_end``,
    in between ``int(k_min + (step - start) / (end - start) * (k_max - k_min))``."""
    a, b = cfg.schedule_start, cfg.schedule_end
    if step <= a:
        return cfg.k_min
    if step >= b:
        return cfg.k_max
    return int(cfg.k_min + (step - a) / (b - a) * (cfg.k_max - cfg.k_min))


class ModelBuffer:
    """A ring of model transitions (float32 arrays), filled a batch at a time, oldest overwritten."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int):
        self.capacity = capacity
        self.observations = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.actions = np.zeros((capacity, act_dim), dtype=np.float32)
        self.next_observations = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.rewards = np.zeros((capacity, 1), dtype=np.float32)
        self.pos, self.full = 0, False

    def __len__(self) -> int:
        return self.capacity if self.full else self.pos

    def extend(self, obs: np.ndarray, actions: np.ndarray, rewards: np.ndarray, next_obs: np.ndarray) -> None:
        n = len(obs)
        if n > self.capacity:  # only the newest rows would survive
            obs, actions, rewards, next_obs = obs[-self.capacity:], actions[-self.capacity:], rewards[-self.capacity:], next_obs[-self.capacity:]
            n = self.capacity
        idx = (self.pos + np.arange(n)) % self.capacity
        self.observations[idx] = obs
        self.actions[idx] = actions
        self.rewards[idx, 0] = np.asarray(rewards).reshape(-1)
        self.next_observations[idx] = next_obs
        self.full = self.full or self.pos + n >= self.capacity
        self.pos = (self.pos + n) % self.capacity


class MixedReplayBuffer(ReplayBuffer):
    """SB3's replay buffer of real transitions, plus a :class:`ModelBuffer`: ``sample(batch)``
    draws ``round(real_ratio * batch)`` rows (uniformly, SB3's own way) from the real transitions
    and the rest uniformly from the model transitions; all real while the model buffer is empty.
    Real rows come first. Pass it to SB3 as ``replay_buffer_class`` with
    ``replay_buffer_kwargs={"real_ratio": ..., "model_buffer_size": ...}``."""

    def __init__(self, *args, real_ratio: float = 1.0, model_buffer_size: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        if self.n_envs != 1:
            raise ValueError(f"MixedReplayBuffer takes one environment, got n_envs={self.n_envs}")
        if not 0 < real_ratio <= 1:
            raise ValueError(f"real_ratio must be in (0, 1], got {real_ratio}")
        self.real_ratio = real_ratio
        self.model = ModelBuffer(model_buffer_size, int(np.prod(self.obs_shape)), self.action_dim)

    def split(self, batch_size: int) -> tuple[int, int]:
        """(real rows, model rows) of a batch of ``batch_size``."""
        if len(self.model) == 0:
            return batch_size, 0
        n_real = round(self.real_ratio * batch_size)
        return n_real, batch_size - n_real

    def sample(self, batch_size: int, env=None) -> ReplayBufferSamples:
        n_real, n_model = self.split(batch_size)
        real = super().sample(n_real, env=env) if n_real else None
        if n_model == 0:
            return real
        idx = np.random.randint(0, len(self.model), size=n_model)
        m = self.model
        model = ReplayBufferSamples(*(self.to_torch(a) for a in (
            self._normalize_obs(m.observations[idx], env), m.actions[idx], self._normalize_obs(m.next_observations[idx], env),
            np.zeros((n_model, 1), dtype=np.float32), self._normalize_reward(m.rewards[idx], env))))
        if real is None:
            return model
        return ReplayBufferSamples(*(torch.cat([r, s]) for r, s in zip(real[:5], model[:5])))

    def real_transitions(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Slot indices, observations, (scaled) actions and next observations of the real transitions."""
        size = self.buffer_size if self.full else self.pos
        return (np.arange(size), self.observations[:size, 0], self.actions[:size, 0], self.next_observations[:size, 0])


@torch.no_grad()
def model_rollouts(ensemble: GaussianEnsemble, policy: Callable[[torch.Tensor], torch.Tensor],
                   reward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], start: torch.Tensor, length: int,
                   generator: torch.Generator) -> dict[str, torch.Tensor]:
    """``length`` model steps from each row of ``start`` ``(B, obs_dim)``: ``a = policy(s)``, a member
    ``m`` drawn uniformly per row and step, ``s' = s + mean_m(s, a) + std_m(s, a) * N(0, 1)``, reward
    ``reward(s, a)``. Returns the ``length * B`` transitions (step-major): ``observations``,
    ``actions``, ``rewards``, ``next_observations``, and ``members`` (who predicted each row)."""
    e = ensemble.size
    rows = torch.arange(len(start))
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("observations", "actions", "rewards", "next_observations", "members")}
    state = start
    for _ in range(length):
        action = policy(state).to(state.dtype)
        x = torch.cat([state, action], dim=-1).expand(e, -1, -1)
        mean, logvar = ensemble(x)
        member = torch.randint(0, e, (len(state),), generator=generator)
        mu, std = mean[member, rows], torch.exp(0.5 * logvar[member, rows])
        nxt = state + mu + std * torch.randn(mu.shape, generator=generator, dtype=mu.dtype)
        for key, value in (("observations", state), ("actions", action), ("rewards", reward(state, action)),
                           ("next_observations", nxt), ("members", member)):
            out[key].append(value)
        state = nxt
    return {k: torch.cat(v) for k, v in out.items()}


class DynaCallback(BaseCallback):
    """After every ``model_train_every``-th environment step: fit the ensemble on the real buffer,
    measure it on the held-out slots, add model rollouts to the model buffer, report."""

    def __init__(self, cfg: DynaConfig, seed: int, reporter, obs_dim: int, act_dim: int, low: np.ndarray, high: np.ndarray):
        super().__init__()
        self.cfg, self.reporter = cfg, reporter
        streams = seed_streams(seed, SEED_STREAMS)
        self.ensemble = GaussianEnsemble(cfg.ensemble_size, obs_dim + act_dim, obs_dim, cfg.hidden, cfg.layers,
                                         generator=streams["dyna/init"].torch())
        self.opt = torch.optim.Adam(self.ensemble.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.holdout_rng = streams["dyna/holdout"].numpy()
        self.fit_rng = streams["dyna/fit"].numpy()
        self.start_rng = streams["dyna/rollout_starts"].numpy()
        self.noise = streams["dyna/model_noise"].torch()
        self.low, self.high = torch.as_tensor(low, dtype=torch.float32), torch.as_tensor(high, dtype=torch.float32)
        self.held_out: np.ndarray | None = None
        self.fits = 0
        self.transitions = 0
        self.last: dict[str, float] = {}

    def _init_callback(self) -> None:
        buf = self.model.replay_buffer
        if not isinstance(buf, MixedReplayBuffer):
            raise TypeError(f"DynaCallback needs a MixedReplayBuffer, got {type(buf).__name__}")
        # which buffer slots are held out: drawn once, so a slot's transitions are never fitted on
        self.held_out = self.holdout_rng.random(buf.buffer_size) < self.cfg.holdout_fraction

    def _reward(self, obs: torch.Tensor, scaled_action: torch.Tensor) -> torch.Tensor:
        """Pendulum's reward of the environment action behind SB3's [-1, 1]-scaled buffer action."""
        return pendulum_reward(obs, self.low + (scaled_action + 1) * (self.high - self.low) / 2)

    def _on_step(self) -> bool:
        step = self.num_timesteps
        if step % self.cfg.model_train_every == 0:
            self.fit_and_roll_out(step)
        return True

    def fit_and_roll_out(self, step: int) -> None:
        buf: MixedReplayBuffer = self.model.replay_buffer
        slots, obs, act, nxt = buf.real_transitions()
        train = ~self.held_out[slots]
        if train.sum() < 2:
            return
        t0 = time.perf_counter()
        x = torch.as_tensor(np.concatenate([obs, act], axis=1))
        y = torch.as_tensor(nxt - obs)
        fit_bootstrap(self.ensemble, self.opt, x[train], y[train], self.cfg.epochs, self.cfg.batch_size, self.fit_rng)
        nll, dis = holdout_metrics(self.ensemble, x[~train], y[~train]) if (~train).any() else (float("nan"), float("nan"))
        t1 = time.perf_counter()
        k = rollout_length(step, self.cfg)
        n = self.cfg.rollouts_per_step * self.cfg.model_train_every
        start = torch.as_tensor(obs[self.start_rng.integers(0, len(obs), size=n)])
        actor = self.model.policy.actor

        def policy(s: torch.Tensor) -> torch.Tensor:
            return actor(s, deterministic=False)

        self.model.policy.set_training_mode(False)
        out = model_rollouts(self.ensemble, policy, self._reward, start, k, self.noise)
        buf.model.extend(*(out[key].numpy() for key in ("observations", "actions", "rewards", "next_observations")))
        added = len(out["rewards"])
        self.fits += 1
        self.transitions += added
        self.last = {"dyna/model_nll_holdout": nll, "dyna/ensemble_disagreement": dis, "dyna/rollout_length": float(k),
                     "dyna/model_transitions_added": float(added), "dyna/model_transitions": float(self.transitions),
                     "dyna/model_buffer_fill": float(len(buf.model)), "dyna/model_fit_s": t1 - t0,
                     "dyna/rollout_s": time.perf_counter() - t1}
        self.reporter.metrics(self.last, step)

    def final_metrics(self) -> dict[str, float]:
        nan = float("nan")
        return {"final/model_nll_holdout": self.last.get("dyna/model_nll_holdout", nan),
                "final/ensemble_disagreement": self.last.get("dyna/ensemble_disagreement", nan),
                "final/model_fits": float(self.fits), "final/model_transitions": float(self.transitions)}


def _config(exp) -> DynaConfig:
    cfg = getattr(exp, "dyna", None)
    if not isinstance(cfg, DynaConfig):
        raise ValueError(f"train_dyna needs an experiment with a 'dyna' section, got {type(exp).__name__}")
    return cfg


def train_dyna(exp, seed: int, reporter, resume: dict | None = None):
    """One Dyna run: ``exp.control`` sets SAC (``total_steps``, ``gradient_steps`` per env step,
    ``batch_size``, ...), ``exp.dyna`` the model and the rollouts. No checkpoints (the model and
    its buffer are not saved): ``control.checkpoint_every`` is ignored."""
    from control.sb3 import ContinuousRun, finish_continuous

    if resume is not None:
        raise ValueError("dyna runs have no checkpoints to resume from")
    cfg = _config(exp)
    torch.set_num_threads(1)
    exp = exp.model_copy(update={"control": exp.control.model_copy(update={"checkpoint_every": None})})
    run = ContinuousRun(exp, seed, reporter, algorithm="sac", sb3_kwargs={
        "replay_buffer_class": MixedReplayBuffer,
        "replay_buffer_kwargs": {"real_ratio": cfg.real_ratio, "model_buffer_size": cfg.model_buffer_size}})
    space = run.env.action_space
    callback = DynaCallback(cfg, seed, reporter, int(np.prod(run.env.observation_space.shape)), int(np.prod(space.shape)),
                            space.low, space.high)
    run.extra_callbacks.append(callback)
    reporter.tags({"device": "cpu", "env_id": "Pendulum-v1", "sb3_algorithm": "SAC+Dyna",
                   "n_actor_params": str(sum(p.numel() for p in run.model.actor.parameters()))})
    try:
        run.learn()
        result = finish_continuous(run)
        result.extra = callback.final_metrics()
        return result
    finally:
        run.close()
