"""A rich progress bar on a terminal (like ``exchange import``), nothing otherwise."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


class Progress:
    def __init__(self, enabled: bool) -> None:
        self._enabled = enabled and sys.stderr.isatty()

    @contextmanager
    def task(self, label: str, total: int | None) -> Iterator[Callable[[int], None]]:
        """``advance(n)`` for ``total`` steps (None: unknown, a spinner-like bar)."""
        if not self._enabled:
            yield lambda _n: None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn
        from rich.progress import Progress as Bar

        bar: Any = Bar(
            TextColumn(f"{label:<10}"), BarColumn(), MofNCompleteColumn(), transient=True
        )
        bar.start()
        task = bar.add_task(label, total=total)
        try:
            yield lambda n: bar.update(task, advance=n)
        finally:
            bar.stop()
