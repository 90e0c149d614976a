"""cbd_fast.maxsim (DESIGN §5): C++ and torch backends against the definition-level reference."""
from __future__ import annotations

import importlib
import re

import pytest
import torch

import cbd_fast
from cbd_fast import reference
from cbd_fast.maxsim import token_coefficients

maxsim_module = importlib.import_module("cbd_fast.maxsim")  # the module, which the function of that name shadows

pytestmark = pytest.mark.skipif(not cbd_fast.has_extension(), reason="needs the compiled extension")

BACKENDS = ("cpu", "torch")
REDUCTIONS = ("wti", "sum", "mean")
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def make_inputs(num_texts=5, text_len=6, num_images=4, image_len=7, dim=16, dtype=torch.float64, seed=0,
                empty_text=None, empty_image=None):
    """Random features and logits, ~30% invalid tokens; optionally one text / one image with no valid token."""
    gen = torch.Generator().manual_seed(seed)
    text = torch.randn(num_texts, text_len, dim, generator=gen, dtype=torch.float64).to(dtype)
    image = torch.randn(num_images, image_len, dim, generator=gen, dtype=torch.float64).to(dtype)
    text_mask = torch.rand(num_texts, text_len, generator=gen) > 0.3
    image_mask = torch.rand(num_images, image_len, generator=gen) > 0.3
    text_mask[:, :1] = True  # every other row keeps at least one valid token (if it has a token)
    image_mask[:, -1:] = True
    if empty_text is not None:
        text_mask[empty_text] = False
    if empty_image is not None:
        image_mask[empty_image] = False
    text_weight = torch.randn(num_texts, text_len, generator=gen, dtype=torch.float64).to(dtype)
    image_weight = torch.randn(num_images, image_len, generator=gen, dtype=torch.float64).to(dtype)
    return text, image, text_mask, image_mask, text_weight, image_weight


def score_and_grads(fn, text, image, text_mask, image_mask, text_weight, image_weight, grad_score=None, **kw):
    """score = fn(...) and the gradients of Σ grad_score·score w.r.t. text, image and both weights."""
    leaves = [x.detach().clone().requires_grad_() for x in (text, image, text_weight, image_weight)]
    score = fn(leaves[0], leaves[1], text_mask, image_mask, leaves[2], leaves[3], **kw)
    if grad_score is None:
        grad_score = torch.randn(score.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad((score * grad_score.to(score.dtype)).sum(), leaves, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]
    return score.detach(), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference_with_masks_and_weights(backend, reduction, dtype):
    inputs = make_inputs(dtype=dtype, empty_text=2, empty_image=1)
    expected, expected_grads = score_and_grads(reference.maxsim, *inputs, reduction=reduction)
    score, grads = score_and_grads(cbd_fast.maxsim, *inputs, reduction=reduction, backend=backend)
    assert score.dtype == dtype and score.shape == (5, 4)
    torch.testing.assert_close(score, expected, **TOLERANCE[dtype])
    for name, grad, expected_grad in zip(("text", "image", "text_weight", "image_weight"), grads, expected_grads):
        assert grad.dtype == dtype, name
        torch.testing.assert_close(grad, expected_grad, **TOLERANCE[dtype], msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_pairs_without_valid_tokens_score_zero_with_finite_gradients(backend):
    text, image, text_mask, image_mask, text_weight, image_weight = make_inputs(empty_text=2, empty_image=1)
    score, grads = score_and_grads(cbd_fast.maxsim, text, image, text_mask, image_mask, text_weight, image_weight,
                                   backend=backend)
    assert torch.isfinite(score).all() and all(torch.isfinite(g).all() for g in grads)
    assert (score[2] == 0).all() and (score[:, 1] == 0).all()
    assert (score[0, [0, 2, 3]] != 0).all()
    grad_text, grad_image, grad_text_weight, grad_image_weight = grads
    # Nothing flows into tokens that never enter a max or a sum.
    assert (grad_text[~text_mask] == 0).all() and (grad_image[~image_mask] == 0).all()
    assert (grad_text_weight[~text_mask] == 0).all() and (grad_image_weight[~image_mask] == 0).all()
    assert grad_text[0].abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_everything_masked_gives_zeros(backend):
    text, image, text_mask, image_mask, text_weight, image_weight = make_inputs()
    text_mask = torch.zeros_like(text_mask)
    score, grads = score_and_grads(cbd_fast.maxsim, text, image, text_mask, image_mask, text_weight, image_weight,
                                   backend=backend)
    assert torch.equal(score, torch.zeros_like(score))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_accumulates_in_fp32(backend, dtype):
    inputs = make_inputs(dtype=dtype, dim=32, empty_image=0)
    upcast = [x.float() if x.is_floating_point() else x for x in inputs]
    expected, expected_grads = score_and_grads(reference.maxsim, *upcast)
    score, grads = score_and_grads(cbd_fast.maxsim, *inputs, backend=backend)
    assert score.dtype == torch.float32
    # Same products of the same (half) values, summed in fp32: as close as fp32 sums get.
    torch.testing.assert_close(score, expected, rtol=1e-5, atol=1e-5)
    for grad, expected_grad in zip(grads, expected_grads):
        assert grad.dtype == dtype
        torch.testing.assert_close(grad.float(), expected_grad, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_of_another_dtype_get_gradients_in_their_dtype(backend):
    text, image, text_mask, image_mask, text_weight, image_weight = make_inputs(dtype=torch.float32)
    text_weight, image_weight = text_weight.double(), image_weight.half()
    inputs = (text, image, text_mask, image_mask, text_weight, image_weight)
    expected, expected_grads = score_and_grads(reference.maxsim, *inputs)
    score, grads = score_and_grads(cbd_fast.maxsim, *inputs, backend=backend)
    assert score.dtype == torch.float32
    assert [g.dtype for g in grads] == [torch.float32, torch.float32, torch.float64, torch.float16]
    torch.testing.assert_close(score, expected, rtol=1e-5, atol=1e-5)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad.float(), expected_grad.float(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("text_len,image_len", [(1, 5), (4, 1), (1, 1)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_single_token_sides(backend, text_len, image_len):
    inputs = make_inputs(text_len=text_len, image_len=image_len)
    expected, expected_grads = score_and_grads(reference.maxsim, *inputs)
    score, grads = score_and_grads(cbd_fast.maxsim, *inputs, backend=backend)
    torch.testing.assert_close(score, expected, **TOLERANCE[torch.float64])
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, **TOLERANCE[torch.float64])


def test_cpu_op_pairs_larger_than_a_tile():
    """T·V above the op's tile budget (2**16 similarities): each pair gets a tile of its own."""
    inputs = make_inputs(3, 260, 2, 270, 5, empty_text=1)
    expected, expected_grads = score_and_grads(reference.maxsim, *inputs)
    score, grads = score_and_grads(cbd_fast.maxsim, *inputs, backend="cpu")
    torch.testing.assert_close(score, expected, **TOLERANCE[torch.float64])
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, **TOLERANCE[torch.float64])


def tied_pair():
    """One text, one image with exact ties: image tokens 1 and 3 are equal and the best for every text token;
    text tokens 0 and 2 are equal and the best for image tokens 1 and 3. Integer values, so ties are exact.

    Returns the op's six inputs (all tokens valid, zero logits) and the expected arg-max of every text token
    (over image tokens) and of every image token (over text tokens).
    """
    dim = 5
    ones = torch.ones(dim, dtype=torch.float64)
    text = torch.stack([ones, 0.5 * ones, ones])[None]  # [1, 3, D]
    image = torch.stack([-ones, 2 * ones, -ones, 2 * ones])[None]  # [1, 4, D]
    inputs = (text, image, torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 4, dtype=torch.bool),
              torch.zeros(1, 3, dtype=torch.float64), torch.zeros(1, 4, dtype=torch.float64))
    best_image_token = [1, 1, 1]  # lowest of the tied {1, 3}
    best_text_token = [1, 0, 1, 0]  # {0, 2} tie for u = 1, 3; t = 1 is best for u = 0, 2
    return inputs, best_image_token, best_text_token


def test_cpu_op_ties_take_the_tied_maximum():
    """The raw backward's coefficient gradients are ½·g times the maxima of each token."""
    inputs, _, _ = tied_pair()
    text, image, text_mask, image_mask = inputs[:4]
    ones_t, ones_v = torch.ones(1, 3, dtype=torch.float64), torch.ones(1, 4, dtype=torch.float64)
    score = torch.ops.cbd_fast.maxsim_score(text, image, text_mask, image_mask, ones_t, ones_v)
    assert score.item() == 0.5 * ((10 + 5 + 10) + (-2.5 + 10 - 2.5 + 10))
    _, _, grad_alpha, grad_beta = torch.ops.cbd_fast.maxsim_score_backward(
        torch.ones(1, 1, dtype=torch.float64), text, image, text_mask, image_mask, ones_t, ones_v)
    assert grad_alpha.tolist() == [[5.0, 2.5, 5.0]] and grad_beta.tolist() == [[-1.25, 5.0, -1.25, 5.0]]


@pytest.mark.parametrize("implementation", ["cpu", "torch", "reference"])
def test_tie_gradient_goes_to_lowest_index(implementation):
    inputs, best_image_token, best_text_token = tied_pair()
    text, image = inputs[:2]
    fn = reference.maxsim if implementation == "reference" else cbd_fast.maxsim
    kw = {} if implementation == "reference" else {"backend": implementation}
    _, (grad_text, grad_image, _, _) = score_and_grads(fn, *inputs, grad_score=torch.ones(1, 1), reduction="sum",
                                                       **kw)
    # s = ½ (Σ_t S[t, best_image_token[t]] + Σ_u S[best_text_token[u], u]) with these exact indices.
    expected_text = torch.zeros_like(text)
    expected_image = torch.zeros_like(image)
    for t, u in enumerate(best_image_token):
        expected_text[0, t] += 0.5 * image[0, u]
        expected_image[0, u] += 0.5 * text[0, t]
    for u, t in enumerate(best_text_token):
        expected_text[0, t] += 0.5 * image[0, u]
        expected_image[0, u] += 0.5 * text[0, t]
    assert torch.equal(grad_text, expected_text)
    assert torch.equal(grad_image, expected_image)
    assert not torch.equal(grad_image[0, 1], grad_image[0, 3])  # the tie was not split


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    text, image, text_mask, image_mask, text_weight, image_weight = make_inputs()
    # Same values, other layouts: transposed storage, strided slices.
    text_nc = text.transpose(1, 2).contiguous().transpose(1, 2)
    image_nc = torch.stack([image, image], dim=-1)[..., 0]
    text_mask_nc = text_mask.t().contiguous().t()
    image_weight_nc = torch.stack([image_weight, image_weight], dim=-1)[..., 0]
    assert not (text_nc.is_contiguous() or image_nc.is_contiguous() or text_mask_nc.is_contiguous()
                or image_weight_nc.is_contiguous())
    expected, expected_grads = score_and_grads(cbd_fast.maxsim, text, image, text_mask, image_mask, text_weight,
                                               image_weight, backend=backend)
    score, grads = score_and_grads(cbd_fast.maxsim, text_nc, image_nc, text_mask_nc, image_mask, text_weight,
                                   image_weight_nc, backend=backend)
    torch.testing.assert_close(score, expected, rtol=1e-12, atol=1e-12)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cpu_gradcheck(reduction):
    text, image, text_mask, image_mask, text_weight, image_weight = make_inputs(4, 3, 3, 4, 6, empty_image=2)
    leaves = [x.requires_grad_() for x in (text, image, text_weight, image_weight)]

    def score(text, image, text_weight, image_weight):
        return cbd_fast.maxsim(text, image, text_mask, image_mask, text_weight, image_weight, reduction, "cpu")

    assert torch.autograd.gradcheck(score, leaves, eps=1e-6, atol=1e-7)


def test_cpu_op_gradcheck_with_coefficients():
    text, image, text_mask, image_mask, text_weight, image_weight = make_inputs(4, 3, 3, 4, 6, empty_image=2)
    alpha = token_coefficients(text_weight, text_mask, "wti", torch.float64)
    beta = token_coefficients(image_weight, image_mask, "wti", torch.float64)
    leaves = [x.requires_grad_() for x in (text, image, alpha, beta)]

    def score(text, image, alpha, beta):
        return torch.ops.cbd_fast.maxsim_score(text, image, text_mask, image_mask, alpha, beta)

    assert torch.autograd.gradcheck(score, leaves, eps=1e-6, atol=1e-7)


def test_sum_and_mean_ignore_weights():
    inputs = make_inputs()
    _, grads = score_and_grads(cbd_fast.maxsim, *inputs, reduction="mean", backend="cpu")
    assert torch.equal(grads[2], torch.zeros_like(grads[2])) and torch.equal(grads[3], torch.zeros_like(grads[3]))
    text, image, text_mask, image_mask, text_weight, image_weight = inputs
    assert torch.equal(cbd_fast.maxsim(text, image, text_mask, image_mask, text_weight, image_weight, "sum"),
                       cbd_fast.maxsim(text, image, text_mask, image_mask, reduction="sum"))


def test_cpu_op_independent_of_thread_count():
    inputs = make_inputs(24, 16, 30, 20, 40, dtype=torch.float32, empty_text=3)
    threads = torch.get_num_threads()
    results = []
    try:
        for num_threads in (1, 2):
            torch.set_num_threads(num_threads)
            results.append(score_and_grads(cbd_fast.maxsim, *inputs, backend="cpu"))
    finally:
        torch.set_num_threads(threads)
    (score_1, grads_1), (score_2, grads_2) = results
    assert torch.equal(score_1, score_2)
    assert all(torch.equal(g1, g2) for g1, g2 in zip(grads_1, grads_2))


def test_cpu_op_independent_of_batch_composition():
    """Each similarity is summed over D in a fixed order, whatever tile the pair lands in."""
    text, image, text_mask, image_mask, _, _ = make_inputs(24, 16, 30, 20, 40, dtype=torch.float32)
    full = cbd_fast.maxsim(text, image, text_mask, image_mask, backend="cpu")
    part = cbd_fast.maxsim(text[7:9], image[3:], text_mask[7:9], image_mask[3:], backend="cpu")
    assert torch.equal(part, full[7:9, 3:])


def test_chunking_does_not_change_the_result(monkeypatch):
    inputs = make_inputs(9, 4, 5, 3, 8)
    one_shot = reference.maxsim(*inputs, max_elements=2**40)
    torch.testing.assert_close(reference.maxsim(*inputs, max_elements=1), one_shot, rtol=1e-12, atol=1e-12)
    expected = cbd_fast.maxsim(*inputs, backend="torch")
    monkeypatch.setattr(maxsim_module, "TORCH_BLOCK_ELEMENTS", 2 * 5 * 4 * 3)  # blocks of 2 texts
    torch.testing.assert_close(cbd_fast.maxsim(*inputs, backend="torch"), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(expected, one_shot, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batches(backend):
    text, image = torch.randn(0, 3, 4), torch.randn(2, 5, 4)
    assert cbd_fast.maxsim(text, image, backend=backend).shape == (0, 2)
    assert cbd_fast.maxsim(image, text, backend=backend).shape == (2, 0)


WITHOUT_GPU = [*BACKENDS, pytest.param("triton", marks=pytest.mark.skipif(not cbd_fast.build_info()["triton"],
                                                                          reason="triton not installed"))]


@pytest.mark.parametrize("backend", WITHOUT_GPU)
@pytest.mark.parametrize("text_len,image_len,dim", [(0, 3, 4), (3, 0, 4), (3, 4, 0), (0, 0, 4)])
def test_no_tokens_or_no_features_give_zero_scores_and_gradients(backend, text_len, image_len, dim, kernel_device):
    device = kernel_device if backend == "triton" else torch.device("cpu")
    inputs = [x.to(device) for x in make_inputs(2, text_len, 3, image_len, dim, dtype=torch.float32)]
    score, grads = score_and_grads(cbd_fast.maxsim, *inputs, backend=backend)
    assert score.shape == (2, 3) and torch.equal(score, torch.zeros_like(score))
    for grad, leaf in zip(grads, (inputs[0], inputs[1], inputs[4], inputs[5])):
        assert grad.shape == leaf.shape and torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("backend", WITHOUT_GPU)
def test_whatever_invalid_tokens_hold_changes_nothing(backend, kernel_device):
    device = kernel_device if backend == "triton" else torch.device("cpu")
    inputs = [x.to(device) for x in make_inputs(dtype=torch.float32, empty_text=2, empty_image=1)]
    text, image, text_mask, image_mask, text_weight, image_weight = inputs
    expected, expected_grads = score_and_grads(cbd_fast.maxsim, *inputs, backend=backend)
    for value in (float("nan"), float("inf"), -float("inf")):
        dirty = [x.clone() for x in (text, image, text_weight, image_weight)]
        for x, mask in zip(dirty, (text_mask, image_mask, text_mask, image_mask)):
            x[~mask] = value
        score, grads = score_and_grads(cbd_fast.maxsim, dirty[0], dirty[1], text_mask, image_mask, dirty[2],
                                       dirty[3], backend=backend)
        torch.testing.assert_close(score, expected, rtol=0, atol=0)
        for grad, expected_grad in zip(grads, expected_grads):
            torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)


def op_arguments(inputs, reduction="wti", dtype=torch.float64):
    """(text, image, text_mask, image_mask, alpha, beta) of maxsim_score from make_inputs' tuple."""
    text, image, text_mask, image_mask, text_weight, image_weight = inputs
    return (text, image, text_mask, image_mask, token_coefficients(text_weight, text_mask, reduction, dtype),
            token_coefficients(image_weight, image_mask, reduction, dtype))


def test_opcheck_forward_and_backward():
    args = op_arguments(make_inputs(3, 4, 2, 5, 6, empty_image=1))
    torch.library.opcheck(torch.ops.cbd_fast.maxsim_score, args)
    grad_args = tuple(x.clone().requires_grad_() if x.is_floating_point() else x for x in args)
    torch.library.opcheck(torch.ops.cbd_fast.maxsim_score, grad_args)
    grad_score = torch.randn(3, 2, dtype=torch.float64)
    torch.library.opcheck(torch.ops.cbd_fast.maxsim_score_backward, (grad_score, *args))
    # Half-precision features: fp32 score and gradients.
    text, image, text_mask, image_mask, alpha, beta = args
    half_args = (text.half(), image.half(), text_mask, image_mask, alpha.float(), beta.float())
    torch.library.opcheck(torch.ops.cbd_fast.maxsim_score, half_args)
    torch.library.opcheck(torch.ops.cbd_fast.maxsim_score_backward, (grad_score.float(), *half_args))


def held_cpu_bytes(fn):
    """(result of fn(), bytes allocated by the torch CPU allocator during fn() and still held at its end)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    return result, sum(e.nbytes() for e in events)


def test_cpu_forward_keeps_nothing_for_a_backward():
    """Under no_grad the forward holds only the score; with grad it saves its inputs and α, β (O(Bt·T + Bi·V)),
    never per-pair state: the backward recomputes the maxima."""
    text, image, text_mask, image_mask, text_weight, image_weight = make_inputs(6, 5, 7, 4, 8, dtype=torch.float32)
    with torch.no_grad():
        score, held = held_cpu_bytes(lambda: cbd_fast.maxsim(text, image, text_mask, image_mask, text_weight,
                                                             image_weight, backend="cpu"))
    assert score.grad_fn is None and held == score.numel() * score.element_size()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        score = cbd_fast.maxsim(text.requires_grad_(), image, text_mask, image_mask, text_weight, image_weight,
                                backend="cpu")
    per_pair = [x.shape for x in saved if x.dim() >= 2 and x.shape[:2] == (6, 7)]
    assert not per_pair, per_pair
    assert sum(x.numel() for x in saved) <= 2 * sum(x.numel() for x in (text, image, text_weight, image_weight)) + 42


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_similarities_give_nan_scores(backend):
    """A NaN on a valid token reaches the scores of its pairs (as torch.max propagates NaN)."""
    text, image, text_mask, image_mask, text_weight, image_weight = make_inputs(4, 6, 5, 7, 8, dtype=torch.float32)
    clean = cbd_fast.maxsim(text, image, text_mask, image_mask, text_weight, image_weight, backend=backend)
    text[1, 0, 3] = float("nan")  # token 0 is valid in every text
    scores = cbd_fast.maxsim(text, image, text_mask, image_mask, text_weight, image_weight, backend=backend)
    assert scores[1].isnan().all() and torch.equal(scores[[0, 2, 3]], clean[[0, 2, 3]])


def test_cpu_nan_on_padding_tokens_changes_nothing():
    text, image, text_mask, image_mask, text_weight, image_weight = make_inputs(4, 6, 5, 7, 8, dtype=torch.float32)
    clean = cbd_fast.maxsim(text, image, text_mask, image_mask, text_weight, image_weight, backend="cpu")
    text_pad, image_pad = (~text_mask).nonzero()[0].tolist(), (~image_mask).nonzero()[0].tolist()
    text[text_pad[0], text_pad[1]] = float("nan")
    image[image_pad[0], image_pad[1]] = float("nan")
    scores = cbd_fast.maxsim(text, image, text_mask, image_mask, text_weight, image_weight, backend="cpu")
    assert torch.equal(scores, clean)


@pytest.mark.parametrize("shape", [(6, 5, 7, 9, 24), (40, 20, 1, 17, 64)], ids=["as-is", "one-narrow-image"])
def test_cpu_op_is_symmetric_in_its_sides(shape):
    """Swapping (text, α) with (image, β) transposes the score bit for bit. The op computes a narrow image side (one
    image of 17 tokens against many texts) that way round, as the padding is smaller: same results."""
    inputs = make_inputs(*shape, dtype=torch.float32, empty_text=3)
    text, image, text_mask, image_mask, alpha, beta = op_arguments(inputs, dtype=torch.float32)
    score = torch.ops.cbd_fast.maxsim_score(text, image, text_mask, image_mask, alpha, beta)
    swapped = torch.ops.cbd_fast.maxsim_score(image, text, image_mask, text_mask, beta, alpha)
    assert torch.equal(score, swapped.t())
    expected, expected_grads = score_and_grads(reference.maxsim, *(x.double() if x.is_floating_point() else x
                                                                   for x in inputs))
    actual, grads = score_and_grads(cbd_fast.maxsim, *inputs, backend="cpu")
    torch.testing.assert_close(actual, expected.float(), rtol=1e-5, atol=1e-5)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad.float(), rtol=1e-5, atol=1e-5)


def isa_results(isa, monkeypatch, inputs):
    monkeypatch.setenv("CBD_FAST_CPU_ISA", isa)
    grad_score = torch.randn(inputs[0].shape[0], inputs[1].shape[0], generator=torch.Generator().manual_seed(5))
    return score_and_grads(cbd_fast.maxsim, *inputs, grad_score=grad_score, backend="cpu")


def test_cpu_instruction_set_versions_agree(monkeypatch):
    """The portable version (separate multiply and add) agrees with the best one to rounding; AVX2 and AVX-512 fuse
    their multiply-adds in the same order and agree bit for bit."""
    inputs = make_inputs(9, 13, 11, 17, 70, dtype=torch.float32, empty_text=2)
    best = cbd_fast.build_info()["cpu_isa"]
    results = {isa: isa_results(isa, monkeypatch, inputs) for isa in ("portable", "avx2", "avx512")}
    (score, grads), (portable_score, portable_grads) = results[best], results["portable"]
    torch.testing.assert_close(portable_score, score, rtol=1e-5, atol=1e-6)
    for grad, portable_grad in zip(grads, portable_grads):
        torch.testing.assert_close(portable_grad, grad, rtol=1e-5, atol=1e-6)
    if best == "avx512":
        avx2_score, avx2_grads = results["avx2"]
        assert torch.equal(avx2_score, score) and all(torch.equal(a, b) for a, b in zip(avx2_grads, grads))


def test_bad_instruction_set_name_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("CBD_FAST_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="CBD_FAST_CPU_ISA must be 'portable', 'avx2' or 'avx512'"):
        cbd_fast.maxsim(torch.randn(2, 3, 4), torch.randn(2, 3, 4), backend="cpu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("change,error,match", [
    (dict(text=torch.randn(5, 16)), ValueError, r"text must have shape \[Bt, T, D\]"),
    (dict(image=torch.randn(4, 7, 15)), ValueError, r"image must have shape \[Bi, V, D\] with D = 16"),
    (dict(text=torch.ones(5, 6, 16, dtype=torch.int64)), TypeError, "text must be float32"),
    (dict(image=torch.randn(4, 7, 16, dtype=torch.float64)), TypeError, "image must have text's dtype"),
    (dict(text_mask=torch.ones(5, 6)), TypeError, "text_mask must be a bool tensor"),
    (dict(image_mask=torch.ones(4, 6, dtype=torch.bool)), ValueError, r"image_mask must have shape \[Bi, V\]"),
    (dict(text_weight=torch.zeros(5, 7)), ValueError, r"text_weight must have shape \[Bt, T\]"),
    (dict(image_weight=torch.zeros(4, 7, dtype=torch.int32)), TypeError, "image_weight must be a floating"),
    (dict(image=torch.randn(4, 7, 16, device="meta")), ValueError, "image is on meta"),
    (dict(text_mask=torch.ones(5, 6, dtype=torch.bool, device="meta")), ValueError, "text_mask is on meta"),
    (dict(reduction="max"), ValueError, "reduction must be one of"),
])
def test_bad_inputs_name_the_argument(backend, change, error, match):
    kwargs = dict(text=torch.randn(5, 6, 16), image=torch.randn(4, 7, 16), text_mask=None, image_mask=None,
                  text_weight=None, image_weight=None, reduction="wti", backend=backend)
    kwargs.update(change)
    with pytest.raises(error, match=match):
        cbd_fast.maxsim(**kwargs)


def test_cpu_op_checks_its_arguments():
    text, image, text_mask, image_mask, alpha, beta = op_arguments(make_inputs())
    op = torch.ops.cbd_fast.maxsim_score
    with pytest.raises(RuntimeError, match="text_mask must be bool"):
        op(text, image, text_mask.double(), image_mask, alpha, beta)
    with pytest.raises(RuntimeError, match=r"beta must have shape \[Bi, V\]"):
        op(text, image, text_mask, image_mask, alpha, beta[:, 1:])
    with pytest.raises(RuntimeError, match="image must have the text's dtype"):
        op(text, image.float(), text_mask, image_mask, alpha, beta)
    with pytest.raises(RuntimeError, match=r"grad_score must have shape \[Bt, Bi\]"):
        torch.ops.cbd_fast.maxsim_score_backward(torch.ones(4, 4, dtype=torch.float64), text, image, text_mask,
                                                 image_mask, alpha, beta)
    with pytest.raises(ValueError, match=re.escape("backend='cpu' runs the C++ kernels on CPU tensors")):
        cbd_fast.maxsim(text.to("meta"), image.to("meta"), backend="cpu")
