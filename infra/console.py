"""What the commands print besides their results: one-line messages on stderr (rank 0 only) and progress bars."""
from __future__ import annotations

import contextlib
import os
import sys


def say(message: str, rank: int | None = None) -> None:
    """A message on stderr from rank 0 only (rich markup such as [yellow] allowed)."""
    if (int(os.environ.get("RANK", 0)) if rank is None else rank) == 0:
        from rich.console import Console
        Console(stderr=True, emoji=False).print(message, highlight=False, soft_wrap=True)


def warn(message: str, rank: int = 0) -> None:
    """`warning: message` on stderr from rank 0, printed as is (no markup: paths may hold brackets)."""
    if rank == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


_bars: list = []  # the rich Progress on screen: a bar opened inside another becomes one more line of it


@contextlib.contextmanager
def progress(total: int, label: str, enabled: bool = True, start: int = 0):
    """A progress bar with count, ETA and a free text, on stderr; yields `advance(n=1, info="")`.

    Quiet (advance does nothing) when disabled or when stderr is not a terminal, so logs and pipes stay clean. A bar
    opened while another is showing (validation inside training) is added to it as a second line, removed after.
    """
    console = None
    if enabled:
        from rich.console import Console
        console = Console(stderr=True)
    if console is None or not console.is_terminal:
        yield lambda n=1, info="": None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    outer = _bars[-1] if _bars else None
    bar = outer or Progress(TextColumn("{task.description}"), MofNCompleteColumn(), BarColumn(),
                            TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console)
    task = bar.add_task(label, total=total, completed=start, info="")
    if outer is None:
        bar.start()
        _bars.append(bar)
    try:
        yield lambda n=1, info="": bar.update(task, advance=n, info=info)
    finally:
        if outer is None:  # the finished bar stays on screen
            _bars.pop()
            bar.stop()
        else:
            bar.remove_task(task)


def counted(sequence: list, label: str, enabled: bool, every: int = 1000):
    """Iterate over `sequence` with a progress bar, moved every `every` items to stay cheap."""
    with progress(len(sequence), label, enabled) as advance:
        for k, x in enumerate(sequence):
            if k and k % every == 0:
                advance(every)
            yield x
        advance(len(sequence) - (len(sequence) - 1) // every * every if len(sequence) else 0)
