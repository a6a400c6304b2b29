"""Traced jax functions kept on disk, so a later process skips Python tracing as well as XLA compiling.

jax's persistent compilation cache (``models.enable_jax_compilation_cache``) saves the XLA compile
of a shape, but its key is the lowered module: every process still traces the Python function
first. For the 4-qubit, 5-layer policy that tracing (TensorCircuit's or PennyLane's circuit
construction) was the larger part of a warm start: 1.2-1.4 s of the 2.0-2.4 s that a process with
a warm cache spent on its 4 shapes (jax.monitoring, loaded 2-core machine).

:class:`ExportedFunction` wraps a jitted function of numpy arrays. The first call of a shape in a
process looks for ``<cache>/exported/<key>.bin``: a ``jax.export`` serialisation of the function
at that shape, written by an earlier process. If it is there it is deserialised and called under
``jax.jit`` (its XLA compile then comes from the persistent cache); if not, the function is
exported, written there and called the same way. ``key`` hashes what decides the traced function:
the caller's ``identity`` (class, constructor arguments, its module's source), the shapes and
dtypes, and the jax, jaxlib, TensorCircuit and PennyLane versions, so an edited circuit or an
upgraded library never meets an old trace.

Serialisation needs the ``flatbuffers`` package (requirements.txt). Without it the functions are
traced in every process as before, and a warning says so once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

#: Distributions whose code is traced into the circuits' functions.
TRACED_LIBRARIES = ("jax", "jaxlib", "tensorcircuit-ng", "pennylane")
_warned_missing_flatbuffers = False


def library_versions() -> str:
    out = []
    for name in TRACED_LIBRARIES:
        try:
            out.append(f"{name}={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            out.append(f"{name}=-")
    return ",".join(out)


def serialisation_available() -> bool:
    """Whether jax.export can serialise here (it needs ``flatbuffers``); warns once when not."""
    global _warned_missing_flatbuffers
    try:
        import flatbuffers  # noqa: F401
    except ImportError:
        if not _warned_missing_flatbuffers:
            log.warning("flatbuffers is not installed: traced circuits are not kept across processes "
                        "(pip install -r requirements.txt)")
            _warned_missing_flatbuffers = True
        return False
    return True


class ExportedFunction:
    """``jitted`` (numpy arrays in, a jax array out) with its traces kept under ``folder``.

    ``identity``: a string that changes whenever the function's definition does. Calls with a
    shape seen before in this process go straight to the compiled function.
    """

    def __init__(self, jitted: Callable, identity: str, folder: Path):
        self.jitted = jitted
        self.identity = identity
        self.folder = Path(folder)
        self._by_shape: dict[tuple, Callable] = {}
        self.loaded = 0
        """Shapes whose trace came from disk in this process."""
        self.exported = 0
        """Shapes traced here and written to disk."""

    def key(self, arrays: tuple[np.ndarray, ...], platform: str = "cpu") -> str:
        text = "|".join([self.identity, library_versions(), platform, *(f"{a.shape}:{a.dtype}" for a in arrays)])
        return hashlib.sha256(text.encode()).hexdigest()

    def __call__(self, *arrays: np.ndarray, platform: str = "cpu"):
        """``platform``: jax's name of the platform it runs on (``cpu``, ``cuda``); a trace is
        exported for that platform alone, and the caller places the call there
        (``jax.default_device``)."""
        signature = (platform, *((a.shape, a.dtype.str) for a in arrays))
        fn = self._by_shape.get(signature)
        if fn is None:
            fn = self._by_shape[signature] = self._function_for(arrays, platform)
        return fn(*arrays)

    def _function_for(self, arrays: tuple[np.ndarray, ...], platform: str) -> Callable:
        import jax
        from jax import export

        if not serialisation_available():
            return self.jitted
        path = self.folder / f"{self.key(arrays, platform)}.bin"
        if path.exists():
            try:
                exported = export.deserialize(bytearray(path.read_bytes()))
            except Exception as exc:  # a truncated or foreign file: trace again and overwrite it
                log.warning("unreadable exported trace %s (%s: %s); tracing again", path, type(exc).__name__, exc)
            else:
                self.loaded += 1
                return jax.jit(exported.call)
        exported = export.export(self.jitted, platforms=(platform,))(*(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays))
        self.folder.mkdir(parents=True, exist_ok=True)
        # Written whole or not at all: another process may read it at any moment.
        fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(exported.serialize())
        os.replace(tmp, path)
        self.exported += 1
        return jax.jit(exported.call)
