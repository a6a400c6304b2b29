"""PennyLane: default.qubit under jax.jit (interface jax, the fast path) or with torch
(interface torch: adjoint, lightning.qubit, second order)."""

from backends import Backend, register_backend


def pennylane_device_for(gradient: str, configured: str) -> str:
    """``auto``: lightning.qubit for adjoint (fast C++ adjoint), default.qubit with broadcasting otherwise."""
    if configured != "auto":
        return configured
    return "lightning.qubit" if gradient == "adjoint" else "default.qubit"


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
    # The torch interface stays on the CPU: lightning.qubit is CPU-only, and default.qubit 0.45.1
    # with CUDA tensors fails inside its batched rotations (a CPU tensor in _prepare_batched_params;
    # seen on an H200, 2026-11-26).
    engine=lambda exp: "jax" if exp.pennylane_interface == "jax" else "cpu",
))
