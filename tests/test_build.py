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


def test_every_subpackage_is_installed():
    """pyproject.toml lists the packages to install one by one: a new subpackage missing there works in an
    editable install and fails in a wheel."""
    import pathlib

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    root = pathlib.Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    in_tree = {".".join(init.parent.relative_to(root).parts) for init in (root / "cbd_fast").rglob("__init__.py")}
    assert in_tree <= listed, sorted(in_tree - listed)
    for package in sorted(listed - {"cbd_fast.kernels", "cbd_fast.configs"}):  # mapped from other folders
        assert (root / package.replace(".", "/") / "__init__.py").is_file(), package
