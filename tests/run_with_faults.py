"""``python tests/run_with_faults.py ARGS...``: run.py with the test-only fault-injection plugin
loaded into every worker (see tests/fault_injection.py)."""

import os
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path[:0] = [str(TESTS.parent), str(TESTS)]
# Workers (forkserver children, Ray tasks) find the plugin through PYTHONPATH.
os.environ["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), str(TESTS), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])

import run  # noqa: E402
from sweep import executors  # noqa: E402

if __name__ == "__main__":  # workers import this file as __mp_main__: they must not run a sweep
    executors.WORKER_PLUGINS.append("fault_injection")
    sys.exit(run.main())
