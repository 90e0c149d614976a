"""The Triton kernels of :mod:`cbd_fast.kernels` as torch.library ops with shapes and autograd formulas.

Imported on first use of ``backend="triton"`` (importing Triton costs a second; CPU-only installs may lack it).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._gpu_autograd import register_banzhaf_op, register_from_tokens_op, register_maxsim_score_op
from .kernels import banzhaf as banzhaf_kernels
from .kernels import maxsim as maxsim_kernels


@torch.library.custom_op("cbd_fast::triton_banzhaf_interaction", mutates_args=())
def banzhaf_interaction(sim: Tensor, text_mask: Tensor, image_mask: Tensor, text_weight: Tensor,
                        image_weight: Tensor, num_samples: int, seed: int,
                        estimator: str) -> tuple[Tensor, Tensor, Tensor]:
    """(interaction [B,T,V], text_value [B,T], image_value [B,V]) of sim [B,T,V]; see cbd_fast.banzhaf."""
    return banzhaf_kernels.banzhaf_forward(sim, text_mask, image_mask, text_weight, image_weight, num_samples, seed,
                                           estimator)


@torch.library.custom_op("cbd_fast::triton_banzhaf_interaction_backward", mutates_args=())
def banzhaf_interaction_backward(grad_interaction: Tensor, grad_text_value: Tensor, grad_image_value: Tensor,
                                 sim: Tensor, text_mask: Tensor, image_mask: Tensor, text_weight: Tensor,
                                 image_weight: Tensor, num_samples: int, seed: int,
                                 estimator: str) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_sim [B,T,V], grad_text_weight [B,T], grad_image_weight [B,V]), recomputing every draw from the seed."""
    return banzhaf_kernels.banzhaf_backward(grad_interaction, grad_text_value, grad_image_value, sim, text_mask,
                                            image_mask, text_weight, image_weight, num_samples, seed, estimator)


@torch.library.custom_op("cbd_fast::triton_banzhaf_interaction_from_tokens", mutates_args=())
def banzhaf_interaction_from_tokens(text: Tensor, image: Tensor, text_mask: Tensor, image_mask: Tensor,
                                    text_weight: Tensor, image_weight: Tensor, num_samples: int, seed: int,
                                    estimator: str) -> tuple[Tensor, Tensor, Tensor]:
    """banzhaf_interaction of text [B,T,D] @ image [B,V,D]ᵀ, the similarity computed inside the kernel."""
    return banzhaf_kernels.banzhaf_forward_from_tokens(text, image, text_mask, image_mask, text_weight,
                                                       image_weight, num_samples, seed, estimator)


@torch.library.custom_op("cbd_fast::triton_maxsim_score", mutates_args=())
def maxsim_score(text: Tensor, image: Tensor, text_mask: Tensor, image_mask: Tensor, alpha: Tensor,
                 beta: Tensor) -> Tensor:
    """score [Bt,Bi] of DESIGN §5 with precomputed token coefficients alpha [Bt,T], beta [Bi,V]."""
    return maxsim_kernels.maxsim_forward(text, image, text_mask, image_mask, alpha, beta)


@torch.library.custom_op("cbd_fast::triton_maxsim_score_backward", mutates_args=())
def maxsim_score_backward(grad_score: Tensor, text: Tensor, image: Tensor, text_mask: Tensor, image_mask: Tensor,
                          alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_text, grad_image, grad_alpha, grad_beta), recomputing the maxima tile by tile."""
    return maxsim_kernels.maxsim_backward(grad_score, text, image, text_mask, image_mask, alpha, beta)


# --- shapes for tracing and autograd: the same as the C++/CUDA ops of each family ------------------------------

register_banzhaf_op("cbd_fast::triton_banzhaf_interaction", "cbd_fast::triton_banzhaf_interaction_backward")
register_from_tokens_op("cbd_fast::triton_banzhaf_interaction_from_tokens",
                        "cbd_fast::triton_banzhaf_interaction_backward")
register_maxsim_score_op("cbd_fast::triton_maxsim_score", "cbd_fast::triton_maxsim_score_backward")
