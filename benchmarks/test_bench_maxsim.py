"""CPU timings and peak memory of the all-pairs score ``cbd_fast.maxsim`` (DESIGN §5, fp32).

Run from the repository root:

    python -m pytest benchmarks/test_bench_maxsim.py --benchmark-columns=median,min,max

Size: Bt = Bi = 64 texts and images, T = 32 text tokens, V = 50 image tokens, D = 256, "wti" weights. Each timed
call is forward + backward: ``score = maxsim(...)``, then the gradients of ``Σ G·score`` (G a fixed random
[Bt, Bi] upstream gradient) w.r.t. text, image and both weight logits. Variants:

* ``cpu``       -- ``cbd_fast.maxsim(..., backend="cpu")``: the C++ op (tiled similarities, arg-max backward).
* ``torch``     -- ``cbd_fast.maxsim(..., backend="torch")``: blocked plain PyTorch through autograd.
* ``reference`` -- ``cbd_fast.reference.maxsim`` with no chunking: one einsum to the whole [Bt, Bi, T, V]
                   similarity tensor, masked max, autograd (the naive version).

Three input sets (unit-norm token features, text padding of random length, random logits) are rotated by the
pedantic set-up, so consecutive rounds never see the same tensors. ``extra_info`` carries the FLOPs of the
similarity products (2·Bt·Bi·T·V·D, the same for every variant) and the peak CPU memory of one call, as seen
by the torch allocator (``benchmarks/_memory.py``).
"""
from __future__ import annotations

import itertools
from functools import lru_cache

import pytest
import torch

import cbd_fast
from _memory import peak_cpu_bytes  # benchmarks/ is on sys.path (rootdir-less test folder)
from cbd_fast import reference

NUM_TEXTS, NUM_IMAGES, TEXT_LEN, IMAGE_LEN, DIM = 64, 64, 32, 50, 256
NUM_INPUT_SETS = 3
SIMILARITY_FLOPS = 2 * NUM_TEXTS * NUM_IMAGES * TEXT_LEN * IMAGE_LEN * DIM
VARIANTS = {"cpu": 20, "torch": 10, "reference": 5}  # variant -> timed rounds


@lru_cache(maxsize=None)
def input_sets() -> tuple[dict, ...]:
    """NUM_INPUT_SETS argument dicts of maxsim (without the backend) and their upstream gradients."""
    sets = []
    for index in range(NUM_INPUT_SETS):
        gen = torch.Generator().manual_seed(100 + index)
        text_lengths = torch.randint(TEXT_LEN // 4, TEXT_LEN + 1, (NUM_TEXTS,), generator=gen)
        sets.append(dict(
            text=torch.nn.functional.normalize(torch.randn(NUM_TEXTS, TEXT_LEN, DIM, generator=gen), dim=-1),
            image=torch.nn.functional.normalize(torch.randn(NUM_IMAGES, IMAGE_LEN, DIM, generator=gen), dim=-1),
            text_mask=torch.arange(TEXT_LEN) < text_lengths[:, None],
            image_mask=torch.ones(NUM_IMAGES, IMAGE_LEN, dtype=torch.bool),
            text_weight=0.5 * torch.randn(NUM_TEXTS, TEXT_LEN, generator=gen),
            image_weight=0.5 * torch.randn(NUM_IMAGES, IMAGE_LEN, generator=gen),
            grad_score=torch.randn(NUM_TEXTS, NUM_IMAGES, generator=gen),
        ))
    return tuple(sets)


def rotating_inputs():
    """A pedantic ``setup``: the next input set, with fresh leaf copies of the differentiable tensors."""
    cycle = itertools.cycle(input_sets())

    def setup():
        inputs = dict(next(cycle))
        for name in ("text", "image", "text_weight", "image_weight"):
            inputs[name] = inputs[name].detach().requires_grad_(True)
        return (inputs,), {}

    return setup


def forward_backward(variant: str, inputs: dict) -> tuple[torch.Tensor, ...]:
    """(score, grad_text, grad_image, grad_text_weight, grad_image_weight) of one variant."""
    args = {name: value for name, value in inputs.items() if name != "grad_score"}
    if variant == "reference":
        score = reference.maxsim(**args, max_elements=2**40)  # one shot: the whole [Bt, Bi, T, V] tensor
    else:
        score = cbd_fast.maxsim(**args, backend=variant)
    leaves = (args["text"], args["image"], args["text_weight"], args["image_weight"])
    return (score.detach(), *torch.autograd.grad(score, leaves, grad_outputs=inputs["grad_score"]))


@pytest.mark.benchmark(group=f"maxsim forward+backward Bt=Bi={NUM_TEXTS} T={TEXT_LEN} V={IMAGE_LEN} D={DIM}")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_backward(benchmark, variant, maxsim_record):
    setup = rotating_inputs()
    (inputs,), _ = setup()
    peak = peak_cpu_bytes(lambda: forward_backward(variant, inputs))
    benchmark.extra_info.update(similarity_flops=SIMILARITY_FLOPS, peak_cpu_bytes=peak,
                                peak_cpu_mib=round(peak / 2**20, 2))
    outputs = benchmark.pedantic(lambda inputs: forward_backward(variant, inputs), setup=setup,
                                 rounds=VARIANTS[variant], warmup_rounds=1, iterations=1)
    assert all(torch.isfinite(x).all() for x in outputs) and outputs[1].abs().sum() > 0
    if not benchmark.disabled:
        maxsim_record(variant, benchmark.stats.stats.median, benchmark.stats.stats.min, peak)


def test_cpu_peak_memory_is_10x_below_the_reference():
    inputs = rotating_inputs()()[0][0]
    peaks = {variant: peak_cpu_bytes(lambda: forward_backward(variant, inputs)) for variant in ("cpu", "reference")}
    # The reference holds several [Bt, Bi, T, V] tensors (26 MB each in fp32); the op holds O(Bt·Bi·(T+V)).
    assert peaks["reference"] >= 10 * peaks["cpu"], peaks
    # Same numbers, so the comparison is between two correct computations.
    cpu, ref = forward_backward("cpu", inputs), forward_backward("reference", inputs)
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
