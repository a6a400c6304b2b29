"""Traced functions kept on disk (jit_export): a second process loads the trace instead of tracing,
and gets the same numbers; a changed definition, shape or a damaged file never reuses a trace."""

import logging

import numpy as np
import pytest

pytest.importorskip("flatbuffers", reason="jax.export serialisation needs flatbuffers (requirements.txt)")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jit_export  # noqa: E402
from jit_export import ExportedFunction  # noqa: E402

jax.config.update("jax_enable_x64", True)


def traced_counter():
    calls = []

    def f(x, v):
        calls.append(x.shape)  # runs once per trace, never when a loaded export is called
        return jnp.sin(x) @ jnp.arange(1.0, x.shape[1] + 1) * v[:, 0]

    return jax.jit(f), calls


def test_second_instance_loads_the_trace_and_gives_the_same_numbers(tmp_path):
    x, v = np.linspace(0, 1, 12).reshape(4, 3), np.ones((4, 1))
    jitted, calls = traced_counter()
    first = ExportedFunction(jitted, "f-v1", tmp_path)
    out1 = np.asarray(first(x, v))
    assert (first.exported, first.loaded) == (1, 0) and len(list(tmp_path.glob("*.bin"))) == 1
    np.testing.assert_allclose(out1, np.sin(x) @ np.arange(1.0, 4.0), rtol=0, atol=1e-15)

    jitted2, calls2 = traced_counter()
    second = ExportedFunction(jitted2, "f-v1", tmp_path)  # what a new process builds
    out2 = np.asarray(second(x, v))
    assert (second.exported, second.loaded) == (0, 1) and calls2 == []
    assert np.array_equal(out1, out2)
    second(x, v)
    assert second.loaded == 1  # later calls of the shape go straight to the compiled function


def test_new_shape_or_identity_traces_again(tmp_path):
    x, v = np.ones((4, 3)), np.ones((4, 1))
    ExportedFunction(traced_counter()[0], "f-v1", tmp_path)(x, v)
    other_shape = ExportedFunction(traced_counter()[0], "f-v1", tmp_path)
    other_shape(np.ones((8, 3)), np.ones((8, 1)))
    changed = ExportedFunction(traced_counter()[0], "f-v2", tmp_path)
    changed(x, v)
    assert (other_shape.exported, changed.exported) == (1, 1) and (other_shape.loaded, changed.loaded) == (0, 0)
    assert len(list(tmp_path.glob("*.bin"))) == 3


def test_damaged_file_is_reported_and_replaced(tmp_path, caplog):
    x, v = np.ones((2, 3)), np.ones((2, 1))
    fn = ExportedFunction(traced_counter()[0], "f-v1", tmp_path)
    expected = np.asarray(fn(x, v))
    (path,) = tmp_path.glob("*.bin")
    path.write_bytes(b"\x00\x01 not a serialisation")
    again = ExportedFunction(traced_counter()[0], "f-v1", tmp_path)
    with caplog.at_level(logging.WARNING, logger="jit_export"):
        assert np.array_equal(np.asarray(again(x, v)), expected)
    assert "unreadable exported trace" in caplog.text and (again.exported, again.loaded) == (1, 0)
    assert ExportedFunction(traced_counter()[0], "f-v1", tmp_path)(x, v) is not None


def test_without_flatbuffers_every_process_traces(tmp_path, monkeypatch):
    monkeypatch.setattr(jit_export, "serialisation_available", lambda: False)
    jitted, calls = traced_counter()
    fn = ExportedFunction(jitted, "f-v1", tmp_path)
    fn(np.ones((2, 3)), np.ones((2, 1)))
    assert calls == [(2, 3)] and not list(tmp_path.iterdir()) and (fn.exported, fn.loaded) == (0, 0)


@pytest.mark.parametrize("backend", ["tensorcircuit", "pennylane"])
def test_circuits_load_their_traces_in_a_new_instance(tmp_path, monkeypatch, request, backend):
    """A circuit backend built again (as in the next run of a sweep) loads both traced functions;
    outputs and gradients equal the first instance's to the bit."""
    import torch

    import models

    monkeypatch.setenv("QMLBENCH_JAX_CACHE", str(tmp_path))
    # The backends point jax's process-wide compilation cache at $QMLBENCH_JAX_CACHE: point it back after the test.
    previous = jax.config.jax_compilation_cache_dir
    request.addfinalizer(lambda: jax.config.update("jax_compilation_cache_dir", previous))
    spec = models.CircuitSpec(2, 2, 4, ((1.0, (0, 1)), (-1.0, (0, 1))))
    cls = models.TensorCircuitCircuit if backend == "tensorcircuit" else models.PennyLaneJaxCircuit
    angles = torch.linspace(-1, 1, 3 * spec.n_gate_angles, dtype=torch.float64).reshape(3, -1)

    def run(circuit):
        a = angles.clone().requires_grad_(True)
        out = circuit(a)  # values and Jacobians in one traced function
        (g,) = torch.autograd.grad(out.sum(), a)
        with torch.no_grad():
            plain = circuit(angles, update=True)  # the forward-only traced function
        torch.testing.assert_close(plain, out.detach(), atol=1e-12, rtol=0)
        return out.detach(), g

    first = cls(spec)
    out1, g1 = run(first)
    second = cls(spec)
    out2, g2 = run(second)
    assert first._jit_forward.exported == 1 and first._jit_value_and_jacobian.exported == 1
    assert (second._jit_forward.loaded, second._jit_value_and_jacobian.loaded) == (1, 1)
    assert (second._jit_forward.exported, second._jit_value_and_jacobian.exported) == (0, 0)
    assert torch.equal(out1, out2) and torch.equal(g1, g2)


def test_each_platform_has_its_own_trace(tmp_path):
    """A GPU run and a CPU run of one shape never share a trace: jax.export lowers for one platform
    (exporting for CUDA needs no GPU, so this runs here)."""
    from jax import export

    x, v = np.ones((2, 3)), np.ones((2, 1))
    fn = ExportedFunction(traced_counter()[0], "f-v1", tmp_path)
    assert fn.key((x, v), "cpu") != fn.key((x, v), "cuda")
    fn(x, v)
    fn._function_for((x, v), "cuda")
    platforms = sorted(export.deserialize(bytearray(p.read_bytes())).platforms for p in tmp_path.glob("*.bin"))
    assert platforms == [("cpu",), ("cuda",)] and fn.exported == 2
