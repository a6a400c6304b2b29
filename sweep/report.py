"""What a sweep reports: the summary table (terminal, markdown, CSV), the headline per backend,
the comparison figures."""

from __future__ import annotations

import csv
import io

from sweep.plan import BASELINE_METRICS, PROGRESS_METRIC, RunOutcome


def log_figure(client, run_id: str, fig, artifact_file: str) -> None:
    import matplotlib.pyplot as plt

    client.log_figure(run_id, fig, artifact_file, save_kwargs={"dpi": 110})
    plt.close(fig)


BASE_COLUMNS = ("run", "backend", "gradient", "status", "wall_s")
COST_COLUMNS = ("s_per_step", "evals_per_step", "grad_circuit_evals", "total_circuit_evals")
SCORE_COLUMNS = {"cartpole": ("final_avg_return",),
                 "qubit_meta": ("heldout_fidelity", "fidelity_robust", "fidelity_optimum", "gap_to_robust")}


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None or value != value else round(value, digits)


def summary_rows(outcomes: list[RunOutcome]) -> list[dict]:
    """One row per run. ``s_per_step`` and ``evals_per_step``: wall seconds and circuit
    evaluations per episode (CartPole) or meta-iteration (qubit tasks), the cost a reader compares
    when scores are equal by design; ``heldout_fidelity``: after adaptation, on the held-out
    validation tasks (the progress display shows the periodic validation passes)."""
    rows = []
    for o in outcomes:
        seconds, evals = o.cost_per_step
        rows.append({
            "run": o.spec.name,
            "backend": o.spec.exp.backend,
            "gradient": o.spec.exp.gradient,
            "status": o.status,
            "wall_s": round(o.wall_s, 2),
            "s_per_step": _rounded(seconds, 3),
            "evals_per_step": _rounded(evals, 1),
            "final_avg_return": _rounded(o.final_avg_return, 1),
            "heldout_fidelity": _rounded(o.final_fidelity, 5),
            **{k: _rounded(o.baselines.get(k), 5) for k in BASELINE_METRICS},
            "grad_circuit_evals": o.grad_circuit_evals,
            "total_circuit_evals": o.total_circuit_evals,
        })
    return rows


def summary_columns(tasks: set[str]) -> tuple[str, ...]:
    """The score columns of the tasks present, then the cost columns."""
    scores = tuple(c for task in SCORE_COLUMNS if task in tasks for c in SCORE_COLUMNS[task])
    return BASE_COLUMNS + scores + COST_COLUMNS


def headline(outcomes: list[RunOutcome]) -> list[str]:
    """Plain-language lines for the parent run's note and the terminal: per backend the cheapest
    passed run (seconds per step) and the best score."""
    lines = []
    passed = [o for o in outcomes if o.status == "PASSED" and o.cost_per_step[0] is not None]
    scores = {_score(o) for o in passed}
    equal = len(passed) > 1 and len(scores) == 1 and None not in scores
    if equal:
        lines.append(f"every run: {_score_label(passed[0])} {_score(passed[0]):.4g} (equal by design here: compare the cost)")
    for backend in dict.fromkeys(o.spec.exp.backend for o in passed):
        mine = [o for o in passed if o.spec.exp.backend == backend]
        cheapest = min(mine, key=lambda o: o.cost_per_step[0])
        line = f"{backend}: cheapest {cheapest.spec.name} ({cheapest.cost_per_step[0]:.3g} s per step"
        if cheapest.cost_per_step[1] is not None:
            line += f", {cheapest.cost_per_step[1]:.4g} circuits per step"
        line += ")"
        scored = [o for o in mine if _score(o) is not None]
        if scored and not equal:
            best = max(scored, key=_score)
            line += f"; best {best.spec.name} ({_score_label(best)} {_score(best):.4g})"
        lines.append(line)
    return lines


def failure_lines(outcomes: list[RunOutcome]) -> list[str]:
    return [f"{o.spec.name} {o.status}: {o.error or 'no error recorded'}" for o in outcomes if o.status != "PASSED"]


def _score(o: RunOutcome) -> float | None:
    value = o.final_fidelity if o.spec.exp.task == "qubit_meta" else o.final_avg_return
    return None if value != value else value


def _score_label(o: RunOutcome) -> str:
    return "held-out fidelity" if o.spec.exp.task == "qubit_meta" else "mean return"


def summary_markdown(rows: list[dict], columns: tuple[str, ...]) -> str:
    header = "| " + " | ".join(columns) + " |"
    lines = [header, "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join("-" if r[c] is None else str(r[c]) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def summary_csv(rows: list[dict], columns: tuple[str, ...]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def print_summary(rows: list[dict], columns: tuple[str, ...], total_s: float) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Sweep summary ({total_s:.1f} s)")
    for col in columns:
        table.add_column(col, justify="right" if col not in ("run", "backend", "gradient", "status") else "left")
    for r in rows:
        table.add_row(*("-" if r[c] is None else str(r[c]) for c in columns))
    console = Console()
    if not console.is_terminal:  # a log file: whole lines, never wrapped cells
        console = Console(width=100_000)
    console.print(table)


def comparison_figure(client, outcomes: list[RunOutcome]):
    """Progress of every run (markers where a curve has few points), and what each run cost:
    wall seconds and circuit evaluations per episode or meta-iteration, coloured by status. When
    the progress curves coincide (a smoke sweep whose returns are equal by design), the title says
    so and the cost panels carry the comparison."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height = max(4.5, 0.28 * len(outcomes) + 1.5)
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, height), gridspec_kw={"width_ratios": [3, 2, 2]})
    curves = []
    for o in outcomes:
        if o.run_id is None:
            continue
        history = sorted(client.get_metric_history(o.run_id, PROGRESS_METRIC[o.spec.exp.task]), key=lambda m: m.step)
        if history:
            steps, values = [m.step for m in history], [m.value for m in history]
            curves.append(values)
            ax1.plot(steps, values, label=o.spec.name, lw=1.3, marker="o" if len(steps) <= 20 else None, ms=4)
    tasks = {o.spec.exp.task for o in outcomes}
    if tasks == {"qubit_meta"}:
        ax1.set(xlabel="meta-iteration", ylabel="validation fidelity after adaptation", title="Fidelity against meta-iteration")
    else:
        ax1.set(xlabel="episode (CartPole) / meta-iteration", ylabel="mean return (last 10) / fidelity", title="Progress")
    if len(curves) > 1 and all(c == curves[0] for c in curves):
        ax1.set_title("Progress: identical in every run (equal by design); compare the cost")
    if ax1.lines:
        ax1.legend(fontsize=7, loc="best")
    else:
        ax1.text(0.5, 0.5, "no run logged progress", ha="center", va="center", transform=ax1.transAxes)
    names = [o.spec.name for o in outcomes]
    colors = {"PASSED": "tab:green", "FAILED": "tab:red", "TIMED_OUT": "tab:orange", "KILLED": "tab:gray"}
    bar_colors = [colors.get(o.status, "tab:gray") for o in outcomes]
    seconds = [o.cost_per_step[0] or 0.0 for o in outcomes]
    evals = [o.cost_per_step[1] or 0.0 for o in outcomes]
    ax2.barh(names, seconds, color=bar_colors)
    ax2.set(xlabel="wall seconds per step", title="Time per episode / iteration (colour = status)")
    ax3.barh(names, evals, color=bar_colors)
    ax3.set(xlabel="circuit evaluations per step", title="Circuits per episode / iteration")
    if any(evals):
        ax3.set_xscale("log")
    for ax in (ax2, ax3):
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
    ax3.tick_params(axis="y", labelleft=False)
    fig.tight_layout()
    return fig


def gap_vs_variance_figure(client, outcomes: list[RunOutcome]):
    """Gap (after adaptation minus robust pulse) against task variance in rates, one point per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for o in outcomes:
        metrics = client.get_run(o.run_id).data.metrics
        if "final/gap_to_robust" in metrics and "final/task_variance_rates" in metrics:
            ax.scatter(metrics["final/task_variance_rates"], metrics["final/gap_to_robust"], label=o.spec.name)
    ax.axhline(0.0, color="gray", lw=0.8)
    ax.set(xlabel="task variance in rates ((1/T)^2)", ylabel="fidelity gain over robust pulse",
           title="Gap vs task variance", xscale="log")
    if ax.collections:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
