"""Argument checks shared by the public ops: every message names the argument and what was expected."""
from __future__ import annotations

import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_float_tensor(name: str, x, ndim: int, shape_doc: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {shape_doc}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have shape {shape_doc}, got {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {x.dtype}")


def check_same_device(ref_name: str, ref: torch.Tensor, name: str, x: torch.Tensor) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}; put them on one device")


def mask_or_default(name: str, mask, shape: tuple[int, ...], ref: torch.Tensor, shape_doc: str) -> torch.Tensor:
    """A validity mask: bool of exactly ``shape`` on ``ref``'s device; None means all valid."""
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=ref.device)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a bool tensor {shape_doc}, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor {shape_doc}, got dtype {mask.dtype} (use mask.bool())")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {shape_doc} = {tuple(shape)}, got {tuple(mask.shape)}")
    check_same_device("the input features", ref, name, mask)
    return mask


def weight_or_default(name: str, weight, shape: tuple[int, ...], ref: torch.Tensor, shape_doc: str) -> torch.Tensor:
    """Token weight logits: floating of exactly ``shape`` on ``ref``'s device; None means zeros (uniform)."""
    if weight is None:
        dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
        return torch.zeros(shape, dtype=dtype, device=ref.device)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name} must be a float tensor {shape_doc}, got {type(weight).__name__}")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor {shape_doc}, got dtype {weight.dtype}")
    if tuple(weight.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {shape_doc} = {tuple(shape)}, got {tuple(weight.shape)}")
    check_same_device("the input features", ref, name, weight)
    return weight


def check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def result_dtype(dtype: torch.dtype) -> torch.dtype:
    """Estimates and scores of half-precision inputs are accumulated and returned in float32."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def device_memory_bytes(device: torch.device) -> int | None:
    """Total memory of ``device`` (physical memory for the CPU), or None where it is not known (meta, others)."""
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # not a POSIX system that reports it
            return None
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).total_memory
    return None


def check_fits_in_memory(op: str, what: str, num_bytes: int, device: torch.device, advice: str) -> None:
    """Refuses, before allocating, a result of ``num_bytes`` that ``device`` could never hold: with memory
    overcommit the allocation itself may succeed and the process be killed while filling it."""
    total = device_memory_bytes(device)
    if total is not None and num_bytes > total:
        raise ValueError(f"{op}: {what} needs {num_bytes / 2**30:.4g} GiB, more than the {total / 2**30:.4g} GiB of "
                         f"{device} memory; {advice}")
