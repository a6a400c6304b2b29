"""Honest circuit counts (docs/CONVENTIONS.md §1.3), pinned to numbers computed by hand from each
algorithm's definition.

The unit: one circuit evaluation is one row of gate angles through a circuit backend (one state
simulation with all its observables). Backprop and adjoint run the forward rows only (their backward
passes execute no circuit of ours); parameter shift adds 2G rows per row (every one of the G gate
angles shifted by +-pi/2); SPSA evaluates 2m + 1 parameter points, central differences 2P + 1 and
forward differences P + 1, each point costing one row per observation (CartPole) or per task (meta).
"""

import math

import pytest
import torch
from conftest import experiment
from test_meta import setup

from meta.algorithms import TaskGradients, meta_gradient
from train import train

B, K = 3, 2  # tasks per meta-batch, inner steps

META_CASES = [
    ("maml", "pennylane", "backprop", {}),
    ("maml", "tensorcircuit", "backprop", {}),
    *[(algorithm, backend, gradient, extra) for algorithm in ("fomaml", "reptile") for backend, gradient, extra in (
        ("pennylane", "backprop", {}),
        ("pennylane", "adjoint", {}),
        ("pennylane", "parameter-shift", {}),
        ("tensorcircuit", "parameter-shift", {"math_backend": "jax"}),
        ("pennylane", "spsa", {"spsa": {"n_directions": 2}}),
        ("pennylane", "finite-diff", {}),
        ("tensorcircuit", "finite-diff", {"finite_diff": {"scheme": "forward"}}),
    )],
]


def _points_per_task(gradient: str, exp, n_params: int) -> int:
    """Parameter points one task's gradient evaluates (1 for the autodiff methods: the forward pass)."""
    if gradient == "spsa":
        return 2 * exp.spsa.n_directions + 1
    if gradient == "finite-diff":
        return 2 * n_params + 1 if exp.finite_diff.scheme == "central" else n_params + 1
    return 1


@pytest.mark.parametrize("algorithm,backend,gradient,extra", META_CASES,
                         ids=[f"{a}-{b}-{g}{'-' + next(iter(e)) if e else ''}" for a, b, g, e in META_CASES])
def test_meta_gradient_circuit_counts_are_exact(algorithm, backend, gradient, extra):
    exp, policy, tasks, losses, theta = setup(backend, n_tasks=B, algorithm=algorithm, gradient=gradient, **extra)
    grads = TaskGradients(gradient, torch.Generator().manual_seed(0), exp.spsa.c, exp.spsa.n_directions,
                          exp.finite_diff.step, exp.finite_diff.scheme)
    g_angles, n_params = policy.spec.n_gate_angles, policy.n_params
    points = _points_per_task(gradient, exp, n_params)
    rows_per_point = 1 + 2 * g_angles if gradient == "parameter-shift" else 1
    per_call = B * points * rows_per_point  # one TaskGradients call: every task's points, every point's rows
    expected_grad = {"maml": (K + 1) * B, "fomaml": (K + 1) * per_call, "reptile": K * per_call}[algorithm]
    expected_metric = B if algorithm == "reptile" else 0  # Reptile's query loss after adaptation, a metric only
    expected_loss_evals = {"maml": (K + 1) * B, "fomaml": (K + 1) * B * points, "reptile": K * B * points}[algorithm]

    before = policy.circuit_evals
    _, info = meta_gradient(algorithm, losses, grads, theta, tasks, inner_steps=K, inner_lr=0.05)
    assert info["grad_circuit_evals"] == expected_grad
    assert info["metric_circuit_evals"] == expected_metric
    assert policy.circuit_evals - before == expected_grad + expected_metric  # nothing executed goes uncounted
    assert grads.loss_evaluations == expected_loss_evals
    # the support loss before adaptation is the first inner step's own, for estimators too
    exact_pre = float(losses.support(theta.expand(B, -1), tasks).mean())
    assert info["support_loss_pre"] == pytest.approx(exact_pre, rel=1e-7)  # lightning differs from default.qubit at 1e-9


def test_meta_gradient_k5_costs_match_the_formulas_of_the_issue():
    """Issue 12's example at K = 5: before, the pre-adaptation support forward made Reptile/backprop
    pay (K + 2) B instead of K B (+40 %) and FOMAML (K + 2) B instead of (K + 1) B (+17 %)."""
    for algorithm, expected in (("reptile", 5 * B), ("fomaml", 6 * B), ("maml", 6 * B)):
        _, policy, tasks, losses, theta = setup("pennylane", n_tasks=B, algorithm=algorithm)
        before = policy.circuit_evals
        _, info = meta_gradient(algorithm, losses, TaskGradients("backprop", torch.Generator()), theta, tasks, 5, 0.05)
        assert info["grad_circuit_evals"] == expected
        assert policy.circuit_evals - before == expected + (B if algorithm == "reptile" else 0)


TINY_MODEL = {"n_qubits": 2, "n_layers": 1}


def _per_row(backend: str, gradient: str, exp, result) -> int:
    """Circuits per observation row of one update."""
    n_params = result.model.flat_parameters().numel()
    if gradient == "parameter-shift":
        return 1 + 2 * result.model.spec.n_gate_angles
    return _points_per_task(gradient, exp, n_params)


@pytest.mark.parametrize("backend,gradient", [("pennylane", "backprop"), ("pennylane", "adjoint"),
                                              ("tensorcircuit", "parameter-shift"), ("tensorcircuit", "spsa"),
                                              ("pennylane", "finite-diff")])
def test_reinforce_counts_gradient_and_rollout_circuits_apart(backend, gradient):
    """REINFORCE: an update evaluates every recorded transition of its batch once per row cost
    (grad); a rollout evaluates all n_envs environments at every time step until the batch's longest
    episode ends (acting, outside grad). CartPole pays 1 per step, so an episode's length is its return."""
    exp = experiment(backend=backend, gradient=gradient, algorithm="reinforce", model=TINY_MODEL,
                     training={"episodes": 5, "episodes_per_batch": 2})
    result = train(exp, 0)
    lengths = [int(r) for r in result.episode_returns]
    assert sum(lengths) == result.env_steps and result.updates == 3
    batches = [lengths[i : i + 2] for i in range(0, 5, 2)]
    rollout = sum(2 * max(batch) for batch in batches)  # the last batch of 1 episode still steps both environments
    assert result.grad_circuit_evals == _per_row(backend, gradient, exp, result) * sum(lengths)
    assert result.total_circuit_evals == result.grad_circuit_evals + rollout


@pytest.mark.parametrize("backend,gradient", [("tensorcircuit", "backprop"), ("pennylane", "parameter-shift"),
                                              ("tensorcircuit", "spsa")])
def test_dqn_counts_update_circuits_apart_from_targets_and_acting(backend, gradient):
    """DQN with epsilon 0 acts greedily at every step (one circuit each); every update evaluates its
    batch (grad) and, without gradient, the batch's next states for the TD targets."""
    batch = 8
    exp = experiment(backend=backend, gradient=gradient, algorithm="dqn", model=TINY_MODEL,
                     training={"episodes": 3, "dqn": {"batch_size": batch, "buffer_size": 100, "epsilon_start": 0.0,
                                                      "epsilon_end": 0.0}})
    result = train(exp, 0)
    updates = result.env_steps - batch + 1  # one per step once the buffer holds a batch (train_every 1)
    assert result.updates == updates > 0
    assert result.grad_circuit_evals == _per_row(backend, gradient, exp, result) * batch * updates
    assert result.total_circuit_evals == result.grad_circuit_evals + batch * updates + result.env_steps


def test_spsa_directions_enter_the_meta_count():
    """m = 3 directions: 7 points per task per gradient, not 3 (the count follows the config)."""
    exp, policy, tasks, losses, theta = setup("pennylane", n_tasks=B, algorithm="fomaml", gradient="spsa",
                                              spsa={"n_directions": 3})
    grads = TaskGradients("spsa", torch.Generator().manual_seed(0), exp.spsa.c, exp.spsa.n_directions)
    _, info = meta_gradient("fomaml", losses, grads, theta, tasks, inner_steps=1, inner_lr=0.05)
    assert info["grad_circuit_evals"] == 2 * B * 7
    assert math.isfinite(info["support_loss_pre"])
