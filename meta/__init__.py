"""Meta-learning of qubit control pulses across noise settings: policies, tasks and losses,
MAML / FOMAML / Reptile, baselines, and the ``qubit_meta`` training run."""
