"""Atomic file writes for run outputs: a temporary file in the same folder, fsync, rename over the old file.

A reader (or a run killed at any moment) sees either the previous or the new complete file. The file gets the
permissions of an ordinary new file (0644 under the usual umask 022, readable by the group), not the 0600 of
``tempfile.mkstemp``. A full disk is reported as ENOSPC with the path; the previous file stays as it was.
Temporaries are named ``.<name>.<random>.tmp``; those left by a killed write are removed by the next write of
the same file (:func:`remove_stale_temporaries`).
"""
from __future__ import annotations

import errno
import os
import pathlib
import tempfile
from typing import BinaryIO, Callable


def _new_file_mode() -> int:
    mask = os.umask(0o022)  # read the umask: set a value, then restore the original
    os.umask(mask)
    return 0o666 & ~mask


def remove_stale_temporaries(path: str | pathlib.Path) -> list[pathlib.Path]:
    """Delete temporaries of ``path`` left by an interrupted :func:`write_atomic`; returns what was removed."""
    path = pathlib.Path(path)
    if not path.parent.is_dir():
        return []
    removed = []
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            stale.unlink()
            removed.append(stale)
        except FileNotFoundError:
            pass
    return removed


def write_atomic(path: str | pathlib.Path, write: Callable[[BinaryIO], None]) -> None:
    """Create or replace ``path`` with what ``write(stream)`` writes into a binary stream."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            os.fchmod(stream.fileno(), _new_file_mode())
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"no space left on device (ENOSPC) while writing {path}; the previous "
                          f"version of the file, if any, is intact", str(path)) from exc
        raise


def write_text_atomic(path: str | pathlib.Path, text: str) -> None:
    """:func:`write_atomic` of UTF-8 text."""
    write_atomic(path, lambda stream: stream.write(text.encode("utf-8")))
