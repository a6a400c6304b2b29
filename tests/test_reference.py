"""The hand-written state vector (tools/reference_statevector.py) as an independent oracle.

It is written from the circuit's description, not from CircuitSpec.gates(), so the golden numbers
below pin the circuit itself, and every backend is compared with it on the published 94-parameter
REINFORCE policy (seed 0) and on odd layouts.
"""

import numpy as np
import pytest
import torch
from conftest import experiment

from models import build_model
from tools import reference_statevector as rs

OBS = np.array([[0.02, 0.3, -0.04, -0.5], [1.5, -1.0, 0.18, 2.0], [-0.7, 0.1, 0.0, 0.9]])
ACTIONS = np.array([0, 1, 1])
RETURNS = np.array([1.0, -0.5, 2.0])
N_EPISODES = 2
REFERENCE_MODEL = {"n_qubits": 4, "n_layers": 5, "observables": ["Z0Z1Z2Z3", "-Z0Z1Z2Z3"], "init": "uniform"}

# Seed-0 policy of configs/cartpole_reinforce.yaml on OBS (computed by the reference; the
# backends agree to 1e-15): logits, REINFORCE loss, and the first gradient entries and norms.
GOLDEN_LOGITS = np.array([[0.3330709796693485, -0.3330709796693485],
                          [0.3957143694124968, -0.3957143694124968],
                          [-0.086309987849993, 0.086309987849993]])
GOLDEN_LOSS = 0.5265326999159727
GOLDEN_GRAD_HEAD = {
    "theta": [0.10049574625448493, -0.07927982194464572, -0.0843716806778232, 0.0891821934342214],
    "input_scaling": [0.02106722174522906, 0.04120820302349076, 0.00346746922298143, -0.13116348799768007],
    "output_weights": [-0.16403172804219956, -0.16403172804219954],
}
GOLDEN_GRAD_NORM = {"theta": 1.3475412699569804, "input_scaling": 0.2380897549557289, "output_weights": 0.23197589445677375}


def torch_loss(model, obs):
    logits = model(torch.as_tensor(obs))
    logp = torch.log_softmax(logits, -1)[torch.arange(len(ACTIONS)), torch.as_tensor(ACTIONS)]
    return -(logp * torch.as_tensor(RETURNS)).sum() / N_EPISODES


@pytest.fixture(scope="module")
def reference():
    model = build_model(experiment(backend="tensorcircuit", gradient="backprop", algorithm="reinforce", model=REFERENCE_MODEL), 4, 2, seed=0)
    policy = rs.ReferencePolicy(rs.layout_of(model), scan=True)
    params = rs.params_of(model)
    loss, grad = policy.loss_and_grad(params, OBS, ACTIONS, RETURNS, N_EPISODES)
    return policy, params, policy.forward(params, OBS), loss, grad


def test_golden_numbers_of_the_published_policy(reference):
    policy, params, logits, loss, grad = reference
    assert sum(v.size for v in params.values()) == 94
    np.testing.assert_allclose(logits, GOLDEN_LOGITS, atol=1e-12, rtol=0)
    assert loss == pytest.approx(GOLDEN_LOSS, abs=1e-12)
    for name, head in GOLDEN_GRAD_HEAD.items():
        np.testing.assert_allclose(grad[name].ravel()[: len(head)], head, atol=1e-12, rtol=0)
        assert np.linalg.norm(grad[name]) == pytest.approx(GOLDEN_GRAD_NORM[name], abs=1e-12)


def test_reference_gradient_equals_its_central_differences(reference):
    """The reference's autodiff against its own forward pass, shifted by hand (no autodiff)."""
    policy, params, _, _, grad = reference
    h = 1e-5
    for name, index in [("theta", (0, 0, 0)), ("theta", (5, 3, 2)), ("theta", (2, 1, 1)), ("input_scaling", (4, 3)),
                        ("input_scaling", (0, 2)), ("output_weights", (1,))]:
        values = []
        for sign in (1, -1):
            shifted = {k: v.copy() for k, v in params.items()}
            shifted[name][index] += sign * h
            logp = torch.log_softmax(torch.as_tensor(policy.forward(shifted, OBS)), -1).numpy()
            values.append(-(logp[np.arange(3), ACTIONS] * RETURNS).sum() / N_EPISODES)
        assert (values[0] - values[1]) / (2 * h) == pytest.approx(grad[name][index], abs=1e-8)


@pytest.mark.parametrize("backend,extra", [
    ("tensorcircuit", {}),
    ("tensorcircuit", {"tensorcircuit": {"fuse_gates": False}}),
    ("pennylane", {}),
    ("pennylane", {"pennylane": {"interface": "torch"}}),
    ("tensorcircuit", {"tensorcircuit": {"math_backend": "pytorch"}}),
])
def test_backends_equal_the_reference_on_the_published_policy(reference, backend, extra):
    _, _, logits, loss, grad = reference
    model = build_model(experiment(backend=backend, gradient="backprop", algorithm="reinforce", model=REFERENCE_MODEL, **extra), 4, 2, seed=0)
    value = torch_loss(model, OBS)
    value.backward()
    np.testing.assert_allclose(model(torch.as_tensor(OBS)).detach().numpy(), logits, atol=1e-10, rtol=0)
    assert float(value) == pytest.approx(loss, abs=1e-10)
    for name, p in model.named_parameters():
        np.testing.assert_allclose(p.grad.numpy(), grad[name], atol=1e-10, rtol=0, err_msg=name)


@pytest.mark.parametrize("algorithm,n_qubits,n_layers", [("dqn", 5, 2), ("reinforce", 2, 3), ("dqn", 3, 1), ("reinforce", 1, 2)])
def test_reference_equals_tensorcircuit_on_other_layouts(algorithm, n_qubits, n_layers):
    """Rings of 1, 2, 3 and 5 qubits, more qubits than inputs, Q heads with two observables."""
    model = build_model(experiment(backend="tensorcircuit", gradient="backprop", algorithm=algorithm,
                                   model={"n_qubits": n_qubits, "n_layers": n_layers}), 4, 2, seed=7)
    reference = rs.ReferencePolicy(rs.layout_of(model), scan=n_layers > 2)
    expected = model(torch.as_tensor(OBS)).detach().numpy()
    np.testing.assert_allclose(reference.forward(rs.params_of(model), OBS), expected, atol=1e-12, rtol=0)


def test_ring_and_readout_diagonals():
    # CZ ring on 3 qubits: -1 for each neighbouring pair of ones (0-1, 1-2, 2-0)
    assert rs.ring_diagonal(3).tolist() == [1, 1, 1, -1, 1, -1, -1, -1]
    assert rs.ring_diagonal(2).tolist() == [1, 1, 1, -1] and rs.ring_diagonal(1).tolist() == [1, 1]
    assert rs.z_diagonal(2, (0,)).tolist() == [1, 1, -1, -1] and rs.z_diagonal(2, (0, 1)).tolist() == [1, -1, -1, 1]
