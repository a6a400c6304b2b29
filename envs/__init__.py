"""Gymnasium environments of this project (registered on import): ``QubitPulse-v0``."""

import gymnasium as gym

ENV_IDS = ("QubitPulse-v0",)

if "QubitPulse-v0" not in gym.registry:
    gym.register(id="QubitPulse-v0", entry_point="envs.qubit_pulse:QubitPulseEnv")
