"""Differentiable single-qubit Lindblad simulator with piecewise-constant controls.

Rotating frame, T = 1 by default (docs/CONVENTIONS.md §3)::

    H(t) = (delta/2) sigma_z + (u_x(t)/2) sigma_x + (u_y(t)/2) sigma_y,   u constant on N segments
    d rho/dt = -i[H, rho] + sum_k (L_k rho L_k^+ - {L_k^+ L_k, rho}/2)
    L = sqrt(Gamma_down) sigma_-, sqrt(Gamma_up) sigma_+, sqrt(gamma_phi/2) sigma_z

Each segment is propagated exactly, ``exp(Liouvillian * dt)`` by ``torch.linalg.matrix_exp`` on
4x4 superoperators (column-stacking vec: vec(A rho B) = (B^T kron A) vec(rho)), batched over
tasks, complex128, differentiable in the controls. The channel of the whole pulse is the ordered
product of the segment superoperators.
"""

from __future__ import annotations

import math

import torch

CDTYPE = torch.complex128
I2 = torch.eye(2, dtype=CDTYPE)
SX = torch.tensor([[0, 1], [1, 0]], dtype=CDTYPE)
SY = torch.tensor([[0, -1j], [1j, 0]], dtype=CDTYPE)
SZ = torch.tensor([[1, 0], [0, -1]], dtype=CDTYPE)
#: sigma_- = |1><0|: with H = (omega0/2) sigma_z the state |0> (sigma_z = +1) is the excited one.
SM = torch.tensor([[0, 0], [1, 0]], dtype=CDTYPE)
SP = SM.T.conj()

TARGET_GATES = {
    "identity": I2,
    "x": SX,
    "y": SY,
    "h": (SX + SZ) / math.sqrt(2),
    "sqrt_x": torch.tensor([[1 + 1j, 1 - 1j], [1 - 1j, 1 + 1j]], dtype=CDTYPE) / 2,
}


def target_unitary(name: str) -> torch.Tensor:
    if name not in TARGET_GATES:
        raise ValueError(f"target gate {name!r}; allowed: {', '.join(TARGET_GATES)}")
    return TARGET_GATES[name]


def kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched Kronecker product of (..., m, n) and (..., p, q)."""
    out = torch.einsum("...ij,...kl->...ikjl", a, b)
    return out.reshape(*out.shape[:-4], a.shape[-2] * b.shape[-2], a.shape[-1] * b.shape[-1])


def hamiltonian_superop(h: torch.Tensor) -> torch.Tensor:
    """-i (I kron H - H^T kron I) for H of shape (..., 2, 2)."""
    eye = I2.to(h.device).expand_as(h)
    return -1j * (kron(eye, h) - kron(h.transpose(-1, -2), eye))


def dissipator_superop(ops: list[torch.Tensor]) -> torch.Tensor:
    """sum_k L_k^* kron L_k - (I kron L^+L + (L^+L)^T kron I)/2 for each L_k of shape (..., 2, 2)."""
    total = 0
    for op in ops:
        ldl = op.transpose(-1, -2).conj() @ op
        eye = I2.to(op.device).expand_as(op)
        total = total + kron(op.conj(), op) - 0.5 * (kron(eye, ldl) + kron(ldl.transpose(-1, -2), eye))
    return total


def lindblad_operators(gamma_phi: torch.Tensor, gamma_down: torch.Tensor, gamma_up: torch.Tensor) -> list[torch.Tensor]:
    """The three Lindblad operators per task, each (B, 2, 2)."""
    def scaled(rate, op):
        return torch.sqrt(rate.to(torch.float64)).to(CDTYPE)[:, None, None] * op.to(rate.device)

    return [scaled(gamma_down, SM), scaled(gamma_up, SP), scaled(gamma_phi / 2, SZ)]


def simulate(
    controls: torch.Tensor,
    gamma_phi: torch.Tensor,
    gamma_down: torch.Tensor,
    gamma_up: torch.Tensor | None = None,
    detuning: torch.Tensor | float = 0.0,
    T: float = 1.0,
) -> torch.Tensor:
    """Channel (superoperator, (B, 4, 4)) of piecewise-constant controls ``(B, N, 2)`` = (u_x, u_y).

    Rates are (B,) tensors in 1/T; ``gamma_up`` defaults to ``gamma_down`` (classical noise).
    """
    if controls.dim() != 3 or controls.shape[-1] != 2:
        raise ValueError(f"controls must have shape (B, N, 2), got {tuple(controls.shape)}")
    b, n, _ = controls.shape
    device = controls.device
    gamma_up = gamma_down if gamma_up is None else gamma_up
    delta = torch.as_tensor(detuning, dtype=torch.float64, device=device).expand(b)
    u = controls.to(torch.float64)
    h = 0.5 * (
        delta[:, None, None, None].to(CDTYPE) * SZ.to(device)
        + u[..., 0, None, None].to(CDTYPE) * SX.to(device)
        + u[..., 1, None, None].to(CDTYPE) * SY.to(device)
    )  # (B, N, 2, 2)
    dissipator = dissipator_superop(lindblad_operators(gamma_phi.to(device), gamma_down.to(device), gamma_up.to(device)))
    generator = hamiltonian_superop(h) + dissipator[:, None]
    segments = torch.linalg.matrix_exp(generator * (T / n))  # (B, N, 4, 4)
    channel = segments[:, 0]
    for j in range(1, n):
        channel = segments[:, j] @ channel
    return channel


def unitary_superop(u: torch.Tensor) -> torch.Tensor:
    """vec(U rho U^+) = (U^* kron U) vec(rho)."""
    return kron(u.conj(), u)


def average_gate_fidelity(channel: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """F_avg = (d F_pro + 1)/(d + 1) with F_pro = Tr(S_U^+ S)/d^2, d = 2; shape (B,), float64."""
    s_u = unitary_superop(target.to(channel.device))
    f_pro = torch.einsum("ij,bij->b", s_u.conj(), channel).real / 4
    return (2 * f_pro + 1) / 3


def vec(rho: torch.Tensor) -> torch.Tensor:
    """Column-stacking vectorisation of (..., 2, 2)."""
    return rho.transpose(-1, -2).reshape(*rho.shape[:-2], 4)


def unvec(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(*v.shape[:-1], 2, 2).transpose(-1, -2)


def pauli_eigenstates() -> torch.Tensor:
    """The six Pauli eigenstates (6, 2): |0>, |1>, |+>, |->, |+i>, |-i>. They form a 3-design, so
    the mean of their state fidelities equals the average gate fidelity exactly."""
    s = 1 / math.sqrt(2)
    return torch.tensor([[1, 0], [0, 1], [s, s], [s, -s], [s, 1j * s], [s, -1j * s]], dtype=CDTYPE)


def state_fidelities(channel: torch.Tensor, states: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """<U psi| E(|psi><psi|) |U psi> for input states (B, S, 2) (or (S, 2) shared): (B, S), float64.

    This is the probability of the outcome "U psi" when measuring the output in a basis that
    contains U psi: what a single-shot experiment samples.
    """
    states = states.to(channel.device)
    if states.dim() == 2:
        states = states.expand(channel.shape[0], *states.shape)
    rho_in = vec(states[..., :, None] * states[..., None, :].conj())
    out = target.to(channel.device) @ states[..., None]
    rho_target = vec(out * out.transpose(-1, -2).conj())
    rho_out = torch.einsum("bij,bsj->bsi", channel, rho_in)
    return torch.einsum("bsi,bsi->bs", rho_target.conj(), rho_out).real


def state_transfer_fidelity(channel: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The earlier work's figure of merit: fidelity of E(|0><0|) with U|0> (one input state only)."""
    return state_fidelities(channel, pauli_eigenstates()[:1], target)[:, 0]
