"""Meta-learning semantics (MAML / FOMAML / Reptile), the support-loss estimator, the pulse
policies on every backend, and qubit_meta runs end to end under run.py."""

import math

import numpy as np
import pytest
import torch
from conftest import experiment
from test_run import run_py, runs_by_name

from config_schema import ConfigError, load_config
from meta.algorithms import Losses, TaskGradients, adapt, meta_gradient
from meta.policies import build_pulse_policy
from meta.train import task_factory
from noise.simulator import average_gate_fidelity

DETERMINISTIC_SUPPORT = {"states": 6, "shots": 0}  # exact: equals the query loss in value


def setup(backend="classical", support=None, n_tasks=3, seed=0, meta_noise=None, **extra):
    meta = {"n_segments": 4, "support": support or DETERMINISTIC_SUPPORT,
            "noise": {"ranges": {"alpha": [0.5, 2.0], "A": [0.03, 1.5], "omega_c": [0.1, 10.0], "detuning": [-1.0, 1.0]},
                      **(meta_noise or {})}}
    exp = experiment(task="qubit_meta", backend=backend, gradient=extra.pop("gradient", "backprop"),
                     algorithm=extra.pop("algorithm", "fomaml"),
                     model={"n_qubits": 2, "n_layers": 1, "hidden_sizes": [6]}, meta=meta,
                     tensorcircuit={"math_backend": extra.pop("math_backend", "pytorch")}, **extra)
    factory = task_factory(exp)
    policy = build_pulse_policy(exp, factory.n_inputs)
    tasks = factory.sample(n_tasks, np.random.default_rng(seed))
    losses = Losses(policy, torch.Generator().manual_seed(1))
    theta = policy.init_params(seed)
    return exp, policy, tasks, losses, theta


def autograd():
    return TaskGradients("backprop", torch.Generator().manual_seed(0))


def test_before_adaptation_the_adapted_model_is_the_original():
    _, policy, tasks, losses, theta = setup()
    seen = {}
    phi = adapt(losses, autograd(), theta.expand(len(tasks), -1), tasks, 0, 0.1, on_step=lambda k, p: seen.setdefault(k, p))
    assert torch.equal(phi, theta.expand(len(tasks), -1)) and torch.equal(seen[0], phi)
    assert torch.equal(policy.pulses(phi, tasks.inputs), policy.pulses(theta.expand(len(tasks), -1), tasks.inputs))


@pytest.mark.parametrize("backend", ["classical", "pennylane", "tensorcircuit"])
def test_one_inner_step_lowers_the_support_loss(backend):
    _, _, tasks, losses, theta = setup(backend)
    start = theta.expand(len(tasks), -1)
    before = losses.support(start, tasks)
    after = losses.support(adapt(losses, autograd(), start, tasks, 1, 0.01), tasks)
    assert (after < before).all(), (before, after)


@pytest.mark.parametrize("backend", ["classical", "pennylane", "tensorcircuit"])
def test_maml_meta_gradient_reaches_every_meta_parameter(backend):
    _, policy, tasks, losses, theta = setup(backend, algorithm="maml")
    g, _ = meta_gradient("maml", losses, autograd(), theta, tasks, inner_steps=2, inner_lr=0.05)
    assert g.shape == (policy.n_params,)
    assert (g.abs() > 0).all(), f"{int((g == 0).sum())} of {g.numel()} meta-parameters get no gradient"


def _query_after_adaptation(losses, theta, tasks, lr, steps):
    """J(theta) = mean_b query(phi_b(theta)), phi by differentiable inner steps (hand-written, task by task)."""
    total = 0
    for b in range(len(tasks)):
        one = tasks.select([b])
        phi = theta[None]
        for _ in range(steps):
            (g,) = torch.autograd.grad(losses.support(phi, one).sum(), phi, create_graph=True)
            phi = phi - lr * g
        total = total + losses.query(phi, one).sum()
    return total / len(tasks)


def test_maml_meta_gradient_equals_finite_difference_of_the_adapted_objective():
    _, _, tasks, losses, theta = setup()
    g, _ = meta_gradient("maml", losses, autograd(), theta, tasks, inner_steps=2, inner_lr=0.05)
    reference = torch.zeros_like(theta)
    h = 1e-5
    for i in range(theta.numel()):
        e = torch.zeros_like(theta)
        e[i] = h
        plus = _query_after_adaptation(losses, (theta + e).requires_grad_(True), tasks, 0.05, 2)
        minus = _query_after_adaptation(losses, (theta - e).requires_grad_(True), tasks, 0.05, 2)
        reference[i] = (plus - minus).detach() / (2 * h)
    assert torch.allclose(g, reference, rtol=1e-5, atol=1e-8)


def test_first_order_maml_equals_hand_made_reference():
    _, _, tasks, losses, theta = setup(n_tasks=4)
    lr, steps = 0.05, 3
    g, info = meta_gradient("fomaml", losses, autograd(), theta, tasks, inner_steps=steps, inner_lr=lr)
    grads, queries = [], []
    for b in range(len(tasks)):
        one = tasks.select([b])
        phi = theta.clone()
        for _ in range(steps):
            p = phi[None].clone().requires_grad_(True)
            (gs,) = torch.autograd.grad(losses.support(p, one).sum(), p)
            phi = phi - lr * gs[0]
        p = phi[None].clone().requires_grad_(True)
        q = losses.query(p, one).sum()
        (gq,) = torch.autograd.grad(q, p)
        grads.append(gq[0])
        queries.append(float(q))
    assert torch.allclose(g, torch.stack(grads).mean(0), rtol=1e-10, atol=1e-14)
    assert info["query_loss_post"] == pytest.approx(np.mean(queries), rel=1e-12)
    # and it differs from second-order MAML (the inner steps depend on theta)
    g2, _ = meta_gradient("maml", losses, autograd(), theta, tasks, inner_steps=steps, inner_lr=lr)
    assert not torch.allclose(g, g2, rtol=1e-6)


def test_reptile_meta_gradient_points_from_adapted_to_initial_parameters():
    _, _, tasks, losses, theta = setup()
    g, _ = meta_gradient("reptile", losses, autograd(), theta, tasks, inner_steps=2, inner_lr=0.05)
    phi = adapt(losses, autograd(), theta.expand(len(tasks), -1).clone(), tasks, 2, 0.05)
    assert torch.allclose(g, theta - phi.mean(0), atol=1e-14)


def test_estimated_task_gradients_match_autograd():
    _, _, tasks, losses, theta = setup()
    params = theta.expand(len(tasks), -1).clone()
    exact_losses, exact = autograd()(losses.query, params, tasks)
    fd_losses, fd = TaskGradients("finite-diff", torch.Generator().manual_seed(0))(losses.query, params, tasks)
    assert torch.allclose(fd_losses, exact_losses.detach(), atol=1e-14)
    assert torch.allclose(fd, exact, rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="fomaml or reptile"):
        TaskGradients("spsa", torch.Generator())(losses.query, params, tasks, create_graph=True)


def test_support_loss_is_an_unbiased_estimate_of_the_average_gate_fidelity():
    _, policy, tasks, losses, theta = setup(support={"states": 2, "shots": 64})
    controls = policy.pulses(theta.expand(len(tasks), -1), tasks.inputs).detach()
    exact = average_gate_fidelity(tasks.channel(controls), tasks.target)
    gen = torch.Generator().manual_seed(123)
    draws = torch.stack([tasks.support_fidelity(controls, gen) for _ in range(4000)])  # (R, B)
    mean, stderr = draws.mean(0), draws.std(0) / math.sqrt(draws.shape[0])
    assert (stderr > 0).all()  # it does sample
    assert ((mean - exact).abs() < 5 * stderr).all(), (mean, exact, stderr)
    # gradients flow through the exact probabilities of the drawn states (straight-through)
    c = controls.clone().requires_grad_(True)
    tasks.support_loss(c, gen).sum().backward()
    assert c.grad is not None and c.grad.abs().sum() > 0


def test_pulse_policies_agree_across_circuit_backends():
    _, pl_policy, tasks, _, theta = setup("pennylane")
    _, tc_policy, _, _, theta_tc = setup("tensorcircuit", math_backend="jax")
    assert torch.equal(theta, theta_tc)
    params = theta.expand(len(tasks), -1)
    pl, tc = pl_policy.pulses(params, tasks.inputs), tc_policy.pulses(params, tasks.inputs)
    assert pl.shape == (len(tasks), 4, 2) and pl.abs().max() <= 2 * math.pi
    assert torch.allclose(pl, tc, atol=1e-10)


def test_range_scale_shrinks_about_the_centre():
    exp, *_ = setup()
    cfg = exp.meta.noise.model_copy(update={"range_scale": 0.5})
    r = cfg.scaled_ranges()
    assert r["alpha"] == pytest.approx((0.875, 1.625))
    assert r["omega_c"] == pytest.approx((math.sqrt(0.1), math.sqrt(10.0)))  # log-uniform: geometric centre 1


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"algorithm": "maml", "backend": "classical", "gradient": "spsa"}, "allowed instead: fomaml, reptile"),
        ({"algorithm": "maml", "backend": "tensorcircuit", "gradient": "backprop"}, "math_backend 'pytorch'"),
        ({"algorithm": "reinforce", "backend": "classical", "gradient": "backprop"}, "allowed: maml, fomaml, reptile"),
        ({"backend": "classical", "gradient": "backprop", "meta": {"noise": {"model_types": ["pink"]}}}, "model_types"),
        ({"backend": "classical", "gradient": "backprop", "meta": {"noise": {"model_types": ["double_exp"]}}}, "A2 and omega_c2"),
        ({"backend": "classical", "gradient": "backprop", "meta": {"support": {"states": 7}}}, "support.states"),
        ({"backend": "classical", "gradient": "backprop", "meta": {"eval": {"k_values": [5, 1]}}}, "k_values"),
        ({"backend": "classical", "gradient": "backprop", "meta": {"noise": {"simulation": "exact"}}},
         "'trajectories', 'filter_function' or 'markovian'"),
        ({"backend": "classical", "gradient": "backprop", "meta": {"noise": {"time_steps": 20}}}, "noise.time_steps: 20 steps do not resolve"),
        ({"backend": "classical", "gradient": "backprop", "meta": {"noise": {"time_steps": 105}}}, "not a multiple of n_segments 10"),
        ({"backend": "classical", "gradient": "backprop", "meta": {"noise": {"simulation": "trajectories", "trajectories": 10}}},
         "noise.trajectories: 10 is too few"),
        ({"backend": "classical", "gradient": "backprop", "meta": {"noise": {"omega0": 5.0}}}, "not well above the largest Rabi frequency"),
        ({"backend": "classical", "gradient": "backprop", "meta": {"noise": {"sequence": "echo"}}}, "field 'sequence' was removed"),
        ({"backend": "classical", "gradient": "backprop",
          "meta": {"noise": {"ranges": {"alpha": [0.5, 2], "A": [0.1, 1], "gamma_phi": [0.01, 0.1], "omega_c": [1, 2]}}}}, "exactly one strength"),
        ({"backend": "classical", "gradient": "backprop",
          "meta": {"noise": {"ranges": {"alpha": [0.5, 2], "gamma_phi": [0.1, 0.01], "omega_c": [1, 2]}}}}, "gamma_phi: inverted range"),
    ],
)
def test_invalid_qubit_meta_configs_are_one_line_errors(fields, message):
    with pytest.raises(ConfigError) as err:
        load_config(raw={"experiments": [{"name": "bad", "task": "qubit_meta", **fields}]})
    assert len(err.value.lines) == 1 and message in err.value.lines[0], err.value.lines


def test_qubit_meta_runs_pass_on_every_backend(tmp_path):
    config = {
        "mlflow": {"experiment_name": "e2e"},
        "defaults": {
            "task": "qubit_meta", "timeout_s": 180,
            "model": {"n_qubits": 2, "n_layers": 1, "hidden_sizes": [8]},
            "meta": {"iterations": 3, "meta_batch_size": 2, "inner_steps": 1, "n_segments": 4,
                     "eval": {"every": 2, "n_tasks": 3, "k_values": [0, 1, 2], "model_types": ["lorentzian"]},
                     "baselines": {"robust_steps": 3, "optimum_steps": 3}},
        },
        "experiments": [
            {"name": "classical_maml", "backend": "classical", "gradient": "backprop", "algorithm": "maml"},
            {"name": "pl_maml", "backend": "pennylane", "gradient": "backprop", "algorithm": "maml"},
            {"name": "tc_fomaml", "backend": "tensorcircuit", "gradient": "backprop", "algorithm": "fomaml"},
            {"name": "pl_spsa_reptile", "backend": "pennylane", "gradient": "spsa", "algorithm": "reptile"},
            {"name": "pl_adjoint_fomaml", "backend": "pennylane", "gradient": "adjoint", "algorithm": "fomaml"},
            {"name": "tc_shift_reptile", "backend": "tensorcircuit", "gradient": "parameter-shift", "algorithm": "reptile"},
            {"name": "classical_fd_fomaml", "backend": "classical", "gradient": "finite-diff", "algorithm": "fomaml"},
            {"name": "classical_traj_maml", "backend": "classical", "gradient": "backprop", "algorithm": "maml",
             "meta": {"noise": {"simulation": "trajectories", "trajectories": 64}}},
        ],
    }
    proc = run_py(tmp_path, config)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "heldout_fidelity" in proc.stdout and "gap_to_robust" in proc.stdout and "final_avg_return" not in proc.stdout
    client, runs = runs_by_name(tmp_path)
    for name in ("classical_maml", "pl_maml", "tc_fomaml", "pl_spsa_reptile", "pl_adjoint_fomaml", "tc_shift_reptile",
                 "classical_fd_fomaml", "classical_traj_maml"):
        run = runs[f"{name}-seed0"]
        assert run.data.tags["status"] == "PASSED", run.data.tags.get("error")
        m = run.data.metrics
        for key in ("final/fidelity_pre", "final/fidelity_post", "final/fidelity_robust", "final/fidelity_optimum",
                    "final/gap_to_robust", "final/task_variance_raw", "final/task_variance_rates",
                    "final/heldout/lorentzian/fidelity_post", "final/by_model/one_over_f/fidelity_post"):
            assert key in m and math.isfinite(m[key]), key
        assert 0 < m["final/fidelity_post"] <= 1
        for simulation in ("markovian", "filter_function", "trajectories"):
            assert 0 < m[f"final/crosscheck/{simulation}/fidelity_post"] <= 1
        assert 0 <= m["final/crosscheck/filter_function/ff_outside_validity/post"] <= 1
        assert m["final/crosscheck/trajectories/stderr/post"] > 0
        own = run.data.params["meta.noise.simulation"]
        assert m[f"final/crosscheck/{own}/fidelity_post"] == pytest.approx(m["final/fidelity_post"], abs=1e-12 if own != "trajectories" else 0.05)
        if not name.startswith("classical"):
            assert 0 < m["final/grad_circuit_evals"] <= m["final/total_circuit_evals"]
            # every circuit is counted once: for the gradient, for a metric (Reptile's query) or for evaluation
            assert m["final/total_circuit_evals"] == (m["final/grad_circuit_evals"] + m["final/metric_circuit_evals"]
                                                      + m["final/eval_circuit_evals"])
            assert (m["final/metric_circuit_evals"] > 0) == name.endswith("reptile")
            assert m["final/eval_circuit_evals"] > 0
        assert [h.step for h in client.get_metric_history(run.info.run_id, "meta/fidelity_vs_k")] == [0, 1, 2]
        assert len(client.get_metric_history(run.info.run_id, "meta/train_loss")) == 3
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"fidelity_vs_k.png", "fidelity_by_model.png", "learning_curve.png", "model"} <= artifacts
    parent = next(r for r in runs.values() if r.data.tags.get("kind") == "sweep")
    assert "gap_vs_variance.png" in {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_every_fidelity_model_runs_the_meta_losses_with_gradients():
    for simulation in ("filter_function", "trajectories", "markovian"):
        exp, policy, tasks, losses, theta = setup(meta_noise={"simulation": simulation, "time_steps": 40, "trajectories": 64})
        assert tasks.model.name == simulation
        g, info = meta_gradient("maml", losses, autograd(), theta, tasks, inner_steps=1, inner_lr=0.05)
        assert torch.isfinite(g).all() and (g.abs() > 0).any() and 0 < info["query_loss_post"] < 1


def test_same_seed_same_meta_run_and_other_seeds_differ():
    """Every random stream of a qubit_meta run (task draws, shots, SPSA directions, validation tasks,
    robust start) comes from the seed: the same seed repeats the run bit for bit."""
    from meta.train import train_meta
    from train import NullReporter

    exp = experiment(task="qubit_meta", backend="classical", gradient="spsa", algorithm="fomaml",
                     model={"hidden_sizes": [6]},
                     meta={"iterations": 2, "meta_batch_size": 2, "inner_steps": 1, "n_segments": 4,
                           "support": {"states": 2, "shots": 8},
                           "eval": {"every": 2, "n_tasks": 2, "k_values": [0, 1], "model_types": []},
                           "baselines": {"robust_steps": 2, "optimum_steps": 0}})
    a, b, c = (train_meta(exp, seed, NullReporter()) for seed in (3, 3, 4))
    assert a.train_loss == b.train_loss and torch.equal(a.theta, b.theta) and torch.equal(a.robust_pulse, b.robust_pulse)
    assert np.array_equal(a.final.by_k[1], b.final.by_k[1])
    assert a.train_loss != c.train_loss and not np.array_equal(a.final.by_k[0], c.final.by_k[0])
