"""The adaptation comparison (issue 16): held-out fidelity against the shots spent on each task.

``python -m meta.compare --out DIR [--iterations 300] [--seed 0]`` trains, for a single (1/f) and a
mixed (1/f + Lorentzian) task distribution (the settings of configs/meta_single.yaml and
configs/meta_mixed.yaml, classical policy), the methods

- ``maml``: task-blind start (``task_input: none``), MAML with K = 5 inner steps;
- ``maml_features``: the same with the task's true noise parameters as input (an oracle: no
  experiment measures them; shown for reference);
- ``context_mean``, ``context_attention``: pi(pulse | encoder(probe tokens)), trained with 0 steps;
- ``context_mean_k2``: the same trained for 2 measured-gradient steps after the context (MAML);

and evaluates every one on the same held-out tasks: in distribution; with stronger noise and
detuning (the gamma_phi and detuning ranges times s = 3 and 10: far out of distribution); and on a
held-out PSD model (Lorentzian, for the 1/f-trained policies). Each method after k = 0, 1, 2, 5, 10
support-loss gradient steps; the robust pulse; the per-task optimum (exact, Adam on the true
fidelity: the upper bound).

**Shots per task** (the cost axis): the context costs ``(len(probes) + 1) x states x shots`` (5
probes and the Ramsey token, x 2 x 256 = 3,072); a gradient step on the N-segment pulse costs ``2 x 2N x states x shots`` (central
differences on the 2N amplitudes, the least a black-box experiment needs for a gradient: 20,480),
although the simulation differentiates the shot-noisy support loss by autograd; the robust pulse
costs nothing, the per-task optimum is exact (not a measurement).

**Test-time Adapter** (meta/adaptation.py) on the shifted tasks (noise x 10, held-out model):
the MAML start adapted task by task, one SGD step (lr = inner_lr, gradient norm clipped to 1) per
call on the support loss, parameters kept within ``trust_region_eps`` of the start, against plain
gradient steps and no adaptation; fidelity per call, of the EMA parameters at the end, and wall
time per call.

Writes ``compare.json``, ``compare.md`` (tables) and ``fidelity_vs_shots.png`` to DIR.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from config_schema import ExperimentConfig, load_config
from meta.adaptation import AdaptationConfig, Adapter
from meta.algorithms import Losses, TaskGradients
from meta.context import context_shots_per_task, measure_tokens, with_context
from meta.tasks import QubitTasks
from meta.train import MetaResult, evaluate, model_diagnostics, task_factory
from noise.psd import TaskDistribution
from train import NullReporter, train
from utils import seed_streams

#: The comparison's own random streams (utils.seed_streams): its held-out tasks (the same for every
#: method), their context tokens, the shots of the support loss at evaluation and of the Adapter.
COMPARE_STREAMS = ("compare_tasks", "compare_tokens", "compare_shots", "compare_gradient", "compare_adapter")
K_VALUES = [0, 1, 2, 5, 10]
NOISE_SCALES = (3.0, 10.0)
ADAPTER_CALLS = 10
TRUST_REGIONS = (0.1, 1.0)

BASE = {
    "task": "qubit_meta", "backend": "classical", "gradient": "backprop", "algorithm": "maml",
    "model": {"hidden_sizes": [32, 32]},
    "meta": {
        "target_gate": "x", "n_segments": 10, "task_input": "none",
        "noise": {"dist_type": "log_uniform", "simulation": "filter_function", "time_steps": 50,
                  "ranges": {"alpha": [0.5, 2.0], "gamma_phi": [0.01, 0.2], "omega_c": [0.1, 10.0], "detuning": [-1.0, 1.0]}},
        "meta_batch_size": 8, "inner_steps": 5, "inner_lr": 0.05, "meta_lr": 0.01,
        "support": {"states": 2, "shots": 256},
        "eval": {"n_tasks": 32, "every": 50, "k_values": K_VALUES},
        "baselines": {"robust_steps": 300, "optimum_steps": 300, "lr": 0.05},
    },
}
DISTRIBUTIONS = {"single": {"model_types": ["one_over_f"]},
                 "mixed": {"model_types": ["one_over_f", "lorentzian"], "model_probs": [0.5, 0.5]}}
METHODS = {
    "maml": {},
    "maml_features": {"meta": {"task_input": "features"}},
    "context_mean": {"meta": {"context": {"encoder": "mean", "inner_steps": 0}}},
    "context_attention": {"meta": {"context": {"encoder": "attention", "fusion": "gating", "inner_steps": 0}}},
    "context_mean_k2": {"meta": {"context": {"encoder": "mean", "inner_steps": 2}}},
}


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, value in b.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def experiment_for(dist: str, method: str, iterations: int, seed: int, n_tasks: int = 32, baseline_steps: int = 300) -> ExperimentConfig:
    meta = {"iterations": iterations, "noise": DISTRIBUTIONS[dist], "eval": {"n_tasks": n_tasks},
            "baselines": {"robust_steps": baseline_steps, "optimum_steps": baseline_steps}}
    raw = _merge(_merge(BASE, {"name": f"{dist}_{method}", "seed": seed, "meta": meta}), METHODS[method])
    return load_config(raw={"experiments": [raw]}).experiments[0]


def shots_per_step(exp: ExperimentConfig) -> int:
    """Central differences on the 2N pulse amplitudes, each point measured like the support loss."""
    return 2 * 2 * exp.meta.n_segments * exp.meta.support.states * exp.meta.support.shots


def context_shots(exp: ExperimentConfig) -> int:
    ctx = exp.meta.context
    return 0 if ctx is None else context_shots_per_task(ctx, exp.meta.support.states, exp.meta.support.shots)


def scaled_distribution(dist: TaskDistribution, s: float) -> TaskDistribution:
    """gamma_phi (or A) and detuning ranges times ``s``; shapes (alpha, omega_c) unchanged."""
    ranges = dict(dist.ranges)
    for key in ("gamma_phi", "A", "detuning"):
        if key in ranges:
            lo, hi = ranges[key]
            ranges[key] = (lo * s, hi * s)
    return TaskDistribution(dist.dist_type, ranges, dist.model_types, dist.model_probs)


def heldout_sets(exp: ExperimentConfig, seed: int) -> dict[str, QubitTasks]:
    factory = task_factory(exp)
    rng = seed_streams(seed, COMPARE_STREAMS)["compare_tasks"].numpy()
    n = exp.meta.eval.n_tasks
    dist = exp.meta.noise.distribution()
    out = {"in_distribution": factory.make(dist.sample(n, rng), rng.spawn(1)[0])}
    for s in NOISE_SCALES:
        out[f"noise_x{s:g}"] = factory.make(scaled_distribution(dist, s).sample(n, rng), rng.spawn(1)[0])
    if "lorentzian" not in exp.meta.noise.model_types:
        out["heldout_lorentzian"] = factory.make(exp.meta.noise.distribution(["lorentzian"]).sample(n, rng), rng.spawn(1)[0])
    return out


def policy_tasks(result: MetaResult, tasks: QubitTasks, seed: int) -> QubitTasks:
    """The tasks with the policy's input: features or a constant (as made), or the context z."""
    exp = result.exp
    ctx = exp.meta.context
    if ctx is None:
        return tasks
    gen = seed_streams(seed, COMPARE_STREAMS)["compare_tokens"].torch()
    tokens = measure_tokens(tasks, ctx, exp.meta.n_segments, exp.meta.max_amplitude, exp.meta.support.states,
                            exp.meta.support.shots, gen)
    with torch.no_grad():
        return with_context(tasks, result.context.encoder(tokens))


def evaluate_result(result: MetaResult, sets: dict[str, QubitTasks], seed: int, baselines: bool) -> dict[str, dict]:
    exp = result.exp
    streams = seed_streams(seed, COMPARE_STREAMS)
    losses = Losses(result.policy, streams["compare_shots"].torch())
    grads = TaskGradients("backprop", streams["compare_gradient"].torch())
    out = {}
    for name, tasks in sets.items():
        common = {}
        if baselines:
            common = dict(robust=result.robust_pulse, optimum_steps=exp.meta.baselines.optimum_steps,
                          optimum_lr=exp.meta.baselines.lr, max_amplitude=exp.meta.max_amplitude)
        ev = evaluate(losses, grads, result.theta, policy_tasks(result, tasks, seed), K_VALUES, exp.meta.inner_lr, **common)
        row = {"by_k": {str(k): ev.mean(k) for k in K_VALUES}}
        diag = model_diagnostics(tasks, {"k0": ev.pulses["k0"]}, "d")
        row["ff_outside_validity_k0"] = diag.get("d/ff_outside_validity/k0")
        if ev.robust is not None:
            row["robust"] = float(ev.robust.mean())
        if ev.optimum is not None:
            row["optimum"] = float(ev.optimum.mean())
        out[name] = row
    return out


class PulseModule(nn.Module):
    """A pulse policy with one parameter vector as an ``nn.Module``: inputs (B, d) -> controls (B, N, 2)."""

    def __init__(self, policy, theta: torch.Tensor):
        super().__init__()
        self.policy = policy
        self.theta = nn.Parameter(theta.detach().clone())

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.policy.pulses(self.theta.expand(inputs.shape[0], -1), inputs)


def adapter_curve(result: MetaResult, tasks: QubitTasks, eps: float, seed: int) -> dict:
    """Adapter task by task from the meta-learned start: fidelity after each call, of the EMA at the end,
    and wall seconds per call."""
    exp = result.exp
    gen = seed_streams(seed, COMPARE_STREAMS)["compare_adapter"].torch()
    cfg = AdaptationConfig(lr=exp.meta.inner_lr, grad_clip_norm=1.0, trust_region_eps=eps, ema_decay=0.8,
                           entropy_weight=0.0, max_steps_per_call=1)
    fidelity = np.zeros((ADAPTER_CALLS + 1, len(tasks)))
    ema = np.zeros(len(tasks))
    seconds = []
    for b in range(len(tasks)):
        one = tasks.select([b])
        module = PulseModule(result.policy, result.theta)
        adapter = Adapter(module, cfg)
        batch = {"states": one.inputs, "targets": one}
        with torch.no_grad():
            fidelity[0, b] = float(one.fidelity(module(one.inputs)))
        for call in range(1, ADAPTER_CALLS + 1):
            t0 = time.perf_counter()
            adapter.adapt(lambda controls, t: t.support_loss(controls, gen).mean(), batch)
            seconds.append(time.perf_counter() - t0)
            with torch.no_grad():
                fidelity[call, b] = float(one.fidelity(module(one.inputs)))
        with torch.no_grad():
            theta_ema = adapter.ema[0]
            ema[b] = float(one.fidelity(result.policy.pulses(theta_ema[None], one.inputs)))
    return {"eps": eps, "by_call": fidelity.mean(1).tolist(), "ema_final": float(ema.mean()),
            "ms_per_call": 1000 * float(np.mean(seconds))}


def run(out: Path, iterations: int, seed: int, dists: list[str], methods: list[str], n_tasks: int = 32,
        baseline_steps: int = 300) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"iterations": iterations, "seed": seed, "k_values": K_VALUES, "results": {}, "adapter": {}}
    for dist in dists:
        for method in methods:
            exp = experiment_for(dist, method, iterations, seed, n_tasks, baseline_steps)
            t0 = time.monotonic()
            result = train(exp, seed, NullReporter())  # the task's trainer: context or gradient meta-learner
            train_s = time.monotonic() - t0
            sets = heldout_sets(exp, seed)
            rows = evaluate_result(result, sets, seed, baselines=(method == "maml"))
            report["results"][f"{dist}/{method}"] = {
                "train_s": train_s, "context_shots": context_shots(exp), "shots_per_step": shots_per_step(exp), "sets": rows}
            print(f"{dist}/{method}: trained in {train_s:.0f} s; "
                  + "; ".join(f"{n} k0 {r['by_k']['0']:.4f} k5 {r['by_k']['5']:.4f}" for n, r in rows.items()), flush=True)
            if method == "maml":
                for name in [n for n in sets if n != "in_distribution" and n != f"noise_x{NOISE_SCALES[0]:g}"]:
                    report["adapter"][f"{dist}/{name}"] = [adapter_curve(result, sets[name], eps, seed) for eps in TRUST_REGIONS]
            (out / "compare.json").write_text(json.dumps(report, indent=1))
    (out / "compare.md").write_text(markdown(report))
    figure(report).savefig(out / "fidelity_vs_shots.png", dpi=110)
    return report


def _cell(result: dict, test_set: str, key: str) -> str:
    """One table cell: a fidelity after k steps (key str(k)), ``robust`` or ``optimum``; '-' where not evaluated."""
    row = result["sets"].get(test_set)
    if row is None:
        return "-"
    value = row["by_k"].get(key, row.get(key))
    return "-" if value is None else f"{value:.4f}"


def markdown(report: dict) -> str:
    lines = []
    results = report["results"]
    set_names = sorted({s for r in results.values() for s in r["sets"]}, key=lambda s: (s != "in_distribution", s))
    for dist in sorted({key.split("/")[0] for key in results}, reverse=True):
        lines += [f"**{dist}** (mean fidelity on the held-out tasks; shots per task in brackets)", ""]
        lines.append("| method | " + " | ".join(set_names) + " |")
        lines.append("|---|" + "---|" * len(set_names))
        maml = results.get(f"{dist}/maml")
        if maml:
            lines.append("| robust pulse [0] | " + " | ".join(_cell(maml, s, "robust") for s in set_names) + " |")
        for key, r in results.items():
            if not key.startswith(dist + "/"):
                continue
            method = key.split("/")[1]
            for k in (0, 2, 5):
                shots = r["context_shots"] + k * r["shots_per_step"]
                cells = [_cell(r, s, str(k)) for s in set_names]
                lines.append(f"| {method}, k={k} [{shots:,}] | " + " | ".join(cells) + " |")
        if maml:
            lines.append("| per-task optimum [exact] | " + " | ".join(_cell(maml, s, "optimum") for s in set_names) + " |")
            lines.append("| filter function outside validity (maml, k=0) | "
                         + " | ".join(_cell(maml, s, "ff_outside_validity_k0") for s in set_names) + " |")
        lines.append("")
    if report["adapter"]:
        lines += ["**Adapter** (MAML start, one step per call; mean fidelity)", "",
                  "| tasks | trust region | call 0 | call 1 | call 5 | call 10 | EMA at 10 | ms per call |", "|---|---|---|---|---|---|---|---|"]
        for name, curves in report["adapter"].items():
            for c in curves:
                f = c["by_call"]
                lines.append(f"| {name} | {c['eps']:g} | {f[0]:.4f} | {f[1]:.4f} | {f[5]:.4f} | {f[10]:.4f} | "
                             f"{c['ema_final']:.4f} | {c['ms_per_call']:.1f} |")
    return "\n".join(lines) + "\n"


def figure(report: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    dists = sorted({key.split("/")[0] for key in results}, reverse=True)
    set_names = sorted({s for r in results.values() for s in r["sets"]}, key=lambda s: (s != "in_distribution", s))
    fig, axes = plt.subplots(len(dists), len(set_names), figsize=(3.6 * len(set_names), 3.2 * len(dists)), squeeze=False)
    for i, dist in enumerate(dists):
        for j, name in enumerate(set_names):
            ax = axes[i, j]
            for key, r in results.items():
                if not key.startswith(dist + "/") or name not in r["sets"]:
                    continue
                by_k = {int(k): v for k, v in r["sets"][name]["by_k"].items()}
                shots = [max(r["context_shots"] + k * r["shots_per_step"], 100) for k in sorted(by_k)]
                ax.plot(shots, [by_k[k] for k in sorted(by_k)], "o-", ms=3, label=key.split("/")[1])
                if "robust" in r["sets"][name]:
                    ax.axhline(r["sets"][name]["robust"], color="grey", ls="--", lw=1, label="robust pulse")
                    ax.axhline(r["sets"][name]["optimum"], color="black", ls=":", lw=1, label="per-task optimum")
            if not ax.lines:  # this test set is not held out for this distribution
                ax.set_axis_off()
                ax.text(0.5, 0.5, f"{dist}: {name}\nnot held out here", ha="center", va="center", transform=ax.transAxes)
                continue
            ax.set_xscale("log")
            ax.set(title=f"{dist}: {name}", xlabel="shots per task (0 plotted at 100)", ylabel="held-out fidelity")
            ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=6)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", type=int, default=32, help="held-out tasks per test set")
    parser.add_argument("--baseline-steps", type=int, default=300, help="Adam steps of the robust pulse and the per-task optimum")
    parser.add_argument("--dists", nargs="+", default=list(DISTRIBUTIONS), choices=list(DISTRIBUTIONS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = parser.parse_args(argv)
    if "maml" not in args.methods:
        parser.error("--methods: 'maml' is needed (the baselines and the Adapter start from it)")
    run(args.out, args.iterations, args.seed, args.dists, args.methods, args.tasks, args.baseline_steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
