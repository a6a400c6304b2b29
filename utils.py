"""Shared helpers: device selection, seeding, flattening configs, library versions and the git commit
(the tracking store's helpers are in sweep/tracking.py)."""

from __future__ import annotations

import importlib.metadata
import random
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

TRACKED_LIBRARIES = ("torch", "pennylane", "tensorcircuit-ng", "jax", "gymnasium", "mlflow", "numpy")


class NonFiniteError(FloatingPointError):
    """Training produced NaN or infinity; the message names what and where."""


# ---------------------------------------------------------------------------------------------
# Devices


def select_device(requested: str = "auto", *, cuda_available: bool | None = None, mps_available: bool | None = None) -> str:
    """Resolve ``auto | cpu | cuda | mps`` to a device name: ``auto`` prefers cuda, then mps, then cpu.

    An explicit device that is not available raises ``RuntimeError``. Availability is probed
    from torch unless given (the tests inject it).
    """
    if requested not in ("auto", "cpu", "cuda", "mps"):
        raise ValueError(f"device {requested!r}; allowed: auto, cpu, cuda, mps")
    if cuda_available is None or mps_available is None:
        import torch

        if cuda_available is None:
            cuda_available = torch.cuda.is_available()
        if mps_available is None:
            mps_available = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    if requested == "auto":
        if cuda_available:
            return "cuda"
        if mps_available:
            return "mps"
        return "cpu"
    if requested == "cuda" and not cuda_available:
        raise RuntimeError("device 'cuda' requested but torch sees no CUDA device")
    if requested == "mps" and not mps_available:
        raise RuntimeError("device 'mps' requested but torch sees no MPS device")
    return requested


def simulation_device(backend: str, device: str, tc_math_backend: str = "jax") -> tuple[str, str | None]:
    """Device on which a backend's model runs, and a note when it had to fall back to the CPU.

    The classical MLP runs anywhere. PennyLane default.qubit and TensorCircuit's pytorch backend
    simulate with torch ops, so they can use CUDA, but MPS lacks complex128. TensorCircuit's jax
    backend runs where jax runs (the CPU with the wheels we pin).
    """
    if backend == "classical" or device == "cpu":
        return device, None
    if backend == "tensorcircuit" and tc_math_backend == "jax":
        return "cpu", f"{backend} (jax) simulates on the cpu; requested device {device!r} is not used"
    if device == "mps":
        return "cpu", f"{backend} needs complex128, which MPS lacks; simulating on the cpu"
    return device, None


# ---------------------------------------------------------------------------------------------
# Seeding


def seed_everything(seed: int) -> np.random.Generator:
    """Seed python, numpy and torch global state; return a fresh numpy Generator for explicit use.

    Library code takes explicit generators; the global seeds only guard third-party code that
    draws from global state. Environments are seeded where they are reset (see train.py).
    """
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------------------------
# Config and environment description


def flatten_dict(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_dict(value, full + "."))
        else:
            out[full] = value
    return out


def library_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit(path: str | Path = ".") -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
