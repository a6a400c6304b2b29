"""Partially observed CartPole (pomdp/cartpole.py): what the policy sees, the three bodies, and a
deterministic PPO smoke run with the SSM body."""

import gymnasium as gym
import numpy as np
import pytest
import torch

from pomdp.cartpole import BODIES, WindowBody, make_env, ppo


def test_the_velocities_are_hidden_and_the_frames_stacked():
    env, full = make_env(3), gym.make("CartPole-v1")
    obs, _ = env.reset(seed=5)
    state, _ = full.reset(seed=5)
    assert obs.shape == (3, 2)
    np.testing.assert_array_equal(obs[-1], state[[0, 2]].astype(np.float32))
    np.testing.assert_array_equal(obs[0], obs[-1])  # the first frame repeated after a reset
    for action in (0, 1, 1):
        obs, *_ = env.step(action)
        state, *_ = full.step(action)
    np.testing.assert_array_equal(obs[-1], state[[0, 2]].astype(np.float32))
    with pytest.raises(ValueError, match="window"):
        make_env(0)


@pytest.mark.parametrize("kind", BODIES)
def test_bodies_read_the_window(kind):
    space = make_env(4).observation_space
    body = WindowBody(space, kind=kind, hidden=16)
    x = torch.randn(5, 4, 2)
    out = body(x)
    assert out.shape == (5, 16) and torch.isfinite(out).all()
    changed = x.clone()
    changed[:, 0] += 1.0  # the oldest frame: every body must see it
    assert not torch.allclose(body(changed), out)


def test_unknown_body_is_refused():
    with pytest.raises(ValueError, match="allowed: mlp, gru, ssm"):
        WindowBody(make_env(2).observation_space, kind="lstm")


def test_ppo_with_the_ssm_body_is_deterministic():
    params = []
    for _ in range(2):
        model = ppo("ssm", 2, seed=3, hidden=8)
        model.learn(total_timesteps=256)
        params.append(torch.cat([p.detach().reshape(-1) for p in model.policy.parameters()]))
    assert torch.equal(params[0], params[1])
    assert sum(p.numel() for p in model.policy.features_extractor.parameters()) > 0


def test_the_body_is_a_config_choice_and_runs_under_run_py(tmp_path):
    from test_run import run_py, runs_by_name

    config = {"mlflow": {"experiment_name": "e2e"},
              "defaults": {"task": "cartpole_pomdp", "backend": "classical", "gradient": "backprop", "timeout_s": 300,
                           "pomdp": {"steps": 512, "hidden": 8, "eval_episodes": 2, "window": 2}},
              "experiments": [{"name": b, "pomdp": {"body": b}} for b in ("mlp", "gru", "ssm")]}
    proc = run_py(tmp_path, config)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client, runs = runs_by_name(tmp_path)
    for body in ("mlp", "gru", "ssm"):
        run = runs[f"{body}-seed0"]
        assert run.data.tags["status"] == "PASSED", run.data.tags.get("error")
        assert run.data.params["pomdp.body"] == body
        m = run.data.metrics
        assert 0 < m["final/eval_return"] <= 500 and m["final/body_params"] > 0
        assert client.get_metric_history(run.info.run_id, "rollout/avg_return_20")
