"""bench.py end to end on a few pairs: tables, CSV, plot and the MLflow run all agree."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

import bench

ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmark_writes_every_output(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "results"
    only = ["classical/backprop", "tensorcircuit/backprop", "tensorcircuit/spsa"]
    # A process of its own, as users run it (it points jax's persistent cache at a fresh folder).
    proc = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--quick", "--only", *only, "--out", str(out),
                           "--tracking-uri", uri], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    forward = list(csv.DictReader((out / "forward.csv").open()))
    assert [(r["backend"], r["method"], r["batch"]) for r in forward] == [
        (p.split("/")[0], p.split("/")[1], str(b)) for p in ["reference/hand-written", *only] for b in (1, 10, 100)]
    assert all(float(r["x_classical"]) == 1.0 for r in forward if r["backend"] == "classical")
    # every row's distance from the hand-written limit, measured in the same process
    limit = {r["batch"]: float(r["median_ms"]) for r in forward if r["backend"] == "reference"}
    for r in forward:
        assert float(r["x_limit"]) == float(r["median_ms"]) / limit[r["batch"]]
    gradient = {(r["backend"], r["method"]): r for r in csv.DictReader((out / "gradient.csv").open())}
    # circuits per gradient step on 100 transitions: backprop one forward, SPSA (2 x 1 + 1) points
    assert gradient["tensorcircuit", "backprop"]["circuit_evals"] == "100"
    assert gradient["tensorcircuit", "spsa"]["circuit_evals"] == "300"
    assert gradient["reference", "hand-written"]["x_limit"] == "1.0" and float(gradient["tensorcircuit", "backprop"]["x_limit"]) > 0
    scaling = list(csv.DictReader((out / "scaling.csv").open()))
    assert [(r["backend"], r["method"], r["n_qubits"]) for r in scaling] == [
        ("reference", "hand-written", "2"), ("reference", "hand-written", "4"),
        ("tensorcircuit", "backprop", "2"), ("tensorcircuit", "backprop", "4")]
    assert all(int(r["n_compiles"]) >= 2 and float(r["compile_s"]) > 0 for r in scaling)  # cold cache: each shape compiles
    estimators = list(csv.DictReader((out / "estimators.csv").open()))
    assert [int(r["n_params"]) for r in estimators] == [386, 4610]
    assert all(int(r["n_points"]) == 2 * int(r["n_params"]) + 1 and float(r["peak_rss_mb"]) > 50 for r in estimators)
    throughput = {(r["backend"], r["method"]): r for r in csv.DictReader((out / "throughput.csv").open())}
    assert throughput["tensorcircuit", "backprop"]["compiles_after_warmup"] == "0"
    assert float(throughput["classical", "backprop"]["steps_per_s"]) > 0
    assert (out / "bench.png").stat().st_size > 10_000
    text = (out / "bench.md").read_text()
    for heading in ("Policy forward", "One gradient step on 100", "Qubit scaling", "training throughput", "Memory", "Central finite differences"):
        assert heading in text
    assert text in proc.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("benchmarks").experiment_id])
    assert run.data.metrics["gradient_circuit_evals/tensorcircuit/spsa"] == 300
    assert "forward_ms/classical/backprop/batch_100" in run.data.metrics
    assert len(client.get_metric_history(run.info.run_id, "scaling/tensorcircuit/backprop/gradient_ms")) == 2
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {
        "bench.md", "bench.png", "forward.csv", "gradient.csv", "scaling.csv", "throughput.csv", "memory.csv", "estimators.csv"}
    memory = {r["backend"]: r for r in csv.DictReader((out / "memory.csv").open())}
    assert set(memory) == {"classical", "tensorcircuit"} and all(float(r["peak_rss_mb_at_60"]) > 50 for r in memory.values())


def test_unknown_pair_is_one_line_error(capsys, tmp_path):
    assert bench.main(["--only", "tensorcircuit/adjoint", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --only: unknown pair 'tensorcircuit/adjoint'; allowed: classical/backprop")
    assert "\n" not in err and not (tmp_path / "m.db").exists()


def test_unavailable_device_is_one_line_error(capsys, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--device", "cuda", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]) == 2
    assert capsys.readouterr().err.strip() == "error: --device: device 'cuda' requested but torch sees no CUDA device"


@pytest.mark.parametrize("jax_gpu", [False, True])
def test_models_go_where_training_puts_them(monkeypatch, jax_gpu):
    """--device cuda: the MLP goes to the GPU, the jax-simulated circuits where jax has a GPU,
    PennyLane's torch interface stays on the CPU (it fails on CUDA tensors)."""
    import torch

    import models
    import utils

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(utils, "jax_sees_gpu", lambda: jax_gpu)
    moved = []
    monkeypatch.setattr(models.PolicyModel, "to", lambda self, device: moved.append(device) or self, raising=False)
    jax_device = "cuda" if jax_gpu else "cpu"
    for backend, gradient, expected in [("classical", "backprop", "cuda"), ("pennylane-torch", "backprop", "cpu"),
                                        ("tensorcircuit", "backprop", jax_device), ("pennylane", "backprop", jax_device)]:
        _, device = bench.placed_model(bench.reference_experiment(backend, gradient, "cuda"))
        assert device == expected and moved[-1] == expected


def test_ratios_are_to_classical_backprop_at_the_same_key():
    rows = [{"backend": b, "method": m, "batch": n, "t": t} for b, m, n, t in [
        ("classical", "backprop", 1, 2.0), ("classical", "backprop", 10, 4.0), ("pennylane", "backprop", 1, 6.0),
        ("pennylane", "backprop", 10, 6.0)]]
    assert [r["x_classical"] for r in bench.with_ratios(rows, key=("batch",), value="t")] == [1.0, 1.0, 3.0, 1.5]
    assert [r["x_classical"] for r in bench.with_ratios(rows, key=("batch",), value="t", inverse=True)] == [1.0, 1.0, 1 / 3, 4 / 6]
    rows.append({"backend": "reference", "method": "hand-written", "batch": 1, "t": 0.5})
    assert [r["x_limit"] for r in bench.with_limit(rows, key=("batch",), value="t")] == [4.0, None, 12.0, None, 1.0]
