"""Noise of the qubit tasks: PSD models and noise parameters (spectra), task distributions (psd), PSD -> Lindblad rates
(lindblad), the differentiable Lindblad simulator with gate fidelities (simulator), and the
fidelity models in which the pulse meets the PSD: filter function, trajectories, markovian (models)."""

from noise.lindblad import PSDToLindblad, Rates, filter_function, pulse_fractions
from noise.models import SIMULATIONS, FilterFunctionModel, MarkovianModel, StepCovariance, TrajectoryModel, build_model
from noise.psd import (
    MODEL_ENCODING,
    MODEL_TYPES,
    NoiseParameters,
    TaskDistribution,
    double_exp,
    lorentzian,
    one_over_f,
    ramsey_gamma_phi,
    white,
)

__all__ = [
    "MODEL_ENCODING",
    "MODEL_TYPES",
    "SIMULATIONS",
    "FilterFunctionModel",
    "MarkovianModel",
    "NoiseParameters",
    "PSDToLindblad",
    "Rates",
    "StepCovariance",
    "TaskDistribution",
    "TrajectoryModel",
    "build_model",
    "double_exp",
    "filter_function",
    "lorentzian",
    "one_over_f",
    "pulse_fractions",
    "ramsey_gamma_phi",
    "white",
]
