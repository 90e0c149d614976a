"""Atomic checkpoints: write to a temporary file in the same folder, fsync, then rename over the old one."""
from __future__ import annotations

import os
import pathlib
import tempfile
from typing import Any

import torch


def save_atomic(state: dict[str, Any], path: str | pathlib.Path) -> None:
    """Save ``state`` so that ``path`` always holds either the previous or the new complete checkpoint."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(state, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load(path: str | pathlib.Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_atomic` (tensors, numbers, strings, lists and dicts only)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=True)
