"""One rich progress bar over a count (tokens, windows), or nothing when progress is off."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def progress_bar(enabled: bool, label: str, total: int, done: int = 0, unit: str = "tokens") -> Iterator[Callable[[int], None]]:
    """Yields ``update(completed)``, which moves the bar to ``completed`` of ``total``."""
    if not enabled:
        yield lambda completed: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn(unit), TimeRemainingColumn())
    task = bar.add_task(label, total=total, completed=done)
    with bar:
        yield lambda completed: bar.update(task, completed=min(completed, total))
