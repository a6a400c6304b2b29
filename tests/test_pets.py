"""PETS (issue 15): the batched ensemble, its loss, the known Pendulum reward, the CEM planner,
the config's refusals and a tiny deterministic end-to-end run."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from pydantic import ValidationError

from mbrl.cem import CEMPlanner, trajectory_returns
from mbrl.config import PETSConfig
from mbrl.ensemble import GaussianEnsemble, gaussian_nll, soft_clamp_logvar
from mbrl.pets import pendulum_reward, train_pets
from train import NullReporter


def _ensemble(size=4, hidden=16, seed=0, dtype=torch.float64):
    ens = GaussianEnsemble(size, 4, 3, hidden, 2, generator=torch.Generator().manual_seed(seed)).to(dtype)
    with torch.no_grad():
        ens.in_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
        ens.in_std.copy_(torch.tensor([0.5, 0.7, 2.0, 1.5]))
    return ens


def test_vmapped_ensemble_equals_loop_over_members():
    ens = _ensemble()
    x = torch.randn(4, 33, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mean, logvar = ens(x)
    ref_mean, ref_logvar = ens.forward_member_loop(x)
    assert mean.shape == (4, 33, 3)
    torch.testing.assert_close(mean, ref_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(logvar, ref_logvar, rtol=0, atol=1e-12)
    vmap_mean, vmap_logvar = ens.forward_vmap(x)  # torch.func's batched call agrees too
    torch.testing.assert_close(mean, vmap_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(logvar, vmap_logvar, rtol=0, atol=1e-12)
    # gradients through the baddbmm path equal the member loop's
    g = torch.autograd.grad(ens(x)[0].sum() + ens(x)[1].sum(), list(ens.params.values()))
    g_ref = torch.autograd.grad(sum(t.sum() for t in ens.forward_member_loop(x)), list(ens.params.values()))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    # the members differ (each has its own weights): the batch is not one member repeated
    assert not torch.allclose(mean[0], mean[1])


def test_member_parameters_are_independent_and_seeded():
    a, b, c = _ensemble(seed=3), _ensemble(seed=3), _ensemble(seed=4)
    for (name, p), q, r in zip(a.stacked().items(), b.stacked().values(), c.stacked().values()):
        assert torch.equal(p, q), name
        assert not torch.equal(p, r), name
    # member 2's loss moves only member 2's weights
    x = torch.randn(4, 8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.randn(4, 8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    a.nll(x, y)[2].backward()
    for name, p in a.stacked().items():
        for m in range(4):
            assert (p.grad[m].abs().sum() > 0) == (m == 2), (name, m)


def test_nll_gradient_matches_analytic():
    mean = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64, requires_grad=True)
    logvar = torch.tensor([-1.0, 0.5, 0.0], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0.0, 1.0, 2.5], dtype=torch.float64)
    nll = gaussian_nll(mean, logvar, y)
    var = logvar.detach().exp()
    expected = 0.5 * (logvar.detach() + (y - mean.detach()) ** 2 / var + math.log(2 * math.pi))
    torch.testing.assert_close(nll.detach(), expected)
    nll.sum().backward()
    torch.testing.assert_close(mean.grad, (mean.detach() - y) / var)
    torch.testing.assert_close(logvar.grad, 0.5 * (1 - (y - mean.detach()) ** 2 / var))


def test_soft_clamp_keeps_logvar_within_learned_bounds():
    hi, lo = torch.tensor([0.5]), torch.tensor([-10.0])
    raw = torch.tensor([-1e4, -50.0, -3.0, 0.0, 50.0, 1e4])
    out = soft_clamp_logvar(raw, hi, lo)
    # the usual two-sided soft clamp overshoots the upper bound by softplus's tail, exp(-(hi - lo))
    assert torch.all(out <= hi + 1e-4) and torch.all(out >= lo)
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    assert out[2].item() == pytest.approx(-10.0 + sp(0.5 - sp(0.5 + 3.0) + 10.0), abs=1e-6)
    assert abs(out[2].item() + 3.0) < 0.05  # inside the bounds it is near the identity
    raw = torch.zeros(1, requires_grad=True)
    hi = torch.tensor([0.5], requires_grad=True)
    soft_clamp_logvar(raw, hi, lo).sum().backward()
    assert hi.grad.item() > 0 and raw.grad.item() > 0  # the bound is learned: gradient reaches it


def test_ensemble_learns_the_noise_level():
    """Fitted to y = A x + N(0, 0.1^2) noise, each member's predicted variance approaches 0.01."""
    gen = torch.Generator().manual_seed(0)
    ens = _ensemble(size=2, hidden=32, dtype=torch.float32)
    ens.fit_normalizer(torch.rand(4096, 4, generator=gen) * 2 - 1)
    A = torch.randn(4, 3, generator=gen)
    opt = torch.optim.Adam(ens.parameters(), lr=3e-3)
    for _ in range(600):
        x = torch.rand(2, 128, 4, generator=gen) * 2 - 1
        y = x @ A + 0.1 * torch.randn(2, 128, 3, generator=gen)
        loss = ens.loss(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = torch.rand(2, 512, 4, generator=gen) * 2 - 1
    mean, logvar = ens(x)
    assert ((mean - x @ A) ** 2).mean().item() < 0.005  # about 1.5 at initialisation
    assert abs(logvar.mean().item() - math.log(0.01)) < 0.5, logvar.mean().item()


def test_reward_equals_gymnasium_pendulum_reward():
    env = gym.make("Pendulum-v1").unwrapped
    env.reset(seed=0)
    rng = np.random.default_rng(7)
    obs_list, acts, rewards = [], [], []
    for _ in range(200):
        th, thdot, u = rng.uniform(-3 * np.pi, 3 * np.pi), rng.uniform(-8, 8), rng.uniform(-3, 3)
        env.state = np.array([th, thdot])
        obs = env._get_obs()
        _, r, *_ = env.step(np.array([u], dtype=np.float32))
        obs_list.append(obs)
        acts.append([u])
        rewards.append(r)
    ours = pendulum_reward(torch.tensor(np.array(obs_list), dtype=torch.float64), torch.tensor(acts, dtype=torch.float64))
    np.testing.assert_allclose(ours.numpy(), np.array(rewards), rtol=1e-5, atol=1e-5)


def test_cem_finds_optimum_of_quadratic():
    target = torch.tensor([[0.7, -1.3], [1.5, 0.2], [-0.4, 1.9], [0.0, -2.5]])
    lo, hi = torch.full((2,), -3.0), torch.full((2,), 3.0)
    planner = CEMPlanner(horizon=4, population=300, elites=30, iterations=20, lower=lo, upper=hi, alpha=0.1)
    best = planner.optimize(lambda a: -((a - target) ** 2).sum(dim=(1, 2)), planner.initial_mean(),
                            torch.Generator().manual_seed(0))
    torch.testing.assert_close(best, target, rtol=0, atol=2e-2)
    # an optimum outside the box is found on its boundary
    far = torch.full((4, 2), 10.0)
    best = planner.optimize(lambda a: -((a - far) ** 2).sum(dim=(1, 2)), planner.initial_mean(), torch.Generator().manual_seed(0))
    torch.testing.assert_close(best, torch.full((4, 2), 3.0), rtol=0, atol=2e-2)


def test_trajectory_sampling_uses_member_per_particle():
    """A zero-variance ensemble whose member m predicts the constant change (0, 0, m): with horizon 2,
    particle p (member p % E) reaches th_dot = m, and the return is reward(s0, a0) plus the particle
    average of reward(s1, a1)."""
    e = 3
    ens = GaussianEnsemble(e, 4, 3, 4, 1).double()
    with torch.no_grad():
        for name, p in ens.stacked().items():
            p.zero_()
            if name == "2.bias":  # the output layer's bias: mean part then raw log-variance part
                for m in range(e):
                    p[m] = torch.tensor([0.0, 0.0, float(m), -1e3, -1e3, -1e3])
        ens.min_logvar.fill_(-60.0)
    obs = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    actions = torch.tensor([[[0.5], [1.0]], [[0.0], [-2.0]]], dtype=torch.float64)
    got = trajectory_returns(ens, pendulum_reward, obs, actions, particles=6, generator=torch.Generator().manual_seed(0))
    for i in range(2):
        first = pendulum_reward(obs, actions[i, 0])
        second = torch.stack([pendulum_reward(torch.tensor([1.0, 0.0, float(m)], dtype=torch.float64), actions[i, 1]) for m in range(e)]).mean()
        torch.testing.assert_close(got[i], first + second, rtol=0, atol=1e-9)


@pytest.mark.parametrize("kwargs, field", [
    ({"elites": 300, "population": 200}, "elites"),
    ({"horizon": 0}, "horizon"),
    ({"population": -1}, "population"),
    ({"iterations": 0}, "iterations"),
    ({"particles": 7, "ensemble_size": 5}, "particles"),
    ({"seed_steps": 600, "env_steps": 500}, "seed_steps"),
])
def test_config_refuses_settings_that_cannot_plan(kwargs, field):
    with pytest.raises(ValidationError) as info:
        PETSConfig(**kwargs)
    errors = info.value.errors()
    assert len(errors) == 1
    message = errors[0]["msg"]
    assert field in message or field in errors[0]["loc"], errors[0]
    assert "\n" not in message


def test_config_defaults_are_valid_and_strict():
    cfg = PETSConfig()
    assert cfg.elites <= cfg.population and cfg.particles % cfg.ensemble_size == 0
    with pytest.raises(ValidationError):
        PETSConfig(horizon_steps=3)


def _tiny(**kw):
    base = dict(env_steps=300, seed_steps=200, ensemble_size=2, hidden=16, layers=2, epochs=2, horizon=4,
                population=16, elites=4, iterations=2, particles=2, eval_episodes=1)
    return PETSConfig(**{**base, **kw})


def test_tiny_run_is_deterministic_per_seed():
    class Recorder(NullReporter):
        def __init__(self):
            self.logged = []

        def metrics(self, values, step):
            self.logged.append((step, dict(values)))

    cfg = _tiny()
    rec = Recorder()
    a, b, c = (train_pets(cfg, s, r) for s, r in ((0, rec), (0, NullReporter()), (1, NullReporter())))
    assert [step for step, _ in rec.logged] == [200, 300, 300]
    assert {"pets/episode_return", "pets/model_nll_holdout", "pets/ensemble_disagreement"} <= set(rec.logged[0][1])
    assert "pets/plan_ms_per_step" in rec.logged[1][1]
    assert rec.logged[2][1] == {"eval/return": a.final_metrics()["final/eval_return"]}
    timing = {"final/plan_ms_per_step", "final/plan_ms_per_step_median", "final/plan_cpu_ms_per_step", "final/train_s"}
    fa, fb, fc = ({k: v for k, v in r.final_metrics().items() if k not in timing} for r in (a, b, c))
    assert fa == fb
    assert fa != fc
    assert fa["final/env_steps"] == 300 and a.final_step == 300
    assert a.episode_end_steps == [200, 300]
    assert len(a.plan_ms) == len(a.plan_cpu_ms) == 100  # planned steps: those after the 200 random seed steps
    assert math.isfinite(fa["final/eval_return"]) and math.isfinite(fa["final/model_nll_holdout"])
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert set(a.figures("t")) == {"pets_learning.png"}


def test_train_pets_reads_experiment_section_and_refuses_resume():
    class Exp:
        pets = _tiny(env_steps=200, seed_steps=200)
    with pytest.raises(ValueError, match="resume"):
        train_pets(Exp(), 0, NullReporter(), resume={"x": 1})
    with pytest.raises(ValueError, match="PETSConfig"):
        train_pets(object(), 0, NullReporter())


def test_pets_is_an_algorithm_of_the_pendulum_task():
    """`algorithm: pets` on `task: pendulum` validates, refuses a circuit backend, and trains through
    the task registry (train.train), the same as a PETSConfig given directly."""
    from config_schema import ConfigError, load_config
    from train import train

    tiny = _tiny(env_steps=200, seed_steps=200).model_dump()
    raw = {"experiments": [{"name": "p", "task": "pendulum", "algorithm": "pets", "backend": "classical",
                            "gradient": "backprop", "pets": tiny}]}
    exp = load_config(raw=raw).experiments[0]
    assert exp.total_steps == 200 and "control" not in __import__("config_schema").applicable_fields(exp)
    via_task = train(exp, 0).final_metrics()
    direct = train_pets(_tiny(env_steps=200, seed_steps=200), 0, NullReporter()).final_metrics()
    assert via_task["final/eval_return"] == direct["final/eval_return"] and via_task["final/env_steps"] == 200
    raw["experiments"][0].update(backend="tensorcircuit")
    with pytest.raises(ConfigError, match="PETS's ensemble is classical"):
        load_config(raw=raw)
