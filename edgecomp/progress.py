"""Progress for long work (compiles, device set-up, tuning), on stderr so stdout stays data."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
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


def layer_line(record: object) -> str:
    """One line for a decomposed (or kept dense) layer: name, shape, rank, error, seconds."""
    r = record
    shape = "x".join(map(str, getattr(r, "weight_shape", ())))
    head = f"{getattr(r, 'name', '?'):8} {shape:18}"
    if getattr(r, "skipped", None) is not None:
        return f"{head} kept dense: {r.skipped}"  # type: ignore[attr-defined]
    rank = r.rank  # type: ignore[attr-defined]
    rank_text = "x".join(map(str, rank)) if isinstance(rank, tuple) else str(rank)
    error = getattr(r, "weight_error", None)
    err = "" if error is None else f"  weight error {error:.4f}"
    return f"{head} {r.method} rank {rank_text}{err}  {r.seconds:.1f} s"  # type: ignore[attr-defined]


@contextmanager
def layer_progress(what: str) -> Iterator[Callable[[object | None, int, int], None]]:
    """Report a per-layer loop: a bar over layers (on a terminal) and one line per layer.

    Yields the callback ``(record, done, total)`` the loop calls as each layer finishes
    (``record`` None before the first, to announce ``total``).
    """
    start = time.perf_counter()
    progress = None
    task = None
    if console.is_terminal:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        progress = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        progress.start()
        task = progress.add_task(what, total=None)
    else:
        print(f"{what} ...", file=sys.stderr, flush=True)

    def on_layer(record: object | None, done: int, total: int) -> None:
        if progress is not None and task is not None:
            progress.update(task, total=total, completed=done)
        if record is not None:
            console.print(f"  [{done}/{total}] {layer_line(record)}", soft_wrap=True)

    try:
        yield on_layer
    finally:
        if progress is not None:
            progress.stop()
    console.print(f"[green]done[/green] {what} ({time.perf_counter() - start:.1f} s)")
