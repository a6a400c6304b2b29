"""Shared helpers: device selection, seeding, flattening configs, library versions and the git commit
(the tracking store's helpers are in sweep/tracking.py)."""

from __future__ import annotations

import importlib.metadata
import random
import subprocess
import zlib
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


def jax_sees_gpu() -> bool:
    """Whether jax has a CUDA backend here (jax's CPU wheels, which requirements.txt installs, do not)."""
    import jax

    try:
        return bool(jax.devices("cuda"))
    except RuntimeError:  # "Unknown backend cuda" / no CUDA plugin or no device
        return False


def simulation_device(engine: str, device: str, *, jax_gpu: bool | None = None) -> tuple[str, str | None]:
    """Device on which a model runs, and a note when it had to fall back to the CPU.

    ``engine`` (a backend's :attr:`backends.Backend.engine` for the experiment): ``torch`` (the
    classical MLP, PennyLane's torch interface, TensorCircuit's pytorch backend) runs on any torch
    device but MPS, which lacks complex128 (the MLP is real and runs there too: ``torch-real``);
    ``jax`` (TensorCircuit's jax backend, PennyLane's jax interface) runs on the GPU when jax has
    one (``jax_gpu``, probed unless given: the tests inject it), its inputs and outputs crossing
    as host arrays; ``cpu`` (lightning.qubit) simulates on the CPU whatever is asked.
    """
    if engine not in ("torch", "torch-real", "jax", "cpu"):
        raise ValueError(f"simulation engine {engine!r}; allowed: torch, torch-real, jax, cpu")
    if device == "cpu" or engine == "torch-real":
        return device, None
    if engine == "cpu":
        return "cpu", f"this simulator runs on the cpu only; requested device {device!r} is not used"
    if device == "mps":
        return "cpu", "complex128 is missing on MPS; simulating on the cpu"
    if engine == "jax":
        if jax_gpu is None:
            jax_gpu = jax_sees_gpu()
        if not jax_gpu:
            return "cpu", f"jax sees no GPU (install a CUDA build of jax); requested device {device!r} is not used"
    return device, None


# ---------------------------------------------------------------------------------------------
# Seeding


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch global state.

    Library code takes explicit generators (:func:`seed_streams`); the global seeds only guard
    third-party code that draws from global state.
    """
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class SeedStream:
    """One named random stream of a run: a child of ``numpy.random.SeedSequence(seed)``.

    The child has spawn key ``(crc32(name),)``: the child that ``SeedSequence(seed).spawn`` gives at
    that index, addressed by name so that adding, removing or reordering streams never shifts the
    others. Children of one seed, of different seeds, and the root ``SeedSequence(seed)`` itself
    are independent streams (numpy hashes entropy and spawn key together), unlike ``seed + k``,
    which makes seed 0's second stream seed 1's first. One stream feeds one consumer.
    """

    def __init__(self, seed: int, name: str):
        self.name = name
        self.sequence = np.random.SeedSequence(seed, spawn_key=(zlib.crc32(name.encode()),))

    def numpy(self) -> np.random.Generator:
        """A numpy Generator (PCG64) on this stream."""
        return np.random.default_rng(self.sequence)

    def ints(self, n: int) -> list[int]:
        """``n`` independent 64-bit integers from this stream (environment reset seeds, torch seeds)."""
        return [int(v) for v in self.sequence.generate_state(n, np.uint64)]

    def int(self) -> int:
        return self.ints(1)[0]

    def torch(self):
        """A torch CPU Generator seeded with :meth:`int`."""
        import torch

        return torch.Generator().manual_seed(self.int())


def seed_streams(seed: int, names: list[str] | tuple[str, ...]) -> dict[str, SeedStream]:
    """The run's named streams (docs/CONVENTIONS.md §1.5); duplicate names are refused."""
    if len(set(names)) != len(names):
        raise ValueError(f"seed stream names must be distinct, got {list(names)}")
    streams = {name: SeedStream(seed, name) for name in names}
    keys = {s.sequence.spawn_key for s in streams.values()}
    if len(keys) != len(streams):  # a crc32 collision between two names: rename one
        raise ValueError(f"seed stream names {list(names)} collide on their spawn keys; rename one")
    return streams


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
