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


def test_cbd_train_placeholder_exits_nonzero():
    result = subprocess.run([sys.executable, "-c", "from cbd_fast.cli import train_main; raise SystemExit(train_main([]))"],
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "not built yet" in result.stderr
