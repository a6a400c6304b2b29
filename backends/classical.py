"""The classical baseline: an MLP of the same task interface (no circuit)."""

from backends import Backend, register_backend

register_backend(Backend(
    name="classical",
    gradients=("backprop", "spsa", "finite-diff"),
    summary="torch MLP (model.hidden_sizes); the classical reference",
    circuit_factory=None,
    second_order=lambda exp: exp.gradient == "backprop",
    engine=lambda exp: "torch-real",
))
