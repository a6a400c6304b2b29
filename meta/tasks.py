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
from noise.simulator import (
    average_gate_fidelity,
    pauli_eigenstates,
    simulate,
    state_fidelities,
    state_transfer_fidelity,
    target_unitary,
)


@dataclass
class QubitTasks:
    tasks: list[NoiseParameters]
    inputs: torch.Tensor
    """Policy inputs (B, d): task features, or a constant 1 when the policy gets no task input."""
    gamma_phi: torch.Tensor
    gamma_down: torch.Tensor
    gamma_up: torch.Tensor
    detuning: torch.Tensor
    target: torch.Tensor
    fidelity_kind: str = "average"
    support_states: int = 2
    shots: int = 256

    def __len__(self) -> int:
        return len(self.tasks)

    @property
    def model_types(self) -> list[str]:
        return [t.model_type for t in self.tasks]

    def select(self, index) -> QubitTasks:
        """Tasks at ``index`` (a tensor or list of positions, repeats allowed)."""
        index = torch.as_tensor(index, dtype=torch.long)
        return replace(
            self,
            tasks=[self.tasks[i] for i in index.tolist()],
            inputs=self.inputs[index],
            gamma_phi=self.gamma_phi[index],
            gamma_down=self.gamma_down[index],
            gamma_up=self.gamma_up[index],
            detuning=self.detuning[index],
        )

    def repeat_each(self, m: int) -> QubitTasks:
        """Every task ``m`` times in a row (for ``m`` parameter points per task)."""
        return self.select(torch.arange(len(self)).repeat_interleave(m))

    def channel(self, controls: torch.Tensor) -> torch.Tensor:
        return simulate(controls, self.gamma_phi, self.gamma_down, self.gamma_up, self.detuning)

    def fidelity(self, controls: torch.Tensor) -> torch.Tensor:
        """Exact fidelity per task (B,)."""
        channel = self.channel(controls)
        if self.fidelity_kind == "state_transfer":
            return state_transfer_fidelity(channel, self.target)
        return average_gate_fidelity(channel, self.target)

    def query_loss(self, controls: torch.Tensor) -> torch.Tensor:
        return 1 - self.fidelity(controls)

    def support_fidelity(self, controls: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Unbiased estimate of the average gate fidelity from random Pauli eigenstates and shots."""
        b = len(self)
        choice = torch.rand(b, 6, generator=generator).argsort(dim=1)[:, : self.support_states]
        states = pauli_eigenstates()[choice]  # (B, S, 2)
        p = state_fidelities(self.channel(controls), states, self.target).clamp(0.0, 1.0)
        if self.shots == 0:
            return p.mean(1)
        counts = torch.binomial(torch.full_like(p, float(self.shots)).detach(), p.detach(), generator=generator)
        measured = p + (counts / self.shots - p).detach()
        return measured.mean(1)

    def support_loss(self, controls: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return 1 - self.support_fidelity(controls, generator)


@dataclass(frozen=True)
class TaskFactory:
    """Samples task batches from a distribution and turns them into :class:`QubitTasks`."""

    distribution: TaskDistribution
    converter: PSDToLindblad
    target_gate: str
    task_input: str
    fidelity_kind: str
    support_states: int
    shots: int

    @property
    def n_inputs(self) -> int:
        return self.distribution.n_features if self.task_input == "features" else 1

    def make(self, tasks: list[NoiseParameters]) -> QubitTasks:
        rates = self.converter.rates(tasks)
        if self.task_input == "features":
            inputs = torch.as_tensor(self.distribution.features(tasks), dtype=torch.float64)
        else:
            inputs = torch.ones(len(tasks), 1, dtype=torch.float64)

        def t(x):
            return torch.as_tensor(np.asarray(x), dtype=torch.float64)

        return QubitTasks(
            tasks,
            inputs,
            t(rates.gamma_phi),
            t(rates.gamma_down),
            t(rates.gamma_up),
            t([task.detuning for task in tasks]),
            target_unitary(self.target_gate),
            self.fidelity_kind,
            self.support_states,
            self.shots,
        )

    def sample(self, n: int, rng: np.random.Generator) -> QubitTasks:
        return self.make(self.distribution.sample(n, rng))
