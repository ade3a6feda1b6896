"""The training progress bar (rich): steps, ETA, samples/s and the latest loss; silent on ranks other than 0."""
from __future__ import annotations

import time

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)


class TrainProgress:
    def __init__(self, total: int, done: int, enabled: bool = True, world_size: int = 1):
        self.enabled, self.total, self.done, self.world_size = enabled, total, done, world_size
        self._progress = Progress(
            TextColumn("pretrain"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("ETA"), TimeRemainingColumn(),
            TextColumn("{task.fields[rate]:.1f} samples/s  loss {task.fields[loss]}"),
            console=Console(stderr=True), disable=not enabled)
        self._task = None

    def __enter__(self) -> "TrainProgress":
        self._progress.__enter__()
        self._task = self._progress.add_task("pretrain", total=self.total, completed=self.done, rate=0.0,
                                             loss="-")
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def advance(self, window, loss: float) -> None:
        if not self.enabled:
            return
        elapsed = max(time.perf_counter() - window.start, 1e-9)
        self._progress.update(self._task, advance=1, rate=window.samples * self.world_size / elapsed, loss=f"{loss:.4f}")
