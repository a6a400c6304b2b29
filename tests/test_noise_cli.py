"""``python -m noise``: subcommands, --help, one JSON object per task, and one-line errors (exit 2)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def noise_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "noise", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def test_help_lists_the_subcommands():
    proc = noise_cli("--help")
    assert proc.returncode == 0 and "quantiles" in proc.stdout and "fidelity" in proc.stdout, proc.stderr
    sub = noise_cli("fidelity", "--help")
    assert sub.returncode == 0 and "--simulation" in sub.stdout and "--pulse" in sub.stdout


def test_fidelity_prints_one_json_object_per_task(tmp_path):
    pulse = np.zeros((10, 2))
    pulse[:, 0] = np.pi
    np.save(tmp_path / "pi.npy", pulse)
    out = {}
    for simulation in ("filter_function", "trajectories", "markovian"):
        proc = noise_cli("fidelity", "configs/meta_single.yaml", "--pulse", tmp_path / "pi.npy", "--tasks", 3, "--seed", 4,
                         "--simulation", simulation)
        assert proc.returncode == 0, proc.stderr
        records = [json.loads(line) for line in proc.stdout.splitlines()]
        assert len(records) == 3 and all(r["simulation"] == simulation for r in records)
        for r in records:
            assert {"model_type", "alpha", "A", "omega_c", "detuning", "gamma_phi", "gamma_down", "fidelity", "stderr"} <= set(r)
            assert 0 < r["fidelity"] <= 1
        assert (records[0]["stderr"] > 0) == (simulation == "trajectories")
        out[simulation] = records
    # same tasks whatever the model; the pi-file and "pi" give the same numbers
    assert [r["A"] for r in out["markovian"]] == [r["A"] for r in out["trajectories"]]
    same = noise_cli("fidelity", "configs/meta_single.yaml", "--pulse", "pi", "--tasks", 3, "--seed", 4, "--simulation", "markovian")
    assert [json.loads(line)["fidelity"] for line in same.stdout.splitlines()] == [r["fidelity"] for r in out["markovian"]]
    # trajectories agree with the filter function within their error plus the first-order error
    for ff, mc in zip(out["filter_function"], out["trajectories"]):
        assert abs(ff["infidelity"] - mc["infidelity"]) < 5 * mc["stderr"] + 0.5 * ff["infidelity"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["fidelity", "configs/meta_single.yaml", "--pulse", "pi", "--simulation", "exact"], "invalid choice: 'exact'"),
        (["fidelity", "configs/meta_single.yaml", "--pulse", "missing.npy"], "cannot read a .npy array"),
        (["fidelity", "configs/meta_single.yaml", "--pulse", "pi", "--tasks", "0"], "need a positive integer"),
        (["fidelity", "config.yaml", "--pulse", "pi"], "no experiment with task: qubit_meta"),
        (["quantiles", "config.yaml"], "no experiment with task: qubit_meta"),
        (["fidelity", "configs/meta_single.yaml", "--pulse", "pi", "--experiment", "nope"], "allowed: classical_maml, pl_maml, tc_maml"),
        (["fidelity", "no_such.yaml", "--pulse", "pi"], "cannot read config file"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message):
    proc = noise_cli(*args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_bad_pulse_shape_and_too_strong_pulse(tmp_path):
    np.save(tmp_path / "bad.npy", np.zeros((10, 3)))
    proc = noise_cli("fidelity", "configs/meta_single.yaml", "--pulse", tmp_path / "bad.npy")
    assert proc.returncode == 2 and "(n_segments, 2)" in proc.stderr
    np.save(tmp_path / "strong.npy", np.full((10, 2), 100.0))
    proc = noise_cli("fidelity", "configs/meta_single.yaml", "--pulse", tmp_path / "strong.npy")
    assert proc.returncode == 2 and "not well above the largest Rabi frequency" in proc.stderr


def test_quantiles_prints_one_table_per_distinct_distribution(tmp_path):
    proc = noise_cli("quantiles", "configs/meta_mixed.yaml", "--tasks", 300)
    assert proc.returncode == 0, proc.stderr
    # four experiments, two distributions (the detuning-off run has its own)
    assert proc.stdout.count("| quantity |") == 2 and "classical_maml, pl_maml, tc_maml:" in proc.stdout
    config = yaml.safe_load((ROOT / "configs/meta_gap_vs_variance.yaml").read_text())
    config["experiments"] = config["experiments"][:2]
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(config))
    proc = noise_cli("quantiles", tmp_path / "two.yaml", "--tasks", 300)
    assert proc.returncode == 0 and proc.stdout.count("| quantity |") == 2
