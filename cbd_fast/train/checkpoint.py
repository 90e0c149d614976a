"""Checkpoints: written atomically (:mod:`cbd_fast._files`), checksummed, read without running any code.

File layout: a 16-byte header (``CBDFAST-CKPT``, a 4-byte little-endian format version), the SHA-256 of the
payload (32 bytes), then the payload, a ``torch.save`` archive of tensors, numbers, strings, lists and dicts.
:func:`load` verifies the checksum before reading anything, then reads the payload with ``weights_only=True``.
Every failure is a :class:`CheckpointError` naming the file and what is wrong with it.
"""
from __future__ import annotations

import hashlib
import io
import os
import pathlib
import re
from typing import Any, BinaryIO

import torch

from .._files import write_atomic
from ..errors import InputError

MAGIC = b"CBDFAST-CKPT"
VERSION = 1
_HEADER = len(MAGIC) + 4
_DIGEST = 32
_PAYLOAD = _HEADER + _DIGEST


class CheckpointError(InputError, ValueError):
    """A file that is not a readable cbd_fast checkpoint: the message names the file and the problem."""


class _HashingWriter:
    """Write-only stream that hashes what passes through (torch.save only calls write and flush)."""

    def __init__(self, stream: BinaryIO):
        self.stream, self.sha256 = stream, hashlib.sha256()

    def write(self, data) -> int:
        self.sha256.update(data)
        return self.stream.write(data)

    def flush(self) -> None:
        self.stream.flush()


class _Section(io.RawIOBase):
    """The part of a file from ``start`` on, as a seekable stream of its own (torch.load reads the payload
    in place, without a copy in memory)."""

    def __init__(self, raw: BinaryIO, start: int):
        super().__init__()
        self.raw, self.start = raw, start
        raw.seek(start)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = self.start + offset if whence == io.SEEK_SET else offset
        return self.raw.seek(target, io.SEEK_SET if whence == io.SEEK_SET else whence) - self.start

    def tell(self) -> int:
        return self.raw.tell() - self.start

    def readinto(self, buffer) -> int:
        return self.raw.readinto(buffer)


def save_atomic(state: dict[str, Any], path: str | pathlib.Path) -> None:
    """Save ``state`` so that ``path`` always holds either the previous or the new complete checkpoint."""

    def write(stream: BinaryIO) -> None:
        stream.write(MAGIC + VERSION.to_bytes(4, "little") + bytes(_DIGEST))
        hashing = _HashingWriter(stream)
        torch.save(state, hashing)
        stream.seek(_HEADER)
        stream.write(hashing.sha256.digest())

    write_atomic(path, write)


def keep_history(last: pathlib.Path, name: str, keep: int) -> None:
    """Link the checkpoint just written at ``last`` as ``<name>.pt`` next to it (a copy where the file system has
    no hard links) and delete the oldest such files beyond the newest ``keep`` (``last`` counts as one of them, so
    ``keep - 1`` older ones stay). ``name`` starts with a zero-padded counter, so names sort by age."""
    last = pathlib.Path(last)
    target = last.with_name(f"{name}.pt")
    target.unlink(missing_ok=True)
    try:
        os.link(last, target)
    except OSError:
        write_atomic(target, lambda stream: stream.write(last.read_bytes()))
    history = sorted(path for path in last.parent.glob("[0-9]*.pt") if _HISTORY.fullmatch(path.name))
    for old in history[:-keep]:
        old.unlink(missing_ok=True)


_HISTORY = re.compile(r"\d{6,}-task\d+-epoch\d+(-step\d+)?\.pt")


def _payload_digest(stream: BinaryIO) -> bytes:
    stream.seek(_PAYLOAD)
    sha256 = hashlib.sha256()
    for block in iter(lambda: stream.read(1 << 20), b""):
        sha256.update(block)
    return sha256.digest()


def stored_digest(path: str | pathlib.Path) -> str:
    """The payload's SHA-256 as the header stores it (hex): names a checkpoint's content without reading it all
    (:func:`load` checks that the payload matches)."""
    with pathlib.Path(path).open("rb") as stream:
        stream.seek(_HEADER)
        return stream.read(_DIGEST).hex()


def load(path: str | pathlib.Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_atomic`, after verifying its checksum."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with path.open("rb") as stream:
        header = stream.read(_PAYLOAD)
        if not header:
            raise CheckpointError(f"{path} is not a cbd_fast checkpoint: the file is empty")
        if not header.startswith(MAGIC):
            raise CheckpointError(f"{path} is not a cbd_fast checkpoint: it does not start with the "
                                  f"cbd_fast checkpoint header")
        version = int.from_bytes(header[len(MAGIC):_HEADER], "little")
        if version != VERSION:
            raise CheckpointError(f"{path}: cbd_fast checkpoint format {version}, this cbd_fast reads format "
                                  f"{VERSION}")
        if len(header) < _PAYLOAD or header[_HEADER:] != _payload_digest(stream):
            raise CheckpointError(f"{path}: the cbd_fast checkpoint is damaged (its SHA-256 checksum does not "
                                  f"match: the file was truncated or changed after it was written)")
        try:
            state = torch.load(_Section(stream, _PAYLOAD), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch's message advises weights_only=False: not an option here
            found = re.search(r"GLOBAL (\S+)", str(exc))
            detail = f"it holds an object of type {found.group(1)}" if found else type(exc).__name__
            raise CheckpointError(f"{path}: the cbd_fast checkpoint cannot be read safely ({detail})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: a cbd_fast checkpoint holds a dict, this file holds a "
                              f"{type(state).__name__}")
    return state

