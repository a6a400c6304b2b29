"""Fidelity models of a pulse under a task's noise: where the pulse meets the PSD.

Units and conventions of docs/CONVENTIONS.md §3 (T = 1 by default; rates and frequencies in 1/T).
The qubit, in the rotating frame, with classical Gaussian noise::

    H(t) = ((delta + xi(t))/2) sz + ((u_x(t) + eta_x(t))/2) sx + ((u_y(t) + eta_y(t))/2) sy

- ``xi``: dephasing noise, stationary Gaussian with the task's two-sided PSD S(omega),
  <xi(t) xi(0)> = (1/pi) int_0^inf S(omega) cos(omega t) d omega (colored, any shape).
- ``eta_x, eta_y``: the transverse (relaxation) noise seen in the rotating frame. With the qubit
  frequency omega0 well above the largest Rabi frequency (validated by :func:`check_drive`) the
  transverse spectrum is flat over omega0 +- Omega, so eta_x, eta_y are independent white noises
  of PSD 2 Gamma each, Gamma = Gamma_down = Gamma_up = c^2 S(omega0)/4 (golden rule). This is the
  same dissipator as sqrt(Gamma) s-, sqrt(Gamma) s+, since D[s-] + D[s+] = (D[sx] + D[sy])/2.

Three models (``simulation``):

- ``markovian``: today's model. One Lindblad rate gamma_phi = chi_Ramsey(T)/T per task, the same
  for every pulse (noise/lindblad.py), exact Liouvillian propagation (noise/simulator.py).
- ``filter_function``: first order in the noise, in the toggling frame of the noiseless evolution
  U0(t) (controls AND the task's detuning): with R(t) the Bloch vector of U0^+(t) sz U0(t), the
  error unitary U0(T)^+ U(T) = exp(-i a.sigma), a_j = (1/2) int_0^T xi(t) R_j(t) dt, has the
  covariance::

      Sigma_ij = <a_i a_j> = (1/4) int int R_i(t) C(t - t') R_j(t') dt dt'
               = (1/(4 pi)) int_0^inf S(omega) Re[R~_i(omega) R~_j(omega)^*] d omega,

  R~ = int R e^{i omega t} dt (so Re[R~ R~^+] is the pulse's own filter function). It is evaluated in
  the time domain on ``n_steps`` fine steps of width dt: R at the step midpoints and the exact
  covariance of the step integrals X_j = int_step xi dt (:func:`step_covariance`, all frequencies
  from 0 to infinity, quasi-static part included); white noise therefore gives exactly S0/2. The
  transverse noise adds (Gamma dt / 2) sum_j (R^x_j R^x_j^T + R^y_j R^y_j^T). The channel is
  S_{U0(T)} exp(G), G rho = sum_ij Sigma_ij sigma_i rho sigma_j - tr(Sigma) rho (CPTP; to first
  order 1 - F_e = tr Sigma, 1 - F_avg = (2/3) tr Sigma). Neglected: O(xi^3) and the mean of the
  second Magnus term, which only matters together with a coherent error. Valid while the noise
  infidelity (2/3) tr Sigma is small (about 0.05 or less): :meth:`FilterFunctionModel.noise_infidelity`.
- ``trajectories``: Monte Carlo, exact at any strength. Per trajectory the step integrals
  X_j of xi are drawn from their exact joint Gaussian law (covariance :func:`step_covariance`,
  factorised once per task), eta from its white law; every fine step is the exact SU(2)
  exp(-i phi.sigma/2), phi = (u_x dt + X^x_j, u_y dt + X^y_j, delta dt + X^z_j). The channel is the
  mean of U^* kron U over the trajectories; F is the mean of the per-trajectory fidelities, its
  standard error std/sqrt(K). The standard normal draws are fixed per task (common random numbers:
  every pulse and every inner step of a task sees the same noise realisations).

Both non-Markovian models are batched over tasks, float64 / complex128, differentiable with
autograd in the controls, and run on the device of the controls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from noise.lindblad import _gauss_legendre
from noise.simulator import CDTYPE, SX, SY, SZ, kron, simulate
from noise.spectra import NoiseParameters

SIMULATIONS = ("trajectories", "filter_function", "markovian")
#: omega0 must be at least this many times the largest Rabi frequency sqrt(2) max_amplitude.
DRIVE_MARGIN = 10.0
#: A fine step must resolve the drive and the PSD corner: dt * max(Omega_max, omega_c) at most this.
STEP_RESOLUTION = 0.25
MIN_TRAJECTORIES = 64
#: First-order (filter-function) noise infidelities above this are outside the model's validity.
FF_VALIDITY = 0.05


def check_drive(omega0: float, max_amplitude: float) -> None:
    """Raise ValueError unless omega0 >= DRIVE_MARGIN * sqrt(2) * max_amplitude (rotating-wave
    relaxation with one rate per task needs a qubit frequency well above every Rabi frequency)."""
    rabi = math.sqrt(2) * max_amplitude
    if omega0 < DRIVE_MARGIN * rabi:
        raise ValueError(
            f"omega0 = {omega0:g}/T is not well above the largest Rabi frequency sqrt(2) max_amplitude = {rabi:.3g}/T; "
            f"need omega0 >= {DRIVE_MARGIN * rabi:.4g} (or a smaller max_amplitude)"
        )


def min_time_steps(max_amplitude: float, omega_c_max: float, T: float = 1.0) -> int:
    """Fewest fine steps with dt * max(sqrt(2) max_amplitude, omega_c_max) <= STEP_RESOLUTION."""
    need = max(math.sqrt(2) * max_amplitude, omega_c_max) * T / STEP_RESOLUTION
    return math.ceil(need) if need < 1e12 else 10**12  # absurd inputs: a number no config can reach


# ---------------------------------------------------------------------------------------------
# Noise statistics on the fine time grid


class StepCovariance:
    """Autocovariance of the step integrals X_j = int_{j dt}^{(j+1) dt} xi(t) dt, dt = T/n_steps::

        c_m = Cov(X_j, X_{j+m}) = (1/pi) int_0^inf S(omega) [4 sin^2(omega dt/2) / omega^2] cos(omega m dt) d omega

    (units 1/T * T^2 = T: X is a phase in radians). Composite Gauss-Legendre on fixed nodes, the
    layout of :class:`noise.lindblad.PSDToLindblad` (log panels from 1e-9/T to 1/T, panels of width
    pi/(2T) up to ``omega_max``), and above ``omega_max`` the bracket replaced by its mean over
    the oscillation (2 for m = 0, -1 for m = 1, 0 beyond), times int S/omega^2. White noise S0
    gives c_0 = S0 dt and c_m = 0 (tested)."""

    def __init__(self, n_steps: int, T: float = 1.0, omega_max: float | None = None, order: int = 8):
        if n_steps < 1 or T <= 0:
            raise ValueError(f"need n_steps >= 1 and T > 0, got {n_steps}, {T}")
        self.n_steps, self.T = n_steps, T
        dt = T / n_steps
        omega_max = omega_max or max(2000.0, 40.0 / dt) / T
        low = np.concatenate([[0.0], np.logspace(-9, 0, 9 * 6 + 1)]) / T
        width = math.pi / (2 * T)
        mid = np.arange(low[-1], omega_max + width / 2, width)
        nodes, w = _gauss_legendre(np.concatenate([low, mid[1:]]), order)
        m = np.arange(n_steps)
        bracket = dt**2 * np.sinc(nodes * dt / (2 * math.pi)) ** 2  # 4 sin^2(w dt/2)/w^2, stable at w -> 0
        body = (w * bracket)[None, :] * np.cos(np.outer(m, nodes) * dt)  # (n_steps, nodes)
        u, wu = _gauss_legendre(np.linspace(0.0, 1.0, 9), order)
        tail_nodes = omega_max / u
        tail_mean = np.zeros(n_steps)
        tail_mean[0] = 2.0
        if n_steps > 1:
            tail_mean[1] = -1.0
        tail = np.outer(tail_mean, wu / omega_max)  # int_{omega_max}^inf S/omega^2 = (1/omega_max) int_0^1 S(omega_max/u) du
        # the oscillating rest, to leading order: int_W^inf g(w) cos(a w) dw = -g(W) sin(a W)/a + O(g'/a^2), g = S/w^2,
        # for the three cosines of 4 sin^2(x/2) cos(m x) = 2 cos(m x) - cos((m+1) x) - cos((m-1) x), x = w dt
        edge = np.zeros(n_steps)
        for k, coef in ((m, 2.0), (m + 1, -1.0), (m - 1, -1.0)):
            a = np.abs(k) * dt
            safe = np.where(a > 0, a, 1.0)
            edge += np.where(a > 0, -coef * np.sin(safe * omega_max) / safe, 0.0)
        edge /= omega_max**2
        self.nodes = np.concatenate([nodes, tail_nodes, [omega_max]])
        self.weights = np.concatenate([body, tail, edge[:, None]], axis=1) / math.pi  # (n_steps, all nodes)

    def autocovariance(self, tasks: list[NoiseParameters], psd_model: str | None = None) -> np.ndarray:
        """(B, n_steps): c_0 .. c_{n-1} per task."""
        s = np.stack([t.psd(self.nodes, psd_model) for t in tasks])
        return s @ self.weights.T

    def matrix(self, tasks: list[NoiseParameters], psd_model: str | None = None) -> np.ndarray:
        """(B, n, n) Toeplitz covariance matrices Cov(X_j, X_k) = c_|j-k|."""
        c = self.autocovariance(tasks, psd_model)
        idx = np.abs(np.arange(self.n_steps)[:, None] - np.arange(self.n_steps)[None, :])
        return c[:, idx]


# ---------------------------------------------------------------------------------------------
# SU(2): unit quaternions U = q0 I - i (q1 sx + q2 sy + q3 sz) (trajectories), 2x2 matrices (filter function)


def quaternion_to_unitary(q: torch.Tensor) -> torch.Tensor:
    """(..., 4) -> (..., 2, 2) complex128: q0 I - i (q1 sx + q2 sy + q3 sz)."""
    q0, q1, q2, q3 = (q[..., k] for k in range(4))
    row0 = torch.stack([torch.complex(q0, -q3), torch.complex(-q2, -q1)], dim=-1)
    row1 = torch.stack([torch.complex(q2, -q1), torch.complex(q0, q3)], dim=-1)
    return torch.stack([row0, row1], dim=-2)


def _segment_vectors(controls: torch.Tensor, detuning: torch.Tensor) -> torch.Tensor:
    """(B, N, 3) = (u_x, u_y, delta) per segment, float64."""
    b, n, _ = controls.shape
    u = controls.to(torch.float64)
    delta = detuning.to(torch.float64).to(u.device).reshape(b, 1, 1).expand(b, n, 1)
    return torch.cat([u, delta], dim=-1)


def _check_controls(controls: torch.Tensor, n_steps: int) -> int:
    if controls.dim() != 3 or controls.shape[-1] != 2:
        raise ValueError(f"controls must have shape (B, N, 2), got {tuple(controls.shape)}")
    n = controls.shape[1]
    if n_steps % n:
        raise ValueError(f"time_steps {n_steps} must be a multiple of the number of segments {n}")
    return n_steps // n


# ---------------------------------------------------------------------------------------------
# Models


@dataclass(frozen=True)
class NoiseBatch:
    """What a model needs per task, on one device: rates (B,), detuning (B,), and model data
    (filter_function: the (B, n, n) step covariance; trajectories: the (B, K, n, 3) noise step
    integrals; markovian: None)."""

    gamma_phi: torch.Tensor
    gamma_down: torch.Tensor
    gamma_up: torch.Tensor
    detuning: torch.Tensor
    data: torch.Tensor | None

    def select(self, index: torch.Tensor) -> NoiseBatch:
        index = index.to(self.gamma_phi.device)
        data = None if self.data is None else self.data[index.to(self.data.device)]
        return NoiseBatch(self.gamma_phi[index], self.gamma_down[index], self.gamma_up[index], self.detuning[index], data)


class FidelityModel:
    """A fidelity model: ``prepare`` turns tasks into a :class:`NoiseBatch` once per task batch,
    ``channel`` maps controls (B, N, 2) to the (B, 4, 4) superoperator (column-stacking vec)."""

    name: str = ""
    T: float = 1.0
    n_steps: int = 0

    def data(self, tasks: list[NoiseParameters], gamma_down: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
        return None

    def prepare(self, tasks: list[NoiseParameters], gamma_phi, gamma_down, gamma_up, rng: np.random.Generator,
                device: torch.device | str = "cpu") -> NoiseBatch:
        def t(x):
            return torch.as_tensor(np.asarray(x, dtype=np.float64), dtype=torch.float64, device=device)

        data = self.data(tasks, np.asarray(gamma_down, dtype=np.float64), rng)
        return NoiseBatch(t(gamma_phi), t(gamma_down), t(gamma_up), t([task.detuning for task in tasks]),
                          None if data is None else t(data))

    def channel(self, controls: torch.Tensor, noise: NoiseBatch) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class MarkovianModel(FidelityModel):
    """One Ramsey-filter Lindblad rate per task, independent of the pulse (the earlier model)."""

    name = "markovian"

    def __init__(self, T: float = 1.0):
        self.T = T

    def channel(self, controls: torch.Tensor, noise: NoiseBatch) -> torch.Tensor:
        return simulate(controls, noise.gamma_phi, noise.gamma_down, noise.gamma_up, noise.detuning, self.T)


class _FineGrid(FidelityModel):
    def __init__(self, n_steps: int, T: float = 1.0, psd_model: str | None = None):
        self.n_steps, self.T, self.psd_model = n_steps, T, psd_model
        self.covariance = StepCovariance(n_steps, T)

    @property
    def dt(self) -> float:
        return self.T / self.n_steps


def _rotation_components(px: torch.Tensor, py: torch.Tensor, pz: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """exp(-i phi.sigma/2) as the unit quaternion (cos(|phi|/2), sin(|phi|/2) phi/|phi|), U = q0 - i q.sigma,
    from separate component tensors (elementwise on contiguous slabs; smooth at phi = 0)."""
    norm = torch.sqrt((px * px + py * py + pz * pz).clamp_min(1e-300))
    k = 0.5 * torch.sinc(norm / (2 * math.pi))
    return torch.cos(0.5 * norm), k * px, k * py, k * pz


def _product_components(p: tuple[torch.Tensor, ...], q: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The SU(2) product P Q of component tuples: (p0 q0 - p.q, p0 q + q0 p + p x q)."""
    p0, p1, p2, p3 = p
    q0, q1, q2, q3 = q
    return (p0 * q0 - p1 * q1 - p2 * q2 - p3 * q3,
            p0 * q1 + q0 * p1 + p2 * q3 - p3 * q2,
            p0 * q2 + q0 * p2 + p3 * q1 - p1 * q3,
            p0 * q3 + q0 * p3 + p1 * q2 - p2 * q1)


def _ordered_components(q: tuple[torch.Tensor, ...], dim: int = 1) -> tuple[torch.Tensor, ...]:
    """Time-ordered product q_{M-1} ... q_1 q_0 over ``dim`` of component tuples (later on the left), by
    pairwise tree reduction: log2(M) batched products instead of M sequential ones."""
    while q[0].shape[dim] > 1:
        if q[0].shape[dim] % 2:
            pad = [torch.ones_like(q[0].narrow(dim, 0, 1))] + [torch.zeros_like(q[0].narrow(dim, 0, 1))] * 3
            q = tuple(torch.cat([c, e], dim=dim) for c, e in zip(q, pad))
        n = q[0].shape[dim]
        later = tuple(c.narrow(dim, 1, n - 1)[(slice(None),) * dim + (slice(None, None, 2),)] for c in q)
        earlier = tuple(c[(slice(None),) * dim + (slice(None, None, 2),)] for c in q)
        q = _product_components(later, earlier)
    return tuple(c.squeeze(dim) for c in q)


def _unit_basis(device) -> torch.Tensor:
    """E_a (4, 2, 2) with U = sum_a q_a E_a: I, -i sx, -i sy, -i sz."""
    return torch.stack([torch.eye(2, dtype=CDTYPE), -1j * SX, -1j * SY, -1j * SZ]).to(device)


def _su2(phi: torch.Tensor) -> torch.Tensor:
    """exp(-i phi.sigma/2) as (..., 2, 2) complex128 for rotation vectors phi (..., 3)."""
    norm = torch.sqrt((phi * phi).sum(-1).clamp_min(1e-300))
    c = torch.cos(0.5 * norm).to(CDTYPE)[..., None, None]
    k = (0.5 * torch.sinc(norm / (2 * math.pi)))[..., None]  # sin(|phi|/2)/|phi|
    generator = torch.einsum("...c,cij->...ij", (k * phi).to(CDTYPE), torch.stack([SX, SY, SZ]).to(phi.device))
    return c * torch.eye(2, dtype=CDTYPE, device=phi.device) - 1j * generator


def _bloch_frames(u: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) real: row k = Bloch vector of U^+ sigma_k U, for U (..., 2, 2)."""
    paulis = torch.stack([SX, SY, SZ]).to(u.device)
    q = u.conj().transpose(-1, -2)[..., None, :, :] @ (paulis @ u[..., None, :, :])  # (..., 3, 2, 2)
    # U^+ sigma_k U = [[z, x - iy], [x + iy, -z]]
    return torch.stack([q[..., 1, 0].real, q[..., 1, 0].imag, q[..., 0, 0].real], dim=-1)


def _expm(x: torch.Tensor, degree: int = 16) -> torch.Tensor:
    """Matrix exponential of (B, d, d) by scaling and squaring with a Taylor polynomial, every matrix on
    its own (torch.linalg.matrix_exp picks one algorithm per batch, so a task's result would depend on
    the other tasks in the batch at the 1e-13 level). Each matrix is scaled to 1-norm <= 1/2 (Taylor
    remainder below 1e-20), then squared back."""
    norm = x.detach().abs().sum(-2).amax(-1)
    squarings = torch.ceil(torch.log2(norm.clamp_min(1e-300) / 0.5)).clamp_min(0).to(torch.int64)
    y = x / (2.0 ** squarings.to(x.dtype))[:, None, None]
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device).expand_as(x)
    out = eye
    for k in range(degree, 0, -1):  # Horner: I + y/1 (I + y/2 (I + ...))
        out = eye + (y @ out) / k
    for i in range(int(squarings.max()) if len(squarings) else 0):
        out = torch.where((squarings > i)[:, None, None], out @ out, out)
    return out


def _ptm_basis(device) -> torch.Tensor:
    """(4, 4, 4, 4): B_ab = vec(sigma_a) vec(sigma_b)^+ / 2, so that sum_ab P_ab B_ab is the superoperator of
    the Pauli transfer matrix P (sigma_0 = I; column-stacking vec)."""
    paulis = torch.stack([torch.eye(2, dtype=CDTYPE), SX, SY, SZ])
    vecs = paulis.transpose(-1, -2).reshape(4, 4)
    return (torch.einsum("ai,bj->abij", vecs, vecs.conj()) / 2).to(device)


class FilterFunctionModel(_FineGrid):
    """First-order filter-function model (module docstring); ``data`` = the step covariance matrix.

    Computed with real arithmetic: U0 by a prefix scan over segments, the frames in closed form from
    the quaternions; the noise map exp(G) in its Bloch form exp(2 Sigma - 2 tr(Sigma) I) (G sigma_k =
    2 (Sigma sigma)_k - 2 tr(Sigma) sigma_k for symmetric Sigma), the channel's Pauli transfer matrix
    O(U0(T)) exp(...) turned into the (B, 4, 4) superoperator."""

    name = "filter_function"

    def data(self, tasks, gamma_down, rng):
        return self.covariance.matrix(tasks, self.psd_model)

    def toggling_frame(self, controls: torch.Tensor, detuning: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(U0(T) (B, 2, 2) complex, frames (B, n_steps, 3, 3)): row k of frames[:, j] is the Bloch vector
        of U0^+ sigma_k U0 (k = x, y, z) at the midpoint of fine step j. Few, batched 2x2 matrix
        operations (the cost at small batches is the number of autograd nodes, not arithmetic)."""
        s = _check_controls(controls, self.n_steps)
        b, n, _ = controls.shape
        h = _segment_vectors(controls, detuning)  # (B, N, 3)
        full = _su2(h * (self.T / n))  # (B, N, 2, 2)
        starts = [torch.eye(2, dtype=CDTYPE, device=h.device).expand(b, 2, 2)]
        for j in range(n):
            starts.append(full[:, j] @ starts[-1])
        start = torch.stack(starts[:-1], dim=1)  # U0 at each segment start (B, N, 2, 2)
        taus = (torch.arange(s, dtype=torch.float64, device=h.device) + 0.5) * self.dt
        mids = (_su2(h[:, :, None, :] * taus[:, None]) @ start[:, :, None]).reshape(b, n * s, 2, 2)
        return starts[-1], _bloch_frames(mids)

    def sigma(self, frames: torch.Tensor, noise: NoiseBatch) -> torch.Tensor:
        """Sigma (B, 3, 3) of the error vector a: dephasing (1/4) R_z^T C R_z + transverse (Gamma dt/2) sum R R^T."""
        rz, rx, ry = frames[..., 2, :], frames[..., 0, :], frames[..., 1, :]  # (B, M, 3)
        cov = noise.data.to(rz.device)
        sigma = 0.25 * rz.transpose(1, 2) @ (cov @ rz)
        transverse = rx.transpose(1, 2) @ rx + ry.transpose(1, 2) @ ry
        return sigma + (noise.gamma_down * self.dt / 2)[:, None, None] * transverse

    def noise_infidelity(self, controls: torch.Tensor, noise: NoiseBatch) -> torch.Tensor:
        """First-order infidelity from the noise alone, 1 - F_avg = (2/3) tr Sigma (B,)."""
        _, frames = self.toggling_frame(controls, noise.detuning)
        return (2.0 / 3.0) * torch.diagonal(self.sigma(frames, noise), dim1=-2, dim2=-1).sum(-1)

    def channel(self, controls: torch.Tensor, noise: NoiseBatch) -> torch.Tensor:
        final, frames = self.toggling_frame(controls, noise.detuning)
        sigma = self.sigma(frames, noise)
        trace = torch.diagonal(sigma, dim1=-2, dim2=-1).sum(-1)
        eye = torch.eye(3, dtype=torch.float64, device=sigma.device)
        bloch_noise = _expm(2 * sigma - 2 * trace[:, None, None] * eye)
        rotation = _bloch_frames(final)  # O_ab = Tr(sigma_a U0 sigma_b U0^+)/2
        ptm = torch.zeros(len(sigma), 4, 4, dtype=torch.float64, device=sigma.device)
        ptm = ptm + torch.nn.functional.pad(rotation @ bloch_noise, (1, 0, 1, 0))
        ptm[:, 0, 0] = 1.0
        return torch.einsum("bac,acij->bij", ptm.to(CDTYPE), _ptm_basis(sigma.device))


class TrajectoryModel(_FineGrid):
    """Monte Carlo over Gaussian noise trajectories (module docstring); ``data`` = the (B, 3, n, K)
    step integrals (X^x, X^y, X^z) per fine step and trajectory, fixed per task (common random
    numbers). All trajectory arithmetic is real, on contiguous (B, n, K) slabs per quaternion
    component; the channel is assembled from the second moments <q_a q_b> over the trajectories:
    mean U^* kron U = sum_ab <q_a q_b> E_a^* kron E_b."""

    name = "trajectories"

    def __init__(self, n_steps: int, n_trajectories: int, T: float = 1.0, psd_model: str | None = None):
        super().__init__(n_steps, T, psd_model)
        if n_trajectories < 2:
            raise ValueError(f"need at least 2 trajectories for a standard error, got {n_trajectories}")
        self.n_trajectories = n_trajectories

    def data(self, tasks, gamma_down, rng):
        cov = self.covariance.matrix(tasks, self.psd_model)
        w, v = np.linalg.eigh(cov)  # cov = V diag(w) V^T; rounding can leave tiny negative eigenvalues
        factor = v * np.sqrt(np.clip(w, 0.0, None))[:, None, :]
        b, n, k = len(tasks), self.n_steps, self.n_trajectories
        z = rng.standard_normal((b, 3, n, k))
        out = np.empty_like(z)
        out[:, 2] = factor @ z[:, 2]  # (B, n, n) @ (B, n, K): correlated dephasing step integrals
        out[:, :2] = np.sqrt(2 * gamma_down * self.dt)[:, None, None, None] * z[:, :2]  # white transverse noise
        return out

    def _final(self, controls: torch.Tensor, noise: NoiseBatch) -> tuple[torch.Tensor, ...]:
        """Per-trajectory final SU(2), as four (B, K) quaternion components."""
        s = _check_controls(controls, self.n_steps)
        h = _segment_vectors(controls, noise.detuning).repeat_interleave(s, dim=1) * self.dt  # (B, n, 3)
        data = noise.data.to(h.device)
        phi = [h[:, :, c, None] + data[:, c] for c in range(3)]  # (B, n, K) each
        return _ordered_components(_rotation_components(*phi), dim=1)

    def unitaries(self, controls: torch.Tensor, noise: NoiseBatch) -> torch.Tensor:
        """Per-trajectory final SU(2) as quaternions (B, K, 4)."""
        return torch.stack(self._final(controls, noise), dim=-1)

    def channel(self, controls: torch.Tensor, noise: NoiseBatch) -> torch.Tensor:
        q = torch.stack(self._final(controls, noise), dim=1)  # (B, 4, K)
        moments = (q @ q.transpose(1, 2)) / q.shape[-1]  # <q_a q_b> (B, 4, 4)
        e = _unit_basis(q.device)
        basis = torch.stack([torch.stack([kron(e[a].conj(), e[bb]) for bb in range(4)]) for a in range(4)])  # (4, 4, 4, 4)
        return torch.einsum("bac,acij->bij", moments.to(CDTYPE), basis)

    def fidelity_samples(self, controls: torch.Tensor, noise: NoiseBatch, target: torch.Tensor) -> torch.Tensor:
        """Per-trajectory average gate fidelities (B, K): (2 |Tr(V^+ U_k)/2|^2 + 1)/3."""
        q = torch.stack(self._final(controls, noise), dim=1)  # (B, 4, K)
        t = torch.einsum("ij,aij->a", target.to(q.device).conj(), _unit_basis(q.device)) / 2  # Tr(V^+ E_a)/2
        overlap = torch.einsum("a,bak->bk", t, q.to(CDTYPE))
        return (2 * overlap.abs() ** 2 + 1) / 3


def build_model(simulation: str, n_steps: int = 50, n_trajectories: int = 1000, T: float = 1.0,
                psd_model: str | None = None) -> FidelityModel:
    """The fidelity model named ``simulation`` (one of SIMULATIONS)."""
    if simulation == "markovian":
        return MarkovianModel(T)
    if simulation == "filter_function":
        return FilterFunctionModel(n_steps, T, psd_model)
    if simulation == "trajectories":
        return TrajectoryModel(n_steps, n_trajectories, T, psd_model)
    raise ValueError(f"simulation {simulation!r}; allowed: {', '.join(SIMULATIONS)}")
