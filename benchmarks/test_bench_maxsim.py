"""CPU timings and peak memory of the all-pairs score ``cbd_fast.maxsim`` (DESIGN §5, fp32), at 1 and 2 threads.

Run from the repository root:

    python -m pytest benchmarks/test_bench_maxsim.py --benchmark-columns=median,min,max

Sizes:

* ``batch``: a training batch, Bt = Bi = 64 texts and images, T = 32 text tokens, V = 50 image tokens, D = 256,
  "wti" weights; each timed call is forward + backward: ``score = maxsim(...)``, then the gradients of
  ``Σ G·score`` (G a fixed random [Bt, Bi] upstream gradient) w.r.t. text, image and both weight logits.
* ``gallery``: scoring a gallery, Bt = Bi = 256, T = 77, V = 50, D = 512, forward only under ``torch.no_grad()``
  (what evaluation does). The einsum reference is not run here (it would hold a 1 GB similarity tensor and is
  slower than the torch backend).

Variants:

* ``cpu``       -- ``cbd_fast.maxsim(..., backend="cpu")``: the C++ op (similarity tiles from a packed FMA
                   micro-kernel, maxima folded per tile, backward recomputes the maxima).
* ``torch``     -- ``cbd_fast.maxsim(..., backend="torch")``: blocked plain PyTorch through autograd.
* ``reference`` -- ``cbd_fast.reference.maxsim`` with no chunking: one einsum to the whole [Bt, Bi, T, V]
                   similarity tensor, masked max, autograd (the naive version).

Roofline: the similarity GEMMs, 2·Bt·Bi·T·V·D FLOPs forward and 4× that forward+backward (a dense implementation
recomputes or stores the similarities and runs two gradient GEMMs), at the rate of this machine's BLAS GEMM
(``torch.mm``, MKL) measured in the same session at the same thread count. "Fraction of floor" = floor / median;
above 1 means faster than the BLAS rate allows a GEMM-based implementation to be.

Three input sets (unit-norm token features, text padding of random length, random logits) are rotated by the
pedantic set-up, so consecutive rounds never see the same tensors. Peak memory is the CPU allocator's high-water
mark during one call (``benchmarks/_memory.py``). Under ``--benchmark-disable`` the gallery is 16 × 16.
"""
from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from functools import lru_cache

import pytest
import torch

import cbd_fast
from _memory import peak_cpu_bytes  # benchmarks/ is on sys.path (rootdir-less test folder)
from cbd_fast import reference

# name -> (Bt, Bi, T, V, D, mode)
SIZES = {"batch": (64, 64, 32, 50, 256, "forward+backward"), "gallery": (256, 256, 77, 50, 512, "forward")}
SMOKE_GALLERY = 16
NUM_INPUT_SETS = 3


@dataclass(frozen=True)
class Case:
    size: str
    variant: str
    rounds: int
    threads: int


CASES = [pytest.param(case, id=f"{case.size}-{case.variant}-{case.threads}t",
                      marks=pytest.mark.benchmark(group=f"maxsim {case.size} {SIZES[case.size][5]} "
                                                        f"({case.threads} thread{'s' if case.threads > 1 else ''})"))
         for threads in (1, 2)
         for case in (Case("batch", "cpu", 20, threads), Case("batch", "torch", 10, threads),
                      Case("batch", "reference", 5, threads), Case("gallery", "cpu", 5, threads),
                      Case("gallery", "torch", 3, threads))]


def sizes(size: str, smoke: bool) -> tuple[int, int, int, int, int, str]:
    num_texts, num_images, text_len, image_len, dim, mode = SIZES[size]
    if smoke and size == "gallery":
        num_texts = num_images = SMOKE_GALLERY
    return num_texts, num_images, text_len, image_len, dim, mode


@lru_cache(maxsize=None)
def input_sets(size: str, smoke: bool) -> tuple[dict, ...]:
    """NUM_INPUT_SETS argument dicts of maxsim (without the backend) and their upstream gradients."""
    num_texts, num_images, text_len, image_len, dim, _ = sizes(size, smoke)
    sets = []
    for index in range(NUM_INPUT_SETS):
        gen = torch.Generator().manual_seed(100 + index)
        text_lengths = torch.randint(text_len // 4, text_len + 1, (num_texts,), generator=gen)
        sets.append(dict(
            text=torch.nn.functional.normalize(torch.randn(num_texts, text_len, dim, generator=gen), dim=-1),
            image=torch.nn.functional.normalize(torch.randn(num_images, image_len, dim, generator=gen), dim=-1),
            text_mask=torch.arange(text_len) < text_lengths[:, None],
            image_mask=torch.ones(num_images, image_len, dtype=torch.bool),
            text_weight=0.5 * torch.randn(num_texts, text_len, generator=gen),
            image_weight=0.5 * torch.randn(num_images, image_len, generator=gen),
            grad_score=torch.randn(num_texts, num_images, generator=gen),
        ))
    return tuple(sets)


def rotating_inputs(size: str, smoke: bool):
    """A pedantic ``setup``: the next input set, with fresh leaf copies of the differentiable tensors."""
    cycle = itertools.cycle(input_sets(size, smoke))
    with_grad = SIZES[size][5] == "forward+backward"

    def setup():
        inputs = dict(next(cycle))
        for name in ("text", "image", "text_weight", "image_weight"):
            inputs[name] = inputs[name].detach().requires_grad_(with_grad)
        return (inputs,), {}

    return setup


def run(variant: str, inputs: dict, mode: str) -> tuple[torch.Tensor, ...]:
    """(score,) forward under no_grad, or (score, grad_text, grad_image, grad_text_weight, grad_image_weight)."""
    args = {name: value for name, value in inputs.items() if name != "grad_score"}
    context = torch.no_grad() if mode == "forward" else contextlib.nullcontext()
    with context:
        if variant == "reference":
            score = reference.maxsim(**args, max_elements=2**40)  # one shot: the whole [Bt, Bi, T, V] tensor
        else:
            score = cbd_fast.maxsim(**args, backend=variant)
    if mode == "forward":
        return (score,)
    leaves = (args["text"], args["image"], args["text_weight"], args["image_weight"])
    return (score.detach(), *torch.autograd.grad(score, leaves, grad_outputs=inputs["grad_score"]))


@pytest.mark.parametrize("case", CASES)
def test_maxsim(benchmark, maxsim_record, case: Case):
    num_texts, num_images, text_len, image_len, dim, mode = sizes(case.size, benchmark.disabled)
    torch.set_num_threads(case.threads)
    setup = rotating_inputs(case.size, benchmark.disabled)
    (inputs,), _ = setup()
    peak = peak_cpu_bytes(lambda: run(case.variant, inputs, mode))
    flops = 2 * num_texts * num_images * text_len * image_len * dim * (4 if mode == "forward+backward" else 1)
    benchmark.extra_info.update(mode=mode, threads=case.threads, floor_flops=flops, peak_cpu_bytes=peak,
                                peak_cpu_mib=round(peak / 2**20, 2))
    outputs = benchmark.pedantic(lambda inputs: run(case.variant, inputs, mode), setup=setup, rounds=case.rounds,
                                 warmup_rounds=1, iterations=1)
    assert all(torch.isfinite(x).all() for x in outputs) and outputs[-1].abs().sum() > 0
    if not benchmark.disabled:
        maxsim_record(case.size, mode, case.variant, case.threads, benchmark.stats.stats.median,
                      benchmark.stats.stats.min, peak, flops)


def test_cpu_peak_memory_is_10x_below_the_reference():
    torch.set_num_threads(1)
    inputs = rotating_inputs("batch", False)()[0][0]
    peaks = {variant: peak_cpu_bytes(lambda: run(variant, inputs, "forward+backward"))
             for variant in ("cpu", "reference")}
    # The reference holds several [Bt, Bi, T, V] tensors (26 MB each in fp32); the op holds O(Bt·Bi·(T+V)).
    assert peaks["reference"] >= 10 * peaks["cpu"], peaks
    # Same numbers, so the comparison is between two correct computations.
    cpu, ref = run("cpu", inputs, "forward+backward"), run("reference", inputs, "forward+backward")
    for got, expected in zip(cpu, ref):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_peak_cpu_bytes_measures_the_high_water_mark():
    def allocate_and_free():
        first = torch.empty(25_000_000)  # 100 MB
        del first
        second = torch.empty(12_500_000)  # 50 MB, after the first was freed
        both = (second, torch.empty(5_000_000))  # + 20 MB held together with it
        return both

    assert abs(peak_cpu_bytes(lambda: torch.empty(25_000_000)) - 100_000_000) < 100_000
    assert abs(peak_cpu_bytes(allocate_and_free) - 100_000_000) < 100_000  # max of 100 and 50 + 20, not the sum
    assert peak_cpu_bytes(lambda: None) == 0
