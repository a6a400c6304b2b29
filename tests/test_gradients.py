"""Gradient estimators: exact on analytic functions, equal to autodiff on the real circuit."""

import math

import pytest
import torch
from conftest import experiment

import gradients
from models import build_model



@pytest.fixture(autouse=True)
def float64_default():
    """float64 by default in this module's tests only: set at import, it leaked into every test of
    the session (Stable-Baselines3's float32 critics then met float64 layers)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def quadratic(a: torch.Tensor, b: torch.Tensor):
    """f(x) = 1/2 x^T A x + b^T x, batched over rows; gradient A x + b."""

    def f(points):
        return 0.5 * torch.einsum("mi,ij,mj->m", points, a, points) + points @ b

    return f


@pytest.fixture
def quad():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(5, 5, generator=g)
    a = m @ m.T + torch.eye(5)
    b = torch.randn(5, generator=g)
    x = torch.randn(5, generator=g)
    return quadratic(a, b), x, a @ x + b


def test_central_difference_is_exact_on_a_quadratic(quad):
    f, x, grad = quad
    est = gradients.finite_difference(f, x, step=1e-3, scheme="central")
    assert torch.allclose(est.grad, grad, atol=1e-9)
    assert est.n_points == 2 * 5 + 1
    assert torch.isclose(est.loss, f(x[None])[0])


def test_forward_difference_has_first_order_error(quad):
    f, x, grad = quad
    est = gradients.finite_difference(f, x, step=1e-6, scheme="forward")
    assert est.n_points == 5 + 1
    assert torch.allclose(est.grad, grad, atol=1e-4)
    coarse = gradients.finite_difference(f, x, step=1e-1, scheme="forward")
    assert (coarse.grad - grad).abs().max() > 1e-3  # O(h): a large step is visibly off


def test_finite_difference_rejects_bad_options(quad):
    f, x, _ = quad
    with pytest.raises(ValueError, match="scheme"):
        gradients.finite_difference(f, x, scheme="backward")
    with pytest.raises(ValueError, match="step"):
        gradients.finite_difference(f, x, step=0.0)


@pytest.mark.parametrize("scheme", ["central", "forward"])
@pytest.mark.parametrize("chunk", [1, 2, 4, 5, 7])
def test_chunked_finite_difference_equals_one_call(quad, scheme, chunk):
    """Chunks of coordinates give the same numbers and the same point count as one batched call,
    and no call of f sees more than the chunk's shifted points (plus the unshifted one, once)."""
    f, x, _ = quad
    calls = []

    def counting(points):
        calls.append(points.shape[0])
        return f(points)

    whole = gradients.finite_difference(f, x, 1e-3, scheme, chunk=5)
    est = gradients.finite_difference(counting, x, 1e-3, scheme, chunk=chunk)
    assert torch.equal(est.grad, whole.grad) and torch.equal(est.loss, whole.loss)
    assert est.n_points == whole.n_points == sum(calls) == (2 if scheme == "central" else 1) * 5 + 1
    per_point = 2 if scheme == "central" else 1
    assert max(calls) <= per_point * chunk + 1 and len(calls) == math.ceil(5 / chunk)


@pytest.mark.parametrize("chunk", [1, 3, 5])
def test_chunked_coordinate_spsa_equals_one_call(quad, chunk):
    f, x, grad = quad
    calls = []

    def counting(points):
        calls.append(points.shape[0])
        return f(points)

    c = 1e-3 / math.sqrt(5)
    whole = gradients.spsa(f, x, c, 5, torch.Generator(), sampler=gradients.coordinate_directions, chunk=5)
    est = gradients.spsa(counting, x, c, 5, torch.Generator(), sampler=gradients.coordinate_directions, chunk=chunk)
    assert torch.allclose(est.grad, whole.grad, atol=1e-13, rtol=0) and torch.allclose(est.grad, grad, atol=1e-9)
    assert est.n_points == sum(calls) == 11 and max(calls) <= 2 * chunk + 1


def test_default_chunk_bounds_the_shift_matrix(monkeypatch):
    """Memory is O(chunk x P): with 2^12 entries per call, 1000 parameters go 4 coordinates at a time."""
    monkeypatch.setattr(gradients, "POINT_ENTRIES_PER_CALL", 1 << 12)
    assert gradients.points_per_call(1000) == 4 and gradients.points_per_call(10**6) == 1
    sizes = []
    b = torch.linspace(-1, 1, 1000)

    def f(points):
        sizes.append(points.numel())
        return points @ b + (points**2).sum(1)

    x = torch.linspace(0, 1, 1000)
    est = gradients.finite_difference(f, x, 1e-3)
    assert torch.allclose(est.grad, b + 2 * x, atol=1e-8)
    assert max(sizes) <= (2 * 4 + 1) * 1000 and est.n_points == 2001
    with pytest.raises(ValueError, match="chunk"):
        gradients.points_per_call(10, chunk=0)


def test_spsa_with_coordinate_sampler_equals_central_difference(quad):
    f, x, grad = quad
    c = 1e-3 / math.sqrt(5)
    est = gradients.spsa(f, x, c, 5, torch.Generator(), sampler=gradients.coordinate_directions)
    assert torch.allclose(est.grad, grad, atol=1e-9)
    assert est.n_points == 2 * 5 + 1


def test_spsa_is_unbiased_on_a_quadratic(quad):
    """Mean of N Rademacher estimates is within 5 standard errors of the true gradient."""
    f, x, grad = quad
    gen = torch.Generator().manual_seed(1)
    samples = torch.stack([gradients.spsa(f, x, 0.05, 1, gen).grad for _ in range(4000)])
    mean, sem = samples.mean(0), samples.std(0) / math.sqrt(len(samples))
    assert ((mean - grad).abs() < 5 * sem + 1e-12).all(), (mean, grad, sem)
    # and it is a genuinely noisy estimator (a test that would pass with grad returned directly must not)
    assert (samples.std(0) > 0.1).all()


def test_spsa_directions_are_reproducible_from_the_generator(quad):
    f, x, _ = quad
    a = gradients.spsa(f, x, 0.1, 3, torch.Generator().manual_seed(7)).grad
    b = gradients.spsa(f, x, 0.1, 3, torch.Generator().manual_seed(7)).grad
    c = gradients.spsa(f, x, 0.1, 3, torch.Generator().manual_seed(8)).grad
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_spsa_gain_schedules():
    gains = gradients.SPSAGains(c=0.2, A=10, alpha=0.602, gamma=0.101)
    assert gains.c_k(0) == pytest.approx(0.2)
    assert gains.c_k(9) == pytest.approx(0.2 / 10**0.101)
    assert gains.a_k(0) == pytest.approx(1.0)  # a unset -> a_0 = 1
    assert gains.a_k(5) == pytest.approx((11 / 16) ** 0.602)
    assert gradients.SPSAGains(a=2.0, A=0, alpha=1.0).a_k(1) == pytest.approx(1.0)


def test_estimated_loss_writes_the_estimate_into_grad(quad):
    f, x0, grad = quad
    p1 = torch.nn.Parameter(x0[:2].clone())
    p2 = torch.nn.Parameter(x0[2:].clone())
    loss, est = gradients.estimated_loss([p1, p2], lambda x: gradients.finite_difference(f, x, 1e-3))
    loss.backward()
    assert torch.allclose(torch.cat([p1.grad, p2.grad]), grad, atol=1e-9)
    assert torch.isclose(loss.detach(), f(x0[None])[0])


# ---------------------------------------------------------------------------------------------
# On the real circuit


def _policy_loss_setup(backend, gradient, **extra):
    exp = experiment(backend=backend, gradient=gradient, algorithm="reinforce",
                     model={"n_qubits": 3, "n_layers": 2, "init": "uniform"}, **extra)
    model = build_model(exp, 4, 2, seed=3)
    obs = torch.tensor([[0.1, -0.4, 0.05, 0.3], [-1.2, 0.8, -0.1, -0.6], [0.5, 0.0, 0.15, 1.1]])
    actions = torch.tensor([0, 1, 1])
    weights = torch.tensor([1.0, -0.5, 2.0])

    def loss_of_outputs(out):
        return -(torch.log_softmax(out, -1)[..., torch.arange(3), actions] * weights).sum(-1)

    return model, obs, loss_of_outputs


def _autodiff_grad(backend="tensorcircuit"):
    model, obs, loss_fn = _policy_loss_setup(backend, "backprop")
    loss = loss_fn(model(obs)[None])[0]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))]), loss


@pytest.mark.parametrize("backend,gradient", [
    ("pennylane", "backprop"), ("pennylane", "adjoint"), ("pennylane", "parameter-shift"),
    ("tensorcircuit", "parameter-shift"),
])
def test_autograd_methods_agree_with_autodiff(backend, gradient):
    reference, ref_loss = _autodiff_grad()
    model, obs, loss_fn = _policy_loss_setup(backend, gradient)
    loss = loss_fn(model(obs)[None])[0]
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])
    assert torch.isclose(loss, ref_loss, atol=1e-10)
    assert torch.allclose(grad, reference, atol=1e-8), (grad - reference).abs().max()


@pytest.mark.parametrize("backend", ["pennylane", "tensorcircuit"])
def test_estimators_agree_with_autodiff_on_the_circuit(backend):
    reference, _ = _autodiff_grad()
    model, obs, loss_fn = _policy_loss_setup(backend, "finite-diff")
    f = lambda points: loss_fn(model.functional_forward(points, obs))
    x = model.flat_parameters()
    fd = gradients.finite_difference(f, x, step=1e-4)
    assert torch.allclose(fd.grad, reference, atol=1e-6), (fd.grad - reference).abs().max()
    n = x.numel()
    sp = gradients.spsa(f, x, 1e-4 / math.sqrt(n), n, torch.Generator(), sampler=gradients.coordinate_directions)
    assert torch.allclose(sp.grad, reference, atol=1e-6)
    before = model.circuit_evals
    gradients.finite_difference(f, x, step=1e-4)
    assert model.circuit_evals - before == (2 * n + 1) * obs.shape[0]


def test_parameter_shift_matches_pennylane_native_parameter_shift_on_one_sample():
    """Our rule on the broadcast batch equals PennyLane's own param_shift on an unbroadcast circuit."""
    import pennylane as qml

    model, obs, _ = _policy_loss_setup("pennylane", "parameter-shift")
    angles = model.gate_angles(model.theta[None], model.input_scaling[None], obs[:1]).detach()
    spec = model.spec
    dev = qml.device("default.qubit", wires=spec.n_qubits)
    ops = {"rx": qml.RX, "ry": qml.RY, "rz": qml.RZ}

    @qml.qnode(dev, interface="torch", diff_method="parameter-shift")
    def native(a):
        for kind, wires, idx in spec.gates():
            if kind == "cz":
                qml.CZ(wires=list(wires))
            else:
                ops[kind](a[idx], wires=wires[0])
        return qml.expval(qml.prod(*[qml.Z(q) for q in spec.observables[0]]))

    a = angles[0].clone().requires_grad_(True)
    (native_grad,) = torch.autograd.grad(native(a), a)
    b = angles.clone().requires_grad_(True)
    ours = model.circuit(b)[:, 0]
    (our_grad,) = torch.autograd.grad(ours.sum(), b)
    assert torch.allclose(our_grad[0], native_grad, atol=1e-10)


@pytest.mark.parametrize("backend,extra", [("pennylane", {}), ("pennylane", {"pennylane": {"interface": "torch"}}),
                                           ("tensorcircuit", {})])
@pytest.mark.parametrize("gradient", ["backprop", "parameter-shift", "spsa", "finite-diff"])
def test_circuits_per_gradient_step_are_exact(backend, extra, gradient):
    """One update on N observations executes N circuits (backprop), N + 2GN (parameter shift: the
    forward pass, then every gate angle shifted both ways), (2m + 1)N (SPSA) or (2P + 1)N (central
    differences), on PennyLane's jax and torch paths alike; padding is never counted."""
    from train import GradientStep

    model, obs, loss_fn = _policy_loss_setup(backend, gradient, **extra)
    exp = experiment(backend=backend, gradient=gradient, algorithm="reinforce", model={"n_qubits": 3, "n_layers": 2}, **extra)
    stats = GradientStep(model, exp, seed=0)(obs, loss_fn, "test")
    n, g, p = obs.shape[0], model.spec.n_gate_angles, model.flat_parameters().numel()
    expected = {"backprop": n, "parameter-shift": n + 2 * g * n, "spsa": (2 * exp.spsa.n_directions + 1) * n,
                "finite-diff": (2 * p + 1) * n}[gradient]
    assert stats["circuit_evals"] == expected
