"""PETS (Chua et al. 2018) on gymnasium's Pendulum-v1: the probabilistic ensemble learns the
change of the observation, the CEM planner with trajectory sampling picks each action (MPC: the
first action of the optimised sequence, the rest warm-starts the next step), and the reward is the
environment's own, written as a torch function of (observation, action).

``train_pets(exp, seed, reporter)`` runs ``pets.env_steps`` environment steps (the first
``seed_steps`` with uniformly random actions), retrains the ensemble after every episode and
evaluates the planner on ``eval_episodes`` fresh episodes at the end. Metrics against environment
steps: the episode return, the model's NLL on held-out transitions, ensemble disagreement and
planning milliseconds per step.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
import torch

from mbrl.cem import CEMPlanner, trajectory_returns
from mbrl.config import PETSConfig
from mbrl.ensemble import GaussianEnsemble, HoldoutData, plot_model_quality
from train import NullReporter
from utils import seed_streams

ENV_ID = "Pendulum-v1"
MAX_TORQUE = 2.0


def pendulum_reward(obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """Pendulum-v1's reward for taking ``action`` in ``obs = (cos th, sin th, th_dot)``:
    ``-(th^2 + 0.1 th_dot^2 + 0.001 u^2)`` with th normalised to [-pi, pi) and u clipped to the torque bound."""
    th = torch.atan2(obs[..., 1], obs[..., 0])
    th = torch.remainder(th + math.pi, 2 * math.pi) - math.pi
    u = action[..., 0].clamp(-MAX_TORQUE, MAX_TORQUE)
    return -(th**2 + 0.1 * obs[..., 2] ** 2 + 0.001 * u**2)


@dataclass
class PETSResult:
    cfg: PETSConfig
    ensemble: GaussianEnsemble
    episode_returns: list[float] = field(default_factory=list)
    episode_end_steps: list[int] = field(default_factory=list)
    holdout_nll: list[tuple[int, float]] = field(default_factory=list)
    disagreement: list[tuple[int, float]] = field(default_factory=list)
    plan_ms: list[float] = field(default_factory=list)
    """Wall milliseconds of every planned step (training)."""
    plan_cpu_ms: list[float] = field(default_factory=list)
    """The same steps' CPU milliseconds of this thread (``time.thread_time``): the cost on one core, on a shared machine."""
    eval_returns: list[float] = field(default_factory=list)
    env_steps: int = 0
    train_s: float = 0.0

    @property
    def final_step(self) -> int:
        return self.env_steps

    def final_metrics(self) -> dict[str, float]:
        nan = float("nan")
        return {
            "final/eval_return": float(np.mean(self.eval_returns)),
            "final/eval_std": float(np.std(self.eval_returns)),
            "final/env_steps": float(self.env_steps),
            "final/train_return_last": self.episode_returns[-1] if self.episode_returns else nan,
            "final/model_nll_holdout": self.holdout_nll[-1][1] if self.holdout_nll else nan,
            "final/ensemble_disagreement": self.disagreement[-1][1] if self.disagreement else nan,
            "final/plan_ms_per_step": float(np.mean(self.plan_ms)) if self.plan_ms else nan,
            "final/plan_ms_per_step_median": float(np.median(self.plan_ms)) if self.plan_ms else nan,
            "final/plan_cpu_ms_per_step": float(np.mean(self.plan_cpu_ms)) if self.plan_cpu_ms else nan,
            "final/train_s": self.train_s,
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.ensemble.state_dict().items()}

    def figures(self, title: str) -> dict:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        axes[0].plot(self.episode_end_steps, self.episode_returns, marker=".")
        axes[0].axhline(-200, color="grey", ls="--", lw=0.8)
        axes[0].set(xlabel="environment steps", ylabel="episode return", title="return")
        plot_model_quality(axes[1], self.holdout_nll, self.disagreement)
        axes[2].plot(self.plan_ms, lw=0.5)
        axes[2].set(xlabel="planned step", ylabel="ms", title="planning time per step")
        fig.suptitle(title)
        fig.tight_layout()
        return {"pets_learning.png": fig}


class _Agent:
    def __init__(self, ensemble: GaussianEnsemble, cfg: PETSConfig, generator: torch.Generator):
        lo, hi = torch.tensor([-MAX_TORQUE]), torch.tensor([MAX_TORQUE])
        self.planner = CEMPlanner(cfg.horizon, cfg.population, cfg.elites, cfg.iterations, lo, hi, cfg.alpha)
        self.ensemble, self.cfg, self.generator = ensemble, cfg, generator
        self.reset()

    def reset(self) -> None:
        self.mean = self.planner.initial_mean()

    @torch.inference_mode()
    def act(self, obs: np.ndarray) -> np.ndarray:
        o = torch.as_tensor(obs, dtype=torch.float32)

        def objective(actions):
            return trajectory_returns(self.ensemble, pendulum_reward, o, actions, self.cfg.particles, self.generator)

        plan = self.planner.optimize(objective, self.mean, self.generator)
        self.mean = torch.cat([plan[1:], plan[-1:]])  # warm start: the rest of the plan, shifted
        return plan[0].numpy().astype(np.float32)


def _config(exp) -> PETSConfig:
    if isinstance(exp, PETSConfig):
        return exp
    cfg = getattr(exp, "pets", None)
    if not isinstance(cfg, PETSConfig):
        raise ValueError(f"train_pets needs a PETSConfig or an experiment with a 'pets' section, got {type(exp).__name__}")
    return cfg


def train_pets(exp, seed: int, reporter, resume: dict | None = None) -> PETSResult:
    """One PETS run on Pendulum-v1; ``exp`` is a :class:`PETSConfig` or has one as ``exp.pets``."""
    if resume is not None:
        raise ValueError("pets runs have no checkpoints to resume from")
    cfg = _config(exp)
    torch.set_num_threads(1)
    streams = seed_streams(seed, ["pets/env", "pets/eval_env", "pets/init", "pets/data", "pets/plan", "pets/explore"])
    ensemble = GaussianEnsemble(cfg.ensemble_size, 4, 3, cfg.hidden, cfg.layers, generator=streams["pets/init"].torch())
    opt = torch.optim.Adam(ensemble.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    data_rng = streams["pets/data"].numpy()
    data = HoldoutData(cfg.holdout_fraction, data_rng)  # inputs (obs, action), targets next_obs - obs
    explore = streams["pets/explore"].numpy()
    agent = _Agent(ensemble, cfg, streams["pets/plan"].torch())
    result = PETSResult(cfg, ensemble)
    env = gym.make(ENV_ID)
    reset_seeds = iter(streams["pets/env"].ints(cfg.env_steps + 1))
    t0 = time.monotonic()
    obs, _ = env.reset(seed=next(reset_seeds))
    agent.reset()
    ep_return, trained = 0.0, False
    for step in range(1, cfg.env_steps + 1):
        if trained:
            tp, cp = time.perf_counter(), time.thread_time()
            action = agent.act(obs)
            result.plan_ms.append(1e3 * (time.perf_counter() - tp))
            result.plan_cpu_ms.append(1e3 * (time.thread_time() - cp))
        else:
            action = explore.uniform(-MAX_TORQUE, MAX_TORQUE, size=1).astype(np.float32)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        data.add(np.concatenate([obs, action]), next_obs - obs)
        ep_return += float(reward)
        obs = next_obs
        done = terminated or truncated
        if done or step == cfg.env_steps:
            result.episode_returns.append(ep_return)
            result.episode_end_steps.append(step)
            metrics = {"pets/episode_return": ep_return}
            if result.plan_ms:
                metrics["pets/plan_ms_per_step"] = float(np.mean(result.plan_ms[-200:]))
                metrics["pets/plan_cpu_ms_per_step"] = float(np.mean(result.plan_cpu_ms[-200:]))
            if step >= cfg.seed_steps and len(data.train_x) > 1:
                data.fit(ensemble, opt, cfg.epochs, cfg.batch_size)
                trained = True
                nll, dis = data.holdout_metrics(ensemble)
                result.holdout_nll.append((step, nll))
                result.disagreement.append((step, dis))
                metrics.update({"pets/model_nll_holdout": nll, "pets/ensemble_disagreement": dis})
            reporter.metrics(metrics, step)
            reporter.progress(step, cfg.env_steps, ep_return)
            obs, _ = env.reset(seed=next(reset_seeds))
            agent.reset()
            ep_return = 0.0
    result.env_steps = cfg.env_steps
    result.train_s = time.monotonic() - t0
    env.close()
    if not trained:
        raise ValueError(f"env_steps ({cfg.env_steps}) ended before the model was ever trained")
    eval_env = gym.make(ENV_ID)
    for s in streams["pets/eval_env"].ints(cfg.eval_episodes):
        obs, _ = eval_env.reset(seed=s)
        agent.reset()
        total, done = 0.0, False
        while not done:
            obs, reward, terminated, truncated, _ = eval_env.step(agent.act(obs))
            total += float(reward)
            done = terminated or truncated
        result.eval_returns.append(total)
    eval_env.close()
    # the pendulum task's progress metric (its SAC/TD3/DDPG runs log it at every evaluation)
    reporter.metrics({"eval/return": float(np.mean(result.eval_returns))}, cfg.env_steps)
    return result


class _PrintReporter(NullReporter):
    """Prints each episode's metrics as a JSON line (the command line's reporter)."""

    def metrics(self, values: dict[str, float], step: int) -> None:
        import json

        print(json.dumps({"step": step, **{k: round(v, 4) for k, v in values.items()}}), flush=True)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    from pathlib import Path

    parser = argparse.ArgumentParser(description="PETS on Pendulum-v1 (defaults: mbrl.config.PETSConfig)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--env-steps", type=int, default=PETSConfig().env_steps)
    parser.add_argument("--horizon", type=int, default=PETSConfig().horizon)
    parser.add_argument("--eval-episodes", type=int, default=PETSConfig().eval_episodes)
    parser.add_argument("--out", type=Path, default=None, help="folder for the figures and results.json")
    args = parser.parse_args(argv)
    cfg = PETSConfig(env_steps=args.env_steps, horizon=args.horizon, eval_episodes=args.eval_episodes)
    rows = []
    for seed in args.seeds:
        result = train_pets(cfg, seed, _PrintReporter())
        row = {"seed": seed, **result.final_metrics(), "eval_returns": result.eval_returns}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            result.figures(f"PETS, Pendulum-v1, seed {seed}")["pets_learning.png"].savefig(args.out / f"pets_seed{seed}.png", dpi=120)
    if args.out is not None:
        (args.out / "results.json").write_text(json.dumps({"config": cfg.model_dump(), "runs": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
