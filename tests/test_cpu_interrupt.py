"""Ctrl-C stops the C++ CPU kernels within a fraction of a second, and the caller gets KeyboardInterrupt.

Each case runs in a subprocess that starts an op which would take minutes to days (num_samples = 2**32 - 1, a
2000 × 2000 gallery), prints "started" just before the call and is sent SIGINT one second later.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import requires_extension

pytestmark = requires_extension

PROLOGUE = """
import signal, sys, time
import torch
import cbd_fast
assert cbd_fast.has_extension()  # loads the ops (import cbd_fast alone is lazy), for the raw torch.ops.cbd_fast case
signal.signal(signal.SIGINT, signal.default_int_handler)  # even where the parent ignores SIGINT
torch.set_num_threads({threads})
"""

CASES = {
    "banzhaf_paired_forward": """
        sim = torch.rand(1, 8, 12)
        run = lambda: cbd_fast.banzhaf_interaction(sim, num_samples=2**32 - 1, backend="cpu")
    """,
    "banzhaf_msr_forward": """
        sim = torch.rand(2, 8, 12)
        run = lambda: cbd_fast.banzhaf_interaction(sim, num_samples=2**32 - 1, estimator="msr", backend="cpu")
    """,
    "banzhaf_paired_backward": """
        sim = torch.rand(1, 8, 12)
        ones = torch.ones(1, 8, dtype=torch.bool), torch.ones(1, 12, dtype=torch.bool)
        weights = torch.zeros(1, 8), torch.zeros(1, 12)
        grads = torch.ones(1, 8, 12), torch.ones(1, 8), torch.ones(1, 12)
        run = lambda: torch.ops.cbd_fast.banzhaf_interaction_backward(*grads, sim, *ones, *weights, 2**32 - 1, 0,
                                                                      "paired")
    """,
    "maxsim_forward": """
        text, image = torch.randn(2000, 77, 128), torch.randn(2000, 50, 128)
        run = lambda: cbd_fast.maxsim(text, image, backend="cpu")
    """,
}

EPILOGUE = """
print("started", flush=True)
try:
    run()
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(3)
print("finished", flush=True)
"""


@pytest.mark.parametrize("case,threads", [("banzhaf_paired_forward", 1), ("banzhaf_paired_forward", 2),
                                          ("banzhaf_msr_forward", 2), ("banzhaf_paired_backward", 2),
                                          ("maxsim_forward", 2)])
def test_ctrl_c_stops_the_kernel(case, threads):
    script = PROLOGUE.format(threads=threads) + textwrap.dedent(CASES[case]) + EPILOGUE
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        assert process.stdout.readline().strip() == "started", process.stderr.read()
        time.sleep(1.0)  # well inside the op
        sent = time.monotonic()
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=30)
        latency = time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 3 and stdout.strip() == "interrupted", (process.returncode, stdout, stderr)
    assert latency < 5.0, f"stopped {latency:.2f} s after Ctrl-C"
