"""TensorCircuit-NG: jitted jax statevector (math_backend jax) or its torch backend (second order)."""

from backends import Backend, register_backend

register_backend(Backend(
    name="tensorcircuit",
    gradients=("backprop", "parameter-shift", "spsa", "finite-diff"),
    summary="TensorCircuit-NG statevector under jax.jit (or its pytorch math backend)",
    circuit_factory="models:_tensorcircuit_circuit",
    second_order=lambda exp: exp.gradient == "backprop" and exp.tensorcircuit.math_backend == "pytorch",
    engine=lambda exp: "jax" if exp.tensorcircuit.math_backend == "jax" else "torch",
))
