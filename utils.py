"""Shared helpers: device selection, seeding, flattening configs, library versions, MLflow access."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import random
import socket
import sqlite3
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
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


# ---------------------------------------------------------------------------------------------
# MLflow


def resolve_tracking_uri(cli_uri: str | None, config_uri: str | None) -> str:
    """Command line, then the config file, then $MLFLOW_TRACKING_URI, then the local SQLite store."""
    return cli_uri or config_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def check_tracking_uri(uri: str, timeout_s: float = 3.0) -> None:
    """Fail fast (``RuntimeError`` with one line) when a tracking URI cannot work.

    http(s) servers must answer ``/health`` within ``timeout_s``; sqlite paths must be in an
    existing directory. Nothing is created.
    """
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"tracking server {uri} answered /health with HTTP {resp.status}")
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise RuntimeError(f"tracking server {uri} is unreachable ({reason})") from None
    elif uri.startswith("sqlite:///"):
        check_sqlite_store(uri)
    elif uri.startswith(("file:", "./", "/")) or "://" not in uri:
        raise RuntimeError(
            f"tracking URI {uri!r}: file stores are refused by MLflow 3; use sqlite:///PATH.db or http://HOST:PORT"
        )


def check_sqlite_store(uri: str) -> None:
    """Refuse (``RuntimeError``, one line saying what to do) a SQLite store the sweep could not
    use, before anything is written: a missing or unwritable directory, a store file that is not
    a regular file, read-only, not an SQLite database, not an MLflow store, or an MLflow schema
    other than the installed MLflow's. Nothing is created or changed."""
    path = Path(uri[len("sqlite:///") :])
    parent = path.parent if str(path.parent) else Path(".")
    where = f"tracking store {uri}"
    if not parent.is_dir():
        raise RuntimeError(f"{where}: directory {parent} does not exist")
    if not path.exists():
        try:  # root passes permission checks, but not a read-only file system: try it
            with tempfile.TemporaryFile(dir=parent):
                pass
        except OSError as exc:
            raise RuntimeError(f"{where}: cannot create the store in {parent} ({exc.strerror}); "
                               "choose a writable directory with --tracking-uri") from None
        return
    if not path.is_file():
        raise RuntimeError(f"{where}: {path} is not a regular file")
    for file in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        if file.exists() and not os.access(file, os.R_OK | os.W_OK):
            raise RuntimeError(f"{where}: {file} is read-only; make it writable (chmod u+rw {file}) or use another store")
    if not os.access(parent, os.W_OK):  # SQLite writes its journal beside the file
        raise RuntimeError(f"{where}: directory {parent} is read-only; SQLite needs to write its journal there")
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            revision = db.execute("SELECT version_num FROM alembic_version").fetchone() if "alembic_version" in tables else None
    except sqlite3.DatabaseError as exc:
        raise RuntimeError(f"{where}: {path} is not a usable SQLite database ({exc}); "
                           f"move it aside (mv {path} {path}.broken) and run again for a new store") from None
    if not tables:  # an empty file: MLflow creates its tables
        return
    if revision is None or "experiments" not in tables:
        raise RuntimeError(f"{where}: {path} is an SQLite database but not an MLflow store; use another file")
    head, known = mlflow_schema_revisions()
    if revision[0] != head:
        if revision[0] in known:
            raise RuntimeError(f"{where}: the store's schema is out of date (revision {revision[0]}, this MLflow needs {head}); "
                               f"back it up, then upgrade it: mlflow db upgrade {uri}")
        raise RuntimeError(f"{where}: the store was written by another MLflow version (schema revision {revision[0]} "
                           f"is unknown to MLflow {library_versions()['mlflow']}); use that version or another store")


def mlflow_schema_revisions() -> tuple[str, set[str]]:
    """The installed MLflow's newest SQL schema revision and every revision it can upgrade from."""
    import mlflow
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory(str(Path(mlflow.__file__).parent / "store" / "db_migrations"))
    return scripts.get_current_head(), {rev.revision for rev in scripts.walk_revisions()}


class RetryingClient:
    """An ``MlflowClient`` whose calls retry when SQLite reports "database is locked".

    With ``--jobs N`` several processes write one SQLite file; WAL mode (:func:`prepare_store`)
    lets readers and one writer work at once, and a writer that still finds the file locked
    waits with exponential backoff (50 ms doubling to 2 s, about 30 s in all) instead of losing
    the metric. ``retries`` counts the waits.
    """

    LOCKED = ("database is locked", "database table is locked")

    def __init__(self, client, attempts: int = 20, first_delay_s: float = 0.05, max_delay_s: float = 2.0):
        self._client = client
        self._attempts, self._first, self._max = attempts, first_delay_s, max_delay_s
        self.retries = 0

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            delay = self._first
            for attempt in range(self._attempts):
                try:
                    return attr(*args, **kwargs)
                except Exception as exc:
                    if attempt == self._attempts - 1 or not any(text in str(exc) for text in self.LOCKED):
                        raise
                self.retries += 1
                time.sleep(delay * (1 + random.random()))
                delay = min(2 * delay, self._max)

        return call


def mlflow_client(uri: str) -> RetryingClient:
    from mlflow.tracking import MlflowClient

    return RetryingClient(MlflowClient(tracking_uri=uri))


def prepare_store(uri: str) -> None:
    """Put a SQLite store in WAL mode (persistent in the file), so parallel runs can log at once."""
    if uri.startswith("sqlite:///"):
        import sqlite3

        with contextlib.closing(sqlite3.connect(uri[len("sqlite:///") :], timeout=30)) as db:
            db.execute("PRAGMA journal_mode=WAL")


# ---------------------------------------------------------------------------------------------
# Which process owns a run (to tell a dead sweep's RUNNING runs from a live one's)


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _process_start(pid: int) -> str | None:
    """Start time of process ``pid`` (clock ticks since boot, Linux; "" on systems without /proc),
    or None when there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except OSError:
        pass
    if Path("/proc").is_dir():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return ""


def process_owner() -> str:
    """``host|boot id|pid|start time`` of this process: the ``sweep.owner`` tag of its runs."""
    pid = os.getpid()
    return f"{socket.gethostname()}|{_boot_id()}|{pid}|{_process_start(pid) or ''}"


def is_local_node(node: dict) -> bool:
    """Whether a Ray node (an entry of ``ray.nodes()``) runs on this machine."""
    address = node.get("NodeManagerAddress", "")
    try:
        local = {"127.0.0.1", "localhost", socket.gethostname()} | set(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        local = {"127.0.0.1", "localhost", socket.gethostname()}
    return address in local or node.get("NodeManagerHostname") == socket.gethostname()


def owner_alive(owner: str, heartbeat: float | None, stale_after_s: float = 300.0) -> bool:
    """Whether the sweep process ``owner`` (from :func:`process_owner`) still runs.

    Same host: the same boot, and a process with that pid and start time (a reboot or a reused
    pid means dead). Another host: its last heartbeat is less than ``stale_after_s`` old.
    """
    try:
        host, boot, pid, start = owner.split("|")
    except ValueError:
        return False
    if host != socket.gethostname():
        return heartbeat is not None and time.time() - heartbeat < stale_after_s
    if boot != _boot_id():
        return False
    now_start = _process_start(int(pid))
    return now_start is not None and (now_start == start or "" in (start, now_start))


def get_or_create_experiment(client, name: str, attempts: int = 5) -> str:
    """The experiment's id, created if needed. The first call creates a new store's tables; when
    another process (``mlflow ui``, a second sweep) creates them at the same moment, MLflow fails
    in one of the two, so that one waits and tries again."""
    for attempt in range(attempts):
        try:
            return _get_or_create_experiment(client, name)
        except Exception as exc:
            text = str(exc)
            if attempt == attempts - 1 or not ("already exists" in text or "migration" in text.lower()):
                raise
            time.sleep(1.0 + random.random())
    raise AssertionError("unreachable")


def _get_or_create_experiment(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    return client.create_experiment(name)


def log_params(client, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100], synchronous=True)


def log_metrics(client, run_id: str, metrics: dict[str, float], step: int) -> None:
    """Log finite metrics at ``step`` in one synchronous batch (None and NaN are skipped)."""
    from mlflow.entities import Metric

    now_ms = int(time.time() * 1000)
    items = [Metric(k, float(v), now_ms, step) for k, v in metrics.items() if v is not None and np.isfinite(v)]
    if items:
        client.log_batch(run_id, metrics=items, synchronous=True)
