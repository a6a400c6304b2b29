"""The forkserver's first import: tie its life to the sweep's before the slow imports start.

The local executor (:mod:`sweep.executors`) starts a ``forkserver`` that preloads torch, PennyLane, TensorCircuit and MLflow
(seconds) and forks every worker. Its own exit test (end of file on its "alive" pipe) does not
fire while a worker lives, because each worker inherits the pipe's write end; so the forkserver
asks the kernel to kill it when the sweep dies (``PR_SET_PDEATHSIG``), and each worker does the
same with the forkserver as its parent (:func:`sweep.worker.local_worker`). A sweep killed even with
SIGKILL then leaves no process behind and nothing is logged after its death.

This module imports nothing heavy, so the guard is in place within milliseconds of the
forkserver's start. It acts only where ``$QMLBENCH_SWEEP_PID`` is set, which the sweep does in
the forkserver's environment alone (set for its start, then removed); a forkserver whose sweep
died before this ran exits at once.
"""

from __future__ import annotations

import os
import signal
import sys

SWEEP_PID_ENV = "QMLBENCH_SWEEP_PID"


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux; elsewhere nothing)."""
    if sys.platform.startswith("linux"):
        import ctypes

        parent = os.getppid()
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the call
            os._exit(1)


def _guard_forkserver() -> None:
    sweep_pid = os.environ.get(SWEEP_PID_ENV)
    if not sweep_pid or sweep_pid == str(os.getpid()):
        return
    if sweep_pid != str(os.getppid()):  # imported as the forkserver's first preload, so the sweep died already
        os._exit(1)
    die_with_parent()


_guard_forkserver()
