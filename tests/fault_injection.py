"""Test-only fault injection for sweeps, loaded into workers as a plugin (``sweep.executors.WORKER_PLUGINS``).

Importing this module patches the worker side of a sweep (sweep.worker). ``$QMLBENCH_INJECT_FAULT`` lists
``RUN_NAME:KIND`` items (comma-separated); in the worker of RUN_NAME, after it reported its
first episode:

- ``hang``: block forever inside a C call (only a kill ends it: the hard time limit's test);
- ``raise``: raise RuntimeError;
- ``nan``: the loss of the second update is NaN (the run must end FAILED, naming the episode);
- ``hang-after-checkpoint``: ``hang`` at the first progress report after the run's first checkpoint.

Production code never reads the variable: only ``tests/run_with_faults.py`` loads this plugin.
"""

from __future__ import annotations

import os

import train
from sweep import worker

FAULT_ENV = "QMLBENCH_INJECT_FAULT"


def faults() -> dict[str, str]:
    out = {}
    for item in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        name, _, kind = item.partition(":")
        if kind not in ("hang", "raise", "nan", "hang-after-checkpoint"):
            raise ValueError(f"{FAULT_ENV}: {item!r}; kinds: hang, raise, nan, hang-after-checkpoint")
        out[name] = kind
    return out


def _hang(episode: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None)
    while True:  # pause() returns only when a handled signal arrives
        libc.pause()


def install() -> None:
    reporter = worker.WorkerReporter
    original_init, original_progress, original_checkpoint = reporter.__init__, reporter.progress, reporter.checkpoint

    def __init__(self, client, run_id, run_name, events, logged_through_step=-1):
        original_init(self, client, run_id, run_name, events, logged_through_step)
        self.fault, self.fault_run = faults().get(run_name), run_name
        if self.fault == "nan":
            train.POISON_UPDATE = 2

    def progress(self, episode, total, avg_return):
        original_progress(self, episode, total, avg_return)
        if episode >= 1 and self.fault == "hang":
            _hang(episode)
        if episode >= 1 and self.fault == "raise":
            raise RuntimeError(f"injected failure in {self.fault_run} at episode {episode}")
        if self.fault == "hang-after-checkpoint" and getattr(self, "checkpointed", False):
            _hang(episode)

    def checkpoint(self, state, episode):
        original_checkpoint(self, state, episode)
        self.checkpointed = True

    reporter.__init__, reporter.progress, reporter.checkpoint = __init__, progress, checkpoint


install()
