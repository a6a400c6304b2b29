"""Adaptation as a library: MetaMAML (MAML / first-order MAML on any ``nn.Module``) and a
test-time Adapter with a trust region and an EMA of the parameters.

The names and call signatures are those of the SSM meta-RL seed
(``/work/shared/seeds/ssm_meta_rl_test_time_adaptation.md``)::

    from meta import MetaMAML, Adapter, AdaptationConfig
    from models import SSM

**MetaMAML** (Finn et al. 2017). Meta-parameters theta (the model's parameters); per task, K
plain gradient steps on the support loss, ``phi_{k+1} = phi_k - inner_lr grad L_s(phi_k)``, with
``phi_0 = theta``; the meta-loss is the mean query loss ``L_q(phi_K)`` over the tasks, and Adam
(``outer_lr``) steps theta along its gradient.

- second order (``first_order=False``): the gradient flows through the inner steps,
  ``dL_q/dtheta = prod_k (I - inner_lr H_s(phi_k)) grad L_q(phi_K)``;
- first order: the inner gradients are constants, ``dL_q/dtheta = grad L_q(phi_K)``.

The model is evaluated statelessly with ``torch.func.functional_call`` on a dictionary of
(fast) parameters, and the gradients come from ``torch.autograd.grad`` (``create_graph`` for
second order). ``torch.func.grad`` would be the transform-style alternative, but it cannot trace
the jax bridge of the compiled circuits (an ``autograd.Function`` without ``setup_context``),
and one code path for every backend is what makes the backends comparable.

Circuits: second order needs a circuit that autograd can differentiate twice: PennyLane's torch
interface with backprop (``pennylane.interface: torch``) and TensorCircuit on the pytorch math
backend. The jax-compiled circuits (TensorCircuit jax, PennyLane jax) return a vector-Jacobian
product that carries no graph, so their second-order terms would silently be zero; parameter
shift and adjoint do not differentiate twice either. MetaMAML refuses them with one line
(:func:`check_second_order`); first order works on all of them.

**Adapter** (test-time adaptation, TENT-like, Wang et al. 2021). Each call takes up to
``max_steps_per_call`` SGD steps (``lr``) on ``loss_fn(model(states), targets)`` plus
``entropy_weight`` times the mean entropy of ``softmax(model(states))`` (minimised, as in TENT;
zero for one output), the gradient's global norm clipped to ``grad_clip_norm``; after every step
the parameters are projected onto the L2 ball of radius ``trust_region_eps`` about the
parameters the Adapter started from, and an exponential moving average
``ema <- ema_decay ema + (1 - ema_decay) theta`` is updated (``ema`` starts at the start
parameters).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn
from torch.func import functional_call

from models import CircuitBackend, JaxJitCircuit, ParameterShiftCircuit, PennyLaneCircuit
from utils import NonFiniteError

Params = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Circuits inside a model: sharing them on copy, and whether they differentiate twice


def circuit_backends(model: nn.Module) -> Iterator[CircuitBackend]:
    """Every circuit backend held by a module of ``model`` (attribute ``circuit``)."""
    for module in model.modules():
        circuit = getattr(module, "circuit", None)
        if isinstance(circuit, CircuitBackend):
            yield circuit


def second_order_problem(circuit: CircuitBackend) -> str | None:
    """Why autograd cannot differentiate ``circuit`` twice, or None when it can."""
    if isinstance(circuit, ParameterShiftCircuit):
        return "parameter-shift gradients are evaluated without a graph"
    if isinstance(circuit, JaxJitCircuit) and getattr(circuit, "math_backend", "jax") == "jax":
        # TensorCircuitCircuit is a JaxJitCircuit on either math backend; on pytorch it is plain autograd
        return f"{circuit.name} on jax returns a vector-Jacobian product without a graph"
    if isinstance(circuit, PennyLaneCircuit) and circuit.diff_method != "backprop":
        return f"pennylane diff_method {circuit.diff_method!r} is not differentiable twice"
    return None


def check_second_order(model: nn.Module) -> None:
    """ValueError (one line) unless every circuit in ``model`` is differentiable twice."""
    for circuit in circuit_backends(model):
        problem = second_order_problem(circuit)
        if problem is not None:
            raise ValueError(
                f"MetaMAML first_order=False: {problem}; second order needs gradient 'backprop' with pennylane "
                "interface 'torch' or tensorcircuit math_backend 'pytorch'; allowed here: first_order=True"
            )


def shared_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose circuit backends are shared with the original (the simulator,
    QNodes and compiled functions are not rebuilt; parameters and buffers are copied)."""
    memo = {id(c): c for c in circuit_backends(model)}
    return copy.deepcopy(model, memo)


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"MetaMAML {name}: {value!r}; need a finite number > 0")
    return float(value)


# ---------------------------------------------------------------------------------------------
# MetaMAML


class MetaMAML:
    """MAML / first-order MAML on an ``nn.Module`` (see the module docstring).

    ``adapt`` returns an adapted copy and leaves the model untouched; ``meta_update`` takes one
    Adam step (``outer_lr``) on the model's parameters and returns the meta-loss.
    """

    def __init__(self, model: nn.Module, inner_lr: float, outer_lr: float, first_order: bool = False):
        if not isinstance(model, nn.Module):
            raise ValueError(f"MetaMAML model: {type(model).__name__}; need a torch.nn.Module")
        self.model = model
        self.inner_lr = _positive("inner_lr", inner_lr)
        self.outer_lr = _positive("outer_lr", outer_lr)
        self.first_order = bool(first_order)
        if not self.first_order:
            check_second_order(model)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=self.outer_lr)

    # -- the inner loop ----------------------------------------------------------------------

    def loss(self, params: Params, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable) -> torch.Tensor:
        """``loss_fn(model(x), y)`` with the model's parameters replaced by ``params``."""
        return loss_fn(functional_call(self.model, params, (x,)), y)

    def fast_weights(self, support_x: torch.Tensor, support_y: torch.Tensor, loss_fn: Callable, num_steps: int,
                     create_graph: bool) -> Params:
        """phi_K from phi_0 = theta (the model's parameters, in the graph): K plain gradient steps on
        the support loss; with ``create_graph`` the steps are differentiable (second order)."""
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
            raise ValueError(f"MetaMAML num_steps: {num_steps!r}; need an integer >= 0")
        params: Params = dict(self.model.named_parameters())
        with torch.enable_grad():  # the inner steps need gradients even under torch.no_grad()
            for _ in range(num_steps):
                loss = self.loss(params, support_x, support_y, loss_fn)
                if not torch.isfinite(loss):
                    raise NonFiniteError(f"MetaMAML: non-finite support loss {float(loss)}")
                grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph, allow_unused=True)
                params = {name: p if g is None else p - self.inner_lr * g for (name, p), g in zip(params.items(), grads)}
        return params

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, loss_fn: Callable, num_steps: int) -> nn.Module:
        """A copy of the model after ``num_steps`` inner steps on the support set; the model is untouched."""
        fast = self.fast_weights(support_x, support_y, loss_fn, num_steps, create_graph=False)
        adapted = shared_copy(self.model)
        with torch.no_grad():
            for name, p in adapted.named_parameters():
                p.copy_(fast[name])
        return adapted

    # -- the outer loop ----------------------------------------------------------------------

    def meta_loss(self, tasks: Sequence[tuple], loss_fn: Callable, num_steps: int = 1) -> torch.Tensor:
        """Mean query loss after adaptation over ``tasks`` (support_x, support_y, query_x, query_y), as a
        tensor in the graph of the model's parameters (through the inner steps when second order)."""
        if not isinstance(tasks, (list, tuple)) or not tasks:
            raise ValueError("MetaMAML tasks: need a non-empty list of (support_x, support_y, query_x, query_y)")
        total = 0
        for i, task in enumerate(tasks):
            if not isinstance(task, (list, tuple)) or len(task) != 4:
                raise ValueError(f"MetaMAML tasks[{i}]: need a tuple (support_x, support_y, query_x, query_y)")
            support_x, support_y, query_x, query_y = task
            fast = self.fast_weights(support_x, support_y, loss_fn, num_steps, create_graph=not self.first_order)
            total = total + self.loss(fast, query_x, query_y, loss_fn)
        return total / len(tasks)

    def meta_gradient(self, tasks: Sequence[tuple], loss_fn: Callable, num_steps: int = 1) -> tuple[float, Params]:
        """(meta-loss, its gradient per parameter name); the model is not changed."""
        loss = self.meta_loss(tasks, loss_fn, num_steps)
        names, params = zip(*self.model.named_parameters())
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return float(loss), {n: torch.zeros_like(p) if g is None else g for n, p, g in zip(names, params, grads)}

    def meta_update(self, tasks: Sequence[tuple], loss_fn: Callable, num_steps: int = 1) -> float:
        """One Adam step on the meta-loss over ``tasks``; returns the meta-loss before the step."""
        loss = self.meta_loss(tasks, loss_fn, num_steps)
        value = float(loss)
        if not math.isfinite(value):
            raise NonFiniteError(f"MetaMAML: non-finite meta-loss {value}")
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return value


# ---------------------------------------------------------------------------------------------
# Test-time adaptation


class AdaptationConfig(BaseModel):
    """The Adapter's settings; every field is required. A missing, negative or mistyped field
    raises ValueError with one line naming it."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)

    lr: float = Field(gt=0)
    """SGD learning rate of each adaptation step."""
    grad_clip_norm: float = Field(gt=0)
    """The gradient's global L2 norm is clipped to this before each step."""
    trust_region_eps: float = Field(ge=0)
    """Radius of the L2 ball about the start parameters that the parameters never leave (0 freezes them)."""
    ema_decay: float = Field(ge=0, lt=1)
    """ema <- ema_decay * ema + (1 - ema_decay) * theta after every step."""
    entropy_weight: float = Field(ge=0)
    """Weight of the mean softmax entropy of the outputs (minimised, TENT)."""
    max_steps_per_call: int = Field(ge=1)
    """SGD steps per ``Adapter.adapt`` call."""

    def __init__(self, *args: Any, **kwargs: Any):
        names = list(type(self).model_fields)
        if len(args) > len(names):
            raise ValueError(f"AdaptationConfig: {len(args)} positional values for {len(names)} fields ({', '.join(names)})")
        for name, value in zip(names, args):
            if name in kwargs:
                raise ValueError(f"AdaptationConfig.{name}: given twice")
            kwargs[name] = value
        try:
            super().__init__(**kwargs)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or "?"
            if err["type"] == "missing":
                raise ValueError(f"AdaptationConfig.{field}: missing; required fields: {', '.join(names)}") from None
            if err["type"] == "extra_forbidden":
                raise ValueError(f"AdaptationConfig.{field}: unknown field; allowed: {', '.join(names)}") from None
            raise ValueError(f"AdaptationConfig.{field}: {err['msg'].lower()}, got {err.get('input')!r}") from None


def prediction_entropy(outputs: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the entropy of ``softmax(outputs)`` along the last axis (0 for one output)."""
    logp = torch.log_softmax(outputs, dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


class Adapter:
    """Test-time adaptation of ``model`` in place (see the module docstring)."""

    def __init__(self, model: nn.Module, cfg: AdaptationConfig):
        if not isinstance(cfg, AdaptationConfig):
            raise ValueError(f"Adapter cfg: {type(cfg).__name__}; need an AdaptationConfig")
        self.model, self.cfg = model, cfg
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("Adapter model: it has no trainable parameters")
        self.start = [p.detach().clone() for p in self.params]
        self.ema = [p.detach().clone() for p in self.params]
        self.optimizer = torch.optim.SGD(self.params, lr=cfg.lr)
        self.steps = 0
        self.calls = 0

    def objective(self, loss_fn: Callable, batch_dict: dict) -> torch.Tensor:
        """``loss_fn(model(states), targets)`` (``loss_fn(model(states))`` without targets) plus the
        entropy term."""
        if not isinstance(batch_dict, dict) or "states" not in batch_dict:
            keys = sorted(batch_dict) if isinstance(batch_dict, dict) else type(batch_dict).__name__
            raise ValueError(f"Adapter batch_dict: needs 'states' (and optionally 'targets'); got {keys}")
        outputs = self.model(batch_dict["states"])
        loss = loss_fn(outputs, batch_dict["targets"]) if "targets" in batch_dict else loss_fn(outputs)
        if self.cfg.entropy_weight > 0:
            loss = loss + self.cfg.entropy_weight * prediction_entropy(outputs)
        return loss

    def adapt(self, loss_fn: Callable, batch_dict: dict) -> float:
        """``max_steps_per_call`` steps; returns the objective at the start of the last step."""
        value = float("nan")
        for _ in range(self.cfg.max_steps_per_call):
            loss = self.objective(loss_fn, batch_dict)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise NonFiniteError(f"Adapter: non-finite adaptation loss {value} at step {self.steps}")
            self.optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip_norm, error_if_nonfinite=True)
            self.optimizer.step()
            self._project()
            with torch.no_grad():
                for e, p in zip(self.ema, self.params):
                    e.mul_(self.cfg.ema_decay).add_(p.detach(), alpha=1 - self.cfg.ema_decay)
            self.steps += 1
        self.calls += 1
        return value

    def distance(self) -> float:
        """L2 distance of the parameters (all of them, as one vector) from the start."""
        with torch.no_grad():
            return float(torch.sqrt(sum(((p - s) ** 2).sum() for p, s in zip(self.params, self.start))))

    def _project(self) -> None:
        distance = self.distance()
        eps = self.cfg.trust_region_eps
        if distance > eps:
            scale = eps / distance
            with torch.no_grad():
                for p, s in zip(self.params, self.start):
                    p.copy_(s + scale * (p - s))

    def ema_model(self) -> nn.Module:
        """A copy of the model (circuits shared) holding the EMA parameters."""
        out = shared_copy(self.model)
        trainable = [p for p in out.parameters() if p.requires_grad]
        with torch.no_grad():
            for p, e in zip(trainable, self.ema):
                p.copy_(e)
        return out

    def reset(self) -> None:
        """Back to the start parameters (and the EMA with them)."""
        with torch.no_grad():
            for p, s, e in zip(self.params, self.start, self.ema):
                p.copy_(s)
                e.copy_(s)
        self.optimizer = torch.optim.SGD(self.params, lr=self.cfg.lr)
