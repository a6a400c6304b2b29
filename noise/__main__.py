"""``python -m noise``: look at the qubit tasks of a config.

    python -m noise quantiles [CONFIG]        rate and pi-pulse infidelity quantiles of each distinct
                                              task distribution (default: the built-in defaults)
    python -m noise fidelity CONFIG --pulse pi|FILE.npy --tasks N --seed S [--simulation NAME]
                                              [--experiment NAME] [--target GATE]
                                              one JSON object per task: the task, its rates, the
                                              pulse's fidelity (and its standard error)

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

from config_schema import ConfigError, ExperimentConfig, load_config
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
        experiments = [ExperimentConfig.model_validate({"name": "defaults", "task": "qubit_meta", "backend": "classical", "gradient": "backprop"})]
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
        steps = noise.time_steps
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
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "quantiles":
            cmd_quantiles(args)
        else:
            cmd_fidelity(args)
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
