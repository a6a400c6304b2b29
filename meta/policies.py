"""Pulse policies: an input (task features, or a constant) -> bounded pulse amplitudes (N, 2).

Every policy is a function of one flat parameter vector, evaluated for ``M`` parameter vectors
paired with ``M`` inputs at once::

    pulses(params (M, P), inputs (M, d)) -> controls (M, N, 2),   |u| <= max_amplitude

so MAML can give every task its own adapted parameters and the gradient estimators can
evaluate all their shifted points in one batched call. Differentiable to second order where
the backend is (classical; PennyLane default.qubit backprop; TensorCircuit on the pytorch
math backend).

- :class:`MLPPulsePolicy` (classical): tanh MLP, the last layer mapped through ``u_max tanh``.
- :class:`CircuitPulsePolicy` (PennyLane, TensorCircuit): the data re-uploading circuit of
  models.py (same gate list on both backends) with the inputs as encoding angles
  ``lambda * x``; readouts <Z_i> and <Z_i Z_i+1>; a trainable linear map from the readouts to
  the 2N amplitudes, then ``u_max tanh``.
"""

from __future__ import annotations

import math

import torch

from backends import BACKENDS
from config_schema import ExperimentConfig
from models import DTYPE, CircuitCounters, CircuitSpec, initial_angles


class PulsePolicy(CircuitCounters):
    n_params: int

    def __init__(self, n_inputs: int, n_segments: int, max_amplitude: float):
        self.n_inputs, self.n_segments, self.max_amplitude = n_inputs, n_segments, max_amplitude

    def init_params(self, seed: int) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def raw_outputs(self, params: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def pulses(self, params: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        raw = self.raw_outputs(params.to(DTYPE), inputs.to(DTYPE))
        return self.max_amplitude * torch.tanh(raw).reshape(params.shape[0], self.n_segments, 2)


class MLPPulsePolicy(PulsePolicy):
    def __init__(self, n_inputs: int, n_segments: int, max_amplitude: float, hidden_sizes: list[int]):
        super().__init__(n_inputs, n_segments, max_amplitude)
        self.sizes = [n_inputs, *hidden_sizes, 2 * n_segments]
        self.n_params = sum(o * i + o for i, o in zip(self.sizes[:-1], self.sizes[1:]))

    def init_params(self, seed: int) -> torch.Tensor:
        """torch.nn.Linear's U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases."""
        gen = torch.Generator().manual_seed(seed)
        chunks = []
        for i, o in zip(self.sizes[:-1], self.sizes[1:]):
            bound = 1 / math.sqrt(i)
            chunks.append((2 * torch.rand(o * i + o, generator=gen, dtype=DTYPE) - 1) * bound)
        return torch.cat(chunks)

    def raw_outputs(self, params: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        h, start = inputs, 0
        last = len(self.sizes) - 2
        for layer, (i, o) in enumerate(zip(self.sizes[:-1], self.sizes[1:])):
            w = params[:, start : start + o * i].reshape(-1, o, i)
            b = params[:, start + o * i : start + o * i + o]
            start += o * i + o
            h = torch.einsum("mi,moi->mo", h, w) + b
            if layer != last:
                h = torch.tanh(h)
        return h


def pulse_readouts(n_qubits: int) -> tuple[tuple[float, tuple[int, ...]], ...]:
    singles = [(1.0, (q,)) for q in range(n_qubits)]
    pairs = [(1.0, (q, q + 1)) for q in range(n_qubits - 1)]
    return tuple(singles + pairs)


class CircuitPulsePolicy(PulsePolicy):
    """Parameters (flat, in order): theta (L+1, n, 3), input scaling lambda (L, K), readout map
    W (2N, O), bias b (2N)."""

    def __init__(self, exp: ExperimentConfig, n_inputs: int, n_segments: int, max_amplitude: float):
        super().__init__(n_inputs, n_segments, max_amplitude)
        self.spec = CircuitSpec(exp.model.n_qubits, exp.model.n_layers, n_inputs, pulse_readouts(exp.model.n_qubits))
        self.circuit = BACKENDS.get(exp.backend).build_circuit(self.spec, exp)
        self.init = exp.model.init
        spec = self.spec
        self.n_obs = len(spec.observables)
        self.n_scaling = spec.n_layers * spec.n_encoding
        self.n_params = spec.n_theta + self.n_scaling + 2 * n_segments * self.n_obs + 2 * n_segments
        self.feature_index = torch.tensor([spec.encoding_feature(k) for k in range(spec.n_encoding)])

    def init_params(self, seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        theta = initial_angles(self.spec.n_theta, self.init, gen)
        scaling = torch.ones(self.n_scaling, dtype=DTYPE)
        bound = 1 / math.sqrt(self.n_obs)
        readout = (2 * torch.rand(2 * self.n_segments * self.n_obs, generator=gen, dtype=DTYPE) - 1) * bound
        bias = torch.zeros(2 * self.n_segments, dtype=DTYPE)
        return torch.cat([theta, scaling, readout, bias])

    def raw_outputs(self, params: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        spec, m = self.spec, params.shape[0]
        n_theta, n_scaling, n_out = spec.n_theta, self.n_scaling, 2 * self.n_segments
        theta = params[:, :n_theta]
        scaling = params[:, n_theta : n_theta + n_scaling].reshape(m, spec.n_layers, spec.n_encoding)
        start = n_theta + n_scaling
        w = params[:, start : start + n_out * self.n_obs].reshape(m, n_out, self.n_obs)
        b = params[:, start + n_out * self.n_obs :]
        encoding = scaling * inputs[:, None, self.feature_index.to(inputs.device)]
        angles = torch.cat([theta, encoding.reshape(m, -1)], dim=1)
        expvals = self.circuit(angles)  # (M, O)
        return torch.einsum("mo,mko->mk", expvals.to(DTYPE), w) + b


def build_pulse_policy(exp: ExperimentConfig, n_inputs: int) -> PulsePolicy:
    meta = exp.meta
    if not BACKENDS.get(exp.backend).is_circuit:
        return MLPPulsePolicy(n_inputs, meta.n_segments, meta.max_amplitude, exp.model.hidden_sizes)
    return CircuitPulsePolicy(exp, n_inputs, meta.n_segments, meta.max_amplitude)
