"""Autograd formulas shared by the Triton and CUDA versions of the GPU-only ops.

``banzhaf_interaction_from_tokens`` differentiates through the similarity: the op's own backward (Triton or CUDA)
gives dL/dS, and ``S = text · imageᵀ`` turns it into feature gradients with two batched GEMMs. ``maxsim_score``
takes precomputed token coefficients, so its backward returns gradients for the features and the coefficients;
the coefficients' own graph (softmax of the weight logits) is differentiated by autograd outside the op.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from ._checks import result_dtype


def register_from_tokens_autograd(op_name: str, sim_backward: Callable) -> None:
    """Autograd for ``op_name(text, image, text_mask, image_mask, text_weight, image_weight, num_samples, seed,
    estimator)``; ``sim_backward`` has the signature of ``cbd_fast::banzhaf_interaction_backward``."""

    def setup_context(ctx, inputs, output):
        text, image, text_mask, image_mask, text_weight, image_weight, num_samples, seed, estimator = inputs
        ctx.save_for_backward(text, image, text_mask, image_mask, text_weight, image_weight)
        ctx.config = (num_samples, seed, estimator)

    def backward(ctx, grad_interaction, grad_text_value, grad_image_value):
        text, image, text_mask, image_mask, text_weight, image_weight = ctx.saved_tensors
        dtype = result_dtype(text.dtype)
        text_f, image_f = text.to(dtype), image.to(dtype)
        # The forward kernel accumulated S in fp32 (fp64 for fp64 features); the backward uses the same S.
        sim = torch.bmm(text_f, image_f.transpose(1, 2))
        grad_sim, grad_text_weight, grad_image_weight = sim_backward(
            grad_interaction.contiguous(), grad_text_value.contiguous(), grad_image_value.contiguous(), sim,
            text_mask, image_mask, text_weight, image_weight, *ctx.config)
        grad_sim = grad_sim.to(dtype)
        grad_text = torch.bmm(grad_sim, image_f).to(text.dtype)
        grad_image = torch.bmm(grad_sim.transpose(1, 2), text_f).to(image.dtype)
        return grad_text, grad_image, None, None, grad_text_weight, grad_image_weight, None, None, None

    torch.library.register_autograd(op_name, backward, setup_context=setup_context)


def register_maxsim_score_autograd(op_name: str, score_backward: Callable) -> None:
    """Autograd for ``op_name(text, image, text_mask, image_mask, alpha, beta) -> score``; ``score_backward(grad,
    text, image, text_mask, image_mask, alpha, beta)`` returns (grad_text, grad_image, grad_alpha, grad_beta)."""

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, grad_score):
        text, image, text_mask, image_mask, alpha, beta = ctx.saved_tensors
        grad_text, grad_image, grad_alpha, grad_beta = score_backward(
            grad_score.contiguous(), text, image, text_mask, image_mask, alpha, beta)
        return grad_text.to(text.dtype), grad_image.to(image.dtype), None, None, grad_alpha, grad_beta

    torch.library.register_autograd(op_name, backward, setup_context=setup_context)
