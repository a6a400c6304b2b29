"""``python -m noise``: look at the qubit tasks of a config.

    python -m noise quantiles [CONFIG]        rate and pi-pulse infidelity quantiles of each distinct
                                              task distribution (default: the built-in defaults)
    python -m noise fidelity CONFIG --pulse pi|FILE.npy --tasks N --seed S [--simulation NAME]
                                              [--experiment NAME] [--target GATE]
                                              one JSON object per task: the task, its rates, the
                                              pulse's fidelity (and its standard error)
    python -m noise shapes [--gamma-phi G] [--alpha A] [--omega-c W] [--out DIR]
                                              a 1/f and a Lorentzian task with the same Ramsey
                                              gamma_phi: each task's optimal X pulse, evaluated on
                                              both tasks under every model (table, pulses.png, .npy)

A pulse is an (n_segments, 2) array of amplitudes (u_x, u_y) in 1/T over the gate time T = 1;
``pi`` is the constant u_x = pi (an X gate without noise). Bad input is one line on stderr and
exit code 2. The numbers in the README's task-range table come from ``quantiles``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np
import torch

from config_schema import ConfigError, ExperimentConfig, load_config, parse_experiment
from noise.models import SIMULATIONS, check_drive, min_time_steps

QUANTILES = (0.01, 0.1, 0.5, 0.9, 0.99)


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit code 2."""


def quantile_table(exp: ExperimentConfig, n: int = 20000, seed: int = 0, simulation: str = "markovian",
                   chunk: int = 256) -> list[tuple[str, np.ndarray]]:
    """Quantiles over ``n`` tasks of the rates and of the pi pulse's infidelity under ``simulation``."""
    from meta.train import task_factory

    factory = task_factory(exp, simulation)
    rng = np.random.default_rng(seed)
    params = factory.distribution.sample(n, rng)
    rates = factory.converter.rates(params)
    controls = torch.zeros(1, exp.meta.n_segments, 2, dtype=torch.float64)
    controls[..., 0] = math.pi
    infidelity = []
    with torch.no_grad():
        for start in range(0, n, chunk):  # trajectories hold (tasks, K, steps, 3) numbers: keep batches small
            tasks = factory.make(params[start : start + chunk], rng.spawn(1)[0])
            infidelity.append(1 - tasks.fidelity(controls.expand(len(tasks), -1, -1)).cpu().numpy())
    return [("gamma_phi (Ramsey, 1/T)", np.quantile(rates.gamma_phi, QUANTILES)),
            ("Gamma_down = Gamma_up (1/T)", np.quantile(rates.gamma_down, QUANTILES)),
            (f"pi-pulse infidelity (X, {simulation})", np.quantile(np.concatenate(infidelity), QUANTILES))]


def qubit_experiments(path: str) -> list[ExperimentConfig]:
    experiments = [e for e in load_config(path).experiments if e.task == "qubit_meta"]
    if not experiments:
        raise UsageError(f"{path}: no experiment with task: qubit_meta")
    return experiments


def cmd_quantiles(args) -> None:
    if args.config:
        experiments = qubit_experiments(args.config)
    else:
        experiments = [parse_experiment({"name": "defaults", "task": "qubit_meta", "backend": "classical", "gradient": "backprop"})]
    groups: dict[str, list[ExperimentConfig]] = {}
    for exp in experiments:  # experiments that share a task distribution share one table
        key = json.dumps([exp.meta.noise.model_dump(), exp.meta.n_segments], sort_keys=True)
        groups.setdefault(key, []).append(exp)
    for group in groups.values():
        exp = group[0]
        noise = exp.meta.noise
        names = ", ".join(e.name for e in group)
        print(f"\n{names}: {noise.dist_type} {dict(noise.ranges)} models {list(noise.model_types)}, range_scale {noise.range_scale}")
        print("| quantity | " + " | ".join(f"{int(q * 100)} %" for q in QUANTILES) + " |")
        print("|---|" + "---|" * len(QUANTILES))
        rows = quantile_table(exp, n=args.tasks, seed=args.seed)
        if args.simulation and args.simulation != "markovian":
            rows += quantile_table(exp, n=args.tasks, seed=args.seed, simulation=args.simulation)[2:]
        for name, values in rows:
            print(f"| {name} | " + " | ".join(f"{v:.2g}" for v in values) + " |")


def load_pulse(spec: str, n_segments: int) -> torch.Tensor:
    if spec == "pi":
        pulse = np.zeros((n_segments, 2))
        pulse[:, 0] = math.pi
        return torch.as_tensor(pulse, dtype=torch.float64)
    try:
        pulse = np.load(spec, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--pulse {spec!r}: cannot read a .npy array ({exc}); allowed: pi or FILE.npy") from None
    if pulse.ndim != 2 or pulse.shape[1] != 2 or pulse.shape[0] < 1 or not np.issubdtype(pulse.dtype, np.number):
        raise UsageError(f"--pulse {spec!r}: need an (n_segments, 2) numeric array of (u_x, u_y), got shape {pulse.shape}")
    if not np.isfinite(pulse).all():
        raise UsageError(f"--pulse {spec!r}: contains non-finite amplitudes")
    return torch.as_tensor(pulse.astype(np.float64))


def cmd_fidelity(args) -> None:
    from meta.train import simulation_device, task_factory

    experiments = qubit_experiments(args.config)
    if args.experiment:
        chosen = [e for e in experiments if e.name == args.experiment]
        if not chosen:
            raise UsageError(f"--experiment {args.experiment!r}: no such qubit_meta experiment; allowed: {', '.join(e.name for e in experiments)}")
        exp = chosen[0]
    else:
        exp = experiments[0]
    meta = exp.meta
    pulse = load_pulse(args.pulse, meta.n_segments)
    n_segments = pulse.shape[0]
    amplitude = float(torch.linalg.vector_norm(pulse, dim=1).max()) / math.sqrt(2)  # as a per-component bound
    try:
        check_drive(meta.noise.omega0, amplitude)
    except ValueError as exc:
        raise UsageError(f"--pulse {args.pulse!r}: {exc}") from None
    simulation = args.simulation or meta.noise.simulation
    noise = meta.noise.model_copy(update={"simulation": simulation})
    if simulation != "markovian":
        steps = meta.fine_steps
        if steps % n_segments:
            steps = n_segments * math.ceil(steps / n_segments)
        need = min_time_steps(max(amplitude, 1e-12), noise.omega_c_high())
        if steps < need:
            steps = n_segments * math.ceil(need / n_segments)
        noise = noise.model_copy(update={"time_steps": steps})
    exp = exp.model_copy(update={"meta": meta.model_copy(update={"noise": noise})})
    if args.target:
        exp = exp.model_copy(update={"meta": exp.meta.model_copy(update={"target_gate": args.target})})
    factory = task_factory(exp, device=simulation_device(exp))
    tasks = factory.sample(args.tasks, np.random.default_rng(args.seed))
    controls = pulse.expand(len(tasks), -1, -1)
    with torch.no_grad():
        fidelity = tasks.fidelity(controls).cpu().numpy()
    diag = tasks.diagnostics(controls)
    for i, task in enumerate(tasks.tasks):
        record = {
            "task": i, "model_type": task.model_type, "alpha": task.alpha, "A": task.A, "omega_c": task.omega_c,
            "detuning": task.detuning, "gamma_phi": float(tasks.gamma_phi[i]), "gamma_down": float(tasks.gamma_down[i]),
            "gamma_up": float(tasks.gamma_up[i]), "simulation": simulation, "target": exp.meta.target_gate,
            "fidelity": float(fidelity[i]), "infidelity": float(1 - fidelity[i]),
            "stderr": float(diag["stderr"][i]) if "stderr" in diag else 0.0,
        }
        if task.model_type == "double_exp":
            record.update({"A2": task.A2, "omega_c2": task.omega_c2})
        if "noise_infidelity" in diag:
            record["noise_infidelity_first_order"] = float(diag["noise_infidelity"][i])
        print(json.dumps(record))


def cmd_shapes(args) -> None:
    """Per-task optimal pulses of two tasks that the Markovian model cannot tell apart."""
    from meta.tasks import TaskFactory
    from noise import PSDToLindblad, TaskDistribution, build_model
    from noise.psd import NoiseParameters, ramsey_gamma_phi

    if args.gamma_phi <= 0 or args.omega_c <= 0 or not 0 < args.alpha <= 3:
        raise UsageError("need --gamma-phi > 0, --omega-c > 0 and 0 < --alpha <= 3")
    unit_f = NoiseParameters(args.alpha, 1.0, args.omega_c)
    unit_l = NoiseParameters(2.0, 1.0, args.omega_c_lorentzian, "lorentzian")
    tasks = [NoiseParameters(args.alpha, args.gamma_phi / float(ramsey_gamma_phi([unit_f])[0]), args.omega_c),
             NoiseParameters(2.0, args.gamma_phi / float(ramsey_gamma_phi([unit_l])[0]), args.omega_c_lorentzian, "lorentzian")]
    n_segments, max_amplitude = 10, 2 * math.pi
    check_drive(args.omega0, max_amplitude)
    distribution = TaskDistribution("uniform", {"alpha": (0.5, 2.0), "A": (1e-3, 10.0), "omega_c": (0.01, 100.0)})
    converter = PSDToLindblad(omega0=args.omega0)

    def make(simulation: str):
        model = build_model(simulation, n_steps=100, n_trajectories=4000)
        factory = TaskFactory(distribution, converter, model, "x", "none", "average", 6, 0)
        return factory.make(tasks, np.random.default_rng(args.seed))

    train = make(args.simulation)
    gen = torch.Generator().manual_seed(args.seed)
    pi = torch.zeros(n_segments, 2, dtype=torch.float64)
    pi[:, 0] = math.pi
    optimal = torch.zeros(2, n_segments, 2, dtype=torch.float64)
    best = torch.full((2,), -1.0, dtype=torch.float64)
    starts = [pi + 0.3 * torch.randn(n_segments, 2, generator=gen, dtype=torch.float64)]
    starts += [max_amplitude * 0.6 * (2 * torch.rand(n_segments, 2, generator=gen, dtype=torch.float64) - 1) for _ in range(args.restarts - 1)]
    for b in range(2):  # each task on its own: L-BFGS (the filter-function loss is smooth and deterministic) from every start
        one = train.select([b])
        for start in starts:
            raw = torch.atanh((start / max_amplitude).clamp(-0.999, 0.999)).clone().requires_grad_(True)
            opt = torch.optim.LBFGS([raw], lr=1.0, max_iter=args.steps, line_search_fn="strong_wolfe", tolerance_grad=1e-12,
                                    tolerance_change=1e-15)

            def closure(one=one, raw=raw, opt=opt):
                opt.zero_grad()
                loss = one.query_loss((max_amplitude * torch.tanh(raw))[None]).sum()
                loss.backward()
                return loss

            opt.step(closure)
            pulse = (max_amplitude * torch.tanh(raw)).detach()
            with torch.no_grad():
                fid = one.fidelity(pulse[None])[0]
            if fid > best[b]:
                optimal[b], best[b] = pulse, fid
    pulses = {"pi pulse": pi, "optimal for 1/f task": optimal[0], "optimal for Lorentzian task": optimal[1]}
    names = ["1/f task", "Lorentzian task"]
    print(f"\nTwo tasks with the same Ramsey gamma_phi = {args.gamma_phi:g}/T (detuning 0): "
          f"1/f alpha {args.alpha:g}, omega_c {args.omega_c:g} (A {tasks[0].A:.4g}); Lorentzian omega_c {args.omega_c_lorentzian:g} "
          f"(A {tasks[1].A:.4g}). Pulses optimised under {args.simulation} (best of {args.restarts} starts x {args.steps} L-BFGS iterations, "
          f"{n_segments} segments, "
          f"|u| <= 2 pi). Infidelity 1 - F_avg:\n")
    print("| pulse | model | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for simulation in ("markovian", "filter_function", "trajectories"):
        tasks_m = make(simulation)
        for label, pulse in pulses.items():
            controls = pulse.expand(2, -1, -1)
            with torch.no_grad():
                inf = (1 - tasks_m.fidelity(controls)).numpy()
            se = tasks_m.diagnostics(controls).get("stderr")
            cells = [f"{v:.2e}" + (f" +- {e:.0e}" if se is not None else "") for v, e in zip(inf, se if se is not None else inf)]
            print(f"| {label} | {simulation} | " + " | ".join(cells) + " |")
    if args.out:
        from pathlib import Path

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for i, key in enumerate(("one_over_f", "lorentzian")):
            np.save(out / f"optimal_{key}.npy", optimal[i].numpy())
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), sharey=True)
        t = np.arange(n_segments + 1) / n_segments
        for ax, comp in zip(axes, ("u_x", "u_y")):
            for i, label in enumerate(("optimal for 1/f task", "optimal for Lorentzian task")):
                values = optimal[i][:, 0 if comp == "u_x" else 1].numpy()
                ax.step(t, np.append(values, values[-1]), where="post", label=label)
            ax.set(xlabel="t / T", ylabel=f"{comp} (1/T)", title=f"{comp}: same Ramsey gamma_phi = {args.gamma_phi:g}")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "pulses.png", dpi=110)
        print(f"\nWrote {out / 'pulses.png'} and the pulses as .npy ({n_segments}, 2) arrays (python -m noise fidelity ... --pulse FILE).")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: need a positive integer")
    return value


def seed_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"{text!r}: need an integer in [0, 2**32)")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's default prints the usage too)
        print(f"python -m noise: {message}", file=sys.stderr)
        raise SystemExit(2)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m noise", description="Inspect the noisy-qubit tasks of a config.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    q = sub.add_parser("quantiles", help="rate and pi-pulse infidelity quantiles of each task distribution")
    q.add_argument("config", nargs="?", help="sweep file (default: the built-in qubit_meta defaults)")
    q.add_argument("--tasks", type=positive_int, default=20000, help="tasks drawn (default 20000)")
    q.add_argument("--seed", type=seed_int, default=0)
    q.add_argument("--simulation", choices=SIMULATIONS, help="also the pi-pulse infidelity under this model")
    f = sub.add_parser("fidelity", help="one JSON object per task: rates and the pulse's fidelity")
    f.add_argument("config", help="sweep file with a qubit_meta experiment")
    f.add_argument("--pulse", required=True, help="pi (constant u_x = pi) or FILE.npy, an (n_segments, 2) array over T = 1")
    f.add_argument("--tasks", type=positive_int, default=10, help="tasks drawn from the experiment's distribution (default 10)")
    f.add_argument("--seed", type=seed_int, default=0, help="seed of the task draws and noise realisations (default 0)")
    f.add_argument("--simulation", choices=SIMULATIONS, help="fidelity model (default: the config's meta.noise.simulation)")
    f.add_argument("--experiment", help="which qubit_meta experiment of the config (default: the first)")
    f.add_argument("--target", choices=("identity", "x", "y", "h", "sqrt_x"), help="target gate (default: the config's)")
    sh = sub.add_parser("shapes", help="optimal pulses of a 1/f and a Lorentzian task with the same Ramsey gamma_phi")
    sh.add_argument("--gamma-phi", type=float, default=0.1, help="Ramsey dephasing rate of both tasks, 1/T (default 0.1)")
    sh.add_argument("--alpha", type=float, default=1.0, help="1/f exponent (default 1)")
    sh.add_argument("--omega-c", type=float, default=0.1, help="1/f corner frequency, 1/T (default 0.1)")
    sh.add_argument("--omega-c-lorentzian", type=float, default=5.0, help="Lorentzian corner frequency, 1/T (default 5)")
    sh.add_argument("--omega0", type=float, default=100.0, help="qubit frequency for relaxation, 1/T (default 100)")
    sh.add_argument("--simulation", choices=SIMULATIONS[:2], default="filter_function", help="model the pulses are optimised under")
    sh.add_argument("--steps", type=positive_int, default=300, help="L-BFGS iterations per task and start (default 300)")
    sh.add_argument("--restarts", type=positive_int, default=6, help="starts per task (default 6)")
    sh.add_argument("--seed", type=seed_int, default=0)
    sh.add_argument("--out", help="folder for pulses.png and the two pulses (.npy)")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    try:
        {"quantiles": cmd_quantiles, "fidelity": cmd_fidelity, "shapes": cmd_shapes}[args.command](args)
    except ConfigError as exc:
        for line in exc.lines:
            print(line, file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"python -m noise {args.command}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
