"""Noise power spectral densities and the noise parameters of one task.

Units follow docs/CONVENTIONS.md §3: time in units of the gate duration T = 1, angular frequencies
omega in 1/T, PSD values in 1/T (a two-sided PSD S(omega) = int <xi(t) xi(0)> e^{-i omega t} dt of a
classical noise xi(t) in 1/T, coupled as H_noise = (xi(t)/2) sigma_z).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: Model encodings used in task feature vectors.
MODEL_ENCODING = {"one_over_f": 0, "lorentzian": 1, "double_exp": 2}
MODEL_TYPES = tuple(MODEL_ENCODING)


def one_over_f(omega, A, alpha, omega_c):
    """S(omega) = A / (|omega|^alpha + omega_c^alpha): 1/f^alpha noise, flat below the corner omega_c.

    A in 1/T^(1+alpha) (so S is in 1/T), omega and omega_c in 1/T, alpha dimensionless.
    """
    return A / (np.abs(omega) ** alpha + omega_c**alpha)


def lorentzian(omega, A, omega_c):
    """S(omega) = A / (omega^2 + omega_c^2): Ornstein-Uhlenbeck noise with correlation rate omega_c.

    Its correlation function is <xi(t) xi(0)> = A/(2 omega_c) exp(-omega_c |t|). A in 1/T^3.
    """
    return A / (omega**2 + omega_c**2)


def double_exp(omega, A, omega_c, A2, omega_c2):
    """Two independent Ornstein-Uhlenbeck processes: A/(omega^2+omega_c^2) + A2/(omega^2+omega_c2^2)."""
    return lorentzian(omega, A, omega_c) + lorentzian(omega, A2, omega_c2)


def white(omega, S0):
    """S(omega) = S0 (1/T): delta-correlated noise, <xi(t) xi(0)> = S0 delta(t). Used by the tests."""
    return np.full(np.shape(omega), S0, dtype=np.float64)


@dataclass(frozen=True)
class NoiseParameters:
    """The noise of one task.

    ``alpha`` is the 1/f exponent (used by one_over_f only), ``A`` and ``omega_c`` the amplitude
    and corner frequency; double_exp adds a second Lorentzian ``(A2, omega_c2)`` (its first one is
    ``(A, omega_c)``; alpha is not used as a mixing weight).
    """

    alpha: float
    A: float
    omega_c: float
    model_type: str = "one_over_f"
    A2: float | None = None
    omega_c2: float | None = None
    detuning: float = 0.0
    """Quasi-static frequency offset delta of this task in 1/T (the omega -> 0 limit of the noise,
    a miscalibrated qubit frequency); enters the Hamiltonian as (delta/2) sigma_z. Not part of the
    feature array: a policy finds it only by adaptation."""

    def __post_init__(self):
        if self.model_type not in MODEL_ENCODING:
            raise ValueError(f"model_type {self.model_type!r}; allowed: {', '.join(MODEL_TYPES)}")
        if self.A < 0 or self.omega_c <= 0:
            raise ValueError(f"need A >= 0 and omega_c > 0, got A={self.A}, omega_c={self.omega_c}")
        if self.model_type == "double_exp" and (self.A2 is None or self.omega_c2 is None):
            raise ValueError("model_type 'double_exp' needs A2 and omega_c2")

    def psd(self, omega, model_type: str | None = None):
        """S(omega) of this task under its own model (or ``model_type`` when given)."""
        model = model_type or self.model_type
        if model == "one_over_f":
            return one_over_f(omega, self.A, self.alpha, self.omega_c)
        if model == "lorentzian":
            return lorentzian(omega, self.A, self.omega_c)
        if model == "double_exp":
            if self.A2 is None or self.omega_c2 is None:
                raise ValueError("model_type 'double_exp' needs A2 and omega_c2")
            return double_exp(omega, self.A, self.omega_c, self.A2, self.omega_c2)
        raise ValueError(f"model_type {model!r}; allowed: {', '.join(MODEL_TYPES)}")

    def to_array(self, include_model: bool = True, normalized: bool = False) -> np.ndarray:
        """``[alpha, A, omega_c(, model)]``; normalized: ``[alpha, log10 A, log10 omega_c(, model)]``.

        The model is encoded one_over_f 0, lorentzian 1, double_exp 2. The second Lorentzian of
        double_exp is not part of the array (the policy sees it only through adaptation).
        """
        if normalized:
            values = [self.alpha, math.log10(self.A), math.log10(self.omega_c)]
        else:
            values = [self.alpha, self.A, self.omega_c]
        if include_model:
            values.append(float(MODEL_ENCODING[self.model_type]))
        return np.asarray(values, dtype=np.float64)

    @classmethod
    def from_array(cls, arr, has_model: bool = True, normalized: bool = False) -> NoiseParameters:
        """Inverse of :meth:`to_array` (double_exp's second Lorentzian cannot be recovered)."""
        arr = np.asarray(arr, dtype=np.float64)
        if arr.shape != ((4,) if has_model else (3,)):
            raise ValueError(f"expected {4 if has_model else 3} numbers, got shape {arr.shape}")
        alpha, a, wc = arr[:3]
        if normalized:
            a, wc = 10.0**a, 10.0**wc
        model = "one_over_f"
        if has_model:
            codes = {v: k for k, v in MODEL_ENCODING.items()}
            code = round(float(arr[3]))
            if code not in codes or abs(arr[3] - code) > 1e-9:
                raise ValueError(f"invalid model encoding {arr[3]}; allowed: 0 (one_over_f), 1 (lorentzian), 2 (double_exp)")
            model = codes[code]
            if model == "double_exp":
                raise ValueError("double_exp needs A2 and omega_c2, which the array does not hold")
        return cls(float(alpha), float(a), float(wc), model)
