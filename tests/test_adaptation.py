"""The adaptation library (meta/adaptation.py) and the SSM (models.py): the seed's examples with
only their import lines changed, MAML against closed forms on linear regression, the Adapter's
trust region and EMA exactly, the SSM against an independent recurrence and the exact solution of
its continuous system, and the policy circuits of models.py on both quantum backends."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import experiment
from scipy.special import erf
from torch import nn

from meta import AdaptationConfig, Adapter, MetaMAML
from meta.adaptation import prediction_entropy
from models import SSM, build_model

# ---------------------------------------------------------------------------------------------
# The seed's examples (ssm_meta_rl_test_time_adaptation.md), imports changed only


def test_seed_example_ssm():
    import torch

    from models import SSM

    # Initialize SSM with exact default values
    model = SSM(state_dim=10, hidden_dim=128, output_dim=32, device='cpu')

    # Forward pass
    state = torch.randn(32, 10)  # batch_size=32, state_dim=10
    output = model.forward(state)  # Returns single tensor
    assert output.shape == (32, 32)  # (batch_size, output_dim)

    # With hidden state
    output = model.forward(state, hidden_state=None)


def test_seed_example_metamaml():
    import torch
    import torch.nn as nn

    from meta import MetaMAML
    from models import SSM

    # Create base model
    model = SSM(state_dim=4, hidden_dim=128, output_dim=1, device='cpu')

    # Create MetaMAML with exact signature
    meta_learner = MetaMAML(model, inner_lr=0.01, outer_lr=0.001, first_order=False)

    # Prepare task data
    support_x = torch.randn(10, 4)
    support_y = torch.randn(10, 1)
    query_x = torch.randn(10, 4)
    query_y = torch.randn(10, 1)

    loss_fn = nn.MSELoss()

    # Adapt to single task
    adapted_model = meta_learner.adapt(support_x, support_y, loss_fn, num_steps=5)

    # Meta-update across multiple tasks
    tasks = [(support_x, support_y, query_x, query_y) for _ in range(8)]
    meta_loss = meta_learner.meta_update(tasks, loss_fn)
    assert isinstance(adapted_model, SSM) and adapted_model is not model
    assert isinstance(meta_loss, float) and math.isfinite(meta_loss)


def test_seed_example_adapter():
    import torch
    import torch.nn as nn

    from meta import AdaptationConfig, Adapter
    from models import SSM

    # Create model
    model = SSM(state_dim=4, hidden_dim=128, output_dim=1, device='cpu')

    # Create config with exact fields from implementation
    config = AdaptationConfig(
        lr=0.01,
        grad_clip_norm=1.0,
        trust_region_eps=0.01,
        ema_decay=0.99,
        entropy_weight=0.01,
        max_steps_per_call=5
    )

    # Create Adapter with exact signature
    adapter = Adapter(model, config)

    # Prepare batch
    states = torch.randn(16, 4)
    targets = torch.randn(16, 1)
    batch_dict = {'states': states, 'targets': targets}

    loss_fn = nn.MSELoss()

    # Perform adaptation
    loss = adapter.adapt(loss_fn, batch_dict)
    print(f"Adaptation loss: {loss:.4f}")
    assert isinstance(loss, float) and adapter.distance() <= 0.01 + 1e-6


def test_seed_main_example():
    import torch
    import torch.nn as nn

    from meta import AdaptationConfig, Adapter, MetaMAML
    from models import SSM

    # 1. Create SSM with exact defaults
    model = SSM(state_dim=4, hidden_dim=128, output_dim=1, device='cpu')

    # 2. Meta-training with MetaMAML
    meta_learner = MetaMAML(model, inner_lr=0.01, outer_lr=0.001, first_order=False)

    # Prepare tasks: List[Tuple[support_x, support_y, query_x, query_y]]
    tasks = []
    for _ in range(8):
        support_x = torch.randn(10, 4)
        support_y = torch.randn(10, 1)
        query_x = torch.randn(10, 4)
        query_y = torch.randn(10, 1)
        tasks.append((support_x, support_y, query_x, query_y))

    loss_fn = nn.MSELoss()
    meta_loss = meta_learner.meta_update(tasks, loss_fn)

    # 3. Test-time adaptation with Adapter
    config = AdaptationConfig(
        lr=0.01,
        grad_clip_norm=1.0,
        trust_region_eps=0.01,
        ema_decay=0.99,
        entropy_weight=0.01,
        max_steps_per_call=5
    )

    adapter = Adapter(model, config)

    batch_dict = {
        'states': torch.randn(16, 4),
        'targets': torch.randn(16, 1)
    }

    adapt_loss = adapter.adapt(loss_fn, batch_dict)
    assert math.isfinite(meta_loss) and math.isfinite(adapt_loss)


# ---------------------------------------------------------------------------------------------
# MetaMAML against closed forms: linear regression y = x . w, MSE


def _regression_tasks(n_tasks=3, d=3, n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_tasks):
        w_task = torch.randn(d, 1, generator=gen, dtype=torch.float64)
        xs, xq = (torch.randn(n, d, generator=gen, dtype=torch.float64) for _ in range(2))
        out.append((xs, xs @ w_task, xq, xq @ w_task + 0.1))
    return out


def _linear(d=3, seed=1):
    torch.manual_seed(seed)
    return nn.Linear(d, 1, bias=False, dtype=torch.float64)


def _closed_form(w0, tasks, lr, steps, first_order):
    """Meta-loss and meta-gradient by hand. MSE L(w) = |X w - y|^2 / n, grad = 2 X^T (X w - y) / n,
    Hessian 2 X^T X / n; phi_{k+1} = phi_k - lr grad_s(phi_k); second order:
    dL_q/dw0 = prod_k (I - lr H_s)^T grad_q(phi_K), first order: grad_q(phi_K)."""
    w0 = w0.numpy().reshape(-1, 1)
    losses, grads = [], []
    for xs, ys, xq, yq in tasks:
        xs, ys, xq, yq = (t.numpy() for t in (xs, ys, xq, yq))
        n, m = len(xs), len(xq)
        phi = w0
        for _ in range(steps):
            phi = phi - lr * 2 * xs.T @ (xs @ phi - ys) / n
        losses.append(float(((xq @ phi - yq) ** 2).mean()))
        g = 2 * xq.T @ (xq @ phi - yq) / m
        if not first_order:
            jac = np.linalg.matrix_power(np.eye(len(w0)) - lr * 2 * xs.T @ xs / n, steps)
            g = jac.T @ g
        grads.append(g)
    return np.mean(losses), np.mean(grads, axis=0).reshape(1, -1)


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("first_order", [False, True])
def test_meta_gradient_equals_the_closed_form(steps, first_order):
    model, tasks, lr = _linear(), _regression_tasks(), 0.1
    loss, grads = MetaMAML(model, inner_lr=lr, outer_lr=0.01, first_order=first_order).meta_gradient(tasks, nn.MSELoss(), steps)
    want_loss, want_grad = _closed_form(model.weight.detach(), tasks, lr, steps, first_order)
    assert loss == pytest.approx(want_loss, rel=1e-12)
    np.testing.assert_allclose(grads["weight"].numpy(), want_grad, rtol=1e-10, atol=1e-12)


def test_second_order_differs_from_first_order_by_the_inner_hessian():
    model, tasks = _linear(), _regression_tasks()
    _, second = MetaMAML(model, 0.1, 0.01).meta_gradient(tasks, nn.MSELoss(), 1)
    _, first = MetaMAML(model, 0.1, 0.01, first_order=True).meta_gradient(tasks, nn.MSELoss(), 1)
    assert float((second["weight"] - first["weight"]).norm()) > 0.05 * float(first["weight"].norm())


def test_meta_update_takes_one_adam_step_along_the_meta_gradient():
    model, tasks, lr, outer = _linear(), _regression_tasks(), 0.1, 0.01
    w0 = model.weight.detach().clone()
    loss = MetaMAML(model, lr, outer).meta_update(tasks, nn.MSELoss(), num_steps=2)
    want_loss, g = _closed_form(w0, tasks, lr, 2, first_order=False)
    assert loss == pytest.approx(want_loss, rel=1e-12)
    # Adam's first step: m / (sqrt(v) + eps) = g / (|g| + 1e-8)
    np.testing.assert_allclose(model.weight.detach().numpy(), w0.numpy() - outer * g / (np.abs(g) + 1e-8), rtol=0, atol=1e-12)


def test_adapt_returns_an_adapted_copy_and_leaves_the_original_untouched():
    model, tasks, lr = _linear(), _regression_tasks(), 0.1
    xs, ys, _, _ = tasks[0]
    before = model.weight.detach().clone()
    maml = MetaMAML(model, lr, 0.01)
    adapted = maml.adapt(xs, ys, nn.MSELoss(), num_steps=3)
    assert torch.equal(model.weight, before) and model.weight.grad is None
    phi = before.numpy().reshape(-1, 1)
    for _ in range(3):
        phi = phi - lr * 2 * xs.numpy().T @ (xs.numpy() @ phi - ys.numpy()) / len(xs)
    np.testing.assert_allclose(adapted.weight.detach().numpy(), phi.reshape(1, -1), rtol=1e-12)
    assert adapted is not model and adapted.weight is not model.weight
    assert torch.equal(maml.adapt(xs, ys, nn.MSELoss(), num_steps=0).weight, before)
    assert nn.MSELoss()(adapted(xs), ys) < nn.MSELoss()(model(xs), ys)


@pytest.mark.parametrize("bad", [dict(inner_lr=-0.1), dict(outer_lr=0), dict(inner_lr=float("nan"))])
def test_metamaml_rejects_bad_learning_rates(bad):
    kwargs = dict(inner_lr=0.1, outer_lr=0.01) | bad
    with pytest.raises(ValueError, match=f"MetaMAML {next(iter(bad))}") as info:
        MetaMAML(_linear(), **kwargs)
    assert "\n" not in str(info.value)


def test_meta_update_rejects_malformed_tasks():
    maml = MetaMAML(_linear(), 0.1, 0.01)
    with pytest.raises(ValueError, match="non-empty list"):
        maml.meta_update([], nn.MSELoss())
    with pytest.raises(ValueError, match=r"tasks\[0\]"):
        maml.meta_update([(torch.zeros(2, 3), torch.zeros(2, 1))], nn.MSELoss())


# ---------------------------------------------------------------------------------------------
# Adapter: clipping, trust region and EMA exactly


def _config(**changes):
    base = dict(lr=0.5, grad_clip_norm=1.0, trust_region_eps=10.0, ema_decay=0.9, entropy_weight=0.0, max_steps_per_call=1)
    return AdaptationConfig(**(base | changes))


def _batch(seed=0, d=3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(8, d, generator=gen, dtype=torch.float64)
    return {"states": x, "targets": x @ torch.tensor([[1.0], [-2.0], [3.0]], dtype=torch.float64)}


def _grad(model, batch):
    x, y = batch["states"].numpy(), batch["targets"].numpy()
    w = model.weight.detach().numpy().reshape(-1, 1)
    return (2 * x.T @ (x @ w - y) / len(x)).reshape(1, -1)


def test_adapter_step_clips_the_gradient_norm():
    model, batch = _linear(), _batch()
    w0 = model.weight.detach().numpy().copy()
    g = _grad(model, batch)
    assert np.linalg.norm(g) > 1.0  # so the clip is active
    Adapter(model, _config()).adapt(nn.MSELoss(), batch)
    np.testing.assert_allclose(model.weight.detach().numpy(), w0 - 0.5 * g / np.linalg.norm(g), rtol=1e-6)


def test_adapter_projects_onto_the_trust_region():
    model, batch = _linear(), _batch()
    w0 = model.weight.detach().numpy().copy()
    g = _grad(model, batch)
    adapter = Adapter(model, _config(trust_region_eps=0.05, grad_clip_norm=100.0, max_steps_per_call=3))
    adapter.adapt(nn.MSELoss(), batch)
    # the first step leaves the ball and is projected: w0 - 0.05 g/|g|; later steps stay on the ball
    assert adapter.distance() == pytest.approx(0.05, rel=1e-9)
    adapter2 = Adapter(model2 := _linear(), _config(trust_region_eps=0.05, grad_clip_norm=100.0))
    adapter2.adapt(nn.MSELoss(), batch)
    np.testing.assert_allclose(model2.weight.detach().numpy(), w0 - 0.05 * g / np.linalg.norm(g), rtol=1e-9)
    for _ in range(5):
        adapter.adapt(nn.MSELoss(), batch)
        assert adapter.distance() <= 0.05 * (1 + 1e-12)


def test_adapter_keeps_an_exact_ema():
    model, batch = _linear(), _batch()
    adapter = Adapter(model, _config(ema_decay=0.7, lr=0.05, grad_clip_norm=100.0))
    ema = model.weight.detach().clone()
    for _ in range(4):
        adapter.adapt(nn.MSELoss(), batch)
        ema = 0.7 * ema + 0.3 * model.weight.detach()
        torch.testing.assert_close(adapter.ema[0], ema, rtol=1e-14, atol=1e-14)
    assert not torch.equal(adapter.ema[0], model.weight.detach())
    torch.testing.assert_close(adapter.ema_model().weight.detach(), ema)
    adapter.reset()
    torch.testing.assert_close(model.weight.detach(), adapter.start[0])


def test_adapter_returns_the_objective_with_the_entropy_term():
    model = nn.Linear(2, 3, dtype=torch.float64)
    x = torch.randn(5, 2, dtype=torch.float64)
    with torch.no_grad():
        p = torch.softmax(model(x), -1)
        entropy = float(-(p * p.log()).sum(-1).mean())
    adapter = Adapter(model, _config(entropy_weight=0.3, lr=0.1))
    value = adapter.adapt(lambda out: 0.0 * out.sum(), {"states": x})
    assert value == pytest.approx(0.3 * entropy, rel=1e-12)
    assert float(prediction_entropy(model(x))) < entropy  # TENT: the step lowers the entropy


@pytest.mark.parametrize("field", ["lr", "grad_clip_norm", "trust_region_eps", "ema_decay", "entropy_weight", "max_steps_per_call"])
def test_adaptation_config_negative_or_missing_field_is_one_clear_line(field):
    base = dict(lr=0.01, grad_clip_norm=1.0, trust_region_eps=0.01, ema_decay=0.99, entropy_weight=0.01, max_steps_per_call=5)
    with pytest.raises(ValueError, match=f"^AdaptationConfig.{field}: missing") as info:
        AdaptationConfig(**{k: v for k, v in base.items() if k != field})
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=f"^AdaptationConfig.{field}: .*greater than") as info:
        AdaptationConfig(**(base | {field: -1}))
    assert "\n" not in str(info.value)


def test_adapter_rejects_a_batch_without_states():
    with pytest.raises(ValueError, match="needs 'states'"):
        Adapter(_linear(), _config()).adapt(nn.MSELoss(), {"x": torch.zeros(1, 3)})


# ---------------------------------------------------------------------------------------------
# SSM


def _gelu(x):
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def _numpy_ssm(model: SSM, x: np.ndarray) -> np.ndarray:
    """The SSM's outputs by an explicit convolution h_t = sum_s Lambda_bar^(t-s) B_bar u_s (numpy)."""
    p = {k: v.detach().numpy() for k, v in model.named_parameters()}
    lam = -np.exp(p["log_decay"]) + 1j * p["freq"]
    lam_bar = np.exp(lam * np.exp(p["log_dt"]))
    b_bar = ((lam_bar - 1) / lam)[:, None] * (p["B_re"] + 1j * p["B_im"])
    c = p["C_re"] + 1j * p["C_im"]
    u = x @ p["encoder.weight"].T + p["encoder.bias"]  # (B, T, H)
    t_len = x.shape[1]
    h = np.zeros((x.shape[0], t_len, len(lam)), complex)
    for t in range(t_len):
        for s in range(t + 1):
            h[:, t] += lam_bar ** (t - s) * (u[:, s] @ b_bar.T)
    y = (h @ c.T).real + p["D"] * u
    return _gelu(y) @ p["decoder.weight"].T + p["decoder.bias"]


def test_ssm_sequence_equals_the_explicit_convolution_and_the_step_by_step_recurrence():
    model = SSM(3, hidden_dim=5, output_dim=2, state_size=4, dtype=torch.float64, seed=0, dt_min=0.1, dt_max=1.0)
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    out = model(x)
    np.testing.assert_allclose(out.detach().numpy(), _numpy_ssm(model, x.numpy()), rtol=1e-10, atol=1e-12)
    h = None
    for t in range(6):
        step_out, h = model.step(x[:, t], h)
        torch.testing.assert_close(step_out, out[:, t], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model(x[:, 0], hidden_state=None), out[:, 0])


def test_ssm_discretisation_is_the_exact_zero_order_hold():
    """h(Delta) of dh/dt = Lambda h + B u with u constant, by the matrix exponential of the augmented system."""
    model = SSM(2, hidden_dim=3, output_dim=1, state_size=3, dtype=torch.float64, seed=1, dt_min=0.05, dt_max=0.5)
    lam_bar, b_bar = (t.detach().numpy() for t in model.discretised())
    p = {k: v.detach().numpy() for k, v in model.named_parameters()}
    lam = -np.exp(p["log_decay"]) + 1j * p["freq"]
    b = p["B_re"] + 1j * p["B_im"]
    u = np.array([0.3, -1.2, 0.7])
    h0 = np.array([0.5 + 0.1j, -0.2j, 1.0])
    for n in range(3):
        dt = np.exp(p["log_dt"][n])
        aug = np.array([[lam[n], b[n] @ u], [0, 0]]) * dt
        exact = scipy.linalg.expm(aug) @ np.array([h0[n], 1.0])
        assert lam_bar[n] * h0[n] + b_bar[n] @ u == pytest.approx(exact[0], rel=1e-12)


def test_ssm_is_stable_for_any_parameters():
    model = SSM(2, hidden_dim=4, output_dim=1, state_size=8, dtype=torch.float64, seed=2)
    with torch.no_grad():
        model.log_decay.copy_(torch.linspace(-20, 5, 8, dtype=torch.float64))
        model.freq.copy_(torch.linspace(-100, 100, 8, dtype=torch.float64))
        model.log_dt.copy_(torch.linspace(-10, 3, 8, dtype=torch.float64))
        model.encoder.bias.zero_()  # zero input -> zero drive: the state only decays
    lam_bar, _ = model.discretised()
    assert (lam_bar.abs() < 1).all()
    _, h = model.step(torch.ones(1, 2, dtype=torch.float64))
    for _ in range(200):
        _, h_next = model.step(torch.zeros(1, 2, dtype=torch.float64), h)
        assert (h_next.abs() <= h.abs()).all()
        h = h_next


def test_ssm_rejects_bad_shapes_and_sizes():
    with pytest.raises(ValueError, match="SSM input"):
        SSM(3)(torch.zeros(3))
    with pytest.raises(ValueError, match="SSM hidden_dim"):
        SSM(3, hidden_dim=0)


def test_metamaml_on_the_ssm_lowers_the_query_loss_of_related_tasks():
    """Tasks y = a * sum(x) with a per-task a: meta-training the SSM's start makes one inner step help."""
    torch.manual_seed(0)
    model = SSM(2, hidden_dim=8, output_dim=1, state_size=4, dtype=torch.float64, seed=0)
    maml = MetaMAML(model, inner_lr=0.05, outer_lr=0.01)
    gen = torch.Generator().manual_seed(3)

    def task():
        a = 2 * torch.rand(1, generator=gen, dtype=torch.float64) - 1
        xs, xq = (torch.randn(16, 2, generator=gen, dtype=torch.float64) for _ in range(2))
        return xs, a * xs.sum(1, keepdim=True), xq, a * xq.sum(1, keepdim=True)

    held_out = [task() for _ in range(8)]
    before, _ = maml.meta_gradient(held_out, nn.MSELoss(), 1)
    for _ in range(60):
        maml.meta_update([task() for _ in range(4)], nn.MSELoss())
    after, _ = maml.meta_gradient(held_out, nn.MSELoss(), 1)
    assert after < 0.7 * before, (before, after)


# ---------------------------------------------------------------------------------------------
# The policy circuits of models.py


def _pqc(backend, **extra):
    exp = experiment(task="cartpole", backend=backend, gradient="backprop", model={"n_qubits": 2, "n_layers": 1}, **extra)
    return build_model(exp, 4, 2, seed=0)


SECOND_ORDER = {"pennylane": {"pennylane": {"interface": "torch"}}, "tensorcircuit": {"tensorcircuit": {"math_backend": "pytorch"}}}
JAX = {"pennylane": {"pennylane": {"interface": "jax"}}, "tensorcircuit": {"tensorcircuit": {"math_backend": "jax"}}}


def _policy_tasks(seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        xs, xq = (torch.randn(4, 4, generator=gen, dtype=torch.float64) for _ in range(2))
        out.append((xs, torch.randn(4, 2, generator=gen, dtype=torch.float64), xq, torch.randn(4, 2, generator=gen, dtype=torch.float64)))
    return out


def _flat(grads):
    return torch.cat([g.reshape(-1) for g in grads.values()])


def test_second_order_maml_on_pennylane_and_tensorcircuit_agree_and_reach_the_inner_hessian():
    tasks = _policy_tasks()
    results = {}
    for backend, extra in SECOND_ORDER.items():
        model = _pqc(backend, **extra)
        second = _flat(MetaMAML(model, 0.3, 0.01).meta_gradient(tasks, nn.MSELoss(), 2)[1])
        first = _flat(MetaMAML(model, 0.3, 0.01, first_order=True).meta_gradient(tasks, nn.MSELoss(), 2)[1])
        results[backend] = second, first
    (pl2, pl1), (tc2, tc1) = results["pennylane"], results["tensorcircuit"]
    torch.testing.assert_close(pl2, tc2, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(pl1, tc1, rtol=1e-6, atol=1e-8)
    assert float((pl2 - pl1).norm()) > 1e-3 * float(pl1.norm())


def test_second_order_maml_on_a_circuit_equals_the_finite_difference_of_the_meta_loss():
    model = _pqc("pennylane", **SECOND_ORDER["pennylane"])
    tasks = _policy_tasks(1)
    maml = MetaMAML(model, 0.3, 0.01)
    _, grads = maml.meta_gradient(tasks, nn.MSELoss(), 1)
    h = 1e-5
    for index in [(0, 0, 0), (1, 1, 2)]:
        with torch.no_grad():
            model.theta[index] += h
        up = float(maml.meta_loss(tasks, nn.MSELoss(), 1))
        with torch.no_grad():
            model.theta[index] -= 2 * h
        down = float(maml.meta_loss(tasks, nn.MSELoss(), 1))
        with torch.no_grad():
            model.theta[index] += h
        assert float(grads["theta"][index]) == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("backend", ["pennylane", "tensorcircuit"])
def test_jax_circuits_refuse_second_order_and_give_the_same_first_order(backend):
    model = _pqc(backend, **JAX[backend])
    with pytest.raises(ValueError, match="first_order=True") as info:
        MetaMAML(model, 0.3, 0.01, first_order=False)
    assert "\n" not in str(info.value)
    tasks = _policy_tasks()
    first = _flat(MetaMAML(model, 0.3, 0.01, first_order=True).meta_gradient(tasks, nn.MSELoss(), 2)[1])
    reference = _pqc(backend, **SECOND_ORDER[backend])
    want = _flat(MetaMAML(reference, 0.3, 0.01, first_order=True).meta_gradient(tasks, nn.MSELoss(), 2)[1])
    torch.testing.assert_close(first, want, rtol=1e-6, atol=1e-8)
    adapted = MetaMAML(model, 0.3, 0.01, first_order=True).adapt(*tasks[0][:2], nn.MSELoss(), 1)
    assert adapted.circuit is model.circuit  # the compiled circuit is shared, not rebuilt
    assert not torch.equal(adapted.theta, model.theta)


@pytest.mark.parametrize("backend,extra", [("pennylane", JAX["pennylane"]), ("tensorcircuit", JAX["tensorcircuit"])])
def test_adapter_on_circuit_policies_stays_in_its_trust_region(backend, extra):
    model = _pqc(backend, **extra)
    tasks = _policy_tasks()
    adapter = Adapter(model, _config(lr=1.0, trust_region_eps=0.02, max_steps_per_call=3))
    batch = {"states": tasks[0][0], "targets": tasks[0][1]}
    before = float(nn.MSELoss()(model(batch["states"]), batch["targets"]))
    adapter.adapt(nn.MSELoss(), batch)
    assert adapter.distance() == pytest.approx(0.02, rel=1e-9)
    assert float(nn.MSELoss()(model(batch["states"]), batch["targets"])) < before
