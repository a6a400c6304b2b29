"""Policies and Q-networks: one data re-uploading circuit on PennyLane and TensorCircuit, and an MLP.

The circuit (Jerbi et al. 2021; Skolik et al. 2022) on ``n`` qubits with ``L`` layers::

    for l in 0..L-1:   Rx(theta[l,i,0]) Ry(theta[l,i,1]) Rz(theta[l,i,2]) on every qubit i
                       CZ ring (i, i+1 mod n)
                       Rx(lambda[l,k] * s[k mod d]) on qubit k mod n, for k in 0..max(n, d)-1
    final:             Rx Ry Rz with theta[L]
    readout:           <O_a> for one Pauli-Z product O_a per action a

``s`` is the observation divided by the task's observation scale. The head multiplies each
readout by a trainable weight ``w_a`` (init 1) and its sign: REINFORCE uses softmax(beta * w_a
<O_a>), DQN uses Q_a = w_a <O_a>. With 4 qubits and 5 layers this is the reference 94-parameter
model (72 angles, 20 input scalings, 2 output weights).

All quantum models are float64 (complex128 states), so that backends can be compared to 1e-6
and finite differences are not drowned in round-off. Each backend is a callable that maps a
batch of *gate angles* ``(N, G)`` (the variational angles followed by the encoding angles, one
row per circuit) to expectation values ``(N, O)`` and counts every circuit it executes.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from backends.pennylane import pennylane_device_for
from config_schema import ExperimentConfig
from gradients import parameter_shift_expvals
from jit_export import ExportedFunction

#: Digest of this module's source: traced circuits kept on disk (jit_export) are keyed on it.
_MODULE_DIGEST = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()

DTYPE = torch.float64


# ---------------------------------------------------------------------------------------------
# Circuit layout shared by every backend


@dataclass(frozen=True)
class CircuitSpec:
    n_qubits: int
    n_layers: int
    n_inputs: int
    readouts: tuple[tuple[float, tuple[int, ...]], ...]
    """(sign, qubits of the Z product) per action."""

    @property
    def n_encoding(self) -> int:
        return max(self.n_qubits, self.n_inputs)

    def encoding_qubit(self, k: int) -> int:
        return k % self.n_qubits

    def encoding_feature(self, k: int) -> int:
        return k % self.n_inputs

    @property
    def ring(self) -> list[tuple[int, int]]:
        n = self.n_qubits
        if n == 1:
            return []
        if n == 2:
            return [(0, 1)]
        return [(i, (i + 1) % n) for i in range(n)]

    @property
    def observables(self) -> tuple[tuple[int, ...], ...]:
        """Distinct Z products evaluated by the circuit."""
        seen: list[tuple[int, ...]] = []
        for _, qubits in self.readouts:
            if qubits not in seen:
                seen.append(qubits)
        return tuple(seen)

    @property
    def readout_index(self) -> list[int]:
        return [self.observables.index(q) for _, q in self.readouts]

    @property
    def readout_sign(self) -> list[float]:
        return [s for s, _ in self.readouts]

    @property
    def n_theta(self) -> int:
        return (self.n_layers + 1) * self.n_qubits * 3

    @property
    def n_gate_angles(self) -> int:
        return self.n_theta + self.n_layers * self.n_encoding

    def theta_index(self, layer: int, qubit: int, axis: int) -> int:
        return (layer * self.n_qubits + qubit) * 3 + axis

    def encoding_index(self, layer: int, k: int) -> int:
        return self.n_theta + layer * self.n_encoding + k

    def rotation_ops(self, first_angle: int) -> list[tuple[str, tuple[int, ...], int | None]]:
        """Rx Ry Rz on every qubit, angles ``first_angle + 3*qubit + axis``."""
        return [(kind, (q,), first_angle + q * 3 + axis) for q in range(self.n_qubits) for axis, kind in enumerate(("rx", "ry", "rz"))]

    def entangling_ops(self) -> list[tuple[str, tuple[int, ...], int | None]]:
        return [("cz", pair, None) for pair in self.ring]

    def encoding_ops(self, first_angle: int) -> list[tuple[str, tuple[int, ...], int | None]]:
        """Rx(lambda * s) encodings, angles ``first_angle + k``."""
        return [("rx", (self.encoding_qubit(k),), first_angle + k) for k in range(self.n_encoding)]

    def layer_ops(self) -> list[tuple[str, tuple[int, ...], int | None]]:
        """One re-uploading layer on its own angle vector: 3n rotation angles, then the encodings."""
        return self.rotation_ops(0) + self.entangling_ops() + self.encoding_ops(3 * self.n_qubits)

    def gates(self) -> list[tuple[str, tuple[int, ...], int | None]]:
        """The circuit as a list of ``(kind, wires, angle_index)``; kind in rx, ry, rz, cz.

        Both backends build their circuits from these pieces, so they cannot drift apart.
        """
        ops = []
        for layer in range(self.n_layers):
            ops += self.rotation_ops(self.theta_index(layer, 0, 0))
            ops += self.entangling_ops()
            ops += self.encoding_ops(self.encoding_index(layer, 0))
        return ops + self.rotation_ops(self.theta_index(self.n_layers, 0, 0))


def parse_observable(text: str) -> tuple[float, tuple[int, ...]]:
    """``"-Z0Z1"`` -> ``(-1.0, (0, 1))``."""
    sign = -1.0 if text.startswith("-") else 1.0
    return sign, tuple(int(q) for q in re.findall(r"\d+", text))


# ---------------------------------------------------------------------------------------------
# Backends: gate angles (N, G) -> expectation values (N, O)


def needs_grad(tensor: torch.Tensor) -> bool:
    """Whether autograd will want the gradient of a computation on ``tensor``."""
    return torch.is_grad_enabled() and tensor.requires_grad


def _construct(cls, args: tuple, kwargs: dict):
    return cls(*args, **kwargs)


class CircuitBackend:
    """Base class: counts executed circuits; subclasses implement ``_evaluate``."""

    name = "base"
    #: True when ``torch.autograd`` can differentiate through ``__call__`` directly.
    differentiable = True

    def __new__(cls, *args, **kwargs):
        backend = super().__new__(cls)
        backend._constructor_args = (args, kwargs)
        return backend

    def __init__(self, spec: CircuitSpec):
        self.spec = spec
        self.circuit_evals = 0

    def __reduce__(self):
        """Pickled as its constructor call (``mlflow.pytorch.log_model`` pickles whole policies):
        simulator devices, QNodes and compiled functions are built anew where it is unpickled,
        never serialised. Counters start at zero there."""
        args, kwargs = self._constructor_args
        return _construct, (type(self), args, kwargs)

    #: Wall seconds of the calls that compiled (None for backends that do not compile).
    compile_s: float | None = None
    #: True when :meth:`act` runs a whole re-uploading policy (angles, circuit, readout) in one
    #: compiled call (the jax backends).
    compiles_policies = False

    @property
    def n_compiles(self) -> int | None:
        """XLA compilations triggered (None for backends that do not compile)."""
        return None

    def __call__(self, gate_angles: torch.Tensor, *, update: bool | None = None) -> torch.Tensor:
        """Expectation values ``(N, O)``. ``update``: the call is part of a training update (a
        gradient batch), not action selection; by default, when autograd will need its gradient."""
        if gate_angles.ndim != 2 or gate_angles.shape[1] != self.spec.n_gate_angles:
            raise ValueError(f"gate angles must have shape (N, {self.spec.n_gate_angles}), got {tuple(gate_angles.shape)}")
        self.circuit_evals += gate_angles.shape[0]
        return self._evaluate(gate_angles, needs_grad(gate_angles) if update is None else update)

    def _evaluate(self, gate_angles: torch.Tensor, update: bool) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class PennyLaneCircuit(CircuitBackend):
    """A torch-interface QNode with parameter broadcasting over the batch of gate angles.

    ``diff_method`` is passed to the QNode (backprop or adjoint). lightning.qubit does not
    vectorise: PennyLane splits a broadcast batch into one simulation per row (about 4 ms each
    here, against 15 ms for 32 rows broadcast on default.qubit), so on lightning.qubit the calls
    that need no gradient (action selection, DQN targets, estimator batches) with more than one
    row go to a default.qubit QNode; gradients stay with the configured device. PennyLane's own
    parameter-shift transform refuses gradients with respect to broadcast trainable parameters
    (PennyLane #4462, still so in 0.45.1), and every gate angle here is per-sample and trainable,
    so parameter shift wraps this backend in :class:`ParameterShiftCircuit` instead.
    """

    name = "pennylane"
    interface = "torch"

    def __init__(self, spec: CircuitSpec, device_name: str, diff_method: str | None):
        super().__init__(spec)
        import pennylane as qml

        self.device_name = device_name
        self.diff_method = diff_method
        dev = qml.device(device_name, wires=spec.n_qubits)
        gates = spec.gates()
        observables = spec.observables
        op_of = {"rx": qml.RX, "ry": qml.RY, "rz": qml.RZ}

        def circuit(angles):
            for kind, wires, idx in gates:
                if kind == "cz":
                    qml.CZ(wires=list(wires))
                else:
                    op_of[kind](angles[..., idx], wires=wires[0])
            return [qml.expval(qml.prod(*[qml.Z(q) for q in qubits])) for qubits in observables]

        self._qnode = qml.QNode(circuit, dev, interface="torch", diff_method=diff_method)
        self._broadcast_qnode = None
        if device_name == "lightning.qubit":
            broadcasting = qml.device("default.qubit", wires=spec.n_qubits)
            self._broadcast_qnode = qml.QNode(circuit, broadcasting, interface="torch", diff_method=None)

    def _evaluate(self, gate_angles: torch.Tensor, update: bool) -> torch.Tensor:  # noqa: ARG002
        qnode = self._qnode
        if self._broadcast_qnode is not None and not needs_grad(gate_angles) and gate_angles.shape[0] > 1:
            qnode = self._broadcast_qnode
        out = qnode(gate_angles)
        out = torch.stack(list(out), dim=-1) if isinstance(out, (list, tuple)) else out[..., None]
        return out.reshape(gate_angles.shape[0], len(self.spec.observables))


def enable_jax_compilation_cache() -> str:
    """Keep XLA executables on disk so later processes skip compilation; returns the folder.

    Location: $QMLBENCH_JAX_CACHE, else ~/.cache/qmlbench/jax. A later process loads an
    executable it has seen in milliseconds instead of compiling it again (0.5-3 s per shape
    for the scanned 4-qubit circuit on one core; see :class:`TensorCircuitCircuit`). The traced
    functions themselves are kept beside them, in ``exported/`` (:mod:`jit_export`).
    """
    import jax

    path = os.environ.get("QMLBENCH_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qmlbench", "jax")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return path


class JaxCompileMonitor:
    """Counts XLA compilations in this process (loads from the persistent cache included),
    through ``jax.monitoring``: the one place that sees every compile, whoever triggered it."""

    EVENT = "/jax/core/compile/backend_compile_duration"
    compiles = 0
    _installed = False

    @classmethod
    def install(cls) -> None:
        if not cls._installed:
            from jax import monitoring

            monitoring.register_event_duration_secs_listener(cls._on_event)
            cls._installed = True

    @classmethod
    def _on_event(cls, event: str, duration: float, **kwargs) -> None:  # noqa: ARG003
        if event == cls.EVENT:
            cls.compiles += 1


#: Calls without gradient of up to SMALL_BATCH circuits (action selection: one row per
#: environment) run at their own size, unpadded: a run acts on a fixed number of environments, so
#: its acting call site meets one shape (REINFORCE evaluates finished environments too), and
#: padding 10 rows to 16 cost 40 % of the 4-qubit policy's call (0.142 against 0.198 ms, one
#: thread). Every other call is cut into chunks of exactly CHUNK circuits (the last one padded).
#: Each call site of a run (acting, targets, gradient batches, estimator batches) therefore meets
#: one shape from its first update on, however the recorded batch grows, and nothing compiles
#: after warm-up. The cost per circuit varies little between chunks of 128 and 1024 (4 qubits, 5
#: layers, values and row Jacobians: 13.3 ms for one call of 1024 rows, 8 x 1.84 ms in chunks of
#: 128), so the smallest wastes least on padding.
SMALL_BATCH = 16
CHUNK = 128


def padded_chunks(n: int, small: bool = True) -> list[tuple[int, int, int]]:
    """``(start, stop, padded size)`` of every jitted call that evaluates ``n`` circuits
    (``small``: a call that may run unpadded at its own size up to SMALL_BATCH)."""
    if small and n <= SMALL_BATCH:
        return [(0, n, n)]
    return [(start, min(start + CHUNK, n), CHUNK) for start in range(0, n, CHUNK)]


def _apply_ops(circuit, ops, angles) -> None:
    for kind, wires, idx in ops:
        if kind == "cz":
            circuit.cz(*wires)
        else:
            getattr(circuit, kind)(wires[0], theta=angles[idx])


class _JaxCircuitFunction(torch.autograd.Function):
    """torch autograd around a :class:`JaxJitCircuit` (what ``tc.interfaces.torch_interface``
    does, plus padding, chunking and compile accounting). The forward pass runs one jitted call per
    chunk that returns the expectation values and every row's Jacobian ``(N, O, G)``; the backward
    pass contracts it with the incoming gradient in torch, so no circuit is simulated twice."""

    @staticmethod
    def forward(ctx, angles: torch.Tensor, backend: JaxJitCircuit) -> torch.Tensor:
        values, jacobian = backend._run(backend._jit_value_and_jacobian, angles, small=False)
        ctx.save_for_backward(jacobian)
        return values

    @staticmethod
    @torch.autograd.function.once_differentiable  # no second order: differentiating again raises, never a silent zero
    def backward(ctx, grad_output: torch.Tensor):
        (jacobian,) = ctx.saved_tensors
        return torch.einsum("no,nog->ng", grad_output.to(jacobian.dtype), jacobian), None


def use_tensorcircuit(math_backend: str):
    """TensorCircuit with ``math_backend`` and complex128 process-wide, switched only when they
    differ. TensorCircuit's setters walk ``sys.modules``, which fails ("dictionary changed size
    during iteration") while another thread imports a module; so a worker calls this once before it
    starts any thread, and no traced or hot path switches backends again. Returns the module."""
    import tensorcircuit as tc

    if tc.dtypestr != "complex128":
        tc.set_dtype("complex128")  # also switches jax to x64
    if tc.backend.name != math_backend:
        # Its jax backend warns "optax not installed" when created; we use no optax optimiser.
        logging.getLogger("tensorcircuit.backends.jax_backend").setLevel(logging.ERROR)
        tc.set_backend(math_backend)
    return tc


class JaxJitCircuit(CircuitBackend):
    """A circuit simulated by a jax function of a batch of gate angles, ``jit``-compiled for the
    forward pass and for the vector-Jacobian product, behind a torch bridge.

    Shared by TensorCircuit (jax backend) and PennyLane (jax interface), so both get the same
    persistent compilation cache (:func:`enable_jax_compilation_cache`), the same padded batch
    shapes (:func:`padded_chunks`) and the same compile accounting: ``n_compiles`` / ``compile_s``
    count the XLA compilations this backend triggered and the wall time of the calls that
    compiled.
    """

    compile_s: float | None = 0.0

    def _setup_jax(self, batched: Callable, for_gradient: Callable | None = None) -> None:
        """``batched``: jax function, gate angles ``(N, G)`` -> expectation values ``(N, O)``;
        ``for_gradient``: the same function written for a faster gradient, if there is one."""
        import jax

        jax.config.update("jax_enable_x64", True)
        folder = Path(enable_jax_compilation_cache()) / "exported"
        JaxCompileMonitor.install()
        self._n_compiles = 0
        self.compile_s = 0.0
        # What decides the traced functions: this class, its constructor arguments and this module's code.
        args, kwargs = self._constructor_args
        identity = f"{type(self).__qualname__}|{args!r}|{sorted(kwargs.items())!r}|{_MODULE_DIGEST}"
        self._jit_forward = ExportedFunction(jax.jit(batched), identity + "|forward", folder)
        self._jit_value_and_jacobian = ExportedFunction(jax.jit(partial(value_and_row_jacobians, for_gradient or batched)),
                                                        identity + "|jacobian", folder)
        self._batched, self._identity, self._folder = batched, identity, folder
        self._jit_policies: dict[PolicyHead, ExportedFunction] = {}
        self.compiles_policies = True

    @property
    def n_compiles(self) -> int | None:
        return self._n_compiles

    def _evaluate(self, gate_angles: torch.Tensor, update: bool) -> torch.Tensor:
        if needs_grad(gate_angles):
            return _JaxCircuitFunction.apply(gate_angles, self)
        return self._run(self._jit_forward, gate_angles, small=not update)

    def act(self, head: PolicyHead, obs: torch.Tensor, theta: torch.Tensor, input_scaling: torch.Tensor,
            output_weights: torch.Tensor, count: bool = True) -> torch.Tensor:
        """The outputs ``(B, A)`` of a re-uploading policy for up to SMALL_BATCH observations, without
        gradient, in one compiled call (:func:`policy_outputs`): what ``ReUploadingPQC.forward``
        computes with the gate angles and the readout in torch around ``__call__``, whose torch
        operations cost about 0.07 ms per call (a quarter of the 4-qubit policy's acting call).
        ``count``: add the rows to ``circuit_evals`` (not for compiling ahead)."""
        if obs.ndim != 2 or obs.shape[0] > SMALL_BATCH:
            raise ValueError(f"act: observations (B, d) with B <= {SMALL_BATCH}, got {tuple(obs.shape)}")
        fn = self._jit_policies.get(head)
        if fn is None:
            import jax

            fn = self._jit_policies[head] = ExportedFunction(jax.jit(partial(policy_outputs, self._batched, head)),
                                                             f"{self._identity}|policy|{head!r}", self._folder)
        if count:
            self.circuit_evals += obs.shape[0]
        return self._run(fn, obs, small=True, shared=(theta, input_scaling, output_weights))

    def _run(self, jitted: Callable, *arrays: torch.Tensor, small: bool, shared: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
        """Call ``jitted`` on every padded chunk of the row-aligned ``arrays``, followed by the
        ``shared`` tensors whole (the same for every chunk); rows joined back."""
        import jax

        device = arrays[0].device
        # jax computes where the torch tensors live: a CUDA tensor runs the circuit on jax's GPU
        # (the model is placed there only when jax has one: utils.simulation_device), anything
        # else on jax's CPU, also in a process whose default jax device is a GPU.
        platform = "cuda" if device.type == "cuda" else "cpu"
        jax_device = jax.devices(platform)[0]
        host = [a.detach().to("cpu", torch.float64).numpy() for a in arrays]
        host_shared = [a.detach().to("cpu", torch.float64).numpy() for a in shared]
        outs = []
        for start, stop, size in padded_chunks(host[0].shape[0], small):
            if size == stop - start:
                chunk = [a[start:stop] for a in host]
            else:
                chunk = [np.zeros((size, *a.shape[1:])) for a in host]
                for padded, a in zip(chunk, host):
                    padded[: stop - start] = a[start:stop]
            before, t0 = JaxCompileMonitor.compiles, time.perf_counter()
            with jax.default_device(jax_device):
                result = jax.block_until_ready(jitted(*chunk, *host_shared, platform=platform))
            if JaxCompileMonitor.compiles != before:
                self._n_compiles += JaxCompileMonitor.compiles - before
                self.compile_s += time.perf_counter() - t0
            outs.append([np.asarray(r)[: stop - start] for r in (result if isinstance(result, tuple) else (result,))])
        joined = tuple(torch.from_numpy(np.concatenate(parts)).to(device) for parts in zip(*outs))
        return joined if isinstance(result, tuple) else joined[0]


@dataclass(frozen=True)
class PolicyHead:
    """What a re-uploading policy adds around its circuit, as hashable constants: the observation
    scale, which feature each encoding reads, which expectation value (and sign) each output
    reads, and the head's factor (beta for a policy, 1 for Q-values)."""

    input_scale: tuple[float, ...]
    feature_index: tuple[int, ...]
    readout_index: tuple[int, ...]
    readout_sign: tuple[float, ...]
    beta: float


def policy_outputs(batched: Callable, head: PolicyHead, obs, theta, input_scaling, output_weights):
    """``ReUploadingPQC``'s outputs for one parameter set, in jax: its gate angles (the variational
    angles of every row, then input_scaling[l, k] * s[feature k]), the circuit ``batched`` and the
    readout, in the same order of operations as the torch path (tests compare them)."""
    import jax.numpy as jnp

    rows = obs.shape[0]
    s = (obs / jnp.asarray(head.input_scale))[:, np.asarray(head.feature_index)]  # (B, K)
    encoding = (input_scaling[None] * s[:, None, :]).reshape(rows, -1)  # (B, L * K)
    variational = jnp.broadcast_to(theta.reshape(1, -1), (rows, theta.size))
    expvals = batched(jnp.concatenate([variational, encoding], axis=1))
    readout = expvals[:, np.asarray(head.readout_index)] * jnp.asarray(head.readout_sign)
    return head.beta * output_weights * readout


def value_and_row_jacobians(batched: Callable, angles):
    """``batched(angles)`` ``(N, O)`` and its Jacobian row by row ``(N, O, G)``, in one pass.

    Rows are independent circuits, so the cotangent that is ``e_o`` in every row gives the
    gradient of observable ``o`` of every row at once: O backward passes (vmapped), against the
    forward pass plus one backward pass per gradient call that a vector-Jacobian product after
    the forward costs.
    """
    import jax
    import jax.numpy as jnp

    values, pullback = jax.vjp(batched, angles)
    basis = jnp.eye(values.shape[1], dtype=values.dtype)
    jacobian = jax.vmap(lambda e: pullback(jnp.broadcast_to(e, values.shape))[0], out_axes=1)(basis)
    return values, jacobian


class TensorCircuitCircuit(JaxJitCircuit):
    """TensorCircuit-NG state-vector circuit, vmapped over the batch.

    jax: the re-uploading layers run under ``jax.lax.scan`` (TensorCircuit's recipe for short
    jit times: XLA compiles one layer, not L unrolled copies; the vector-Jacobian product of the
    4-qubit, 5-layer circuit compiles in about 2.5 s instead of 20 s on one core), ``jit(vmap)``
    for the forward pass and for the vector-Jacobian product (see :class:`JaxJitCircuit`).
    ``fuse_gates`` (default): each qubit's Rx Ry Rz of a layer, with the previous layer's encoding
    Rx folded into its Rx, is one 2x2 gate in closed form (:func:`fused_rotation`), and the readout
    is one product of the probabilities with the observables' +-1 diagonals; ``False`` applies the
    shared gate list one rotation at a time (the earlier path, for comparison: README "Speed").
    pytorch: the same gate list unrolled, vmapped with torch.func and differentiated by torch
    autograd (twice if asked: MAML).
    """

    name = "tensorcircuit"

    def __init__(self, spec: CircuitSpec, math_backend: str = "jax", fuse_gates: bool = True):
        CircuitBackend.__init__(self, spec)
        if math_backend not in ("jax", "pytorch"):
            raise ValueError(f"tensorcircuit math backend {math_backend!r}; allowed: jax, pytorch")
        tc = use_tensorcircuit(math_backend)

        self.math_backend = math_backend
        self.fuse_gates = fuse_gates
        observables = spec.observables

        def readout(c):
            return tc.backend.stack([tc.backend.real(c.expectation_ps(z=list(q))) for q in observables])

        if math_backend == "jax" and fuse_gates:
            self._setup_jax(fused_circuit(tc, spec), fused_circuit(tc, spec, pairs=True))
        elif math_backend == "jax":
            import jax
            import jax.numpy as jnp

            n, n_layers = spec.n_qubits, spec.n_layers
            layer_ops, final_ops = spec.layer_ops(), spec.rotation_ops(0)

            def single(angles):
                theta = angles[: spec.n_theta].reshape(n_layers + 1, 3 * n)
                encoding = angles[spec.n_theta :].reshape(n_layers, spec.n_encoding)

                def layer(state, layer_angles):
                    c = tc.Circuit(n, inputs=state)
                    _apply_ops(c, layer_ops, layer_angles)
                    return c.state(), None

                state, _ = jax.lax.scan(layer, tc.Circuit(n).state(), jnp.concatenate([theta[:n_layers], encoding], axis=1))
                c = tc.Circuit(n, inputs=state)
                _apply_ops(c, final_ops, theta[n_layers])
                return readout(c)

            self._setup_jax(jax.vmap(single))
        elif math_backend == "pytorch":
            self.compile_s = None
            gates = spec.gates()

            def single_torch(angles):
                c = tc.Circuit(spec.n_qubits)
                _apply_ops(c, gates, angles)
                return readout(c)

            batched_torch = tc.backend.vmap(single_torch, vectorized_argnums=0)

            def in_torch_backend(angles):
                use_tensorcircuit("pytorch")  # a no-op unless another model switched the process since
                return batched_torch(angles)

            self._torch_fn = in_torch_backend

    @property
    def n_compiles(self) -> int | None:
        return self._n_compiles if self.math_backend == "jax" else None

    def _evaluate(self, gate_angles: torch.Tensor, update: bool) -> torch.Tensor:
        if self.math_backend == "pytorch":
            return self._torch_fn(gate_angles)
        return super()._evaluate(gate_angles, update)

    def _run(self, jitted: Callable, *arrays: torch.Tensor, small: bool, shared: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
        use_tensorcircuit("jax")  # a no-op in a worker; a new shape is traced with TensorCircuit's jax backend
        return super()._run(jitted, *arrays, small=small, shared=shared)


def fused_rotation(tx, ty, tz):
    """The 2x2 matrix of Rz(tz) Ry(ty) Rx(tx) in closed form (a jax array).

    With c, s the cosine and sine of half an angle: Ry(ty) Rx(tx) = [[a, b], [-conj(b), conj(a)]],
    a = cy cx + i sy sx, b = -sy cx - i cy sx; Rz(tz) multiplies the first row by e^{-i tz/2} and
    the second by its conjugate. Elementwise, so XLA fuses it instead of multiplying three
    per-row 2x2 matrices (the batched products TensorCircuit's contractor made of them).
    """
    import jax.numpy as jnp

    cx, sx, cy, sy = jnp.cos(tx / 2), jnp.sin(tx / 2), jnp.cos(ty / 2), jnp.sin(ty / 2)
    a = cy * cx + 1j * sy * sx
    b = -sy * cx - 1j * cy * sx
    phase = jnp.exp(-0.5j * tz)
    return jnp.stack([jnp.stack([phase * a, phase * b]), jnp.stack([-jnp.conj(phase * b), jnp.conj(phase * a)])])


def fused_circuit(tc, spec: CircuitSpec, pairs: bool = False) -> Callable:
    """The batched jax function (gate angles ``(N, G)`` -> expectation values ``(N, O)``) of
    :class:`TensorCircuitCircuit` with fused gates, built with TensorCircuit's circuit API.

    Per layer and qubit one 2x2 gate (``Circuit.unitary``): the encoding Rx(e) that ends layer
    l - 1 commutes with the Rx that starts layer l on the same qubit, so Rx(theta) Rx(e) =
    Rx(theta + e) and the encodings become part of the next layer's angles (the last layer's,
    of the final rotations). The CZ ring stays TensorCircuit's ``cz`` gates (one constant 16x16
    diagonal gate instead was slower: a dense contraction). The readout is
    ``z @ Circuit.probability()`` with the +-1 diagonals ``z`` of the Z products.

    ``pairs``: the 2x2 gates of qubits 2k and 2k + 1 are applied as their 4x4 Kronecker product
    (``Circuit.any``), the same unitary in half the contractions. Measured on one core, 128 rows:
    the forward pass twice as slow, its values and row Jacobians together (what the gradient
    needs) about 1.3x faster, so the forward pass applies single-qubit gates and the gradient
    pairs (README "Speed").
    """
    import jax
    import jax.numpy as jnp

    n, n_layers = spec.n_qubits, spec.n_layers
    bits = (np.arange(2**n)[:, None] >> (n - 1 - np.arange(n))[None, :]) & 1  # qubit 0 most significant
    z = np.stack([np.prod(1.0 - 2.0 * bits[:, list(q)], axis=1) for q in spec.observables])  # (O, 2^n)
    onto = np.zeros((spec.n_encoding, n))  # encoding k acts on qubit k mod n
    onto[np.arange(spec.n_encoding), [spec.encoding_qubit(k) for k in range(spec.n_encoding)]] = 1.0
    ring = spec.ring

    def rotations(c, tx, ty, tz):
        gates = [fused_rotation(tx[q], ty[q], tz[q]) for q in range(n)]
        single = range(n - 1 if n % 2 else n, n) if pairs else range(n)
        if pairs:
            for q in range(0, n - 1, 2):
                c.any(q, q + 1, unitary=jnp.kron(gates[q], gates[q + 1]))
        for q in single:
            c.unitary(q, unitary=gates[q])

    def layer(state, angles):
        c = tc.Circuit(n, inputs=state)
        rotations(c, *angles)
        for a, b in ring:
            c.cz(a, b)
        return c.state(), None

    def single(angles):
        theta = angles[: spec.n_theta].reshape(n_layers + 1, n, 3)
        encoding = angles[spec.n_theta :].reshape(n_layers, spec.n_encoding) @ onto  # (L, n): summed per qubit
        tx = theta[:, :, 0].at[1:].add(encoding)
        state, _ = jax.lax.scan(layer, tc.Circuit(n).state(), (tx[:n_layers], theta[:n_layers, :, 1], theta[:n_layers, :, 2]))
        c = tc.Circuit(n, inputs=state)
        rotations(c, tx[n_layers], theta[n_layers, :, 1], theta[n_layers, :, 2])
        return jnp.asarray(z) @ c.probability()

    return jax.vmap(single)


class PennyLaneJaxCircuit(JaxJitCircuit):
    """PennyLane ``default.qubit`` with the jax interface (backprop) under ``jax.jit``: PennyLane's
    fastest path here, behind the same bridge, cache, padding and compile counters as
    TensorCircuit (:class:`JaxJitCircuit`).

    ``scan_layers`` (default): one QNode simulates one re-uploading layer from a prepared state
    (``qml.StatePrep``) and returns ``qml.state()``; ``jax.lax.scan`` runs it L times and a second
    QNode applies the final rotations and measures. XLA then compiles one layer instead of L
    unrolled copies: the vector-Jacobian product of the 4-qubit, 5-layer circuit at 128 rows
    compiled in 8.3 s instead of 44.6 s on one core, at 3.8 ms instead of 3.1 ms per call.
    ``scan_layers=False``: the whole circuit as one QNode, as a PennyLane user would write it.
    """

    name = "pennylane"
    device_name = "default.qubit"
    diff_method = "backprop"
    interface = "jax"

    def __init__(self, spec: CircuitSpec, scan_layers: bool = True):
        super().__init__(spec)
        import jax
        import jax.numpy as jnp
        import pennylane as qml

        self.scan_layers = scan_layers
        n, n_layers = spec.n_qubits, spec.n_layers
        dev = qml.device(self.device_name, wires=n)
        op_of = {"rx": qml.RX, "ry": qml.RY, "rz": qml.RZ}

        def apply(ops, angles):
            for kind, wires, idx in ops:
                if kind == "cz":
                    qml.CZ(wires=list(wires))
                else:
                    op_of[kind](angles[..., idx], wires=wires[0])

        def measure():
            return [qml.expval(qml.prod(*[qml.Z(q) for q in qubits])) for qubits in spec.observables]

        if scan_layers:
            layer_ops, final_ops = spec.layer_ops(), spec.rotation_ops(0)

            @qml.qnode(dev, interface="jax", diff_method="backprop")
            def layer_qnode(state, angles):
                qml.StatePrep(state, wires=range(n), validate_norm=False)
                apply(layer_ops, angles)
                return qml.state()

            @qml.qnode(dev, interface="jax", diff_method="backprop")
            def final_qnode(state, angles):
                qml.StatePrep(state, wires=range(n), validate_norm=False)
                apply(final_ops, angles)
                return measure()

            def single(angles):
                theta = angles[: spec.n_theta].reshape(n_layers + 1, 3 * n)
                encoding = angles[spec.n_theta :].reshape(n_layers, spec.n_encoding)
                start = jnp.zeros(2**n, dtype=jnp.complex128).at[0].set(1.0)
                state, _ = jax.lax.scan(lambda s, a: (layer_qnode(s, a), None), start, jnp.concatenate([theta[:n_layers], encoding], axis=1))
                return jnp.stack(final_qnode(state, theta[n_layers]), -1)

            batched = jax.vmap(single)
        else:
            gates = spec.gates()

            @qml.qnode(dev, interface="jax", diff_method="backprop")
            def whole(angles):
                apply(gates, angles)
                return measure()

            def batched(angles):  # parameter broadcasting over the rows
                return jnp.stack(whole(angles), -1).reshape(angles.shape[0], len(spec.observables))

        self._setup_jax(batched)


class ParameterShiftCircuit(CircuitBackend):
    """Any backend, differentiated by the parameter-shift rule of gradients.py instead of autodiff."""

    def __init__(self, inner: CircuitBackend):  # no super().__init__: the inner backend counts
        self.spec = inner.spec
        self.inner = inner
        self.name = inner.name

    @property
    def circuit_evals(self) -> int:  # type: ignore[override]
        return self.inner.circuit_evals

    @circuit_evals.setter
    def circuit_evals(self, value: int) -> None:
        self.inner.circuit_evals = value

    @property
    def n_compiles(self) -> int | None:
        return self.inner.n_compiles

    @property
    def compile_s(self) -> float | None:  # type: ignore[override]
        return self.inner.compile_s

    @property
    def compiles_policies(self) -> bool:  # type: ignore[override]
        return self.inner.compiles_policies

    def act(self, *args, **kwargs) -> torch.Tensor:
        return self.inner.act(*args, **kwargs)

    def __call__(self, gate_angles: torch.Tensor, *, update: bool | None = None) -> torch.Tensor:
        if update is None:
            update = needs_grad(gate_angles)

        def evaluate(angles: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return self.inner(angles, update=update)

        return parameter_shift_expvals(gate_angles, evaluate)


# ---------------------------------------------------------------------------------------------
# Models


def compile_metrics(model) -> dict[str, float]:
    """``time/n_compiles`` and ``time/compile_s`` so far, for models whose circuits compile."""
    if model.n_compiles is None:
        return {}
    return {"time/n_compiles": model.n_compiles, "time/compile_s": model.compile_s}


class CircuitCounters:
    """``circuit_evals``, ``n_compiles`` and ``compile_s`` of the model's circuit backend; 0, None
    and None for a classical model (no ``circuit``)."""

    circuit: CircuitBackend | None = None

    @property
    def circuit_evals(self) -> int:
        return self.circuit.circuit_evals if self.circuit is not None else 0

    @circuit_evals.setter
    def circuit_evals(self, value: int) -> None:  # restoring a checkpoint
        if self.circuit is not None:
            self.circuit.circuit_evals = value

    @property
    def n_compiles(self) -> int | None:
        return self.circuit.n_compiles if self.circuit is not None else None

    @property
    def compile_s(self) -> float | None:
        return self.circuit.compile_s if self.circuit is not None else None

    def precompile_acting(self, n_rows: int) -> None:
        """Compile the action-selection shape now, so that warm-up ends with the first update even
        when the first greedy action comes later (DQN exploring). Nothing to do for a model that
        does not compile its acting call."""


def initial_angles(shape, init: str, generator: torch.Generator) -> torch.Tensor:
    """Variational angles: U(0, pi) (TFQ tutorial), N(0, 0.1^2) or zeros, drawn from ``generator``."""
    if init == "uniform":
        return torch.rand(shape, generator=generator, dtype=DTYPE) * math.pi
    if init == "normal":
        return 0.1 * torch.randn(shape, generator=generator, dtype=DTYPE)
    if init == "zeros":
        return torch.zeros(shape, dtype=DTYPE)
    raise ValueError(f"init {init!r}; allowed: uniform, normal, zeros")


class PolicyModel(CircuitCounters, nn.Module):
    """Maps observations ``(B, d)`` to action scores ``(B, A)`` (logits or Q-values).

    ``functional_forward(flat, obs)`` evaluates ``M`` parameter vectors at once, ``(M, P)`` ->
    ``(M, B, A)``, without autograd: the batched call the gradient estimators use.
    """

    head: str
    backend_name: str = "classical"

    def flat_parameters(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.parameters()])

    def unflatten(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Split ``(M, P)`` into tensors shaped ``(M, *p.shape)`` in ``parameters()`` order."""
        out, start = [], 0
        for p in self.parameters():
            out.append(flat[:, start : start + p.numel()].reshape(flat.shape[0], *p.shape))
            start += p.numel()
        return out

    def normalise(self, obs: torch.Tensor) -> torch.Tensor:
        return obs.to(DTYPE) / self.input_scale

    def param_groups(self, lr) -> list[dict]:  # pragma: no cover - abstract
        raise NotImplementedError


MLP_ROWS_PER_CALL = 1 << 18


class MLPPolicy(PolicyModel):
    """Classical baseline: tanh MLP with the given hidden widths (float64, same input scaling)."""

    def __init__(self, n_inputs: int, n_actions: int, hidden_sizes: list[int], head: str, beta: float, seed: int,
                 input_scale: tuple[float, ...] | None = None):
        super().__init__()
        self.head = head
        self.beta = beta if head == "policy" else 1.0
        layers: list[nn.Module] = []
        width = n_inputs
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for h in hidden_sizes:
                layers += [nn.Linear(width, h, dtype=DTYPE), nn.Tanh()]
                width = h
            layers.append(nn.Linear(width, n_actions, dtype=DTYPE))
        self.net = nn.Sequential(*layers)
        self.register_buffer("input_scale", _scale_tensor(input_scale, n_inputs))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.beta * self.net(self.normalise(obs))

    def functional_forward(self, flat: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        x = self.normalise(obs)
        names = [n for n, _ in self.net.named_parameters()]

        def one(*params):
            return torch.func.functional_call(self.net, dict(zip(names, params)), (x,), strict=True)

        # Parameter sets in chunks of at most MLP_ROWS_PER_CALL (set x observation) rows: central
        # differences of the 4,610-parameter MLP on 1,000 transitions would otherwise hold
        # 9,221 x 1,000 x 64 activations (4.7 GB) per layer at once.
        per_call = max(1, MLP_ROWS_PER_CALL // max(1, x.shape[0]))
        with torch.no_grad():
            outs = [torch.func.vmap(one)(*self.unflatten(chunk)) for chunk in flat.to(DTYPE).split(per_call)]
        return self.beta * torch.cat(outs)

    def param_groups(self, lr) -> list[dict]:
        return [{"params": list(self.parameters()), "lr": lr.weights, "name": "weights"}]


class ReUploadingPQC(PolicyModel):
    """The data re-uploading circuit with trainable input scaling and output weights.

    Parameters (in this order): ``theta`` (L+1, n, 3), ``input_scaling`` (L, max(n, d)),
    ``output_weights`` (A,). Initialised from the seed identically whatever the backend.
    """

    def __init__(self, spec: CircuitSpec, circuit: CircuitBackend, head: str, beta: float, init: str, seed: int,
                 input_scale: tuple[float, ...] | None = None):
        super().__init__()
        self.spec = spec
        self.circuit = circuit
        self.head = head
        self.beta = beta if head == "policy" else 1.0
        self.backend_name = circuit.name
        gen = torch.Generator().manual_seed(seed)
        theta = initial_angles((spec.n_layers + 1, spec.n_qubits, 3), init, gen)
        self.theta = nn.Parameter(theta)
        self.input_scaling = nn.Parameter(torch.ones(spec.n_layers, spec.n_encoding, dtype=DTYPE))
        self.output_weights = nn.Parameter(torch.ones(len(spec.readouts), dtype=DTYPE))
        self.register_buffer("input_scale", _scale_tensor(input_scale, spec.n_inputs))
        self.register_buffer("feature_index", torch.tensor([spec.encoding_feature(k) for k in range(spec.n_encoding)]))
        self.register_buffer("readout_index", torch.tensor(spec.readout_index))
        self.register_buffer("readout_sign", torch.tensor(spec.readout_sign, dtype=DTYPE))
        self.head_constants = PolicyHead(tuple(self.input_scale.tolist()), tuple(self.feature_index.tolist()),
                                         tuple(spec.readout_index), tuple(float(x) for x in spec.readout_sign), float(self.beta))

    def _acts_in_one_call(self, obs: torch.Tensor) -> bool:
        """Action selection on a jax backend: a small batch that autograd will not differentiate."""
        if not self.circuit.compiles_policies or obs.ndim != 2 or obs.shape[0] > SMALL_BATCH:
            return False
        return not (torch.is_grad_enabled() and any(p.requires_grad for p in (self.theta, self.input_scaling, self.output_weights)))

    def gate_angles(self, theta: torch.Tensor, input_scaling: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        """Per-circuit gate angles ``(M*B, G)`` for ``M`` parameter sets and ``B`` observations."""
        m, b = theta.shape[0], obs.shape[0]
        s = self.normalise(obs)[:, self.feature_index]  # (B, K)
        encoding = input_scaling[:, None, :, :] * s[None, :, None, :]  # (M, B, L, K)
        variational = theta.reshape(m, 1, -1).expand(m, b, self.spec.n_theta)
        return torch.cat([variational, encoding.reshape(m, b, -1)], dim=-1).reshape(m * b, -1)

    def _forward(self, theta, input_scaling, output_weights, obs) -> torch.Tensor:
        m, b = theta.shape[0], obs.shape[0]
        expvals = self.circuit(self.gate_angles(theta, input_scaling, obs)).reshape(m, b, -1)
        readout = expvals[..., self.readout_index] * self.readout_sign
        return self.beta * output_weights[:, None, :] * readout

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        if self._acts_in_one_call(obs):
            return self.circuit.act(self.head_constants, obs, self.theta, self.input_scaling, self.output_weights)
        return self._forward(self.theta[None], self.input_scaling[None], self.output_weights[None], obs)[0]

    def precompile_acting(self, n_rows: int) -> None:
        if self.circuit.compiles_policies:
            obs = torch.zeros(n_rows, self.spec.n_inputs, dtype=DTYPE, device=self.theta.device)
            self.circuit.act(self.head_constants, obs, self.theta, self.input_scaling, self.output_weights, count=False)

    def functional_forward(self, flat: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._forward(*self.unflatten(flat.to(DTYPE)), obs)

    def param_groups(self, lr) -> list[dict]:
        return [
            {"params": [self.theta], "lr": lr.weights, "name": "weights"},
            {"params": [self.input_scaling], "lr": lr.input_scaling, "name": "input_scaling"},
            {"params": [self.output_weights], "lr": lr.output, "name": "output"},
        ]


# ---------------------------------------------------------------------------------------------
# Circuit factories (named by the backends' registry entries, backends/) and the model builder


def _pennylane_circuit(spec: CircuitSpec, exp: ExperimentConfig) -> CircuitBackend:
    if exp.pennylane_interface == "jax":
        circuit: CircuitBackend = PennyLaneJaxCircuit(spec, exp.pennylane.scan_layers)
        # Parameter shift evaluates its shifted circuits through the jitted forward pass.
        return ParameterShiftCircuit(circuit) if exp.gradient == "parameter-shift" else circuit
    device = pennylane_device_for(exp.gradient, exp.pennylane.device)
    if exp.gradient == "parameter-shift":
        # Shifted circuits are evaluated by one broadcast forward call (see PennyLaneCircuit).
        return ParameterShiftCircuit(PennyLaneCircuit(spec, device, diff_method=None))
    # SPSA and finite differences only evaluate the circuit; backprop is the fastest forward there.
    diff_method = exp.gradient if exp.gradient in ("backprop", "adjoint") else "backprop"
    if device == "lightning.qubit" and diff_method == "backprop":
        diff_method = "adjoint"
    return PennyLaneCircuit(spec, device, diff_method)


def _tensorcircuit_circuit(spec: CircuitSpec, exp: ExperimentConfig) -> CircuitBackend:
    circuit = TensorCircuitCircuit(spec, exp.tensorcircuit.math_backend, exp.tensorcircuit.fuse_gates)
    if exp.gradient == "parameter-shift":
        return ParameterShiftCircuit(circuit)
    return circuit


def circuit_spec(exp: ExperimentConfig, n_inputs: int, n_actions: int) -> CircuitSpec:
    observables = exp.model.observables
    if observables == "auto":
        observables = exp.default_observables(exp.model.n_qubits)
    if len(observables) != n_actions:
        raise ValueError(f"model.observables: {len(observables)} observables for {n_actions} actions")
    return CircuitSpec(exp.model.n_qubits, exp.model.n_layers, n_inputs, tuple(parse_observable(o) for o in observables))


def build_model(exp: ExperimentConfig, n_inputs: int, n_actions: int, seed: int) -> PolicyModel:
    """The model for an experiment: the backend's registry entry builds the circuit for the
    gradient method; the task's config says the head, the input scale and the default readouts."""
    from backends import BACKENDS

    backend = BACKENDS.get(exp.backend)
    scale = exp.observation_scale(n_inputs)
    if not backend.is_circuit:
        return MLPPolicy(n_inputs, n_actions, exp.model.hidden_sizes, exp.policy_head, exp.model.beta, seed, scale)
    spec = circuit_spec(exp, n_inputs, n_actions)
    return ReUploadingPQC(spec, backend.build_circuit(spec, exp), exp.policy_head, exp.model.beta, exp.model.init, seed, scale)


def _scale_tensor(scale: tuple[float, ...] | None, n_inputs: int) -> torch.Tensor:
    """Inputs are divided by this (ones: the observations are used as they are)."""
    values = (1.0,) * n_inputs if scale is None else tuple(scale)
    if len(values) != n_inputs:
        raise ValueError(f"observation scale has {len(values)} entries for {n_inputs} inputs")
    return torch.tensor(values, dtype=DTYPE)


# ---------------------------------------------------------------------------------------------
# SSM: a diagonal state-space model (S4D / S5 family), for sequence encoders and recurrent bodies


class SSM(nn.Module):
    """A diagonal linear state-space layer between an input and an output projection.

    Per step ``t`` (``u_t = W_in x_t`` in R^H, complex state ``h_t`` in C^N)::

        h_t = Lambda_bar * h_{t-1} + B_bar u_t
        y_t = Re(C h_t) + D * u_t
        out_t = W_out gelu(y_t)

    The continuous system dh/dt = Lambda h + B u has a diagonal ``Lambda = -exp(log_decay) + i freq``
    (S4D-Lin start: -1/2 + i pi n, Gu et al. 2022) and is discretised by a zero-order hold with a
    learned step ``Delta = exp(log_dt)`` per state (S5, Smith et al. 2023)::

        Lambda_bar = exp(Lambda Delta),  B_bar = (Lambda_bar - 1) / Lambda * B

    ``|Lambda_bar| = exp(-exp(log_decay) Delta) < 1`` for every parameter value: the recurrence
    is stable however training moves the parameters. Complex parameters are stored as real and
    imaginary parts, so every parameter is a real tensor (flat vectors, trust regions, Adam).

    ``forward(x, hidden_state=None)`` returns one tensor: ``x`` (B, state_dim) is one step from
    ``hidden_state`` (zeros when None) -> (B, output_dim); ``x`` (B, T, state_dim) is a sequence ->
    (B, T, output_dim). :meth:`step` and :meth:`forward_sequence` also return the new state
    (B, N), complex.
    """

    def __init__(self, state_dim: int, hidden_dim: int = 128, output_dim: int = 32, device: str = "cpu", *,
                 state_size: int | None = None, dt_min: float = 1e-3, dt_max: float = 1e-1,
                 dtype: torch.dtype = torch.float32, seed: int | None = None):
        super().__init__()
        for name, value in (("state_dim", state_dim), ("hidden_dim", hidden_dim), ("output_dim", output_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SSM {name}: {value!r}; need a positive integer")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"SSM dt_min, dt_max: ({dt_min}, {dt_max}); need 0 < dt_min <= dt_max")
        n = state_size or hidden_dim
        self.state_dim, self.hidden_dim, self.output_dim, self.state_size = state_dim, hidden_dim, output_dim, n
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            self.encoder = nn.Linear(state_dim, hidden_dim, dtype=dtype)
            self.decoder = nn.Linear(hidden_dim, output_dim, dtype=dtype)
        real = dict(dtype=dtype)
        self.log_decay = nn.Parameter(torch.full((n,), math.log(0.5), **real))
        self.freq = nn.Parameter(math.pi * torch.arange(n, **real))
        u = torch.rand(n, generator=gen, **real)
        self.log_dt = nn.Parameter(math.log(dt_min) + u * (math.log(dt_max) - math.log(dt_min)))
        self.B_re = nn.Parameter(torch.randn(n, hidden_dim, generator=gen, **real) / math.sqrt(2 * hidden_dim))
        self.B_im = nn.Parameter(torch.randn(n, hidden_dim, generator=gen, **real) / math.sqrt(2 * hidden_dim))
        self.C_re = nn.Parameter(torch.randn(hidden_dim, n, generator=gen, **real) / math.sqrt(n))
        self.C_im = nn.Parameter(torch.randn(hidden_dim, n, generator=gen, **real) / math.sqrt(n))
        self.D = nn.Parameter(torch.randn(hidden_dim, generator=gen, **real))
        self.to(device)

    def discretised(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Lambda_bar (N,), B_bar (N, H)), complex: the zero-order hold of the continuous system."""
        lam = torch.complex(-torch.exp(self.log_decay), self.freq)
        lam_bar = torch.exp(lam * torch.exp(self.log_dt))
        b = torch.complex(self.B_re, self.B_im)
        return lam_bar, ((lam_bar - 1) / lam)[:, None] * b

    def init_hidden(self, batch: int) -> torch.Tensor:
        return torch.zeros(batch, self.state_size, dtype=self.D.dtype.to_complex(), device=self.D.device)

    def _readout(self, h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        c = torch.complex(self.C_re, self.C_im)
        y = (h @ c.transpose(0, 1)).real + self.D * u
        return self.decoder(torch.nn.functional.gelu(y))

    def step(self, x: torch.Tensor, hidden_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One step: (output (B, output_dim), new state (B, N))."""
        u = self.encoder(x.to(self.D.dtype))
        h = self.init_hidden(x.shape[0]) if hidden_state is None else hidden_state
        lam_bar, b_bar = self.discretised()
        h = lam_bar * h + u.to(b_bar.dtype) @ b_bar.transpose(0, 1)
        return self._readout(h, u), h

    def forward_sequence(self, x: torch.Tensor, hidden_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A sequence (B, T, state_dim): (outputs (B, T, output_dim), last state (B, N))."""
        u = self.encoder(x.to(self.D.dtype))
        h = self.init_hidden(x.shape[0]) if hidden_state is None else hidden_state
        lam_bar, b_bar = self.discretised()
        drive = u.to(b_bar.dtype) @ b_bar.transpose(0, 1)  # (B, T, N)
        states = []
        for t in range(x.shape[1]):
            h = lam_bar * h + drive[:, t]
            states.append(h)
        return self._readout(torch.stack(states, 1), u), h

    def forward(self, x: torch.Tensor, hidden_state: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim == 2:
            return self.step(x, hidden_state)[0]
        if x.ndim == 3:
            return self.forward_sequence(x, hidden_state)[0]
        raise ValueError(f"SSM input: shape {tuple(x.shape)}; need (batch, {self.state_dim}) or (batch, time, {self.state_dim})")
