"""Physics of the noise models: filter-function dephasing, golden-rule relaxation, the Lindblad
simulator, and agreement with PennyLane default.mixed and TensorCircuit's DMCircuit."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate

from noise import NoiseParameters, PSDToLindblad, TaskDistribution, filter_function, pulse_fractions
from noise.psd import white
from noise.simulator import (
    average_gate_fidelity,
    pauli_eigenstates,
    simulate,
    state_fidelities,
    state_transfer_fidelity,
    target_unitary,
    unvec,
    vec,
)

SEQUENCES = [("ramsey", 1), ("echo", 1), ("cpmg", 2), ("cpmg", 5)]


class WhiteTask(NoiseParameters):
    """A task whose PSD is white: S(omega) = A for every omega."""

    def psd(self, omega, model_type=None):
        return white(omega, self.A)


# ---------------------------------------------------------------------------------------------
# Filter functions and dephasing


def test_filter_functions_match_closed_forms():
    z = np.linspace(0.01, 60, 500)
    assert np.allclose(filter_function(z, pulse_fractions("ramsey")), 2 * np.sin(z / 2) ** 2, atol=1e-12)
    assert np.allclose(filter_function(z, pulse_fractions("echo")), 8 * np.sin(z / 4) ** 4, atol=1e-12)
    for n in (2, 4):  # Cywinski et al. 2008, CPMG with n even
        closed = 8 * np.sin(z / (4 * n)) ** 4 * np.sin(z / 2) ** 2 / np.cos(z / (2 * n)) ** 2
        ok = np.abs(np.cos(z / (2 * n))) > 1e-3
        assert np.allclose(filter_function(z, pulse_fractions("cpmg", n))[ok], closed[ok], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("sequence,n", SEQUENCES)
@pytest.mark.parametrize("s0", [0.01, 0.37, 4.0])
def test_white_noise_dephasing_rate_is_half_s0_for_every_sequence(sequence, n, s0):
    converter = PSDToLindblad(sequence=sequence, n_pulses=n)
    rates = converter.rates([WhiteTask(1.0, s0, 1.0)])
    assert rates.gamma_phi[0] == pytest.approx(s0 / 2, rel=1e-6)


@pytest.mark.parametrize("T", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("omega_c", [0.05, 1.0, 20.0])
def test_lorentzian_ramsey_decay_matches_ornstein_uhlenbeck_closed_form(T, omega_c):
    # <xi(t) xi(0)> = A/(2 wc) exp(-wc |t|)  =>  chi(T) = (A / (2 wc^3)) (wc T - 1 + exp(-wc T))
    A = 0.8
    task = NoiseParameters(1.0, A, omega_c, "lorentzian")
    chi = PSDToLindblad(T=T).chi([task])[0]
    closed = A / (2 * omega_c**3) * (omega_c * T - 1 + math.exp(-omega_c * T))
    assert chi == pytest.approx(closed, rel=1e-7)


def _reference_ramsey_chi(task: NoiseParameters) -> float:
    """Adaptive QUADPACK: F/omega^2 = (1 - cos omega)/omega^2, Fourier-weighted tail (QAWF)."""
    edges = np.concatenate([[0.0], np.logspace(-8, 3, 120)])
    body = sum(
        integrate.quad(lambda w: task.psd(w) * 2 * math.sin(w / 2) ** 2 / w**2, a, b, limit=200, epsrel=1e-11)[0]
        for a, b in zip(edges[:-1], edges[1:])
    )
    top = edges[-1]
    flat = integrate.quad(lambda w: task.psd(w) / w**2, top, np.inf, epsrel=1e-11)[0]
    oscillating = integrate.quad(lambda w: task.psd(w) / w**2, top, np.inf, weight="cos", wvar=1.0)[0]
    return (body + flat - oscillating) / math.pi


@pytest.mark.parametrize(
    "task",
    [
        NoiseParameters(0.5, 0.3, 0.1),
        NoiseParameters(1.0, 0.3, 1.0),
        NoiseParameters(2.0, 0.05, 0.01),
        NoiseParameters(1.5, 1.0, 10.0),
        NoiseParameters(1.0, 0.2, 0.3, "double_exp", A2=0.5, omega_c2=7.0),
    ],
    ids=lambda t: f"{t.model_type}-a{t.alpha}-wc{t.omega_c}",
)
def test_quadrature_converged_against_adaptive_integration(task):
    ours = PSDToLindblad().chi([task])[0]
    assert ours == pytest.approx(_reference_ramsey_chi(task), rel=1e-6)
    finer = PSDToLindblad(omega_max=8000.0, order=12).chi([task])[0]
    assert ours == pytest.approx(finer, rel=1e-7)


def test_echo_suppresses_low_frequency_noise():
    task = NoiseParameters(1.5, 0.5, 0.1)  # mostly below 1/T
    ramsey, echo, cpmg = (PSDToLindblad(sequence=s, n_pulses=4).rates([task]).gamma_phi[0] for s in ("ramsey", "echo", "cpmg"))
    assert ramsey > 3 * echo > 3 * cpmg


# ---------------------------------------------------------------------------------------------
# Relaxation: golden rule, checked against a stochastic simulation of transverse white noise


def test_relaxation_rate_is_golden_rule():
    task = NoiseParameters(1.0, 0.6, 2.0, "lorentzian")
    converter = PSDToLindblad(omega0=3.0, transverse_coupling=1.5)
    rates = converter.rates([task])
    expected = 1.5**2 * 0.6 / (3.0**2 + 2.0**2) / 4
    assert rates.gamma_down[0] == pytest.approx(expected, rel=1e-12)
    assert rates.gamma_up[0] == rates.gamma_down[0]


def test_golden_rule_on_flat_spectrum_matches_stochastic_trajectories():
    """H = (w0/2) sz + (xi(t)/2) sx with <xi(t) xi(t')> = S0 delta(t - t'): averaged over noise
    realisations, <sz> decays as exp(-(Gamma_down + Gamma_up) t) with Gamma = S0/4 (golden rule)."""
    s0, w0, dt, steps, m = 0.4, 5.0, 0.002, 1000, 4000
    gamma = PSDToLindblad(omega0=w0).rates([WhiteTask(1.0, s0, 1.0)]).gamma_down[0]
    assert gamma == pytest.approx(s0 / 4)
    rng = np.random.default_rng(7)
    psi = np.zeros((m, 2), dtype=np.complex128)
    psi[:, 0] = 1.0
    for _ in range(steps):
        xi = rng.normal(0.0, math.sqrt(s0 / dt), m)
        norm = np.sqrt(w0**2 + xi**2)
        c, s = np.cos(norm * dt / 2), np.sin(norm * dt / 2)
        nz, nx = w0 / norm, xi / norm
        # U = cos I - i sin (nx sx + nz sz)
        a = c - 1j * s * nz
        d = c + 1j * s * nz
        off = -1j * s * nx
        psi = np.stack([a * psi[:, 0] + off * psi[:, 1], off * psi[:, 0] + d * psi[:, 1]], axis=1)
    z = np.abs(psi[:, 0]) ** 2 - np.abs(psi[:, 1]) ** 2
    expected = math.exp(-2 * gamma * steps * dt)
    stderr = z.std() / math.sqrt(m)
    assert abs(z.mean() - expected) < 5 * stderr + 0.005  # + Euler-step bias O(dt)


# ---------------------------------------------------------------------------------------------
# Task distribution and parameters


def test_noise_parameters_round_trip_and_encoding():
    task = NoiseParameters(1.2, 0.01, 500.0, "lorentzian")
    assert list(task.to_array(include_model=True)) == [1.2, 0.01, 500.0, 1.0]
    assert list(task.to_array(include_model=False)) == [1.2, 0.01, 500.0]
    assert NoiseParameters.from_array(task.to_array()) == task
    assert NoiseParameters.from_array(task.to_array(normalized=True), normalized=True).A == pytest.approx(0.01)
    with pytest.raises(ValueError, match="invalid model encoding"):
        NoiseParameters.from_array([1.0, 0.1, 1.0, 7.0])
    with pytest.raises(ValueError, match="allowed: one_over_f, lorentzian, double_exp"):
        NoiseParameters(1.0, 0.1, 1.0, "pink")


def test_task_distribution_sampling_and_variance():
    ranges = {"alpha": (0.5, 2.0), "A": (0.03, 1.5), "omega_c": (0.1, 10.0)}
    dist = TaskDistribution("uniform", ranges, model_types=("one_over_f", "lorentzian"), model_probs=(0.7, 0.3))
    tasks = dist.sample(4000, np.random.default_rng(0))
    frac = np.mean([t.model_type == "lorentzian" for t in tasks])
    assert abs(frac - 0.3) < 4 * math.sqrt(0.21 / 4000)
    assert all(0.5 <= t.alpha <= 2.0 and 0.03 <= t.A <= 1.5 for t in tasks)
    feats = dist.features(tasks)
    assert feats.shape == (4000, 4) and feats[:, :3].min() >= -1 - 1e-12 and feats[:, :3].max() <= 1 + 1e-12
    var = dist.compute_variance(PSDToLindblad(), n_samples=20000)
    # uniform: (b - a)^2 / 12 per parameter; categorical 0/1 with p = 0.3: p (1 - p)
    expected_raw = (1.5**2 + 1.47**2 + 9.9**2) / 12 + 0.21
    assert var["raw"] == pytest.approx(expected_raw, rel=0.03)
    assert 0 < var["rates"] < 1
    same = TaskDistribution("uniform", ranges).sample(3, np.random.default_rng(5))
    assert same == TaskDistribution("uniform", ranges).sample(3, np.random.default_rng(5))
    with pytest.raises(ValueError, match="missing 'A2'"):
        TaskDistribution("uniform", ranges, model_types=("double_exp",))
    with pytest.raises(ValueError, match="dist_type"):
        TaskDistribution("cauchy", ranges)


# ---------------------------------------------------------------------------------------------
# Simulator


def _rates(*values):
    return [torch.tensor(v, dtype=torch.float64) for v in values]


def test_pure_dephasing_identity_fidelity_closed_form():
    gamma = torch.tensor([0.0, 0.05, 0.4, 2.0], dtype=torch.float64)
    zero = torch.zeros(4, dtype=torch.float64)
    channel = simulate(torch.zeros(4, 7, 2, dtype=torch.float64), gamma, zero)
    fid = average_gate_fidelity(channel, target_unitary("identity"))
    assert torch.allclose(fid, (2 + torch.exp(-gamma)) / 3, atol=1e-13)


def test_noise_free_pi_pulse_is_x_gate():
    controls = torch.zeros(2, 10, 2, dtype=torch.float64)
    controls[..., 0] = math.pi
    zero = torch.zeros(2, dtype=torch.float64)
    channel = simulate(controls, zero, zero)
    assert torch.allclose(average_gate_fidelity(channel, target_unitary("x")), torch.ones(2, dtype=torch.float64), atol=1e-13)
    # the same pulse about y is a Y gate; half the area about x is sqrt(X)
    controls_y = controls.flip(-1)
    assert average_gate_fidelity(simulate(controls_y, zero, zero), target_unitary("y")).min() > 1 - 1e-13
    assert average_gate_fidelity(simulate(controls / 2, zero, zero), target_unitary("sqrt_x")).min() > 1 - 1e-13


def test_pauli_eigenstates_average_to_average_gate_fidelity():
    gen = torch.Generator().manual_seed(3)
    controls = 4 * torch.rand(5, 6, 2, generator=gen, dtype=torch.float64) - 2
    channel = simulate(controls, *_rates([0.3, 0.1, 0.0, 1.0, 0.02], [0.05, 0.2, 0.0, 0.3, 0.01]), detuning=0.7)
    for name in ("x", "h", "sqrt_x", "identity"):
        u = target_unitary(name)
        per_state = state_fidelities(channel, pauli_eigenstates(), u)
        assert torch.allclose(per_state.mean(1), average_gate_fidelity(channel, u), atol=1e-13)
    assert state_transfer_fidelity(channel, target_unitary("x")).shape == (5,)


def test_channels_are_trace_preserving_and_completely_positive():
    gen = torch.Generator().manual_seed(11)
    b = 16
    controls = 8 * torch.rand(b, 12, 2, generator=gen, dtype=torch.float64) - 4
    gamma_phi = 2 * torch.rand(b, generator=gen, dtype=torch.float64)
    gamma_down = torch.rand(b, generator=gen, dtype=torch.float64)
    gamma_up = torch.rand(b, generator=gen, dtype=torch.float64)
    channel = simulate(controls, gamma_phi, gamma_down, gamma_up, detuning=torch.randn(b, generator=gen, dtype=torch.float64))
    # trace preservation: vec(I)^T S = vec(I)^T
    vec_identity = vec(torch.eye(2, dtype=torch.complex128))
    assert torch.allclose(vec_identity @ channel, vec_identity.expand(b, 4), atol=1e-12)
    # complete positivity: the Choi matrix sum_ij |i><j| kron E(|i><j|) is positive semidefinite
    choi = torch.zeros(b, 4, 4, dtype=torch.complex128)
    for i in range(2):
        for j in range(2):
            e = torch.zeros(2, 2, dtype=torch.complex128)
            e[i, j] = 1
            out = unvec(channel @ vec(e))
            choi[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2] = out
    assert torch.allclose(choi, choi.transpose(-1, -2).conj(), atol=1e-12)
    assert torch.linalg.eigvalsh(choi).min() > -1e-12


def test_simulator_is_differentiable_in_the_controls():
    controls = torch.full((1, 4, 2), 0.5, dtype=torch.float64, requires_grad=True)
    fid = average_gate_fidelity(simulate(controls, *_rates([0.2], [0.05])), target_unitary("x"))
    (grad,) = torch.autograd.grad(fid.sum(), controls)
    eps = 1e-6
    bumped = controls.detach().clone()
    bumped[0, 2, 0] += eps
    fd = (average_gate_fidelity(simulate(bumped, *_rates([0.2], [0.05])), target_unitary("x")) - fid.detach()) / eps
    assert grad[0, 2, 0].item() == pytest.approx(fd.item(), rel=1e-4)


# ---------------------------------------------------------------------------------------------
# Cross-check against circuit simulators with noise channels (Strang splitting, fine time steps)

CIRCUIT_CASE = {
    "controls": [[2.1, -0.4], [0.3, 1.7], [-1.2, 0.8], [3.0, 0.0]],
    "gamma_phi": 0.35,
    "gamma": 0.12,  # Gamma_down = Gamma_up
    "detuning": 0.6,
    "substeps": 50,
}


def _circuit_steps(case):
    """Per fine step: (segment unitary, gamma of GeneralizedAmplitudeDamping(p=1/2), PhaseDamping gamma) at dt/2."""
    n = len(case["controls"])
    dt = 1.0 / (n * case["substeps"])
    half_amp = 1 - math.exp(-2 * case["gamma"] * dt / 2)  # populations: difference decays at 2 Gamma
    half_phase = 1 - math.exp(-2 * case["gamma_phi"] * dt / 2)  # coherences: sqrt(1 - g) = exp(-gamma_phi dt/2)
    sx, sy, sz = (np.array(m, dtype=np.complex128) for m in ([[0, 1], [1, 0]], [[0, -1j], [1j, 0]], [[1, 0], [0, -1]]))
    steps = []
    for ux, uy in case["controls"]:
        h = 0.5 * (case["detuning"] * sz + ux * sx + uy * sy)
        w, v = np.linalg.eigh(h)
        u = v @ np.diag(np.exp(-1j * w * dt)) @ v.conj().T
        steps += [(u, half_amp, half_phase)] * case["substeps"]
    return steps


def _reference_outputs(case):
    controls = torch.tensor([case["controls"]], dtype=torch.float64)
    channel = simulate(controls, *_rates([case["gamma_phi"]], [case["gamma"]]), detuning=case["detuning"])
    states = pauli_eigenstates()
    rho_in = vec(states[:, :, None] * states[:, None, :].conj())
    return unvec(torch.einsum("ij,sj->si", channel[0], rho_in)).numpy(), states.numpy()


def test_simulator_agrees_with_pennylane_default_mixed():
    import pennylane as qml

    expected, states = _reference_outputs(CIRCUIT_CASE)
    steps = _circuit_steps(CIRCUIT_CASE)
    dev = qml.device("default.mixed", wires=1)

    @qml.qnode(dev)
    def circuit(psi):
        qml.StatePrep(psi, wires=0)
        for u, amp, phase in steps:
            qml.GeneralizedAmplitudeDamping(amp, 0.5, wires=0)
            qml.PhaseDamping(phase, wires=0)
            qml.QubitUnitary(u, wires=0)
            qml.GeneralizedAmplitudeDamping(amp, 0.5, wires=0)
            qml.PhaseDamping(phase, wires=0)
        return qml.density_matrix(0)

    for psi, rho in zip(states, expected):
        assert np.abs(np.asarray(circuit(psi)) - rho).max() < 1e-3


def test_simulator_agrees_with_tensorcircuit_density_matrix_circuit():
    import tensorcircuit as tc

    expected, states = _reference_outputs(CIRCUIT_CASE)
    steps = _circuit_steps(CIRCUIT_CASE)
    with tc.runtime_backend("numpy"), tc.runtime_dtype("complex128"):
        for psi, rho in zip(states, expected):
            c = tc.DMCircuit(1, dminputs=np.outer(psi, psi.conj()))
            for u, amp, phase in steps:
                c.apply_general_kraus(tc.channels.amplitudedampingchannel(amp, 0.5), 0)
                c.apply_general_kraus(tc.channels.phasedampingchannel(phase), 0)
                c.unitary(0, unitary=u)
                c.apply_general_kraus(tc.channels.amplitudedampingchannel(amp, 0.5), 0)
                c.apply_general_kraus(tc.channels.phasedampingchannel(phase), 0)
            assert np.abs(np.asarray(c.state()) - rho).max() < 1e-3
