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
from ._gpu_autograd import forbid_double_backward, register_maxsim_score_op
from ._ops import has_extension

REDUCTIONS = ("wti", "sum", "mean")

# Similarity entries the torch backend computes at once (one block of texts against every image): 16 MiB in
# fp32, plus about as much again for the masked copy and, in the backward, the gradient of the block.
TORCH_BLOCK_ELEMENTS = 2**22
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

    chosen = resolve_backend(backend, text.device, "maxsim")
    if chosen in ("triton", "cuda"):
        reason = None
        if text_len > GPU_MAX_TEXT_TOKENS or image_len > GPU_MAX_IMAGE_TOKENS or dim > GPU_MAX_DIM:
            reason = (f"the GPU kernels support T <= {GPU_MAX_TEXT_TOKENS}, V <= {GPU_MAX_IMAGE_TOKENS} and "
                      f"D <= {GPU_MAX_DIM}, got T={text_len}, V={image_len}, D={dim}")
        chosen = within_kernel_limits(chosen, backend, "maxsim", reason)
    if chosen in ("triton", "cuda"):
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
        return torch.ops.cbd_fast.maxsim_score(*args)
    if chosen == "cpu":
        return torch.ops.cbd_fast.maxsim_forward(text.contiguous(), image.contiguous(), text_mask.contiguous(),
                                                 image_mask.contiguous(), text_weight.contiguous(),
                                                 image_weight.contiguous(), reduction)[0]
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
    return torch.softmax(logits, dim=-1) * mask_f


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
    """Shape functions (for torch.compile / FakeTensor) and the autograd formula of the compiled op."""

    @torch.library.register_fake("cbd_fast::maxsim_forward")
    def _maxsim_forward_fake(text, image, text_mask, image_mask, text_weight, image_weight, reduction):
        num_texts, text_len, _ = text.shape
        num_images, image_len, _ = image.shape
        dtype = result_dtype(text.dtype)
        return (text.new_empty((num_texts, num_images), dtype=dtype),
                text.new_empty((num_texts, num_images, text_len), dtype=torch.int32),
                text.new_empty((num_texts, num_images, image_len), dtype=torch.int32),
                text.new_empty((num_texts, num_images, text_len), dtype=dtype),
                text.new_empty((num_texts, num_images, image_len), dtype=dtype))

    @torch.library.register_fake("cbd_fast::maxsim_backward")
    def _maxsim_backward_fake(grad_score, text, image, text_mask, image_mask, text_weight, image_weight, reduction,
                              text_argmax, image_argmax, text_max, image_max):
        return (torch.empty_like(text), torch.empty_like(image), torch.empty_like(text_weight),
                torch.empty_like(image_weight))

    def _setup_context(ctx, inputs, output):
        text, image, text_mask, image_mask, text_weight, image_weight, reduction = inputs
        _, text_argmax, image_argmax, text_max, image_max = output
        # Only the score is differentiable; the maxima are saved state for the backward.
        ctx.mark_non_differentiable(text_max, image_max)
        ctx.set_materialize_grads(False)  # no zero gradients for the outputs the backward ignores
        ctx.save_for_backward(text, image, text_mask, image_mask, text_weight, image_weight, text_argmax,
                              image_argmax, text_max, image_max)
        ctx.reduction = reduction

    def _backward(ctx, grad_score, _grad_text_argmax, _grad_image_argmax, _grad_text_max, _grad_image_max):
        if grad_score is None:  # the score did not reach the loss
            return None, None, None, None, None, None, None
        text, image, text_mask, image_mask, text_weight, image_weight, text_argmax, image_argmax, text_max, \
            image_max = ctx.saved_tensors
        grad_text, grad_image, grad_text_weight, grad_image_weight = torch.ops.cbd_fast.maxsim_backward(
            grad_score, text, image, text_mask, image_mask, text_weight, image_weight, ctx.reduction, text_argmax,
            image_argmax, text_max, image_max)
        return grad_text, grad_image, None, None, grad_text_weight, grad_image_weight, None

    torch.library.register_autograd("cbd_fast::maxsim_forward", _backward, setup_context=_setup_context)
    forbid_double_backward("cbd_fast::maxsim_backward", "cbd_fast::maxsim_forward")

    if hasattr(torch.ops.cbd_fast, "maxsim_score"):  # the CUDA kernels' op (no CPU kernel)
        register_maxsim_score_op("cbd_fast::maxsim_score", "cbd_fast::maxsim_score_backward")


if has_extension():  # without the compiled extension the ops do not exist; backend="torch" still works
    _register_abstract_and_autograd()
