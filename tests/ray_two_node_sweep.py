"""Helper of tests/test_ray.py, run inside a network namespace that has only loopback.

Starts a real `mlflow server` and a two-node Ray cluster (ray.cluster_utils.Cluster: a head and
one added node, both on 127.0.0.1), runs the same 4-run sweep (two that pass, one that times out,
one that raises) with the Ray executor and with the local executor, and prints as JSON what
MLflow holds for each: status, metric keys and Ray node of every run, plus exit codes and wall
times. Everything it starts is stopped before it exits, also on failure.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SWEEP = {
    "mlflow": {"experiment_name": "two-node"},
    "defaults": {"algorithm": "dqn", "backend": "classical", "gradient": "backprop", "timeout_s": 120,
                 "model": {"hidden_sizes": [8], "n_qubits": 2, "n_layers": 1},
                 "training": {"episodes": 4, "dqn": {"batch_size": 8}}, "ray": {"num_cpus": 1}},
    "experiments": [
        {"name": "classical"},
        {"name": "quantum", "backend": "tensorcircuit"},
        {"name": "slow", "timeout_s": 20},
        {"name": "boom"},
    ],
}
FAULTS = "slow-seed0:hang,boom-seed0:raise"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sweep(workdir: Path, uri: str, experiment: str, *extra: str) -> tuple[int, float, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QMLBENCH_INJECT_FAULT": FAULTS}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "run_with_faults.py"), "-c", str(workdir / "sweep.yaml"), "--tracking-uri", uri,
                           "--experiment-name", experiment, *extra], cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=900)
    return proc.returncode, time.monotonic() - t0, proc.stdout[-4000:] + proc.stderr[-4000:]


def runs_of(uri: str, experiment: str) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    out = {}
    for run in client.search_runs([client.get_experiment_by_name(experiment).experiment_id]):
        if run.data.tags.get("kind") == "sweep":
            continue
        out[run.info.run_name] = {"status": run.data.tags["status"], "metrics": sorted(run.data.metrics),
                                  "node": run.data.tags.get("ray.node_id"), "error": run.data.tags.get("error")}
    return out


def main() -> None:
    import ray
    from ray.cluster_utils import Cluster

    workdir = Path(tempfile.mkdtemp(prefix="qmlbench-ray-"))
    (workdir / "sweep.yaml").write_text(yaml.safe_dump(SWEEP))
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{workdir}/server.db", "--artifacts-destination", str(workdir / "artifacts")],
        cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    cluster = None
    try:
        uri = f"http://127.0.0.1:{port}"
        t0 = time.monotonic()
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
        cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        cluster_s = time.monotonic() - t0
        deadline = time.monotonic() + 120
        while True:
            try:
                if urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200:
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        ray_rc, ray_s, ray_out = sweep(workdir, uri, "on-ray", "--executor", "ray", "--ray-address", cluster.address,
                                       "--jobs", "4")
        local_rc, local_s, local_out = sweep(workdir, uri, "local", "--jobs", "2")
        sqlite_rc, _, sqlite_out = sweep(workdir, f"sqlite:///{workdir}/refused.db", "refused", "--executor", "ray",
                                         "--ray-address", cluster.address)
        result = {
            "cluster_nodes": len([n for n in ray.nodes() if n.get("Alive")]) if ray.is_initialized() else 2,
            "cluster_start_s": cluster_s, "ray": {"rc": ray_rc, "wall_s": ray_s, "runs": runs_of(uri, "on-ray"), "output": ray_out},
            "local": {"rc": local_rc, "wall_s": local_s, "runs": runs_of(uri, "local"), "output": local_out},
            "sqlite_refused": {"rc": sqlite_rc, "output": sqlite_out, "db_created": (workdir / "refused.db").exists()},
        }
        print(json.dumps(result))
    finally:
        if cluster is not None:
            cluster.shutdown()
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
