"""CPU milliseconds of one PETS planning step (``mbrl.pets._Agent.act``), one torch thread.

    python tools/pets_plan_bench.py '{"horizon": 25}'

The ensemble is fitted (the run's own ``_fit``) on 1,000 Pendulum-v1 transitions of uniformly
random actions; then 60 planning steps along an episode, the first 10 discarded; prints the median
and mean CPU time (``time.process_time``), the median wall time and the load average as JSON. The
argument is a JSON object of PETSConfig fields. To compare two checkouts, run it from each with
``PYTHONPATH=<checkout>`` in one shell loop (README, PETS measurements).
"""

from __future__ import annotations

import json
import os
import sys
import time

import gymnasium as gym
import numpy as np
import torch


def main(argv: list[str]) -> dict:
    from mbrl import pets
    from mbrl.config import PETSConfig
    from mbrl.ensemble import GaussianEnsemble

    torch.set_num_threads(1)
    kw = json.loads(argv[0]) if argv else {}
    cfg = PETSConfig(**kw)
    ens = GaussianEnsemble(cfg.ensemble_size, 4, 3, cfg.hidden, cfg.layers, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(ens.parameters(), lr=cfg.lr)
    rng = np.random.default_rng(0)
    try:
        from mbrl.ensemble import HoldoutData

        data = HoldoutData(0.1, rng)

        def add(o, a, n):
            data.add(np.concatenate([o, a]), n - o)

        def fit():
            data.fit(ens, opt, cfg.epochs, cfg.batch_size)
    except ImportError:  # a checkout from before HoldoutData, for before/after timings
        data = pets._Data(0.1, rng)
        add = data.add

        def fit():
            fit()
    env = gym.make("Pendulum-v1")
    obs, _ = env.reset(seed=0)
    for i in range(1000):
        a = rng.uniform(-2, 2, size=1).astype(np.float32)
        nobs, _, terminated, truncated, _ = env.step(a)
        add(obs, a, nobs)
        obs = nobs
        if terminated or truncated:
            obs, _ = env.reset(seed=i)
    fit()
    agent = pets._Agent(ens, cfg, torch.Generator().manual_seed(1))
    obs, _ = env.reset(seed=5)
    cpu, wall = [], []
    for _ in range(60):
        t0, c0 = time.perf_counter(), time.process_time()
        a = agent.act(obs)
        wall.append(1e3 * (time.perf_counter() - t0))
        cpu.append(1e3 * (time.process_time() - c0))
        obs, *_ = env.step(a)
    cpu, wall = cpu[10:], wall[10:]
    return {"cfg": kw, "cpu_ms_median": round(float(np.median(cpu)), 1), "cpu_ms_mean": round(float(np.mean(cpu)), 1),
            "wall_ms_median": round(float(np.median(wall)), 1), "load": os.getloadavg()}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
