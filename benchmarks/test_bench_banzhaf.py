"""CPU timings of the Banzhaf interaction op (DESIGN §4, ``estimator="paired"``, fp32), at 1 and 2 threads.

What is measured (median over rounds, one call per round, inputs rotated between rounds):

* ``cpu``       -- ``cbd_fast.banzhaf_interaction(..., backend="cpu")``: the fused C++ kernel, O(T·V) per draw.
* ``torch``     -- the same algorithm vectorised in PyTorch (``backend="torch"``).
* ``reference`` -- ``cbd_fast.reference.banzhaf.banzhaf_interaction``: the definition-level estimate, four game
                   values per token pair per draw, vectorised and chunked (the correctness oracle).
* ``per_pair``  -- ``banzhaf_interaction_per_pair_mc``: the textbook research-code loop, a Python loop over token
                   pairs (i, j) with fresh coalitions for every pair. Far too slow for a whole batch, so it runs on
                   one pair of the batch (B=1) at a small K.

Groups: forward at the anchor size (B=8, T=32, V=50, K=256) and at a CLIP-like size (B=16, T=77, V=197),
forward+backward at the anchor size (loss = interaction.sum() + text_value.sum() + image_value.sum(), through
autograd), and the per-pair loop. The C++ and torch backends run with 1 and 2 torch threads, the slow oracles
with 1. Where noted a variant runs fewer draws than the fast ones, so every row carries the time per cell:

* batched variants: median / (K·B·T·V), the time to update one interaction cell (t, u) of one pair for one draw
  (a draw of a pair updates all its T·V cells and its T+V values);
* per-pair loop: median / (K·T·V), the same unit of work (one draw for each token pair of the one image-text pair).

Roofline: the fused pass needs about 48 fp32 operations per cell (both halves' top-two maxima, column sums over
the members and second differences; the derivation is in test_bench_gpu.py), i.e. 6 instructions of 8 float lanes
(AVX2); forward+backward 4× that (the forward, its recomputation in the backward, and the backward's two passes
over the cells). In the full run callgrind counts the instructions of the C++ forward (AVX2 version, one
thread); the machine's instruction rate is that count over the C++ forward's median, and a row's floor is its
cells × floor instructions at that rate (× threads). "Fraction of floor" = floor / median: for the C++ forward at
one thread it is exactly floor instructions / executed instructions.

Each test rotates three pre-generated input sets (different similarities and Philox seeds), so no round re-times a
result that something could have cached. All tokens are valid (the worst case for every backend, and it keeps
"pairs" and "draws" unambiguous); token weight logits are random so the weighted path is exercised.

The session-end summary is printed and written to ``benchmarks/results/cpu_banzhaf.md`` by
``benchmarks/conftest.py``. Under ``--benchmark-disable`` (the CI smoke test) every variant runs once with at most
``SMOKE_MAX_SAMPLES`` draws (the CLIP-size reference is skipped: one draw of its 16 pairs takes seconds), callgrind
does not run, and nothing is recorded.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache

import pytest
import torch

import cbd_fast
from cbd_fast.reference import banzhaf as reference

NUM_INPUT_SETS = 3
FEATURE_DIM = 64
SMOKE_MAX_SAMPLES = 2

# name -> (B, T, V)
SIZES = {"anchor": (8, 32, 50), "clip": (16, 77, 197)}


# --- inputs --------------------------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def input_sets(size: str) -> tuple[dict, ...]:
    """NUM_INPUT_SETS argument dicts for one size: cosine similarities of random unit token features, all tokens
    valid, random weight logits, and a distinct Philox seed per set."""
    batch, text_len, image_len = SIZES[size]
    sets = []
    for index in range(NUM_INPUT_SETS):
        gen = torch.Generator().manual_seed(1234 + index)
        text = torch.nn.functional.normalize(torch.randn(batch, text_len, FEATURE_DIM, generator=gen), dim=-1)
        image = torch.nn.functional.normalize(torch.randn(batch, image_len, FEATURE_DIM, generator=gen), dim=-1)
        sets.append(dict(
            sim=torch.bmm(text, image.transpose(1, 2)).contiguous(),
            text_mask=torch.ones(batch, text_len, dtype=torch.bool),
            image_mask=torch.ones(batch, image_len, dtype=torch.bool),
            text_weight=0.5 * torch.randn(batch, text_len, generator=gen),
            image_weight=0.5 * torch.randn(batch, image_len, generator=gen),
            seed=1000 + index,
        ))
    return tuple(sets)


def rotating(size: str, prepare=lambda inputs: inputs):
    """A pedantic ``setup``: each call hands the next input set (after ``prepare``, run outside the timing)."""
    cycle = itertools.cycle(input_sets(size))

    def setup():
        return (prepare(next(cycle)),), {}

    return setup


def with_grad(inputs: dict) -> dict:
    """Fresh leaf copies of the differentiable inputs (sim and both weight logits)."""
    out = dict(inputs)
    for name in ("sim", "text_weight", "image_weight"):
        out[name] = inputs[name].clone().requires_grad_(True)
    return out


# --- the variants --------------------------------------------------------------------------------------------------

def run_variant(variant: str, inputs: dict, num_samples: int):
    """(interaction, text_value, image_value) of one batched variant."""
    if variant == "reference":
        return reference.banzhaf_interaction(**inputs, num_samples=num_samples)
    return cbd_fast.banzhaf_interaction(**inputs, num_samples=num_samples, backend=variant)


def forward_backward(variant: str, inputs: dict, num_samples: int) -> torch.Tensor:
    interaction, text_value, image_value = run_variant(variant, inputs, num_samples)
    (interaction.sum() + text_value.sum() + image_value.sum()).backward()
    return inputs["sim"].grad


def check_output(tensor: torch.Tensor) -> None:
    assert torch.isfinite(tensor).all() and tensor.abs().sum() > 0


@dataclass(frozen=True)
class Case:
    size: str
    variant: str
    num_samples: int  # K
    rounds: int
    threads: int = 1
    warmup_rounds: int = 0
    smoke: bool = True  # False: skipped under --benchmark-disable (too slow for a smoke test even at small K)


def cases(group: str, *items: Case):
    return [pytest.param(case, id=f"{case.size}-{case.variant}-K{case.num_samples}-{case.threads}t",
                         marks=pytest.mark.benchmark(group=f"{group} ({case.threads} thread"
                                                               f"{'s' if case.threads > 1 else ''})"))
            for case in items]


def both_thread_counts(*items: Case) -> tuple[Case, ...]:
    return tuple(Case(**{**case.__dict__, "threads": threads}) for threads in (1, 2) for case in items)


FORWARD_CASES = (
    cases("forward anchor B=8 T=32 V=50",
          *both_thread_counts(Case("anchor", "cpu", 256, rounds=15, warmup_rounds=1),
                              Case("anchor", "torch", 256, rounds=3)),
          Case("anchor", "reference", 64, rounds=3))  # fewer draws: compare per cell
    + cases("forward clip B=16 T=77 V=197",
            *both_thread_counts(Case("clip", "cpu", 256, rounds=5, warmup_rounds=1),
                                Case("clip", "torch", 64, rounds=3)),
            Case("clip", "reference", 1, rounds=3, smoke=False))  # 0.15-0.4 s per draw of one pair
)

FORWARD_BACKWARD_CASES = cases(
    "forward+backward anchor B=8 T=32 V=50",
    *both_thread_counts(Case("anchor", "cpu", 256, rounds=10, warmup_rounds=1),
                        Case("anchor", "torch", 256, rounds=3)),
    Case("anchor", "reference", 16, rounds=3),
)

PER_PAIR_CASES = cases("per-pair textbook loop anchor (one pair, B=1)", Case("anchor", "per_pair", 16, rounds=3))


def draws(benchmark, case: Case) -> int:
    """K for this run: the case's, or at most SMOKE_MAX_SAMPLES under --benchmark-disable."""
    if benchmark.disabled and not case.smoke:
        pytest.skip("too slow for the --benchmark-disable smoke run")
    return min(case.num_samples, SMOKE_MAX_SAMPLES) if benchmark.disabled else case.num_samples


def record(benchmark, bench_record, case: Case, mode: str, cells: int, **info) -> None:
    """Rows for the session summary: median and the time per cell (one draw of one interaction cell)."""
    batch, text_len, image_len = SIZES[case.size]
    benchmark.extra_info.update(B=batch, T=text_len, V=image_len, K=case.num_samples, threads=case.threads,
                                cells=cells, mode=mode, **info)
    if benchmark.disabled:
        return
    median = benchmark.stats.stats.median
    benchmark.extra_info["ns_per_cell"] = median / cells * 1e9
    bench_record(case.size, mode, case.variant, case.threads, median, benchmark.stats.stats.min,
                 dict(benchmark.extra_info, rounds=case.rounds))


# --- tests ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", FORWARD_CASES)
def test_forward(benchmark, bench_record, case: Case):
    num_samples = draws(benchmark, case)
    torch.set_num_threads(case.threads)
    result = benchmark.pedantic(lambda inputs: run_variant(case.variant, inputs, num_samples),
                                setup=rotating(case.size), rounds=case.rounds, warmup_rounds=case.warmup_rounds,
                                iterations=1)
    check_output(result[0])
    batch, text_len, image_len = SIZES[case.size]
    record(benchmark, bench_record, case, "forward", case.num_samples * batch * text_len * image_len)


@pytest.mark.parametrize("case", FORWARD_BACKWARD_CASES)
def test_forward_backward(benchmark, bench_record, case: Case):
    num_samples = draws(benchmark, case)
    torch.set_num_threads(case.threads)
    grad = benchmark.pedantic(lambda inputs: forward_backward(case.variant, inputs, num_samples),
                              setup=rotating(case.size, with_grad), rounds=case.rounds,
                              warmup_rounds=case.warmup_rounds, iterations=1)
    check_output(grad)
    batch, text_len, image_len = SIZES[case.size]
    record(benchmark, bench_record, case, "forward+backward", case.num_samples * batch * text_len * image_len)


def one_pair(inputs: dict) -> dict:
    """Pair b = (input set's seed mod B) of the batch, as a batch of one; the coalition seed stays the set's."""
    b = inputs["seed"] % inputs["sim"].shape[0]
    return {name: (value[b:b + 1] if torch.is_tensor(value) else value) for name, value in inputs.items()}


@pytest.mark.parametrize("case", PER_PAIR_CASES)
def test_per_pair_textbook(benchmark, bench_record, case: Case):
    num_samples = draws(benchmark, case)
    torch.set_num_threads(case.threads)
    result = benchmark.pedantic(
        lambda inputs: reference.banzhaf_interaction_per_pair_mc(**inputs, num_samples=num_samples),
        setup=rotating(case.size, one_pair), rounds=case.rounds, iterations=1)
    check_output(result)
    _, text_len, image_len = SIZES[case.size]
    record(benchmark, bench_record, case, "forward", case.num_samples * text_len * image_len,
           measured=f"per-pair loop over all {text_len * image_len} token pairs of one image-text pair (B=1), "
                    f"{case.num_samples} independent draws per token pair")


def test_instruction_count_of_the_cpu_kernel(benchmark_enabled, banzhaf_instructions):
    """Runs callgrind on the C++ forward (full runs only) for the summary's roofline column."""
    if not benchmark_enabled:
        pytest.skip("callgrind runs only in full benchmark runs")
    if banzhaf_instructions is None:
        pytest.skip("valgrind is not installed: the roofline column stays n/a")
    assert 6 <= banzhaf_instructions["forward"] < 1000, banzhaf_instructions
