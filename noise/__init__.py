"""Noise of the qubit tasks: PSD models and task distributions (psd), PSD -> Lindblad rates
(lindblad), and the differentiable Lindblad simulator with gate fidelities (simulator)."""

from noise.lindblad import PSDToLindblad, Rates, filter_function, pulse_fractions
from noise.psd import MODEL_ENCODING, MODEL_TYPES, NoiseParameters, TaskDistribution, double_exp, lorentzian, one_over_f, white

__all__ = [
    "MODEL_ENCODING",
    "MODEL_TYPES",
    "NoiseParameters",
    "PSDToLindblad",
    "Rates",
    "TaskDistribution",
    "double_exp",
    "filter_function",
    "lorentzian",
    "one_over_f",
    "pulse_fractions",
    "white",
]
