"""Errors users can fix, files that are never seen half-written, and progress bars. A leaf module: it imports nothing of
the project, so every other module (the data tools too, which need no torch) can use it."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path


class UserError(Exception):
    """Bad input a user can fix (a path, a record, an option). The CLI prints it as one line, no traceback."""


def read_json(path: str | Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def write_json(path: str | Path, obj) -> None:
    """Write JSON via a temporary file and an atomic rename, so readers never see half a file."""
    tmp = Path(f"{path}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary sibling directory; on success it replaces `path`, so a crash never leaves half a checkpoint.

    At every moment either the old or the new complete directory exists under a known name.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.old{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


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
