"""The one home of what medssl shows in the terminal: the console (stderr, so stdout stays for data) and the
progress bars of long work, each with count, throughput, elapsed time and ETA."""
from __future__ import annotations

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.text import Text

console = Console(stderr=True)



class RateColumn(ProgressColumn):
    """Items per second, e.g. "1,204 files/s"; falls back to the overall rate while rich's window is empty
    (short jobs), and shows seconds per item when items take longer than a second (ladder runs)."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.speed
        if not speed and task.elapsed and task.completed:
            speed = task.completed / task.elapsed
        if speed and speed < 1:
            return Text(f"{1 / speed:,.1f} s/{self.unit.rstrip('s')}", style="progress.data.speed")
        return Text(f"{speed or 0:,.1f} {self.unit}/s", style="progress.data.speed")


def progress_bar(unit: str, *, enabled: bool = True, extra: str | None = None) -> Progress:
    """A bar of work done item by item: description, bar, done/total, rate, elapsed, ETA (+ `extra`, a rich
    TextColumn template over the task's fields, e.g. "loss {task.fields[loss]}")."""
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(unit),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    if extra:
        columns.append(TextColumn(extra))
    return Progress(*columns, console=console, disable=not enabled)


class TrainProgress:
    """The training bar: steps, ETA, samples/s (all ranks) and the latest loss; silent on ranks other than 0."""

    def __init__(self, total: int, done: int, enabled: bool = True):
        self.enabled = enabled
        self._bar = progress_bar("steps", enabled=enabled,
                                 extra="{task.fields[rate]:.1f} samples/s  loss {task.fields[loss]}")
        self._task = self._bar.add_task("pretrain", total=total, completed=done, rate=0.0, loss="-")

    def __enter__(self) -> "TrainProgress":
        self._bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._bar.__exit__(*exc)

    def advance(self, samples_per_s: float, loss: float, total: int | None = None) -> None:
        """One step more; `total`: the steps now planned (a time budget's, once its pace is measured)."""
        if self.enabled:
            self._bar.update(self._task, advance=1, rate=samples_per_s, loss=f"{loss:.4f}", total=total)
