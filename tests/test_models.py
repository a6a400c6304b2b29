"""The shared circuit on both backends: shapes, initialisation, parity of outputs and gradients."""

import math

import numpy as np
import pytest
import torch
from conftest import experiment

from models import (
    CircuitSpec,
    build_model,
    circuit_spec,
    padded_chunks,
    parse_observable,
)
from backends.pennylane import pennylane_device_for

OBS = torch.tensor([[0.02, 0.3, -0.04, -0.5], [1.5, -1.0, 0.18, 2.0], [-0.7, 0.1, 0.0, 0.9]], dtype=torch.float64)


def reference_model(**model):
    return experiment(backend="tensorcircuit", gradient="backprop", algorithm="reinforce", model=model)


def test_reference_circuit_has_94_parameters():
    model = build_model(reference_model(n_qubits=4, n_layers=5), 4, 2, seed=0)
    assert sum(p.numel() for p in model.parameters()) == 94
    assert model.theta.shape == (6, 4, 3) and model.input_scaling.shape == (5, 4)
    assert torch.equal(model.input_scaling, torch.ones(5, 4)) and torch.equal(model.output_weights, torch.ones(2))
    assert 0 <= model.theta.min() and model.theta.max() <= math.pi


def test_circuit_layout():
    spec = CircuitSpec(2, 1, 4, ((1.0, (0, 1)), (-1.0, (0, 1))))
    kinds = [k for k, _, _ in spec.gates()]
    # layer: 6 rotations, 1 CZ (ring of 2), 4 encodings (features 0..3 on qubits 0,1,0,1); final 6 rotations
    assert kinds == ["rx", "ry", "rz"] * 2 + ["cz"] + ["rx"] * 4 + ["rx", "ry", "rz"] * 2
    assert spec.n_gate_angles == 2 * 2 * 3 + 4
    assert [spec.encoding_qubit(k) for k in range(4)] == [0, 1, 0, 1]
    assert spec.observables == ((0, 1),) and spec.readout_sign == [1.0, -1.0]
    assert CircuitSpec(5, 1, 4, ()).ring == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 0)]


def test_default_observables():
    reinforce = experiment(backend="pennylane", gradient="backprop", algorithm="reinforce")
    dqn = experiment(backend="pennylane", gradient="backprop", algorithm="dqn")
    assert reinforce.default_observables(4) == ["Z0Z1Z2Z3", "-Z0Z1Z2Z3"]
    assert dqn.default_observables(4) == ["Z0Z1", "Z2Z3"]
    assert (reinforce.policy_head, dqn.policy_head) == ("policy", "q")
    assert parse_observable("-Z2Z10") == (-1.0, (2, 10))


@pytest.mark.parametrize("algorithm", ["reinforce", "dqn"])
def test_same_seed_same_initial_weights_on_both_backends(algorithm):
    a = build_model(experiment(backend="pennylane", gradient="backprop", algorithm=algorithm), 4, 2, seed=11)
    b = build_model(experiment(backend="tensorcircuit", gradient="backprop", algorithm=algorithm), 4, 2, seed=11)
    c = build_model(experiment(backend="tensorcircuit", gradient="backprop", algorithm=algorithm), 4, 2, seed=12)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb and torch.equal(pa, pb)
    assert not torch.equal(a.theta, c.theta)


@pytest.mark.parametrize("algorithm,n_qubits,n_layers", [("reinforce", 4, 3), ("dqn", 4, 2), ("reinforce", 2, 2), ("dqn", 5, 1)])
def test_pennylane_and_tensorcircuit_agree(algorithm, n_qubits, n_layers):
    outs, grads = [], []
    for backend, extra in [("pennylane", {"pennylane": {"interface": "torch"}}), ("pennylane", {}), ("tensorcircuit", {}),
                           ("tensorcircuit", {"tensorcircuit": {"math_backend": "pytorch"}})]:
        exp = experiment(backend=backend, gradient="backprop", algorithm=algorithm,
                         model={"n_qubits": n_qubits, "n_layers": n_layers}, **extra)
        model = build_model(exp, 4, 2, seed=5)
        out = model(OBS)
        assert out.dtype == torch.float64 and out.shape == (3, 2)
        outs.append(out.detach())
        grads.append(torch.autograd.grad((out * torch.tensor([1.0, -2.0])).sum(), list(model.parameters())))
    for out, grad in zip(outs[1:], grads[1:]):
        assert torch.allclose(out, outs[0], atol=1e-6, rtol=0)
        for g, g0 in zip(grad, grads[0]):
            assert torch.allclose(g, g0, atol=1e-6, rtol=0)


def test_single_qubit_circuit_matches_closed_form():
    """1 qubit, 1 layer, zero angles: <Z> = cos(lambda * s0) cos(lambda * s1) ... for Rx encodings."""
    exp = experiment(backend="pennylane", gradient="backprop", algorithm="reinforce",
                     model={"n_qubits": 1, "n_layers": 1, "init": "zeros"})
    model = build_model(exp, 4, 2, seed=0)
    out = model(OBS).detach()
    s = OBS / torch.tensor([2.4, 2.5, 0.21, 2.5])
    z = torch.cos(s.sum(1))  # Rx angles on one qubit add up
    assert torch.allclose(out[:, 0], z, atol=1e-12) and torch.allclose(out[:, 1], -z, atol=1e-12)


def test_fused_rotation_is_the_product_of_tensorcircuits_rotations():
    """The closed-form 2x2 of the fused TensorCircuit path against TensorCircuit's own Rz @ Ry @ Rx
    matrices, multiplied (and against the identity at zero angles)."""
    from models import fused_rotation, use_tensorcircuit

    tc = use_tensorcircuit("jax")
    rng = np.random.default_rng(3)
    for tx, ty, tz in [(0.0, 0.0, 0.0), *rng.uniform(-7, 7, (6, 3))]:
        expected = np.asarray(tc.gates.rz_gate(tz).tensor @ tc.gates.ry_gate(ty).tensor @ tc.gates.rx_gate(tx).tensor)
        np.testing.assert_allclose(np.asarray(fused_rotation(tx, ty, tz)), expected, atol=1e-14, rtol=0)
    np.testing.assert_allclose(np.asarray(fused_rotation(0.0, 0.0, 0.0)), np.eye(2), atol=0)


def test_jax_bridge_gradient_is_first_order_only():
    """The bridge's backward pass contracts a stored Jacobian: differentiating the gradient again
    must raise, never return a silent zero second-order term."""
    from models import TensorCircuitCircuit

    spec = CircuitSpec(2, 1, 4, ((1.0, (0, 1)), (-1.0, (0, 1))))
    angles = torch.linspace(-1, 1, 2 * spec.n_gate_angles, dtype=torch.float64).reshape(2, -1).requires_grad_(True)
    (g,) = torch.autograd.grad(TensorCircuitCircuit(spec)(angles).sum(), angles, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(g.sum(), angles)


def test_functional_forward_matches_forward_for_every_backend():
    for backend in ("classical", "pennylane", "tensorcircuit"):
        exp = experiment(backend=backend, gradient="spsa", algorithm="dqn", model={"n_qubits": 2, "n_layers": 1, "hidden_sizes": [8]})
        model = build_model(exp, 4, 2, seed=1)
        flat = model.flat_parameters()
        batch = torch.stack([flat, flat + 0.1])
        out = model.functional_forward(batch, OBS)
        assert out.shape == (2, 3, 2)
        assert torch.allclose(out[0], model(OBS).detach(), atol=1e-12)
        assert not torch.allclose(out[1], out[0])


def test_padded_chunks():
    assert padded_chunks(1) == [(0, 1, 1)] and padded_chunks(5) == [(0, 5, 5)] and padded_chunks(16) == [(0, 16, 16)]
    assert padded_chunks(17) == [(0, 17, 128)] and padded_chunks(5, small=False) == [(0, 5, 128)]
    assert padded_chunks(300) == [(0, 128, 128), (128, 256, 128), (256, 300, 128)]


@pytest.mark.parametrize("backend", ["tensorcircuit", "pennylane"])
def test_jitted_backends_compile_each_shape_once_and_chunk_exactly(backend):
    """Forward and vector-Jacobian product compile once per shape, whatever the batch; small and
    chunked batches give the same outputs and gradients as PennyLane's torch interface."""
    rng = np.random.default_rng(0)
    exp = experiment(backend=backend, gradient="backprop", model={"n_qubits": 2, "n_layers": 1})
    model = build_model(exp, 4, 2, seed=0)
    assert model.circuit.name == backend and model.n_compiles == 0
    sizes = (1, 3, 3, 7, 7, 100, 1500)  # shapes 1, 3, 3, 7, 7 (small: unpadded), 128, 12 x 128
    for _ in range(2):
        with torch.no_grad():
            for n in sizes:
                model(torch.as_tensor(rng.normal(size=(n, 4))))
    assert model.n_compiles == 4  # forward at 1, 3, 7, 128
    assert model.circuit_evals == 2 * sum(sizes)  # padding is not counted
    obs = torch.as_tensor(rng.normal(size=(1500, 4)))
    reference = build_model(experiment(backend="pennylane", gradient="backprop", model={"n_qubits": 2, "n_layers": 1},
                                       pennylane={"interface": "torch"}), 4, 2, seed=0)
    for m in (model, reference):
        (m(obs) * torch.tensor([1.0, -2.0])).sum().backward()
    assert model.n_compiles == 5  # + the vector-Jacobian product at 128
    for p, p0 in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.allclose(p.grad, p0.grad, atol=1e-9, rtol=0)
    model(obs[:100]).sum().backward()
    model(obs[:3]).sum().backward()  # calls with gradient always use the chunk shape
    assert model.n_compiles == 5 and model.compile_s > 0


@pytest.mark.parametrize("backend, gradient", [("tensorcircuit", "backprop"), ("pennylane", "backprop"),
                                               ("tensorcircuit", "parameter-shift")])
@pytest.mark.parametrize("algorithm", ["reinforce", "dqn"])
def test_acting_runs_the_whole_policy_in_one_compiled_call(backend, gradient, algorithm):
    """Small batches without gradient on a jax backend: gate angles, circuit and readout in one
    compiled call (ReUploadingPQC.forward -> circuit.act). The same outputs as the torch path around
    the circuit, the same circuit count, one compilation per shape; with gradient the torch path."""
    exp = experiment(backend=backend, gradient=gradient, algorithm=algorithm, model={"n_qubits": 3, "n_layers": 2, "beta": 2.5})
    model = build_model(exp, 4, 2, seed=3)
    assert model.circuit.compiles_policies and model.n_compiles == 0
    with torch.no_grad():  # every parameter away from its default, so a mixed-up index or factor shows
        model.input_scaling.copy_(torch.linspace(0.5, 1.5, model.input_scaling.numel()).reshape(model.input_scaling.shape))
        model.output_weights.copy_(torch.tensor([0.7, -1.3], dtype=torch.float64))
        fast = model(OBS)
        assert (model.circuit_evals, model.n_compiles) == (3, 1)  # the policy function at 3 rows
        model(OBS[:2]), model(OBS)
        assert (model.circuit_evals, model.n_compiles) == (8, 2)  # + the 2-row shape, nothing else
        torch_path = model._forward(model.theta[None], model.input_scaling[None], model.output_weights[None], OBS)[0]
    assert torch.allclose(fast, torch_path, atol=1e-12, rtol=0) and fast.abs().max() > 1e-2
    assert fast.shape == (3, 2) and not fast.requires_grad
    out = model(OBS)  # autograd wants the gradient: the torch path, differentiable
    assert out.requires_grad and torch.allclose(out.detach(), fast, atol=1e-12, rtol=0)
    out.sum().backward()
    assert model.output_weights.grad is not None and model.theta.grad.abs().sum() > 0


def test_precompile_acting_compiles_the_acting_call_without_counting_circuits():
    model = build_model(experiment(backend="tensorcircuit", gradient="backprop", algorithm="dqn",
                                   model={"n_qubits": 2, "n_layers": 1}), 4, 2, seed=0)
    model.precompile_acting(1)
    assert (model.n_compiles, model.circuit_evals) == (1, 0)
    with torch.no_grad():
        model(OBS[:1])
    assert (model.n_compiles, model.circuit_evals) == (1, 1)


def test_pennylane_unrolled_jax_qnode_agrees_with_the_scanned_one():
    """scan_layers=False: the whole circuit as one broadcasting QNode under jax.jit."""
    outs = []
    for scan in (True, False):
        exp = experiment(backend="pennylane", gradient="backprop", model={"n_qubits": 3, "n_layers": 2}, pennylane={"scan_layers": scan})
        model = build_model(exp, 4, 2, seed=2)
        assert model.circuit.scan_layers is scan
        out = model(OBS)
        outs.append((out.detach(), torch.autograd.grad(out.sum(), list(model.parameters()))))
    assert torch.allclose(outs[0][0], outs[1][0], atol=1e-12)
    for g, g0 in zip(outs[0][1], outs[1][1]):
        assert torch.allclose(g, g0, atol=1e-12)


@pytest.mark.parametrize("gradient,algorithm,interface,expected", [
    ("backprop", "reinforce", "auto", "jax"), ("spsa", "dqn", "auto", "jax"), ("finite-diff", "dqn", "auto", "jax"),
    ("parameter-shift", "reinforce", "auto", "jax"), ("adjoint", "reinforce", "auto", "torch"),
    ("backprop", "reinforce", "torch", "torch"), ("spsa", "reinforce", "torch", "torch"),
])
def test_pennylane_interface_choice(gradient, algorithm, interface, expected):
    model = build_model(experiment(backend="pennylane", gradient=gradient, algorithm=algorithm, pennylane={"interface": interface}), 4, 2, seed=0)
    circuit = getattr(model.circuit, "inner", model.circuit)
    assert circuit.interface == expected
    assert (model.n_compiles is not None) == (expected == "jax")


def test_pennylane_device_choice():
    assert pennylane_device_for("adjoint", "auto") == "lightning.qubit"
    assert pennylane_device_for("backprop", "auto") == "default.qubit"
    assert pennylane_device_for("adjoint", "default.qubit") == "default.qubit"
    model = build_model(experiment(backend="pennylane", gradient="adjoint"), 4, 2, seed=0)
    assert model.circuit.device_name == "lightning.qubit" and model.circuit.diff_method == "adjoint"


def test_circuit_spec_rejects_wrong_observable_count():
    exp = experiment(backend="pennylane", gradient="backprop", model={"observables": ["Z0", "Z1"]})
    with pytest.raises(ValueError, match="observables"):
        circuit_spec(exp, 4, 3)


def test_pennylane_adjoint_forward_without_gradient_broadcasts_with_the_same_values():
    """lightning.qubit splits broadcast batches; gradient-free calls go to default.qubit broadcasting."""
    model = build_model(experiment(backend="pennylane", gradient="adjoint", algorithm="dqn"), 4, 2, seed=3)
    with torch.no_grad():
        broadcast = model(OBS)
    per_row = model(OBS).detach()  # grad enabled: lightning.qubit, one simulation per row
    assert torch.allclose(broadcast, per_row, atol=1e-6, rtol=0)  # lightning differs by ~1e-8
    assert model.circuit._broadcast_qnode.device.name == "default.qubit"


def test_mlp_functional_forward_in_chunks_equals_one_call(monkeypatch):
    import models

    model = build_model(experiment(backend="classical", gradient="finite-diff", algorithm="dqn", model={"hidden_sizes": [8]}), 4, 2, seed=0)
    points = model.flat_parameters()[None] + 0.01 * torch.randn(7, model.flat_parameters().numel(), dtype=torch.float64)
    whole = model.functional_forward(points, OBS)
    monkeypatch.setattr(models, "MLP_ROWS_PER_CALL", 4)  # 1 parameter set (3 observations) per call
    assert torch.equal(model.functional_forward(points, OBS), whole) and whole.shape == (7, 3, 2)


@pytest.mark.parametrize("fields,message", [
    ({"gradient": "adjoint", "pennylane": {"interface": "jax"}}, "adjoint and lightning.qubit need interface 'torch'"),
    ({"gradient": "spsa", "pennylane": {"interface": "jax", "device": "lightning.qubit"}}, "adjoint and lightning.qubit"),
    ({"gradient": "backprop", "task": "qubit_meta", "algorithm": "maml", "pennylane": {"interface": "jax"}},
     "pennylane with interface 'auto' or 'torch'"),
])
def test_pennylane_jax_interface_rejects_what_it_cannot_do(fields, message):
    from config_schema import ConfigError

    with pytest.raises(ConfigError, match=message):
        experiment(backend="pennylane", **fields)


def test_maml_on_pennylane_auto_stays_on_the_torch_interface():
    exp = experiment(backend="pennylane", gradient="backprop", task="qubit_meta", algorithm="maml")
    assert exp.pennylane_interface == "torch" and exp.second_order_capable
    assert experiment(backend="pennylane", gradient="backprop", task="qubit_meta", algorithm="fomaml").pennylane_interface == "jax"
