"""Model-based pulse design on QubitPulse-v0 (``algorithm: pets`` of ``task: qubit_pulse``).

The environment's dynamics are known and deterministic: its observation is the controls played so
far. What is unknown is the reward, the fidelity of the finished pulse on the episode's hidden
noise task, given once, at the end. So the probabilistic ensemble of PETS (mbrl/ensemble.py: 5
Gaussian MLPs, NLL on bootstrap samples, one vmapped call) learns the *terminal reward* as a
function of the whole pulse, and the CEM planner (mbrl/cem.py) optimises the whole pulse against
it: the horizon is the pulse's ``n_segments`` and, since nothing is observed before the end of an
episode, replanning at every segment would return the same plan, so each episode plays one plan.

Exploration is Thompson sampling over the bootstrap ensemble: each episode plans against one
member drawn at random; the evaluated pulse is planned against the members' mean. Every
``eval_every`` episodes that pulse is scored on the held-out tasks of the ``qubit_meta`` task with
the same seed (the tasks the SAC runs and the robust pulse are scored on), so the run measures
the environment steps needed to reach the robust pulse's held-out fidelity
(``final/steps_to_robust``), the comparison of issue 15 with SAC (Khalid et al. 2023: about 10x
fewer samples for model-based control of noisy gates).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
import torch

from mbrl.cem import CEMPlanner
from mbrl.config import PulsePETSConfig
from mbrl.ensemble import GaussianEnsemble, HoldoutData, plot_model_quality
from utils import seed_streams

ENV_ID = "QubitPulse-v0"


@dataclass
class PulsePETSResult:
    cfg: PulsePETSConfig
    ensemble: GaussianEnsemble
    pulse: torch.Tensor | None = None
    """The last evaluated pulse (n_segments, 2), planned against the members' mean."""
    episode_rewards: list[float] = field(default_factory=list)
    episode_fidelities: list[float] = field(default_factory=list)
    evaluations: list[tuple[int, float]] = field(default_factory=list)
    """(environment steps, held-out fidelity of the mean-model plan)."""
    holdout_nll: list[tuple[int, float]] = field(default_factory=list)
    disagreement: list[tuple[int, float]] = field(default_factory=list)
    plan_ms: list[float] = field(default_factory=list)
    fidelity_robust: float | None = None
    """The robust pulse's held-out fidelity (from the baselines at the end; None without a robust pulse)."""
    baselines: dict[str, float] = field(default_factory=dict)
    env_steps: int = 0
    train_s: float = 0.0

    @property
    def final_step(self) -> int:
        return self.env_steps

    def steps_to_robust(self) -> float | None:
        """Environment steps at the first evaluation at or above the robust pulse's held-out
        fidelity (None: never, or no robust pulse)."""
        if self.fidelity_robust is None:
            return None
        return next((float(s) for s, f in self.evaluations if f >= self.fidelity_robust), None)

    def final_metrics(self) -> dict[str, float]:
        nan = math.nan
        reached = self.steps_to_robust()
        return {
            **self.baselines,
            "final/eval_return": self.baselines.get("final/eval_return", nan),
            "final/env_steps": float(self.env_steps),
            **({} if self.fidelity_robust is None else {"final/reached_robust": float(reached is not None)}),
            **({} if reached is None else {"final/steps_to_robust": reached}),
            "final/model_nll_holdout": self.holdout_nll[-1][1] if self.holdout_nll else nan,
            "final/ensemble_disagreement": self.disagreement[-1][1] if self.disagreement else nan,
            "final/plan_ms_per_episode": float(np.mean(self.plan_ms)) if self.plan_ms else nan,
            "final/train_s": self.train_s,
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.ensemble.state_dict().items()}

    def figures(self, title: str) -> dict:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n = self.cfg.env_steps // max(len(self.episode_fidelities), 1)
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        steps = n * (np.arange(len(self.episode_fidelities)) + 1)
        axes[0].plot(steps, self.episode_fidelities, ".", ms=3, alpha=0.5, label="training episode (own task)")
        if self.evaluations:
            s, f = zip(*self.evaluations)
            axes[0].plot(s, f, marker="o", label="mean-model plan, held-out tasks")
        if self.fidelity_robust is not None:
            axes[0].axhline(self.fidelity_robust, color="grey", ls="--", lw=0.8, label="robust pulse, held-out")
        axes[0].set(xlabel="environment steps", ylabel="average gate fidelity", title="fidelity")
        axes[0].legend(fontsize=7)
        plot_model_quality(axes[1], self.holdout_nll, self.disagreement, title="reward model")
        fig.suptitle(title)
        fig.tight_layout()
        return {"pets_pulse_learning.png": fig}


def plan_pulse(ensemble: GaussianEnsemble, planner: CEMPlanner, generator: torch.Generator,
               member: int | None = None) -> torch.Tensor:
    """The pulse ``(n_segments, 2)`` in [-1, 1] that maximises the predicted reward of one member
    (``member``) or of the members' mean (None)."""

    @torch.no_grad()
    def objective(pulses: torch.Tensor) -> torch.Tensor:
        x = pulses.reshape(len(pulses), -1).to(torch.float32).expand(ensemble.size, -1, -1)
        mean, _ = ensemble(x)
        return mean[member, :, 0] if member is not None else mean[..., 0].mean(0)

    return planner.optimize(objective, planner.initial_mean(), generator)


def _exp_config(exp) -> PulsePETSConfig:
    cfg = getattr(exp, "pets", None)
    if not isinstance(cfg, PulsePETSConfig):
        raise ValueError(f"train_pets_pulse needs an experiment with a PulsePETSConfig 'pets' section, got {type(cfg).__name__}")
    return cfg


def train_pets_pulse(exp, seed: int, reporter, resume: dict | None = None) -> PulsePETSResult:
    """One model-based run on QubitPulse-v0 (``exp``: a ``qubit_pulse`` experiment)."""
    import envs  # noqa: F401  (registers QubitPulse-v0)
    from control.sb3 import pulse_baselines, pulse_reference

    if resume is not None:
        raise ValueError("pets runs have no checkpoints to resume from")
    cfg = _exp_config(exp)
    torch.set_num_threads(1)
    meta = exp.meta
    n_seg, amp = meta.n_segments, float(meta.max_amplitude)
    episodes = cfg.env_steps // n_seg  # more than seed_episodes: the config's validator
    streams = seed_streams(seed, ["pets/env", "pets/init", "pets/data", "pets/plan", "pets/explore"])
    ensemble = GaussianEnsemble(cfg.ensemble_size, 2 * n_seg, 1, cfg.hidden, cfg.layers, generator=streams["pets/init"].torch())
    opt = torch.optim.Adam(ensemble.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    data_rng = streams["pets/data"].numpy()
    data = HoldoutData(cfg.holdout_fraction, data_rng)  # inputs: pulses scaled to [-1, 1]; targets: rewards
    explore = streams["pets/explore"].numpy()
    plan_gen = streams["pets/plan"].torch()
    planner = CEMPlanner(n_seg, cfg.population, cfg.elites, cfg.iterations, -torch.ones(2), torch.ones(2), cfg.alpha)
    reference = pulse_reference(exp, seed)
    val_tasks, _ = reference
    result = PulsePETSResult(cfg, ensemble)

    def evaluate(step: int) -> None:
        pulse = amp * plan_pulse(ensemble, planner, plan_gen).to(torch.float64)
        with torch.no_grad():
            fidelity = float(val_tasks.fidelity(pulse.expand(len(val_tasks), -1, -1)).mean())
        result.pulse = pulse
        result.evaluations.append((step, fidelity))
        reporter.metrics({"eval/fidelity": fidelity, "eval/return": _reward(fidelity, cfg.reward)}, step)

    env = gym.make(ENV_ID, meta=meta, reward=cfg.reward)
    reset_seeds = iter(streams["pets/env"].ints(episodes))
    t0 = time.monotonic()
    step = 0
    for episode in range(episodes):
        if episode < cfg.seed_episodes:
            scaled = explore.uniform(-1.0, 1.0, size=(n_seg, 2))
        else:
            tp = time.perf_counter()
            member = int(torch.randint(ensemble.size, (1,), generator=plan_gen))
            scaled = plan_pulse(ensemble, planner, plan_gen, member).numpy()
            result.plan_ms.append(1e3 * (time.perf_counter() - tp))
        env.reset(seed=next(reset_seeds))
        for u in scaled:
            _, reward, terminated, _, info = env.step((amp * u).astype(np.float32))
        step += n_seg
        if not terminated:
            raise RuntimeError("QubitPulse-v0 did not end after n_segments steps")
        data.add(scaled.reshape(-1), [reward])
        result.episode_rewards.append(float(reward))
        result.episode_fidelities.append(float(info["fidelity"]))
        metrics = {"pets/episode_reward": float(reward), "pets/episode_fidelity": float(info["fidelity"])}
        if episode + 1 >= cfg.seed_episodes and len(data.train_x) > 1:
            data.fit(ensemble, opt, cfg.epochs, cfg.batch_size)
            nll, dis = data.holdout_metrics(ensemble)
            result.holdout_nll.append((step, nll))
            result.disagreement.append((step, dis))
            metrics.update({"pets/model_nll_holdout": nll, "pets/ensemble_disagreement": dis})
            if result.plan_ms:
                metrics["pets/plan_ms_per_episode"] = result.plan_ms[-1]
            if (episode + 1 - cfg.seed_episodes) % cfg.eval_every == 0 or episode == episodes - 1:
                evaluate(step)
        reporter.metrics(metrics, step)
        reporter.progress(step, episodes * n_seg, float(reward))
    env.close()
    result.env_steps = step
    result.train_s = time.monotonic() - t0
    result.baselines = pulse_baselines(exp, seed, result.pulse, reference)
    result.baselines["final/eval_return"] = _reward(result.baselines["final/fidelity"], cfg.reward)
    result.fidelity_robust = result.baselines.get("final/fidelity_robust")
    return result


def _reward(fidelity: float, kind: str) -> float:
    from envs.qubit_pulse import infidelity_reward

    return fidelity if kind == "fidelity" else infidelity_reward(fidelity)
