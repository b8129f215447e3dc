"""Derived arrays built once and then shared: a .npy file named by a key of everything it is made from, written to a
temporary file and renamed into place, and read memory-mapped, so the processes of a multi-GPU run share one copy in
the page cache. A leaf of infra/: what to build is the caller's; this module only keys, writes and reads.

The file is written with plain writes, a chunk at a time, never through a writable memory map: a full disk is then
an OSError naming the file (ENOSPC), not a SIGBUS that kills the process without a word.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from infra.files import temporary_file


def cache_path(folder: Path, name: str, inputs: list) -> Path:
    """`folder/NAME-KEY.npy`, KEY a hash of `inputs` (JSON: fingerprints, settings): other inputs, another file."""
    return folder / f"{name}-{hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:16]}.npy"


def read(path: Path) -> np.ndarray | None:
    """The array in `path`, memory-mapped read-only; None when it is missing or damaged (a disk error, a copy cut
    short: never half of our own write, which is atomic), so the caller rebuilds it."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError):  # FileNotFoundError included
        return None


def write(path: Path, chunks: Iterable[np.ndarray], dtype: np.dtype) -> None:
    """Write the 1-D array that `chunks` make, one after another, to `path` as .npy, each chunk as it comes (the
    whole array is never held in memory), then rename it over `path` at once: readers see all of it or nothing."""
    path.parent.mkdir(exist_ok=True)
    tmp = temporary_file(path)
    try:
        with open(tmp, "wb") as f:
            header(f, dtype, 0)  # a stand-in: the length is known at the end
            start, length = f.tell(), 0
            for chunk in chunks:
                f.write(np.ascontiguousarray(chunk, dtype).data)
                length += len(chunk)
            f.seek(0)
            header(f, dtype, length)
            if f.tell() != start:
                raise RuntimeError(f"{path}: this numpy writes .npy headers of another size for another length")
        os.replace(tmp, path)
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


def cached_array(path: Path, build: Callable[[], Iterable[np.ndarray]], dtype: np.dtype) -> np.ndarray:
    """The array in `path`, memory-mapped read-only; built first when missing or damaged. `build()` is called only
    then and returns the array's chunks of `dtype`, written as they are made."""
    if (array := read(path)) is not None:
        return array
    write(path, build(), dtype)
    return np.load(path, mmap_mode="r", allow_pickle=False)
