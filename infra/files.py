"""Errors users can fix, files that are never seen half-written, and the guard that keeps commands from replacing
what they did not write. A leaf: it imports nothing of the project, so everything else can use it."""
from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Collection, Sequence
from pathlib import Path


class UserError(Exception):
    """Bad input a user can fix (a path, a record, an option). The CLI prints it as one line, no traceback."""


# OSErrors a user can act on when writing: no permission, a read-only or immutable folder, a full disk or quota, a
# file-size limit
WRITE_ERRORS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def write_error(e: BaseException) -> tuple[int, str] | None:
    """(errno, text) of a failed write a user can act on (WRITE_ERRORS), else None. safetensors reports its own I/O
    errors as SafetensorError("... File too large (os error 27)"), so those are read from the text."""
    code = e.errno if isinstance(e, OSError) else None
    if code is None and type(e).__name__ == "SafetensorError" and (m := re.search(r"os error (\d+)", str(e))):
        code = int(m[1])
    return (code, os.strerror(code)) if code in WRITE_ERRORS else None


def failed_write(e: BaseException, target: Path, written: Path) -> OSError | None:
    """The OSError, naming `target`, of a write into `written` (a file or folder) that failed for a reason a user
    can act on, else None. torch.save says only "unexpected pos" or "file write failed" when the disk is full or the
    file-size limit is reached, so those two are told apart here, before the partial files are removed."""
    if (known := write_error(e)) is not None:
        return OSError(known[0], known[1], str(target))  # not the hidden temporary it was written to
    if not (isinstance(e, RuntimeError) and re.search(r"inline_container|PytorchStreamWriter|file write failed",
                                                      str(e))):
        return None
    files = [written] if written.is_file() else [p for p in written.rglob("*") if p.is_file()]
    largest = max((p.stat().st_size for p in files), default=0)
    with contextlib.suppress(ImportError, OSError, ValueError):
        import resource
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY and largest >= limit - 1024 * 1024:
            return OSError(errno.EFBIG, os.strerror(errno.EFBIG), str(target))
    if shutil.disk_usage(written if written.is_dir() else written.parent).free < 16 * 1024 * 1024:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
    return None


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
    created = [p for p in path.parents if not p.exists()]  # made here, so removed again if the write fails
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh(path, "tmp")
    try:
        yield tmp
    except BaseException as e:
        failed = failed_write(e, path, tmp) if isinstance(e, Exception) else None  # named before it is removed
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in created:  # deepest first; rmdir leaves a folder something else wrote to meanwhile
            with contextlib.suppress(OSError):
                folder.rmdir()
        if failed is not None:
            raise failed from e
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
        if ours and not alive(int(match["pid"])):
            shutil.rmtree(sibling, ignore_errors=True)


def temporary_file(target: Path) -> Path:
    """A hidden sibling `.NAME.tmp<pid>` to write `target` into before renaming it over `target`; leftovers of
    writers that died (killed) are removed first."""
    for stale in target.parent.glob(f".{glob.escape(target.name)}.tmp*"):
        pid = stale.name.rsplit(".tmp", 1)[1]
        if pid.isdigit() and not alive(int(pid)):
            stale.unlink(missing_ok=True)
    return target.with_name(f".{target.name}.tmp{os.getpid()}")


def alive(pid: int) -> bool:
    """Whether process `pid` of this machine still runs."""
    if os.name != "posix":  # Windows' os.kill(pid, 0) would send Ctrl-C, not ask
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to another user
        return True
    return True


def quote(value, limit: int = 80) -> str:
    """A user's value for a message: repr of a string, cut to `limit` characters (a 10 MB title stays one line)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# --------------------------------------------------------------------------------------------------- the guard
def own_output(out: str | Path, *, what: str, overwrite: bool, check: Callable[[Path], str | None],
               inputs: Sequence[str | Path | None] = (), file: bool = False, option: str = "--out") -> Path:
    """The one guard every writing command passes before any work: may `out` be written? Returns the path to write
    (the target, when `out` is a symbolic link). Refused, in one line, when `out` is one of the command's `inputs`
    (its dataset, model, reference run), holds one or lies inside one, exists and is not this project's own output
    of this kind (`check(out)` returns why not, None when it is ours), is ours but --overwrite was not given, or
    cannot be written. An absent `out` or an empty directory is simply filled."""
    out = Path(out)
    name_fits(Path(os.path.abspath(out)), option)  # before anything asks the file system about it
    if out.is_symlink():
        if not out.exists():
            raise UserError(f"{option} {out}: a symbolic link to {os.readlink(out)}, which does not exist; choose "
                            f"another {option}")
        out = out.resolve()
    here = out.resolve()
    for source in (Path(x).resolve() for x in inputs if x is not None):
        if source == here or here in source.parents:
            raise UserError(f"{option} {out}: would replace the input {source}; choose an output outside it")
        if source in here.parents:
            raise UserError(f"{option} {out}: inside {source}, which this command reads; choose an output outside it")
    if out.exists():
        if out.is_dir() != (not file):
            raise UserError(f"{option} {out}: exists and is {'a directory' if file else 'not a directory'}; expected "
                            f"{'a file' if file else 'a directory'}; choose another {option}")
        if file or any(out.iterdir()):
            why = check(out)
            if why is not None:
                raise UserError(f"{option} {out}: exists and is not a {what} written by this project ({why}); nothing "
                                f"was changed; choose another {option}")
            if not overwrite:
                raise UserError(f"{out}: a {what} already exists there; pass --overwrite to replace it")
    writable(out, option)
    return out


def name_fits(path: Path, option: str = "--out") -> None:
    """Refuse a path the file system cannot name (a component over NAME_MAX or the whole over PATH_MAX) before any
    work, rather than after it when the result is written."""
    limits = {"PC_NAME_MAX": 255, "PC_PATH_MAX": 4096}
    with contextlib.suppress(OSError, ValueError, AttributeError):
        folder = next(p for p in path.parents if p.exists())
        limits = {k: os.pathconf(folder, k) for k in limits}
    # room for what is written under and beside it: hidden temporaries (.NAME.tmpPID-HEX), a run's checkpoints
    name, whole = limits["PC_NAME_MAX"] - 30, limits["PC_PATH_MAX"] - 100
    if max(len(os.fsencode(part)) for part in path.parts) > name or len(os.fsencode(path)) > whole:
        raise UserError(f"{option} {quote(str(path))}: too long for this file system (at most {name} bytes a name, "
                        f"{whole} in all); choose a shorter {option}")


def marked(out: Path, marker: str, keys: Collection[str] = (), names: Collection[str] | None = None) -> str | None:
    """A directory's own-output check: `out/marker` is a JSON object holding `keys` and (when `names` is given) every
    entry of `out` is one of `names`, so files a person put beside ours are never swept away with them."""
    try:
        mark = json.loads((out / marker).read_text(encoding="utf-8"))
        ours = isinstance(mark, dict) and all(k in mark for k in keys)
    except (OSError, ValueError):
        ours = False
    if not ours:
        return f"no valid {marker}"
    foreign = sorted(e.name for e in out.iterdir() if names is not None and e.name not in names)
    return f"it holds {quote(foreign[0])}, which this project did not write there" if foreign else None


def writable(path: Path, option: str = "--out") -> None:
    """Refuse an output whose nearest existing folder cannot be written (read-only, another user's)."""
    folder = path if path.is_dir() else path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{folder}: not writable (permission denied or a read-only file system); choose an {option} "
                        "where you can write")


_locks: dict[tuple[int, int], int] = {}  # (device, inode) of a locked directory -> its open descriptor


def lock(folder: Path, what: str) -> None:
    """Hold an exclusive lock on `folder` until release_locks() or the end of this process; refuse in one line if
    another process holds it. The kernel drops the lock of a process that dies, so a killed run never blocks."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return
    st = os.stat(folder)
    if (st.st_dev, st.st_ino) in _locks:
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"{folder}: another process is writing this {what} now; wait for it to end or choose another "
                        "--out") from None
    _locks[st.st_dev, st.st_ino] = fd


def release_locks() -> None:
    while _locks:
        os.close(_locks.popitem()[1])
