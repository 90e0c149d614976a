"""What a kernel module lists for the sm_90a compile check: one :class:`CompileSpec` per kernel configuration.

Its own module so that the kernel modules and the compiler driver (``_compile.py``, which imports the kernel
modules to collect their specs) both depend on it and not on each other.
"""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class CompileSpec:
    """One kernel configuration: ``signature`` maps every argument to a Triton type (``"*fp32"``, ``"i32"``,
    ``"constexpr"``...), ``constexprs`` gives the constexpr values."""
    name: str
    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 2
