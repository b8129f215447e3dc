"""Derived files built once and then shared, each recording a checksum of its content and of what it was made from,
verified on use: a file damaged or edited in place is built again (or refused by its caller), never trusted.

Arrays (`cached_array`, the CPT stream): a .npy file named by a key of everything it is made from, a JSON record
beside it (NAME-KEY.json: the inputs, the length, the SHA-256 of the array's bytes), written to a temporary file and
renamed into place, and read memory-mapped, so the processes of a multi-GPU run share one copy in the page cache.
The file is written with plain writes, a chunk at a time, never through a writable memory map: a full disk is then
an OSError naming the file (ENOSPC), not a SIGBUS that kills the process without a word. A folder that cannot be
written (a read-only dataset) leaves the file to the user cache (`user_cache`).

Small archives (`save_checked`/`load_checked`, align's reference.npz): np.savez with the same checksums inside.

A leaf of infra/: what to build is the caller's; this module only keys, checks, writes and reads.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from infra.console import warn
from infra.files import UserError, temporary_file, write_json

CHUNK = 64 << 20  # bytes hashed at a time: a memory-mapped stream is never read whole into memory
UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def user_cache() -> Path:
    """This user's cache folder for the project ($XDG_CACHE_HOME/cprec, by default ~/.cache/cprec)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cprec"


def digest(data: np.ndarray | bytes) -> str:
    """SHA-256 of an array's bytes, CHUNK at a time (a few hundred MB/s to GB/s: docs/design.md#checked-caches)."""
    flat = memoryview(np.ascontiguousarray(data)).cast("B") if isinstance(data, np.ndarray) else memoryview(data)
    h = hashlib.sha256()
    for i in range(0, len(flat), CHUNK):
        h.update(flat[i:i + CHUNK])
    return h.hexdigest()


def made_from(inputs) -> str:
    """The checksum of what a file is made from (JSON: fingerprints, settings)."""
    return hashlib.sha256(json.dumps(inputs).encode()).hexdigest()


# --------------------------------------------------------------------------------------------------- arrays
def cache_path(folder: Path, name: str, inputs: list) -> Path:
    """`folder/NAME-KEY.npy`, KEY a hash of `inputs` (JSON: fingerprints, settings): other inputs, another file."""
    return folder / f"{name}-{made_from(inputs)[:16]}.npy"


def record_path(path: Path) -> Path:
    return path.with_suffix(".json")


def read(path: Path, inputs: list, verify: bool) -> np.ndarray | None:
    """The array in `path`, memory-mapped read-only; None when it is missing, damaged (a disk error, a copy cut short:
    never half of our own write, which is atomic) or, with `verify`, unlike its record (edited in place, another
    inputs' file), so the caller rebuilds it. Without `verify` only the record's presence and length are checked: for
    the processes that read a file one process has just verified."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        record = json.loads(record_path(path).read_text())
    except (ValueError, OSError, EOFError):  # FileNotFoundError included
        return None
    if record.get("length") != len(array) or record.get("inputs") != json.loads(json.dumps(inputs)):
        return None
    return array if not verify or record.get("sha256") == digest(array) else None


def write(path: Path, chunks: Iterable[np.ndarray], dtype: np.dtype, inputs: list) -> None:
    """Write the 1-D array that `chunks` make, one after another, to `path` as .npy, each chunk as it comes (the
    whole array is never held in memory, its checksum is taken on the way), then rename it over `path` at once:
    readers see all of it or nothing. Its record follows: a file without one is never used."""
    path.parent.mkdir(exist_ok=True)
    record_path(path).unlink(missing_ok=True)
    tmp, h = temporary_file(path), hashlib.sha256()
    try:
        with open(tmp, "wb") as f:
            header(f, dtype, 0)  # a stand-in: the length is known at the end
            start, length = f.tell(), 0
            for chunk in chunks:
                data = np.ascontiguousarray(chunk, dtype).data
                f.write(data)
                h.update(data)
                length += len(chunk)
            f.seek(0)
            header(f, dtype, length)
            if f.tell() != start:
                raise RuntimeError(f"{path}: this numpy writes .npy headers of another size for another length")
        os.replace(tmp, path)
        write_json(record_path(path), {"inputs": inputs, "length": length, "sha256": h.hexdigest()})
    except OSError as e:  # a full disk or quota: name the file being built, not its hidden temporary
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def header(f, dtype: np.dtype, length: int) -> None:
    """np.save's header of a 1-D array. numpy pads it so the length can grow in place: any length, the same size."""
    d = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": (length,)}
    np.lib.format.write_array_header_1_0(f, d)


def can_write(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if e.errno not in UNWRITABLE:
            raise
        return False
    return os.access(folder, os.W_OK | os.X_OK)


def cached_array(folder: Path, name: str, inputs: list, build: Callable[[], Iterable[np.ndarray]], dtype: np.dtype,
                 verify: bool = True) -> np.ndarray:
    """The array made from `inputs` (JSON), memory-mapped read-only from `folder` or, when `folder` cannot be written,
    from the user cache; built first when missing, damaged or (with `verify`, which one process of a run does) unlike
    its checksum. `build()` is called only then and returns the array's chunks of `dtype`, written as they come."""
    places = [cache_path(folder, name, inputs), cache_path(user_cache(), name, inputs)]
    for path in places:
        if (array := read(path, inputs, verify)) is not None:
            return array
    path = next((p for p in places if can_write(p.parent)), None)
    if path is None:
        raise UserError(f"{folder} and {places[1].parent}: neither can be written, and the {name} cache needs one; "
                        "make one writable or set XDG_CACHE_HOME to a folder you can write")
    if path != places[0]:
        warn(f"{folder}: not writable; the {name} cache goes to {path.parent}")
    write(path, build(), dtype, inputs)
    return np.load(path, mmap_mode="r", allow_pickle=False)


# --------------------------------------------------------------------------------------------------- archives
def save_checked(path: Path, arrays: dict[str, np.ndarray], inputs) -> None:
    """np.savez of `arrays` with the checksum of each and of `inputs` (what they were made from), written to
    NAME.tmp.npz and renamed over `path`."""
    sums = {"inputs": made_from(inputs), **{k: digest(v) for k, v in arrays.items()}}
    tmp = path.with_name(f"{path.stem}.tmp.npz")
    np.savez(tmp, **arrays, checksums=np.array(json.dumps(sums)))
    tmp.replace(path)


def load_checked(path: Path, inputs) -> tuple[dict[str, np.ndarray] | None, str]:
    """The arrays save_checked wrote to `path`, and "" ; or None and why it cannot be used (unreadable, made from
    other inputs, a checksum that differs). An archive written before checksums were kept is only read."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {k: stored[k] for k in stored.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        return None, f"unreadable ({type(e).__name__}: {e})"
    if "checksums" not in arrays:
        return arrays, ""
    try:
        sums = json.loads(str(arrays.pop("checksums")))
    except ValueError:
        return None, "its checksums are unreadable"
    if sums.get("inputs") != made_from(inputs):
        return None, "made from other inputs"
    bad = sorted(k for k in set(sums) - {"inputs"} | set(arrays) if k not in arrays or sums.get(k) != digest(arrays[k]))
    return (None, f"checksum of {bad[0]} differs") if bad else (arrays, "")
