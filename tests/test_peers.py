"""tools/peers.py's own parts that run without the peers: the gate list it hands TFQ and Qiskit and
the reference values it checks them against.

The oracle here is a dense 16 x 16 matrix product over peers.gate_layout(), written apart from both
the gate list's consumers and tools/reference_statevector.py, so a wrong angle index in the layout
or in the mapping of a row onto the reference's (theta, lambda, s = 1) shows up as a difference.
"""

import numpy as np
import pytest

from tools import peers

X = np.array([[0, 1], [1, 0]], dtype=complex)
Y = np.array([[0, -1j], [1j, 0]])
Z = np.diag([1.0, -1.0]).astype(complex)
GENERATOR = {"rx": X, "ry": Y, "rz": Z}


def dense_expectation(row: np.ndarray) -> float:
    """<Z0Z1Z2Z3> of one row of 92 gate angles by full matrices (qubit 0 the leftmost factor)."""
    n = peers.N_QUBITS
    psi = np.zeros(2**n, dtype=complex)
    psi[0] = 1.0
    for kind, where, idx in peers.gate_layout():
        if kind == "cz":
            a, b = where
            diag = [(-1.0 if (x >> (n - 1 - a)) & 1 and (x >> (n - 1 - b)) & 1 else 1.0) for x in range(2**n)]
            psi = np.asarray(diag) * psi
        else:
            angle = row[idx]
            u = np.cos(angle / 2) * np.eye(2) - 1j * np.sin(angle / 2) * GENERATOR[kind]
            factors = [u if q == where else np.eye(2) for q in range(n)]
            full = factors[0]
            for f in factors[1:]:
                full = np.kron(full, f)
            psi = full @ psi
    zzzz = np.diag(np.prod([[1.0 - 2.0 * ((x >> (n - 1 - q)) & 1) for q in range(n)] for x in range(2**n)], axis=1))
    return float(np.real(psi.conj() @ zzzz @ psi))


def test_gate_layout_uses_every_angle_once():
    ops = peers.gate_layout()
    indices = sorted(idx for _, _, idx in ops if idx is not None)
    assert indices == list(range(peers.N_ANGLES)) and peers.N_ANGLES == 92
    assert sum(kind == "cz" for kind, _, _ in ops) == peers.N_LAYERS * peers.N_QUBITS
    assert len(ops) == 92 + 20


@pytest.fixture(scope="module")
def rows():
    rng = np.random.default_rng(3)
    return rng.uniform(0, 2 * np.pi, (peers.N_CHECKED, peers.N_ANGLES)), rng.normal(size=peers.N_CHECKED)


def test_reference_values_equal_the_dense_circuit(rows):
    angles, weights = rows
    values, _ = peers.reference_values(angles, weights)
    dense = np.array([dense_expectation(row) for row in angles])
    np.testing.assert_allclose(values, dense, atol=1e-12)
    assert np.ptp(dense) > 0.1  # distinct rows, not a constant both sides could agree on


def test_reference_gradients_equal_central_differences_of_the_dense_circuit(rows):
    angles, weights = rows
    _, gradients = peers.reference_values(angles, weights)
    h = 1e-5
    for b in (0, peers.N_CHECKED - 1):
        for i in (0, 40, peers.N_THETA - 1, peers.N_THETA, peers.N_ANGLES - 1):  # first/last variational, encoding
            up, down = angles[b].copy(), angles[b].copy()
            up[i] += h
            down[i] -= h
            expected = weights[b] * (dense_expectation(up) - dense_expectation(down)) / (2 * h)
            assert gradients[b, i] == pytest.approx(expected, abs=1e-8)


def test_figure_has_no_exponent():
    assert [peers.figure(x) for x in (0.14321, 21.84, 2143.3, 419565.2)] == ["0.143", "21.8", "2,143", "419,565"]
