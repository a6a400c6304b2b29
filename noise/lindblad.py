"""From a noise PSD to Lindblad rates: filter-function dephasing and golden-rule relaxation.

Conventions (docs/CONVENTIONS.md §3; Cywinski et al., PRB 77, 174509 (2008)):

- Dephasing noise couples as H = (xi(t)/2) sigma_z with two-sided PSD S(omega). Under a pulse
  sequence with switching function f(t) = +/-1 (pi pulses at fractions tau_k of the time T) the
  coherence decays as exp(-chi(T)) with::

      chi(T) = (1/pi) int_0^inf S(omega) F(omega T) / omega^2 d omega,
      F(z)   = (1/2) |sum_j (-1)^j (exp(i z tau_{j+1}) - exp(i z tau_j))|^2,  tau_0 = 0, tau_last = 1,

  so F_Ramsey(z) = 2 sin^2(z/2), F_echo(z) = 8 sin^4(z/4), and CPMG-n puts its n pulses at
  (k - 1/2)/n. The dephasing rate is gamma_phi = chi(T)/T; white noise S0 gives S0/2 for every
  sequence (Parseval), which is also the Lindblad rate of the operator (sqrt(S0)/2) sigma_z.
- Relaxation from transverse noise (c xi(t)/2) sigma_x with the same spectrum scaled by the
  coupling ratio c (``transverse_coupling``): Fermi's golden rule at the qubit frequency omega_0
  gives Gamma_down = c^2 S(omega_0)/4 and, since the noise is classical (symmetric spectrum),
  Gamma_up = Gamma_down.
- Lindblad operators: sqrt(Gamma_down) sigma_-, sqrt(Gamma_up) sigma_+, sqrt(gamma_phi/2) sigma_z
  (the last makes coherences decay at gamma_phi).

The integral is evaluated by composite Gauss-Legendre quadrature on a fixed set of nodes, the
same for every task, so the rates of a whole batch of tasks are one matrix-vector product:
log-spaced panels from 1e-9/T to 1/T (resolving corner frequencies down to 1e-6/T), then panels of
width pi/(2T) up to ``omega_max`` (resolving every oscillation of F), then the tail above
``omega_max`` with F replaced by its mean (the oscillating rest is O(S/omega^3) there). The tests
check it against adaptive quadrature (scipy QUADPACK with a Fourier-weighted tail) and closed forms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from noise.spectra import MODEL_TYPES, NoiseParameters

SEQUENCES = ("ramsey", "echo", "cpmg")


def pulse_fractions(sequence: str, n_pulses: int = 1) -> np.ndarray:
    """Times of the pi pulses as fractions of T: ramsey none, echo 1/2, CPMG-n (k - 1/2)/n."""
    if sequence == "ramsey":
        return np.zeros(0)
    if sequence == "echo":
        return np.array([0.5])
    if sequence == "cpmg":
        if n_pulses < 1:
            raise ValueError(f"cpmg needs n_pulses >= 1, got {n_pulses}")
        return (np.arange(1, n_pulses + 1) - 0.5) / n_pulses
    raise ValueError(f"sequence {sequence!r}; allowed: {', '.join(SEQUENCES)}")


def filter_function(z, fractions: np.ndarray) -> np.ndarray:
    """F(z) of the sequence with pi pulses at ``fractions`` of T (z = omega T)."""
    z = np.asarray(z, dtype=np.float64)
    taus = np.concatenate([[0.0], fractions, [1.0]])
    signs = (-1.0) ** np.arange(len(taus) - 1)
    phase = np.exp(1j * z[..., None] * taus)
    total = (signs * (phase[..., 1:] - phase[..., :-1])).sum(-1)
    return 0.5 * np.abs(total) ** 2


def filter_function_mean(fractions: np.ndarray) -> float:
    """Average of F(z) over z (the constant term of its cosine expansion)."""
    taus = np.concatenate([[0.0], fractions, [1.0]])
    # sum_j s_j (e^{i z tau_{j+1}} - e^{i z tau_j}) = sum_k c_k e^{i z tau_k}
    c = np.zeros(len(taus))
    for j in range(len(taus) - 1):
        s = (-1.0) ** j
        c[j + 1] += s
        c[j] -= s
    return 0.5 * float((c**2).sum())


@dataclass(frozen=True)
class Rates:
    """Lindblad rates of a batch of tasks, in 1/T (arrays of shape (B,))."""

    gamma_phi: np.ndarray
    gamma_down: np.ndarray
    gamma_up: np.ndarray


def _gauss_legendre(edges: np.ndarray, order: int) -> tuple[np.ndarray, np.ndarray]:
    x, w = np.polynomial.legendre.leggauss(order)
    a, b = edges[:-1, None], edges[1:, None]
    nodes = (a + b) / 2 + (b - a) / 2 * x
    weights = (b - a) / 2 * w
    return nodes.ravel(), weights.ravel()


class PSDToLindblad:
    """Converts task noise parameters to Lindblad rates and operators (conventions above).

    ``psd_model=None`` uses each task's own ``model_type`` (mixed-model distributions); a model
    name forces that model for every task. ``omega0`` is the qubit frequency in 1/T at which the
    transverse spectrum sets the relaxation rate.
    """

    def __init__(
        self,
        T: float = 1.0,
        sequence: str = "ramsey",
        n_pulses: int = 1,
        omega0: float = 5.0,
        transverse_coupling: float = 1.0,
        psd_model: str | None = None,
        omega_max: float = 2000.0,
        order: int = 8,
    ):
        if T <= 0 or omega0 <= 0 or transverse_coupling < 0:
            raise ValueError("need T > 0, omega0 > 0 and transverse_coupling >= 0")
        if psd_model is not None and psd_model not in MODEL_TYPES:
            raise ValueError(f"psd_model {psd_model!r}; allowed: None, {', '.join(MODEL_TYPES)}")
        self.T, self.sequence, self.n_pulses = T, sequence, n_pulses
        self.omega0, self.transverse_coupling, self.psd_model = omega0, transverse_coupling, psd_model
        self.fractions = pulse_fractions(sequence, n_pulses)
        self.omega_max, self.order = omega_max * max(1, n_pulses) / T, order

    @cached_property
    def _quadrature(self) -> tuple[np.ndarray, np.ndarray]:
        """Nodes and weights of int_0^inf g(omega) F(omega T)/omega^2 d omega (F folded into the weights)."""
        T, order = self.T, self.order
        low = np.concatenate([[0.0], np.logspace(-9, 0, 9 * 6 + 1)]) / T
        width = math.pi / (2 * T * max(1, self.n_pulses))
        mid = np.arange(low[-1], self.omega_max + width / 2, width)
        n1, w1 = _gauss_legendre(np.concatenate([low, mid[1:]]), order)
        weights = w1 * filter_function(n1 * T, self.fractions) / n1**2
        # tail: omega = omega_max / u, u in (0, 1]: int S(omega)/omega^2 d omega = (1/omega_max) int_0^1 S(omega_max/u) du
        u, wu = _gauss_legendre(np.linspace(0.0, 1.0, 9), order)
        n2 = self.omega_max / u
        w2 = wu / self.omega_max * filter_function_mean(self.fractions)
        return np.concatenate([n1, n2]), np.concatenate([weights, w2])

    def psd(self, task: NoiseParameters, omega) -> np.ndarray:
        return task.psd(omega, self.psd_model)

    def chi(self, tasks: list[NoiseParameters]) -> np.ndarray:
        """Decay exponent chi(T) per task."""
        nodes, weights = self._quadrature
        return np.array([self.psd(t, nodes) @ weights for t in tasks]) / math.pi

    def rates(self, tasks: list[NoiseParameters]) -> Rates:
        gamma_phi = self.chi(tasks) / self.T
        s0 = np.array([float(self.psd(t, np.array([self.omega0]))[0]) for t in tasks])
        gamma_down = self.transverse_coupling**2 * s0 / 4
        return Rates(gamma_phi=gamma_phi, gamma_down=gamma_down, gamma_up=gamma_down.copy())

    def get_lindblad_operators(self, task: NoiseParameters) -> list[np.ndarray]:
        """[sqrt(Gamma_down) sigma_-, sqrt(Gamma_up) sigma_+, sqrt(gamma_phi/2) sigma_z] for one task."""
        r = self.rates([task])
        # H = (omega0/2) sigma_z makes |0> (sigma_z = +1) the excited state: sigma_- = |1><0|
        sigma_minus = np.array([[0, 0], [1, 0]], dtype=np.complex128)
        sigma_z = np.diag([1.0, -1.0]).astype(np.complex128)
        return [
            math.sqrt(r.gamma_down[0]) * sigma_minus,
            math.sqrt(r.gamma_up[0]) * sigma_minus.conj().T,
            math.sqrt(r.gamma_phi[0] / 2) * sigma_z,
        ]
