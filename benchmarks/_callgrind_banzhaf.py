"""Run under callgrind by benchmarks/conftest.py: one C++ paired forward at the anchor size (one thread, the AVX2
version), whose kernel instructions callgrind counts (--toggle-collect on the work-item function)."""
from __future__ import annotations

import os

os.environ["CBD_FAST_CPU_ISA"] = "avx2"  # valgrind runs AVX2 but not AVX-512; the Banzhaf kernels stop at AVX2

import torch  # noqa: E402

import cbd_fast  # noqa: E402
from test_bench_banzhaf import SIZES, input_sets  # noqa: E402  (benchmarks/ is on sys.path)

NUM_SAMPLES = 256


def main() -> None:
    torch.set_num_threads(1)
    out = cbd_fast.banzhaf_interaction(**input_sets("anchor")[0], num_samples=NUM_SAMPLES, backend="cpu")
    assert torch.isfinite(out.interaction).all()
    batch, text_len, image_len = SIZES["anchor"]
    print(f"cells {NUM_SAMPLES * batch * text_len * image_len}")


if __name__ == "__main__":
    main()
