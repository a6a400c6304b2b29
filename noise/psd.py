"""Task distributions over noise parameters (the PSD models and ``NoiseParameters`` live in
:mod:`noise.spectra` and are re-exported here).

Units follow docs/CONVENTIONS.md §3: time in units of the gate duration T = 1, angular frequencies
omega in 1/T, PSD values in 1/T (a two-sided PSD S(omega) = int <xi(t) xi(0)> e^{-i omega t} dt of a
classical noise xi(t) in 1/T, coupled as H_noise = (xi(t)/2) sigma_z).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from noise.lindblad import PSDToLindblad
from noise.spectra import MODEL_ENCODING, MODEL_TYPES, NoiseParameters, double_exp, lorentzian, one_over_f, white

__all__ = ["MODEL_ENCODING", "MODEL_TYPES", "PARAMETERS", "NoiseParameters", "TaskDistribution", "double_exp", "lorentzian",
           "one_over_f", "ramsey_gamma_phi", "white"]


PARAMETERS = ("alpha", "A", "gamma_phi", "omega_c", "A2", "omega_c2", "detuning")


@dataclass(frozen=True)
class TaskDistribution:
    """A distribution of tasks: continuous noise parameters and, when mixing, the PSD model.

    ``dist_type``: ``uniform`` (each parameter uniform in its range), ``log_uniform`` (A,
    gamma_phi, omega_c, A2, omega_c2 uniform in log, alpha and detuning uniform) or ``gaussian``
    (centred in the range, standard deviation a sixth of its width, clipped to the range).
    ``ranges`` maps alpha, omega_c, the strength, and, for double_exp, A2 and omega_c2 (optionally
    detuning) to ``(low, high)``. ``model_types`` None means one_over_f only.

    The strength is either ``A`` (the PSD amplitude; its units differ between models: 1/T^(1+alpha)
    for one_over_f, 1/T^3 for lorentzian, so one A range mixes strengths as well as shapes) or
    ``gamma_phi`` (the Ramsey dephasing rate chi_Ramsey(T)/T in 1/T; A is then solved per task,
    A = gamma_phi / gamma_phi(A = 1), so every model spans the same Ramsey rates and a mixed
    distribution mixes shapes only). With ``gamma_phi``, Lorentzian tasks get alpha = 2, their
    actual high-frequency exponent (a Lorentzian is the alpha = 2 member of the one_over_f family),
    so alpha is meaningful for every task; double_exp needs ``A``.
    """

    dist_type: str
    ranges: dict[str, tuple[float, float]]
    model_types: tuple[str, ...] | None = None
    model_probs: tuple[float, ...] | None = None
    _probs: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.dist_type not in ("uniform", "log_uniform", "gaussian"):
            raise ValueError(f"dist_type {self.dist_type!r}; allowed: uniform, log_uniform, gaussian")
        models = tuple(self.model_types) if self.model_types else ("one_over_f",)
        object.__setattr__(self, "model_types", models)
        for m in models:
            if m not in MODEL_ENCODING:
                raise ValueError(f"model_types: {m!r}; allowed: {', '.join(MODEL_TYPES)}")
        if ("A" in self.ranges) == ("gamma_phi" in self.ranges):
            raise ValueError("ranges: give exactly one strength, 'A' (PSD amplitude) or 'gamma_phi' (Ramsey rate, 1/T)")
        if "gamma_phi" in self.ranges and "double_exp" in models:
            raise ValueError("ranges: 'gamma_phi' supports one_over_f and lorentzian; double_exp needs 'A'")
        needed = ["alpha", self.strength, "omega_c"] + (["A2", "omega_c2"] if "double_exp" in models else [])
        for key in needed:
            if key not in self.ranges:
                why = "double_exp needs A2 and omega_c2" if key in ("A2", "omega_c2") else "needed: alpha, A or gamma_phi, omega_c"
                raise ValueError(f"ranges: missing {key!r} ({why})")
        for key, (lo, hi) in self.ranges.items():
            if key not in PARAMETERS:
                raise ValueError(f"ranges: unknown parameter {key!r}; allowed: {', '.join(PARAMETERS)}")
            if not lo <= hi or (key not in ("alpha", "detuning") and lo <= 0):
                raise ValueError(f"ranges.{key}: need low <= high (and low > 0 for A, gamma_phi, omega_c, A2, omega_c2), got ({lo}, {hi})")
        if self.model_probs is None:
            probs = np.full(len(models), 1.0 / len(models))
        else:
            probs = np.asarray(self.model_probs, dtype=np.float64)
            if probs.shape != (len(models),) or (probs < 0).any() or abs(probs.sum() - 1) > 1e-9:
                raise ValueError(f"model_probs: need {len(models)} non-negative numbers summing to 1, got {list(self.model_probs)}")
        object.__setattr__(self, "_probs", probs)

    @property
    def probs(self) -> np.ndarray:
        return self._probs

    @property
    def strength(self) -> str:
        """``A`` or ``gamma_phi``: the parameter that sets each task's noise strength."""
        return "gamma_phi" if "gamma_phi" in self.ranges else "A"

    def _draw(self, key: str, n: int, rng: np.random.Generator) -> np.ndarray:
        lo, hi = self.ranges[key]
        if self.dist_type == "uniform" or (self.dist_type == "log_uniform" and key in ("alpha", "detuning")):
            return rng.uniform(lo, hi, n)
        if self.dist_type == "log_uniform":
            return np.exp(rng.uniform(math.log(lo), math.log(hi), n))
        return np.clip(rng.normal((lo + hi) / 2, (hi - lo) / 6, n), lo, hi)

    def sample(self, n: int, rng: np.random.Generator) -> list[NoiseParameters]:
        """``n`` independent tasks drawn with ``rng``."""
        models = rng.choice(len(self.model_types), size=n, p=self._probs)
        draws = {k: self._draw(k, n, rng) for k in self.ranges if k in PARAMETERS}
        tasks = []
        for i in range(n):
            model = self.model_types[models[i]]
            extra = {}
            if model == "double_exp":
                extra = {"A2": float(draws["A2"][i]), "omega_c2": float(draws["omega_c2"][i])}
            if "detuning" in draws:
                extra["detuning"] = float(draws["detuning"][i])
            alpha = float(draws["alpha"][i])
            if self.strength == "gamma_phi":
                alpha = 2.0 if model == "lorentzian" else alpha
                unit = NoiseParameters(alpha, 1.0, float(draws["omega_c"][i]), model)
                amplitude = float(draws["gamma_phi"][i]) / float(ramsey_gamma_phi([unit])[0])
            else:
                amplitude = float(draws["A"][i])
            tasks.append(NoiseParameters(alpha, amplitude, float(draws["omega_c"][i]), model, **extra))
        return tasks

    def features(self, tasks: list[NoiseParameters]) -> np.ndarray:
        """Policy input per task, each in [-1, 1]: alpha, log10 of the strength (A or gamma_phi),
        log10 omega_c scaled by this distribution's ranges, plus the model encoding scaled to
        [-1, 1] when models are mixed."""
        arr = np.stack([t.to_array(include_model=True, normalized=True) for t in tasks])
        if self.strength == "gamma_phi":
            arr[:, 1] = np.log10(ramsey_gamma_phi(tasks))
        key = self.strength
        lo = np.array([self.ranges["alpha"][0], math.log10(self.ranges[key][0]), math.log10(self.ranges["omega_c"][0])])
        hi = np.array([self.ranges["alpha"][1], math.log10(self.ranges[key][1]), math.log10(self.ranges["omega_c"][1])])
        width = np.where(hi > lo, hi - lo, 1.0)
        scaled = np.clip(2 * (arr[:, :3] - lo) / width - 1, -1.5, 1.5)
        if len(self.model_types) > 1:
            scaled = np.concatenate([scaled, arr[:, 3:] - 1.0], axis=1)
        return scaled

    @property
    def n_features(self) -> int:
        return 4 if len(self.model_types) > 1 else 3

    def compute_variance(self, converter=None, n_samples: int = 4000, seed: int = 0) -> dict[str, float]:
        """Task variance over ``n_samples`` tasks drawn from ``seed``, per component.

        - ``raw`` (and ``raw_alpha``, ``raw_A``, ``raw_omega_c``, ``raw_model``): the earlier work's
          sigma^2_theta, variances of alpha, A, omega_c in their own units plus the model encoding.
          Kept for comparison only: it adds quantities in different units (omega_c's dominates).
        - ``shape_alpha``, ``shape_log10_omega_c``, ``shape_model`` and ``strength_log10_gamma_phi``:
          dimensionless variances of the shape parameters and of the log Ramsey rate.
        - with ``converter`` (a :class:`noise.lindblad.PSDToLindblad`), in (1/T)^2:
          ``rates_dephasing`` (Ramsey gamma_phi), ``rates_relaxation`` (Gamma), ``rates_detuning``
          (the quasi-static detuning, apart), ``rates_noise`` = dephasing + relaxation, and
          ``rates`` = all three (the figure's x axis, as before).
        """
        tasks = self.sample(n_samples, np.random.default_rng(seed))
        raw = np.stack([t.to_array(include_model=True) for t in tasks])
        gamma_phi = ramsey_gamma_phi(tasks)
        out = {
            "raw": float(raw.var(axis=0).sum()),
            "raw_alpha": float(raw[:, 0].var()),
            "raw_A": float(raw[:, 1].var()),
            "raw_omega_c": float(raw[:, 2].var()),
            "raw_model": float(raw[:, 3].var()),
            "shape_alpha": float(raw[:, 0].var()),
            "shape_log10_omega_c": float(np.log10(raw[:, 2]).var()),
            "shape_model": float(raw[:, 3].var()),
            "strength_log10_gamma_phi": float(np.log10(gamma_phi).var()),
        }
        if converter is not None:
            rates = converter.rates(tasks)
            out["rates_dephasing"] = float(np.var(rates.gamma_phi))
            out["rates_relaxation"] = float(np.var(rates.gamma_down))
            out["rates_detuning"] = float(np.var([t.detuning for t in tasks]))
            out["rates_noise"] = out["rates_dephasing"] + out["rates_relaxation"]
            out["rates"] = out["rates_noise"] + out["rates_detuning"]
        return out


def ramsey_gamma_phi(tasks: list[NoiseParameters], T: float = 1.0) -> np.ndarray:
    """Ramsey dephasing rate chi_Ramsey(T)/T (1/T) of each task, by :class:`noise.lindblad.PSDToLindblad`."""
    converter = _RAMSEY.get(T)
    if converter is None:
        converter = _RAMSEY[T] = PSDToLindblad(T=T)
    return converter.chi(tasks) / T


_RAMSEY: dict[float, object] = {}
