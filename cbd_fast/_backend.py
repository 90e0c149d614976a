"""Choice of the implementation behind a public op (the ``backend=`` argument)."""
from __future__ import annotations

import torch

from ._ops import has_extension, require_extension

BACKENDS = ("auto", "torch", "cpu", "triton", "cuda")


def resolve_backend(backend: str, device: torch.device, op: str) -> str:
    """Map ``backend`` to the implementation that runs on ``device``: "cpu" (C++), "torch", "triton" or "cuda".

    ``auto`` takes the fastest compiled backend for the device: the C++ kernels on CPU tensors, the vectorised
    PyTorch backend elsewhere. A forced backend that cannot run raises with the reason.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "cpu" if device.type == "cpu" and has_extension() else "torch"
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"{op}: backend='cpu' runs the C++ kernels on CPU tensors, got tensors on {device}")
        require_extension(f"{op} with backend='cpu'")
    if backend in ("triton", "cuda"):
        raise NotImplementedError(f"{op}: backend={backend!r} is not available in this build; "
                                  "use backend='auto', 'torch' or 'cpu'")
    return backend
