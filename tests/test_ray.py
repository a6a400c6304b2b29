"""The Ray executor on a real two-node Ray cluster, logging to a real `mlflow server`, inside a
network namespace that has only loopback (Ray binds to the machine's outward address otherwise)."""

import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest
from conftest import ROOT

pytestmark = pytest.mark.skipif(
    shutil.which("ip") is None or os.geteuid() != 0 or not sys.platform.startswith("linux"),
    reason="needs Linux, root and iproute2 to create a network namespace (CI has them)")


@pytest.fixture
def loopback_namespace():
    name = f"qmlbench-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), 9)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "delete", name], check=False)


def test_two_node_ray_sweep_matches_the_local_executor(loopback_namespace):
    pytest.importorskip("ray")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(["ip", "netns", "exec", loopback_namespace, sys.executable, str(ROOT / "tests" / "ray_two_node_sweep.py")],
                          capture_output=True, text=True, timeout=1200, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    on_ray, local = result["ray"], result["local"]
    assert on_ray["rc"] == 1 and local["rc"] == 1, on_ray["output"] + local["output"]  # a run failed: exit 1
    expected = {"classical-seed0": "PASSED", "quantum-seed0": "PASSED", "slow-seed0": "TIMED_OUT", "boom-seed0": "FAILED"}
    for executor in (on_ray, local):
        assert {name: run["status"] for name, run in executor["runs"].items()} == expected
    for name, run in on_ray["runs"].items():
        assert run["metrics"] == local["runs"][name]["metrics"], name
        assert run["error"] == local["runs"][name]["error"] or name == "slow-seed0"
    assert on_ray["runs"]["boom-seed0"]["error"] == "RuntimeError: injected failure in boom-seed0 at episode 1"
    assert len({run["node"] for run in on_ray["runs"].values()}) == 2  # spread over both nodes
    assert all(run["node"] is None for run in local["runs"].values())
    refused = result["sqlite_refused"]
    assert refused["rc"] == 2 and "tracking URI sqlite:" in refused["output"] and not refused["db_created"]
