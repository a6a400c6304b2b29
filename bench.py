"""Where each backend and gradient method stands, measured side by side in one process.

    python bench.py                    # every section (6 minutes on the 2-core machine before issue 17; more now)
    python bench.py --quick            # small sizes: a check that everything runs (about 3 minutes)
    python bench.py --sections forward gradient

Sections (all on the published REINFORCE policy of configs/cartpole_reinforce.yaml: 4 qubits,
5 layers, 94 parameters; the classical baseline is its MLP):

- ``forward``: one policy forward without gradient at batch 1, 10, 100, 1000, per backend x method.
- ``gradient``: one gradient step on a recorded batch of 1000 CartPole transitions (REINFORCE
  loss), with the circuits it executes.
- ``scaling``: 2 to 12 qubits at the same depth for the fastest gradient method of each quantum
  backend (fastest exact method in the gradient section), 4 layers, batch 100: the first call
  (for TensorCircuit, the XLA compilation, into an empty cache) apart from the steady state.
- ``throughput``: CartPole REINFORCE training, environment steps per second (with and without
  the compile time), per backend x method.
- ``memory``: peak RSS of a fresh process during a 500-episode reference REINFORCE run (classical
  and TensorCircuit backprop), episode 100 against episode 500.
- ``estimators``: central finite differences on classical DQN MLPs of growing width (up to the
  67k parameters of ``hidden_sizes: [256, 256]``): parameters against time and peak RSS of a
  fresh process, with the size of the P x P shift matrix one unchunked call would have built.
- ``noise`` (only when named: ``--sections noise``): the qubit fidelity models of noise/models.py,
  one fidelity evaluation with its gradient per (pulse, task), batched over tasks (markovian,
  filter_function, trajectories with 1000 trajectories), and the wall time of the meta_single
  classical MAML run (configs/meta_single.yaml) under each model (trajectories: 20 iterations and 20
  baseline steps, for its rate).
- ``control`` (only when named: ``--sections control``): continuous control on Pendulum-v1
  (configs/pendulum.yaml: SB3's SAC, TD3 and DDPG with this project's actor), environment steps
  per second of training per backend x algorithm (backprop; the circuit is the config's 3-qubit,
  3-layer QuantumSAC-style actor), with the compile time apart and the circuits per actor update.

The row ``reference / hand-written`` is the limit: the same policy as a hand-written batched jax
state vector (tools/reference_statevector.py), numpy in and numpy out, in the forward, gradient and
scaling tables; ``x limit`` is each row's time over the limit's, measured in the same process.
``pennylane`` is PennyLane on its fast path (jax interface under ``jax.jit``);
``pennylane-torch`` is the torch interface with parameter broadcasting, for comparison;
``tensorcircuit-unfused`` is TensorCircuit with one gate per rotation (``tensorcircuit.fuse_gates:
false``, the path before the fused 2x2 gates), for comparison.

Times are medians over repeated calls after one warm-up call; ``x classical`` ratios are to the
classical baseline measured in the same process. Results go to ``--out`` (bench.md, one CSV per section,
bench.png) and to one run of the MLflow experiment ``benchmarks``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import csv  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parent
REFERENCE_CONFIG = ROOT / "configs" / "cartpole_reinforce.yaml"
SECTIONS = ("forward", "gradient", "scaling", "throughput", "memory", "estimators", "noise", "control")
#: ``noise`` and ``control`` run only when named.
DEFAULT_SECTIONS = SECTIONS[:-2]
PENDULUM_CONFIG = ROOT / "configs" / "pendulum.yaml"
META_SINGLE_CONFIG = ROOT / "configs" / "meta_single.yaml"
REFERENCE = ("reference", "hand-written")
#: Backends of the benchmark that are a configured variant of a project backend.
VARIANTS = {"pennylane-torch": ("pennylane", {"pennylane": {"interface": "torch"}}),
            "tensorcircuit-unfused": ("tensorcircuit", {"tensorcircuit": {"fuse_gates": False}})}
VARIANT_METHODS = {"pennylane-torch": ("backprop", "spsa"), "tensorcircuit-unfused": ("backprop",)}
EXPERIMENT_NAME = "benchmarks"


class Sizes:
    def __init__(self, quick: bool, pairs: list[tuple[str, str]], device: str = "cpu"):
        self.pairs = pairs
        self.device = device
        self.estimator_widths = (16, 64) if quick else (16, 64, 128, 256)
        self.estimator_batch = 4 if quick else 8
        self.reference_scan = quick  # the unrolled limit compiles for longer; --quick only checks that everything runs
        self.forward_batches = (1, 10, 100) if quick else (1, 10, 100, 1000)
        self.gradient_batch = 100 if quick else 1000
        self.qubits = (2, 4) if quick else (2, 4, 6, 8, 10, 12)
        self.scaling_batch = 20 if quick else 100
        self.throughput_episodes = 10 if quick else 30
        self.control_steps = 150 if quick else 400  # Pendulum steps; updates from step 100 on
        self.memory_episodes = (20, 60) if quick else (100, 500)  # RSS compared between these episodes
        self.budget_s = 0.3 if quick else 1.0  # time spent repeating one measurement (at least 3 calls)


# ---------------------------------------------------------------------------------------------
# Measuring


def median_time(fn: Callable[[], object], budget_s: float, max_calls: int = 50) -> tuple[float, float, object]:
    """(first call s, median s of the following calls, last result): at least 3 more calls (2 when
    the first took over 5 s), more until ``budget_s`` is spent."""

    def call() -> tuple[float, object]:
        start = time.perf_counter()
        result = fn()
        return time.perf_counter() - start, result

    first, result = call()
    min_calls = 2 if first > 5.0 else 3
    times: list[float] = []
    while len(times) < min_calls or (sum(times) < budget_s and len(times) < max_calls):
        elapsed, result = call()
        times.append(elapsed)
    return first, statistics.median(times), result


def no_grad_forward(model, obs) -> None:
    import torch

    with torch.no_grad():
        model(obs)


def reference_experiment(backend: str, gradient: str, device: str = "cpu", **fields):
    """The published REINFORCE configuration on ``backend`` (or a :data:`VARIANTS` name) with ``gradient``."""
    from config_schema import load_config

    raw = yaml.safe_load(REFERENCE_CONFIG.read_text())
    project_backend, extra = VARIANTS.get(backend, (backend, {}))
    raw["experiments"] = [{"name": f"{backend}_{gradient}", "backend": project_backend, "gradient": gradient,
                           "device": device, **extra, **fields}]
    return load_config(raw=raw).experiments[0]


def all_pairs() -> list[tuple[str, str]]:
    from backends import BACKENDS

    pairs = [(b.name, g) for b in BACKENDS for g in b.gradients]
    return pairs + [(v, g) for v, methods in VARIANT_METHODS.items() for g in methods]


def placed_model(exp, seed: int = 0):
    """The experiment's model on the device it trains on (train.py's choice, CPU fallbacks included)."""
    from backends import BACKENDS
    from models import build_model

    model = build_model(exp, 4, 2, seed=seed)
    device, _ = BACKENDS.get(exp.backend).placement(exp)
    return model.to(device), device


def reference_policy(n_qubits: int = 4, n_layers: int = 5, scan: bool = False):
    """The hand-written limit for the reference REINFORCE policy (seed 0 weights) and its parameters.

    ``scan=False`` (the limit): the layers unrolled, 4.4 against 6.8-10 ms per 1000-row gradient
    here, but a longer first compile."""
    from tools.reference_statevector import ReferencePolicy, layout_of, params_of

    exp = reference_experiment("tensorcircuit", "backprop", model={"n_qubits": n_qubits, "n_layers": n_layers, "observables": "auto"})
    from models import build_model

    model = build_model(exp, 4, 2, seed=0)
    return ReferencePolicy(layout_of(model), scan=scan), params_of(model)


def reference_device() -> str:
    """Where the hand-written limit computes: jax's default device, which :func:`main` sets to the
    GPU when the models go there (``--device cuda`` and a jax that sees one), else the CPU."""
    import jax

    return "cuda" if jax.config.jax_default_device is not None and jax.config.jax_default_device.platform == "gpu" else "cpu"


def compiles_during(fn: Callable[[], object]) -> tuple[float, int]:
    """(wall s, XLA compilations) of one call of ``fn``."""
    from models import JaxCompileMonitor

    JaxCompileMonitor.install()
    before, start = JaxCompileMonitor.compiles, time.perf_counter()
    fn()
    return time.perf_counter() - start, JaxCompileMonitor.compiles - before


def recorded_batch(n_transitions: int, seed: int = 0):
    """``n_transitions`` CartPole transitions of a uniformly random policy with their REINFORCE
    targets (returns-to-go, standardised per episode): observations, actions, returns, episodes."""
    import gymnasium as gym

    from train import ENV_ID, discounted_returns
    from utils import seed_streams

    env = gym.make(ENV_ID)
    streams = seed_streams(seed, ("actions", "env"))  # gymnasium's reset(seed=s) generator is default_rng(s): not for both
    rng = streams["actions"].numpy()
    obs_all, act_all, ret_all, episodes = [], [], [], 0
    obs, _ = env.reset(seed=streams["env"].int())
    while len(obs_all) < n_transitions:
        rewards = []
        done = False
        while not done:
            action = int(rng.integers(2))
            obs_all.append(obs)
            act_all.append(action)
            obs, reward, terminated, truncated, _ = env.step(action)
            rewards.append(reward)
            done = terminated or truncated
        g = discounted_returns(np.asarray(rewards), 1.0)
        ret_all.append((g - g.mean()) / (g.std() + 1e-8))
        episodes += 1
        obs, _ = env.reset()
    env.close()
    n = n_transitions
    return np.asarray(obs_all[:n]), np.asarray(act_all[:n]), np.concatenate(ret_all)[:n], episodes


# ---------------------------------------------------------------------------------------------
# Sections


def bench_forward(sizes: Sizes, log: Callable[[str], None]) -> list[dict]:
    import torch

    obs_np, _, _, _ = recorded_batch(max(sizes.forward_batches))
    rows = []
    policy, params = reference_policy(scan=sizes.reference_scan)
    for batch in sizes.forward_batches:
        first, median, _ = median_time(partial(policy.forward, params, obs_np[:batch]), sizes.budget_s)
        rows.append({"backend": REFERENCE[0], "method": REFERENCE[1], "device": reference_device(), "batch": batch,
                     "first_s": first, "median_ms": 1e3 * median})
        log(f"forward  {'reference':13s} {'hand-written':15s} batch {batch:5d}: {1e3 * median:9.3f} ms (first call {first:.2f} s)")
    for backend, gradient in sizes.pairs:
        model, device = placed_model(reference_experiment(backend, gradient, sizes.device))
        obs = torch.as_tensor(obs_np, dtype=torch.float64, device=device)
        for batch in sizes.forward_batches:
            first, median, _ = median_time(partial(no_grad_forward, model, obs[:batch]), sizes.budget_s)
            rows.append({"backend": backend, "method": gradient, "device": device, "batch": batch, "first_s": first,
                         "median_ms": 1e3 * median})
            log(f"forward  {backend:13s} {gradient:15s} batch {batch:5d}: {1e3 * median:9.3f} ms (first call {first:.2f} s)")
    return with_limit(with_ratios(rows, key=("batch",), value="median_ms"), key=("batch",), value="median_ms")


def bench_gradient(sizes: Sizes, log: Callable[[str], None]) -> list[dict]:
    import torch

    from train import GradientStep, reinforce_loss

    obs_np, actions, returns, episodes = recorded_batch(sizes.gradient_batch)
    rows = []
    policy, params = reference_policy(scan=sizes.reference_scan)
    first, median, _ = median_time(partial(policy.loss_and_grad, params, obs_np, actions, returns, episodes), sizes.budget_s)
    rows.append({"backend": REFERENCE[0], "method": REFERENCE[1], "device": reference_device(), "batch": sizes.gradient_batch, "first_s": first,
                 "median_s": median, "circuit_evals": sizes.gradient_batch, "n_compiles": None})
    log(f"gradient {'reference':13s} {'hand-written':15s} batch {sizes.gradient_batch}: {median:8.4f} s (first call {first:.2f} s)")
    for backend, gradient in sizes.pairs:
        exp = reference_experiment(backend, gradient, sizes.device)
        model, device = placed_model(exp)
        obs = torch.as_tensor(obs_np, dtype=torch.float64, device=device)
        loss_fn = reinforce_loss(torch.as_tensor(actions, device=device), torch.as_tensor(returns, device=device), episodes)
        first, median, stats = median_time(partial(GradientStep(model, exp, seed=0), obs, loss_fn, "bench"), sizes.budget_s)
        circuit_evals = stats["circuit_evals"] if backend != "classical" else None
        rows.append({
            "backend": backend, "method": gradient, "device": device, "batch": sizes.gradient_batch, "first_s": first,
            "median_s": median, "circuit_evals": circuit_evals, "n_compiles": model.n_compiles,
        })
        log(f"gradient {backend:13s} {gradient:15s} batch {sizes.gradient_batch}: {median:8.4f} s, "
            f"{circuit_evals or '-'} circuits (first call {first:.2f} s)")
    return with_limit(with_ratios(rows, key=(), value="median_s"), key=(), value="median_s")


EXACT_METHODS = ("backprop", "adjoint", "parameter-shift")
#: A depth no other section uses: every first call of the scaling section is a cold compilation.
SCALING_LAYERS = 4


def fastest_methods(gradient_rows: list[dict], pairs: list[tuple[str, str]]) -> dict[str, str]:
    """The quantum backends' fastest exact-gradient methods in the gradient section (backprop if
    not run), for the backends among ``pairs``. SPSA is cheaper still but estimates the gradient
    from two points."""
    best: dict[str, tuple[float, str]] = {}
    for r in gradient_rows:
        if r["backend"] in ("classical", REFERENCE[0]) or r["method"] not in EXACT_METHODS:
            continue
        if r["backend"] not in best or r["median_s"] < best[r["backend"]][0]:
            best[r["backend"]] = (r["median_s"], r["method"])
    backends = [b for b in ("pennylane", "pennylane-torch", "tensorcircuit") if any(p[0] == b for p in pairs)]
    return {b: best[b][1] if b in best else "backprop" for b in backends}


def bench_scaling(sizes: Sizes, methods: dict[str, str], log: Callable[[str], None]) -> list[dict]:
    import torch

    from train import GradientStep, reinforce_loss

    obs_np, actions, returns, episodes = recorded_batch(sizes.scaling_batch)
    rows = []
    for n_qubits in sizes.qubits:
        policy, params = reference_policy(n_qubits, SCALING_LAYERS, scan=True)  # unrolled 12 qubits would compile for minutes
        first_fwd, n_fwd = compiles_during(partial(policy.forward, params, obs_np))
        _, fwd, _ = median_time(partial(policy.forward, params, obs_np), sizes.budget_s)
        step = partial(policy.loss_and_grad, params, obs_np, actions, returns, episodes)
        first_grad, n_grad = compiles_during(step)
        _, grad, _ = median_time(step, sizes.budget_s)
        rows.append({
            "backend": REFERENCE[0], "method": REFERENCE[1], "n_qubits": n_qubits, "batch": sizes.scaling_batch,
            "first_forward_s": first_fwd, "forward_ms": 1e3 * fwd, "first_gradient_s": first_grad,
            "gradient_ms": 1e3 * grad, "compile_s": first_fwd + first_grad, "n_compiles": n_fwd + n_grad,
        })
        log(f"scaling  {'reference':13s} {'hand-written':15s} {n_qubits:2d} qubits: forward {1e3 * fwd:8.2f} ms, "
            f"gradient {1e3 * grad:8.2f} ms (first calls {first_fwd:.2f} s + {first_grad:.2f} s)")
    for backend, gradient in methods.items():
        for n_qubits in sizes.qubits:
            exp = reference_experiment(backend, gradient, sizes.device,
                                       model={"n_qubits": n_qubits, "n_layers": SCALING_LAYERS, "observables": "auto"})
            model, device = placed_model(exp)
            obs = torch.as_tensor(obs_np, dtype=torch.float64, device=device)
            loss_fn = reinforce_loss(torch.as_tensor(actions, device=device), torch.as_tensor(returns, device=device), episodes)
            first_fwd, fwd, _ = median_time(partial(no_grad_forward, model, obs), sizes.budget_s)
            step = partial(GradientStep(model, exp, seed=0), obs, loss_fn, "bench")
            first_grad, grad, _ = median_time(step, sizes.budget_s)
            rows.append({
                "backend": backend, "method": gradient, "n_qubits": n_qubits, "batch": sizes.scaling_batch,
                "first_forward_s": first_fwd, "forward_ms": 1e3 * fwd, "first_gradient_s": first_grad,
                "gradient_ms": 1e3 * grad, "compile_s": model.compile_s, "n_compiles": model.n_compiles,
            })
            log(f"scaling  {backend:13s} {gradient:15s} {n_qubits:2d} qubits: forward {1e3 * fwd:8.2f} ms, "
                f"gradient {1e3 * grad:8.2f} ms (first calls {first_fwd:.2f} s + {first_grad:.2f} s)")
    return with_limit(with_limit(rows, key=("n_qubits",), value="gradient_ms", column="x_limit_gradient"),
                      key=("n_qubits",), value="forward_ms", column="x_limit_forward")


def bench_throughput(sizes: Sizes, log: Callable[[str], None]) -> list[dict]:
    from train import train

    rows = []
    for backend, gradient in sizes.pairs:
        exp = reference_experiment(backend, gradient, sizes.device, training={"episodes": sizes.throughput_episodes, "stop_avg_return": None})
        result = train(exp, seed=0)
        compile_s = result.model.compile_s or 0.0
        rows.append({
            "backend": backend, "method": gradient, "episodes": len(result.episode_returns), "env_steps": result.env_steps,
            "train_s": result.wall_s, "compile_s": compile_s, "steps_per_s": result.env_steps / result.wall_s,
            "steps_per_s_after_compile": result.env_steps / (result.wall_s - compile_s),
            "compiles_after_warmup": result.compiles_after_warmup,
        })
        log(f"training {backend:13s} {gradient:15s}: {result.env_steps} steps in {result.wall_s:.2f} s "
            f"= {result.env_steps / result.wall_s:8.1f} steps/s (compile {compile_s:.2f} s)")
    return with_ratios(rows, key=(), value="steps_per_s", inverse=True)


MEMORY_PROBE = """
import json, sys
sys.path.insert(0, {root!r})
import bench
from train import NullReporter, train

class RSS(NullReporter):
    def __init__(self):
        self.peak_mb = {{}}

    def metrics(self, values, step):
        status = open("/proc/self/status").read().split("\\n")
        self.peak_mb[step + 1] = next(int(l.split()[1]) for l in status if l.startswith("VmHWM")) / 1024

reporter = RSS()
exp = bench.reference_experiment({backend!r}, "backprop", training={{"episodes": {episodes}, "stop_avg_return": None}})
result = train(exp, 0, reporter)
print(json.dumps({{"peak_mb": reporter.peak_mb, "env_steps": result.env_steps, "train_s": result.wall_s}}))
"""


def bench_memory(sizes: Sizes, log: Callable[[str], None]) -> list[dict]:
    """Peak RSS (VmHWM) of a fresh process training the reference REINFORCE policy, read after each
    episode: the growth between the two episodes of ``sizes.memory_episodes`` (Linux only)."""
    import json
    import subprocess

    early, late = sizes.memory_episodes
    rows = []
    for backend in ("classical", "tensorcircuit"):
        if not any(b == backend for b, _ in sizes.pairs) or not Path("/proc/self/status").exists():
            continue
        code = MEMORY_PROBE.format(root=str(ROOT), backend=backend, episodes=late)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        probe = json.loads(proc.stdout.strip().splitlines()[-1])
        peak = {int(k): v for k, v in probe["peak_mb"].items()}
        at_early, at_late = peak[max(k for k in peak if k <= early)], peak[max(peak)]
        rows.append({"backend": backend, "method": "backprop", "episodes": max(peak), "env_steps": probe["env_steps"],
                     "train_s": probe["train_s"], f"peak_rss_mb_at_{early}": at_early, f"peak_rss_mb_at_{late}": at_late,
                     "growth_pct": 100 * (at_late / at_early - 1)})
        log(f"memory   {backend:13s} backprop: peak RSS {at_early:.0f} MB at episode {early}, {at_late:.0f} MB at {late} "
            f"({rows[-1]['growth_pct']:+.1f} %)")
    return rows


def with_limit(rows: list[dict], key: tuple[str, ...], value: str, column: str = "x_limit") -> list[dict]:
    """Add ``column``: value / the hand-written reference's value at the same key (2 = twice as slow as the limit)."""
    base = {tuple(r[k] for k in key): r[value] for r in rows if (r["backend"], r["method"]) == REFERENCE}
    for r in rows:
        b = base.get(tuple(r[k] for k in key))
        r[column] = None if not b else r[value] / b
    return rows


ESTIMATOR_PROBE = """
import json, sys, time
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads(1)
import bench, gradients
from train import dqn_loss
exp = bench.reference_experiment("classical", "finite-diff", algorithm="dqn", model={{"hidden_sizes": [{width}, {width}]}})
from models import build_model
model = build_model(exp, 4, 2, seed=0)
obs_np, actions, _, _ = bench.recorded_batch({batch})
obs = torch.as_tensor(obs_np)
loss = dqn_loss(torch.as_tensor(actions), torch.zeros({batch}, dtype=torch.float64))
x = model.flat_parameters()
start = time.perf_counter()
est = gradients.finite_difference(lambda p: loss(model.functional_forward(p, obs)), x, 1e-4)
elapsed = time.perf_counter() - start
status = open("/proc/self/status").read().split("\\n")
peak = next(int(l.split()[1]) for l in status if l.startswith("VmHWM")) / 1024
print(json.dumps({{"n_params": x.numel(), "seconds": elapsed, "peak_rss_mb": peak, "n_points": est.n_points}}))
"""


def bench_estimators(sizes: Sizes, log: Callable[[str], None]) -> list[dict]:
    """One central-difference gradient of a classical DQN MLP per width, each in a fresh process
    (peak RSS is the process's VmHWM; Linux only)."""
    import json
    import subprocess

    rows = []
    if not Path("/proc/self/status").exists():
        return rows
    for width in sizes.estimator_widths:
        code = ESTIMATOR_PROBE.format(root=str(ROOT), width=width, batch=sizes.estimator_batch)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        probe = json.loads(proc.stdout.strip().splitlines()[-1])
        p = probe["n_params"]
        rows.append({"backend": "classical", "method": "finite-diff", "hidden": f"[{width}, {width}]", "n_params": p,
                     "batch": sizes.estimator_batch, "n_points": probe["n_points"], "seconds": probe["seconds"],
                     "peak_rss_mb": probe["peak_rss_mb"], "unchunked_shift_gb": p * p * 8 / 1e9})
        log(f"estimate classical finite-diff {p:6d} parameters: {probe['seconds']:7.2f} s, peak RSS {probe['peak_rss_mb']:.0f} MB "
            f"(one unchunked call: a {rows[-1]['unchunked_shift_gb']:.1f} GB P x P shift matrix)")
    return rows


def bench_noise(sizes: Sizes, log: Callable[[str], None]) -> list[dict]:
    """Per (pulse, task): one fidelity + gradient of a batch of random pulses on tasks of meta_single,
    divided by the batch; then the meta_single classical MAML run (iterations scaled down by --quick)."""
    import torch

    from config_schema import load_config
    from meta.train import task_factory, train_meta
    from noise.simulator import average_gate_fidelity

    exp = load_config(META_SINGLE_CONFIG, only=["classical_maml"]).experiments[0]
    rows = []
    cases = [("markovian", 50, 0, 256), ("filter_function", 50, 0, 256), ("filter_function", 100, 0, 256),
             ("trajectories", 50, 1000, 8), ("trajectories", 100, 1000, 8)]
    for simulation, steps, trajectories, batch in cases:
        noise = exp.meta.noise.model_copy(update={"time_steps": steps, "trajectories": max(trajectories, 64)})
        factory = task_factory(exp.model_copy(update={"meta": exp.meta.model_copy(update={"noise": noise})}), simulation)
        tasks = factory.sample(batch, np.random.default_rng(0))
        gen = torch.Generator().manual_seed(0)
        controls = (exp.meta.max_amplitude * (2 * torch.rand(batch, exp.meta.n_segments, 2, generator=gen, dtype=torch.float64) - 1))

        def step(tasks=tasks, controls=controls):
            c = controls.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(average_gate_fidelity(tasks.channel(c), tasks.target).sum(), c)
            return g

        _, median, _ = median_time(step, sizes.budget_s)
        per = 1e3 * median / batch
        rows.append({"kind": "fidelity+gradient", "simulation": simulation, "time_steps": steps if simulation != "markovian" else None,
                     "trajectories": trajectories or None, "batch": batch, "ms_per_pulse_task": per, "wall_s": None,
                     "fidelity_post": None, "baseline_steps": None, "train_s_per_iteration": None})
        log(f"noise    {simulation:15s} steps {steps:3d} trajectories {trajectories:4d} batch {batch:3d}: {per:8.3f} ms per (pulse, task)")

    class Quiet:
        def metrics(self, values, step):
            pass

        def tags(self, values):
            pass

        def progress(self, step, total, value):
            pass

    for simulation in ("markovian", "filter_function", "trajectories"):
        # trajectories: a MAML iteration takes seconds (second order through 8 x 1000 trajectories), so
        # 20 iterations and 20 baseline steps give its rate; the others run the config as shipped
        iterations = 20 if simulation == "trajectories" else 30 if sizes.budget_s < 1 else exp.meta.iterations
        baselines = exp.meta.baselines
        if simulation == "trajectories" or sizes.budget_s < 1:
            baselines = baselines.model_copy(update={"robust_steps": min(baselines.robust_steps, iterations),
                                                     "optimum_steps": min(baselines.optimum_steps, iterations)})
        meta = exp.meta.model_copy(update={"iterations": iterations, "baselines": baselines,
                                           "noise": exp.meta.noise.model_copy(update={"simulation": simulation})})
        start = time.perf_counter()
        result = train_meta(exp.model_copy(update={"meta": meta}), 0, Quiet())
        wall = time.perf_counter() - start
        rows.append({"kind": "meta_single classical_maml", "simulation": simulation, "time_steps": meta.fine_steps,
                     "trajectories": meta.noise.trajectories if simulation == "trajectories" else None, "batch": iterations,
                     "ms_per_pulse_task": None, "wall_s": wall, "fidelity_post": result.final_fidelity,
                     "baseline_steps": baselines.robust_steps, "train_s_per_iteration": result.wall_s / iterations})
        log(f"noise    meta_single classical MAML, {iterations} iterations, {simulation:15s}: {wall:7.1f} s "
            f"(held-out F after adaptation {result.final_fidelity:.4f})")
    return rows


def bench_control(sizes: Sizes, log: Callable[[str], None]) -> list[dict]:
    """configs/pendulum.yaml's actors under SB3's SAC, TD3 and DDPG: ``control_steps`` environment
    steps, 100 of them random warm-up, one update per step after that, no evaluation until the end
    (its time is excluded)."""
    from config_schema import load_config
    from train import NullReporter, train

    class EvalTime(NullReporter):
        eval_s = 0.0

        def metrics(self, values, step):
            self.eval_s += values.get("time/eval_s", 0.0)

    rows = []
    for backend, name in (("classical", None), ("tensorcircuit", "tc_sac"), ("pennylane", "pl_sac")):
        for algorithm in ("sac", "td3", "ddpg"):
            overrides = [f"control.total_steps={sizes.control_steps}", "control.learning_starts=100",
                         f"control.eval_every={10 * sizes.control_steps}", "control.checkpoint_every=null", "seeds=[0]"]
            only = f"classical_{algorithm}" if name is None else name
            if name is not None:
                overrides.append(f"algorithm={algorithm}")
            exp = load_config(PENDULUM_CONFIG, overrides=overrides, only=[only]).experiments[0]
            reporter = EvalTime()
            result = train(exp, 0, reporter)
            metrics = result.final_metrics()
            train_s = result.wall_s - reporter.eval_s
            compile_s = metrics.get("time/compile_s", 0.0)
            actor_updates = result.updates // 2 if algorithm == "td3" else result.updates
            rows.append({
                "backend": backend, "method": exp.gradient, "algorithm": algorithm, "env_steps": result.env_steps,
                "updates": result.updates, "train_s": train_s, "compile_s": compile_s,
                "steps_per_s": result.env_steps / train_s, "steps_per_s_after_compile": result.env_steps / (train_s - compile_s),
                "circuits_per_actor_update": result.grad_circuit_evals / actor_updates if actor_updates else None,
            })
            log(f"control  {backend:13s} {algorithm:4s}: {result.env_steps} steps in {train_s:.1f} s = "
                f"{rows[-1]['steps_per_s']:6.1f} steps/s ({rows[-1]['steps_per_s_after_compile']:6.1f} after {compile_s:.1f} s compile)")
    return rows


def with_ratios(rows: list[dict], key: tuple[str, ...], value: str, inverse: bool = False) -> list[dict]:
    """Add ``x_classical``: value / classical backprop's value at the same key (inverse: the other
    way round, for rates), so 10 means ten times slower than the classical baseline."""
    base = {tuple(r[k] for k in key): r[value] for r in rows if r["backend"] == "classical" and r["method"] == "backprop"}
    for r in rows:
        b = base.get(tuple(r[k] for k in key))
        r["x_classical"] = None if not b else (b / r[value] if inverse else r[value] / b)
    return rows


# ---------------------------------------------------------------------------------------------
# Reporting


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def md_table(title: str, columns: list[str], rows: list[list[str]], note: str = "") -> list[str]:
    """A section of bench.md: heading, optional note, then the table."""
    out = [f"## {title}", ""] + ([note, ""] if note else [])
    out += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return out + ["| " + " | ".join(row) + " |" for row in rows] + [""]


def markdown(results: dict[str, list[dict]], machine: dict[str, str]) -> str:
    out = ["# Benchmark", "", "Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()), ""]
    if "forward" in results:
        batches = sorted({r["batch"] for r in results["forward"]})
        by_pair: dict[tuple[str, str], dict[int, dict]] = {}
        for r in results["forward"]:
            by_pair.setdefault((r["backend"], r["method"]), {})[r["batch"]] = r
        out += md_table("Policy forward (no gradient), median ms (x limit)",
                        ["backend", "method", "device", *(f"batch {b}" for b in batches)],
                        [[backend, method, next(iter(cells.values()))["device"],
                          *(f"{fmt(cells[b]['median_ms'])} (x{fmt(cells[b]['x_limit'], 2)})" for b in batches)]
                         for (backend, method), cells in by_pair.items()],
                        note="x limit: time over the hand-written reference's at the same batch, measured in the same process.")
    if "gradient" in results:
        out += md_table(f"One gradient step on {results['gradient'][0]['batch']} recorded transitions",
                        ["backend", "method", "device", "median s", "x limit", "x classical", "circuits executed", "first call s"],
                        [[r["backend"], r["method"], r["device"], fmt(r["median_s"]), fmt(r["x_limit"], 2), fmt(r["x_classical"], 2),
                          fmt(r["circuit_evals"]), fmt(r["first_s"], 2)] for r in results["gradient"]])
    if "scaling" in results:
        out += md_table(f"Qubit scaling ({SCALING_LAYERS} layers, batch {results['scaling'][0]['batch']}, fastest exact gradient): "
                        "first call (cold compile) apart from the steady state",
                        ["backend", "method", "qubits", "first forward s", "forward ms", "x limit", "first gradient s", "gradient ms",
                         "x limit", "compiles", "compile s"],
                        [[r["backend"], r["method"], str(r["n_qubits"]), fmt(r["first_forward_s"], 2), fmt(r["forward_ms"]),
                          fmt(r["x_limit_forward"], 2), fmt(r["first_gradient_s"], 2), fmt(r["gradient_ms"]), fmt(r["x_limit_gradient"], 2),
                          fmt(r["n_compiles"]), fmt(r["compile_s"], 2)] for r in results["scaling"]],
                        note="First calls into an empty persistent cache; compile s: wall time of the calls that compiled "
                             "(XLA compilations of that shape).")
    if "throughput" in results:
        out += md_table(f"CartPole REINFORCE training throughput ({results['throughput'][0]['episodes']} episodes, seed 0)",
                        ["backend", "method", "env steps", "train s", "compile s", "steps/s", "steps/s after compile",
                         "classical / this", "compiles after warm-up"],
                        [[r["backend"], r["method"], str(r["env_steps"]), fmt(r["train_s"]), fmt(r["compile_s"], 2),
                          fmt(r["steps_per_s"]), fmt(r["steps_per_s_after_compile"]), fmt(r["x_classical"], 2),
                          fmt(r["compiles_after_warmup"])] for r in results["throughput"]],
                        note="Compile s: XLA compilations, or loads from this benchmark's own cache once an earlier section "
                             "compiled the shape.")
    if results.get("memory"):
        rows = results["memory"]
        early_key, late_key = [k for k in rows[0] if k.startswith("peak_rss_mb_at_")]
        early, late = early_key.rsplit("_", 1)[1], late_key.rsplit("_", 1)[1]
        out += md_table(f"Memory: peak RSS of a {late}-episode reference REINFORCE run, episode {early} against {late}",
                        ["backend", "method", "env steps", "train s", f"peak RSS MB at {early}", f"at {late}", "growth"],
                        [[r["backend"], r["method"], str(r["env_steps"]), fmt(r["train_s"]), f"{r[early_key]:.0f}",
                          f"{r[late_key]:.0f}", f"{r['growth_pct']:+.1f} %"] for r in rows])
    if results.get("estimators"):
        out += md_table(f"Central finite differences on classical DQN MLPs, batch {results['estimators'][0]['batch']}, one fresh process each",
                        ["hidden", "parameters", "points", "s", "peak RSS MB", "one unchunked call: P x P shift matrix GB"],
                        [[r["hidden"], str(r["n_params"]), str(r["n_points"]), fmt(r["seconds"]), f"{r['peak_rss_mb']:.0f}",
                          fmt(r["unchunked_shift_gb"], 3)] for r in results["estimators"]],
                        note="Shifted points are generated and evaluated in chunks of at most 2^22 entries (gradients.py).")
    if results.get("noise"):
        rows = results["noise"]
        out += md_table("Qubit fidelity models: one fidelity with its gradient, per (pulse, task), batched over tasks",
                        ["model", "fine steps", "trajectories", "batch", "ms per (pulse, task)"],
                        [[r["simulation"], fmt(r["time_steps"]), fmt(r["trajectories"]), str(r["batch"]), fmt(r["ms_per_pulse_task"])]
                         for r in rows if r["kind"] == "fidelity+gradient"])
        out += md_table("meta_single, classical MAML run (train_meta in this process: baselines, training, evaluation, cross-check)",
                        ["model", "iterations", "baseline steps", "wall s", "s per MAML iteration", "held-out F after adaptation"],
                        [[r["simulation"], str(r["batch"]), str(r["baseline_steps"]), fmt(r["wall_s"]), fmt(r["train_s_per_iteration"]),
                          fmt(r.get("fidelity_post"), 4)] for r in rows if r["kind"] != "fidelity+gradient"])
    if results.get("control"):
        rows = results["control"]
        out += md_table(f"Continuous control on Pendulum-v1 (configs/pendulum.yaml actors, SB3): {rows[0]['env_steps']} environment "
                        f"steps, updates from step 100 on, seed 0",
                        ["backend", "algorithm", "method", "updates", "train s", "compile s", "steps/s", "steps/s after compile",
                         "circuits per actor update"],
                        [[r["backend"], r["algorithm"], r["method"], str(r["updates"]), fmt(r["train_s"]), fmt(r["compile_s"], 2),
                          fmt(r["steps_per_s"]), fmt(r["steps_per_s_after_compile"]), fmt(r["circuits_per_actor_update"])]
                         for r in rows],
                        note="Train s excludes the final evaluation. Circuits per actor update: the batch of 256 through the "
                             "actor with autograd on (TD3 updates its actor every second step).")
    return "\n".join(out)


def figure(results: dict[str, list[dict]]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax = axes[0, 0]
    by_pair: dict[str, list[dict]] = {}
    for r in results.get("forward", []):
        by_pair.setdefault(f"{r['backend']}/{r['method']}", []).append(r)
    for label, rows in by_pair.items():
        ax.plot([r["batch"] for r in rows], [r["median_ms"] for r in rows], marker="o", lw=1.2, label=label)
    ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="ms", title="Policy forward (no gradient)")
    if by_pair:
        ax.legend(fontsize=6)
    ax = axes[0, 1]
    rows = results.get("gradient", [])
    ax.barh([f"{r['backend']}/{r['method']}" for r in rows], [r["median_s"] for r in rows], color="tab:blue")
    ax.set(xscale="log", xlabel="s", title=f"One gradient step on {rows[0]['batch'] if rows else '-'} transitions")
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    ax = axes[1, 0]
    by_backend: dict[str, list[dict]] = {}
    for r in results.get("scaling", []):
        by_backend.setdefault(f"{r['backend']}/{r['method']}", []).append(r)
    for label, rows_b in by_backend.items():
        q = [r["n_qubits"] for r in rows_b]
        line = ax.plot(q, [r["gradient_ms"] / 1e3 for r in rows_b], marker="o", label=f"{label} gradient (steady)")[0]
        ax.plot(q, [r["first_gradient_s"] + r["first_forward_s"] for r in rows_b], ls="--", marker="x",
                color=line.get_color(), label=f"{label} first calls (compile)")
    ax.set(yscale="log", xlabel="qubits", ylabel="s", title=f"Qubit scaling ({SCALING_LAYERS} layers)")
    if by_backend:
        ax.legend(fontsize=7)
    ax = axes[1, 1]
    rows = results.get("throughput", [])
    ax.barh([f"{r['backend']}/{r['method']}" for r in rows], [r["steps_per_s"] for r in rows], color="tab:green")
    ax.set(xscale="log", xlabel="environment steps / s", title="CartPole REINFORCE training throughput")
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    return fig


def machine_description(device: str = "cpu") -> dict[str, str]:
    import jax
    import torch

    from utils import select_device

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "os": platform.platform(terse=True),
        "device": select_device(device) + (f" ({torch.cuda.get_device_name(0)})" if select_device(device) == "cuda" else ""),
        "jax": f"{jax.__version__} on {reference_device()}",
        "torch": torch.__version__,
    }


def write_outputs(out: Path, results: dict[str, list[dict]], text: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "bench.md"]
    files[0].write_text(text)
    for section, rows in results.items():
        if not rows:
            continue
        path = out / f"{section}.csv"
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        files.append(path)
    fig = figure(results)
    fig.savefig(out / "bench.png", dpi=110)
    files.append(out / "bench.png")
    return files


def log_to_mlflow(tracking_uri: str, results: dict[str, list[dict]], machine: dict[str, str], args, files: list[Path]) -> str:
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

    from sweep.tracking import get_or_create_experiment, log_metrics, log_params, mlflow_client
    from utils import library_versions

    client = mlflow_client(tracking_uri)
    experiment_id = get_or_create_experiment(client, EXPERIMENT_NAME)
    name = f"bench-{time.strftime('%Y%m%d-%H%M%S')}"
    run = client.create_run(experiment_id, tags={MLFLOW_RUN_NAME: name, "kind": "benchmark"}, run_name=name)
    run_id = run.info.run_id
    params = {f"machine.{k}": v for k, v in machine.items()}
    params.update({f"version.{k}": v for k, v in library_versions().items()})
    params.update({"quick": args.quick, "sections": ",".join(args.sections), "pairs": ",".join(args.only or ["all"]),
                   "limit": args.limit or ("scan" if args.quick else "unrolled"), "budget_s": args.budget_s or (0.3 if args.quick else 1.0)})
    log_params(client, run_id, params)
    metrics: dict[str, float] = {}
    for r in results.get("forward", []):
        metrics[f"forward_ms/{r['backend']}/{r['method']}/batch_{r['batch']}"] = r["median_ms"]
    for r in results.get("gradient", []):
        metrics[f"gradient_s/{r['backend']}/{r['method']}"] = r["median_s"]
        metrics[f"gradient_circuit_evals/{r['backend']}/{r['method']}"] = r["circuit_evals"]
    for r in results.get("throughput", []):
        metrics[f"throughput_steps_per_s/{r['backend']}/{r['method']}"] = r["steps_per_s"]
    for r in results.get("memory", []):
        metrics[f"memory_growth_pct/{r['backend']}/{r['method']}"] = r["growth_pct"]
    for r in results.get("estimators", []):
        metrics[f"estimators/finite_diff_s/params_{r['n_params']}"] = r["seconds"]
        metrics[f"estimators/finite_diff_peak_rss_mb/params_{r['n_params']}"] = r["peak_rss_mb"]
    for r in results.get("control", []):
        metrics[f"control_steps_per_s/{r['backend']}/{r['algorithm']}"] = r["steps_per_s"]
    for r in results.get("noise", []):
        if r["ms_per_pulse_task"] is not None:
            metrics[f"noise_ms_per_pulse_task/{r['simulation']}/steps_{r['time_steps']}"] = r["ms_per_pulse_task"]
        else:
            metrics[f"noise_meta_single_wall_s/{r['simulation']}"] = r["wall_s"]
    log_metrics(client, run_id, metrics, 0)
    for r in results.get("scaling", []):
        prefix = f"scaling/{r['backend']}/{r['method']}"
        log_metrics(client, run_id, {f"{prefix}/gradient_ms": r["gradient_ms"], f"{prefix}/forward_ms": r["forward_ms"],
                                     f"{prefix}/first_calls_s": r["first_forward_s"] + r["first_gradient_s"]}, r["n_qubits"])
    for path in files:
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, "FINISHED")
    return run_id


def run_sections(sections: list[str], sizes: Sizes) -> tuple[dict[str, list[dict]], float]:
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    def log(line: str) -> None:
        print(line, flush=True)

    results: dict[str, list[dict]] = {}
    start = time.perf_counter()
    if "forward" in sections:
        results["forward"] = bench_forward(sizes, log)
    if "gradient" in sections:
        results["gradient"] = bench_gradient(sizes, log)
    if "scaling" in sections:
        methods = fastest_methods(results.get("gradient", []), sizes.pairs)
        if methods:
            results["scaling"] = bench_scaling(sizes, methods, log)
    if "throughput" in sections:
        results["throughput"] = bench_throughput(sizes, log)
    if "memory" in sections:
        results["memory"] = bench_memory(sizes, log)
    if "estimators" in sections:
        results["estimators"] = bench_estimators(sizes, log)
    if "noise" in sections:
        results["noise"] = bench_noise(sizes, log)
    if "control" in sections:
        results["control"] = bench_control(sizes, log)
    return results, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: a check that everything runs")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(DEFAULT_SECTIONS),
                        help=f"default: {' '.join(DEFAULT_SECTIONS)} (noise and control only when named)")
    parser.add_argument("--only", nargs="+", metavar="BACKEND/METHOD", help="measure these pairs only (default: all)")
    parser.add_argument("--out", default="bench_results", help="folder for bench.md, the CSV files and bench.png")
    parser.add_argument("--qubits", nargs="+", type=int, metavar="N", help="qubit counts of the scaling section (default 2 4 ... 12)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu",
                        help="device of the models (cuda: torch and jax on the GPU where installed; simulators that cannot go "
                             "there fall back to the CPU as in training)")
    parser.add_argument("--limit", choices=("unrolled", "scan"),
                        help="the hand-written limit's layers unrolled (the faster limit; default without --quick) or under "
                             "jax.lax.scan (compiles in a fraction of the time; default with --quick)")
    parser.add_argument("--budget-s", type=float, metavar="S",
                        help="seconds spent repeating one measurement, at least 3 calls (default 1.0, 0.3 with --quick)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from sweep.tracking import check_tracking_uri, resolve_tracking_uri

    pairs = all_pairs()
    if args.only:
        names = {f"{b}/{g}": (b, g) for b, g in pairs}
        unknown = [name for name in args.only if name not in names]
        if unknown:
            print(f"error: --only: unknown pair {unknown[0]!r}; allowed: {', '.join(names)}", file=sys.stderr)
            return 2
        pairs = [names[name] for name in args.only]

    from utils import select_device

    try:
        device = select_device(args.device)
    except RuntimeError as exc:
        print(f"error: --device: {exc}", file=sys.stderr)
        return 2
    tracking_uri = resolve_tracking_uri(args.tracking_uri, None)
    try:
        check_tracking_uri(tracking_uri)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import jax

    from utils import jax_sees_gpu

    # The limit (and every jax model: models.JaxJitCircuit places its calls itself) on the GPU
    # only when the models go there: also on a GPU machine, --device cpu measures the CPU.
    jax.config.update("jax_default_device", jax.devices("cuda" if device == "cuda" and jax_sees_gpu() else "cpu")[0])
    # Compile times are measured into an empty persistent cache, not loaded from an earlier run's.
    with tempfile.TemporaryDirectory(prefix="qmlbench-bench-jax-") as cache:
        os.environ["QMLBENCH_JAX_CACHE"] = cache
        sizes = Sizes(args.quick, pairs, args.device)
        if args.qubits:
            sizes.qubits = tuple(args.qubits)
        if args.limit:
            sizes.reference_scan = args.limit == "scan"
        if args.budget_s is not None:
            sizes.budget_s = args.budget_s
        results, total_s = run_sections(args.sections, sizes)
    machine = machine_description(args.device)
    limit = "under jax.lax.scan" if sizes.reference_scan else "unrolled"
    text = markdown(results, machine) + (f"\nThe limit's layers {limit} (forward and gradient tables; always under scan in "
                                         f"the scaling table); {sizes.budget_s:g} s per measurement.\n"
                                         f"Total benchmark time: {total_s:.0f} s.\n")
    print()
    print(text)
    files = write_outputs(Path(args.out), results, text)
    run_id = log_to_mlflow(tracking_uri, results, machine, args, files)
    print(f"Wrote {', '.join(str(f) for f in files)}; MLflow run {run_id} in experiment '{EXPERIMENT_NAME}' at {tracking_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
