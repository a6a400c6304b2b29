"""Training loops for CartPole-v1: REINFORCE and DQN, identical for every backend and gradient method.

Every update goes through :class:`GradientStep`: the algorithm supplies a *batched loss of the
model outputs* (leading parameter-set dimensions allowed), and the step either differentiates it
with torch autograd (backprop, adjoint, parameter-shift through the backend; parameter shift on
TensorCircuit goes through gradients.py inside the model) or hands it to the SPSA / finite-
difference estimators of gradients.py, which evaluate all shifted parameter sets in one batched
call. Either way an ordinary Adam step follows.

Metrics (per episode unless noted): ``rollout/episode_return``, ``rollout/avg_return_10``,
``train/loss``, ``grad/norm``, ``grad/circuit_evals`` (circuits executed for gradients since the
previous log), ``time/episode_s``, ``time/env_steps_per_s``; DQN adds ``train/epsilon``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import gymnasium as gym
import numpy as np
import torch

import gradients
from backends import BACKENDS
from config_schema import ExperimentConfig
from models import PolicyModel, build_model, compile_metrics
from tasks.cartpole import ENV_ID
from utils import NonFiniteError, seed_everything, seed_streams

AVG_WINDOW = 10
#: A CartPole run's random streams (utils.seed_streams): estimator directions, REINFORCE's sampled
#: actions, environment resets (one seed per environment), the action space, DQN's exploration and
#: replay sampling. The initial weights come from the seed itself (models.build_model), so a run's
#: seed-0 weights are the reference policy's.
SEED_STREAMS = ("gradient", "actions", "env", "action_space", "dqn")

#: f(outputs (..., N, A)) -> loss (...)
OutputLoss = Callable[[torch.Tensor], torch.Tensor]


class Reporter(Protocol):
    def metrics(self, values: dict[str, float], step: int) -> None: ...

    def tags(self, values: dict[str, str]) -> None: ...

    def progress(self, episode: int, total: int, avg_return: float) -> None: ...

    def checkpoint(self, state: dict, episode: int) -> None: ...


class NullReporter:
    def metrics(self, values: dict[str, float], step: int) -> None:
        pass

    def tags(self, values: dict[str, str]) -> None:
        pass

    def progress(self, episode: int, total: int, avg_return: float) -> None:
        pass

    def checkpoint(self, state: dict, episode: int) -> None:
        pass


#: Test hook: GradientStep multiplies the loss of this update (1-based) by NaN; 0 never.
POISON_UPDATE = 0


@dataclass
class TrainResult:
    episode_returns: list[float]
    env_steps: int
    updates: int
    grad_circuit_evals: int
    total_circuit_evals: int
    wall_s: float
    model: PolicyModel
    compiles_after_warmup: int | None = None

    @property
    def final_avg_return(self) -> float:
        tail = self.episode_returns[-AVG_WINDOW:]
        return float(np.mean(tail)) if tail else float("nan")

    @property
    def final_step(self) -> int:
        return len(self.episode_returns)

    def final_metrics(self) -> dict[str, float]:
        metrics = {
            "final/avg_return_10": self.final_avg_return,
            "final/episodes": len(self.episode_returns),
            "final/env_steps": self.env_steps,
            "final/updates": self.updates,
            "final/grad_circuit_evals": self.grad_circuit_evals,
            "final/total_circuit_evals": self.total_circuit_evals,
            "final/train_s": self.wall_s,
        }
        metrics.update(compile_metrics(self.model))
        if self.compiles_after_warmup is not None:
            metrics["time/compiles_after_warmup"] = self.compiles_after_warmup
        return metrics

    def state_dict(self) -> dict[str, torch.Tensor]:
        return cpu_state_dict(self.model)

    def figures(self, title: str) -> dict:
        return {"learning_curve.png": learning_curve_figure(self.episode_returns, title)}


def cpu_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights as CPU tensors of their own (safe to save while training goes on)."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def learning_curve_figure(returns: list[float], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    episodes = np.arange(len(returns))
    marker = "o" if len(returns) <= 20 else None  # a short run's points stay visible
    ax.plot(episodes, returns, lw=0.8, alpha=0.5, marker=marker, ms=3, label="episode return")
    avg = [np.mean(returns[max(0, i - 9) : i + 1]) for i in range(len(returns))]
    ax.plot(episodes, avg, lw=1.8, marker=marker, ms=4, label="mean of last 10")
    ax.set(xlabel="episode", ylabel="return", title=title)
    ax.legend(loc="upper left")
    fig.tight_layout()
    return fig


class GradientStep:
    """One optimiser update from a batched output loss, by the experiment's gradient method."""

    def __init__(self, model: PolicyModel, exp: ExperimentConfig, seed: int):
        self.model = model
        self.exp = exp
        self.optimizer = torch.optim.Adam(model.param_groups(exp.training.lr))
        self.generator = seed_streams(seed, SEED_STREAMS)["gradient"].torch()
        self.spsa_gains = gradients.SPSAGains(**exp.spsa.model_dump(exclude={"n_directions"}))
        self.scheduler = None
        if exp.gradient == "spsa":
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.spsa_gains.a_k)
        self.k = 0
        self.compiles_at_warmup: int | None = None

    def state_dict(self) -> dict:
        state = {"optimizer": self.optimizer.state_dict(), "k": self.k, "generator": self.generator.get_state()}
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.k = state["k"]
        self.generator.set_state(state["generator"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])

    @property
    def compiles_after_warmup(self) -> int | None:
        """Compilations since the end of the first update (the warm-up); None if nothing compiles."""
        if self.model.n_compiles is None or self.compiles_at_warmup is None:
            return None
        return self.model.n_compiles - self.compiles_at_warmup

    def __call__(self, obs: torch.Tensor, loss_of_outputs: OutputLoss, where: str) -> dict[str, float]:
        model, exp = self.model, self.exp
        evals_before = model.circuit_evals
        self.optimizer.zero_grad(set_to_none=True)
        params = list(model.parameters())
        if exp.gradient_is_estimated:

            def batched_loss(points: torch.Tensor) -> torch.Tensor:
                return loss_of_outputs(model.functional_forward(points, obs))

            if exp.gradient == "spsa":
                estimator = lambda x: gradients.spsa(  # noqa: E731
                    batched_loss, x, self.spsa_gains.c_k(self.k), exp.spsa.n_directions, self.generator
                )
            else:
                estimator = lambda x: gradients.finite_difference(  # noqa: E731
                    batched_loss, x, exp.finite_diff.step, exp.finite_diff.scheme
                )
            loss, _ = gradients.estimated_loss(params, estimator)
        else:
            loss = loss_of_outputs(model(obs)[None])[0]
        if self.k + 1 == POISON_UPDATE:
            loss = loss * float("nan")
        if not torch.isfinite(loss):
            raise NonFiniteError(f"non-finite loss at {where}")
        loss.backward()
        grads = [p.grad for p in params if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        if not torch.isfinite(grad_norm):
            raise NonFiniteError(f"non-finite gradient at {where}")
        if exp.training.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, exp.training.max_grad_norm)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.k += 1
        if self.compiles_at_warmup is None:  # the first update of this process (a resumed run too)
            self.compiles_at_warmup = model.n_compiles
        if not all(torch.isfinite(p).all() for p in params):
            raise NonFiniteError(f"non-finite parameter at {where}")
        return {"loss": float(loss.detach()), "grad_norm": float(grad_norm), "circuit_evals": model.circuit_evals - evals_before}


def _as_tensor(x: np.ndarray, device: str = "cpu") -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=torch.float64, device=device)


def _place(model: PolicyModel, exp: ExperimentConfig, reporter: Reporter) -> str:
    """Move the model to the experiment's device (or the CPU where its simulator cannot go)."""
    device, note = BACKENDS.get(exp.backend).placement(exp)
    model.to(device)
    reporter.tags({"device": device, **({"device_note": note} if note else {})})
    return device


def discounted_returns(rewards: np.ndarray, gamma: float) -> np.ndarray:
    """Returns-to-go G_t = sum_k gamma^k r_{t+k} of one episode."""
    out = np.zeros(len(rewards), dtype=np.float64)
    running = 0.0
    for t in range(len(rewards) - 1, -1, -1):
        running = rewards[t] + gamma * running
        out[t] = running
    return out


def _solved(returns: list[float], threshold: float | None) -> bool:
    return threshold is not None and len(returns) >= AVG_WINDOW and float(np.mean(returns[-AVG_WINDOW:])) >= threshold


# ---------------------------------------------------------------------------------------------
# REINFORCE


def reinforce_loss(actions: torch.Tensor, returns: torch.Tensor, n_episodes: int) -> OutputLoss:
    """-(1/E) sum_t log pi(a_t|s_t) G_t over the batch, for outputs (..., N, A) of logits."""
    index = torch.arange(actions.shape[0], device=actions.device)

    def loss(logits: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits, dim=-1)[..., index, actions]
        return -(logp * returns).sum(-1) / n_episodes

    return loss


def _checkpoint_due(cfg, episodes_before: int, episodes_after: int) -> bool:
    """A multiple of ``checkpoint_every`` was reached by the episodes just finished."""
    every = cfg.checkpoint_every
    return every is not None and episodes_after // every > episodes_before // every


CHECKPOINT_FORMAT = 1


def _common_state(model: PolicyModel, step: GradientStep, returns: list[float], env_steps: int, grad_evals: int,
                  elapsed_s: float) -> dict:
    """What every CartPole checkpoint holds; loaded with ``torch.load(..., weights_only=True)``."""
    return {
        "format": CHECKPOINT_FORMAT,
        "episode": len(returns),
        "returns": torch.tensor(returns, dtype=torch.float64),
        "env_steps": env_steps,
        "grad_evals": grad_evals,
        "circuit_evals": model.circuit_evals,
        "elapsed_s": elapsed_s,
        "model": cpu_state_dict(model),
        "step": step.state_dict(),
        "torch_rng": torch.get_rng_state(),
    }


def _restore_common(state: dict, model: PolicyModel, step: GradientStep, kind: str) -> tuple[list[float], int, int, float]:
    if state.get("format") != CHECKPOINT_FORMAT or state.get("kind") != kind:
        raise ValueError(f"checkpoint is not a {kind} checkpoint of format {CHECKPOINT_FORMAT}")
    model.load_state_dict(state["model"])
    step.load_state_dict(state["step"])
    model.circuit_evals = state["circuit_evals"]
    torch.set_rng_state(state["torch_rng"])
    return state["returns"].tolist(), state["env_steps"], state["grad_evals"], state["elapsed_s"]


def _result(model: PolicyModel, step: GradientStep, returns: list[float], env_steps: int, grad_evals: int,
            wall_s: float) -> TrainResult:
    return TrainResult(returns, env_steps, step.k, grad_evals, model.circuit_evals, wall_s, model, step.compiles_after_warmup)


def train_reinforce(exp: ExperimentConfig, seed: int, reporter: Reporter, resume: dict | None = None) -> TrainResult:
    cfg = exp.training
    seed_everything(seed)  # REINFORCE draws its actions from the explicit torch generator below
    streams = seed_streams(seed, SEED_STREAMS)
    n_envs = min(cfg.episodes_per_batch, cfg.episodes)
    envs = gym.make_vec(ENV_ID, num_envs=n_envs, vectorization_mode="sync")
    envs.action_space.seed(streams["action_space"].int())
    # one reset seed per environment (a vector env given one int seeds its envs seed, seed + 1, ...)
    env_seeds = streams["env"].ints(n_envs)
    n_inputs = envs.single_observation_space.shape[0]
    n_actions = int(envs.single_action_space.n)
    model = build_model(exp, n_inputs, n_actions, seed)
    device = _place(model, exp, reporter)
    step = GradientStep(model, exp, seed)
    action_gen = streams["actions"].torch()
    returns_all: list[float] = []
    env_steps = grad_evals = 0
    elapsed_before = 0.0
    first = True
    if resume is not None:
        returns_all, env_steps, grad_evals, elapsed_before = _restore_common(resume, model, step, "reinforce")
        action_gen.set_state(resume["action_gen"])
        envs.reset(seed=env_seeds)  # then each environment's generator continues where the checkpoint left it
        for env, rng_state in zip(envs.envs, resume["env_rngs"], strict=True):
            env.unwrapped.np_random.bit_generator.state = rng_state
        first = False
    t_start = time.perf_counter()
    episode = len(returns_all)
    try:
        while episode < cfg.episodes and not _solved(returns_all, cfg.stop_avg_return):
            t_batch = time.perf_counter()
            n_ep = min(n_envs, cfg.episodes - episode)
            obs, _ = envs.reset(seed=env_seeds if first else None)
            first = False
            active = np.zeros(n_envs, dtype=bool)
            active[:n_ep] = True
            trajectories: list[list[tuple[np.ndarray, int, float]]] = [[] for _ in range(n_ep)]
            batch_steps = 0
            while active.any():
                idx = np.flatnonzero(active)
                with torch.no_grad():  # every env each step: one fixed batch shape (finished ones are ignored)
                    probs = torch.softmax(model(_as_tensor(obs, device)), dim=-1).cpu()[idx]
                chosen = torch.multinomial(probs, 1, generator=action_gen)[:, 0].numpy()
                actions = np.zeros(n_envs, dtype=np.int64)
                actions[idx] = chosen
                next_obs, reward, terminated, truncated, _ = envs.step(actions)
                for j, e in enumerate(idx):
                    trajectories[e].append((obs[e], int(chosen[j]), float(reward[e])))
                batch_steps += len(idx)
                active[idx] &= ~(terminated[idx] | truncated[idx])
                obs = next_obs
            states, acts, rets = [], [], []
            for traj in trajectories:
                rewards = np.array([r for _, _, r in traj])
                g = discounted_returns(rewards, cfg.gamma)
                if cfg.normalize_returns:
                    g = (g - g.mean()) / (g.std() + 1e-8)
                states.extend(s for s, _, _ in traj)
                acts.extend(a for _, a, _ in traj)
                rets.append(g)
                returns_all.append(float(rewards.sum()))
            obs_t = _as_tensor(np.stack(states), device)
            loss_fn = reinforce_loss(torch.as_tensor(acts, device=device), _as_tensor(np.concatenate(rets), device), n_ep)
            stats = step(obs_t, loss_fn, where=f"episode {episode + n_ep}")
            env_steps += batch_steps
            grad_evals += stats["circuit_evals"]
            dt = time.perf_counter() - t_batch
            for i in range(n_ep):
                ep = episode + i
                avg = float(np.mean(returns_all[max(0, ep + 1 - AVG_WINDOW) : ep + 1]))
                values = {"rollout/episode_return": returns_all[ep], "rollout/avg_return_10": avg, "time/episode_s": dt / n_ep}
                if i == n_ep - 1:
                    values.update(
                        {
                            "train/loss": stats["loss"],
                            "grad/norm": stats["grad_norm"],
                            "grad/circuit_evals": stats["circuit_evals"],
                            "time/env_steps_per_s": batch_steps / dt,
                            **compile_metrics(model),
                        }
                    )
                reporter.metrics(values, step=ep)
            episode += n_ep
            reporter.progress(episode, cfg.episodes, float(np.mean(returns_all[-AVG_WINDOW:])))
            if _checkpoint_due(cfg, episode - n_ep, episode):
                elapsed = elapsed_before + time.perf_counter() - t_start
                state = _common_state(model, step, returns_all, env_steps, grad_evals, elapsed)
                state.update({"kind": "reinforce", "action_gen": action_gen.get_state(),
                              "env_rngs": [env.unwrapped.np_random.bit_generator.state for env in envs.envs]})
                reporter.checkpoint(state, episode)
    finally:
        envs.close()
    return _result(model, step, returns_all, env_steps, grad_evals, elapsed_before + time.perf_counter() - t_start)


# ---------------------------------------------------------------------------------------------
# DQN


class ReplayBuffer:
    """Fixed-size ring buffer of transitions (numpy arrays); uniform sampling from a Generator."""

    _ARRAYS = ("obs", "next_obs", "actions", "rewards", "terminated")

    def __init__(self, capacity: int, obs_dim: int):
        self.obs = np.zeros((capacity, obs_dim), dtype=np.float64)
        self.next_obs = np.zeros((capacity, obs_dim), dtype=np.float64)
        self.actions = np.zeros(capacity, dtype=np.int64)
        self.rewards = np.zeros(capacity, dtype=np.float64)
        self.terminated = np.zeros(capacity, dtype=np.float64)
        self.capacity = capacity
        self.size = 0
        self.pos = 0

    def add(self, obs, action, reward, next_obs, terminated) -> None:
        i = self.pos
        self.obs[i], self.actions[i], self.rewards[i] = obs, action, reward
        self.next_obs[i], self.terminated[i] = next_obs, float(terminated)
        self.pos = (self.pos + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def state_dict(self) -> dict:
        arrays = {k: torch.from_numpy(getattr(self, k)[: self.size].copy()) for k in self._ARRAYS}
        return {**arrays, "pos": self.pos, "size": self.size}

    def load_state_dict(self, state: dict) -> None:
        for k in self._ARRAYS:
            getattr(self, k)[: state["size"]] = state[k].numpy()
        self.pos, self.size = state["pos"], state["size"]

    def sample(self, batch_size: int, rng: np.random.Generator):
        idx = rng.integers(0, self.size, size=batch_size)
        return self.obs[idx], self.actions[idx], self.rewards[idx], self.next_obs[idx], self.terminated[idx]


def dqn_loss(actions: torch.Tensor, targets: torch.Tensor) -> OutputLoss:
    """Huber loss between Q(s, a) and the fixed TD targets, for outputs (..., N, A)."""
    index = torch.arange(actions.shape[0], device=actions.device)

    def loss(q: torch.Tensor) -> torch.Tensor:
        chosen = q[..., index, actions]
        return torch.nn.functional.huber_loss(chosen, targets.expand_as(chosen), reduction="none").mean(-1)

    return loss


def train_dqn(exp: ExperimentConfig, seed: int, reporter: Reporter, resume: dict | None = None) -> TrainResult:
    cfg, dq = exp.training, exp.training.dqn
    seed_everything(seed)
    streams = seed_streams(seed, SEED_STREAMS)
    rng = streams["dqn"].numpy()  # exploration and replay sampling
    env_seed = streams["env"].int()
    env = gym.make(ENV_ID)
    env.action_space.seed(streams["action_space"].int())
    n_inputs = env.observation_space.shape[0]
    n_actions = int(env.action_space.n)
    model = build_model(exp, n_inputs, n_actions, seed)
    device = _place(model, exp, reporter)
    step = GradientStep(model, exp, seed)
    model.precompile_acting(1)
    target_params = model.flat_parameters()[None]
    buffer = ReplayBuffer(dq.buffer_size, n_inputs)
    learning_starts = dq.learning_starts or dq.batch_size
    epsilon = dq.epsilon_start
    returns_all: list[float] = []
    env_steps = grad_evals = 0
    elapsed_before = 0.0
    if resume is None:
        obs, _ = env.reset(seed=env_seed)
    else:
        returns_all, env_steps, grad_evals, elapsed_before = _restore_common(resume, model, step, "dqn")
        rng.bit_generator.state = resume["rng"]
        buffer.load_state_dict(resume["buffer"])
        epsilon = resume["epsilon"]
        target_params = resume["target_params"]
        env.reset(seed=env_seed)
        env.unwrapped.np_random.bit_generator.state = resume["env_rng_before_reset"]
        obs, _ = env.reset()  # the same reset the interrupted run did after its last checkpointed episode
    recent = deque(returns_all[-AVG_WINDOW:], maxlen=AVG_WINDOW)
    t_start = time.perf_counter()
    try:
        for episode in range(len(returns_all), cfg.episodes):
            if _solved(returns_all, cfg.stop_avg_return):
                break
            t_ep = time.perf_counter()
            done = False
            ep_return = 0.0
            ep_steps = 0
            losses, norms, ep_evals = [], [], 0
            while not done:
                if rng.random() < epsilon:
                    action = int(rng.integers(n_actions))
                else:
                    with torch.no_grad():
                        action = int(model(_as_tensor(obs[None], device))[0].argmax())
                next_obs, reward, terminated, truncated, _ = env.step(action)
                buffer.add(obs, action, reward, next_obs, terminated)
                obs = next_obs
                ep_return += float(reward)
                ep_steps += 1
                env_steps += 1
                done = terminated or truncated
                if buffer.size >= learning_starts and env_steps % dq.train_every == 0:
                    b_obs, b_act, b_rew, b_next, b_term = buffer.sample(dq.batch_size, rng)
                    with torch.no_grad():
                        q_next = model.functional_forward(target_params, _as_tensor(b_next, device))[0].max(-1).values
                    targets = _as_tensor(b_rew, device) + cfg.gamma * (1.0 - _as_tensor(b_term, device)) * q_next
                    loss_fn = dqn_loss(torch.as_tensor(b_act, device=device), targets)
                    stats = step(_as_tensor(b_obs, device), loss_fn, where=f"episode {episode + 1}")
                    losses.append(stats["loss"])
                    norms.append(stats["grad_norm"])
                    ep_evals += stats["circuit_evals"]
                if dq.target_update_unit == "steps" and env_steps % dq.target_update_every == 0:
                    target_params = model.flat_parameters()[None]
            env_rng_before_reset = env.unwrapped.np_random.bit_generator.state
            obs, _ = env.reset()
            if dq.target_update_unit == "episodes" and (episode + 1) % dq.target_update_every == 0:
                target_params = model.flat_parameters()[None]
            grad_evals += ep_evals
            returns_all.append(ep_return)
            recent.append(ep_return)
            dt = time.perf_counter() - t_ep
            values = {
                "rollout/episode_return": ep_return,
                "rollout/avg_return_10": float(np.mean(recent)),
                "train/epsilon": epsilon,
                "grad/circuit_evals": ep_evals,
                "time/episode_s": dt,
                "time/env_steps_per_s": ep_steps / dt,
                **compile_metrics(model),
            }
            if losses:
                values["train/loss"] = float(np.mean(losses))
                values["grad/norm"] = float(np.mean(norms))
            reporter.metrics(values, step=episode)
            reporter.progress(episode + 1, cfg.episodes, float(np.mean(recent)))
            epsilon = max(dq.epsilon_end, epsilon * dq.epsilon_decay)
            if _checkpoint_due(cfg, episode, episode + 1):
                elapsed = elapsed_before + time.perf_counter() - t_start
                state = _common_state(model, step, returns_all, env_steps, grad_evals, elapsed)
                state.update({"kind": "dqn", "rng": rng.bit_generator.state, "buffer": buffer.state_dict(),
                              "epsilon": epsilon, "target_params": target_params.clone(),
                              "env_rng_before_reset": env_rng_before_reset})
                reporter.checkpoint(state, episode + 1)
    finally:
        env.close()
    return _result(model, step, returns_all, env_steps, grad_evals, elapsed_before + time.perf_counter() - t_start)


def train(exp: ExperimentConfig, seed: int, reporter: Reporter | None = None, resume: dict | None = None):
    """Train one experiment with one seed with its task's trainer for its algorithm (see
    ``tasks/``); ``reporter`` receives metrics, progress and checkpoints; ``resume``: a
    checkpoint of this experiment and seed to continue from."""
    from tasks import task_of

    return task_of(exp).trainer(exp.algorithm)(exp, seed, reporter or NullReporter(), resume)
