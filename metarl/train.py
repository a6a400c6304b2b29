"""``task: pendulum_meta``: meta-train a dynamics model across the family's train tasks, then plan
with it on held-out and out-of-distribution tasks, adapting between episodes.

1. Data: ``data_episodes`` episodes of uniformly random torques in each train task.
2. Meta-training, ``iterations`` times: ``meta_batch`` train tasks, from each a window of
   ``support_size`` consecutive transitions and the ``query_size`` after it; one update of the
   learner (:mod:`metarl.learners`: maml, reptile, context, or the pooled baseline). Then, for each
   of ``policy_rounds`` rounds, one planner episode per train task (with the model adapted on that
   task's latest episode) joins the data, and step 2 runs again.
3. Evaluation, per held-out / OOD task: ``adapt_episodes + 1`` episodes with the CEM planner and
   Pendulum's known reward (:func:`mbrl.pets.pendulum_reward`). Episode 0 uses the meta-learned
   model as it is; before episode k + 1 the model is adapted on all the task's transitions of
   episodes 0..k (gradient steps for maml / reptile, the encoder's posterior for context, nothing
   for pooled). Logged: ``adapt/<split>/return_ep<k>``, ``adapt/<split>/nll_ep<k>`` (the NLL of
   episode k's transitions under the model that planned it) and ``adapt/<split>/nll_unadapted_ep<k>``
   (the same transitions under the unadapted model: adaptation's effect on the model, on the same data).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from mbrl.cem import CEMPlanner, trajectory_returns
from mbrl.ensemble import gaussian_nll
from mbrl.pets import MAX_TORQUE, pendulum_reward
from metarl.config import PendulumMetaConfig
from metarl.family import PendulumTask, make_splits
from metarl.learners import LEARNERS
from train import NullReporter
from utils import seed_streams

EVAL_SPLITS = ("heldout", "ood")
LOG_EVERY = 50


@dataclass
class Episode:
    x: torch.Tensor
    """(T, 4): observation and action."""
    y: torch.Tensor
    """(T, 3): change of the observation."""
    ret: float


@dataclass
class MetaResult:
    cfg: PendulumMetaConfig
    meta_algorithm: str
    learner: object
    splits: dict[str, list[PendulumTask]]
    losses: list[tuple[int, float]] = field(default_factory=list)
    returns: dict[str, np.ndarray] = field(default_factory=dict)
    """split -> (tasks, adapt_episodes + 1) returns."""
    nlls: dict[str, np.ndarray] = field(default_factory=dict)
    base_nlls: dict[str, np.ndarray] = field(default_factory=dict)
    """split -> the same episodes' NLL under the unadapted model (equal to ``nlls`` in episode 0)."""
    plan_ms: list[float] = field(default_factory=list)
    train_env_steps: int = 0
    eval_env_steps: int = 0
    train_s: float = 0.0
    eval_s: float = 0.0

    @property
    def final_step(self) -> int:
        return self.cfg.total_iterations

    def final_metrics(self) -> dict[str, float]:
        k = self.cfg.adapt_episodes
        out = {
            "final/eval_return": float(self.returns["heldout"][:, k].mean()),
            "final/ood_return": float(self.returns["ood"][:, k].mean()),
            "final/env_steps": float(self.train_env_steps + self.eval_env_steps),
            "final/train_env_steps": float(self.train_env_steps),
            "final/meta_loss": self.losses[-1][1],
            "final/plan_ms_per_step": float(np.mean(self.plan_ms)),
            "final/train_s": self.train_s,
            "final/eval_s": self.eval_s,
        }
        for split in EVAL_SPLITS:
            for ep in range(k + 1):
                out[f"adapt/{split}/return_ep{ep}"] = float(self.returns[split][:, ep].mean())
                out[f"adapt/{split}/nll_ep{ep}"] = float(self.nlls[split][:, ep].mean())
                out[f"adapt/{split}/nll_unadapted_ep{ep}"] = float(self.base_nlls[split][:, ep].mean())
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"model.{k}": v.detach().clone() for k, v in self.learner.model.state_dict().items()}
        encoder = getattr(self.learner, "encoder", None)
        if encoder is not None:
            state.update({f"encoder.{k}": v.detach().clone() for k, v in encoder.state_dict().items()})
        return state

    def figures(self, title: str) -> dict:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        eps = np.arange(self.cfg.adapt_episodes + 1)
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        for i, split in enumerate(EVAL_SPLITS):
            r, n = self.returns[split], self.nlls[split]
            for row in r:
                axes[0].plot(eps, row, color=f"C{i}", lw=0.6, alpha=0.4)
            axes[0].plot(eps, r.mean(0), color=f"C{i}", marker="o", label=f"{split} ({len(r)} tasks)")
            axes[1].plot(eps, n.mean(0), color=f"C{i}", marker="o", label=split)
        axes[0].set(xlabel="adaptation episodes", ylabel="episode return", title="return", xticks=eps)
        axes[0].legend()
        axes[1].set(xlabel="adaptation episodes", ylabel="NLL of the episode's transitions", title="model fit", xticks=eps)
        axes[1].legend()
        if self.losses:
            s, v = zip(*self.losses)
            axes[2].plot(s, v)
        axes[2].set(xlabel="meta-iteration", ylabel="loss", title="meta-training")
        fig.suptitle(title)
        fig.tight_layout()
        return {"pendulum_meta_adaptation.png": fig}


def _episode(env, reset_seed: int, act, steps_out: list) -> Episode:
    obs, _ = env.reset(seed=int(reset_seed))
    xs, ys, total, done = [], [], 0.0, False
    while not done:
        action = act(obs)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        xs.append(np.concatenate([obs, action]).astype(np.float32))
        ys.append((next_obs - obs).astype(np.float32))
        total += float(reward)
        obs = next_obs
        done = terminated or truncated
        steps_out.append(1)
    return Episode(torch.as_tensor(np.stack(xs)), torch.as_tensor(np.stack(ys)), total)


class Planner:
    """MPC with the CEM planner over a model from ``learner.adapt`` and the known reward."""

    def __init__(self, cfg: PendulumMetaConfig, generator: torch.Generator):
        lo, hi = torch.tensor([-MAX_TORQUE]), torch.tensor([MAX_TORQUE])
        self.cem = CEMPlanner(cfg.horizon, cfg.population, cfg.elites, cfg.cem_iterations, lo, hi, cfg.alpha)
        self.cfg, self.generator, self.model = cfg, generator, None
        self.plan_ms: list[float] = []

    def reset(self, model) -> None:
        self.model, self.mean = model, self.cem.initial_mean()

    @torch.no_grad()
    def __call__(self, obs: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        o = torch.as_tensor(obs, dtype=torch.float32)

        def objective(actions):
            return trajectory_returns(self.model, pendulum_reward, o, actions, self.cfg.particles, self.generator)

        plan = self.cem.optimize(objective, self.mean, self.generator)
        self.mean = torch.cat([plan[1:], plan[-1:]])
        self.plan_ms.append(1e3 * (time.perf_counter() - t0))
        return plan[0].numpy().astype(np.float32)


def collect_random(tasks: list[PendulumTask], cfg: PendulumMetaConfig, rng: np.random.Generator) -> tuple[list[list[Episode]], int]:
    steps: list = []
    data = []
    for task in tasks:
        env = task.make_env(cfg.episode_steps)
        def act(_obs):
            return rng.uniform(-MAX_TORQUE, MAX_TORQUE, size=1).astype(np.float32)
        data.append([_episode(env, rng.integers(2**31), act, steps) for _ in range(cfg.data_episodes)])
        env.close()
    return data, len(steps)


def sample_batch(data: list[list[Episode]], cfg: PendulumMetaConfig, rng: np.random.Generator):
    """``meta_batch`` distinct train tasks; per task (support x, support y, query x, query y) from one
    random episode, the query the ``query_size`` transitions right after the support."""
    out = []
    for t in rng.choice(len(data), size=cfg.meta_batch, replace=False):
        ep = data[t][rng.integers(len(data[t]))]
        s, q = cfg.support_size, cfg.query_size
        start = int(rng.integers(0, len(ep.x) - s - q + 1))
        out.append((ep.x[start : start + s], ep.y[start : start + s], ep.x[start + s : start + s + q], ep.y[start + s : start + s + q]))
    return out


@torch.no_grad()
def _nll(model, x: torch.Tensor, y: torch.Tensor) -> float:
    mean, logvar = model(x.expand(model.size, *x.shape))
    return gaussian_nll(mean, logvar, y.expand(model.size, *y.shape)).mean().item()


def evaluate(learner, tasks: list[PendulumTask], cfg: PendulumMetaConfig, planner: Planner,
             reset_seeds) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Returns, the NLL of each episode under the model that planned it, the same episode's NLL
    under the unadapted model (shape ``(tasks, adapt_episodes + 1)``) and the steps taken."""
    returns = np.zeros((len(tasks), cfg.adapt_episodes + 1))
    nlls = np.zeros_like(returns)
    base_nlls = np.zeros_like(returns)
    steps: list = []
    for i, task in enumerate(tasks):
        env = task.make_env(cfg.episode_steps)
        xs, ys = torch.zeros(0, 4), torch.zeros(0, 3)
        for k in range(cfg.adapt_episodes + 1):
            model = learner.adapt(xs, ys)
            if k == 0:
                unadapted = model
            planner.reset(model)
            ep = _episode(env, next(reset_seeds), planner, steps)
            returns[i, k], nlls[i, k] = ep.ret, _nll(model, ep.x, ep.y)
            base_nlls[i, k] = nlls[i, k] if k == 0 else _nll(unadapted, ep.x, ep.y)
            xs, ys = torch.cat([xs, ep.x]), torch.cat([ys, ep.y])
        env.close()
    return returns, nlls, base_nlls, len(steps)


def _parts(exp) -> tuple[PendulumMetaConfig, str]:
    cfg = getattr(exp, "pendulum_meta", None)
    algorithm = getattr(exp, "meta_algorithm", None)
    if not isinstance(cfg, PendulumMetaConfig) or algorithm not in LEARNERS:
        raise ValueError(f"train_pendulum_meta needs an experiment with a 'pendulum_meta' section and a meta_algorithm in "
                         f"{', '.join(LEARNERS)}; got {type(exp).__name__}")
    return cfg, algorithm


def train_pendulum_meta(exp, seed: int, reporter=None, resume: dict | None = None) -> MetaResult:
    if resume is not None:
        raise ValueError("pendulum_meta runs have no checkpoints to resume from")
    reporter = reporter or NullReporter()
    cfg, algorithm = _parts(exp)
    torch.set_num_threads(1)
    streams = seed_streams(seed, ["meta/tasks", "meta/data", "meta/init", "meta/batches", "meta/plan", "meta/eval_env", "meta/collect"])
    splits = make_splits(cfg, streams["meta/tasks"].numpy())
    learner = LEARNERS[algorithm](cfg, streams["meta/init"].torch())
    t0 = time.monotonic()
    data, train_steps = collect_random(splits["train"], cfg, streams["meta/data"].numpy())
    x_all = torch.cat([ep.x for task in data for ep in task])
    y_all = torch.cat([ep.y for task in data for ep in task])
    if algorithm == "context":
        learner.set_normalizer(x_all, y_all)
    else:
        learner.set_normalizer(x_all)
    result = MetaResult(cfg, algorithm, learner, splits, train_env_steps=train_steps)
    rng = streams["meta/batches"].numpy()
    planner = Planner(cfg, streams["meta/plan"].torch())
    collect_seeds = iter(streams["meta/collect"].ints(cfg.policy_rounds * cfg.n_train_tasks))
    it, total = 0, cfg.total_iterations
    for round_ in range(cfg.policy_rounds + 1):
        if round_:
            steps: list = []
            for task, episodes in zip(splits["train"], data):
                env = task.make_env(cfg.episode_steps)
                planner.reset(learner.adapt(episodes[-1].x, episodes[-1].y))
                episodes.append(_episode(env, next(collect_seeds), planner, steps))
                env.close()
            result.train_env_steps += len(steps)
            reporter.metrics({"meta/collect_return": float(np.mean([task[-1].ret for task in data]))}, it)
        for _ in range(cfg.iterations):
            it += 1
            loss = learner.step(sample_batch(data, cfg, rng))
            if not np.isfinite(loss):
                raise FloatingPointError(f"meta-training loss is not finite at iteration {it} ({loss})")
            if it % LOG_EVERY == 0 or it == total:
                result.losses.append((it, loss))
                reporter.metrics({"meta/loss": loss}, it)
                reporter.progress(it, total, loss)
    result.train_s = time.monotonic() - t0
    t1 = time.monotonic()
    planner.plan_ms = []
    eval_seeds = iter(streams["meta/eval_env"].ints((cfg.n_heldout_tasks + cfg.n_ood_tasks) * (cfg.adapt_episodes + 1)))
    for split in EVAL_SPLITS:
        result.returns[split], result.nlls[split], result.base_nlls[split], steps = evaluate(learner, splits[split], cfg, planner, eval_seeds)
        result.eval_env_steps += steps
        for k in range(cfg.adapt_episodes + 1):
            reporter.metrics({f"adapt/{split}/return": float(result.returns[split][:, k].mean()),
                              f"adapt/{split}/nll": float(result.nlls[split][:, k].mean())}, k)
    result.plan_ms = planner.plan_ms
    result.eval_s = time.monotonic() - t1
    return result
