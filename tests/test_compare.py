"""The adaptation comparison (meta/compare.py): its test sets, its shot accounting, the Adapter on
pulse policies, and a tiny end-to-end run that writes the table and the figure."""

import json

import pytest
import torch

from meta.compare import (
    PulseModule,
    adapter_curve,
    context_shots,
    evaluate_result,
    experiment_for,
    heldout_sets,
    run,
    scaled_distribution,
    shots_per_step,
)
from meta.train import train_meta
from train import NullReporter


def test_scaled_distribution_multiplies_strength_and_detuning_only():
    exp = experiment_for("single", "maml", 1, 0)
    dist = exp.meta.noise.distribution()
    wide = scaled_distribution(dist, 10.0)
    assert wide.ranges["gamma_phi"] == pytest.approx((0.1, 2.0)) and wide.ranges["detuning"] == pytest.approx((-10.0, 10.0))
    assert wide.ranges["alpha"] == dist.ranges["alpha"] and wide.ranges["omega_c"] == dist.ranges["omega_c"]
    sets = heldout_sets(exp, 0)
    assert set(sets) == {"in_distribution", "noise_x3", "noise_x10", "heldout_lorentzian"}
    rates = {name: s.gamma_phi.numpy() for name, s in sets.items()}  # Ramsey rates of the drawn tasks
    assert rates["in_distribution"].max() <= 0.2 * (1 + 1e-6) and rates["noise_x10"].min() >= 0.1 * (1 - 1e-6)
    assert rates["noise_x10"].max() > 0.2


def test_shot_accounting():
    maml, ctx = experiment_for("single", "maml", 1, 0), experiment_for("single", "context_mean", 1, 0)
    assert shots_per_step(maml) == 2 * 2 * 10 * 2 * 256 == 20480
    assert context_shots(maml) == 0 and context_shots(ctx) == (5 + 1) * 2 * 256  # probes and the Ramsey token


def test_adapter_on_a_pulse_policy_starts_at_the_unadapted_fidelity_and_keeps_its_trust_region():
    exp = experiment_for("single", "maml", 2, 0, n_tasks=3, baseline_steps=1)
    result = train_meta(exp, 0, NullReporter())
    sets = heldout_sets(exp, 0)
    rows = evaluate_result(result, {"noise_x10": sets["noise_x10"]}, 0, baselines=False)
    curve = adapter_curve(result, sets["noise_x10"], 0.05, 0)
    assert curve["by_call"][0] == pytest.approx(rows["noise_x10"]["by_k"]["0"], abs=1e-12)
    assert curve["by_call"][-1] != curve["by_call"][0]
    module = PulseModule(result.policy, result.theta)
    assert torch.equal(module.theta.detach(), result.theta)


def test_tiny_comparison_writes_table_json_and_figure(tmp_path):
    report = run(tmp_path, iterations=1, seed=0, dists=["single"], methods=["maml", "context_mean"], n_tasks=2, baseline_steps=1)
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert set(saved["results"]) == {"single/maml", "single/context_mean"} == set(report["results"])
    table = (tmp_path / "compare.md").read_text()
    assert "| context_mean, k=0 [3,072] |" in table and "| maml, k=5 [102,400] |" in table and "per-task optimum" in table
    assert (tmp_path / "fidelity_vs_shots.png").stat().st_size > 10_000
