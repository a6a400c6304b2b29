"""Pendulum-v1 (gymnasium) with Stable-Baselines3's SAC, TD3 or DDPG and this project's actor
(control/sb3.py; config section ``control``), or model-based PETS (mbrl/; section ``pets``,
classical ensemble), or Dyna (SAC with model rollouts, mbrl/dyna.py; sections ``control`` and
``dyna``). The score is the mean return of the last deterministic evaluation (``final/eval_return``)."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from config_schema import ExperimentConfig
from control.config import ControlConfig, check_control
from mbrl.config import DynaConfig, PETSConfig
from tasks import Task, register_task

ENV_ID = "Pendulum-v1"
#: ``final/steps_to_threshold``: the first evaluation at or above this mean return (issue 14's goal).
THRESHOLD = -200.0
TRAIN = "control.sb3:train_continuous"
CONTROL_ALGORITHMS = ("sac", "td3", "ddpg")


class PendulumExperiment(ExperimentConfig):
    task: Literal["pendulum"] = "pendulum"
    algorithm: str = "sac"
    control: ControlConfig = ControlConfig()
    """SAC / TD3 / DDPG: the Stable-Baselines3 algorithm's settings, the evaluation and the checkpoints."""
    pets: PETSConfig = PETSConfig()
    """PETS: the ensemble, the CEM planner, the budget."""
    dyna: DynaConfig = DynaConfig()
    """Dyna (SAC with model rollouts, mbrl/dyna.py): the ensemble and the rollout schedule; SAC itself is ``control``."""

    @model_validator(mode="after")
    def _control_combinations(self) -> PendulumExperiment:
        if self.algorithm == "pets":
            if self.backend != "classical" or self.gradient != "backprop":
                raise ValueError("field 'backend': PETS's ensemble is classical (backend 'classical', gradient 'backprop'); "
                                 f"got backend {self.backend!r}, gradient {self.gradient!r}")
            return self
        if self.algorithm == "dyna" and (self.backend != "classical" or self.gradient != "backprop"):
            raise ValueError("field 'backend': Dyna's ensemble and actor are classical (backend 'classical', gradient "
                             f"'backprop'); got backend {self.backend!r}, gradient {self.gradient!r}")
        check_control(self)
        return self

    @property
    def total_steps(self) -> int:
        return self.pets.env_steps if self.algorithm == "pets" else self.control.total_steps

    def description_extra(self) -> str:
        return f", {self.total_steps} environment steps"

    def drop_unused(self, data: dict) -> None:
        keep = {"pets": ("pets",), "dyna": ("control", "dyna")}.get(self.algorithm, ("control",))
        for section in ("control", "pets", "dyna"):
            if section not in keep:
                data.pop(section)


def control_task(name: str, title: str, config: type, sections: tuple[str, ...] = ("control",),
                 extra_trainers: dict[str, str] | None = None, **fields) -> Task:
    """A continuous-control task: SAC, TD3, DDPG (and ``extra_trainers``); progress and score from
    the deterministic evaluation."""
    return Task(name=name, title=title, config=config, trainers={**{a: TRAIN for a in CONTROL_ALGORITHMS}, **(extra_trainers or {})},
                progress_metric="eval/return", progress_label="eval return", step_unit="env_step",
                sections=sections, **fields)


register_task(control_task(
    "pendulum", ENV_ID, PendulumExperiment, sections=("control", "pets", "dyna"),
    extra_trainers={"pets": "mbrl.pets:train_pets", "dyna": "mbrl.dyna:train_dyna"},
    score_column="final_eval_return", score_metric="final/eval_return", score_label="eval return",
    extra_columns={"steps_to_threshold": "final/steps_to_threshold"},
    short_metrics={"final/return": "final/eval_return"},
))
