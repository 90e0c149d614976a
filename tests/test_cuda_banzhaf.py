"""CUDA ops banzhaf_interaction, banzhaf_interaction_backward and banzhaf_interaction_from_tokens
(csrc/cuda/banzhaf_cuda.cu) against the C++ CPU kernels on the same seeds, on a GPU.

Both backends draw the same Philox coalitions and compute every sum in double from the same similarity values
(fp16/bf16/fp32 similarities are widened exactly; the CUDA kernels compare maxima on the stored fp32 values), so
they agree to double rounding before the cast to the result dtype; only the summation orders differ. The ops are
called directly as torch.ops.cbd_fast.*.
"""
from __future__ import annotations

import pytest
import torch
from conftest import random_game

import cbd_fast

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.skipif(not cbd_fast.build_info()["cuda"], reason="CUDA kernels not compiled")]

DEVICE = "cuda"
OPS = torch.ops.cbd_fast
ESTIMATORS = ("paired", "msr")
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# Results in float64 (fp64 inputs) to double rounding; float32 results (all other inputs) to float rounding.
TOLERANCE = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}
MAX_T, MAX_V = 256, 576


def to_device(args, device):
    return tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in args)


def cotangents(batch, text_len, image_len, dtype, seed=5):
    """Random gradients of (interaction, text_value, image_value)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, text_len, image_len, generator=gen, dtype=torch.float64).to(dtype),
            torch.randn(batch, text_len, generator=gen, dtype=torch.float64).to(dtype),
            torch.randn(batch, image_len, generator=gen, dtype=torch.float64).to(dtype))


def assert_parity(actual, expected, rtol, atol, names):
    for name, a, e in zip(names, actual, expected):
        assert a.device.type == DEVICE, name
        assert a.dtype == e.dtype and a.shape == e.shape, f"{name}: {a.dtype} {tuple(a.shape)} vs {e.dtype} " \
                                                          f"{tuple(e.shape)}"
        torch.testing.assert_close(a.cpu(), e, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


FORWARD = ("interaction", "text_value", "image_value")
BACKWARD = ("grad_sim", "grad_text_weight", "grad_image_weight")


def check_forward(game, num_samples, seed, estimator, rtol, atol):
    expected = OPS.banzhaf_interaction(*game, num_samples, seed, estimator)
    actual = OPS.banzhaf_interaction(*to_device(game, DEVICE), num_samples, seed, estimator)
    assert_parity(actual, expected, rtol, atol, FORWARD)
    return actual


def check_backward(game, num_samples, seed, estimator, rtol, atol, grads=None):
    batch, text_len, image_len = game[0].shape
    grads = grads if grads is not None else cotangents(batch, text_len, image_len, game[0].dtype)
    expected = OPS.banzhaf_interaction_backward(*grads, *game, num_samples, seed, estimator)
    actual = OPS.banzhaf_interaction_backward(*to_device(grads + tuple(game), DEVICE), num_samples, seed, estimator)
    assert_parity(actual, expected, rtol, atol, BACKWARD)
    return actual


def check_both(game, num_samples, seed, estimator, rtol, atol):
    check_forward(game, num_samples, seed, estimator, rtol, atol)
    check_backward(game, num_samples, seed, estimator, rtol, atol)


def tolerance(dtype):
    return TOLERANCE[torch.float64 if dtype == torch.float64 else torch.float32]


def gradient_tolerance(dtype):
    """Gradients come back in the input dtype: allow one rounding step of fp16/bf16."""
    return {torch.float16: dict(rtol=2e-3, atol=1e-5), torch.bfloat16: dict(rtol=1e-2, atol=1e-5)}.get(
        dtype, tolerance(dtype))


# --- parity with the C++ kernels ------------------------------------------------------------------------------------

@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_matches_cpu(estimator, dtype):
    game = random_game(4, 7, 9, dtype=dtype, seed=1)
    out = check_forward(game, 64, 11, estimator, **tolerance(dtype))
    assert out[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out[0].abs().sum() > 0


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_matches_cpu(estimator, dtype):
    game = random_game(4, 7, 9, dtype=dtype, seed=2)
    grads = check_backward(game, 64, 12, estimator, **gradient_tolerance(dtype))
    assert grads[0].dtype == dtype and grads[1].dtype == dtype and grads[2].dtype == dtype
    assert grads[0].abs().sum() > 0 and grads[1].abs().sum() > 0


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_many_draws_and_slices(estimator):
    # K large enough for several draw slices per pair, masks and weights on.
    game = random_game(3, 12, 20, dtype=torch.float64, seed=3)
    check_both(game, 700, 13, estimator, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_autograd_matches_cpu(estimator):
    game = random_game(2, 5, 6, dtype=torch.float32, seed=4)
    grads = []
    for device in ("cpu", DEVICE):
        sim, text_mask, image_mask, text_weight, image_weight = to_device(game, device)
        sim, text_weight, image_weight = (x.clone().requires_grad_() for x in (sim, text_weight, image_weight))
        out = OPS.banzhaf_interaction(sim, text_mask, image_mask, text_weight, image_weight, 32, 1, estimator)
        loss = sum((o * c.to(device)).sum() for o, c in zip(out, cotangents(2, 5, 6, torch.float32)))
        grads.append(torch.autograd.grad(loss, (sim, text_weight, image_weight)))
    for expected, actual in zip(*grads):
        torch.testing.assert_close(actual.cpu(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 2**40 + 7, -(2**63) + 5, -1])
def test_seeds_as_int64(seed):
    check_both(random_game(2, 4, 5, dtype=torch.float64, seed=5), 24, seed, "paired", rtol=1e-10, atol=1e-12)


# --- edge cases -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("shape", [(3, 1, 6), (3, 6, 1), (3, 1, 1), (1, 1, 1)])
def test_single_token_sides(estimator, shape):
    game = random_game(*shape, dtype=torch.float64, seed=6, masked=False)
    check_both(game, 40, 14, estimator, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_all_masked_pairs(estimator):
    sim, text_mask, image_mask, text_weight, image_weight = random_game(4, 5, 6, seed=7, masked=False)
    text_mask[1] = False  # no text tokens at all
    image_mask[2] = False  # no image tokens at all
    text_mask[3] = False
    image_mask[3] = False
    game = (sim, text_mask, image_mask, text_weight, image_weight)
    out = check_forward(game, 32, 15, estimator, rtol=1e-10, atol=1e-12)
    grads = check_backward(game, 32, 15, estimator, rtol=1e-10, atol=1e-12)
    for x in out + grads:
        assert torch.isfinite(x).all()
    for x in out:
        assert (x[1:] == 0).all()
    assert (grads[0][1:] == 0).all()
    assert out[0][0].abs().sum() > 0


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_ties_resolve_like_cpu(estimator):
    # Similarities on a coarse grid: many equal values in every row and column (ties go to the lowest index).
    sim, text_mask, image_mask, text_weight, image_weight = random_game(3, 8, 10, seed=8)
    sim = (sim * 2).round() / 2
    game = (sim, text_mask, image_mask, text_weight, image_weight)
    check_both(game, 48, 16, estimator, rtol=1e-10, atol=1e-12)
    game32 = (sim.float(), text_mask, image_mask, text_weight.float(), image_weight.float())
    check_both(game32, 48, 16, estimator, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_constant_similarity(estimator):
    sim = torch.full((2, 4, 5), 0.25, dtype=torch.float64)
    game = (sim, torch.ones(2, 4, dtype=torch.bool), torch.ones(2, 5, dtype=torch.bool),
            torch.zeros(2, 4, dtype=torch.float64), torch.zeros(2, 5, dtype=torch.float64))
    check_both(game, 32, 17, estimator, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_weight_logits_spanning_20(estimator):
    # exp(20) ≈ 5e8: the leave-one-out sums cancel most of their digits; both sides do them in double.
    sim, text_mask, image_mask, _, _ = random_game(3, 6, 8, seed=9)
    text_weight = torch.linspace(-10, 10, 6, dtype=torch.float64).repeat(3, 1)
    image_weight = torch.linspace(10, -10, 8, dtype=torch.float64).repeat(3, 1)
    game = (sim, text_mask, image_mask, text_weight, image_weight)
    check_forward(game, 64, 18, estimator, rtol=1e-7, atol=1e-9)
    check_backward(game, 64, 18, estimator, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 40, 140), (2, 77, 197), (1, MAX_T, MAX_V)])
def test_large_games(estimator, dtype, shape):
    # Multi-word coalition masks, similarity and accumulators in global memory for the largest.
    game = random_game(*shape, dtype=dtype, seed=10)
    tol = tolerance(dtype) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-11)
    check_both(game, 6, 19, estimator, **tol)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_anchor_size(estimator):
    # The performance anchor (B=128, T=32, V=50), fewer draws.
    game = random_game(128, 32, 50, dtype=torch.float32, seed=11)
    check_both(game, 128, 20, estimator, **tolerance(torch.float32))


# --- from token features --------------------------------------------------------------------------------------------

def tokens(batch, length, dim, dtype, gen, grid):
    """L2-normalised features; grid: rounded to multiples of 1/64 so that every similarity is exact in fp32
    whatever the summation order (then the fused op and bmm + op see identical similarities)."""
    x = torch.nn.functional.normalize(torch.randn(batch, length, dim, generator=gen, dtype=torch.float64), dim=-1)
    if grid:
        x = (x * 64).round() / 64
    return x.to(dtype)


def from_tokens_game(batch, text_len, image_len, dim, dtype, seed, grid):
    gen = torch.Generator().manual_seed(seed)
    text = tokens(batch, text_len, dim, dtype, gen, grid)
    image = tokens(batch, image_len, dim, dtype, gen, grid)
    _, text_mask, image_mask, text_weight, image_weight = random_game(batch, text_len, image_len,
                                                                      dtype=torch.float32, seed=seed)
    return text, image, text_mask, image_mask, text_weight, image_weight


def similarity(text, image):
    acc = torch.float64 if text.dtype == torch.float64 else torch.float32
    return torch.bmm(text.to(acc), image.to(acc).transpose(1, 2))


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 6, 9, 40), (2, 5, 7, 8), (2, 9, 300, 64), (1, MAX_T, MAX_V, 48)])
def test_from_tokens_equals_bmm_then_op(estimator, dtype, shape):
    # Exact similarities: the fused op (similarity in shared memory, or a scratch buffer for the largest game)
    # sees the same similarity values as the op on bmm's result, so only the compiled summation code may differ.
    text, image, text_mask, image_mask, text_weight, image_weight = from_tokens_game(*shape, dtype, seed=21,
                                                                                     grid=True)
    rest = (text_mask, image_mask, text_weight, image_weight)
    fused = OPS.banzhaf_interaction_from_tokens(*to_device((text, image) + rest, DEVICE), 16, 3, estimator)
    sim = similarity(text, image)
    via_sim = OPS.banzhaf_interaction(*to_device((sim,) + rest, DEVICE), 16, 3, estimator)
    same = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-7)
    for name, a, b in zip(FORWARD, fused, via_sim):
        assert a.dtype == b.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), name
        torch.testing.assert_close(a, b, **same, msg=lambda m: f"{name}: {m}")
    expected = OPS.banzhaf_interaction(sim, *rest, 16, 3, estimator)
    assert_parity(fused, expected, names=FORWARD, **tolerance(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_from_tokens_random_features(dtype):
    # Off-grid features: the in-kernel sums differ from bmm's by rounding only.
    text, image, *rest = from_tokens_game(3, 8, 11, 96, dtype, seed=22, grid=False)
    fused = OPS.banzhaf_interaction_from_tokens(*to_device((text, image, *rest), DEVICE), 32, 4, "paired")
    expected = OPS.banzhaf_interaction(similarity(text, image), *rest, 32, 4, "paired")
    tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    assert_parity(fused, expected, names=FORWARD, **tol)


# --- determinism ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_bitwise_deterministic(estimator):
    game = to_device(random_game(16, 20, 30, dtype=torch.float32, seed=23), DEVICE)
    grads = to_device(cotangents(16, 20, 30, torch.float32), DEVICE)
    text, image, *rest = to_device(from_tokens_game(16, 20, 30, 24, torch.float32, seed=23, grid=False), DEVICE)
    runs = []
    for _ in range(3):
        runs.append((*OPS.banzhaf_interaction(*game, 300, 5, estimator),
                     *OPS.banzhaf_interaction_backward(*grads, *game, 300, 5, estimator),
                     *OPS.banzhaf_interaction_from_tokens(text, image, *rest, 300, 5, estimator)))
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)


def test_seed_changes_result():
    game = to_device(random_game(2, 5, 6, seed=24), DEVICE)
    first = OPS.banzhaf_interaction(*game, 32, 1, "paired")
    other = OPS.banzhaf_interaction(*game, 32, 2, "paired")
    assert not torch.equal(first[0], other[0])


# --- argument errors ------------------------------------------------------------------------------------------------

def test_refuses_games_above_the_limits():
    for text_len, image_len, message in ((MAX_T + 1, 4, "T <= 256"), (4, MAX_V + 1, "V <= 576")):
        game = to_device(random_game(1, text_len, image_len, dtype=torch.float32, seed=25, masked=False), DEVICE)
        with pytest.raises(RuntimeError, match=message):
            OPS.banzhaf_interaction(*game, 4, 0, "paired")
        grads = to_device(cotangents(1, text_len, image_len, torch.float32), DEVICE)
        with pytest.raises(RuntimeError, match=message):
            OPS.banzhaf_interaction_backward(*grads, *game, 4, 0, "paired")
        text = torch.zeros(1, text_len, 8, device=DEVICE)
        image = torch.zeros(1, image_len, 8, device=DEVICE)
        with pytest.raises(RuntimeError, match=message):
            OPS.banzhaf_interaction_from_tokens(text, image, *game[1:], 4, 0, "paired")


def test_exact_estimator_points_to_cpu():
    game = to_device(random_game(1, 3, 3, seed=26), DEVICE)
    with pytest.raises(RuntimeError, match="CPU"):
        OPS.banzhaf_interaction(*game, 4, 0, "exact")
    with pytest.raises(RuntimeError, match="estimator must be"):
        OPS.banzhaf_interaction(*game, 4, 0, "shapley")


def test_bad_inputs_are_refused():
    sim, text_mask, image_mask, text_weight, image_weight = to_device(random_game(2, 3, 4, seed=27, masked=False),
                                                                     DEVICE)
    with pytest.raises(RuntimeError, match="finite"):
        OPS.banzhaf_interaction(sim.clone().fill_(float("nan")), text_mask, image_mask, text_weight, image_weight,
                                4, 0, "paired")
    wide = text_weight.clone()
    wide[0, 0], wide[0, 1] = -20.0, 20.0
    with pytest.raises(RuntimeError, match="span"):
        OPS.banzhaf_interaction(sim, text_mask, image_mask, wide, image_weight, 4, 0, "paired")
    with pytest.raises(RuntimeError, match="text_mask"):
        OPS.banzhaf_interaction(sim, text_mask[:, :2], image_mask, text_weight, image_weight, 4, 0, "paired")
    with pytest.raises(RuntimeError, match="num_samples"):
        OPS.banzhaf_interaction(sim, text_mask, image_mask, text_weight, image_weight, 0, 0, "paired")
    with pytest.raises(RuntimeError, match="must be on"):
        OPS.banzhaf_interaction(sim, text_mask.cpu(), image_mask, text_weight, image_weight, 4, 0, "paired")
