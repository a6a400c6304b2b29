"""``python -m noise [config.yaml]``: rate and pi-pulse infidelity quantiles of the task
distribution of every qubit_meta experiment in a config (default: the built-in defaults).

The numbers in the README's task-range table come from here.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch

from config_schema import ExperimentConfig, load_config
from noise.simulator import average_gate_fidelity, target_unitary

QUANTILES = (0.01, 0.1, 0.5, 0.9, 0.99)


def quantile_table(exp: ExperimentConfig, n: int = 20000, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    from meta.train import task_factory

    tasks = task_factory(exp).sample(n, np.random.default_rng(seed))
    controls = torch.zeros(n, 1, 2, dtype=torch.float64)
    controls[..., 0] = math.pi
    infidelity = 1 - average_gate_fidelity(tasks.channel(controls), target_unitary("x")).numpy()
    return [("gamma_phi (1/T)", np.quantile(tasks.gamma_phi.numpy(), QUANTILES)),
            ("Gamma_down = Gamma_up (1/T)", np.quantile(tasks.gamma_down.numpy(), QUANTILES)),
            ("pi-pulse infidelity (X)", np.quantile(infidelity, QUANTILES))]


def main(argv: list[str]) -> None:
    if argv:
        experiments = [e for e in load_config(argv[0]).experiments if e.task == "qubit_meta"]
    else:
        experiments = [ExperimentConfig.model_validate({"name": "defaults", "task": "qubit_meta", "backend": "classical", "gradient": "backprop"})]
    for exp in experiments:
        noise = exp.meta.noise
        print(f"\n{exp.name}: {noise.dist_type} {dict(noise.ranges)} models {list(noise.model_types)}, range_scale {noise.range_scale}")
        print("| quantity | " + " | ".join(f"{int(q * 100)} %" for q in QUANTILES) + " |")
        print("|---|" + "---|" * len(QUANTILES))
        for name, values in quantile_table(exp):
            print(f"| {name} | " + " | ".join(f"{v:.2g}" for v in values) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
