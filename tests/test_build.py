"""The installed package: compiled backends, build report, console script."""
import os
import subprocess
import sys

import pytest

import cbd_fast


def test_build_info_reports_backends():
    info = cbd_fast.build_info()
    for key in ("cpu", "cuda", "triton", "openmp", "torch", "cuda_device"):
        assert key in info
    assert info["cpu"] == cbd_fast.has_extension()
    if info["cpu"]:
        assert info["openmp"], "the C++ kernels must be compiled with OpenMP"
        assert info["built_with_torch"]


@pytest.mark.skipif(os.environ.get("CBD_FAST_REQUIRE_EXTENSION") != "1",
                    reason="set CBD_FAST_REQUIRE_EXTENSION=1 where the compiled kernels must be present (CI)")
def test_extension_and_cuda_sources_were_built():
    info = cbd_fast.build_info()
    assert info["cpu"], info["extension_error"]
    assert info["cuda"], "CI builds with a CUDA torch and nvcc: the CUDA sources must be compiled in"


def test_console_scripts_show_help():
    for module_main in ("train_main", "eval_main"):
        result = subprocess.run([sys.executable, "-c", f"from cbd_fast.cli import {module_main}; {module_main}(['--help'])"],
                                capture_output=True, text=True)
        assert result.returncode == 0 and "usage:" in result.stdout
