"""PennyLane: default.qubit under jax.jit (interface jax, the fast path) or with torch
(interface torch: adjoint, lightning.qubit, second order)."""

from backends import Backend, register_backend


def _check(exp) -> None:
    if exp.pennylane.device == "lightning.qubit" and exp.gradient == "backprop":
        raise ValueError("field 'pennylane.device': lightning.qubit cannot do backprop; allowed with backprop: auto, default.qubit")
    if exp.pennylane.interface == "jax" and (exp.gradient == "adjoint" or exp.pennylane.device == "lightning.qubit"):
        raise ValueError("field 'pennylane.interface': 'jax' runs default.qubit with backprop under jax.jit; "
                         "adjoint and lightning.qubit need interface 'torch' (or 'auto')")


register_backend(Backend(
    name="pennylane",
    gradients=("backprop", "adjoint", "parameter-shift", "spsa", "finite-diff"),
    summary="PennyLane default.qubit (jax.jit or torch) or lightning.qubit (adjoint)",
    circuit_factory="models:_pennylane_circuit",
    second_order=lambda exp: exp.gradient == "backprop" and exp.pennylane_interface != "jax",
    check=_check,
))
