"""Dyna (MBPO-style SAC with model rollouts, mbrl/dyna.py): the mixed replay sampling, the rollout
length schedule, the rollouts against the ensemble's own prediction, config errors, a tiny run
deterministic per seed, and run.py end to end."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import ROOT, experiment
from pydantic import ValidationError

from config_schema import ConfigError, load_config
from mbrl.config import DynaConfig
from mbrl.dyna import DynaCallback, MixedReplayBuffer, ModelBuffer, model_rollouts, rollout_length
from mbrl.ensemble import GaussianEnsemble
from mbrl.pets import pendulum_reward
from train import NullReporter, train

OBS_SPACE = gym.spaces.Box(-8.0, 8.0, (3,), np.float32)
ACT_SPACE = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)


def _buffer(real_ratio: float, real_rows: int = 40, model_rows: int = 30) -> MixedReplayBuffer:
    """Real rows have observation[0] = +1 and reward 1, model rows observation[0] = -1 and reward -1."""
    buf = MixedReplayBuffer(100, OBS_SPACE, ACT_SPACE, device="cpu", real_ratio=real_ratio, model_buffer_size=50)
    for i in range(real_rows):
        obs = np.array([[1.0, i, 0.0]], dtype=np.float32)
        buf.add(obs, obs, np.zeros((1, 1), np.float32), np.ones(1, np.float32), np.zeros(1, bool), [{}])
    if model_rows:
        rows = np.arange(model_rows, dtype=np.float32)
        obs = np.stack([-np.ones_like(rows), rows, rows], axis=1)
        buf.model.extend(obs, np.zeros((model_rows, 1), np.float32), -np.ones(model_rows, np.float32), obs + 1)
    return buf


@pytest.mark.parametrize("ratio, batch, n_real", [(0.25, 16, 4), (0.05, 256, 13), (0.5, 7, 4), (1.0, 32, 32), (0.01, 10, 0)])
def test_mixed_sampler_returns_exactly_the_requested_split(ratio, batch, n_real):
    np.random.seed(0)
    buf = _buffer(ratio)
    assert buf.split(batch) == (n_real, batch - n_real)
    s = buf.sample(batch)
    assert s.observations.shape == (batch, 3) and s.rewards.shape == (batch, 1) and s.dones.shape == (batch, 1)
    real = s.observations[:, 0] == 1
    assert real.tolist() == [True] * n_real + [False] * (batch - n_real)  # real rows first, exactly n_real
    assert torch.equal(s.rewards[:, 0], torch.where(real, 1.0, -1.0))
    assert torch.equal(s.next_observations[~real], s.observations[~real] + 1)  # a model row keeps its own next state
    assert not s.dones.any()


def test_mixed_sampler_is_all_real_while_the_model_buffer_is_empty():
    np.random.seed(0)
    buf = _buffer(0.1, model_rows=0)
    assert buf.split(64) == (64, 0)
    assert bool((buf.sample(64).observations[:, 0] == 1).all())


def test_model_buffer_is_a_ring_that_keeps_the_newest_rows():
    buf = ModelBuffer(5, 1, 1)

    def rows(a, b):
        x = np.arange(a, b, dtype=np.float32)[:, None]
        return x, x, x[:, 0], x

    buf.extend(*rows(0, 3))
    assert len(buf) == 3 and buf.observations[:3, 0].tolist() == [0, 1, 2]
    buf.extend(*rows(3, 7))  # wraps: 5 and 6 overwrite 0 and 1
    assert len(buf) == 5 and buf.full and buf.pos == 2
    assert buf.observations[:, 0].tolist() == [5, 6, 2, 3, 4] and buf.rewards[:, 0].tolist() == [5, 6, 2, 3, 4]
    buf.extend(*rows(10, 22))  # more than the capacity: only the newest 5 survive
    assert sorted(buf.observations[:, 0].tolist()) == [17, 18, 19, 20, 21]


def test_rollout_length_schedule():
    cfg = DynaConfig(k_min=1, k_max=15, schedule_start=1000, schedule_end=5000)
    steps = [0, 1000, 1001, 3000, 4999, 5000, 20_000]
    # int(1 + (step - 1000) / 4000 * 14): 1001 -> 1.0035, 3000 -> 8, 4999 -> 14.9965
    assert [rollout_length(s, cfg) for s in steps] == [1, 1, 1, 8, 14, 15, 15]
    fixed = DynaConfig(k_min=3, k_max=3, schedule_start=0, schedule_end=10)
    assert {rollout_length(s, fixed) for s in range(0, 30, 3)} == {3}


def _zero_variance_ensemble(size=3, seed=0) -> GaussianEnsemble:
    """Distinct random members whose predicted variance is forced to zero (log-variance near -60)."""
    ens = GaussianEnsemble(size, 4, 3, 16, 2, generator=torch.Generator().manual_seed(seed)).double()
    with torch.no_grad():
        ens.max_logvar.fill_(-60.0)
        ens.min_logvar.fill_(-70.0)
        ens.in_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
        ens.in_std.copy_(torch.tensor([0.5, 0.7, 2.0, 0.6]))
    return ens


def test_rollouts_follow_the_ensemble_mean_when_the_variance_is_zero():
    """Recomputed step by step with the member-by-member forward (not the vmapped one): every row's
    next state is the state plus the mean of the member that the rollout says predicted it."""
    ens = _zero_variance_ensemble()

    def policy(s):
        return torch.tanh(s[:, :1] + 0.5 * s[:, 2:3])

    start = torch.randn(7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = model_rollouts(ens, policy, pendulum_reward, start, 4, torch.Generator().manual_seed(2))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "observations": (28, 3), "actions": (28, 1), "rewards": (28,), "next_observations": (28, 3), "members": (28,)}
    assert len(set(out["members"].tolist())) == 3  # every member serves some rows
    state = start
    for t in range(4):
        rows = slice(7 * t, 7 * (t + 1))
        action = policy(state)
        mean, _ = ens.forward_member_loop(torch.cat([state, action], -1).expand(3, -1, -1))
        expected = state + mean[out["members"][rows], torch.arange(7)]
        torch.testing.assert_close(out["observations"][rows], state, rtol=0, atol=1e-9)
        torch.testing.assert_close(out["actions"][rows], action, rtol=0, atol=1e-9)
        torch.testing.assert_close(out["rewards"][rows], pendulum_reward(state, action), rtol=0, atol=1e-9)
        torch.testing.assert_close(out["next_observations"][rows], expected, rtol=0, atol=1e-9)
        state = expected
    # with the variance restored the same draw of members gives different next states
    with torch.no_grad():
        ens.max_logvar.fill_(0.0)
        ens.min_logvar.fill_(-1.0)
    noisy = model_rollouts(ens, policy, pendulum_reward, start, 1, torch.Generator().manual_seed(2))
    assert not torch.allclose(noisy["next_observations"], out["next_observations"][:7], atol=1e-3)


def test_callback_reward_unscales_sb3_actions_to_torques():
    cb = DynaCallback(DynaConfig(), 0, NullReporter(), 3, 1, np.array([-2.0], np.float32), np.array([2.0], np.float32))
    obs = torch.tensor([[0.6, 0.8, -1.5], [-1.0, 0.0, 3.0]])
    scaled = torch.tensor([[0.5], [-1.0]])
    torch.testing.assert_close(cb._reward(obs, scaled), pendulum_reward(obs, torch.tensor([[1.0], [-2.0]])))


@pytest.mark.parametrize("kwargs, field", [
    ({"real_ratio": 0.0}, "real_ratio"),
    ({"real_ratio": 1.5}, "real_ratio"),
    ({"k_min": 5, "k_max": 3}, "k_min"),
    ({"k_min": 0}, "k_min"),
    ({"k_max": 0}, "k_max"),
    ({"schedule_start": 4000, "schedule_end": 1000}, "schedule_start"),
    ({"schedule_start": -1}, "schedule_start"),
    ({"model_train_every": 0}, "model_train_every"),
    ({"rollouts_per_step": 0}, "rollouts_per_step"),
    ({"model_buffer_size": 0}, "model_buffer_size"),
])
def test_config_refuses_settings_that_cannot_work(kwargs, field):
    with pytest.raises(ValidationError) as info:
        DynaConfig(**kwargs)
    errors = info.value.errors()
    assert len(errors) == 1
    assert field in errors[0]["msg"] or field in errors[0]["loc"], errors[0]
    assert "\n" not in errors[0]["msg"]


TINY = {"task": "pendulum", "algorithm": "dyna", "backend": "classical", "gradient": "backprop",
        "model": {"hidden_sizes": [8]},
        "control": {"total_steps": 300, "learning_starts": 50, "batch_size": 16, "critic_net_arch": [16],
                    "eval_every": 1000, "checkpoint_every": 100},
        "dyna": {"model_train_every": 100, "rollouts_per_step": 2, "k_min": 1, "k_max": 2, "schedule_start": 0,
                 "schedule_end": 300, "epochs": 1, "hidden": 16, "layers": 2, "ensemble_size": 2, "real_ratio": 0.5}}


def test_dyna_config_errors_through_the_loader():
    with pytest.raises(ConfigError, match="Dyna's ensemble and actor are classical"):
        load_config(raw={"experiments": [{**TINY, "name": "d", "backend": "tensorcircuit"}]})
    with pytest.raises(ConfigError, match="real_ratio"):
        load_config(raw={"experiments": [{**TINY, "name": "d", "dyna": {"real_ratio": 0}}]})
    with pytest.raises(ConfigError, match="rollout_len"):
        load_config(raw={"experiments": [{**TINY, "name": "d", "dyna": {"rollout_len": 3}}]})
    exp = experiment(**{**TINY, "name": "d"})
    data = __import__("config_schema").applicable_fields(exp)
    assert "dyna" in data and "control" in data and "pets" not in data


def test_tiny_dyna_run_is_deterministic_per_seed():
    class Recorder(NullReporter):
        def __init__(self):
            self.logged = []

        def metrics(self, values, step):
            self.logged.append((step, dict(values)))

    rec = Recorder()
    exp = experiment(**{**TINY, "name": "d"})
    a, b, c = (train(exp, s, r) for s, r in ((0, rec), (0, NullReporter()), (1, NullReporter())))
    fits = [(step, v) for step, v in rec.logged if "dyna/model_transitions" in v]
    # fits at 100, 200, 300; rollout length int(1 + step / 300) = 1, 1, 2; 2 * 100 rollouts each
    assert [s for s, _ in fits] == [100, 200, 300]
    assert [v["dyna/rollout_length"] for _, v in fits] == [1, 1, 2]
    assert [v["dyna/model_transitions"] for _, v in fits] == [200, 400, 800]
    assert all(math.isfinite(v["dyna/model_nll_holdout"]) and v["dyna/ensemble_disagreement"] > 0 for _, v in fits)
    assert any("eval/return" in v for _, v in rec.logged) and any("rollout/episode_return" in v for _, v in rec.logged)
    timing = {"final/train_s"}
    fa, fb, fc = ({k: v for k, v in r.final_metrics().items() if k not in timing} for r in (a, b, c))
    assert fa == fb and fa != fc
    assert fa["final/env_steps"] == 300 and fa["final/model_transitions"] == 800 and fa["final/model_fits"] == 3
    assert fa["final/updates"] == 250  # SB3's loop: one gradient step per env step after learning_starts
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # the model rows reach SAC's batches: all-real batches train a different actor from the same seed
    real_only = train(experiment(**{**TINY, "name": "r", "dyna": {**TINY["dyna"], "real_ratio": 1.0}}), 0, NullReporter())
    assert any(not torch.equal(sa[k], real_only.state_dict()[k]) for k in sa if k.startswith("actor."))


def test_pendulum_mbrl_config_has_classical_dyna():
    cfg = load_config(ROOT / "configs" / "pendulum_mbrl.yaml")
    by_name = {e.name: e for e in cfg.experiments}
    assert by_name["classical_dyna"].algorithm == "dyna" and by_name["classical_pets"].algorithm == "pets"
    assert by_name["classical_dyna"].control.total_steps == by_name["classical_pets"].pets.env_steps


def test_dyna_through_run_py(tmp_path):
    """``python run.py`` on a Dyna config: PASSED, the final metrics and the model metrics in MLflow."""
    import os
    import subprocess
    import sys

    import yaml
    from mlflow.tracking import MlflowClient

    fields = {**TINY, "name": "dyna", "timeout_s": 300}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"mlflow": {"experiment_name": "e2e"}, "experiments": [fields]}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "-c", "sweep.yaml"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment_id = client.get_experiment_by_name("e2e").experiment_id
    (run,) = [r for r in client.search_runs([experiment_id]) if r.info.run_name == "dyna-seed0"]
    assert run.data.tags["status"] == "PASSED"
    assert run.data.metrics["final/env_steps"] == 300 and run.data.metrics["final/model_transitions"] == 800
    assert math.isfinite(run.data.metrics["final/eval_return"])
    direct = train(experiment(**{**TINY, "name": "d"}), 0, NullReporter())
    assert run.data.metrics["final/eval_return"] == direct.final_eval_return
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "dyna/model_nll_holdout")]
    assert sorted(steps) == [100, 200, 300]
