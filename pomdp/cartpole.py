"""Partially observed CartPole: an SSM body against a GRU and an MLP on the same window of frames.

**Environment.** ``CartPole-v1`` with the two velocities hidden: the policy observes the cart
position and the pole angle only (:class:`HideVelocities`), so a single frame does not determine
the state and the policy needs memory. Every body gets the same input: the last ``window``
observations (``gymnasium.wrappers.FrameStackObservation``, the first frame repeated after a
reset), shape (window, 2).

**Bodies** (:class:`WindowBody`, a Stable-Baselines3 features extractor; PPO's policy and value
heads sit on top of it):

- ``mlp``: the flattened window (stacked frames) through two tanh layers;
- ``gru``: ``torch.nn.GRU`` over the window, its last hidden state;
- ``ssm``: :class:`models.SSM` (diagonal state-space model, zero-order hold) over the window, its last output.

**Budget.** The same PPO (Stable-Baselines3, the rl-baselines3-zoo CartPole-v1 hyperparameters:
8 environments, n_steps 32, batch 256, 20 epochs, gamma 0.98, GAE lambda 0.8, learning rate and
clip range decayed linearly from 1e-3 and 0.2) and the same number of environment steps for every
body; several seeds. Score: the mean return of 20 deterministic evaluation episodes after training
(CartPole-v1 caps episodes at 500), and the mean return of the last 20 training episodes.

``python -m pomdp.cartpole --out DIR [--steps 100000] [--seeds 0 1 2] [--window 4]`` writes
``pomdp_cartpole.json`` and ``pomdp_cartpole.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from gymnasium.wrappers import FrameStackObservation
from torch import nn

from models import SSM

#: Observation components kept: cart position (0) and pole angle (2); velocities (1, 3) hidden.
VISIBLE = (0, 2)
BODIES = ("mlp", "gru", "ssm")


class HideVelocities(gym.ObservationWrapper):
    """CartPole observations without the cart and pole velocities: (x, theta)."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        low, high = env.observation_space.low[list(VISIBLE)], env.observation_space.high[list(VISIBLE)]
        self.observation_space = gym.spaces.Box(low, high, dtype=np.float32)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return observation[list(VISIBLE)].astype(np.float32)


def make_env(window: int) -> gym.Env:
    """Partially observed CartPole-v1 with the last ``window`` observations stacked: (window, 2)."""
    if window < 1:
        raise ValueError(f"window: {window}; need at least 1 frame")
    return FrameStackObservation(HideVelocities(gym.make("CartPole-v1")), window)


def _extractor_base():
    from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

    return BaseFeaturesExtractor


class WindowBody(_extractor_base()):
    """A window of frames (B, window, d) -> features (B, hidden) by an MLP, a GRU or an SSM."""

    def __init__(self, observation_space: gym.spaces.Box, kind: str = "mlp", hidden: int = 64, ssm_state: int | None = None,
                 ssm_dt: tuple[float, float] = (0.1, 1.0)):
        super().__init__(observation_space, features_dim=hidden)
        if kind not in BODIES:
            raise ValueError(f"body {kind!r}; allowed: {', '.join(BODIES)}")
        window, d = observation_space.shape
        self.kind = kind
        if kind == "mlp":
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(window * d, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        elif kind == "gru":
            self.net = nn.GRU(d, hidden, batch_first=True)
        else:
            self.net = SSM(d, hidden_dim=hidden, output_dim=hidden, state_size=ssm_state or hidden // 2, dt_min=ssm_dt[0], dt_max=ssm_dt[1])

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        if self.kind == "mlp":
            return self.net(observations)
        if self.kind == "gru":
            return self.net(observations)[1][-1]
        return torch.tanh(self.net(observations)[:, -1])


def ppo(body: str, window: int, seed: int, hidden: int = 64, **body_kwargs):
    """PPO with the rl-baselines3-zoo CartPole-v1 hyperparameters and the given body."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    env = make_vec_env(lambda: make_env(window), n_envs=8, seed=seed)

    def linear(start: float):
        return lambda progress: progress * start

    return PPO("MlpPolicy", env, n_steps=32, batch_size=256, gae_lambda=0.8, gamma=0.98, n_epochs=20, ent_coef=0.0,
               learning_rate=linear(1e-3), clip_range=linear(0.2), seed=seed, device="cpu",
               policy_kwargs={"features_extractor_class": WindowBody, "features_extractor_kwargs": {"kind": body, "hidden": hidden, **body_kwargs},
                              "net_arch": [64]})


def train_and_evaluate(body: str, window: int, seed: int, steps: int, eval_episodes: int = 20, **body_kwargs) -> dict:
    return _train(body, window, seed, steps, eval_episodes, 64, None, **body_kwargs)[1]


def _train(body: str, window: int, seed: int, steps: int, eval_episodes: int, hidden: int, callback, **body_kwargs):
    from stable_baselines3.common.evaluation import evaluate_policy

    torch.set_num_threads(1)
    model = ppo(body, window, seed, hidden, **body_kwargs)
    t0 = time.monotonic()
    model.learn(total_timesteps=steps, callback=callback)
    train_s = time.monotonic() - t0
    eval_env = make_env(window)
    eval_env.reset(seed=seed + 10_000)
    mean, std = evaluate_policy(model, eval_env, n_eval_episodes=eval_episodes, deterministic=True)
    recent = [info["r"] for info in list(model.ep_info_buffer)[-20:]]
    n_body = sum(p.numel() for p in model.policy.features_extractor.parameters())
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in body_kwargs.items()}
    return model, {"body": body, **settings, "seed": seed, "window": window, "steps": steps, "eval_return": float(mean),
                   "eval_std": float(std), "train_return_last20": float(np.mean(recent)) if recent else float("nan"),
                   "train_s": train_s, "body_params": n_body, "policy_params": sum(p.numel() for p in model.policy.parameters())}


class TaskResult:
    """What a ``cartpole_pomdp`` run (tasks/cartpole_pomdp.py) hands back to the runner."""

    def __init__(self, model, row: dict):
        self.model_ppo, self.row = model, row

    @property
    def final_step(self) -> int:
        return self.row["steps"]

    def final_metrics(self) -> dict[str, float]:
        return {"final/eval_return": self.row["eval_return"], "final/eval_std": self.row["eval_std"],
                "final/train_return_last20": self.row["train_return_last20"], "final/body_params": self.row["body_params"],
                "final/train_s": self.row["train_s"]}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.model_ppo.policy.state_dict().items()}

    def figures(self, title: str) -> dict:
        return {}


def _progress_callback(reporter, total: int, every: int):
    from stable_baselines3.common.callbacks import BaseCallback

    class Progress(BaseCallback):
        def _on_step(self) -> bool:
            if self.num_timesteps % every < self.training_env.num_envs and self.model.ep_info_buffer:
                avg = float(np.mean([info["r"] for info in list(self.model.ep_info_buffer)[-20:]]))
                reporter.metrics({"rollout/avg_return_20": avg}, self.num_timesteps)
                reporter.progress(self.num_timesteps, total, avg)
            return True

    return Progress()


def train_task(exp, seed: int, reporter, resume: dict | None = None) -> TaskResult:
    """The ``cartpole_pomdp`` trainer: one body, one seed, ``pomdp.steps`` environment steps."""
    if resume is not None:
        raise ValueError("cartpole_pomdp runs have no checkpoints to resume from")
    cfg = exp.pomdp
    body_kwargs = {"ssm_state": cfg.ssm_state, "ssm_dt": tuple(cfg.ssm_dt)} if cfg.body == "ssm" else {}
    callback = _progress_callback(reporter, cfg.steps, max(cfg.steps // 100, 256))
    model, row = _train(cfg.body, cfg.window, seed, cfg.steps, cfg.eval_episodes, cfg.hidden, callback, **body_kwargs)
    return TaskResult(model, row)


def markdown(rows: list[dict]) -> str:
    lines = ["| body | body params | seeds | eval return (mean +- sd over seeds) | per seed | last 20 training episodes | train s per seed |",
             "|---|---|---|---|---|---|---|"]
    for body in BODIES:
        mine = [r for r in rows if r["body"] == body]
        if not mine:
            continue
        evals = np.array([r["eval_return"] for r in mine])
        lines.append(f"| {body} | {mine[0]['body_params']:,} | {len(mine)} | {evals.mean():.1f} +- {evals.std():.1f} | "
                     + ", ".join(f"{v:.0f}" for v in evals) + f" | {np.mean([r['train_return_last20'] for r in mine]):.1f} | "
                     f"{np.mean([r['train_s'] for r in mine]):.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Partially observed CartPole: SSM vs GRU vs MLP (stacked frames), PPO")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--bodies", nargs="+", default=list(BODIES), choices=BODIES)
    parser.add_argument("--ssm-state", type=int, default=None, help="SSM state size (default hidden / 2)")
    parser.add_argument("--ssm-dt", type=float, nargs=2, default=(0.1, 1.0), help="SSM initial step range (dt_min dt_max)")
    args = parser.parse_args(argv)
    body_kwargs = {"ssm_state": args.ssm_state, "ssm_dt": tuple(args.ssm_dt)}
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        for body in args.bodies:
            rows.append(train_and_evaluate(body, args.window, seed, args.steps, **(body_kwargs if body == "ssm" else {})))
            r = rows[-1]
            print(f"{body} seed {seed}: eval {r['eval_return']:.1f}, last 20 training episodes {r['train_return_last20']:.1f}, "
                  f"{r['train_s']:.0f} s", flush=True)
            (args.out / "pomdp_cartpole.json").write_text(json.dumps(rows, indent=1))
    (args.out / "pomdp_cartpole.md").write_text(markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
