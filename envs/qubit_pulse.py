"""``QubitPulse-v0``: design a single-qubit gate pulse segment by segment under colored noise."""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

#: Rewards the environment can give at the end of an episode (``reward`` argument).
REWARDS = ("fidelity", "log_infidelity")
#: -log10(1 - F) is capped at this infidelity (F = 1 exactly would give +inf).
MIN_INFIDELITY = 1e-12


def pulse_task_factory(meta):
    """The :class:`meta.tasks.TaskFactory` of a ``meta`` section (config_schema.MetaConfig): the
    same task distribution, PSD-to-rate converter and fidelity model as ``qubit_meta``."""
    from meta.tasks import TaskFactory
    from meta.train import converter_for, fidelity_model

    return TaskFactory(meta.noise.distribution(), converter_for(meta.noise), fidelity_model(meta), meta.target_gate,
                       meta.task_input, meta.fidelity, meta.support.states, meta.support.shots)


def infidelity_reward(fidelity: float) -> float:
    """-log10(1 - F), with 1 - F floored at MIN_INFIDELITY."""
    return -math.log10(max(1.0 - fidelity, MIN_INFIDELITY))


class QubitPulseEnv(gym.Env):
    """
    ## Description

    One episode builds one gate: a piecewise-constant control pulse of ``n_segments`` segments
    on a qubit in the rotating frame, H(t) = (delta/2) sz + (u_x(t)/2) sx + (u_y(t)/2) sy, with
    time in units of the gate duration T = 1 (docs/CONVENTIONS.md §3). At every reset a task is
    drawn from the same task distribution as the ``qubit_meta`` task (a dephasing power spectral
    density, relaxation from it at the qubit frequency, and a hidden quasi-static detuning delta),
    and the finished pulse is scored by the same fidelity model (filter function, trajectories or
    markovian; ``noise/models.py``) as the average gate fidelity against the target gate.
    The agent never sees the task: the best fixed pulse for the distribution (the robust pulse of
    ``meta/algorithms.py``) is the benchmark.

    ## Action Space

    ``Box(-max_amplitude, max_amplitude, (2,), float32)``: the segment's controls (u_x, u_y) in
    1/T. A constant u_x = pi over the whole gate is an X gate up to a phase.

    ## Observation Space

    ``Box(shape=(1 + 2 n_segments,), float32)``: index 0 is the segment about to be played divided
    by ``n_segments`` (in [0, 1]); then the controls played so far divided by ``max_amplitude``
    (u_x, u_y per segment, in [-1, 1]), zero for the segments still to come.

    ## Rewards

    Sparse: 0 for every segment but the last; after the last one the average gate fidelity F of
    the pulse on the episode's task (``reward="fidelity"``, in [0, 1]) or -log10(1 - F)
    (``reward="log_infidelity"``, 1 - F floored at 1e-12).

    ## Starting State

    Segment 0, no controls played; a task drawn from the distribution with the environment's
    ``np_random`` (the trajectories model's noise realisation from a seed drawn from it too).

    ## Episode End

    Terminated after ``n_segments`` steps; never truncated.

    ## Arguments

    ``gym.make("QubitPulse-v0", meta=None, reward="fidelity")``: ``meta`` is a
    ``config_schema.MetaConfig`` (or a dict of its fields) giving ``target_gate``,
    ``n_segments``, ``max_amplitude`` and the ``noise`` section (task distribution and fidelity
    model); unset, the defaults of ``MetaConfig``. ``info`` holds ``fidelity`` at the end of an
    episode and, at every step, ``segment``.
    """

    metadata = {"render_modes": []}

    def __init__(self, meta=None, reward: str = "fidelity"):
        from config_schema import MetaConfig

        if reward not in REWARDS:
            raise ValueError(f"reward {reward!r}; allowed: {', '.join(REWARDS)}")
        if meta is None or isinstance(meta, dict):
            meta = MetaConfig.model_validate(meta or {})
        self.meta = meta
        self.reward_kind = reward
        self.n_segments = meta.n_segments
        self.max_amplitude = float(meta.max_amplitude)
        self.factory = pulse_task_factory(meta)
        amp = np.float32(self.max_amplitude)
        self.action_space = spaces.Box(-amp, amp, shape=(2,), dtype=np.float32)
        low = np.concatenate([[0.0], -np.ones(2 * self.n_segments)]).astype(np.float32)
        high = np.ones(1 + 2 * self.n_segments, dtype=np.float32)
        self.observation_space = spaces.Box(low, high, dtype=np.float32)
        self.controls = np.zeros((self.n_segments, 2), dtype=np.float64)
        self.segment = 0
        self.tasks = None

    def draw_task(self):
        """One task (a :class:`meta.tasks.QubitTasks` of length 1) from ``np_random``."""
        params = self.factory.distribution.sample(1, self.np_random)
        noise_rng = np.random.default_rng(int(self.np_random.integers(2**63)))
        return self.factory.make(params, noise_rng)

    def _obs(self) -> np.ndarray:
        scaled = (self.controls / self.max_amplitude).reshape(-1)
        return np.concatenate([[self.segment / self.n_segments], scaled]).astype(np.float32)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self.tasks = self.draw_task()
        self.controls[:] = 0.0
        self.segment = 0
        return self._obs(), {"segment": 0}

    def fidelity(self, controls: np.ndarray) -> float:
        """Average gate fidelity of ``controls`` (N, 2) on the current task."""
        with torch.no_grad():
            return float(self.tasks.fidelity(torch.as_tensor(controls, dtype=torch.float64)[None])[0])

    def step(self, action):
        if self.tasks is None:
            raise RuntimeError("call reset() before step()")
        if self.segment >= self.n_segments:
            raise RuntimeError("the episode has ended; call reset()")
        u = np.clip(np.asarray(action, dtype=np.float64).reshape(2), -self.max_amplitude, self.max_amplitude)
        self.controls[self.segment] = u
        self.segment += 1
        info: dict[str, Any] = {"segment": self.segment}
        terminated = self.segment == self.n_segments
        reward = 0.0
        if terminated:
            fidelity = self.fidelity(self.controls)
            info["fidelity"] = fidelity
            reward = fidelity if self.reward_kind == "fidelity" else infidelity_reward(fidelity)
        return self._obs(), float(reward), terminated, False, info
