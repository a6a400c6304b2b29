"""QubitPulse-v0 (envs/qubit_pulse.py): an X-gate pulse built segment by segment by SAC, TD3 or
DDPG (control/sb3.py), or planned whole against a learned reward ensemble (``pets``, mbrl/pulse.py),
on tasks drawn from the same distribution, with the same fidelity model, as
``qubit_meta``. Config sections ``meta`` (the gate, the pulse, the noise, the held-out tasks and
the baselines) and ``control``; the score is the held-out fidelity of the learned pulse, beside
the robust pulse and the per-task optimum on the same tasks."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from config_schema import MetaConfig
from mbrl.config import PulsePETSConfig
from tasks import register_task
from tasks.pendulum import PendulumExperiment, control_task

ENV_ID = "QubitPulse-v0"


class QubitPulseExperiment(PendulumExperiment):
    task: Literal["qubit_pulse"] = "qubit_pulse"  # type: ignore[assignment]
    meta: MetaConfig = MetaConfig()
    """The gate, the pulse (n_segments, max_amplitude), the noise (required), the held-out tasks
    (eval.n_tasks) and the baselines; the meta-learning fields are not read."""
    pets: PulsePETSConfig = PulsePETSConfig()  # type: ignore[assignment]
    """``algorithm: pets``: the reward ensemble and the CEM planner over whole pulses (mbrl/pulse.py)."""

    @model_validator(mode="after")
    def _noise_given(self) -> QubitPulseExperiment:
        if "noise" not in self.meta.model_fields_set:
            raise ValueError("field 'meta.noise': task 'qubit_pulse' needs a noise section (dist_type, ranges, model_types, "
                             "simulation: the task distribution and fidelity model of its episodes)")
        return self

    @model_validator(mode="after")
    def _pets_episodes(self) -> QubitPulseExperiment:
        if self.algorithm == "pets" and self.pets.env_steps // self.meta.n_segments <= self.pets.seed_episodes:
            raise ValueError(f"field 'pets.env_steps': {self.pets.env_steps} steps are "
                             f"{self.pets.env_steps // self.meta.n_segments} episodes of {self.meta.n_segments} segments; "
                             f"more than pets.seed_episodes ({self.pets.seed_episodes}) are needed to plan at all")
        return self

    def description_extra(self) -> str:
        return f", {self.meta.noise.model_types} noise, {self.control.total_steps} environment steps"


register_task(control_task(
    "qubit_pulse", "noisy-qubit pulse env (QubitPulse-v0)", QubitPulseExperiment, sections=("control", "meta", "pets"),
    extra_trainers={"pets": "mbrl.pulse:train_pets_pulse"},
    score_column="heldout_fidelity", score_metric="final/fidelity", score_label="held-out fidelity",
    extra_columns={"eval_return": "final/eval_return", "fidelity_robust": "final/fidelity_robust",
                   "fidelity_optimum": "final/fidelity_optimum", "gap_to_robust": "final/gap_to_robust",
                   "steps_to_robust": "final/steps_to_robust"},
))
