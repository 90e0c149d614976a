"""Loading of the compiled extension and the build report."""
from __future__ import annotations

import importlib.util
import pathlib
import warnings
from typing import Any

import torch


def _missing_extension_reason(error: ImportError) -> str:
    """Why ``cbd_fast._C`` did not import, in words a user can act on (Python's own message for a missing
    submodule speaks of a circular import)."""
    package = pathlib.Path(__file__).resolve().parent
    if importlib.util.find_spec(f"{__package__}._C") is not None:
        return str(error)  # present but broken (e.g. built against another torch)
    root = package.parent
    if (root / "setup.py").is_file() and (root / "csrc").is_dir():
        return (f"cbd_fast was imported from its source tree {root}, which holds no compiled extension (the "
                f"current directory or PYTHONPATH comes before the installed package); run from another "
                f"directory to use the installed cbd_fast, or build in place with "
                f"`pip install --no-build-isolation -e .`")
    return f"cbd_fast was installed without its compiled extension (no _C module in {package})"


try:  # the extension registers the torch.ops.cbd_fast.* kernels on import
    from . import _C  # noqa: F401

    _EXTENSION_ERROR: str | None = None
except ImportError as exc:  # pure-Python fall-back: backend="torch" still works
    _C = None
    _EXTENSION_ERROR = _missing_extension_reason(exc)
    warnings.warn(f"{_EXTENSION_ERROR}. Every op falls back to the slow PyTorch backend.", RuntimeWarning,
                  stacklevel=2)


def has_extension() -> bool:
    """True when ``cbd_fast._C`` (the C++ CPU kernels) was built and imported."""
    return _C is not None


def has_cuda_kernels() -> bool:
    """True when the extension was compiled with its CUDA sources."""
    return _C is not None and bool(_C.compiled_config()["cuda"])


def require_extension(what: str) -> None:
    if _C is None:
        raise RuntimeError(f"{what} needs the compiled extension cbd_fast._C, which failed to import "
                           f"({_EXTENSION_ERROR}); reinstall with `pip install --no-build-isolation .` "
                           "or use backend='torch'")


def build_info() -> dict[str, Any]:
    """Which backends this installation has, and what they were built with.

    Keys: ``cpu`` (C++ kernels compiled), ``cuda`` (CUDA kernels compiled), ``cuda_device`` (name of the visible
    GPU or None), ``triton`` (Triton importable), ``triton_version``, ``openmp``, ``cpu_isa`` (the best instruction
    set of this CPU the C++ kernels use: ``avx512``, ``avx2`` or ``portable``; the environment variable
    ``CBD_FAST_CPU_ISA`` lowers it), ``cuda_version``, ``cuda_arch_list``, ``compiler``, ``built_with_torch``,
    ``torch`` (the running torch), ``extension_error``.
    """
    cfg = _C.compiled_config() if _C is not None else {}
    triton_version = None
    if importlib.util.find_spec("triton") is not None:
        try:
            import triton

            triton_version = triton.__version__
        except Exception:  # a broken triton install must not break the report
            triton_version = None
    return {
        "cpu": _C is not None,
        "cuda": bool(cfg.get("cuda", False)),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "triton": triton_version is not None,
        "triton_version": triton_version,
        "openmp": bool(cfg.get("openmp", False)),
        "cpu_isa": cfg.get("cpu_isa"),
        "cuda_version": cfg.get("cuda_version") or None,
        "cuda_arch_list": cfg.get("cuda_arch_list") or None,
        "compiler": cfg.get("compiler"),
        "built_with_torch": cfg.get("torch_version"),
        "torch": torch.__version__,
        "extension_error": _EXTENSION_ERROR,
    }
