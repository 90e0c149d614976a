"""Monte Carlo and exact Banzhaf interaction estimates of the token game (DESIGN §3-§4), with gradients."""
from __future__ import annotations

import torch

from . import _banzhaf_torch
from ._backend import resolve_backend
from ._checks import check_choice, check_float_tensor, check_same_device, mask_or_default, result_dtype, \
    weight_or_default
from ._ops import has_extension
from ._result import BanzhafResult
from .coalitions import num_exact_draws, seed_as_int64

ESTIMATORS = ("paired", "msr", "exact")
CPU_MAX_TOKENS = 4096  # kMaxTokens in csrc/cpu/banzhaf_cpu.cpp


def _check_arguments(sim, text_mask, image_mask, text_weight, image_weight, num_samples, seed, estimator):
    check_float_tensor("sim", sim, 3, "[B,T,V]")
    batch, text_len, image_len = sim.shape
    if min(batch, text_len, image_len) < 1:
        raise ValueError(f"sim must have B, T, V >= 1, got shape {tuple(sim.shape)}")
    text_mask = mask_or_default("text_mask", text_mask, (batch, text_len), sim, "[B,T]")
    image_mask = mask_or_default("image_mask", image_mask, (batch, image_len), sim, "[B,V]")
    text_weight = weight_or_default("text_weight", text_weight, (batch, text_len), sim, "[B,T]")
    image_weight = weight_or_default("image_weight", image_weight, (batch, image_len), sim, "[B,V]")
    check_choice("estimator", estimator, ESTIMATORS)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int):
        raise TypeError(f"num_samples must be an int, got {type(num_samples).__name__}")
    if estimator != "exact" and not 0 < num_samples < 2**32:
        raise ValueError(f"num_samples must be in [1, 2**32) for estimator={estimator!r}, got {num_samples}")
    if batch >= 2**32:
        raise ValueError(f"sim batch must be < 2**32 (a 32-bit Philox counter word), got {batch}")
    if estimator == "exact":
        num_exact_draws(text_mask, image_mask)  # refuses pairs with more than 20 players
    return text_mask, image_mask, text_weight, image_weight, seed_as_int64(seed)


def banzhaf_interaction(sim: torch.Tensor, text_mask: torch.Tensor | None = None,
                        image_mask: torch.Tensor | None = None, text_weight: torch.Tensor | None = None,
                        image_weight: torch.Tensor | None = None, num_samples: int = 256, seed: int = 0,
                        estimator: str = "paired", backend: str = "auto") -> BanzhafResult:
    """Banzhaf interactions between text and image tokens of each pair, and single-token Banzhaf values.

    Args:
        sim: ``[B,T,V]`` per-pair token similarities (fp32, fp64, fp16 or bf16; half types accumulate in fp32).
        text_mask, image_mask: ``[B,T]`` / ``[B,V]`` bool validity (None = all valid). Invalid tokens are not
            players; their outputs are 0.
        text_weight, image_weight: ``[B,T]`` / ``[B,V]`` token weight logits (None = uniform).
        num_samples: Monte Carlo draws K (ignored by ``exact``).
        seed: selects the Philox coalition stream; the same seed gives the same coalitions on every backend.
        estimator: ``"paired"`` (default, four values per pair per draw in O(T·V) per draw), ``"msr"`` (one value
            per draw) or ``"exact"`` (enumeration, at most 20 players per pair).
        backend: ``"auto"``, ``"cpu"`` (fused C++), ``"torch"`` (vectorised PyTorch, any device).

    Returns:
        :class:`BanzhafResult` ``(interaction[B,T,V], text_value[B,T], image_value[B,V])``, float32 for half
        inputs, else ``sim.dtype``. Differentiable w.r.t. ``sim`` and both weights.
    """
    text_mask, image_mask, text_weight, image_weight, seed64 = _check_arguments(
        sim, text_mask, image_mask, text_weight, image_weight, num_samples, seed, estimator)
    chosen = resolve_backend(backend, sim.device, "banzhaf_interaction")
    if chosen == "cpu" and max(sim.shape[1], sim.shape[2]) > CPU_MAX_TOKENS:
        raise ValueError(f"banzhaf_interaction: the CPU kernel supports T, V <= {CPU_MAX_TOKENS} tokens, got "
                         f"T={sim.shape[1]}, V={sim.shape[2]} (use backend='torch')")
    if chosen == "torch":
        result = _banzhaf_torch.banzhaf_interaction(sim, text_mask, image_mask, text_weight, image_weight,
                                                     num_samples, seed, estimator)
        dtype = result_dtype(sim.dtype)
        return BanzhafResult(*(x.to(dtype) for x in result))
    return BanzhafResult(*torch.ops.cbd_fast.banzhaf_interaction(
        sim.contiguous(), text_mask.contiguous(), image_mask.contiguous(), text_weight.contiguous(),
        image_weight.contiguous(), num_samples, seed64, estimator))


def banzhaf_interaction_from_tokens(text: torch.Tensor, image: torch.Tensor, text_mask: torch.Tensor | None = None,
                                    image_mask: torch.Tensor | None = None,
                                    text_weight: torch.Tensor | None = None,
                                    image_weight: torch.Tensor | None = None, num_samples: int = 256,
                                    seed: int = 0, estimator: str = "paired",
                                    backend: str = "auto") -> BanzhafResult:
    """:func:`banzhaf_interaction` of ``sim[b] = text[b] @ image[b]^T``, from token features.

    text ``[B,T,D]``, image ``[B,V,D]`` (same B and D; features are used as given, not normalised). Gradients flow
    to both feature tensors and the weights. On CPU the similarity is one batched GEMM (fp32 accumulation for half
    inputs) feeding the fused pass.
    """
    check_float_tensor("text", text, 3, "[B,T,D]")
    check_float_tensor("image", image, 3, "[B,V,D]")
    check_same_device("text", text, "image", image)
    if text.shape[0] != image.shape[0] or text.shape[2] != image.shape[2]:
        raise ValueError(f"text [B,T,D] and image [B,V,D] must agree in B and D, got {tuple(text.shape)} and "
                         f"{tuple(image.shape)}")
    if text.dtype != image.dtype:
        raise TypeError(f"text and image must have one dtype, got {text.dtype} and {image.dtype}")
    dtype = result_dtype(text.dtype)
    sim = torch.bmm(text.to(dtype), image.to(dtype).transpose(1, 2))
    return banzhaf_interaction(sim, text_mask, image_mask, text_weight, image_weight, num_samples, seed,
                               estimator, backend)


# --- torch.library registration: shapes for tracing, and the fused backward ---------------------------------------

def _register() -> None:
    @torch.library.register_fake("cbd_fast::banzhaf_interaction")
    def _(sim, text_mask, image_mask, text_weight, image_weight, num_samples, seed, estimator):
        dtype = result_dtype(sim.dtype)
        batch, text_len, image_len = sim.shape
        return (sim.new_empty((batch, text_len, image_len), dtype=dtype), sim.new_empty((batch, text_len), dtype=dtype),
                sim.new_empty((batch, image_len), dtype=dtype))

    @torch.library.register_fake("cbd_fast::banzhaf_interaction_backward")
    def _(grad_interaction, grad_text_value, grad_image_value, sim, text_mask, image_mask, text_weight,
          image_weight, num_samples, seed, estimator):
        return torch.empty_like(sim), torch.empty_like(text_weight), torch.empty_like(image_weight)

    def setup_context(ctx, inputs, output):
        sim, text_mask, image_mask, text_weight, image_weight, num_samples, seed, estimator = inputs
        ctx.save_for_backward(sim, text_mask, image_mask, text_weight, image_weight)
        ctx.config = (num_samples, seed, estimator)

    def backward(ctx, grad_interaction, grad_text_value, grad_image_value):
        sim, text_mask, image_mask, text_weight, image_weight = ctx.saved_tensors
        grads = [g if g is not None else torch.zeros(shape, dtype=sim.dtype, device=sim.device)
                 for g, shape in ((grad_interaction, sim.shape), (grad_text_value, text_mask.shape),
                                  (grad_image_value, image_mask.shape))]
        grad_sim, grad_text_weight, grad_image_weight = torch.ops.cbd_fast.banzhaf_interaction_backward(
            *(g.contiguous() for g in grads), sim, text_mask, image_mask, text_weight, image_weight, *ctx.config)
        return grad_sim, None, None, grad_text_weight, grad_image_weight, None, None, None

    torch.library.register_autograd("cbd_fast::banzhaf_interaction", backward, setup_context=setup_context)


if has_extension():
    _register()
