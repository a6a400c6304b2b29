"""The sweep's live progress on the terminal: rich bars, or plain lines when not a terminal."""

from __future__ import annotations

import time

from sweep.plan import RunOutcome


class Display:
    """Live progress: rich bars on a terminal (one per running run), plain lines otherwise."""

    def __init__(self, total: int, live: bool):
        self.total, self.live, self.done = total, live, 0
        self._labels: dict[str, str] = {}
        self._tasks: dict[str, int] = {}
        self._last_line: dict[str, float] = {}
        if live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
            )
            self.sweep_task = self.progress.add_task("runs", total=total)
            self.progress.start()

    def start_run(self, name: str, episodes: int, label: str = "avg return", note: str = "") -> None:
        self._labels[name] = label
        if self.live:
            self._tasks[name] = self.progress.add_task(f"  {name}", total=episodes)
        else:
            print(f"[{self.done + 1}/{self.total}] {name}: started{note}", flush=True)

    def update(self, name: str, episode: int, total: int, avg_return: float) -> None:
        label = self._labels.get(name, "avg return")
        shown = f"{label} {avg_return:.4g}" if avg_return == avg_return else f"{label} not measured yet"
        if self.live:
            self.progress.update(self._tasks[name], completed=episode, description=f"  {name} {shown}")
        elif time.monotonic() - self._last_line.get(name, 0.0) > 2.0 or episode == total:
            self._last_line[name] = time.monotonic()
            print(f"[{self.done + 1}/{self.total}] {name}: step {episode}/{total}, {shown}", flush=True)

    def end_run(self, outcome: RunOutcome) -> None:
        self.done += 1
        name = outcome.spec.name
        reused = " (PASSED earlier with the same config; skipped)" if outcome.reused else ""
        if self.live:
            if name in self._tasks:
                self.progress.remove_task(self._tasks.pop(name))
            self.progress.update(self.sweep_task, completed=self.done)
            self.progress.console.print(f"{name}: {outcome.status} in {outcome.wall_s:.1f} s{reused}")
        else:
            extra = f" ({outcome.error})" if outcome.error else reused
            print(f"[{self.done}/{self.total}] {name}: {outcome.status} in {outcome.wall_s:.1f} s{extra}", flush=True)

    def message(self, text: str) -> None:
        if self.live:
            self.progress.console.print(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.live:
            self.progress.stop()
