"""GPU timings of the fused Banzhaf pass and of MaxSim: Triton and CUDA kernels against the PyTorch versions.

Run on a machine with a CUDA device, from the repository root:

    python -m pytest benchmarks/test_bench_gpu.py --benchmark-columns=median,min,rounds

Skipped without a GPU. Every timed function ends with ``torch.cuda.synchronize()``; three input sets (different
features and Philox seeds) are rotated by the pedantic set-up, so no round re-times a cached result. The summary
(medians, ratios, roofline fractions) is printed and written to ``benchmarks/results/gpu_<device>.md`` by
``benchmarks/conftest.py``.

Banzhaf (``estimator="paired"``), groups per size and dtype:

* ``triton`` / ``cuda``     -- ``banzhaf_interaction_from_tokens(..., backend=...)``: similarity computed inside the
                               fused kernel, then the O(T·V)-per-draw paired pass;
* ``triton_sim`` / ``cuda_sim`` -- ``banzhaf_interaction`` on a precomputed ``sim`` (the GEMM excluded);
* ``torch``                 -- the vectorised PyTorch backend on the same GPU (bmm + the paired algorithm);
* ``per_pair``              -- the research-code loop over token pairs (one pair of the batch, small K), per draw.

Arithmetic floor of the fused paired pass (stated so that the "fraction of floor" column can be checked): per
draw, per pair and per token cell (t, u), each of the two halves of the game does about 24 fp32 instructions —
top-two maxima (3: compare, two selects), the two column sums over the members (2 × (compare, select, FMA) = 6),
and the four-value second difference (two maxima of the cell, 2 × 2, four affine terms with shared reciprocals,
2 × 4 FMA/MUL, the running sum, ~15) — so ``OPS_PER_CELL = 48`` instructions. An H100 SXM issues
132 SMs × 128 fp32 lanes × 1.98 GHz = 3.35e13 fp32 instructions/s, so the floor is
``B·K·T·V · 48 / 3.35e13``: 0.30 ms at the anchor B=128, T=32, V=50, K=1024 (the GEMM, 2·B·T·V·D = 0.2 GFLOP, is
negligible next to it, and the inputs, 128·82·512 features, are 21 MB of reads in fp32). Memory is not the
limit: everything per draw stays on chip.

MaxSim floor: the similarity GEMMs, 2·Bt·Bi·T·V·D FLOPs forward (twice more for the backward's recomputation and
two gradient GEMMs, so 4× in total for forward+backward), at the dense tensor-core peak (bf16 989 TFLOP/s, tf32
495 TFLOP/s on an H100 SXM), or the bytes of the inputs at 3.35 TB/s, whichever is larger.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache

import pytest
import torch

import cbd_fast
from cbd_fast import reference
from cbd_fast.reference import banzhaf as banzhaf_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmarks need a CUDA device")

NUM_INPUT_SETS = 3
H100_FP32_INSTRUCTIONS_PER_S = 132 * 128 * 1.98e9
H100_TENSOR_FLOPS = {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 495e12}  # dense; fp32 as tf32
H100_BYTES_PER_S = 3.35e12
OPS_PER_CELL = 48
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# name -> (B, T, V, D, K)
BANZHAF_SIZES = {"anchor": (128, 32, 50, 512, 1024), "vit_b16": (128, 77, 197, 512, 256)}
# name -> (Bt, Bi, T, V, D)
MAXSIM_SIZES = {"batch": (128, 128, 32, 50, 512), "gallery": (1024, 1024, 32, 50, 512)}


def synchronized(fn):
    def run(*args, **kwargs):
        out = fn(*args, **kwargs)
        torch.cuda.synchronize()
        return out

    return run


# --- Banzhaf -------------------------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def banzhaf_inputs(size: str, dtype_name: str) -> tuple[dict, ...]:
    batch, text_len, image_len, dim, _ = BANZHAF_SIZES[size]
    dtype = DTYPES[dtype_name]
    sets = []
    for index in range(NUM_INPUT_SETS):
        gen = torch.Generator(device="cuda").manual_seed(10 + index)
        text = torch.nn.functional.normalize(torch.randn(batch, text_len, dim, device="cuda", generator=gen), dim=-1)
        image = torch.nn.functional.normalize(torch.randn(batch, image_len, dim, device="cuda", generator=gen),
                                              dim=-1)
        sets.append(dict(text=text.to(dtype), image=image.to(dtype),
                         text_weight=0.5 * torch.randn(batch, text_len, device="cuda", generator=gen),
                         image_weight=0.5 * torch.randn(batch, image_len, device="cuda", generator=gen),
                         seed=1000 + index))
    return tuple(sets)


def sim_of(inputs: dict) -> torch.Tensor:
    return torch.bmm(inputs["text"].float(), inputs["image"].float().transpose(1, 2))


def run_banzhaf(variant: str, inputs: dict, sim: torch.Tensor | None, num_samples: int):
    common = dict(text_weight=inputs["text_weight"], image_weight=inputs["image_weight"], num_samples=num_samples,
                  seed=inputs["seed"])
    if variant.endswith("_sim"):
        return cbd_fast.banzhaf_interaction(sim, **common, backend=variant[:-4])
    if variant == "per_pair":
        return banzhaf_reference.banzhaf_interaction_per_pair_mc(sim[:1], text_weight=inputs["text_weight"][:1],
                                                                 image_weight=inputs["image_weight"][:1],
                                                                 num_samples=num_samples, seed=inputs["seed"])
    return cbd_fast.banzhaf_interaction_from_tokens(inputs["text"], inputs["image"], **common, backend=variant)


def available(variant: str) -> bool:
    backend = variant.removesuffix("_sim")
    if backend == "cuda":
        return cbd_fast.build_info()["cuda"]
    if backend == "triton":
        return cbd_fast.build_info()["triton"]
    return True


@dataclass(frozen=True)
class BanzhafCase:
    size: str
    dtype: str
    variant: str
    num_samples: int
    rounds: int


def banzhaf_cases():
    out = []
    for size, dtype in (("anchor", "fp32"), ("anchor", "bf16"), ("vit_b16", "bf16")):
        k = BANZHAF_SIZES[size][4]
        variants = [("triton", k, 20), ("cuda", k, 20), ("triton_sim", k, 20), ("cuda_sim", k, 20),
                    ("torch", 64, 3)]
        if size == "anchor" and dtype == "fp32":
            variants.append(("per_pair", 4, 3))
        for variant, num_samples, rounds in variants:
            case = BanzhafCase(size, dtype, variant, num_samples, rounds)
            out.append(pytest.param(case, id=f"{size}-{dtype}-{variant}-K{num_samples}",
                                    marks=pytest.mark.benchmark(group=f"banzhaf {size} {dtype}")))
    return out


@pytest.mark.parametrize("case", banzhaf_cases())
def test_banzhaf_forward(benchmark, gpu_record, case: BanzhafCase):
    if not available(case.variant):
        pytest.skip(f"{case.variant} kernels not available in this build")
    batch, text_len, image_len, dim, _ = BANZHAF_SIZES[case.size]
    num_samples = 1 if benchmark.disabled else case.num_samples
    cycle = itertools.cycle([(inputs, sim_of(inputs)) for inputs in banzhaf_inputs(case.size, case.dtype)])

    def setup():
        return next(cycle), {}

    timed = synchronized(lambda inputs, sim: run_banzhaf(case.variant, inputs, sim, num_samples))
    result = benchmark.pedantic(timed, setup=setup, rounds=case.rounds, warmup_rounds=1, iterations=1)
    interaction = result if case.variant == "per_pair" else result.interaction
    assert torch.isfinite(interaction).all() and interaction.abs().sum() > 0
    pairs = 1 if case.variant == "per_pair" else batch
    cells = pairs * num_samples * text_len * image_len
    # The per-pair loop draws fresh coalitions for every token pair: one "draw of a whole T×V map" costs it T·V
    # draws; per_draw_us puts every variant on that unit.
    draws_of_map = num_samples * pairs / (text_len * image_len if case.variant == "per_pair" else 1)
    floor_s = cells * OPS_PER_CELL / H100_FP32_INSTRUCTIONS_PER_S
    benchmark.extra_info.update(B=pairs, T=text_len, V=image_len, D=dim, K=num_samples, dtype=case.dtype,
                                ops=cells * OPS_PER_CELL, gemm_flops=2 * pairs * text_len * image_len * dim,
                                bytes=(text_len + image_len) * dim * pairs * DTYPES[case.dtype].itemsize,
                                floor_s=floor_s)
    if benchmark.disabled:
        return
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(per_draw_us=median / draws_of_map * 1e6, fraction_of_floor=floor_s / median)
    gpu_record("banzhaf", (case.size, case.dtype, case.variant), median, benchmark.stats.stats.min,
               dict(benchmark.extra_info))


# --- MaxSim --------------------------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def maxsim_inputs(size: str, dtype_name: str) -> tuple[dict, ...]:
    num_texts, num_images, text_len, image_len, dim = MAXSIM_SIZES[size]
    dtype = DTYPES[dtype_name]
    sets = []
    for index in range(NUM_INPUT_SETS):
        gen = torch.Generator(device="cuda").manual_seed(20 + index)
        lengths = torch.randint(text_len // 4, text_len + 1, (num_texts,), device="cuda", generator=gen)
        sets.append(dict(
            text=torch.nn.functional.normalize(
                torch.randn(num_texts, text_len, dim, device="cuda", generator=gen), dim=-1).to(dtype),
            image=torch.nn.functional.normalize(
                torch.randn(num_images, image_len, dim, device="cuda", generator=gen), dim=-1).to(dtype),
            text_mask=torch.arange(text_len, device="cuda") < lengths[:, None],
            text_weight=0.5 * torch.randn(num_texts, text_len, device="cuda", generator=gen),
            image_weight=0.5 * torch.randn(num_images, image_len, device="cuda", generator=gen),
            grad_score=torch.randn(num_texts, num_images, device="cuda", generator=gen)))
    return tuple(sets)


def maxsim_step(variant: str, inputs: dict, backward: bool):
    args = {k: v for k, v in inputs.items() if k != "grad_score"}
    if backward:
        for name in ("text", "image", "text_weight", "image_weight"):
            args[name] = args[name].detach().requires_grad_(True)
    if variant == "reference":
        score = reference.maxsim(**args, max_elements=2**40)  # one einsum over the whole [Bt, Bi, T, V] tensor
    else:
        score = cbd_fast.maxsim(**args, backend=variant)
    if not backward:
        return (score,)
    leaves = (args["text"], args["image"], args["text_weight"], args["image_weight"])
    return (score.detach(), *torch.autograd.grad(score, leaves, grad_outputs=inputs["grad_score"]))


def maxsim_cases():
    out = []
    for size, dtype, mode in (("batch", "fp32", "forward+backward"), ("batch", "bf16", "forward+backward"),
                              ("gallery", "bf16", "forward"), ("gallery", "fp32", "forward")):
        variants = ["triton", "cuda", "torch", "reference"]
        if size == "gallery":
            variants.remove("reference")  # [1024, 1024, 32, 50] fp32 = 6.7 GB per intermediate
        for variant in variants:
            out.append(pytest.param((size, dtype, mode, variant), id=f"{size}-{dtype}-{mode}-{variant}",
                                    marks=pytest.mark.benchmark(group=f"maxsim {size} {dtype} {mode}")))
    return out


@pytest.mark.parametrize("case", maxsim_cases())
def test_maxsim(benchmark, gpu_record, case):
    size, dtype_name, mode, variant = case
    if not available(variant):
        pytest.skip(f"{variant} kernels not available in this build")
    num_texts, num_images, text_len, image_len, dim = MAXSIM_SIZES[size]
    backward = mode == "forward+backward"
    cycle = itertools.cycle(maxsim_inputs(size, dtype_name))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    synchronized(maxsim_step)(variant, next(cycle), backward)
    peak = torch.cuda.max_memory_allocated() - base

    def setup():
        return (next(cycle),), {}

    timed = synchronized(lambda inputs: maxsim_step(variant, inputs, backward))
    outputs = benchmark.pedantic(timed, setup=setup, rounds=3 if variant == "reference" else 20, warmup_rounds=1,
                                 iterations=1)
    assert all(torch.isfinite(x).all() for x in outputs)
    flops = 2 * num_texts * num_images * text_len * image_len * dim * (4 if backward else 1)
    dtype = DTYPES[dtype_name]
    read_bytes = (num_texts * text_len + num_images * image_len) * dim * dtype.itemsize
    floor_s = max(flops / H100_TENSOR_FLOPS[dtype], read_bytes / H100_BYTES_PER_S)
    benchmark.extra_info.update(flops=flops, bytes=read_bytes, floor_s=floor_s, peak_bytes=peak)
    if benchmark.disabled:
        return
    median = benchmark.stats.stats.median
    benchmark.extra_info["fraction_of_floor"] = floor_s / median
    gpu_record("maxsim", (size, dtype_name, mode, variant), median, benchmark.stats.stats.min,
               dict(benchmark.extra_info))


@pytest.fixture
def gpu_record(request):
    from conftest import GPU_KEY

    results = request.config.stash[GPU_KEY]

    def record(kind, key, median, minimum, extra):
        results.setdefault(kind, {})[key] = dict(extra, median_s=median, min_s=minimum)

    return record

