"""CUDA ops maxsim_score / maxsim_score_backward (csrc/cuda/maxsim_cuda.cu) against the C++ CPU op, on a GPU.

The CUDA ops take the token coefficients α [Bt, T] and β [Bi, V] directly (DESIGN §5); the references get the
same α, β from cbd_fast.maxsim.token_coefficients and run the C++ op in float64 on the features as given (half
inputs upcast exactly), so every tolerance below is the GPU's own rounding. Parity tests use features on a 1/64
grid, whose similarities are exact in fp32: no near-tie can route a gradient differently on the two sides.
"""
from __future__ import annotations

import pytest
import torch

import cbd_fast
from cbd_fast.maxsim import token_coefficients

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.skipif(not cbd_fast.build_info()["cuda"], reason="CUDA kernels not compiled")]

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
REDUCTIONS = ("wti", "sum", "mean")
# Scores and feature gradients of L2-normalised tokens: fp64 to rounding, fp32 accumulation (fp32 and half
# inputs) to the error of a D-term fp32 sum.
TOLERANCE = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-5)}


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def tolerance(dtype: torch.dtype) -> dict:
    return TOLERANCE[accumulation_dtype(dtype)]


def features(shape, gen, dtype, exact):
    """L2-normalised random tokens in ``dtype``. exact: rounded to multiples of 1/64, so that every similarity
    (|numerator| <= D·64² < 2^24) is exact in fp32 whatever the summation order: GPU and reference then agree on
    every maximum and arg-max (ties included), and only the sums differ by rounding."""
    x = torch.nn.functional.normalize(torch.randn(shape, generator=gen, dtype=torch.float64), dim=-1)
    if exact:
        x = (x * 64).round() / 64
    return x.to(dtype)


def make_inputs(num_texts=5, text_len=7, num_images=6, image_len=9, dim=40, dtype=torch.float32, seed=0,
                empty_text=None, empty_image=None, reduction="wti", masked=True, exact=True):
    """Features in ``dtype`` (on the CPU, see ``features``), masks with ~30% padding (every row keeps a valid
    token unless named empty), weight logits, and the reduction that turns them into α, β."""
    gen = torch.Generator().manual_seed(seed)
    text = features((num_texts, text_len, dim), gen, dtype, exact)
    image = features((num_images, image_len, dim), gen, dtype, exact)
    text_mask = torch.ones(num_texts, text_len, dtype=torch.bool)
    image_mask = torch.ones(num_images, image_len, dtype=torch.bool)
    if masked:
        text_mask = torch.rand(num_texts, text_len, generator=gen) > 0.3
        image_mask = torch.rand(num_images, image_len, generator=gen) > 0.3
        text_mask[:, 0] = True
        image_mask[:, -1] = True
    if empty_text is not None:
        text_mask[empty_text] = False
    if empty_image is not None:
        image_mask[empty_image] = False
    text_weight = torch.randn(num_texts, text_len, generator=gen, dtype=torch.float64)
    image_weight = torch.randn(num_images, image_len, generator=gen, dtype=torch.float64)
    return dict(text=text, image=image, text_mask=text_mask, image_mask=image_mask, text_weight=text_weight,
                image_weight=image_weight, reduction=reduction)


def coefficients(inputs, dtype):
    """α [Bt, T] and β [Bi, V] in ``dtype`` for the inputs' reduction."""
    alpha = token_coefficients(inputs["text_weight"], inputs["text_mask"], inputs["reduction"], dtype)
    beta = token_coefficients(inputs["image_weight"], inputs["image_mask"], inputs["reduction"], dtype)
    return alpha, beta


def cuda_score(inputs):
    text, image = inputs["text"], inputs["image"]
    alpha, beta = coefficients(inputs, accumulation_dtype(text.dtype))
    return torch.ops.cbd_fast.maxsim_score(text.cuda(), image.cuda(), inputs["text_mask"].cuda(),
                                           inputs["image_mask"].cuda(), alpha.cuda(), beta.cuda())


def cuda_backward(inputs, grad_score):
    text, image = inputs["text"], inputs["image"]
    alpha, beta = coefficients(inputs, accumulation_dtype(text.dtype))
    return torch.ops.cbd_fast.maxsim_score_backward(grad_score.cuda(), text.cuda(), image.cuda(),
                                                    inputs["text_mask"].cuda(), inputs["image_mask"].cuda(),
                                                    alpha.cuda(), beta.cuda())


def cpu_reference(inputs, grad_score=None):
    """The C++ op in float64: score [Bt, Bi] and, for grad_score, (grad_text, grad_image, grad_alpha, grad_beta)
    with grad_alpha[a,t] = ½ Σ_b g[a,b]·rowmax(a,b,t) and grad_beta[b,u] = ½ Σ_a g[a,b]·colmax(a,b,u)."""
    alpha, beta = coefficients(inputs, torch.float64)
    args = (inputs["text"].double(), inputs["image"].double(), inputs["text_mask"], inputs["image_mask"], alpha, beta)
    score = torch.ops.cbd_fast.maxsim_score(*args)
    if grad_score is None:
        return score
    return score, torch.ops.cbd_fast.maxsim_score_backward(grad_score.double(), *args)


def random_grad(num_texts, num_images, seed=1):
    return torch.randn(num_texts, num_images, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def assert_matches_reference(inputs, dtype, check_backward=True, seed=1):
    """Score and (optionally) all four gradients of the CUDA ops against the C++ op."""
    num_texts, num_images = inputs["text"].shape[0], inputs["image"].shape[0]
    grad_score = random_grad(num_texts, num_images, seed)
    expected_score, expected_grads = cpu_reference(inputs, grad_score)
    acc = accumulation_dtype(dtype)
    score = cuda_score(inputs)
    assert score.dtype == acc and score.shape == (num_texts, num_images)
    torch.testing.assert_close(score.cpu().double(), expected_score, **tolerance(dtype))
    if not check_backward:
        return
    grads = cuda_backward(inputs, grad_score.to(acc))
    for name, grad, expected in zip(("grad_text", "grad_image", "grad_alpha", "grad_beta"), grads, expected_grads):
        assert grad.dtype == acc and grad.shape == expected.shape, name
        torch.testing.assert_close(grad.cpu().double(), expected, **tolerance(dtype), msg=lambda m: f"{name}: {m}")


# --- parity with the C++ op -------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_cpu_op_with_masks_and_empty_rows(dtype, reduction):
    inputs = make_inputs(dtype=dtype, reduction=reduction, empty_text=2, empty_image=4)
    assert_matches_reference(inputs, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [
    (13, 77, 11, 200, 72),   # texts and images split across similarity chunks, partial rectangles
    (9, 32, 7, 50, 70),      # D % 8 != 0: the scalar operand path of the half kernels
    (3, 130, 2, 300, 33),    # one text spans two row chunks, one image several column chunks
    (40, 3, 37, 2, 16),      # many short items per rectangle
], ids=str)
def test_matches_cpu_op_across_tile_boundaries(dtype, shape):
    num_texts, text_len, num_images, image_len, dim = shape
    inputs = make_inputs(num_texts, text_len, num_images, image_len, dim, dtype=dtype, seed=3)
    assert_matches_reference(inputs, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(4, 1, 3, 1, 8), (4, 1, 5, 50, 24), (3, 32, 4, 1, 24), (1, 9, 1, 5, 3)],
                         ids=str)
def test_single_token_sides(dtype, shape):
    num_texts, text_len, num_images, image_len, dim = shape
    inputs = make_inputs(num_texts, text_len, num_images, image_len, dim, dtype=dtype, seed=4, masked=False)
    assert_matches_reference(inputs, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_all_masked_rows_score_zero_and_get_no_gradient(dtype):
    inputs = make_inputs(6, 8, 5, 10, 24, dtype=dtype, seed=5, reduction="sum")
    inputs["text_mask"][[1, 4]] = False
    inputs["image_mask"][[0, 3]] = False
    assert_matches_reference(inputs, dtype)
    score = cuda_score(inputs).cpu()
    assert (score[[1, 4]] == 0).all() and (score[:, [0, 3]] == 0).all()
    grad_text, grad_image, grad_alpha, grad_beta = (x.cpu() for x in cuda_backward(inputs, random_grad(6, 5).to(
        accumulation_dtype(dtype))))
    assert (grad_text[[1, 4]] == 0).all() and (grad_alpha[[1, 4]] == 0).all()
    assert (grad_image[[0, 3]] == 0).all() and (grad_beta[[0, 3]] == 0).all()
    # Invalid tokens of the other rows get no gradient either.
    assert (grad_text[~inputs["text_mask"]] == 0).all() and (grad_image[~inputs["image_mask"]] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_everything_masked_and_empty_sizes(dtype):
    inputs = make_inputs(3, 4, 2, 5, 8, dtype=dtype)
    inputs["text_mask"][:] = False
    score = cuda_score(inputs)
    assert score.shape == (3, 2) and (score == 0).all()
    assert all((g == 0).all() for g in cuda_backward(inputs, random_grad(3, 2).to(accumulation_dtype(dtype))))
    for shape in [(0, 4, 2, 5, 8), (3, 0, 2, 5, 8), (3, 4, 2, 0, 8), (3, 4, 0, 5, 8), (3, 4, 2, 5, 0)]:
        empty = make_inputs(*shape, dtype=dtype, masked=False)
        score = cuda_score(empty)
        assert score.shape == (shape[0], shape[2]) and (score == 0).all()
        grads = cuda_backward(empty, torch.zeros(shape[0], shape[2], dtype=accumulation_dtype(dtype)))
        expected_shapes = [(shape[0], shape[1], shape[4]), (shape[2], shape[3], shape[4]), (shape[0], shape[1]),
                           (shape[2], shape[3])]
        assert [tuple(g.shape) for g in grads] == expected_shapes and all((g == 0).all() for g in grads)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ties_go_to_the_lowest_index(dtype):
    """Duplicated tokens tie exactly on every backend: the gradient flows through the first one only."""
    inputs = make_inputs(4, 6, 5, 8, 16, dtype=dtype, seed=6, masked=False)
    inputs["image"][:, 3] = inputs["image"][:, 1]  # image token 3 ties with token 1 in every row max
    inputs["text"][:, 4] = inputs["text"][:, 2]    # text token 4 ties with token 2 in every column max
    assert_matches_reference(inputs, dtype)
    grad_text, grad_image, _, _ = (x.cpu() for x in cuda_backward(inputs, random_grad(4, 5).to(
        accumulation_dtype(dtype))))
    _, (expected_text, expected_image, _, _) = cpu_reference(inputs, random_grad(4, 5))
    # The later duplicate only receives what it gets as a column / row of its own.
    torch.testing.assert_close(grad_image[:, 3].double(), expected_image[:, 3], **tolerance(dtype))
    torch.testing.assert_close(grad_text[:, 4].double(), expected_text[:, 4], **tolerance(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_limit_sizes(dtype):
    inputs = make_inputs(2, 256, 2, 576, 1024, dtype=dtype, seed=7, empty_image=1)
    assert_matches_reference(inputs, dtype)


def test_limit_sizes_float64():
    inputs = make_inputs(2, 256, 1, 576, 1024, dtype=torch.float64, seed=7)
    assert_matches_reference(inputs, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_and_unaligned_inputs(dtype):
    """Views are made contiguous; a storage offset of one element leaves rows unaligned (scalar load path)."""
    inputs = make_inputs(5, 7, 6, 9, 40, dtype=dtype, seed=13)
    expected = cuda_score(inputs)
    text, image = inputs["text"].cuda(), inputs["image"].cuda()
    wide = torch.zeros(5, 7, 48, dtype=dtype, device="cuda")
    wide[..., 3:43] = text
    flat = torch.zeros(image.numel() + 1, dtype=dtype, device="cuda")
    flat[1:] = image.reshape(-1)
    shifted = flat[1:].view(image.shape)
    assert shifted.is_contiguous() and shifted.data_ptr() % 16 != 0
    alpha, beta = (x.cuda() for x in coefficients(inputs, torch.float32))
    score = torch.ops.cbd_fast.maxsim_score(wide[..., 3:43], shifted, inputs["text_mask"].cuda(),
                                            inputs["image_mask"].cuda(), alpha, beta)
    assert torch.equal(score, expected)


# --- against autograd of a dense definition ---------------------------------------------------------------------

def dense_score(text, image, text_mask, image_mask, alpha, beta):
    """DESIGN §5 on the full [Bt, Bi, T, V] similarity tensor (small sizes only); differentiable."""
    sim = torch.einsum("atd,bud->abtu", text, image)
    neg_inf = torch.tensor(float("-inf"), dtype=sim.dtype, device=sim.device)
    row_max = torch.where(image_mask[None, :, None, :], sim, neg_inf).max(dim=3).values  # [Bt, Bi, T]
    col_max = torch.where(text_mask[:, None, :, None], sim, neg_inf).max(dim=2).values  # [Bt, Bi, V]
    row_live = text_mask[:, None, :] & image_mask.any(-1)[None, :, None]
    col_live = image_mask[None, :, :] & text_mask.any(-1)[:, None, None]
    row_max = torch.where(row_live, row_max, 0.0)
    col_max = torch.where(col_live, col_max, 0.0)
    return 0.5 * (torch.einsum("at,abt->ab", alpha, row_max) + torch.einsum("bv,abv->ab", beta, col_max))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_backward_matches_autograd_of_dense_definition(reduction):
    inputs = make_inputs(4, 6, 5, 7, 12, dtype=torch.float64, seed=8, empty_text=1, reduction=reduction,
                         exact=False)
    alpha, beta = coefficients(inputs, torch.float64)
    leaves = [x.clone().requires_grad_(True) for x in (inputs["text"], inputs["image"], alpha, beta)]
    score = dense_score(leaves[0], leaves[1], inputs["text_mask"], inputs["image_mask"], leaves[2], leaves[3])
    grad_score = random_grad(4, 5, seed=9)
    expected = torch.autograd.grad(score, leaves, grad_score)
    torch.testing.assert_close(cuda_score(inputs).cpu(), score.detach(), rtol=1e-10, atol=1e-10)
    for grad, want in zip(cuda_backward(inputs, grad_score), expected):
        torch.testing.assert_close(grad.cpu(), want, rtol=1e-10, atol=1e-10)


# --- realistic shapes, determinism, errors ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_training_batch_shape_matches_torch_backend(dtype):
    """128 x 128 pairs, T=32, V=50, D=512 against the plain-PyTorch backend on the GPU (fp32 arithmetic)."""
    inputs = make_inputs(128, 32, 128, 50, 512, dtype=dtype, seed=10, exact=False)
    device_inputs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in inputs.items()}
    expected = cbd_fast.maxsim(device_inputs["text"].float(), device_inputs["image"].float(),
                               device_inputs["text_mask"], device_inputs["image_mask"], device_inputs["text_weight"],
                               device_inputs["image_weight"], reduction="wti", backend="torch")
    torch.testing.assert_close(cuda_score(inputs), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_bitwise_deterministic(dtype):
    inputs = make_inputs(64, 32, 48, 50, 256, dtype=dtype, seed=11, exact=False)
    grad_score = random_grad(64, 48).to(accumulation_dtype(dtype))
    first_score, first_grads = cuda_score(inputs), cuda_backward(inputs, grad_score)
    for _ in range(3):
        assert torch.equal(cuda_score(inputs), first_score)
        assert all(torch.equal(a, b) for a, b in zip(cuda_backward(inputs, grad_score), first_grads))


def test_score_of_a_pair_does_not_depend_on_the_batch():
    """Rectangles of pairs differ with the batch sizes; the score of a pair must not."""
    inputs = make_inputs(20, 32, 30, 50, 64, dtype=torch.bfloat16, seed=12, exact=False)
    sub = dict(inputs, text=inputs["text"][3:4], text_mask=inputs["text_mask"][3:4],
               text_weight=inputs["text_weight"][3:4])
    assert torch.equal(cuda_score(sub), cuda_score(inputs)[3:4])


@pytest.mark.parametrize("shape, message", [
    ((1, 257, 1, 4, 8), "at most 256 text tokens"),
    ((1, 4, 1, 577, 8), "at most 576 image tokens"),
    ((1, 4, 1, 4, 1025), "feature dimension of at most 1024"),
], ids=["T", "V", "D"])
def test_clear_errors_above_limits(shape, message):
    inputs = make_inputs(*shape, masked=False)
    with pytest.raises(RuntimeError, match=message):
        cuda_score(inputs)
    with pytest.raises(RuntimeError, match=message):
        cuda_backward(inputs, torch.zeros(shape[0], shape[2]))


def test_clear_errors_for_bad_arguments():
    inputs = make_inputs(2, 3, 2, 4, 8, masked=False)
    text, image = inputs["text"].cuda(), inputs["image"].cuda()
    text_mask, image_mask = inputs["text_mask"].cuda(), inputs["image_mask"].cuda()
    alpha, beta = (x.cuda() for x in coefficients(inputs, torch.float32))
    op = torch.ops.cbd_fast.maxsim_score
    with pytest.raises(RuntimeError, match="image must have the text's dtype"):
        op(text, image.double(), text_mask, image_mask, alpha, beta)
    with pytest.raises(RuntimeError, match="text_mask must be bool"):
        op(text, image, text_mask.float(), image_mask, alpha, beta)
    with pytest.raises(RuntimeError, match=r"beta must have shape \[Bi, V\]"):
        op(text, image, text_mask, image_mask, alpha, beta[:, :2])
    with pytest.raises(RuntimeError, match="image_mask must be on"):
        op(text, image, text_mask, image_mask.cpu(), alpha, beta)
    with pytest.raises(RuntimeError, match=r"image must have shape \[Bi, V, D\] with D = 8"):
        op(text, image[..., :4], text_mask, image_mask, alpha, beta)
    with pytest.raises(RuntimeError, match=r"grad_score must have shape \[Bt, Bi\]"):
        torch.ops.cbd_fast.maxsim_score_backward(torch.zeros(3, 2, device="cuda"), text, image, text_mask,
                                                 image_mask, alpha, beta)
