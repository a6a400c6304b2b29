"""Context-based adaptation on qubit_meta (meta/context.py): the measurement tokens against the
exact fidelity and an analytic dephasing result, the encoders' symmetries, attention statistics
by hand, bad configs as one line, learning, every backend, and the run under run.py with its
attention heat maps."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import experiment
from test_run import run_py, runs_by_name

from config_schema import ConfigError, ContextConfig, load_config
from meta.context import (
    INFIDELITY_SCALE,
    ContextEncoder,
    ProbeMeasurements,
    attention_statistics,
    measure_tokens,
    normalised_entropy,
    probe_unitaries,
)
from meta.train import task_factory
from noise.simulator import average_gate_fidelity
from train import NullReporter, train

PROBES = [0.0, 0.3, 0.7, 1.0]


def _exp(backend="classical", context=None, noise=None, **meta):
    algorithm = meta.pop("algorithm", "fomaml")
    fields = {"n_segments": 4, "task_input": "none", "iterations": 20, "meta_batch_size": 8,
              "context": {"probes": PROBES, **(context or {})},
              "eval": {"n_tasks": 16, "every": 10, "k_values": [0, 1]},
              "baselines": {"robust_steps": 0, "optimum_steps": 0}, **meta}
    if noise:
        fields["noise"] = noise
    return experiment(task="qubit_meta", backend=backend, gradient="backprop", algorithm=algorithm,
                      model={"n_qubits": 2, "n_layers": 1, "hidden_sizes": [16]},
                      tensorcircuit={"math_backend": "pytorch"}, meta=fields)


def test_probe_unitaries_are_the_noise_free_drives():
    u = probe_unitaries([0.0, 1.0], math.pi)
    torch.testing.assert_close(u[0], torch.eye(2, dtype=torch.complex128))
    torch.testing.assert_close(u[1], torch.tensor([[0, -1j], [-1j, 0]], dtype=torch.complex128))  # -i X


def test_exact_tokens_are_the_probes_average_gate_infidelities():
    exp = _exp(noise={"ranges": {"alpha": [0.5, 2.0], "A": [0.03, 1.5], "omega_c": [0.1, 10.0], "detuning": [-1.0, 1.0]}})
    tasks = task_factory(exp).sample(5, np.random.default_rng(0))
    tokens = ProbeMeasurements.measure(tasks, PROBES, 4, exp.meta.max_amplitude).tokens(6, 0, torch.Generator())
    for j, (f, target) in enumerate(zip(PROBES, probe_unitaries(PROBES, exp.meta.max_amplitude))):
        controls = torch.zeros(5, 4, 2, dtype=torch.float64)
        controls[:, :, 0] = f * exp.meta.max_amplitude
        want = 1 - average_gate_fidelity(tasks.channel(controls), target)  # six Pauli eigenstates: a 3-design
        torch.testing.assert_close(tokens[:, j, 1], INFIDELITY_SCALE * want, rtol=1e-10, atol=1e-12)
        assert (tokens[:, j, 0] == f).all()
    assert (tokens[:, :, 1] > 0).all() and tokens[:, :, 1].std() > 0


def test_idle_probe_under_pure_dephasing_matches_the_analytic_fidelity():
    """No drive, no detuning, no relaxation, Lindblad dephasing gamma: F_avg = (2 + exp(-gamma T)) / 3."""
    exp = _exp(noise={"simulation": "markovian", "transverse_coupling": 0.0, "dist_type": "log_uniform",
                      "ranges": {"alpha": [0.5, 2.0], "gamma_phi": [0.01, 0.3], "omega_c": [0.1, 10.0]}})
    tasks = task_factory(exp).sample(4, np.random.default_rng(1))
    tokens = ProbeMeasurements.measure(tasks, [0.0, 1.0], 4, exp.meta.max_amplitude).tokens(6, 0, torch.Generator())
    want = 1 - (2 + torch.exp(-tasks.gamma_phi)) / 3
    torch.testing.assert_close(tokens[:, 0, 1], INFIDELITY_SCALE * want, rtol=1e-9, atol=1e-12)


def test_ramsey_token_reads_the_sign_of_the_detuning():
    """|+> idle under detuning delta and Lindblad dephasing gamma (no relaxation): <sigma_y> = sin(delta T) e^{-gamma T}."""
    exp = _exp(noise={"simulation": "markovian", "transverse_coupling": 0.0,
                      "ranges": {"alpha": [0.5, 2.0], "gamma_phi": [0.01, 0.3], "omega_c": [0.1, 10.0], "detuning": [-1.0, 1.0]}})
    tasks = task_factory(exp).sample(6, np.random.default_rng(3))
    ctx = ContextConfig(probes=[0.0])
    tokens = measure_tokens(tasks, ctx, 4, exp.meta.max_amplitude, 2, 0, torch.Generator())
    assert tokens.shape == (6, 2, 2) and (tokens[:, 1, 0] == -1).all()
    want = torch.sin(tasks.detuning) * torch.exp(-tasks.gamma_phi)
    torch.testing.assert_close(tokens[:, 1, 1], want, rtol=1e-9, atol=1e-12)
    assert (torch.sign(tokens[:, 1, 1]) == torch.sign(tasks.detuning)).all()
    # the fidelity tokens are even in the detuning: flipping its sign changes nothing
    flipped = replace(tasks, noise=replace(tasks.noise, detuning=-tasks.detuning))
    torch.testing.assert_close(measure_tokens(flipped, ctx, 4, exp.meta.max_amplitude, 2, 0, torch.Generator())[:, 0], tokens[:, 0])


def test_measured_tokens_are_unbiased_with_binomial_spread():
    exp = _exp()
    tasks = task_factory(exp).sample(2, np.random.default_rng(2))
    probes = ProbeMeasurements.measure(tasks, PROBES, 4, exp.meta.max_amplitude)
    exact = probes.fidelities(6, 0, torch.Generator())
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([probes.fidelities(6, 100, gen) for _ in range(400)])
    p = probes.probabilities
    sd = torch.sqrt((p * (1 - p)).sum(-1) / 100) / 6 / math.sqrt(400)  # standard error of the mean
    assert ((draws.mean(0) - exact).abs() < 5 * sd + 1e-12).all()
    assert (draws.std(0) > 0).any()


@pytest.mark.parametrize("kind", ["mean", "lstm", "ssm", "attention"])
def test_encoders_symmetry_and_gradients(kind):
    cfg = ContextConfig(encoder=kind, probes=PROBES, heads=2)
    enc = ContextEncoder(cfg, len(PROBES), seed=0)
    tokens = torch.randn(3, len(PROBES), 2, dtype=torch.float64)
    z = enc(tokens)
    assert z.shape == (3, cfg.context_dim) and (z.abs() < 1).all()
    permuted = enc(tokens[:, [3, 1, 0, 2]])
    if kind in ("mean", "attention"):  # mean pooling, and attention with a pooled query: set functions
        torch.testing.assert_close(permuted, z, rtol=1e-12, atol=1e-12)
    else:  # sequence models read the probes in order
        assert not torch.allclose(permuted, z, atol=1e-6)
    z.sum().backward()
    missing = [n for n, p in enc.named_parameters() if p.grad is None or not (p.grad.abs() > 0).any()]
    assert not missing, missing


@pytest.mark.parametrize("fusion", ["attention", "gating", "film"])
def test_attention_weights_are_distributions_over_the_tokens(fusion):
    enc = ContextEncoder(ContextConfig(encoder="attention", fusion=fusion, probes=PROBES, heads=4), len(PROBES), seed=1)
    enc(torch.randn(5, len(PROBES), 2, dtype=torch.float64))
    w = enc.last_attention
    assert w.shape == (5, 4, len(PROBES))
    torch.testing.assert_close(w.sum(-1), torch.ones(5, 4, dtype=torch.float64))


def test_normalised_entropy_and_statistics_by_hand():
    w = torch.tensor([[[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]],
                      [[0.5, 0.5, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4]]], dtype=torch.float64)  # (tasks, heads, tokens)
    h = normalised_entropy(w)
    skewed = -sum(a * math.log(a) for a in (0.1, 0.2, 0.3, 0.4)) / math.log(4)
    torch.testing.assert_close(h, torch.tensor([[1.0, 0.0], [0.5, skewed]], dtype=torch.float64))
    stats = attention_statistics(w, ["one_over_f", "lorentzian"])
    assert stats["attention/head0/entropy"] == pytest.approx(0.75)
    assert stats["attention/head1/max"] == pytest.approx(0.7)
    assert stats["attention/head1/argmax"] in (0.0, 3.0)
    assert stats["attention/by_model/one_over_f/entropy"] == pytest.approx(0.5)
    assert stats["attention/by_model/lorentzian/entropy"] == pytest.approx((0.5 + skewed) / 2)
    with pytest.raises(ValueError, match="two tokens"):
        normalised_entropy(torch.ones(2, 1, 1))


@pytest.mark.parametrize("meta,needle", [
    ({"context": {"encoder": "attention", "probes": [0.5], "ramsey": False}}, "'meta.context': probes: attention needs at least two tokens"),
    ({"context": {"encoder": "attention", "fusion": "bilinear"}}, "meta.context.fusion"),
    ({"context": {"encoder": "transformer"}}, "meta.context.encoder"),
    ({"context": {"encoder": "attention", "embed_dim": 10, "heads": 4}}, "'meta.context': heads: embed_dim 10 is not a multiple of 4"),
    ({"context": {"encoder": "mean"}, "task_input": "features"}, "task_input"),
])
def test_bad_context_config_is_one_line_naming_the_field(meta, needle):
    raw = {"experiments": [{"name": "x", "task": "qubit_meta", "backend": "classical", "gradient": "backprop",
                            "meta": {"task_input": "none", **meta}}]}
    with pytest.raises(ConfigError) as info:
        load_config(raw=raw)
    assert len(info.value.lines) == 1 and needle in info.value.lines[0], info.value.lines


def test_context_with_an_estimated_gradient_is_refused():
    raw = {"experiments": [{"name": "x", "task": "qubit_meta", "backend": "classical", "gradient": "spsa", "algorithm": "fomaml",
                            "meta": {"task_input": "none", "context": {"encoder": "mean"}}}]}
    with pytest.raises(ConfigError, match="meta.context"):
        load_config(raw=raw)


def test_context_training_learns_and_is_deterministic():
    exp = _exp(context={"encoder": "mean"}, iterations=30)
    first = train(exp, 0, NullReporter())
    again = train(exp, 0, NullReporter())
    assert first.train_loss == again.train_loss
    (it0, pre0, _), (_, pre_last, _) = first.validation[0], first.validation[-1]
    assert it0 == 10 and pre_last > pre0 + 0.01, first.validation
    m = first.final_metrics()
    assert m["final/context_shots_per_task"] == (len(PROBES) + 1) * 2 * 256  # the probes and the Ramsey token
    assert "encoder.head.weight" in first.state_dict()


@pytest.mark.parametrize("backend,algorithm", [("pennylane", "maml"), ("tensorcircuit", "maml"), ("tensorcircuit", "fomaml")])
def test_context_plus_steps_runs_on_circuit_policies(backend, algorithm):
    exp = _exp(backend, context={"encoder": "attention", "fusion": "film", "inner_steps": 1, "attention_every": 2},
               iterations=2, algorithm=algorithm, eval={"n_tasks": 4, "every": 2, "k_values": [0, 1]})
    result = train(exp, 0, NullReporter())
    m = result.final_metrics()
    assert 0 < m["final/fidelity_post"] <= 1 and m["final/grad_circuit_evals"] > 0
    assert 0 <= m["final/attention/head0/entropy"] <= 1
    assert [it for it, _ in result.context.attention] == [2]


def test_context_run_under_run_py_logs_attention_metrics_and_heat_maps(tmp_path):
    config = {
        "mlflow": {"experiment_name": "e2e"},
        "experiments": [{
            "name": "ctx", "task": "qubit_meta", "backend": "classical", "gradient": "backprop", "algorithm": "fomaml",
            "timeout_s": 300, "model": {"hidden_sizes": [8]},
            "meta": {"iterations": 4, "meta_batch_size": 2, "n_segments": 4, "task_input": "none",
                     "context": {"encoder": "attention", "fusion": "gating", "probes": [0.0, 0.5, 1.0], "attention_every": 2},
                     "eval": {"every": 2, "n_tasks": 3, "k_values": [0, 1], "model_types": ["lorentzian"]},
                     "noise": {"model_types": ["one_over_f", "lorentzian"],
                               "ranges": {"alpha": [0.5, 2.0], "gamma_phi": [0.01, 0.3], "omega_c": [0.1, 10.0]}},
                     "baselines": {"robust_steps": 2, "optimum_steps": 2}},
        }],
    }
    proc = run_py(tmp_path, config)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client, runs = runs_by_name(tmp_path)
    run = runs["ctx-seed0"]
    assert run.data.tags["status"] == "PASSED", run.data.tags.get("error")
    history = client.get_metric_history(run.info.run_id, "attention/head0/entropy")
    assert [h.step for h in history] == [2, 4] and all(0 <= h.value <= 1 for h in history)
    models = {k.split("/")[2] for k in run.data.metrics if k.startswith("attention/by_model/")}
    assert models <= {"one_over_f", "lorentzian"} and models
    heat = {a.path for a in client.list_artifacts(run.info.run_id, "attention")}
    assert heat == {"attention/heatmap_it000002.png", "attention/heatmap_it000004.png"}
