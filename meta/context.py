"""Context-based adaptation on ``qubit_meta``: a policy pi(pulse | z), z = encoder(support measurements).

Adaptation without gradient steps (CAVIA / PEARL style, Zintgraf et al. 2019, Rakelly et al. 2019):
the task is identified from measurements and the policy reads the result; optionally K gradient
steps on the support loss follow, starting from that context (``meta.context.inner_steps``).

**Measurement tokens.** One token per probe pulse: a constant drive ``u_x = f_j max_amplitude``
over the gate (``meta.context.probes`` = the fractions f_j), measured exactly as the support loss
is (``support.states`` random Pauli eigenstates, ``support.shots`` shots each, against the
probe's noise-free unitary ``exp(-i f_j max_amplitude sx / 2)``). A driven qubit's dephasing
filter function peaks near its Rabi frequency (spin-locking noise spectroscopy), so the probes
sample the noise spectrum at different frequencies; the undriven probe also sees the detuning.
Token j = (f_j, 10 (1 - F_j)), F_j the measured fidelity. An average gate fidelity of a drive
about x is even in the detuning delta (the reflection z -> -z commutes with it), so these tokens
cannot tell the detuning's sign, which the best pulse needs. ``meta.context.ramsey`` (default on)
adds a Ramsey token: |+> evolves freely over the gate time and is measured in the y basis
(``states * shots`` shots); P(+i) = (1 + sin(delta T) e^{-decay}) / 2 is odd in delta; the token
is (-1, 2 P(+i) - 1). Shots spent per task for the context:
``(len(probes) + ramsey) * states * shots``.

**Encoders** (tokens (B, L, 2) -> task embedding (B, E) -> z = tanh(W e) (B, context_dim)):

- ``mean``: per-token MLP, mean over tokens (permutation invariant, PEARL-like);
- ``lstm``: an LSTM over the tokens in probe order, its last hidden state;
- ``ssm``: :class:`models.SSM` over the tokens, its last output;
- ``attention``: per-token MLP gives keys and values; the task embedding (their mean) is the
  *query* of multi-head attention over the L >= 2 tokens; ``fusion`` combines the attended vector
  c with the task embedding e: ``attention`` z <- c, ``gating`` g = sigmoid(W[e, c]),
  g e + (1 - g) c (MMAML), ``film`` (1 + gamma(e)) c + beta(e) (Perez et al. 2018).

**Training** (``meta.algorithm``): the meta-parameters (policy theta and the encoder) minimise
the exact query loss 1 - F_avg after K inner steps on the support loss, by Adam (``meta_lr``);
MAML differentiates through the inner steps, FOMAML treats them as constants; with K = 0 both
are plain end-to-end training of pi(pulse | encoder(tokens)).

**Attention statistics** (attention encoder, on the held-out tasks every ``attention_every``
iterations): per head the normalised entropy -sum a log a / log L (1 = uniform, 0 = one token),
the max weight and the most frequent argmax; the entropy broken down by noise model; heat maps
(tasks x tokens, one panel per head) as PNG artifacts.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from config_schema import ContextConfig, ExperimentConfig
from meta.algorithms import Losses, TaskGradients, adapt
from meta.policies import build_pulse_policy
from meta.tasks import QubitTasks
from meta.train import (
    SEED_STREAMS,
    MetaResult,
    evaluate,
    final_checks,
    robust_baseline,
    simulation_device,
    task_factory,
)
from models import SSM
from noise.simulator import pauli_eigenstates, state_fidelities
from utils import NonFiniteError, seed_everything, seed_streams

#: Token feature scale of the measured infidelity (infidelities are about 1e-3 to 0.2).
INFIDELITY_SCALE = 10.0
TOKEN_DIM = 2
#: A context run's random streams: those of meta/train.py (so the training and held-out tasks are
#: the same as a gradient-only run's of the same seed) and the measurement shots of the context tokens.
CONTEXT_STREAMS = (*SEED_STREAMS, "tokens", "validation_tokens", "encoder_init")


# ---------------------------------------------------------------------------------------------
# Measurement tokens


def probe_unitaries(probes: list[float], max_amplitude: float) -> torch.Tensor:
    """Noise-free unitaries (L, 2, 2) of the constant drives u_x = f max_amplitude over T = 1:
    exp(-i (u_x / 2) sx) = cos(u_x / 2) I - i sin(u_x / 2) sx."""
    angle = torch.tensor(probes, dtype=torch.float64) * max_amplitude / 2
    c, s = torch.cos(angle).to(torch.complex128), torch.sin(angle).to(torch.complex128)
    return torch.stack([torch.stack([c, -1j * s], -1), torch.stack([-1j * s, c], -1)], -2)


#: Maps |+> to |+i>: the probability of the outcome ``RAMSEY_TARGET |+>`` is P(+i), a y-basis readout.
RAMSEY_TARGET = torch.tensor([[1 - 1j, 0], [0, 1 + 1j]], dtype=torch.complex128) / math.sqrt(2)
#: First token feature of the Ramsey token (drive fractions are in [0, 1]).
RAMSEY_MARKER = -1.0


@dataclass
class ProbeMeasurements:
    """Exact outcome probabilities of every (task, probe, Pauli eigenstate), from which shots are drawn."""

    probes: list[float]
    probabilities: torch.Tensor
    """(B, L, 6): probability of the outcome ``U_j psi`` for input ``psi``, on the CPU."""
    ramsey: torch.Tensor | None = None
    """(B,): P(+i) after free evolution of |+> over the gate; None without the Ramsey token."""

    @classmethod
    def measure(cls, tasks: QubitTasks, probes: list[float], n_segments: int, max_amplitude: float,
                ramsey: bool = False) -> ProbeMeasurements:
        targets = probe_unitaries(probes, max_amplitude)
        rows = []
        ramsey_p = None
        with torch.no_grad():
            for f, target in zip(probes, targets):
                controls = torch.zeros(len(tasks), n_segments, 2, dtype=torch.float64)
                controls[:, :, 0] = f * max_amplitude
                channel = tasks.channel(controls)
                rows.append(state_fidelities(channel, pauli_eigenstates(), target.to(channel.device)).clamp(0, 1).cpu())
            if ramsey:
                channel = tasks.channel(torch.zeros(len(tasks), n_segments, 2, dtype=torch.float64))
                plus = pauli_eigenstates()[2:3]
                ramsey_p = state_fidelities(channel, plus, RAMSEY_TARGET.to(channel.device))[:, 0].clamp(0, 1).cpu()
        return cls(list(probes), torch.stack(rows, 1), ramsey_p)

    def select(self, index) -> ProbeMeasurements:
        index = torch.as_tensor(index, dtype=torch.long)
        return replace(self, probabilities=self.probabilities[index], ramsey=None if self.ramsey is None else self.ramsey[index])

    def fidelities(self, states: int, shots: int, generator: torch.Generator) -> torch.Tensor:
        """Measured fidelities (B, L): ``states`` random Pauli eigenstates per (task, probe),
        ``shots`` shots each (0: exact probabilities of the drawn states)."""
        b, n_probes, _ = self.probabilities.shape
        choice = torch.rand(b, n_probes, 6, generator=generator).argsort(-1)[..., :states]
        p = torch.gather(self.probabilities, 2, choice)
        if shots == 0:
            return p.mean(-1)
        counts = torch.binomial(torch.full_like(p, float(shots)), p, generator=generator)
        return (counts / shots).mean(-1)

    def tokens(self, states: int, shots: int, generator: torch.Generator) -> torch.Tensor:
        """(B, L, 2): (drive fraction, INFIDELITY_SCALE * measured infidelity) per probe, then the
        Ramsey token (RAMSEY_MARKER, 2 P(+i) - 1) from ``states * shots`` shots when measured."""
        infidelity = 1 - self.fidelities(states, shots, generator)
        drive = torch.tensor(self.probes, dtype=torch.float64).expand_as(infidelity)
        tokens = torch.stack([drive, INFIDELITY_SCALE * infidelity], -1)
        if self.ramsey is None:
            return tokens
        p = self.ramsey
        if shots > 0:
            n = float(states * shots)
            p = torch.binomial(torch.full_like(p, n), p, generator=generator) / n
        ramsey = torch.stack([torch.full_like(p, RAMSEY_MARKER), 2 * p - 1], -1)
        return torch.cat([tokens, ramsey[:, None]], 1)


def n_tokens(ctx: ContextConfig) -> int:
    return len(ctx.probes) + int(ctx.ramsey)


def context_shots_per_task(ctx: ContextConfig, states: int, shots: int) -> int:
    return n_tokens(ctx) * states * shots


def measure_tokens(tasks: QubitTasks, ctx: ContextConfig, n_segments: int, max_amplitude: float, states: int, shots: int,
                   generator: torch.Generator) -> torch.Tensor:
    """The context's measurement tokens (B, n_tokens, 2) for ``tasks``."""
    probes = ProbeMeasurements.measure(tasks, ctx.probes, n_segments, max_amplitude, ramsey=ctx.ramsey)
    return probes.tokens(states, shots, generator)


# ---------------------------------------------------------------------------------------------
# Encoders


def normalised_entropy(weights: torch.Tensor) -> torch.Tensor:
    """-sum a log a / log L over the last axis (L >= 2): 1 for uniform weights, 0 for one token."""
    n = weights.shape[-1]
    if n < 2:
        raise ValueError(f"attention entropy needs at least two tokens; got {n}")
    return -torch.special.xlogy(weights, weights).sum(-1) / math.log(n)


class ContextEncoder(nn.Module):
    """Measurement tokens (B, L, 2) -> context z (B, context_dim) in (-1, 1); see the module docstring.
    The attention encoder keeps its last weights (B, heads, L) in ``last_attention``."""

    def __init__(self, cfg: ContextConfig, n_tokens: int, seed: int):
        super().__init__()
        if cfg.encoder == "attention" and n_tokens < 2:
            raise ValueError(f"context encoder 'attention': needs at least two tokens; got {n_tokens}")
        self.kind, self.fusion = cfg.encoder, cfg.fusion
        e, dt = cfg.embed_dim, torch.float64
        self.last_attention: torch.Tensor | None = None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if self.kind in ("mean", "attention"):
                self.embed = nn.Sequential(nn.Linear(TOKEN_DIM, e, dtype=dt), nn.Tanh(), nn.Linear(e, e, dtype=dt))
            if self.kind == "lstm":
                self.lstm = nn.LSTM(TOKEN_DIM, e, batch_first=True, dtype=dt)
            elif self.kind == "ssm":
                self.ssm = SSM(TOKEN_DIM, hidden_dim=e, output_dim=e, state_size=e, dtype=dt, seed=seed, dt_min=0.1, dt_max=1.0)
            elif self.kind == "attention":
                self.query = nn.Linear(e, e, dtype=dt)
                self.attention = nn.MultiheadAttention(e, cfg.heads, batch_first=True, dtype=dt)
                if self.fusion == "gating":
                    self.gate = nn.Linear(2 * e, e, dtype=dt)
                elif self.fusion == "film":
                    self.film = nn.Linear(e, 2 * e, dtype=dt)
            elif self.kind != "mean":
                raise ValueError(f"context encoder {self.kind!r}; allowed: mean, lstm, ssm, attention")
            self.head = nn.Linear(e, cfg.context_dim, dtype=dt)

    def embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """The task embedding (B, E)."""
        if self.kind == "mean":
            return self.embed(tokens).mean(1)
        if self.kind == "lstm":
            _, (h, _) = self.lstm(tokens)
            return h[-1]
        if self.kind == "ssm":
            return self.ssm(tokens)[:, -1]
        keys = self.embed(tokens)  # (B, L, E)
        task = keys.mean(1)
        attended, weights = self.attention(self.query(task)[:, None], keys, keys, need_weights=True, average_attn_weights=False)
        self.last_attention = weights[:, :, 0].detach()  # (B, heads, L)
        c = attended[:, 0]
        if self.fusion == "attention":
            return c
        if self.fusion == "gating":
            g = torch.sigmoid(self.gate(torch.cat([task, c], -1)))
            return g * task + (1 - g) * c
        gamma, beta = self.film(task).chunk(2, -1)
        return (1 + gamma) * c + beta

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.head(self.embedding(tokens)))


def attention_statistics(weights: torch.Tensor, model_types: list[str]) -> dict[str, float]:
    """Per head: normalised entropy, max weight (means over tasks) and the most frequent argmax;
    the entropy (mean over heads) by noise model."""
    out: dict[str, float] = {}
    entropy = normalised_entropy(weights)  # (B, H)
    top, arg = weights.max(-1)
    for h in range(weights.shape[1]):
        out[f"attention/head{h}/entropy"] = float(entropy[:, h].mean())
        out[f"attention/head{h}/max"] = float(top[:, h].mean())
        out[f"attention/head{h}/argmax"] = float(torch.mode(arg[:, h]).values)
    types = np.array(model_types)
    for model in sorted(set(model_types)):
        mask = torch.as_tensor(types == model)
        out[f"attention/by_model/{model}/entropy"] = float(entropy[mask].mean())
    return out


# ---------------------------------------------------------------------------------------------
# Training and evaluation


def with_context(tasks: QubitTasks, z: torch.Tensor) -> QubitTasks:
    """The tasks with the policy input replaced by the context (it follows ``select``)."""
    return replace(tasks, inputs=z)


@dataclass
class ContextRun:
    """What a context run adds to :class:`meta.train.MetaResult`."""

    encoder: ContextEncoder
    shots_per_task: int
    attention: list[tuple[int, np.ndarray]] = field(default_factory=list)
    """(iteration, weights (tasks, heads, tokens)) on the held-out tasks."""
    attention_final: dict[str, float] = field(default_factory=dict)


@dataclass
class ContextResult(MetaResult):
    """A qubit_meta result whose policy reads the context; the headline is after ``context.inner_steps``."""

    context: ContextRun | None = None

    @property
    def k_post(self) -> int:
        k = self.exp.meta.context.inner_steps
        return k if k in self.final.by_k else max(self.final.by_k)

    def final_metrics(self) -> dict[str, float]:
        m = super().final_metrics()
        m["final/context_shots_per_task"] = self.context.shots_per_task
        m.update({f"final/{key}": value for key, value in self.context.attention_final.items()})
        return m

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = super().state_dict()
        out.update({f"encoder.{name}": value.detach().cpu() for name, value in self.context.encoder.state_dict().items()})
        return out

    def figures(self, title: str) -> dict:
        return {**super().figures(title), **heatmap_figures(self.context, self.final.model_types, title)}


def train_context(exp: ExperimentConfig, seed: int, reporter) -> ContextResult:
    meta, ctx = exp.meta, exp.meta.context
    assert ctx is not None
    seed_everything(seed)
    streams = seed_streams(seed, CONTEXT_STREAMS)
    device = simulation_device(exp)
    reporter.tags({"device": device, "simulation": meta.noise.simulation, "context_encoder": ctx.encoder})
    factory = task_factory(exp, device=device)
    policy = build_pulse_policy(exp, ctx.context_dim)
    encoder = ContextEncoder(ctx, n_tokens(ctx), streams["encoder_init"].int())
    losses = Losses(policy, streams["shots"].torch())
    grads = TaskGradients(exp.gradient, streams["gradient"].torch())
    token_gen = streams["tokens"].torch()
    states, shots = meta.support.states, meta.support.shots

    def measure(tasks: QubitTasks, generator: torch.Generator) -> torch.Tensor:
        return measure_tokens(tasks, ctx, meta.n_segments, meta.max_amplitude, states, shots, generator)


    train_rng = streams["train_tasks"].numpy()
    val_rng = streams["validation"].numpy()
    val_tasks = factory.sample(meta.eval.n_tasks, val_rng)
    heldout_tasks = {m: factory.make(meta.noise.distribution([m]).sample(meta.eval.n_tasks, val_rng), val_rng.spawn(1)[0])
                     for m in (meta.eval.model_types or [])}
    val_gen = streams["validation_tokens"].torch()
    val_tokens = measure(val_tasks, val_gen)
    heldout_tokens = {m: measure(t, val_gen) for m, t in heldout_tasks.items()}
    shots_per_task = context_shots_per_task(ctx, states, shots)
    n_encoder = sum(p.numel() for p in encoder.parameters())
    reporter.tags({"n_params": str(policy.n_params), "n_encoder_params": str(n_encoder),
                   "context_shots_per_task": str(shots_per_task)})

    robust, baselines_s = robust_baseline(meta, factory, train_rng, streams["robust"].torch())

    theta = nn.Parameter(policy.init_params(seed))
    params = [theta, *encoder.parameters()]
    optimizer = torch.optim.Adam(params, lr=meta.meta_lr)
    k = ctx.inner_steps
    run = ContextRun(encoder, shots_per_task)
    train_loss, validation = [], []
    grad_circuit_evals = eval_circuit_evals = loss_evaluations = 0

    def contexts(tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return encoder(tokens)

    start = time.monotonic()
    for it in range(1, meta.iterations + 1):
        evals_before, loss_evals_before = policy.circuit_evals, grads.loss_evaluations
        tasks = factory.sample(meta.meta_batch_size, train_rng)
        z = encoder(measure(tasks, token_gen))
        ctx_tasks = with_context(tasks, z)
        start_params = theta.expand(len(tasks), -1)
        if k == 0:
            phi = start_params
        elif exp.algorithm == "maml":
            phi = adapt(losses, grads, start_params, ctx_tasks, k, meta.inner_lr, create_graph=True)
        else:  # fomaml: the inner steps are constants; the query gradient at phi goes to theta
            phi = start_params + (adapt(losses, grads, start_params, ctx_tasks, k, meta.inner_lr) - start_params).detach()
        query = losses.query(phi, ctx_tasks).mean()
        if not torch.isfinite(query):
            raise NonFiniteError(f"non-finite loss at iteration {it}")
        optimizer.zero_grad()
        query.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(params, meta.max_grad_norm or float("inf")))
        if not math.isfinite(norm):
            raise NonFiniteError(f"non-finite gradient at iteration {it}")
        optimizer.step()
        train_loss.append(float(query.detach()))
        loss_evaluations += grads.loss_evaluations - loss_evals_before + len(tasks)  # the inner steps' and the query's
        metrics = {"meta/train_loss": train_loss[-1], "grad/norm": norm}
        grad_circuit_evals += policy.circuit_evals - evals_before  # every circuit of an iteration serves the gradient
        if exp.backend != "classical":
            metrics["grad/circuit_evals"] = policy.circuit_evals - evals_before
        if it % meta.eval.every == 0 or it == meta.iterations:
            eval_before = policy.circuit_evals
            ev = evaluate(losses, grads, theta, with_context(val_tasks, contexts(val_tokens)), sorted({0, k}), meta.inner_lr)
            eval_circuit_evals += policy.circuit_evals - eval_before
            validation.append((it, ev.mean(0), ev.mean(k)))
            metrics.update({"meta/val_fidelity_pre": ev.mean(0), "meta/val_fidelity_post": ev.mean(k)})
        if encoder.kind == "attention" and (it % ctx.attention_every == 0 or it == meta.iterations):
            contexts(val_tokens)
            weights = encoder.last_attention
            run.attention.append((it, weights.numpy().copy()))
            run.attention_final = attention_statistics(weights, val_tasks.model_types)
            metrics.update(run.attention_final)
        reporter.metrics(metrics, it)
        reporter.progress(it, meta.iterations, validation[-1][2] if validation else float("nan"))
    wall_s = time.monotonic() - start

    t1 = time.monotonic()
    eval_before = policy.circuit_evals
    k_values = sorted(set(meta.eval.k_values) | {0, k})
    common = dict(robust=robust, optimum_steps=meta.baselines.optimum_steps, optimum_lr=meta.baselines.lr,
                  max_amplitude=meta.max_amplitude)
    final = evaluate(losses, grads, theta, with_context(val_tasks, contexts(val_tokens)), k_values, meta.inner_lr, **common)
    heldout = {m: evaluate(losses, grads, theta, with_context(t, contexts(heldout_tokens[m])), k_values, meta.inner_lr, **common)
               for m, t in heldout_tasks.items()}
    eval_circuit_evals += policy.circuit_evals - eval_before
    for kk in k_values:
        reporter.metrics({"meta/fidelity_vs_k": final.mean(kk)}, kk)
    variance = factory.distribution.compute_variance(factory.converter, n_samples=2000, seed=seed)
    checks = final_checks(exp, factory, val_tasks, final, k, reporter, seed)
    return ContextResult(exp, theta.detach(), robust, policy, train_loss, validation, final, heldout, variance,
                         loss_evaluations, grad_circuit_evals, 0, eval_circuit_evals, wall_s, baselines_s + time.monotonic() - t1,
                         checks, context=run)


def heatmap_figures(run: ContextRun, model_types: list[str], title: str) -> dict:
    """One PNG per recorded iteration: tasks x tokens, one panel per head, rows sorted by noise model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(np.array(model_types), kind="stable")
    out = {}
    for it, weights in run.attention:
        heads = weights.shape[1]
        fig, axes = plt.subplots(1, heads, figsize=(3 + 2.5 * heads, 4), squeeze=False)
        for h, ax in enumerate(axes[0]):
            image = ax.imshow(weights[order, h], aspect="auto", vmin=0, vmax=1, cmap="viridis")
            ax.set(xlabel="token (probe)", title=f"head {h}")
            if h == 0:
                ax.set_ylabel("held-out task (sorted by noise model)")
        fig.colorbar(image, ax=axes[0].tolist(), label="attention weight")
        fig.suptitle(f"{title}: attention at iteration {it}", fontsize=9)
        out[f"attention/heatmap_it{it:06d}.png"] = fig
    return out
