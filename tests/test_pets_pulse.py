"""Model-based pulse design on QubitPulse-v0 (issue 15, mbrl/pulse.py): the planner finds the
optimum of a reward the ensemble learnt, the config's refusals, exact step and planning counts,
determinism per seed, and a run through run.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from config_schema import ConfigError, load_config
from mbrl.cem import CEMPlanner
from mbrl.config import PulsePETSConfig
from mbrl.ensemble import GaussianEnsemble
from mbrl.ensemble import HoldoutData
from mbrl.pulse import plan_pulse, train_pets_pulse
from train import NullReporter

NOISE = {"dist_type": "log_uniform", "model_types": ["one_over_f"], "simulation": "markovian",
         "ranges": {"alpha": [0.5, 2.0], "gamma_phi": [0.01, 0.2], "omega_c": [0.1, 10.0], "detuning": [-1.0, 1.0]}}


def _experiment(**pets):
    raw = {"experiments": [{
        "name": "p", "task": "qubit_pulse", "algorithm": "pets", "backend": "classical", "gradient": "backprop",
        "meta": {"target_gate": "x", "n_segments": 4, "noise": NOISE, "eval": {"n_tasks": 8},
                 "baselines": {"robust_steps": 20, "optimum_steps": 5, "lr": 0.05}},
        "pets": {"env_steps": 120, "seed_episodes": 5, "epochs": 3, "population": 40, "elites": 8, "iterations": 2,
                 "eval_every": 10, **pets},
    }]}
    return load_config(raw=raw).experiments[0]


def test_planner_finds_the_optimum_of_a_learnt_reward():
    """Trained on noisy samples of r(x) = -|x - x*|^2 over 3 segments x 2 controls, the members'
    mean plan lands on x*, the analytic optimum; each member's plan is near it too."""
    rng = np.random.default_rng(0)
    target = np.array([0.5, -0.3, 0.2, 0.6, -0.7, 0.1])
    cfg = PulsePETSConfig(epochs=150, hidden=64, population=300, elites=30, iterations=6)
    data = HoldoutData(0.0, rng)
    for _ in range(400):
        x = rng.uniform(-1, 1, size=6)
        data.add(x, [-np.sum((x - target) ** 2) + 0.01 * rng.normal()])
    gen = torch.Generator().manual_seed(0)
    ensemble = GaussianEnsemble(3, 6, 1, cfg.hidden, cfg.layers, generator=gen)
    data.fit(ensemble, torch.optim.Adam(ensemble.parameters(), lr=3e-3), cfg.epochs, cfg.batch_size)
    planner = CEMPlanner(3, cfg.population, cfg.elites, cfg.iterations, -torch.ones(2), torch.ones(2), cfg.alpha)
    plan = plan_pulse(ensemble, planner, gen)
    assert plan.shape == (3, 2)
    assert np.abs(plan.numpy().reshape(-1) - target).max() < 0.15
    member_plan = plan_pulse(ensemble, planner, gen, member=1)
    assert np.abs(member_plan.numpy().reshape(-1) - target).max() < 0.25


@pytest.mark.parametrize(("pets", "message"), [
    ({"elites": 50, "population": 40}, "elites \\(50\\) must be at most population \\(40\\)"),
    ({"env_steps": 20}, "field 'pets.env_steps': 20 steps are 5 episodes of 4 segments"),
    ({"horizon": 5}, "horizon"),
    ({"reward": "return"}, "reward"),
])
def test_config_refuses_what_cannot_plan(pets, message):
    with pytest.raises(ConfigError, match=message):
        _experiment(**pets)


def test_circuit_backends_are_refused():
    raw = _experiment().model_dump()
    raw.update(backend="tensorcircuit", name="p")
    with pytest.raises(ConfigError, match="PETS's ensemble is classical"):
        load_config(raw={"experiments": [{k: raw[k] for k in ("name", "task", "algorithm", "backend", "gradient", "meta", "pets")}]})


def test_run_counts_and_determinism():
    class Recorder(NullReporter):
        def __init__(self):
            self.logged = []

        def metrics(self, values, step):
            self.logged.append((step, dict(values)))

    exp = _experiment()
    rec = Recorder()
    a, b, c = (train_pets_pulse(exp, s, r) for s, r in ((0, rec), (0, NullReporter()), (1, NullReporter())))
    # 120 steps = 30 episodes of 4 segments; the first 5 random, then one plan per episode
    assert a.env_steps == 120 and a.final_step == 120 and len(a.episode_rewards) == 30
    assert len(a.plan_ms) == 25
    # the model is trained from the 5th episode on; evaluated then, every 10 episodes, and at the end
    assert [s for s, _ in a.evaluations] == [20, 60, 100, 120]
    assert [s for s, _ in a.holdout_nll] == list(range(20, 121, 4))
    evals = [(s, v) for s, v in rec.logged if "eval/fidelity" in v]
    assert [s for s, _ in evals] == [20, 60, 100, 120]
    timing = {"final/plan_ms_per_episode", "final/train_s"}
    fa, fb, fc = ({k: v for k, v in r.final_metrics().items() if k not in timing} for r in (a, b, c))
    assert fa.keys() == fb.keys() and all(fa[k] == fb[k] or (math.isnan(fa[k]) and math.isnan(fb[k])) for k in fa)
    assert fa["final/fidelity"] != fc["final/fidelity"]
    # the final pulse is the last evaluated one, scored on the same held-out tasks
    assert fa["final/fidelity"] == pytest.approx(a.evaluations[-1][1], rel=1e-12)
    assert 0.0 < fa["final/fidelity"] <= 1.0 and 0.0 < fa["final/fidelity_robust"] <= 1.0
    assert fa["final/gap_to_robust"] == pytest.approx(fa["final/fidelity"] - fa["final/fidelity_robust"])
    assert a.pulse.shape == (4, 2) and float(a.pulse.abs().max()) <= exp.meta.max_amplitude
    steps = a.steps_to_robust()
    assert fa["final/reached_robust"] == float(steps is not None)
    assert steps is None or (steps in [s for s, _ in a.evaluations] and fa["final/steps_to_robust"] == steps)
    assert set(a.figures("t")) == {"pets_pulse_learning.png"}


def test_steps_to_robust_is_the_first_evaluation_at_or_above_it():
    from mbrl.pulse import PulsePETSResult

    result = PulsePETSResult(PulsePETSConfig(), ensemble=None, evaluations=[(10, 0.8), (20, 0.95), (30, 0.97)],
                             fidelity_robust=0.95)
    assert result.steps_to_robust() == 20
    result.fidelity_robust = 0.99
    assert result.steps_to_robust() is None


def test_run_py_logs_the_pulse_run(tmp_path):
    """``python run.py`` on a qubit_pulse pets config: PASSED, the held-out fidelity beside the robust
    pulse in the summary, the steps-to-robust metric, the evaluation curve and the figure in MLflow."""
    import os
    import subprocess
    import sys

    import yaml
    from conftest import ROOT
    from mlflow.tracking import MlflowClient

    exp = _experiment().model_dump(include={"name", "task", "algorithm", "backend", "gradient", "meta", "pets"})
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"mlflow": {"experiment_name": "e2e"}, "experiments": [exp]}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run([sys.executable, str(ROOT / "run.py"), "-c", "sweep.yaml"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "heldout_fidelity" in done.stdout and "fidelity_robust" in done.stdout
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = [r for r in client.search_runs([client.get_experiment_by_name("e2e").experiment_id]) if r.info.run_name == "p-seed0"]
    assert run.data.tags["status"] == "PASSED"
    metrics = run.data.metrics
    assert {"final/fidelity", "final/fidelity_robust", "final/reached_robust", "final/env_steps", "final/eval_return",
            "final/model_nll_holdout"} <= set(metrics)
    assert ("final/steps_to_robust" in metrics) == (metrics["final/reached_robust"] == 1.0)
    assert metrics["final/env_steps"] == 120
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/fidelity")] == [20, 60, 100, 120]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "pets_pulse_learning.png" in artifacts or any("pets_pulse_learning" in p for p in artifacts)
