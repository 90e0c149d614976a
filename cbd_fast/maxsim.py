"""All-pairs fine-grained score of DESIGN §5 (MaxSim with WTI token weights), for retrieval and InfoNCE.

For every text ``a`` and image ``b``::

    s[a,b] = ½ ( Σ_t α_a[t] · max_{u valid} ⟨X[a,t], Y[b,u]⟩  +  Σ_u β_b[u] · max_{t valid} ⟨X[a,t], Y[b,u]⟩ )

computed without holding the ``[Bt, Bi, T, V]`` similarity tensor.
"""
from __future__ import annotations

import torch

from ._backend import resolve_backend, within_kernel_limits
from ._checks import (check_choice, check_float_tensor, check_same_device, mask_or_default, result_dtype,
                      weight_or_default)
from ._gpu_autograd import register_maxsim_score_op
from ._ops import has_extension

REDUCTIONS = ("wti", "sum", "mean")

# Similarity entries the torch backend computes at once (one block of texts against every image): 8 MiB in fp32,
# plus about as much again for the masked copy and, in the backward, the gradient of the block. Measured (one
# thread, medians of 3 interleaved rounds, blocks 2^18..2^23): 2^21 is within 3% of the fastest block at every size
# tried (forward 512×512×32×17×64 and 128×128×77×50×256, forward+backward 64×64×32×50×256 and 32×32×32×17×64);
# 2^23 is up to 1.47× slower, 2^18 up to 1.23×.
TORCH_BLOCK_ELEMENTS = 2**21
# Limits of the Triton and CUDA kernels (cbd_fast.kernels.maxsim, csrc/cuda/maxsim_cuda.cu).
GPU_MAX_TEXT_TOKENS = 256
GPU_MAX_IMAGE_TOKENS = 576
GPU_MAX_DIM = 1024


def maxsim(text: torch.Tensor, image: torch.Tensor, text_mask: torch.Tensor | None = None,
           image_mask: torch.Tensor | None = None, text_weight: torch.Tensor | None = None,
           image_weight: torch.Tensor | None = None, reduction: str = "wti", backend: str = "auto") -> torch.Tensor:
    """Fine-grained score of every text against every image, ``score[Bt, Bi]`` (DESIGN §5).

    Args:
        text: text token features ``[Bt, T, D]`` (float32/64, float16, bfloat16), L2-normalised by the caller.
        image: image token features ``[Bi, V, D]``, same dtype and device as ``text``.
        text_mask: bool ``[Bt, T]``, True = valid token; None = all valid.
        image_mask: bool ``[Bi, V]``; None = all valid.
        text_weight: token weight logits ``[Bt, T]`` (any float dtype); None = zeros. Used by ``"wti"`` only.
        image_weight: token weight logits ``[Bi, V]``; None = zeros. Used by ``"wti"`` only.
        reduction: token weights α, β: ``"wti"`` softmax of the logits over the valid tokens, ``"sum"`` 1 per
            valid token, ``"mean"`` 1 / number of valid tokens.
        backend: ``"auto"`` (C++ kernels for CPU tensors, the fastest GPU kernel for CUDA tensors), ``"cpu"``,
            ``"triton"``, ``"cuda"`` (tiled GPU kernels: T <= 256, V <= 576, D <= 1024) or ``"torch"``.

    Returns:
        ``score[Bt, Bi]`` in the features' dtype (float32 for half-precision features). Invalid tokens never
        enter a max or a sum, whatever values they hold; a pair whose text or image has no valid token (or
        T, V or D = 0) scores 0. Non-finite values on valid tokens propagate into the scores they reach. Ties
        in a max go to the lowest token index, which is also the one entry the gradient flows through.
        Differentiable w.r.t. ``text``, ``image`` and both weights (to any order with ``backend="torch"``; the
        compiled kernels give first derivatives).
    """
    check_float_tensor("text", text, 3, "[Bt, T, D]")
    check_float_tensor("image", image, 3, "[Bi, V, D]")
    num_texts, text_len, dim = text.shape
    num_images, image_len, _ = image.shape
    if image.shape[-1] != dim:
        raise ValueError(f"image must have shape [Bi, V, D] with D = {dim} (text's last dimension), "
                         f"got {tuple(image.shape)}")
    if image.dtype != text.dtype:
        raise TypeError(f"image must have text's dtype {text.dtype}, got {image.dtype}")
    check_same_device("text", text, "image", image)
    text_mask = mask_or_default("text_mask", text_mask, (num_texts, text_len), text, "[Bt, T]")
    image_mask = mask_or_default("image_mask", image_mask, (num_images, image_len), text, "[Bi, V]")
    text_weight = weight_or_default("text_weight", text_weight, (num_texts, text_len), text, "[Bt, T]")
    image_weight = weight_or_default("image_weight", image_weight, (num_images, image_len), text, "[Bi, V]")
    check_choice("reduction", reduction, REDUCTIONS)

    # On CPU tensors "auto" takes the C++ kernels: faster than the torch backend at every size measured (one thread,
    # forward and forward+backward, from 2×2 pairs of 3-4 tokens at D = 8 to 256×256 pairs of 77×50 tokens at
    # D = 512, one-sided cases such as one image against 2000 texts included: 1.1-8×).
    chosen = resolve_backend(backend, text.device, "maxsim")
    if chosen in ("triton", "cuda"):
        reason = None
        if text_len > GPU_MAX_TEXT_TOKENS or image_len > GPU_MAX_IMAGE_TOKENS or dim > GPU_MAX_DIM:
            reason = (f"the GPU kernels support T <= {GPU_MAX_TEXT_TOKENS}, V <= {GPU_MAX_IMAGE_TOKENS} and "
                      f"D <= {GPU_MAX_DIM}, got T={text_len}, V={image_len}, D={dim}")
        chosen = within_kernel_limits(chosen, backend, "maxsim", reason)
    if chosen in ("cpu", "triton", "cuda"):
        if chosen != "cpu":  # the C++ kernels never read an invalid token's features; the GPU tiles multiply them
            text, image = _zero_invalid_tokens(text, text_mask), _zero_invalid_tokens(image, image_mask)
        dtype = result_dtype(text.dtype)
        # The coefficients (softmax of the logits for "wti") stay in autograd's hands; the kernels take them as
        # given and return their gradients.
        alpha = token_coefficients(text_weight, text_mask, reduction, dtype).contiguous()
        beta = token_coefficients(image_weight, image_mask, reduction, dtype).contiguous()
        args = (text.contiguous(), image.contiguous(), text_mask.contiguous(), image_mask.contiguous(), alpha, beta)
        if chosen == "triton":
            from . import _triton_ops

            return _triton_ops.maxsim_score(*args)
        return torch.ops.cbd_fast.maxsim_score(*args)  # C++ (CPU) or CUDA, by dispatch key
    return _maxsim_torch(text, image, text_mask, image_mask, text_weight, image_weight, reduction)


def token_coefficients(weight: torch.Tensor, mask: torch.Tensor, reduction: str, dtype: torch.dtype) -> torch.Tensor:
    """α (or β) of DESIGN §5 in ``dtype``: ``[B, L]``, 0 on invalid tokens and on rows with no valid token."""
    mask_f = mask.to(dtype)
    if reduction == "sum":
        return mask_f
    if reduction == "mean":
        return mask_f / mask_f.sum(-1, keepdim=True).clamp_min(1)
    logits = weight.to(dtype).masked_fill(~mask, float("-inf"))
    # A row without valid tokens would be softmax of all -inf (NaN): give it finite logits, then zero it.
    logits = torch.where(mask.any(-1, keepdim=True), logits, 0.0)
    if logits.shape[-1] == 0:  # no tokens at all: nothing to weight (amax over an empty dimension is an error)
        return mask_f
    # The softmax written out (the shift is a constant to autograd): torch.softmax's CPU backward changes its last
    # bits with the thread count, and the C++ backend's gradients are bit-identical for any thread count. The
    # normaliser is a left-to-right sum (the last entry of a cumulative sum) so that padding a row with invalid
    # tokens (exact zeros at its end) leaves it bit-identical: a vectorised sum's order depends on the row length,
    # and the evaluation scores captions in blocks trimmed to their longest member.
    weights = torch.exp(logits - logits.amax(-1, keepdim=True).detach()) * mask_f
    normaliser = torch.where(mask.any(-1, keepdim=True), weights.cumsum(-1)[..., -1:], 1.0)  # empty rows: 0 / 1
    return weights / normaliser


def _zero_invalid_tokens(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``features[B, L, D]`` with the invalid tokens' rows set to 0, for the backends that multiply every token:
    whatever an invalid token holds (NaN, inf) then gives a finite similarity for the mask to exclude, and
    0 · its features in a gradient stays 0. Their gradient is 0."""
    return torch.where(mask.unsqueeze(-1), features, 0.0)


def _exclusion_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 on valid tokens, -inf on invalid ones: ``[B, L]`` in ``dtype``."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def _max_over(sim: torch.Tensor, dim: int) -> torch.Tensor:
    """``sim.max(dim).values``, and over an empty ``dim`` (T or V = 0) the empty sum: those entries have no valid
    token and become 0 anyway, and the result stays in the graph, so gradients come back as zeros."""
    return sim.max(dim=dim).values if sim.shape[dim] else sim.sum(dim)


def _maxsim_torch(text, image, text_mask, image_mask, text_weight, image_weight, reduction):
    """The ``backend="torch"`` implementation: plain PyTorch on any device, differentiable by autograd.

    Texts go in blocks so that at most ``TORCH_BLOCK_ELEMENTS`` similarities exist at once, forward or backward.
    What autograd keeps per block is O(c·Bi·(T+V)): ``max(dim)`` saves only its indices, not the block it
    reduced, and the masking is an addition, which saves nothing.
    """
    dtype = result_dtype(text.dtype)
    num_texts, text_len, dim = text.shape
    num_images, image_len, _ = image.shape
    alpha = token_coefficients(text_weight, text_mask, reduction, dtype)  # [Bt, T]
    beta = token_coefficients(image_weight, image_mask, reduction, dtype)  # [Bi, V]
    # Invalid tokens are excluded by adding -inf to their similarities: an addition saves nothing for the
    # backward, where masked_fill would keep a [c, T, Bi, V] bool mask per block alive.
    text = _zero_invalid_tokens(text.to(dtype), text_mask)
    image_tokens = _zero_invalid_tokens(image.to(dtype), image_mask).reshape(num_images * image_len, dim)
    image_nonempty = image_mask.any(-1)  # [Bi]
    text_bias, image_bias = _exclusion_bias(text_mask, dtype), _exclusion_bias(image_mask, dtype)
    block = max(1, TORCH_BLOCK_ELEMENTS // max(1, num_images * text_len * image_len))
    scores = []
    for start in range(0, num_texts, block):
        stop = min(start + block, num_texts)
        text_valid = text_mask[start:stop]  # [c, T]
        sim = (text[start:stop].reshape((stop - start) * text_len, dim) @ image_tokens.T).view(
            stop - start, text_len, num_images, image_len)  # [c, T, Bi, V]
        sim = (sim + text_bias[start:stop, :, None, None]).add_(image_bias)  # in place on a fresh tensor
        # Maxima over valid tokens only; the first maximum wins ties. Entries without any valid token are -inf
        # and are replaced by 0 before they meet a weight (0 · -inf would be NaN).
        text_max = _max_over(sim, 3)  # [c, T, Bi]: best image token of each text token
        image_max = _max_over(sim, 1)  # [c, Bi, V]: best text token of each image token
        text_max = torch.where(text_valid[:, :, None] & image_nonempty, text_max, 0.0)
        image_max = torch.where(text_valid.any(-1)[:, None, None] & image_mask, image_max, 0.0)
        text_term = torch.einsum("ct,ctb->cb", alpha[start:stop], text_max)
        image_term = torch.einsum("bv,cbv->cb", beta, image_max)
        scores.append(0.5 * (text_term + image_term))
    if not scores:
        return text.new_zeros((0, num_images), dtype=dtype)
    return torch.cat(scores, dim=0)


def _register_abstract_and_autograd() -> None:
    """Shape functions (for torch.compile / FakeTensor) and the autograd formula of the compiled op (C++ on CPU,
    CUDA on GPU): the backward recomputes the maxima, so only the inputs are saved."""
    register_maxsim_score_op("cbd_fast::maxsim_score", "cbd_fast::maxsim_score_backward")


if has_extension():  # without the compiled extension the ops do not exist; backend="torch" still works
    _register_abstract_and_autograd()
