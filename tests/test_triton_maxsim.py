"""Triton kernels of the all-pairs MaxSim/WTI score (cbd_fast.kernels.maxsim) against the C++ op and the definition.

Without a GPU the kernels run under Triton's interpreter on CPU tensors (tests/conftest.py), so sizes stay tiny.
SMALL tiles reach every multi-tile path: several image-token tiles, several feature chunks (also a feature
dimension the chunk does not divide, and one that is not 16-aligned), stacked texts with a partial last block,
several images per program with a partial last block, and the backward's chunks of texts.
"""
from __future__ import annotations

import importlib

import pytest
import torch

import cbd_fast
from cbd_fast.maxsim import token_coefficients
from conftest import requires_extension

pytest.importorskip("triton")
kernels = importlib.import_module("cbd_fast.kernels.maxsim")
reference_maxsim = importlib.import_module("cbd_fast.reference.maxsim")  # the module, not the function

SMALL = kernels.TileConfig(block_t=8, texts_per_tile=2, block_v=4, block_d=8, images_per_program=3, num_warps=4,
                           grad_block_v=4, block_d_out=8, grad_num_warps=4)
REDUCTIONS = ("wti", "sum", "mean")
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def accumulation_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_inputs(num_texts=3, text_len=5, num_images=4, image_len=7, dim=12, dtype=torch.float32, seed=0,
                empty_text=None, empty_image=None):
    """L2-normalised features (as the model gives them), ~30% invalid tokens, weight logits; optionally one
    text / one image without a valid token."""
    gen = torch.Generator().manual_seed(seed)
    text = torch.nn.functional.normalize(torch.randn(num_texts, text_len, dim, generator=gen, dtype=torch.float64),
                                         dim=-1).to(dtype)
    image = torch.nn.functional.normalize(torch.randn(num_images, image_len, dim, generator=gen,
                                                      dtype=torch.float64), dim=-1).to(dtype)
    text_mask = torch.rand(num_texts, text_len, generator=gen) > 0.3
    image_mask = torch.rand(num_images, image_len, generator=gen) > 0.3
    text_mask[:, 0] = True
    image_mask[:, -1] = True
    if empty_text is not None:
        text_mask[empty_text] = False
    if empty_image is not None:
        image_mask[empty_image] = False
    acc = accumulation_dtype(dtype)
    text_weight = torch.randn(num_texts, text_len, generator=gen, dtype=torch.float64).to(acc)
    image_weight = torch.randn(num_images, image_len, generator=gen, dtype=torch.float64).to(acc)
    return text, image, text_mask, image_mask, text_weight, image_weight


def upstream_grad(num_texts, num_images, dtype, seed=1):
    return torch.randn(num_texts, num_images, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(
        dtype)


def definition_score(text, image, text_mask, image_mask, alpha, beta):
    """DESIGN §5 written out with the reference's masked max (ties to the lowest index): score [Bt, Bi]."""
    sim = torch.einsum("atd,bvd->abtv", text, image)
    valid = text_mask[:, None, :, None] & image_mask[None, :, None, :]
    best_image_token = reference_maxsim.masked_max(sim, valid, dim=3)  # [Bt, Bi, T]
    best_text_token = reference_maxsim.masked_max(sim, valid, dim=2)  # [Bt, Bi, V]
    return 0.5 * ((alpha[:, None, :] * best_image_token).sum(-1) + (beta[None, :, :] * best_text_token).sum(-1))


def definition_grads(inputs, grad_score):
    """(score, grad_text, grad_image, grad_alpha, grad_beta) of definition_score in the accumulation dtype."""
    text, image, text_mask, image_mask, alpha, beta = inputs
    acc = accumulation_dtype(text.dtype)
    leaves = [x.detach().to(acc).requires_grad_() for x in (text, image, alpha, beta)]
    score = definition_score(leaves[0], leaves[1], text_mask, image_mask, leaves[2], leaves[3])
    grads = torch.autograd.grad((score * grad_score.to(acc)).sum(), leaves)
    return (score.detach(), *grads)


def cpp_score_and_grads(inputs, reduction, grad_score):
    """score and gradients w.r.t. (text, image, text_weight, image_weight) of the C++ op, by its autograd."""
    text, image, text_mask, image_mask, text_weight, image_weight = inputs
    leaves = [x.detach().clone().requires_grad_() for x in (text, image, text_weight, image_weight)]
    score = cbd_fast.maxsim(leaves[0], leaves[1], text_mask, image_mask, leaves[2], leaves[3], reduction, "cpu")
    grads = torch.autograd.grad((score * grad_score.to(score.dtype)).sum(), leaves, allow_unused=True)
    return score.detach(), [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]


def triton_score_and_grads(inputs, reduction, grad_score, device, config=None, max_texts_per_chunk=None):
    """The kernels' score and gradients w.r.t. (text, image, text_weight, image_weight), the coefficients'
    softmax differentiated by autograd (as the caller does), plus the raw (grad_alpha, grad_beta); on CPU."""
    text, image, text_mask, image_mask, text_weight, image_weight = (x.to(device) for x in inputs)
    acc = accumulation_dtype(text.dtype)
    weights = [w.detach().to(acc).requires_grad_() for w in (text_weight, image_weight)]
    alpha = token_coefficients(weights[0], text_mask, reduction, acc)
    beta = token_coefficients(weights[1], image_mask, reduction, acc)
    score = kernels.maxsim_forward(text, image, text_mask, image_mask, alpha.detach(), beta.detach(), _config=config)
    grad_text, grad_image, grad_alpha, grad_beta = kernels.maxsim_backward(
        grad_score.to(device=device, dtype=acc), text, image, text_mask, image_mask, alpha.detach(), beta.detach(),
        _config=config, _max_texts_per_chunk=max_texts_per_chunk)
    if alpha.requires_grad:  # "wti": through the softmax; "sum"/"mean" do not depend on the logits
        weight_grads = torch.autograd.grad([alpha, beta], weights, [grad_alpha, grad_beta])
    else:
        weight_grads = [torch.zeros_like(w) for w in weights]
    grads = [grad_text, grad_image, *weight_grads]
    return score.cpu(), [g.detach().cpu() for g in grads], grad_alpha.cpu(), grad_beta.cpu()


def coefficients(inputs, reduction):
    """(text, image, masks, alpha, beta) for the definition, from make_inputs' tuple."""
    text, image, text_mask, image_mask, text_weight, image_weight = inputs
    acc = accumulation_dtype(text.dtype)
    return (text, image, text_mask, image_mask, token_coefficients(text_weight, text_mask, reduction, acc),
            token_coefficients(image_weight, image_mask, reduction, acc))


# ---------------------------------------------------------------------------------------------------------------
# Forward and backward against the C++ op and the definition
# ---------------------------------------------------------------------------------------------------------------

@requires_extension
@pytest.mark.parametrize("dtype,reduction,config", [
    *[pytest.param(dtype, reduction, None, id=f"{str(dtype)[6:]}-{reduction}-default")
      for dtype in (torch.float32, torch.float64) for reduction in REDUCTIONS],
    pytest.param(torch.float32, "wti", SMALL, id="float32-wti-small"),
    pytest.param(torch.float64, "mean", SMALL, id="float64-mean-small"),
])
def test_matches_cpp_op_and_definition(kernel_device, dtype, reduction, config):
    inputs = make_inputs(dtype=dtype, empty_text=1, empty_image=2)
    grad_score = upstream_grad(3, 4, dtype)
    expected, expected_grads = cpp_score_and_grads(inputs, reduction, grad_score)
    score, grads, grad_alpha, grad_beta = triton_score_and_grads(inputs, reduction, grad_score, kernel_device,
                                                                 config)
    assert score.dtype == dtype and score.shape == (3, 4)
    torch.testing.assert_close(score, expected, **TOLERANCE[dtype])
    for name, grad, expected_grad in zip(("text", "image", "text_weight", "image_weight"), grads, expected_grads):
        assert grad.dtype == dtype, name
        torch.testing.assert_close(grad, expected_grad, **TOLERANCE[dtype], msg=lambda m: f"grad {name}: {m}")
    definition = definition_grads(coefficients(inputs, reduction), grad_score)
    torch.testing.assert_close(score, definition[0], **TOLERANCE[dtype])
    torch.testing.assert_close(grad_alpha, definition[3], **TOLERANCE[dtype])
    torch.testing.assert_close(grad_beta, definition[4], **TOLERANCE[dtype])


@pytest.mark.parametrize("dim", [16, 12], ids=["aligned", "unaligned"])
def test_multi_tile_paths_match_definition(kernel_device, dim):
    """SMALL tiles with D = 16 (chunks divide it, rows 16-aligned) and D = 12 (neither); V = 9 over 3 token
    tiles, 3 texts in blocks of 2, 4 images in programs of 3, the backward's maxima in chunks of 2 texts."""
    inputs = make_inputs(num_texts=3, text_len=6, num_images=4, image_len=9, dim=dim, dtype=torch.float64)
    grad_score = upstream_grad(3, 4, torch.float64)
    score, grads, grad_alpha, grad_beta = triton_score_and_grads(inputs, "wti", grad_score, kernel_device, SMALL,
                                                                 max_texts_per_chunk=2)
    expected = definition_grads(coefficients(inputs, "wti"), grad_score)
    for name, value, expected_value in zip(("score", "grad_text", "grad_image", "grad_alpha", "grad_beta"),
                                           (score, grads[0], grads[1], grad_alpha, grad_beta), expected):
        torch.testing.assert_close(value, expected_value, **TOLERANCE[torch.float64], msg=lambda m: f"{name}: {m}")


@requires_extension
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_accumulates_in_fp32(kernel_device, dtype):
    inputs = make_inputs(dim=16, dtype=dtype, empty_image=0)
    grad_score = upstream_grad(3, 4, torch.float32)
    expected_score = cbd_fast.maxsim(*inputs, reduction="wti", backend="cpu")  # the same half values, upcast
    expected = definition_grads(coefficients(inputs, "wti"), grad_score)
    text, image, text_mask, image_mask, alpha, beta = (x.to(kernel_device) for x in coefficients(inputs, "wti"))
    score = kernels.maxsim_forward(text, image, text_mask, image_mask, alpha, beta).cpu()
    assert score.dtype == torch.float32
    # Products of halves are exact in fp32; only the summation order differs.
    torch.testing.assert_close(score, expected_score, rtol=1e-5, atol=1e-5)
    grads = kernels.maxsim_backward(grad_score.to(kernel_device), text, image, text_mask, image_mask, alpha, beta)
    assert [g.dtype for g in grads] == [torch.float32] * 4
    # The one-hot weights enter the tensor-core products as two bf16 parts: about 2^-16 relative.
    for name, grad, expected_grad in zip(("text", "image", "alpha", "beta"), grads, expected[1:]):
        torch.testing.assert_close(grad.cpu(), expected_grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------------------------
# Edge cases
# ---------------------------------------------------------------------------------------------------------------

@requires_extension
@pytest.mark.parametrize("text_len,image_len", [(1, 5), (4, 1), (1, 1)])
def test_single_token_sides(kernel_device, text_len, image_len):
    inputs = make_inputs(text_len=text_len, image_len=image_len, dtype=torch.float64)
    grad_score = upstream_grad(3, 4, torch.float64)
    expected, expected_grads = cpp_score_and_grads(inputs, "wti", grad_score)
    score, grads, _, _ = triton_score_and_grads(inputs, "wti", grad_score, kernel_device)
    torch.testing.assert_close(score, expected, **TOLERANCE[torch.float64])
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, **TOLERANCE[torch.float64])


def test_pairs_without_valid_tokens_score_zero_and_take_no_gradient(kernel_device):
    inputs = make_inputs(empty_text=2, empty_image=1)
    text_mask, image_mask = inputs[2], inputs[3]
    score, grads, grad_alpha, grad_beta = triton_score_and_grads(inputs, "wti", upstream_grad(3, 4, torch.float32),
                                                                 kernel_device)
    assert torch.isfinite(score).all() and all(torch.isfinite(g).all() for g in grads)
    assert (score[2] == 0).all() and (score[:, 1] == 0).all() and (score[:2, [0, 2, 3]] != 0).all()
    grad_text, grad_image = grads[0], grads[1]
    assert (grad_text[~text_mask] == 0).all() and (grad_image[~image_mask] == 0).all()
    assert (grad_alpha[~text_mask] == 0).all() and (grad_beta[~image_mask] == 0).all()
    assert grad_text[0].abs().sum() > 0 and grad_image[0].abs().sum() > 0


def test_everything_masked_gives_zeros(kernel_device):
    inputs = list(make_inputs())
    inputs[2] = torch.zeros_like(inputs[2])
    score, grads, grad_alpha, grad_beta = triton_score_and_grads(inputs, "wti", upstream_grad(3, 4, torch.float32),
                                                                 kernel_device)
    for value in (score, *grads, grad_alpha, grad_beta):
        assert torch.equal(value, torch.zeros_like(value))


def test_ties_go_to_the_lowest_index(kernel_device):
    """Text token 2 duplicates token 0, image tokens 1 and 5 both equal text token 0: exact ties in every max over
    them, which must pick the lowest index, the one entry the gradient reaches (with SMALL tiles, tokens 1 and 5
    lie in different image-token tiles)."""
    gen = torch.Generator().manual_seed(3)
    text = torch.nn.functional.normalize(torch.randn(1, 3, 8, generator=gen, dtype=torch.float64), dim=-1)
    image = torch.nn.functional.normalize(torch.randn(1, 8, 8, generator=gen, dtype=torch.float64), dim=-1)
    text[0, 2] = text[0, 0]
    image[0, 1] = text[0, 0]
    image[0, 5] = text[0, 0]
    text_mask = torch.ones(1, 3, dtype=torch.bool)
    image_mask = torch.ones(1, 8, dtype=torch.bool)
    alpha = torch.tensor([[0.5, 0.2, 0.3]], dtype=torch.float64)
    beta = torch.linspace(0.05, 0.4, 8, dtype=torch.float64)[None]
    inputs = (text, image, text_mask, image_mask, alpha, beta)
    grad_score = torch.ones(1, 1, dtype=torch.float64)
    for config in (None, SMALL):
        grads = kernels.maxsim_backward(grad_score.to(kernel_device), *(x.to(kernel_device) for x in inputs),
                                        _config=config)
        grad_text, grad_image = grads[0].cpu(), grads[1].cpu()
        # Text token 2's best image token is the tie {1, 5} -> 1; no column maximum goes to the duplicate token 2.
        torch.testing.assert_close(grad_text[0, 2], 0.5 * alpha[0, 2] * image[0, 1], rtol=1e-12, atol=1e-12)
        # Image token 5's best text token is the tie {0, 2} -> 0; no row maximum goes to the duplicate token 5.
        torch.testing.assert_close(grad_image[0, 5], 0.5 * beta[0, 5] * text[0, 0], rtol=1e-12, atol=1e-12)
        for grad, expected_grad in zip(grads, definition_grads(inputs, grad_score)[1:]):
            torch.testing.assert_close(grad.cpu(), expected_grad, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Determinism, limits, compile specs
# ---------------------------------------------------------------------------------------------------------------

def test_runs_are_bitwise_identical(kernel_device):
    inputs = coefficients(make_inputs(dim=16), "wti")
    text, image, text_mask, image_mask, alpha, beta = (x.to(kernel_device) for x in inputs)
    grad_score = upstream_grad(3, 4, torch.float32).to(kernel_device)
    runs = []
    for _ in range(2):
        score = kernels.maxsim_forward(text, image, text_mask, image_mask, alpha, beta)
        grads = kernels.maxsim_backward(grad_score, text, image, text_mask, image_mask, alpha, beta,
                                        _max_texts_per_chunk=2)
        runs.append((score, *grads))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


@pytest.mark.parametrize("text_len,image_len,dim,limit", [
    (kernels.MAX_TEXT_TOKENS + 1, 2, 4, "MAX_TEXT_TOKENS"),
    (2, kernels.MAX_IMAGE_TOKENS + 1, 4, "MAX_IMAGE_TOKENS"),
    (2, 2, kernels.MAX_DIM + 1, "MAX_DIM"),
])
def test_sizes_above_the_limits_are_refused(kernel_device, text_len, image_len, dim, limit):
    text = torch.zeros(1, text_len, dim, device=kernel_device)
    image = torch.zeros(1, image_len, dim, device=kernel_device)
    text_mask = torch.ones(1, text_len, dtype=torch.bool, device=kernel_device)
    image_mask = torch.ones(1, image_len, dtype=torch.bool, device=kernel_device)
    alpha, beta = text_mask.float(), image_mask.float()
    with pytest.raises(ValueError, match=limit):
        kernels.maxsim_forward(text, image, text_mask, image_mask, alpha, beta)
    with pytest.raises(ValueError, match=limit):
        kernels.maxsim_backward(torch.ones(1, 1, device=kernel_device), text, image, text_mask, image_mask, alpha,
                                beta)


def test_a_tile_too_short_for_the_text_is_refused(kernel_device):
    text, image, text_mask, image_mask, alpha, beta = (
        x.to(kernel_device) for x in coefficients(make_inputs(text_len=9), "sum"))
    with pytest.raises(ValueError, match="block_t"):
        kernels.maxsim_forward(text, image, text_mask, image_mask, alpha, beta, _config=SMALL)


def test_compile_specs_cover_every_kernel_shape_and_dtype():
    specs = kernels.compile_specs()
    names = {spec.name for spec in specs}
    for kernel in ("maxsim_forward", "maxsim_maxima", "maxsim_text_grad", "maxsim_image_grad"):
        for shape in ("T=32,V=50,D=512", "T=77,V=197,D=512", "T=256,V=576,D=1024"):
            for dtype in ("float32", "bfloat16"):
                assert f"{kernel}[{shape},{dtype}]" in names
    for spec in specs:
        assert set(spec.signature) == set(spec.kernel.arg_names), spec.name
        assert set(spec.constexprs) == {k for k, v in spec.signature.items() if v == "constexpr"}, spec.name
