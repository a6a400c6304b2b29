"""What a sweep reports: the summary table (terminal, markdown, CSV), the headline per backend,
the comparison figures."""

from __future__ import annotations

import csv
import io

from sweep.plan import RunOutcome
from tasks import TASKS


def log_figure(client, run_id: str, fig, artifact_file: str) -> None:
    import matplotlib.pyplot as plt

    client.log_figure(run_id, fig, artifact_file, save_kwargs={"dpi": 110})
    plt.close(fig)


BASE_COLUMNS = ("run", "backend", "gradient", "status", "wall_s")
COST_COLUMNS = ("s_per_step", "evals_per_step", "grad_circuit_evals", "total_circuit_evals")


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None or value != value else round(value, digits)


def summary_rows(outcomes: list[RunOutcome]) -> list[dict]:
    """One row per run: its task's score and summary columns (``tasks/``), then the cost.
    ``s_per_step`` and ``evals_per_step``: wall seconds and circuit evaluations per progress step
    (episode, meta-iteration), the cost a reader compares when scores are equal by design."""
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
            o.spec.task.score_column: _rounded(o.score, 5),
            **{k: _rounded(o.columns.get(k), 5) for k in o.spec.task.extra_columns},
            "grad_circuit_evals": o.grad_circuit_evals,
            "total_circuit_evals": o.total_circuit_evals,
        })
    return rows


def summary_columns(tasks: set[str]) -> tuple[str, ...]:
    """The summary columns of the tasks present (in registry order), then the cost columns."""
    scores = tuple(dict.fromkeys(c for task in TASKS if task.name in tasks for c in task.summary_columns))
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
    return None if o.score != o.score else o.score


def _score_label(o: RunOutcome) -> str:
    return o.spec.task.score_label


def summary_markdown(rows: list[dict], columns: tuple[str, ...]) -> str:
    header = "| " + " | ".join(columns) + " |"
    lines = [header, "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join("-" if r.get(c) is None else str(r[c]) for c in columns) + " |")
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
        table.add_row(*("-" if r.get(c) is None else str(r[c]) for c in columns))
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
        history = sorted(client.get_metric_history(o.run_id, o.spec.task.progress_metric), key=lambda m: m.step)
        if history:
            steps, values = [m.step for m in history], [m.value for m in history]
            curves.append(values)
            ax1.plot(steps, values, label=o.spec.name, lw=1.3, marker="o" if len(steps) <= 20 else None, ms=4)
    tasks = list({o.spec.task.name: o.spec.task for o in outcomes}.values())
    ax1.set(xlabel=" / ".join(t.step_unit for t in tasks), ylabel=" / ".join(t.progress_label for t in tasks),
            title="Progress" if len(tasks) != 1 else f"{tasks[0].progress_label} against {tasks[0].step_unit}")
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
    ax2.set(xlabel="wall seconds per step", title="Time per step (colour = status)")
    ax3.barh(names, evals, color=bar_colors)
    ax3.set(xlabel="circuit evaluations per step", title="Circuits per step")
    if any(evals):
        ax3.set_xscale("log")
    for ax in (ax2, ax3):
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
    ax3.tick_params(axis="y", labelleft=False)
    fig.tight_layout()
    return fig
