"""Choice of the implementation behind a public op (the ``backend=`` argument)."""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

from ._ops import has_cuda_kernels, has_extension, require_extension

BACKENDS = ("auto", "torch", "cpu", "triton", "cuda")

# What ``backend="auto"`` takes on CUDA tensors, per op, in order of preference: the GPU backends in the order of
# their measured speed on an H200 (benchmarks/results/gpu_nvidia_h200.md), then the vectorised PyTorch backend,
# which runs everywhere. banzhaf_interaction: CUDA is 1.1x faster at T=32, V=50 (fp32 and bf16), Triton 1.3x at
# ViT-B/16 sizes (a tie on balance; CUDA's sums are in double). from_tokens: Triton is 1.2x (bf16 anchor) to 2.6x
# (ViT-B/16) faster. maxsim: CUDA is 1.8x (fp32 training batch) to 3.2x (fp32 gallery) faster, within 15% in bf16.
GPU_PREFERENCE = {
    "banzhaf_interaction": ("cuda", "triton"),
    "banzhaf_interaction_from_tokens": ("triton", "cuda"),
    "maxsim": ("cuda", "triton"),
}


@functools.lru_cache(maxsize=None)
def has_triton() -> bool:
    """True when Triton can be imported (its kernels are compiled on first use)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # a broken triton install only disables the Triton backend
        return False
    return True


def triton_interpreted() -> bool:
    """True when Triton runs kernels under its interpreter on CPU tensors (``TRITON_INTERPRET=1``, for tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_reason(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device`` (None when they can)."""
    if not has_triton():
        return "triton is not installed (pip install triton)"
    if device.type == "cuda" or (device.type == "cpu" and triton_interpreted()):
        return None
    return f"the Triton kernels run on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got tensors on {device}"


def _cuda_reason(device: torch.device) -> str | None:
    """Why the hand-written CUDA kernels cannot run on ``device`` (None when they can)."""
    if device.type != "cuda":
        return f"the CUDA kernels run on CUDA tensors, got tensors on {device}"
    if not has_cuda_kernels():
        return ("this build of cbd_fast._C has no CUDA kernels (reinstall with a CUDA build of torch, nvcc on the "
                "PATH and CBD_FAST_CUDA=1)")
    return None


def resolve_backend(backend: str, device: torch.device, op: str) -> str:
    """Map ``backend`` to the implementation that runs on ``device``: "cpu" (C++), "torch", "triton" or "cuda".

    ``auto`` takes the C++ kernels on CPU tensors and, on CUDA tensors, the first available of
    :data:`GPU_PREFERENCE` (falling back to the vectorised PyTorch backend). A forced backend that cannot run
    raises with the reason.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cpu":
            return "cpu" if has_extension() else "torch"
        if device.type == "cuda":
            for candidate in GPU_PREFERENCE.get(op, ()):
                reason = _triton_reason(device) if candidate == "triton" else _cuda_reason(device)
                if reason is None:
                    return candidate
        return "torch"
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"{op}: backend='cpu' runs the C++ kernels on CPU tensors, got tensors on {device}")
        require_extension(f"{op} with backend='cpu'")
    elif backend in ("triton", "cuda"):
        reason = _triton_reason(device) if backend == "triton" else _cuda_reason(device)
        if reason is not None:
            raise ValueError(f"{op}: backend={backend!r} cannot run here: {reason}")
    return backend


def within_kernel_limits(chosen: str, backend: str, op: str, reason: str | None) -> str:
    """``chosen`` when the problem is within its kernel's limits (``reason`` None); otherwise ``auto`` falls back to
    the torch backend and a forced backend raises with ``reason``."""
    if reason is None:
        return chosen
    if backend == "auto":
        return "torch"
    raise ValueError(f"{op}: backend={backend!r}: {reason}")
