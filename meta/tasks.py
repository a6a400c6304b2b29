"""Qubit-control tasks for meta-learning: a batch of noise settings and its two losses.

Query loss (what meta-learning is judged on): ``1 - F_avg``, the exact average gate fidelity of
the simulated channel against the target gate (or, as an option, the earlier work's |0>
state-transfer fidelity).

Support loss (what adaptation may use): what an experiment could measure. For every task, draw
``states`` of the six Pauli eigenstates at random, prepare each, apply the pulse, and measure in a
basis containing ``U psi`` with ``shots`` shots: the count k ~ Binomial(shots, p) estimates the
state fidelity p. The six Pauli eigenstates form a 3-design, so the mean of p over a uniformly
drawn state is F_avg, and k/shots is unbiased for p: the support loss is an *unbiased*, noisy
estimate of the query loss (tested). Gradients: the estimate enters as
``p + (k/shots - p).detach()`` (straight-through), so its value carries the shot noise and the
random choice of states, while autograd differentiates the exact probabilities of the drawn
states: the gradient an experiment would get from parameter-shift on those states with many
shots. The black-box estimators (SPSA, finite differences) see the noisy values only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from noise import NoiseParameters, PSDToLindblad, TaskDistribution
from noise.models import FidelityModel, FilterFunctionModel, NoiseBatch, TrajectoryModel
from noise.simulator import (
    average_gate_fidelity,
    pauli_eigenstates,
    state_fidelities,
    state_transfer_fidelity,
    target_unitary,
)


@dataclass
class QubitTasks:
    tasks: list[NoiseParameters]
    inputs: torch.Tensor
    """Policy inputs (B, d): task features, or a constant 1 when the policy gets no task input."""
    noise: NoiseBatch
    """Rates, detuning and the fidelity model's per-task data, on the simulation device."""
    model: FidelityModel
    target: torch.Tensor
    fidelity_kind: str = "average"
    support_states: int = 2
    shots: int = 256

    def __len__(self) -> int:
        return len(self.tasks)

    @property
    def model_types(self) -> list[str]:
        return [t.model_type for t in self.tasks]

    @property
    def gamma_phi(self) -> torch.Tensor:
        return self.noise.gamma_phi

    @property
    def gamma_down(self) -> torch.Tensor:
        return self.noise.gamma_down

    @property
    def gamma_up(self) -> torch.Tensor:
        return self.noise.gamma_up

    @property
    def detuning(self) -> torch.Tensor:
        return self.noise.detuning

    @property
    def device(self) -> torch.device:
        return self.noise.gamma_phi.device

    def select(self, index) -> QubitTasks:
        """Tasks at ``index`` (a tensor or list of positions, repeats allowed)."""
        index = torch.as_tensor(index, dtype=torch.long)
        return replace(self, tasks=[self.tasks[i] for i in index.tolist()], inputs=self.inputs[index],
                       noise=self.noise.select(index))

    def repeat_each(self, m: int) -> QubitTasks:
        """Every task ``m`` times in a row (for ``m`` parameter points per task)."""
        return self.select(torch.arange(len(self)).repeat_interleave(m))

    def channel(self, controls: torch.Tensor) -> torch.Tensor:
        """(B, 4, 4) channel on the simulation device (controls are moved there; autograd follows)."""
        return self.model.channel(controls.to(self.device), self.noise)

    def fidelity(self, controls: torch.Tensor) -> torch.Tensor:
        """Fidelity per task (B,), on the device of ``controls``."""
        channel = self.channel(controls)
        if self.fidelity_kind == "state_transfer":
            return state_transfer_fidelity(channel, self.target).to(controls.device)
        return average_gate_fidelity(channel, self.target).to(controls.device)

    def query_loss(self, controls: torch.Tensor) -> torch.Tensor:
        return 1 - self.fidelity(controls)

    def diagnostics(self, controls: torch.Tensor) -> dict[str, np.ndarray]:
        """Model checks per task, no gradient: ``stderr`` of the average gate fidelity
        (trajectories), ``noise_infidelity`` = (2/3) tr Sigma (filter_function; valid below about 0.05)."""
        with torch.no_grad():
            controls = controls.to(self.device)
            if isinstance(self.model, TrajectoryModel):
                samples = self.model.fidelity_samples(controls, self.noise, self.target)
                return {"stderr": (samples.std(1) / samples.shape[1] ** 0.5).cpu().numpy()}
            if isinstance(self.model, FilterFunctionModel):
                return {"noise_infidelity": self.model.noise_infidelity(controls, self.noise).cpu().numpy()}
        return {}

    def support_fidelity(self, controls: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Unbiased estimate of the average gate fidelity from random Pauli eigenstates and shots."""
        b = len(self)
        choice = torch.rand(b, 6, generator=generator).argsort(dim=1)[:, : self.support_states]
        states = pauli_eigenstates()[choice]  # (B, S, 2)
        p = state_fidelities(self.channel(controls), states, self.target).clamp(0.0, 1.0).to(controls.device)
        if self.shots == 0:
            return p.mean(1)
        counts = torch.binomial(torch.full_like(p, float(self.shots)).detach().cpu(), p.detach().cpu(), generator=generator)
        measured = p + (counts.to(p.device) / self.shots - p).detach()
        return measured.mean(1)

    def support_loss(self, controls: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return 1 - self.support_fidelity(controls, generator)


@dataclass(frozen=True)
class TaskFactory:
    """Samples task batches from a distribution and turns them into :class:`QubitTasks`."""

    distribution: TaskDistribution
    converter: PSDToLindblad
    model: FidelityModel
    target_gate: str
    task_input: str
    fidelity_kind: str
    support_states: int
    shots: int
    device: str = "cpu"

    @property
    def n_inputs(self) -> int:
        return self.distribution.n_features if self.task_input == "features" else 1

    def make(self, tasks: list[NoiseParameters], noise_rng: np.random.Generator, model: FidelityModel | None = None) -> QubitTasks:
        """Tasks with their rates and model data; ``noise_rng`` draws the trajectories' noise
        (fixed from then on: common random numbers); ``model`` overrides the factory's."""
        model = model or self.model
        rates = self.converter.rates(tasks)
        if self.task_input == "features":
            inputs = torch.as_tensor(self.distribution.features(tasks), dtype=torch.float64)
        else:
            inputs = torch.ones(len(tasks), 1, dtype=torch.float64)
        noise = model.prepare(tasks, rates.gamma_phi, rates.gamma_down, rates.gamma_up, noise_rng, self.device)
        return QubitTasks(tasks, inputs, noise, model, target_unitary(self.target_gate).to(self.device), self.fidelity_kind,
                          self.support_states, self.shots)

    def sample(self, n: int, rng: np.random.Generator) -> QubitTasks:
        """``n`` tasks drawn with ``rng``; their noise realisations come from a child of ``rng``
        (``rng.spawn``), so the task draws are the same for every fidelity model."""
        return self.make(self.distribution.sample(n, rng), rng.spawn(1)[0])
