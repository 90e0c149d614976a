"""Triton Banzhaf kernels (cbd_fast.kernels.banzhaf) against the C++ CPU op, on tiny games.

Without a GPU the kernels run under the Triton interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1), which
is slow: every game here is at most B=3, T=6, V=9 and K=16 (K=128 for one 2x3 game in the exact check). ``_block``
forces the blocked (large-tile) path with small blocks so that its multi-block merges and passes run too. The sm_90a
spill check of compile_specs() is a separate CI test.
"""
import pytest
import torch
from conftest import random_game, requires_extension

import cbd_fast
from cbd_fast.coalitions import seed_as_int64

kb = pytest.importorskip("cbd_fast.kernels.banzhaf")

pytestmark = requires_extension  # the reference is the C++ op

SMALL_BLOCKS = (4, 8)  # T=5, V=9 -> 2 x 2 blocks for the text half, 2 x 2 for the image half


def cpu_forward(game, num_samples, seed, estimator):
    return torch.ops.cbd_fast.banzhaf_interaction(*game, num_samples, seed_as_int64(seed), estimator)


def cpu_backward(grads, game, num_samples, seed, estimator):
    return torch.ops.cbd_fast.banzhaf_interaction_backward(*grads, *game, num_samples, seed_as_int64(seed),
                                                           estimator)


def on(device, tensors):
    return tuple(t.to(device) for t in tensors)


def assert_all_close(actual, expected, rtol, atol_scale, names):
    """Elementwise close, with an absolute floor of atol_scale times each output's largest entry (at least 1: an
    output that is 0 up to rounding, e.g. the weight gradient of a lone token, is compared absolutely)."""
    for name, a, e in zip(names, actual, expected):
        a = a.cpu()
        assert a.dtype == e.dtype, f"{name}: dtype {a.dtype} != {e.dtype}"
        atol = atol_scale * max(float(e.abs().max()), 1.0)
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


FORWARD_NAMES = ("interaction", "text_value", "image_value")
BACKWARD_NAMES = ("grad_sim", "grad_text_weight", "grad_image_weight")


def output_grads(batch, text_len, image_len, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, text_len, image_len, generator=gen, dtype=torch.float64).to(dtype),
            torch.randn(batch, text_len, generator=gen, dtype=torch.float64).to(dtype),
            torch.randn(batch, image_len, generator=gen, dtype=torch.float64).to(dtype))


# --- coalitions ---------------------------------------------------------------------------------------------------

# 1 and 2**32: a seed half equal to 1 is the integer value Triton would specialise into a constant (a compile error
# before the kernels declared the seed arguments do_not_specialize; only a real GPU launch shows it).
@pytest.mark.parametrize("seed", [0, 1, 7, 2**32, 123456789012345, 2**63 + 11, 2**64 - 1])
def test_in_kernel_bits_are_the_published_coalitions(kernel_device, seed):
    # V=130 crosses the 128-token chunk boundary (counter word 3 = 1)
    text_bits, image_bits = kb.coalition_bits(2, 5, 130, 3, seed, device=kernel_device)
    text_in, image_in = cbd_fast.coalitions(2, 5, 130, 3, seed=seed)
    assert torch.equal(text_bits.cpu(), text_in) and torch.equal(image_bits.cpu(), image_in)


def test_seed_arguments_are_never_specialised():
    """Triton turns an integer argument equal to 1 into a compile-time constant unless told not to; the kernels
    bitcast the seed halves, which a Python int cannot do, so every kernel must exempt them."""
    import triton
    from triton.runtime.interpreter import InterpretedFunction

    def exempt(kernel) -> set[str]:  # a compiled kernel, or its stand-in under TRITON_INTERPRET=1
        if isinstance(kernel, InterpretedFunction):
            return set(kernel.kwargs.get("do_not_specialize") or ())
        return {p.name for p in kernel.params if p.do_not_specialize}

    kernels = [k for k in vars(kb).values() if isinstance(k, (triton.runtime.jit.JITFunction, InterpretedFunction))]
    seeded = [k for k in kernels if "seed_lo" in (k.arg_names if isinstance(k, InterpretedFunction) else
                                                  [p.name for p in k.params])]
    assert len(seeded) >= 5, kernels
    for kernel in seeded:
        assert {"seed_lo", "seed_hi"} <= exempt(kernel), (kernel, exempt(kernel))


def test_negative_int64_seed_is_its_uint64_bits(kernel_device):
    game = on(kernel_device, random_game(1, 3, 4, seed=2))
    negative = kb.banzhaf_forward(*game, 4, -3, "paired")
    unsigned = kb.banzhaf_forward(*game, 4, 2**64 - 3, "paired")
    assert all(torch.equal(a, b) for a, b in zip(negative, unsigned))


# --- forward ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("estimator", ["paired", "msr"])
@pytest.mark.parametrize("dtype,rtol,atol_scale", [(torch.float64, 1e-10, 1e-12), (torch.float32, 1e-5, 1e-6)])
@pytest.mark.parametrize("block", [None, SMALL_BLOCKS])
def test_forward_matches_cpu(kernel_device, estimator, dtype, rtol, atol_scale, block):
    shape, num_samples = ((3, 5, 7), 16) if block is None else ((2, 5, 9), 4)
    game = random_game(*shape, dtype=dtype, seed=11)
    expected = cpu_forward(game, num_samples, 5, estimator)
    actual = kb.banzhaf_forward(*on(kernel_device, game), num_samples, 5, estimator, _block=block)
    assert_all_close(actual, expected, rtol, atol_scale, FORWARD_NAMES)
    # invalid tokens are not players: their outputs are exactly 0
    pair_mask = game[1][:, :, None] & game[2][:, None, :]
    assert (actual[0].cpu()[~pair_mask] == 0).all() and (actual[1].cpu()[~game[1]] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_match_cpu_on_the_same_half_input(kernel_device, dtype):
    game = random_game(2, 4, 6, dtype=dtype, seed=3)
    for estimator in ("paired", "msr"):
        expected = cpu_forward(game, 8, 1, estimator)
        actual = kb.banzhaf_forward(*on(kernel_device, game), 8, 1, estimator)
        assert actual[0].dtype == torch.float32
        assert_all_close(actual, expected, 1e-5, 1e-6, FORWARD_NAMES)


def edge_games():
    """(name, game): T=1, V=1, a pair without valid image tokens, a pair without valid text tokens, ties."""
    one_text = random_game(2, 1, 5, seed=4)
    one_image = random_game(2, 4, 1, seed=5)
    no_image = random_game(3, 4, 5, seed=6, masked=False)
    no_image[2][1] = False
    no_text = random_game(2, 3, 4, seed=7, masked=False)
    no_text[1][0] = False
    ties = random_game(2, 4, 6, seed=8)
    ties = (torch.round(ties[0] * 2) / 2, *ties[1:])  # few distinct values: many equal maxima
    ties[3].zero_()  # equal weights too
    return [("one_text", one_text), ("one_image", one_image), ("no_image", no_image), ("no_text", no_text),
            ("ties", ties)]


@pytest.mark.parametrize("name,game", edge_games(), ids=[name for name, _ in edge_games()])
def test_edge_cases_match_cpu(kernel_device, name, game):
    for estimator in ("paired", "msr"):
        expected = cpu_forward(game, 8, 2, estimator)
        actual = kb.banzhaf_forward(*on(kernel_device, game), 8, 2, estimator)
        assert_all_close(actual, expected, 1e-10, 1e-12, FORWARD_NAMES)
        grads = output_grads(*game[0].shape, torch.float64, seed=1)
        expected = cpu_backward(grads, game, 8, 2, estimator)
        actual = kb.banzhaf_backward(*on(kernel_device, grads), *on(kernel_device, game), 8, 2, estimator)
        assert_all_close(actual, expected, 1e-9, 1e-11, BACKWARD_NAMES)
        assert all(torch.isfinite(x).all() for x in actual)


def test_ties_through_the_blocked_merges(kernel_device):
    """Equal maxima in different blocks (blocks of 4 text x 8 image tokens): merging the per-block top-two must keep
    the lowest index, for the maximum and for the runner-up, in both halves."""
    sim = torch.randn(1, 5, 9, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sim[0, 0, 2] = sim[0, 0, 8] = 3.0  # text row 0: top-1 tie across the two image blocks
    sim[0, 1, 1] = 3.0
    sim[0, 1, 3] = sim[0, 1, 8] = 2.0  # text row 1: runner-up tie across the image blocks
    sim[0, 2, 5] = sim[0, 4, 5] = 3.5  # image column 5: top-1 tie across the two text blocks
    sim[0, 0, 7] = 3.5
    sim[0, 3, 7] = sim[0, 4, 7] = 2.5  # image column 7: runner-up tie across the text blocks
    game = (sim, torch.ones(1, 5, dtype=torch.bool), torch.ones(1, 9, dtype=torch.bool),
            torch.zeros(1, 5, dtype=torch.float64), torch.zeros(1, 9, dtype=torch.float64))
    grads = output_grads(1, 5, 9, torch.float64, seed=2)
    for estimator in ("paired", "msr"):
        expected = cpu_backward(grads, game, 4, 4, estimator)
        actual = kb.banzhaf_backward(*on(kernel_device, grads), *on(kernel_device, game), 4, 4, estimator,
                                     _block=SMALL_BLOCKS)
        assert_all_close(actual, expected, 1e-9, 1e-11, BACKWARD_NAMES)


def test_paired_estimate_approaches_exact(kernel_device):
    """With many draws the paired Monte Carlo estimate approaches the exact enumeration (2^5 coalitions)."""
    game = random_game(1, 2, 3, seed=9, masked=False)
    exact = cpu_forward(game, 1, 0, "exact")
    errors = []
    for num_samples in (4, 128):
        estimate = kb.banzhaf_forward(*on(kernel_device, game), num_samples, 1, "paired")
        errors.append(max(float((e.cpu() - x).abs().mean()) for e, x in zip(estimate, exact)))
    scale = max(float(x.abs().mean()) for x in exact)
    assert errors[1] < 0.5 * errors[0] and errors[1] < 0.1 * scale, (errors, scale)


# --- from tokens --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("block", [None, SMALL_BLOCKS])
def test_from_tokens_equals_forward_on_bmm(kernel_device, dtype, block):
    gen = torch.Generator().manual_seed(1)
    batch, text_len, image_len, dim = 2, 5, 9, 40  # D=40: a full and a partial chunk of BLOCK_D=32
    text = torch.randn(batch, text_len, dim, generator=gen).to(dtype)
    image = torch.randn(batch, image_len, dim, generator=gen).to(dtype)
    _, text_mask, image_mask, text_weight, image_weight = random_game(batch, text_len, image_len, seed=12)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    sim = torch.bmm(text.to(compute), image.to(compute).transpose(1, 2))
    rest = on(kernel_device, (text_mask, image_mask, text_weight, image_weight))
    expected = kb.banzhaf_forward(sim.to(kernel_device), *rest, 4, 3, "paired", _block=block)
    actual = kb.banzhaf_forward_from_tokens(text.to(kernel_device), image.to(kernel_device), *rest, 4, 3, "paired",
                                            _block=block)
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5
    assert_all_close(actual, tuple(e.cpu() for e in expected), tolerance, tolerance, FORWARD_NAMES)


# --- backward -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("estimator", ["paired", "msr"])
@pytest.mark.parametrize("dtype,rtol,atol_scale", [(torch.float64, 1e-9, 1e-11), (torch.float32, 1e-4, 1e-5)])
@pytest.mark.parametrize("block", [None, SMALL_BLOCKS])
def test_backward_matches_cpu(kernel_device, estimator, dtype, rtol, atol_scale, block):
    shape, num_samples = ((3, 5, 6), 12) if block is None else ((1, 5, 9), 3)
    game = random_game(*shape, dtype=dtype, seed=31)
    grads = output_grads(*shape, dtype, seed=4)
    expected = cpu_backward(grads, game, num_samples, 6, estimator)
    actual = kb.banzhaf_backward(*on(kernel_device, grads), *on(kernel_device, game), num_samples, 6, estimator,
                                 _block=block)
    assert actual[0].dtype == dtype
    assert_all_close(actual, expected, rtol, atol_scale, BACKWARD_NAMES)


def test_backward_of_half_input_returns_its_dtype(kernel_device):
    game = random_game(2, 4, 5, dtype=torch.bfloat16, seed=5)
    grads = output_grads(2, 4, 5, torch.float32, seed=5)
    expected = cpu_backward(grads, game, 6, 1, "paired")
    actual = kb.banzhaf_backward(*on(kernel_device, grads), *on(kernel_device, game), 6, 1, "paired")
    assert actual[0].dtype == torch.bfloat16 and actual[1].dtype == torch.bfloat16
    for name, a, e in zip(BACKWARD_NAMES, actual, expected):
        torch.testing.assert_close(a.cpu().float(), e.float(), rtol=1e-2, atol=1e-2 * float(e.abs().max().float()),
                                   msg=lambda m: f"{name}: {m}")


# --- determinism and precision ------------------------------------------------------------------------------------

@pytest.mark.parametrize("block", [None, SMALL_BLOCKS])
def test_bitwise_equal_run_to_run(kernel_device, block):
    batch = 2 if block is None else 1
    game = on(kernel_device, random_game(batch, 5, 9, dtype=torch.float32, seed=13))
    grads = on(kernel_device, output_grads(batch, 5, 9, torch.float32, seed=6))
    runs = []
    for _ in range(2):
        forward = kb.banzhaf_forward(*game, 4, 8, "paired", _block=block)
        backward = kb.banzhaf_backward(*grads, *game, 4, 8, "paired", _block=block)
        runs.append((*forward, *backward))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("estimator", ["paired", "msr"])
@pytest.mark.parametrize("block", [None, SMALL_BLOCKS])
def test_skewed_weights_keep_float32_precision(kernel_device, estimator, block):
    """Logits spanning ~20 (e^20 ≈ 5e8 > 2^24): the leave-one-out sums cancel catastrophically in plain float32.
    The float32 kernels still match the C++ op (computed in double) to ~1e-4 relative."""
    batch, text_len, image_len = 2, 5, 9
    game = list(random_game(batch, text_len, image_len, dtype=torch.float32, seed=17, masked=False))
    game[3] = torch.tensor([[10.0, -10.0, -9.0, 0.5, -10.0], [-10.0, -10.0, 10.0, -3.0, 9.5]])
    game[4] = torch.linspace(-10.0, 10.0, image_len).repeat(batch, 1)
    game[4][1] = game[4][1].flip(0)
    grads = output_grads(batch, text_len, image_len, torch.float32, seed=7)
    num_samples = 16 if block is None else 3
    expected = cpu_forward(tuple(game), num_samples, 9, estimator)
    actual = kb.banzhaf_forward(*on(kernel_device, game), num_samples, 9, estimator, _block=block)
    assert_all_close(actual, expected, 1e-4, 1e-5, FORWARD_NAMES)
    expected = cpu_backward(grads, tuple(game), num_samples, 9, estimator)
    actual = kb.banzhaf_backward(*on(kernel_device, grads), *on(kernel_device, game), num_samples, 9, estimator,
                                 _block=block)
    assert_all_close(actual, expected, 1e-4, 1e-5, BACKWARD_NAMES)


# --- argument errors and compile specs ----------------------------------------------------------------------------

def test_token_limits_and_exact_estimator_are_clear_errors():
    ok = random_game(1, 2, 3)
    with pytest.raises(ValueError, match="T=257"):
        kb.banzhaf_forward(*random_game(1, kb.MAX_TEXT_TOKENS + 1, 2), 4, 0, "paired")
    with pytest.raises(ValueError, match="V=577"):
        kb.banzhaf_backward(torch.zeros(1, 2, 577), torch.zeros(1, 2), torch.zeros(1, 577),
                            *random_game(1, 2, kb.MAX_IMAGE_TOKENS + 1), 4, 0, "paired")
    text, image = torch.zeros(1, 2, 8), torch.zeros(1, kb.MAX_IMAGE_TOKENS + 1, 8)
    with pytest.raises(ValueError, match="V=577"):
        kb.banzhaf_forward_from_tokens(text, image, *random_game(1, 2, kb.MAX_IMAGE_TOKENS + 1)[1:], 4, 0, "msr")
    with pytest.raises(ValueError, match="backend='cpu'"):
        kb.banzhaf_forward(*ok, 4, 0, "exact")
    with pytest.raises(ValueError, match="estimator"):
        kb.banzhaf_forward(*ok, 4, 0, "shapley")
    with pytest.raises(ValueError, match="_block"):
        kb.banzhaf_forward(*ok, 4, 0, "paired", _block=(3, 8))


def test_compile_specs_cover_the_required_shapes():
    names = [spec.name for spec in kb.compile_specs()]
    for shape in ("anchor", "vitb16", "limit"):
        for kernel in ("forward", "backward"):
            for dtype in ("float32", "bfloat16"):
                assert any(shape in n and kernel in n and dtype in n for n in names), (shape, kernel, dtype)
    assert any("from_tokens" in n for n in names)
