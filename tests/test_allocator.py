"""The training process keeps large freed blocks (cbd_fast/train/allocator.py): the buffers a step frees and
allocates again stop costing page faults."""
import os
import platform
import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
from cbd_fast.train.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory() and keep_freed_memory()  # applied, and a second call is a no-op
faults = []
for _ in range(20):  # what a step does to the token embedding's gradient at the tiny preset, twice
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x, y = torch.ones(49408, 64), torch.ones(49408, 64)
    del x, y
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[-3:]))
"""


def _faults_of_the_last_rounds(mode: str) -> int:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD")}
    if mode == "mmap":  # glibc's initial threshold, held fixed: every 12.6 MB block is a fresh mapping (its dynamic
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"  # default raises the threshold on some runs and not on others)
    result = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")
def test_freed_blocks_are_reused_without_page_faults():
    assert _faults_of_the_last_rounds("mmap") > 3000  # fresh pages for every 12.6 MB buffer
    assert _faults_of_the_last_rounds("keep") < 100


def test_the_user_s_allocator_settings_win(monkeypatch):
    import cbd_fast.train.allocator as allocator

    monkeypatch.setattr(allocator, "_applied", False)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert allocator.keep_freed_memory() is False
