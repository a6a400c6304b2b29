"""The re-uploading policy as a hand-written batched state vector in jax: the speed limit and an oracle.

Written from the circuit's description (models.py's module docstring, docs/CONVENTIONS.md §4), not
from :meth:`models.CircuitSpec.gates`, so that a mistake in the shared gate list cannot hide in
both the backends and this reference. For ``n`` qubits, ``L`` layers and ``d`` inputs::

    |psi> = |0...0>
    for l in 0..L-1:  U_q = Rz(theta[l,q,2]) Ry(theta[l,q,1]) Rx(theta[l,q,0] + e[l-1,q]) on each qubit q
                      CZ on the ring (q, q+1 mod n): a fixed +-1 diagonal
    final:            U_q with theta[L] and e[L-1]
    e[l,q] = sum over k in 0..max(n,d)-1 with k mod n == q of lambda[l,k] * s[k mod d]   (e[-1] = 0)
    <O_a> = sum_x |psi_x|^2 z_a(x),  z_a(x) = prod_{q in O_a} (-1)^{x_q}
    policy head: beta * w_a * sign_a * <O_a> (logits); Q head: w_a * sign_a * <O_a>

with ``s`` the observation divided by (2.4, 2.5, 0.21, 2.5). Why it is fast:

- the encoding rotations Rx(lambda s) of layer l commute with the next Rx(theta_x) on the same
  qubit, so each is folded into it: one 2x2 matrix per qubit and layer, one +-1 diagonal per ring;
- the first layer acts on |0...0>, so its state is the Kronecker product of the columns U_q|0>;
- the batch is the *last* axis of the state ``(2^n, B)`` and every gate is four elementwise
  products: XLA on the CPU vectorises them over the batch, and the reductions of the backward pass
  run along the contiguous axis. (Batch-first with per-row 2x2 einsums, the layout ``vmap`` gives,
  is 5-10x slower for the gradient here.)
- the layers 1..L-1 run under ``jax.lax.scan`` (one layer compiled, not L copies).

All arrays are float64 / complex128; ``jax_enable_x64`` is switched on at import.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)

INPUT_SCALE = (2.4, 2.5, 0.21, 2.5)


@dataclass(frozen=True)
class Layout:
    n_qubits: int
    n_layers: int
    n_inputs: int
    readouts: tuple[tuple[float, tuple[int, ...]], ...]
    """(sign, qubits of the Z product) per action."""
    head: str = "policy"
    beta: float = 1.0

    @property
    def n_encoding(self) -> int:
        return max(self.n_qubits, self.n_inputs)

    @property
    def observables(self) -> list[tuple[int, ...]]:
        seen: list[tuple[int, ...]] = []
        for _, qubits in self.readouts:
            if qubits not in seen:
                seen.append(qubits)
        return seen


def _bits(n: int) -> np.ndarray:
    """(2^n, n): bit of qubit q in basis state x, qubit 0 most significant."""
    return (np.arange(2**n)[:, None] >> (n - 1 - np.arange(n))[None, :]) & 1


def ring_diagonal(n: int) -> np.ndarray:
    """The product of CZ(q, q+1 mod n) over the ring (one CZ for 2 qubits, none for 1) as +-1 per basis state."""
    bits = _bits(n)
    pairs = [] if n == 1 else [(0, 1)] if n == 2 else [(q, (q + 1) % n) for q in range(n)]
    sign = np.ones(2**n)
    for a, b in pairs:
        sign *= np.where(bits[:, a] & bits[:, b], -1.0, 1.0)
    return sign


def z_diagonal(n: int, qubits: tuple[int, ...]) -> np.ndarray:
    """prod_{q in qubits} Z_q as +-1 per basis state."""
    return np.prod(1.0 - 2.0 * _bits(n)[:, list(qubits)], axis=1)


def rotation(tx, ty, tz):
    """Entries (u00, u01, u10, u11) of Rz(tz) Ry(ty) Rx(tx), broadcast over the angles' shapes.

    Rx(a) = [[c, -i s], [-i s, c]], Ry(a) = [[c, -s], [s, c]] (c, s of a/2), Rz(a) = diag(e^{-ia/2}, e^{ia/2}).
    """
    cx, sx = jnp.cos(tx / 2), jnp.sin(tx / 2)
    cy, sy = jnp.cos(ty / 2), jnp.sin(ty / 2)
    ez = jnp.exp(-0.5j * tz)
    return (ez * (cy * cx + 1j * sy * sx), ez * (-1j * cy * sx - sy * cx),
            jnp.conj(ez) * (sy * cx - 1j * cy * sx), jnp.conj(ez) * (cy * cx - 1j * sy * sx))


def expectations(layout: Layout, theta, input_scaling, obs, scan: bool = True):
    """<O> for every distinct readout observable: ``(B, O)``, before signs and weights."""
    n, n_layers, d = layout.n_qubits, layout.n_layers, layout.n_inputs
    batch = obs.shape[0]
    s = (obs / jnp.asarray(INPUT_SCALE[:d])).T  # (d, B)
    k = np.arange(layout.n_encoding)
    onto = np.asarray(k[:, None] % n == np.arange(n)[None, :], dtype=np.float64)  # (K, n): encoding k acts on qubit k mod n
    enc = jnp.einsum("lk,kb,kq->lqb", input_scaling, s[k % d], onto)  # (L, n, B): e[l, q]
    ring = jnp.asarray(ring_diagonal(n))[:, None]

    psi = None
    for q in range(n):  # layer 0 on |0...0>: Kronecker product of the columns U_q|0>
        u00, _, u10, _ = rotation(theta[0, q, 0] + jnp.zeros(batch), theta[0, q, 1], theta[0, q, 2])
        column = jnp.stack([u00, u10])
        psi = column if psi is None else (psi[:, None, :] * column[None]).reshape(-1, batch)
    psi = psi * ring

    def layer(psi, angles):
        th, e = angles  # (n, 3), (n, B)
        for q in range(n):
            u00, u01, u10, u11 = rotation(th[q, 0] + e[q], th[q, 1], th[q, 2])
            v = psi.reshape(2**q, 2, 2 ** (n - q - 1), batch)
            p0, p1 = v[:, 0], v[:, 1]
            psi = jnp.stack([u00 * p0 + u01 * p1, u10 * p0 + u11 * p1], 1).reshape(-1, batch)
        return psi * ring, None

    if scan:
        psi, _ = jax.lax.scan(layer, psi, (theta[1:n_layers], enc[: n_layers - 1]))
    else:
        for layer_index in range(1, n_layers):
            psi, _ = layer(psi, (theta[layer_index], enc[layer_index - 1]))
    psi, _ = layer(psi, (theta[n_layers], enc[n_layers - 1]))
    psi = psi * ring  # the final rotations have no CZ ring after them: undo the one layer() applied
    prob = psi.real**2 + psi.imag**2  # (2^n, B)
    diag = jnp.asarray(np.stack([z_diagonal(n, q) for q in layout.observables]))  # (O, 2^n)
    return (diag @ prob).T


def outputs(layout: Layout, params: dict, obs, scan: bool = True):
    """Logits (policy head) or Q-values ``(B, A)``; ``params``: theta (L+1, n, 3), input_scaling
    (L, max(n, d)), output_weights (A,)."""
    ev = expectations(layout, params["theta"], params["input_scaling"], obs, scan)
    index = [layout.observables.index(q) for _, q in layout.readouts]
    sign = jnp.asarray([s for s, _ in layout.readouts])
    scale = layout.beta if layout.head == "policy" else 1.0
    return scale * params["output_weights"] * sign * ev[:, index]


def reinforce_loss(layout: Layout, params: dict, obs, actions, returns, n_episodes, scan: bool = True):
    """-(1/E) sum_t log pi(a_t|s_t) G_t, as ``train.reinforce_loss``."""
    logp = jax.nn.log_softmax(outputs(layout, params, obs, scan), axis=-1)
    chosen = (logp * jax.nn.one_hot(actions, logp.shape[-1], dtype=logp.dtype)).sum(-1)
    return -(chosen * returns).sum() / n_episodes


class ReferencePolicy:
    """Jitted forward and REINFORCE loss gradient: numpy in, numpy out (compiles once per shape)."""

    def __init__(self, layout: Layout, scan: bool = True):
        self.layout = layout
        self._forward = jax.jit(functools.partial(outputs, layout, scan=scan))
        self._grad = jax.jit(jax.value_and_grad(functools.partial(reinforce_loss, layout, scan=scan)))

    def forward(self, params: dict, obs: np.ndarray) -> np.ndarray:
        return np.asarray(self._forward(params, obs))

    def loss_and_grad(self, params: dict, obs, actions, returns, n_episodes: int) -> tuple[float, dict]:
        loss, grad = self._grad(params, obs, actions, returns, float(n_episodes))
        return float(loss), {k: np.asarray(v) for k, v in grad.items()}


def layout_of(model) -> Layout:
    """The Layout of a ``models.ReUploadingPQC``."""
    spec = model.spec
    return Layout(spec.n_qubits, spec.n_layers, spec.n_inputs, spec.readouts, model.head, model.beta)


def params_of(model) -> dict:
    """numpy parameters of a ``models.ReUploadingPQC``, by name."""
    return {name: p.detach().cpu().numpy() for name, p in model.named_parameters()}
