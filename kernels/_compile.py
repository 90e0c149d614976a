"""Compile Triton kernels for an H100 (sm_90a) without a GPU and read their register and spill counts.

Triton lowers a kernel to PTX on any machine; its bundled ``ptxas -v`` then reports registers per thread and
spill bytes for the target. Used by the CI check that no kernel spills (``python -m cbd_fast.kernels._compile``
prints one JSON line per kernel configuration) and by the benchmarks' context.

Kernel modules list what to check in ``compile_specs()``: a list of :class:`~._spec.CompileSpec`.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Any

from ._spec import CompileSpec

SM90 = 90


def _ptxas() -> str:
    from triton.backends.nvidia import compiler as nvidia_compiler

    return nvidia_compiler.get_ptxas(SM90).path


def resource_usage(spec: CompileSpec, capability: int = SM90) -> dict[str, Any]:
    """Registers per thread, spill store/load bytes and static shared memory of ``spec`` compiled for sm_90a."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("resource_usage compiles real kernels: run it without TRITON_INTERPRET=1")
    source = ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    arch = f"sm_{capability}a"
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path = os.path.join(tmp, "kernel.ptx")
        with open(ptx_path, "w") as f:
            f.write(compiled.asm["ptx"])
        out = subprocess.run([_ptxas(), "-v", f"--gpu-name={arch}", ptx_path, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True)
    report = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    return {"name": spec.name, "arch": arch, "num_warps": spec.num_warps,
            "registers": int(regs.group(1)) if regs else None,
            "spill_stores": int(spills.group(1)) if spills else None,
            "spill_loads": int(spills.group(2)) if spills else None,
            "shared_bytes": compiled.metadata.shared}


def all_specs() -> list[CompileSpec]:
    """The configurations every kernel module of the package lists."""
    from . import banzhaf, maxsim

    return [*banzhaf.compile_specs(), *maxsim.compile_specs()]


def main() -> int:
    for spec in all_specs():
        print(json.dumps(resource_usage(spec)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
