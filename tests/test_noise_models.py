"""Physics of the fidelity models (noise/models.py) against independent references: closed forms
of the Ornstein-Uhlenbeck process and of the Gaussian idle gate, Parseval for white noise, the
Lindblad simulator in the Markov limit, the `filter-functions` package (PyPI), and a composite
pulse (CORPSE) that must beat the pi pulse under 1/f noise."""

import math

import numpy as np
import pytest
import torch

from noise import NoiseParameters, PSDToLindblad, TaskDistribution, ramsey_gamma_phi
from noise.models import (
    FilterFunctionModel,
    MarkovianModel,
    NoiseBatch,
    StepCovariance,
    TrajectoryModel,
    _bloch_frames,
    _expm,
    _ordered_components,
    _rotation_components,
    _su2,
    build_model,
    quaternion_to_unitary,
)
from noise.psd import white
from noise.simulator import SX, SY, SZ, average_gate_fidelity, target_unitary


class WhiteTask(NoiseParameters):
    """S(omega) = A for every omega."""

    def psd(self, omega, model_type=None):
        return white(omega, self.A)


def batch(model, tasks, gamma_down=None, detuning=None, seed=0):
    """The model's NoiseBatch with chosen relaxation (default none) and detuning (default the tasks')."""
    zero = np.zeros(len(tasks))
    g = zero if gamma_down is None else np.asarray(gamma_down, dtype=np.float64)
    nb = model.prepare(tasks, zero, g, g, np.random.default_rng(seed))
    if detuning is not None:
        nb = NoiseBatch(nb.gamma_phi, nb.gamma_down, nb.gamma_up, torch.as_tensor(detuning, dtype=torch.float64), nb.data)
    return nb


def pi_pulse(n=10):
    c = torch.zeros(1, n, 2, dtype=torch.float64)
    c[..., 0] = math.pi
    return c


def corpse(n_unit=1):
    """CORPSE X gate (420_x 300_-x 60_x, Cummins and Jones 2000): first-order insensitive to a
    detuning. 13 equal segments (times n_unit) at amplitude 13 pi/3."""
    signs = [1.0] * 7 + [-1.0] * 5 + [1.0]
    amp = 13 * math.pi / 3
    c = torch.zeros(1, 13 * n_unit, 2, dtype=torch.float64)
    c[0, :, 0] = amp * torch.tensor(signs, dtype=torch.float64).repeat_interleave(n_unit)
    return c


def infidelity(model, controls, nb, target="x"):
    with torch.no_grad():
        return (1 - average_gate_fidelity(model.channel(controls, nb), target_unitary(target))).numpy()


# ---------------------------------------------------------------------------------------------
# SU(2) helpers


def test_su2_helpers_are_the_matrix_exponential_and_its_products():
    gen = torch.Generator().manual_seed(0)
    phi = 3 * torch.randn(7, 50, 3, generator=gen, dtype=torch.float64)
    phi[0, 0] = 0.0
    paulis = torch.stack([SX, SY, SZ])
    exact = torch.linalg.matrix_exp(-0.5j * torch.einsum("...k,kij->...ij", phi.to(torch.complex128), paulis))
    assert torch.allclose(_su2(phi), exact, atol=1e-13)
    q = _rotation_components(*(phi[..., k] for k in range(3)))
    assert torch.allclose(quaternion_to_unitary(torch.stack(q, dim=-1)), exact, atol=1e-13)
    product = exact[:, 0]
    for j in range(1, 50):
        product = exact[:, j] @ product  # later steps on the left
    assert torch.allclose(quaternion_to_unitary(torch.stack(_ordered_components(q, dim=1), dim=-1)), product, atol=1e-12)
    frames = _bloch_frames(exact)
    for k in range(3):
        heisenberg = exact.conj().transpose(-1, -2) @ paulis[k] @ exact
        bloch = torch.stack([torch.einsum("ij,...ji->...", p, heisenberg).real / 2 for p in paulis], dim=-1)
        assert torch.allclose(frames[..., k, :], bloch, atol=1e-13)


def test_own_matrix_exponential_matches_torch_and_ignores_the_batch():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, 3, generator=gen, dtype=torch.float64) * torch.tensor([1e-6, 0.1, 1.0, 3.0, 10.0, 0.0], dtype=torch.float64)[:, None, None]
    x = x + x.transpose(1, 2)
    assert torch.allclose(_expm(x), torch.linalg.matrix_exp(x), rtol=1e-12, atol=1e-14)
    assert all(torch.equal(_expm(x)[b], _expm(x[b : b + 1])[0]) for b in range(6))


# ---------------------------------------------------------------------------------------------
# Noise statistics on the fine grid


@pytest.mark.parametrize("s0", [0.05, 2.0])
def test_step_covariance_of_white_noise_is_diagonal(s0):
    cov = StepCovariance(50)
    c = cov.autocovariance([WhiteTask(1.0, s0, 1.0)])[0]
    assert c[0] == pytest.approx(s0 / 50, rel=1e-4)
    assert np.abs(c[1:]).max() < 1e-4 * c[0]


@pytest.mark.parametrize("omega_c", [0.05, 3.0, 80.0])
def test_step_covariance_of_ornstein_uhlenbeck_matches_closed_form(omega_c):
    # <xi(t) xi(0)> = A/(2 wc) exp(-wc |t|): integrate over two steps of width d, m steps apart
    A, n = 0.7, 40
    d = 1.0 / n
    c = StepCovariance(n).autocovariance([NoiseParameters(1.0, A, omega_c, "lorentzian")])[0]
    k = A / (2 * omega_c**3)
    m = np.arange(1, n)
    closed = np.concatenate([[2 * k * (omega_c * d - 1 + math.exp(-omega_c * d))],
                             k * np.exp(-omega_c * (m - 1) * d) * (1 - math.exp(-omega_c * d)) ** 2])
    assert np.allclose(c, closed, rtol=2e-5, atol=1e-7 * closed[0])


@pytest.mark.parametrize("task", [NoiseParameters(1.8, 0.04, 0.13), NoiseParameters(0.6, 1.0, 5.0), NoiseParameters(1.0, 0.3, 0.5, "lorentzian")],
                         ids=["1/f-low-corner", "1/f-flat", "lorentzian"])
def test_step_integrals_add_up_to_the_ramsey_phase(task):
    """Var(sum_j X_j) = Var(int_0^T xi) = 2 chi_Ramsey(T) (checked against QUADPACK in test_noise.py)."""
    total = StepCovariance(60).matrix([task])[0].sum()
    assert total == pytest.approx(2 * PSDToLindblad().chi([task])[0], rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Exact results


@pytest.mark.parametrize("delta", [0.0, 0.8])
def test_idle_gate_matches_the_exact_gaussian_result(delta):
    """No control, pure dephasing by Gaussian noise: F_avg = (2 + exp(-chi(T)) cos(delta T))/3 exactly."""
    tasks = [NoiseParameters(1.8, 0.04, 0.13), NoiseParameters(1.0, 0.5, 2.0, "lorentzian")]
    chi = PSDToLindblad().chi(tasks)
    exact = 1 - (2 + np.exp(-chi) * math.cos(delta)) / 3
    idle = torch.zeros(2, 10, 2, dtype=torch.float64)
    ff = FilterFunctionModel(100)
    assert np.allclose(infidelity(ff, idle, batch(ff, tasks, detuning=[delta] * 2), "identity"), exact, rtol=1e-5)
    traj = TrajectoryModel(100, 20000)
    nb = batch(traj, tasks, detuning=[delta] * 2, seed=1)
    samples = traj.fidelity_samples(idle, nb, target_unitary("identity"))
    mean, se = 1 - samples.mean(1).numpy(), (samples.std(1) / math.sqrt(samples.shape[1])).numpy()
    assert (np.abs(mean - exact) < 4 * se + 1e-4).all(), (mean, exact, se)
    assert np.allclose(mean, infidelity(traj, idle, nb, "identity"), atol=1e-12)  # channel mean = mean of samples


@pytest.mark.parametrize("s0", [0.02, 0.3])
def test_white_noise_decays_at_half_s0_and_first_order_infidelity_is_pulse_independent(s0):
    task = WhiteTask(1.0, s0, 1.0)
    idle = torch.zeros(1, 10, 2, dtype=torch.float64)
    ff, traj = FilterFunctionModel(100), TrajectoryModel(100, 4000)
    exact = 1 - (2 + math.exp(-s0 / 2)) / 3
    assert infidelity(ff, idle, batch(ff, [task]), "identity")[0] == pytest.approx(exact, rel=1e-4)
    nb = batch(traj, [task], seed=2)
    samples = traj.fidelity_samples(idle, nb, target_unitary("identity"))
    assert abs(1 - samples.mean().item() - exact) < 4 * samples.std().item() / math.sqrt(4000) + 1e-4
    # Parseval: 1 - F_e = (S0/4) int |R(t)|^2 dt = S0 T/4 whatever the pulse
    gen = torch.Generator().manual_seed(4)
    pulses = 8 * torch.rand(5, 10, 2, generator=gen, dtype=torch.float64) - 4
    nb5 = batch(ff, [task] * 5, detuning=torch.linspace(-1, 1, 5))
    assert torch.allclose(ff.noise_infidelity(pulses, nb5), torch.full((5,), 2 / 3 * s0 / 4, dtype=torch.float64), rtol=1e-4)


def test_trajectories_reach_the_lindblad_result_in_the_markov_limit():
    """Lorentzian with omega_c = 400/T >> 1/T is white for the qubit: the exact trajectories and the
    Markovian Lindblad model (Ramsey rate, relaxation as sigma-/sigma+) agree to 1e-3 in F."""
    tasks = [NoiseParameters(2.0, 0.1 * 400.0**2, 400.0, "lorentzian")] * 3
    rates = PSDToLindblad().rates(tasks)
    three_pi = pi_pulse(13) * 3
    gamma = np.array([0.0, 0.01, 0.02])
    detuning = torch.tensor([0.0, 0.3, -0.2], dtype=torch.float64)
    markov = MarkovianModel()
    lind = markov.prepare(tasks, rates.gamma_phi, gamma, gamma, np.random.default_rng(0))
    lind = NoiseBatch(lind.gamma_phi, lind.gamma_down, lind.gamma_up, detuning, None)
    traj = TrajectoryModel(130, 20000)
    nb = batch(traj, tasks, gamma_down=gamma, detuning=detuning, seed=3)
    for pulse in (pi_pulse(13), corpse(), three_pi):  # three X gates
        controls = pulse.expand(3, -1, -1)
        f_lind = average_gate_fidelity(markov.channel(controls, lind), target_unitary("x"))
        samples = traj.fidelity_samples(controls, nb, target_unitary("x"))
        se = samples.std(1) / math.sqrt(samples.shape[1])
        assert (se < 2.5e-4).all(), se
        assert ((samples.mean(1) - f_lind).abs() < 1e-3).all(), (samples.mean(1), f_lind, se)


# ---------------------------------------------------------------------------------------------
# Filter function against trajectories and against the filter-functions package


def test_filter_function_matches_trajectories_for_weak_noise():
    """Weak noise (infidelity ~1e-3): the first-order filter-function infidelity equals the exact
    trajectories within 3 % (+ 4 standard errors), for a plain, a composite and a random pulse with
    detuning, measured against each pulse's own noiseless gate U0(T) (the noise part alone)."""
    tasks = [NoiseParameters(1.5, 3e-3, 0.2), NoiseParameters(0.7, 1.5e-2, 3.0), NoiseParameters(2.0, 1.5e-2, 1.0, "lorentzian")]
    gen = torch.Generator().manual_seed(6)
    pulses = [pi_pulse(13), corpse(), 2 * math.pi * (2 * torch.rand(1, 13, 2, generator=gen, dtype=torch.float64) - 1)]
    ff, traj = FilterFunctionModel(130), TrajectoryModel(130, 20000)
    detuning = [0.0, 0.3, -0.5]
    f_nb = batch(ff, tasks, gamma_down=[2e-4] * 3, detuning=detuning)
    t_nb = batch(traj, tasks, gamma_down=[2e-4] * 3, detuning=detuning, seed=7)
    for pulse in pulses:
        controls = pulse.expand(3, -1, -1)
        ours = 1.5 * ff.noise_infidelity(controls, f_nb).numpy()  # 1 - F_e, first order
        final, _ = ff.toggling_frame(controls, f_nb.detuning)
        u0 = final  # (3, 2, 2) noiseless gate of each task
        u = quaternion_to_unitary(traj.unitaries(controls, t_nb))  # (3, K, 2, 2)
        f_e = (torch.einsum("bij,bkij->bk", u0.conj(), u).abs() / 2) ** 2
        mc, se = 1 - f_e.mean(1).numpy(), (f_e.std(1) / math.sqrt(f_e.shape[1])).numpy()
        assert (ours > 1e-4).all() and (ours < 0.01).all(), ours
        assert (np.abs(ours - mc) < 0.03 * ours + 4 * se).all(), (ours, mc, se)


def test_filter_function_matches_the_filter_functions_package():
    ffp = pytest.importorskip("filter_functions")
    sx, sy, sz = (m.numpy() for m in (SX, SY, SZ))
    gen = np.random.default_rng(8)
    cases = [(pi_pulse(10)[0].numpy(), 0.0), (corpse()[0].numpy(), 0.2), (gen.uniform(-6, 6, (10, 2)), 0.5), (gen.uniform(-3, 3, (8, 2)), -0.9)]
    tasks = [NoiseParameters(1.2, 0.05, 0.3), NoiseParameters(2.0, 0.5, 4.0, "lorentzian")]
    w = np.geomspace(1e-4, 2e4, 40000)
    w2 = np.concatenate([-w[::-1], w])
    for u, delta in cases:
        n = len(u)
        pulse = ffp.PulseSequence([[sx / 2, u[:, 0], "X"], [sy / 2, u[:, 1], "Y"], [sz / 2, np.full(n, delta), "D"]],
                                  [[sz / 2, np.ones(n), "Z"]], np.full(n, 1.0 / n))
        model = FilterFunctionModel(n * 40)
        nb = batch(model, tasks, detuning=[delta] * 2)
        ours = 1.5 * model.noise_infidelity(torch.as_tensor(u).expand(2, -1, -1), nb).numpy()  # 1 - F_e = tr Sigma
        theirs = np.array([ffp.infidelity(pulse, t.psd(w2), w2)[0] for t in tasks])  # two-sided grid: two-sided S
        assert np.allclose(ours, theirs, rtol=2e-3), (ours, theirs)


# ---------------------------------------------------------------------------------------------
# The point of it all: the pulse meets the PSD


@pytest.mark.parametrize("simulation", ["filter_function", "trajectories"])
def test_a_corrected_x_gate_beats_the_pi_pulse_under_one_over_f_noise(simulation):
    tasks = [NoiseParameters(1.5, 0.02, 0.1), NoiseParameters(1.0, 0.02, 0.3)]
    model = build_model(simulation, n_steps=260, n_trajectories=8000)
    nb = batch(model, tasks, seed=9)
    plain = infidelity(model, pi_pulse(13).expand(2, -1, -1), nb)
    robust = infidelity(model, corpse().expand(2, -1, -1), nb)
    assert (plain > 2 * robust).all(), (plain, robust)
    # and the Markovian model cannot tell them apart (both exact X gates, one rate per task)
    markov = MarkovianModel()
    rates = PSDToLindblad().rates(tasks)
    mnb = markov.prepare(tasks, rates.gamma_phi, np.zeros(2), np.zeros(2), np.random.default_rng(0))
    ratio = infidelity(markov, pi_pulse(13).expand(2, -1, -1), mnb) / infidelity(markov, corpse().expand(2, -1, -1), mnb)
    assert np.allclose(ratio, 1.0, atol=0.05)


def test_same_ramsey_rate_different_shape_gives_different_pulse_infidelity():
    """A 1/f and a Lorentzian task with the same Ramsey gamma_phi: the same task to the Markovian
    model, different tasks to the filter function (the CORPSE pulse sees the high-frequency part)."""
    one_over_f = NoiseParameters(1.0, 0.05, 0.1)
    target = ramsey_gamma_phi([one_over_f])[0]
    unit = NoiseParameters(2.0, 1.0, 5.0, "lorentzian")
    lorentz = NoiseParameters(2.0, target / ramsey_gamma_phi([unit])[0], 5.0, "lorentzian")
    assert ramsey_gamma_phi([lorentz])[0] == pytest.approx(target, rel=1e-9)
    ff = FilterFunctionModel(260)
    nb = batch(ff, [one_over_f, lorentz])
    corrected = infidelity(ff, corpse().expand(2, -1, -1), nb)
    assert corrected[1] > 2 * corrected[0], corrected


# ---------------------------------------------------------------------------------------------
# Differentiability and batching


@pytest.mark.parametrize("simulation", ["filter_function", "trajectories"])
def test_models_are_differentiable_in_the_controls(simulation):
    tasks = [NoiseParameters(1.2, 0.3, 0.5), NoiseParameters(2.0, 0.2, 2.0, "lorentzian")]
    model = build_model(simulation, n_steps=40, n_trajectories=64)
    nb = batch(model, tasks, gamma_down=[0.01, 0.02], detuning=[0.3, -0.2], seed=10)
    gen = torch.Generator().manual_seed(11)
    controls = (4 * torch.rand(2, 4, 2, generator=gen, dtype=torch.float64) - 2).requires_grad_(True)

    def f(c):
        return average_gate_fidelity(model.channel(c, nb), target_unitary("x"))

    (grad,) = torch.autograd.grad(f(controls).sum(), controls)
    h = 1e-6
    for index in [(0, 1, 0), (1, 3, 1)]:
        e = torch.zeros_like(controls)
        e[index] = h
        fd = (f(controls.detach() + e) - f(controls.detach() - e)).sum() / (2 * h)  # common random numbers: deterministic
        assert grad[index].item() == pytest.approx(fd.item(), rel=1e-5, abs=1e-9)


def test_tasks_are_independent_in_a_batch():
    tasks = [NoiseParameters(1.2, 0.3, 0.5), NoiseParameters(0.8, 0.1, 3.0)]
    ff = FilterFunctionModel(40)
    nb = batch(ff, tasks, gamma_down=[0.01, 0.02], detuning=[0.3, -0.2])
    controls = torch.randn(2, 4, 2, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    together = ff.channel(controls, nb)
    for b in range(2):
        alone = ff.channel(controls[b : b + 1], nb.select(torch.tensor([b])))
        assert torch.allclose(together[b], alone[0], atol=1e-14)


# ---------------------------------------------------------------------------------------------
# Task distributions that mix shapes, not strengths


def test_gamma_phi_parameterisation_mixes_shapes_at_equal_strength():
    ranges = {"alpha": (0.5, 2.0), "gamma_phi": (0.02, 0.5), "omega_c": (0.1, 10.0)}
    dist = TaskDistribution("log_uniform", ranges, ("one_over_f", "lorentzian"))
    tasks = dist.sample(2000, np.random.default_rng(0))
    g = ramsey_gamma_phi(tasks)
    assert g.min() >= 0.02 * (1 - 1e-9) and g.max() <= 0.5 * (1 + 1e-9)
    models = np.array([t.model_type for t in tasks])
    assert all(t.alpha == 2.0 for t in tasks if t.model_type == "lorentzian")
    q_f, q_l = (np.quantile(np.log(g[models == m]), [0.25, 0.5, 0.75]) for m in ("one_over_f", "lorentzian"))
    assert np.allclose(q_f, q_l, atol=0.25)  # same strength distribution for both shapes (log-uniform, width 3.2)
    feats = dist.features(tasks)
    assert feats.shape == (2000, 4) and np.abs(feats[:, :3]).max() <= 1 + 1e-9
    var = dist.compute_variance(PSDToLindblad(omega0=100.0), n_samples=2000)
    assert var["strength_log10_gamma_phi"] == pytest.approx(np.log10(25) ** 2 / 12, rel=0.1)  # uniform in log10
    assert var["rates_noise"] == pytest.approx(var["rates_dephasing"] + var["rates_relaxation"])
    with pytest.raises(ValueError, match="exactly one strength"):
        TaskDistribution("uniform", {**ranges, "A": (0.1, 1.0)})
    with pytest.raises(ValueError, match="double_exp needs 'A'"):
        TaskDistribution("uniform", {**ranges, "A2": (0.1, 1.0), "omega_c2": (1.0, 2.0)}, ("double_exp",))


@pytest.mark.slow
def test_trajectories_converge_in_time_steps_and_agree_with_the_filter_function_on_shipped_tasks():
    """On 12 tasks of configs/meta_mixed.yaml (gamma_phi 0.01-0.2, 1/f and Lorentzian, detuning): the
    trajectories with 50 and with 200 fine steps agree within their errors, and the filter function
    is within 15 % of the exact result for the pi pulse (first-order errors at these strengths)."""
    from config_schema import load_config
    from meta.train import task_factory

    exp = load_config("configs/meta_mixed.yaml", only=["classical_maml"]).experiments[0]
    params = exp.meta.noise.distribution().sample(12, np.random.default_rng(3))
    controls = pi_pulse(10).expand(12, -1, -1)
    results = {}
    for label, simulation, steps in (("ff", "filter_function", 50), ("t50", "trajectories", 50), ("t200", "trajectories", 200)):
        meta = exp.meta.model_copy(update={"noise": exp.meta.noise.model_copy(update={"time_steps": steps, "trajectories": 20000})})
        factory = task_factory(exp.model_copy(update={"meta": meta}), simulation)
        tasks = factory.make(params, np.random.default_rng(4))
        with torch.no_grad():
            results[label] = (1 - tasks.fidelity(controls)).numpy(), tasks.diagnostics(controls).get("stderr", np.zeros(12))
    (t50, e50), (t200, e200), (ff, _) = results["t50"], results["t200"], results["ff"]
    assert (np.abs(t50 - t200) < 4 * np.hypot(e50, e200) + 0.01 * t200).all(), (t50, t200)
    assert (np.abs(ff - t200) < 0.15 * t200 + 4 * e200).all(), (ff, t200)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("simulation", ["markovian", "filter_function", "trajectories"])
def test_models_give_the_same_channel_on_cuda(simulation):
    tasks = [NoiseParameters(1.2, 0.3, 0.5), NoiseParameters(2.0, 0.2, 2.0, "lorentzian")]
    model = build_model(simulation, n_steps=40, n_trajectories=64)
    rates = PSDToLindblad(omega0=100.0).rates(tasks)
    cpu = model.prepare(tasks, rates.gamma_phi, rates.gamma_down, rates.gamma_up, np.random.default_rng(0))
    gpu = model.prepare(tasks, rates.gamma_phi, rates.gamma_down, rates.gamma_up, np.random.default_rng(0), "cuda")
    controls = torch.randn(2, 4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    on_gpu = model.channel(controls.cuda(), gpu)
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.complex128
    assert torch.allclose(on_gpu.cpu(), model.channel(controls, cpu), atol=1e-12)
