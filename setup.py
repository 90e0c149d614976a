"""Build of cbd_fast and its compiled extension ``cbd_fast._C``.

The extension is compiled against the torch that is already installed, so build it without isolation:

    pip install --no-build-isolation .

C++ CPU kernels are always built (OpenMP). CUDA sources are added when the installed torch is a CUDA build and
nvcc is found, even without a visible GPU; ``CBD_FAST_CUDA=0|1|auto`` overrides (default ``auto``).
"""
import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:
    sys.exit("cbd_fast compiles against your installed torch: install torch>=2.11, then run "
             "`pip install --no-build-isolation .`")

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    """torch's guess of the toolkit, corrected when nvcc on PATH is a wrapper outside the toolkit."""
    home = cpp_extension.CUDA_HOME
    if home and not os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")):
        for candidate in ("/usr/local/cuda",):
            if os.path.exists(os.path.join(candidate, "include", "cuda_runtime_api.h")):
                cpp_extension.CUDA_HOME = candidate  # read by CUDAExtension and BuildExtension at build time
                home = candidate
                break
        else:
            return None
    return home


def _want_cuda() -> bool:
    mode = os.environ.get("CBD_FAST_CUDA", "auto").strip().lower()
    if mode not in ("0", "1", "auto"):
        sys.exit(f"CBD_FAST_CUDA must be 0, 1 or auto, got {mode!r}")
    home = _find_cuda_home() if torch.version.cuda is not None else None
    available = home is not None and os.path.exists(os.path.join(home, "bin", "nvcc"))
    if mode == "1" and not available:
        sys.exit("CBD_FAST_CUDA=1 but the installed torch is not a CUDA build or nvcc was not found "
                 f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME})")
    return available if mode == "auto" else mode == "1"


def _extension():
    with_cuda = _want_cuda()
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # The C++ standard is the one torch asks for. No -march: the CPU kernels carry their own AVX2 / AVX-512 versions,
    # chosen at run time (csrc/cpu/cpu_isa.h). -Wno-psabi: GCC notes that passing 32-byte vectors between functions
    # compiled without AVX changes the ABI; all such functions are inlined.
    cxx_flags = ["-O3", "-fopenmp", "-Wno-psabi"]
    define_macros = [("CBD_FAST_TORCH_VERSION", f'"{torch.__version__}"')]
    extra = {"cxx": cxx_flags}
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # No GPU to ask: build for the H100 (the target of the CUDA kernels).
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0a"
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "native")
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        define_macros += [("CBD_FAST_WITH_CUDA", None), ("CBD_FAST_CUDA_VERSION", f'"{torch.version.cuda}"'),
                          ("CBD_FAST_CUDA_ARCH_LIST", f'"{arch}"')]
        nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        if os.environ.get("CBD_FAST_PTXAS_VERBOSE", "0") == "1":
            nvcc_flags.append("-Xptxas=-v")
        extra["nvcc"] = nvcc_flags
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension
    return ext_cls(
        name="cbd_fast._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
