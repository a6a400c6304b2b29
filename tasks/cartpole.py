"""CartPole-v1 with a circuit or MLP policy (REINFORCE) or Q-network (DQN).

Owns what only CartPole knows: the environment id, how observations are normalised, which
readouts the circuit uses per algorithm, its config section ``training`` and the score (mean
return of the last 10 episodes).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import model_validator

from backends import BACKENDS
from config_schema import ExperimentConfig, TrainingConfig
from tasks import Task, register_task

ENV_ID = "CartPole-v1"
N_ACTIONS = 2
#: Observation scale (x, x_dot, theta, theta_dot) -> inputs of order one (TFQ tutorial). The
#: observation space cannot give it: its bounds are twice the termination thresholds (4.8 m,
#: 0.42 rad) and the velocities are unbounded; 2.4 m and 0.21 rad are the thresholds themselves.
INPUT_SCALE = (2.4, 2.5, 0.21, 2.5)
_OBSERVABLE_RE = re.compile(r"-?(Z\d+)+")


class CartPoleExperiment(ExperimentConfig):
    task: Literal["cartpole"] = "cartpole"
    algorithm: str = "reinforce"
    training: TrainingConfig = TrainingConfig()

    @model_validator(mode="after")
    def _readouts(self) -> CartPoleExperiment:
        circuit = BACKENDS.get(self.backend).is_circuit
        if circuit and self.model.observables != "auto":
            if len(self.model.observables) != N_ACTIONS:
                raise ValueError(
                    f"field 'model.observables': needs one observable per action ({N_ACTIONS}), "
                    f"got {len(self.model.observables)}"
                )
            for obs in self.model.observables:
                if not _OBSERVABLE_RE.fullmatch(obs):
                    raise ValueError(
                        f"field 'model.observables': {obs!r} is not a Pauli-Z product; allowed: e.g. 'Z0Z1', '-Z0Z1Z2Z3'"
                    )
                qubits = [int(q) for q in re.findall(r"\d+", obs)]
                if max(qubits) >= self.model.n_qubits or len(set(qubits)) != len(qubits):
                    raise ValueError(
                        f"field 'model.observables': {obs!r} needs distinct qubits in 0..{self.model.n_qubits - 1}"
                    )
        if self.algorithm == "dqn" and circuit and self.model.observables == "auto":
            if self.model.n_qubits < N_ACTIONS:
                raise ValueError("field 'model.n_qubits': DQN with observables 'auto' needs at least 2 qubits")
        return self

    @property
    def total_steps(self) -> int:
        return self.training.episodes

    def description_extra(self) -> str:
        return f", {self.training.episodes} episodes"

    def drop_unused(self, data: dict) -> None:
        if self.algorithm != "dqn":
            data["training"].pop("dqn")

    # What the model builder asks the task (models.build_model).
    @property
    def policy_head(self) -> str:
        """``policy`` (softmax over actions) for REINFORCE, ``q`` (action values) for DQN."""
        return "policy" if self.algorithm == "reinforce" else "q"

    def observation_scale(self, n_inputs: int) -> tuple[float, ...]:
        return INPUT_SCALE[:n_inputs]

    def default_observables(self, n_qubits: int) -> list[str]:
        """REINFORCE: +/- Z on all qubits (Jerbi et al.); DQN: Z products of the two halves of the
        qubits (Skolik et al.)."""
        if self.algorithm == "reinforce":
            all_z = "".join(f"Z{q}" for q in range(n_qubits))
            return [all_z, "-" + all_z]
        half = n_qubits // 2
        return ["".join(f"Z{q}" for q in range(half)), "".join(f"Z{q}" for q in range(half, n_qubits))]


register_task(Task(
    name="cartpole",
    title=ENV_ID,
    config=CartPoleExperiment,
    trainers={"reinforce": "train:train_reinforce", "dqn": "train:train_dqn"},
    progress_metric="rollout/avg_return_10",
    progress_label="avg return",
    step_unit="episode",
    score_column="final_avg_return",
    score_metric="final/avg_return_10",
    score_label="mean return",
    sections=("training",),
    short_metrics={"final/return": "final/avg_return_10"},
    observation_example=(4,),
))
