"""The registries of circuit backends and gradient methods.

A backend is one module here that registers a :class:`Backend`: its name, the gradient methods it
can do, whether autograd can differentiate its gradient again (MAML), the checks of its own
config section, and where its circuit factory lives (``"module:function"``, imported only when a
model is built, so validating a config never imports a simulator). The gradient methods are the
project's shared vocabulary (:data:`GRADIENT_METHODS`); which backend does which is the
backend's own declaration. See the README ("Adding a backend, task or algorithm").
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from registry import Registry, discover


@dataclass(frozen=True)
class GradientMethod:
    name: str
    estimated: bool
    """A black-box estimator from loss values only (SPSA, finite differences): it evaluates the
    loss at shifted parameters itself, whatever the backend."""
    summary: str


GRADIENT_METHODS: Registry[GradientMethod] = Registry("gradient method")
for _method in (
    GradientMethod("backprop", False, "automatic differentiation through the simulator"),
    GradientMethod("adjoint", False, "adjoint state-vector differentiation (one forward, one backward sweep)"),
    GradientMethod("parameter-shift", False, "exact circuit gradient from two shifted circuits per gate angle"),
    GradientMethod("spsa", True, "simultaneous-perturbation estimate from random two-sided shifts"),
    GradientMethod("finite-diff", True, "central or forward differences, one shift per parameter"),
):
    GRADIENT_METHODS.register(_method.name, _method)


def _no_checks(exp: Any) -> None:
    return None


@dataclass(frozen=True)
class Backend:
    name: str
    gradients: tuple[str, ...]
    """The gradient methods this backend can do (names in :data:`GRADIENT_METHODS`)."""
    summary: str
    circuit_factory: str | None
    """``"module:function"`` building the circuit from ``(CircuitSpec, experiment)``; None for the
    classical MLP (no circuit)."""
    second_order: Callable[[Any], bool] = lambda exp: False
    """Whether autograd can differentiate this experiment's gradient again (needed by MAML)."""
    check: Callable[[Any], None] = _no_checks
    """Raises ``ValueError("field '...': ...")`` for settings of its own section that cannot work."""
    engine: Callable[[Any], str] = lambda exp: "torch"
    """What simulates this experiment, which decides the devices it can use
    (:func:`utils.simulation_device`): ``torch``, ``torch-real``, ``jax`` or ``cpu``."""

    def __post_init__(self) -> None:
        for g in self.gradients:
            GRADIENT_METHODS.get(g)  # a typo in a declaration fails at import, listing the names

    @property
    def is_circuit(self) -> bool:
        return self.circuit_factory is not None

    def placement(self, exp: Any) -> tuple[str, str | None]:
        """(device the experiment's model runs on, a note when that is not the requested device)."""
        from utils import select_device, simulation_device

        return simulation_device(self.engine(exp), select_device(exp.device))

    def build_circuit(self, spec: Any, exp: Any) -> Any:
        if self.circuit_factory is None:
            raise ValueError(f"backend {self.name!r} has no circuit")
        module, _, function = self.circuit_factory.partition(":")
        return getattr(importlib.import_module(module), function)(spec, exp)


BACKENDS: Registry[Backend] = Registry("backend")


def register_backend(backend: Backend) -> Backend:
    return BACKENDS.register(backend.name, backend)


discover(__name__)
