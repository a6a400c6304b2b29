"""The peer stacks a user would pick, timed on the same 4-qubit, 5-layer re-uploading circuit.

Not part of the project and not among its requirements: run it in a separate environment where
the peers are installed. As run on 2026-11-26 (Python 3.11, all wheels from PyPI)::

    python3 -m venv /work/scratch/peers-venv && . /work/scratch/peers-venv/bin/activate
    pip install tensorflow-quantum==0.7.6 "tensorflow>=2.18,<2.19" qiskit qiskit-machine-learning==0.9.1 qiskit-aer
    pip install jax==0.10.2 jaxlib==0.10.2   # the project's jax; TFQ 0.7.6 pins jax<0.6 but never imports it
    OMP_NUM_THREADS=1 TF_USE_LEGACY_KERAS=1 python tools/peers.py --stacks tfq qiskit qiskit-aer reference

(TFQ 0.7.6 brings tensorflow 2.18.1, tf-keras 2.18.0, cirq-core 1.5.0 and numpy 2.0.2; qiskit 2.6.2,
qiskit-aer 0.18.2.) jax is required: the check below and the limit use it.

It prints, per stack, the median time of a forward call (expectation values of Z0Z1Z2Z3) at a
batch of 10 and of 1000 circuits and of one gradient of sum_b w_b <O>_b with respect to every gate
angle of 1000 circuits, each stack on its fastest path (TFQ: circuit tensors built once, graph
mode, adjoint differentiator; Qiskit ML: EstimatorQNN on qiskit's StatevectorEstimator and on
Aer's EstimatorV2, exact values). Qiskit Machine Learning has no reverse-mode gradient (its
EstimatorQNN differentiates by parameter shift, 2 x 92 circuits per row), so its gradient is
timed on ``--qiskit-gradient-rows`` rows and scaled to 1000. The hand-written reference
(tools/reference_statevector.py, layers unrolled) is timed in the same process and every time is
also printed as a multiple of it (its gradient is the REINFORCE loss's, with respect to the 94
policy parameters, the cost of one reverse pass over 1000 rows as the peers' is).

Before timing, every stack's values and gradients on 5 rows are compared with the reference's
(float64, one row at a time); the maximum differences are printed and the script exits 1 past
``--value-tolerance`` / ``--gradient-tolerance``. TFQ computes in float32: 4e-6 on the values,
4e-5 on the adjoint gradient (its parameter-shift differentiator: 9e-6), Qiskit 1e-15.

The circuit per row, as in models.py (4 qubits, 5 layers, gate angles are the inputs)::

    for l in 0..4: Rx Ry Rz(theta[l, q]) on each qubit; CZ ring; Rx(a[l, q]) on each qubit
    final:         Rx Ry Rz(theta[5, q]);  readout <Z0 Z1 Z2 Z3>

The angles are random (seeded), 72 variational and 20 encoding angles per row. The README's peer
table (issue 17) was measured with this script on 2026-11-26 on the project's 2-core x86-64
machine, one thread; the issue author's earlier figures, measured another way, are kept beside it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

N_QUBITS, N_LAYERS = 4, 5
N_THETA = (N_LAYERS + 1) * N_QUBITS * 3
N_ANGLES = N_THETA + N_LAYERS * N_QUBITS
N_CHECKED = 5  # rows whose values and gradients every stack must reproduce


def median_s(fn, budget_s: float = 2.0, min_calls: int = 3) -> float:
    fn()  # warm-up (graph building, compilation)
    times: list[float] = []
    while len(times) < min_calls or sum(times) < budget_s:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if times[-1] > 30:
            break
    return statistics.median(times)


def figure(x: float) -> str:
    """No exponent: 3 significant digits below 100 (0.143, 21.8), whole numbers above (2,143)."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def versions() -> str:
    from importlib import metadata

    found = []
    for name in ("tensorflow", "tensorflow-quantum", "tf-keras", "cirq-core", "qiskit", "qiskit-machine-learning",
                 "qiskit-aer", "jax", "jaxlib", "numpy"):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} absent")
    return ", ".join(found)


def gate_layout():
    """[(kind, qubit or pair, angle index)] of the circuit above."""
    ops = []
    for layer in range(N_LAYERS):
        ops += [(k, q, (layer * N_QUBITS + q) * 3 + a) for q in range(N_QUBITS) for a, k in enumerate(("rx", "ry", "rz"))]
        ops += [("cz", (q, (q + 1) % N_QUBITS), None) for q in range(N_QUBITS)]
        ops += [("rx", q, N_THETA + layer * N_QUBITS + q) for q in range(N_QUBITS)]
    ops += [(k, q, (N_LAYERS * N_QUBITS + q) * 3 + a) for q in range(N_QUBITS) for a, k in enumerate(("rx", "ry", "rz"))]
    return ops


# ---------------------------------------------------------------------------------------------


def time_tfq(angles: np.ndarray, weights: np.ndarray) -> dict[str, float]:
    import tensorflow as tf

    # One thread, as every other stack here; set before TFQ's import initialises TensorFlow.
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import cirq
    import sympy
    import tensorflow_quantum as tfq

    qubits = cirq.GridQubit.rect(1, N_QUBITS)
    symbols = sympy.symbols(f"a0:{N_ANGLES}")
    gate = {"rx": cirq.rx, "ry": cirq.ry, "rz": cirq.rz}
    circuit = cirq.Circuit()
    for kind, where, idx in gate_layout():
        if kind == "cz":
            circuit.append(cirq.CZ(qubits[where[0]], qubits[where[1]]))
        else:
            circuit.append(gate[kind](symbols[idx])(qubits[where]))
    observable = cirq.Z(qubits[0]) * cirq.Z(qubits[1]) * cirq.Z(qubits[2]) * cirq.Z(qubits[3])
    names = tf.constant([str(s) for s in symbols])
    layer = tfq.layers.Expectation()  # analytic expectation, adjoint differentiator

    def inputs(n: int):
        # Serialised once, as a model holds its circuit tensor: converting 1000 cirq circuits to
        # protobuf costs more than simulating them and is not part of a forward call.
        return (tfq.convert_to_tensor([circuit] * n), tfq.convert_to_tensor([[observable]] * n),
                tf.constant(angles[:n], dtype=tf.float32),  # TFQ's symbol values are float32
                tf.constant(weights[:n, None], dtype=tf.float32))

    @tf.function  # graph mode, TFQ's fastest path (as inside a Keras model)
    def forward(circuits, operators, values):
        return layer(circuits, symbol_names=names, symbol_values=values, operators=operators)

    @tf.function
    def gradient(circuits, operators, values, w):
        with tf.GradientTape() as tape:
            tape.watch(values)
            loss = tf.reduce_sum(w * layer(circuits, symbol_names=names, symbol_values=values, operators=operators))
        return tape.gradient(loss, values)

    small, large, checked = inputs(10), inputs(len(angles)), inputs(N_CHECKED)
    return {"values": forward(*checked[:3]).numpy()[:, 0], "gradients": gradient(*checked).numpy(),
            "forward_10_s": median_s(lambda: forward(*small[:3]).numpy()),
            "forward_1000_s": median_s(lambda: forward(*large[:3]).numpy()),
            "gradient_1000_s": median_s(lambda: gradient(*large).numpy())}


def time_qiskit(angles: np.ndarray, weights: np.ndarray, gradient_rows: int, simulator: str = "statevector") -> dict[str, float]:
    """``simulator``: "statevector" (qiskit's reference StatevectorEstimator) or "aer" (qiskit-aer's
    EstimatorV2, compiled C++, one thread, exact expectation values)."""
    from qiskit import QuantumCircuit
    from qiskit.circuit import ParameterVector
    from qiskit.primitives import StatevectorEstimator
    from qiskit.quantum_info import SparsePauliOp
    from qiskit_machine_learning.neural_networks import EstimatorQNN

    params = ParameterVector("a", N_ANGLES)
    qc = QuantumCircuit(N_QUBITS)
    for kind, where, idx in gate_layout():
        if kind == "cz":
            qc.cz(*where)
        else:
            getattr(qc, kind)(params[idx], where)
    # Qiskit orders qubits little-endian; a product of Z on all four is the same either way.
    # default_precision=0: EstimatorQNN's own default (1/64) makes the estimator add N(0, 1/64^2)
    # noise to every expectation value, a shot-noise model; exact values are asked for here.
    if simulator == "aer":
        from qiskit_aer.primitives import EstimatorV2 as AerEstimator

        estimator = AerEstimator(options={"backend_options": {"method": "statevector", "max_parallel_threads": 1}})
    else:
        estimator = StatevectorEstimator()
    qnn = EstimatorQNN(circuit=qc, observables=SparsePauliOp("ZZZZ"), input_params=list(params), weight_params=[],
                       estimator=estimator, input_gradients=True, default_precision=0.0)
    empty = np.zeros(0)

    def gradient():
        grad_inputs, _ = qnn.backward(angles[:gradient_rows], empty)  # (rows, 1, 92), no weights
        return (weights[:gradient_rows, None, None] * grad_inputs).sum(1)

    return {"values": qnn.forward(angles[:N_CHECKED], empty)[:, 0],
            "gradients": (weights[:N_CHECKED, None] * qnn.backward(angles[:N_CHECKED], empty)[0][:, 0]),
            "forward_10_s": median_s(lambda: qnn.forward(angles[:10], empty)),
            "forward_1000_s": median_s(lambda: qnn.forward(angles, empty), budget_s=0, min_calls=1),
            "gradient_1000_s": median_s(gradient, budget_s=0, min_calls=1) * len(angles) / gradient_rows}


def reference_statevector():
    """tools/reference_statevector.py, imported from this checkout whatever the working directory."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    from tools import reference_statevector

    return reference_statevector


def time_reference(angles: np.ndarray, weights: np.ndarray) -> dict[str, float]:
    """The hand-written reference policy: the same circuit with random weights on random observations
    (its gate angles differ from ``angles``, its cost does not), and a REINFORCE-weighted gradient."""
    rs = reference_statevector()
    policy = rs.ReferencePolicy(rs.Layout(N_QUBITS, N_LAYERS, N_QUBITS, ((1.0, (0, 1, 2, 3)), (-1.0, (0, 1, 2, 3)))), scan=False)
    rng = np.random.default_rng(1)
    params = {"theta": rng.uniform(0, np.pi, (N_LAYERS + 1, N_QUBITS, 3)), "input_scaling": np.ones((N_LAYERS, N_QUBITS)),
              "output_weights": np.ones(2)}
    obs = rng.normal(size=(len(angles), N_QUBITS))
    actions = rng.integers(0, 2, len(angles))
    return {"forward_10_s": median_s(lambda: policy.forward(params, obs[:10])),
            "forward_1000_s": median_s(lambda: policy.forward(params, obs)),
            "gradient_1000_s": median_s(lambda: policy.loss_and_grad(params, obs, actions, weights, 10))}


def reference_values(angles: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """<Z0Z1Z2Z3> and d(w_b <O>_b)/d(angles_b) of the checked rows by the hand-written jax state
    vector, one row at a time: its encoding angle e[l, q] = lambda[l, q] * s_q is the row's
    encoding angle with lambda = that angle and the observation at its input scale (s = 1)."""
    import jax
    import jax.numpy as jnp

    rs = reference_statevector()
    layout = rs.Layout(N_QUBITS, N_LAYERS, N_QUBITS, ((1.0, (0, 1, 2, 3)),))
    obs = jnp.asarray([rs.INPUT_SCALE])

    def value(row):
        theta = row[:N_THETA].reshape(N_LAYERS + 1, N_QUBITS, 3)
        encoding = row[N_THETA:].reshape(N_LAYERS, N_QUBITS)
        return rs.expectations(layout, theta, encoding, obs, scan=False)[0, 0]

    rows = [jnp.asarray(row) for row in angles[:N_CHECKED]]
    values = np.array([float(value(row)) for row in rows])
    gradients = np.stack([w * np.asarray(jax.grad(value)(row)) for w, row in zip(weights, rows)])
    return values, gradients


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stacks", nargs="+", choices=("tfq", "qiskit", "qiskit-aer", "reference"),
                        default=["tfq", "qiskit", "qiskit-aer", "reference"])
    parser.add_argument("--qiskit-gradient-rows", type=int, default=10, help="rows whose parameter-shift gradient is timed")
    parser.add_argument("--value-tolerance", type=float, default=1e-5,
                        help="largest allowed difference from the reference's <Z0Z1Z2Z3> (TFQ computes in float32)")
    parser.add_argument("--gradient-tolerance", type=float, default=1e-4,
                        help="largest allowed difference from the reference's gradient (float32 adjoint over 92 angles)")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    angles = rng.uniform(0, 2 * np.pi, (1000, N_ANGLES))
    weights = rng.normal(size=1000)
    results = {}
    for stack in args.stacks:
        try:
            if stack == "tfq":
                results[stack] = time_tfq(angles, weights)
            elif stack == "qiskit":
                results[stack] = time_qiskit(angles, weights, args.qiskit_gradient_rows)
            elif stack == "qiskit-aer":
                results[stack] = time_qiskit(angles, weights, args.qiskit_gradient_rows, simulator="aer")
            else:
                results[stack] = time_reference(angles, weights)
        except ImportError as exc:
            print(f"{stack}: not installed here ({exc.name}); skipped", file=sys.stderr)
    expected_values, expected_gradients = reference_values(angles, weights)
    print(f"reference <Z0Z1Z2Z3>, rows 0-{N_CHECKED - 1}: " + " ".join(f"{v:+.8f}" for v in expected_values))
    agree = True
    for stack, result in results.items():
        if "values" not in result:
            continue
        dv = float(np.max(np.abs(result["values"] - expected_values)))
        dg = float(np.max(np.abs(result["gradients"] - expected_gradients)))
        ok = dv < args.value_tolerance and dg < args.gradient_tolerance
        agree &= ok
        print(f"{stack}: max |value - reference| {dv:.2e}, max |gradient - reference| {dg:.2e} on rows 0-{N_CHECKED - 1}"
              + ("" if ok else f"  DISAGREES (tolerances {args.value_tolerance:g}, {args.gradient_tolerance:g})"))
    limit = results.get("reference")
    print(f"python {sys.version.split()[0]}, {versions()}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    print("| median, ms (x the reference's in this process) | forward, batch 10 | forward, batch 1000 | gradient, 1000 rows |")
    print("|---|---|---|---|")
    for stack, times in results.items():
        cells = []
        for key in ("forward_10_s", "forward_1000_s", "gradient_1000_s"):
            cell = f"{figure(1e3 * times[key])} ms"
            if limit and stack != "reference":
                cell += f" (x{figure(times[key] / limit[key])})"
            cells.append(cell)
        print(f"| {stack} | " + " | ".join(cells) + " |")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
