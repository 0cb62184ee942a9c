"""Progress for long work (compiles, device set-up, tuning), on stderr so stdout stays data."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console

console = Console(stderr=True, highlight=False)


@contextmanager
def step(what: str) -> Iterator[None]:
    """Show a spinner while ``what`` runs, then how long it took."""
    start = time.perf_counter()
    if console.is_terminal:
        with console.status(what + " ..."):
            yield
    else:
        print(f"{what} ...", file=sys.stderr, flush=True)
        yield
    console.print(f"[green]done[/green] {what} ({time.perf_counter() - start:.1f} s)")
