"""pendulum_meta (issue 15, item 3): the Pendulum family on the real environment, its splits, the
MAML inner step and outer gradient, the Reptile update, the product-of-Gaussians encoder, the
config's refusals and a tiny run end to end through run.py."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from pydantic import ValidationError

from config_schema import ConfigError, load_config
from metarl.config import PARAMETERS, PendulumMetaConfig
from metarl.family import PendulumTask, make_splits
from metarl.learners import ContextEncoder, MAMLModel, ReptileModel, model_nll, product_of_gaussians, reptile_update, sgd_adapt
from metarl.train import train_pendulum_meta

ROOT = Path(__file__).resolve().parents[1]


def _tiny_cfg(**kw) -> PendulumMetaConfig:
    base = dict(n_train_tasks=2, n_heldout_tasks=1, n_ood_tasks=1, episode_steps=20, data_episodes=1, policy_rounds=1,
                hidden=8, layers=1, iterations=3, meta_batch=2, support_size=5, query_size=5, encoder_hidden=8,
                reptile_inner_steps=2, adapt_episodes=1, horizon=3, population=8, elites=2, cem_iterations=1)
    return PendulumMetaConfig(**{**base, **kw})


# --- the family -------------------------------------------------------------------------------

def test_family_sets_g_m_l_on_the_real_environment():
    """One step of the real env equals the closed-form pendulum update with this task's g, m, l."""
    task = PendulumTask(g=7.3, m=1.4, l=0.6)
    env = task.make_env(episode_steps=5)
    env.reset(seed=0)
    dt = 0.05
    for th, thdot, u in [(0.3, -1.0, 1.5), (2.5, 4.0, -2.0), (-1.2, 7.9, 2.0)]:
        env.unwrapped.state = np.array([th, thdot])
        obs, *_ = env.step(np.array([u], dtype=np.float32))
        new_thdot = np.clip(thdot + (3 * 7.3 / (2 * 0.6) * np.sin(th) + 3.0 / (1.4 * 0.6**2) * u) * dt, -8, 8)
        new_th = th + new_thdot * dt
        np.testing.assert_allclose(obs, [np.cos(new_th), np.sin(new_th), new_thdot], rtol=1e-5, atol=1e-5)
    # the default pendulum differs: the parameters really reach the dynamics
    default = PendulumTask(g=10.0, m=1.0, l=1.0).make_env(5)
    default.reset(seed=0)
    default.unwrapped.state = np.array([0.3, -1.0])
    env.unwrapped.state = np.array([0.3, -1.0])
    a = np.array([1.5], dtype=np.float32)
    assert abs(default.step(a)[0][2] - env.step(a)[0][2]) > 0.1
    assert env.spec.max_episode_steps == 5


def test_splits_are_disjoint_in_range_and_out_of_range():
    cfg = PendulumMetaConfig(n_train_tasks=20, n_heldout_tasks=15, n_ood_tasks=40)
    splits = make_splits(cfg, np.random.default_rng(5))
    assert [len(splits[s]) for s in ("train", "heldout", "ood")] == [20, 15, 40]
    assert not set(splits["train"]) & set(splits["heldout"])
    assert len(set(splits["train"] + splits["heldout"] + splits["ood"])) == 75
    for task in splits["train"] + splits["heldout"]:
        for p in PARAMETERS:
            lo, hi = cfg.range(p)
            assert lo <= getattr(task, p) <= hi
    for task in splits["ood"]:
        for p in PARAMETERS:
            (lo, hi), (wlo, whi) = cfg.range(p), cfg.ood_range(p)
            v = getattr(task, p)
            assert wlo <= v <= whi and not (lo <= v <= hi), (p, v)
    ood_g = np.array([t.g for t in splits["ood"]])
    assert (ood_g < cfg.range("g")[0]).any() and (ood_g > cfg.range("g")[1]).any()  # both sides drawn
    again = make_splits(cfg, np.random.default_rng(5))
    assert again == splits
    assert make_splits(cfg, np.random.default_rng(6))["train"] != splits["train"]


# --- MAML, Reptile, the encoder ---------------------------------------------------------------

def _manual_nll(flat: dict[str, torch.Tensor], in_mean, in_std, x, y) -> torch.Tensor:
    """The one-member, one-hidden-layer model's NLL written out by hand (SiLU MLP, soft-clamped log-variance)."""
    h = (x - in_mean) / in_std
    h = h @ flat["params.0__weight"][0].T + flat["params.0__bias"][0]
    h = h * torch.sigmoid(h)
    out = h @ flat["params.2__weight"][0].T + flat["params.2__bias"][0]
    mean, raw = out[:, :3], out[:, 3:]
    hi, lo = flat["max_logvar"], flat["min_logvar"]
    logvar = hi - torch.log1p(torch.exp(hi - raw))
    logvar = lo + torch.log1p(torch.exp(logvar - lo))
    return (0.5 * (logvar + (y - mean) ** 2 / torch.exp(logvar) + math.log(2 * math.pi))).mean()


def _learner(cls, **kw):
    learner = cls(_tiny_cfg(ensemble_size=1, particles=1, **kw), torch.Generator().manual_seed(0))
    learner.model.double()
    with torch.no_grad():
        learner.model.in_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
        learner.model.in_std.copy_(torch.tensor([0.5, 0.7, 2.0, 1.5]))
    return learner


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), 0.3 * torch.randn(n, 3, generator=g, dtype=torch.float64)


def test_maml_inner_step_equals_hand_computed_sgd_step():
    learner = _learner(MAMLModel, inner_lr=0.05)
    model = learner.model
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    x, y = _data(7, 1)
    leaf = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    loss = _manual_nll(leaf, model.in_mean, model.in_std, x, y)
    assert loss.item() == pytest.approx(model_nll(model, params, x, y).item(), rel=1e-12)
    grads = torch.autograd.grad(loss, list(leaf.values()))
    expected = {k: params[k] - 0.05 * g for k, g in zip(leaf, grads)}
    got = sgd_adapt(model, params, x, y, lr=0.05, steps=1)
    for k in params:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=1e-12)
        assert not torch.equal(got[k], params[k]) or k == "min_logvar"
    # adapt() (evaluation) is the same step, without touching the meta-parameters
    adapted = learner.adapt(x, y).params
    for k in params:
        torch.testing.assert_close(adapted[k], expected[k], rtol=0, atol=1e-12)
        assert torch.equal(dict(model.named_parameters())[k], params[k])


def test_maml_outer_gradient_is_second_order():
    """d/dtheta of NLL_query(theta - a grad NLL_support(theta)) against central differences."""
    learner = _learner(MAMLModel, inner_lr=0.1)
    model = learner.model
    xs, ys = _data(6, 2)
    xq, yq = _data(6, 3)
    params = dict(model.named_parameters())
    outer = model_nll(model, sgd_adapt(model, params, xs, ys, 0.1, 1), xq, yq)
    g = torch.autograd.grad(outer, [params["params.0__weight"]])[0]

    def f(w):
        p = {k: v.detach() for k, v in params.items()}
        p["params.0__weight"] = w
        return model_nll(model, sgd_adapt(model, p, xs, ys, 0.1, 1), xq, yq).item()

    w0 = params["params.0__weight"].detach()
    # first-order MAML: the query gradient at the adapted weights, the inner step treated as constant
    adapted = {k: v.detach() for k, v in sgd_adapt(model, {k: v.detach() for k, v in params.items()}, xs, ys, 0.1, 1).items()}
    adapted["params.0__weight"].requires_grad_(True)
    first_order = torch.autograd.grad(model_nll(model, adapted, xq, yq), [adapted["params.0__weight"]])[0]
    eps = 1e-6
    differs = 0
    for idx in [(0, 0, 0), (0, 3, 2), (0, 7, 1)]:
        wp, wm = w0.detach().clone(), w0.detach().clone()
        wp[idx] += eps
        wm[idx] -= eps
        numeric = (f(wp) - f(wm)) / (2 * eps)
        assert g[idx].item() == pytest.approx(numeric, rel=1e-5, abs=1e-8)
        differs += abs(first_order[idx].item() - numeric) > 1e-4
    assert differs  # the first-order approximation is measurably different: the second-order term is there


def test_reptile_update_equals_its_formula():
    learner = _learner(ReptileModel, reptile_inner_lr=0.02, reptile_inner_steps=3, reptile_step=0.4)
    model = learner.model
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}
    batches = [(*_data(5, 10), *_data(5, 11)), (*_data(5, 12), *_data(5, 13))]
    expected_adapted = []
    for xs, ys, xq, yq in batches:  # three SGD steps on support + query, by hand
        x, y = torch.cat([xs, xq]), torch.cat([ys, yq])
        p = {k: v.clone() for k, v in theta.items()}
        for _ in range(3):
            leaf = {k: v.clone().requires_grad_(True) for k, v in p.items()}
            grads = torch.autograd.grad(_manual_nll(leaf, model.in_mean, model.in_std, x, y), list(leaf.values()))
            p = {k: p[k] - 0.02 * g for k, g in zip(p, grads)}
        expected_adapted.append(p)
    learner.step(batches)
    for k, v in model.named_parameters():
        formula = theta[k] + 0.4 * ((expected_adapted[0][k] - theta[k]) + (expected_adapted[1][k] - theta[k])) / 2
        torch.testing.assert_close(v.detach(), formula, rtol=0, atol=1e-12)
    # the helper on its own: epsilon 1 is the mean of the adapted weights
    a = {"w": torch.tensor([1.0, 2.0])}
    out = reptile_update(a, [{"w": torch.tensor([3.0, 2.0])}, {"w": torch.tensor([1.0, 6.0])}], 1.0)
    torch.testing.assert_close(out["w"], torch.tensor([2.0, 4.0]))


def test_product_of_two_gaussians_closed_form():
    mu = torch.tensor([[1.0, -2.0], [3.0, 0.5]], dtype=torch.float64)
    var = torch.tensor([[0.5, 2.0], [1.5, 0.25]], dtype=torch.float64)
    m, v = product_of_gaussians(mu, var)
    s1, s2 = var
    torch.testing.assert_close(v, s1 * s2 / (s1 + s2))
    torch.testing.assert_close(m, (mu[0] * s2 + mu[1] * s1) / (s1 + s2))
    torch.testing.assert_close(m, torch.tensor([1.5, 2.0 / 9.0], dtype=torch.float64))


def test_context_encoder_is_permutation_invariant_and_starts_at_the_prior():
    torch.manual_seed(0)
    enc = ContextEncoder(5, 16).double()
    x, y = _data(9, 4)
    mu, var = enc(x, y)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(1))
    mu_p, var_p = enc(x[perm], y[perm])
    torch.testing.assert_close(mu_p, mu, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var_p, var, rtol=1e-12, atol=1e-12)
    assert mu.shape == (5,) and torch.all(var < 1)  # each factor sharpens the N(0, I) prior
    # it is the product of the prior and the per-transition factors
    fm, fv = enc.factors(x, y)
    ref_m, ref_v = product_of_gaussians(torch.cat([torch.zeros(1, 5, dtype=torch.float64), fm]),
                                        torch.cat([torch.ones(1, 5, dtype=torch.float64), fv]))
    torch.testing.assert_close(mu, ref_m)
    m0, v0 = enc(x[:0], y[:0])
    torch.testing.assert_close(m0, torch.zeros(5, dtype=torch.float64))
    torch.testing.assert_close(v0, torch.ones(5, dtype=torch.float64))


# --- config -------------------------------------------------------------------------------------

def _raw(**fields):
    exp = {"name": "m", "task": "pendulum_meta", "backend": "classical", "gradient": "backprop", **fields}
    return {"experiments": [exp]}


@pytest.mark.parametrize("fields, message", [
    ({"pendulum_meta": {"g_range": [12.0, 8.0]}}, "field 'pendulum_meta.g_range': g_range needs low < high"),
    ({"pendulum_meta": {"m_range": [1.0, 1.0]}}, "field 'pendulum_meta.m_range': m_range needs low < high"),
    ({"pendulum_meta": {"n_train_tasks": 0}}, "field 'pendulum_meta.n_train_tasks': n_train_tasks must be at least 1"),
    ({"pendulum_meta": {"n_ood_tasks": 0}}, "field 'pendulum_meta.n_ood_tasks': n_ood_tasks must be at least 1"),
    ({"pendulum_meta": {"l_ood_range": [0.9, 1.6]}}, "l_ood_range ([0.9, 1.6]) must contain l_range ([0.8, 1.2])"),
    ({"meta_algorithm": "sgd"}, "field 'meta_algorithm': Input should be 'maml', 'reptile', 'context' or 'pooled'"),
    ({"backend": "tensorcircuit"}, "field 'backend': pendulum_meta's dynamics model is classical"),
    ({"task": "pendulum", "meta_algorithm": "maml"},
     "field 'meta_algorithm': task 'pendulum' has no task family; meta_algorithm applies to: pendulum_meta"),
    ({"task": "cartpole", "meta_algorithm": "context"}, "field 'meta_algorithm': task 'cartpole' has no task family"),
])
def test_config_errors_are_one_line_naming_the_field(fields, message):
    with pytest.raises(ConfigError) as info:
        load_config(raw=_raw(**fields))
    text = str(info.value)
    assert message in text, text
    assert "\n" not in text


def test_defaults_are_valid_and_strict():
    exp = load_config(raw=_raw()).experiments[0]
    assert exp.meta_algorithm == "maml" and exp.algorithm == "pets"
    assert exp.total_steps == 3 * exp.pendulum_meta.iterations
    with pytest.raises(ValidationError):
        PendulumMetaConfig(gravity=[1, 2])


# --- runs -------------------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm", ["maml", "reptile", "context", "pooled"])
def test_tiny_run_is_deterministic_and_counts_its_steps(algorithm):
    cfg = _tiny_cfg()
    exp = SimpleNamespace(pendulum_meta=cfg, meta_algorithm=algorithm)
    a, b, c = (train_pendulum_meta(exp, s) for s in (0, 0, 1))
    timing = ("final/plan_ms_per_step", "final/train_s", "final/eval_s")
    fa, fb, fc = ({k: v for k, v in r.final_metrics().items() if k not in timing} for r in (a, b, c))
    assert fa == fb and fa != fc
    # 2 train tasks x (1 random + 1 planned episode) x 20 steps; (1 + 1) eval tasks x 2 episodes x 20 steps
    assert fa["final/train_env_steps"] == 80 and fa["final/env_steps"] == 80 + 80
    assert a.final_step == 6 and a.returns["heldout"].shape == (1, 2)
    assert fa["final/eval_return"] == fa["adapt/heldout/return_ep1"]
    assert all(math.isfinite(v) for v in fa.values())
    assert set(a.figures("t")) == {"pendulum_meta_adaptation.png"}
    for split in ("heldout", "ood"):  # the unadapted model's NLL of the same episode: equal only where nothing adapts
        assert fa[f"adapt/{split}/nll_unadapted_ep0"] == fa[f"adapt/{split}/nll_ep0"]
        same = fa[f"adapt/{split}/nll_unadapted_ep1"] == fa[f"adapt/{split}/nll_ep1"]
        assert same == (algorithm == "pooled")


def test_tiny_run_through_run_py(tmp_path):
    from mlflow.tracking import MlflowClient

    tiny = _tiny_cfg().model_dump()
    config = {"mlflow": {"experiment_name": "pm"},
              "defaults": {"task": "pendulum_meta", "backend": "classical", "gradient": "backprop", "seeds": [0]},
              "experiments": [{"name": "ctx", "meta_algorithm": "context", "pendulum_meta": tiny}]}
    path = tmp_path / "pm.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "-c", str(path)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("pm").experiment_id])
    run = next(r for r in runs if r.data.tags.get("kind") != "sweep")
    assert run.data.tags["status"] == "PASSED" and run.data.tags["task"] == "pendulum_meta"
    m = run.data.metrics
    assert m["final/env_steps"] == 160
    for split in ("heldout", "ood"):
        for k in (0, 1):
            assert math.isfinite(m[f"adapt/{split}/return_ep{k}"])
        history = client.get_metric_history(run.info.run_id, f"adapt/{split}/return")
        assert [h.step for h in history] == [0, 1]
    assert m["final/eval_return"] == m["adapt/heldout/return_ep1"]
    assert run.data.params["meta_algorithm"] == "context" and run.data.params["pendulum_meta.n_train_tasks"] == "2"
    assert json.loads(run.data.tags["summary"])["score"] == m["final/eval_return"]
