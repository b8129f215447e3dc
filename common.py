"""Errors users can fix, files that are never seen half-written, and progress bars. A leaf module: it imports nothing of
the project, so every other module (the data tools too, which need no torch) can use it."""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
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
    except OSError as e:  # a directory, no permission, a folder on the path that is a file
        raise UserError(f"{path}: cannot read it ({e.strerror}); expected a JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def write_json(path: str | Path, obj) -> None:
    """Write JSON via a temporary file and an atomic rename, so readers never see half a file."""
    tmp = Path(f"{path}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield a new temporary sibling directory; on success it replaces `path`, so a crash never leaves half a
    checkpoint: at every moment either the old or the new complete directory exists under a known name.

    Contract: `path` must be absent or a directory the caller has recognised as its own output (this function cannot
    tell). The temporary directories are fresh names, so nothing else is ever deleted; a failure inside the block
    removes the new one, a failed swap puts the old one back, and leftovers of processes that died (killed, power
    loss) are removed on the next successful write of the same path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh(path, "tmp")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = _fresh(path, "old") if path.exists() else None
    try:
        if old is not None:
            os.replace(path, old)  # a rename onto the fresh, empty `old` directory
        os.replace(tmp, path)
    except BaseException:
        if old is not None and not path.exists():
            os.replace(old, path)
        elif old is not None:
            old.rmdir()  # `path` never moved: this is still the empty directory made above
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _remove_stale(path)


# atomic_dir's temporaries: `.NAME.tmp<pid>-<8 hex>` (being written) and `.NAME.old<pid>-<8 hex>` (the replaced one,
# set aside for a moment); without the hex, the names of earlier versions of this project.
TEMPORARY_DIR = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)(?P<pid>\d+)(?P<fresh>-[0-9a-f]{8})?")


def _fresh(path: Path, kind: str) -> Path:
    """A new, empty hidden sibling `.NAME.KIND<pid>-<random>`: created here, so never someone else's."""
    while True:
        candidate = path.with_name(f".{path.name}.{kind}{os.getpid()}-{secrets.token_hex(4)}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue


def _remove_stale(path: Path) -> None:
    """Remove `.NAME.tmp<pid>-*` / `.NAME.old<pid>-*` siblings left by processes of this machine that no longer run."""
    for sibling in path.parent.iterdir():
        match = TEMPORARY_DIR.fullmatch(sibling.name)
        ours = match and match["name"] == path.name and match["fresh"] and sibling.is_dir()
        if ours and not _alive(int(match["pid"])):
            shutil.rmtree(sibling, ignore_errors=True)


def _alive(pid: int) -> bool:
    if os.name != "posix":  # Windows' os.kill(pid, 0) would send Ctrl-C, not ask
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to another user
        return True
    return True


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
