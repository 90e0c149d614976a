"""Monte Carlo and exact Banzhaf interaction estimates of the token game (DESIGN §3-§4), with gradients."""
from __future__ import annotations

import torch

from . import _banzhaf_torch
from ._backend import resolve_backend, within_kernel_limits
from ._checks import check_choice, check_float_tensor, check_same_device, mask_or_default, result_dtype, \
    weight_or_default
from ._gpu_autograd import register_banzhaf_op, register_from_tokens_op
from ._ops import has_extension
from ._result import BanzhafResult
from .coalitions import num_exact_draws, seed_as_int64

ESTIMATORS = ("paired", "msr", "exact")
CPU_MAX_TOKENS = 4096  # kMaxTokens in csrc/cpu/banzhaf_cpu.cpp
# Limits of the Triton and CUDA kernels (cbd_fast.kernels.banzhaf, csrc/cuda/banzhaf_cuda.cu): ViT-L/14@336 tokens.
GPU_MAX_TEXT_TOKENS = 256
GPU_MAX_IMAGE_TOKENS = 576
# Widest span of a pair's valid weight logits (kMaxWeightSpan in csrc/cpu/banzhaf_cpu.cpp): beyond it the
# leave-one-out sums lose precision. The C++ and CUDA launchers check it themselves; the Triton path checks here.
MAX_WEIGHT_SPAN = 27.0


def _check_arguments(shape, ref, text_mask, image_mask, text_weight, image_weight, num_samples, seed, estimator):
    """Checks the arguments of a game of ``shape = (B, T, V)`` on ``ref``'s device; returns them with defaults."""
    batch, text_len, image_len = shape
    if min(batch, text_len, image_len) < 1:
        raise ValueError(f"sim must have B, T, V >= 1, got shape {tuple(shape)}")
    text_mask = mask_or_default("text_mask", text_mask, (batch, text_len), ref, "[B,T]")
    image_mask = mask_or_default("image_mask", image_mask, (batch, image_len), ref, "[B,V]")
    text_weight = weight_or_default("text_weight", text_weight, (batch, text_len), ref, "[B,T]")
    image_weight = weight_or_default("image_weight", image_weight, (batch, image_len), ref, "[B,V]")
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


def _check_values(op: str, sim, text_mask, image_mask, text_weight, image_weight) -> None:
    """The value checks of the compiled launchers, for the Triton path: finite similarities (``sim`` may be None)
    and finite valid weight logits spanning at most MAX_WEIGHT_SPAN within each pair."""
    if sim is not None and not bool(torch.isfinite(sim).all()):
        raise ValueError(f"{op}: sim must be finite")
    for name, weight, mask in (("text_weight", text_weight, text_mask), ("image_weight", image_weight, image_mask)):
        weight = weight.detach()
        if not bool(torch.isfinite(weight.masked_fill(~mask, 0)).all()):
            raise ValueError(f"{op}: {name} must be finite on valid tokens")
        high = weight.masked_fill(~mask, float("-inf")).amax(1)
        low = weight.masked_fill(~mask, float("inf")).amin(1)
        span = (high - low)[mask.any(1)]
        if span.numel() and float(span.max()) > MAX_WEIGHT_SPAN:
            raise ValueError(f"{op}: the valid {name} logits of a pair span {float(span.max()):.3g} > "
                             f"{MAX_WEIGHT_SPAN:g}; beyond that the leave-one-out sums lose precision (bound the "
                             "logits, e.g. with a scaled tanh)")


def _choose_backend(backend: str, device: torch.device, op: str, text_len: int, image_len: int,
                    estimator: str) -> str:
    """resolve_backend plus the limits of each kernel: ``auto`` avoids a kernel that cannot take the problem,
    a forced backend that cannot raises."""
    chosen = resolve_backend(backend, device, op)
    if chosen in ("triton", "cuda"):
        reason = None
        if estimator == "exact":
            reason = "estimator='exact' (a test oracle) runs on backend='cpu' or 'torch'"
        elif text_len > GPU_MAX_TEXT_TOKENS or image_len > GPU_MAX_IMAGE_TOKENS:
            reason = (f"the GPU kernels support T <= {GPU_MAX_TEXT_TOKENS} and V <= {GPU_MAX_IMAGE_TOKENS} "
                      f"tokens, got T={text_len}, V={image_len}")
        chosen = within_kernel_limits(chosen, backend, op, reason)
    if chosen == "cpu" and max(text_len, image_len) > CPU_MAX_TOKENS:
        raise ValueError(f"{op}: the CPU kernel supports T, V <= {CPU_MAX_TOKENS} tokens, got "
                         f"T={text_len}, V={image_len} (use backend='torch')")
    return chosen


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
        backend: ``"auto"``, ``"cpu"`` (fused C++), ``"triton"`` or ``"cuda"`` (fused GPU kernels, ``paired`` and
            ``msr``, T <= 256, V <= 576), ``"torch"`` (vectorised PyTorch, any device). ``auto`` takes the C++
            kernels on CPU tensors and the fastest GPU kernel that can take the problem on CUDA tensors.

    Returns:
        :class:`BanzhafResult` ``(interaction[B,T,V], text_value[B,T], image_value[B,V])``, float32 for half
        inputs, else ``sim.dtype``. Differentiable w.r.t. ``sim`` and both weights.
    """
    check_float_tensor("sim", sim, 3, "[B,T,V]")
    text_mask, image_mask, text_weight, image_weight, seed64 = _check_arguments(
        sim.shape, sim, text_mask, image_mask, text_weight, image_weight, num_samples, seed, estimator)
    chosen = _choose_backend(backend, sim.device, "banzhaf_interaction", sim.shape[1], sim.shape[2], estimator)
    if chosen == "torch":
        result = _banzhaf_torch.banzhaf_interaction(sim, text_mask, image_mask, text_weight, image_weight,
                                                     num_samples, seed, estimator)
        dtype = result_dtype(sim.dtype)
        return BanzhafResult(*(x.to(dtype) for x in result))
    args = (sim.contiguous(), text_mask.contiguous(), image_mask.contiguous(), text_weight.contiguous(),
            image_weight.contiguous(), num_samples, seed64, estimator)
    if chosen == "triton":
        from . import _triton_ops

        _check_values("banzhaf_interaction", sim, text_mask, image_mask, text_weight, image_weight)
        return BanzhafResult(*_triton_ops.banzhaf_interaction(*args))
    return BanzhafResult(*torch.ops.cbd_fast.banzhaf_interaction(*args))  # C++ (CPU) or CUDA, by dispatch key


def banzhaf_interaction_from_tokens(text: torch.Tensor, image: torch.Tensor, text_mask: torch.Tensor | None = None,
                                    image_mask: torch.Tensor | None = None,
                                    text_weight: torch.Tensor | None = None,
                                    image_weight: torch.Tensor | None = None, num_samples: int = 256,
                                    seed: int = 0, estimator: str = "paired",
                                    backend: str = "auto") -> BanzhafResult:
    """:func:`banzhaf_interaction` of ``sim[b] = text[b] @ image[b]^T``, from token features.

    text ``[B,T,D]``, image ``[B,V,D]`` (same B and D; features are used as given, not normalised). Gradients flow
    to both feature tensors and the weights. The GPU kernels compute each pair's similarity inside the fused pass
    (fp32 accumulation for half inputs); on CPU and with ``backend="torch"`` it is one batched GEMM feeding the pass.
    """
    check_float_tensor("text", text, 3, "[B,T,D]")
    check_float_tensor("image", image, 3, "[B,V,D]")
    check_same_device("text", text, "image", image)
    if text.shape[0] != image.shape[0] or text.shape[2] != image.shape[2]:
        raise ValueError(f"text [B,T,D] and image [B,V,D] must agree in B and D, got {tuple(text.shape)} and "
                         f"{tuple(image.shape)}")
    if text.dtype != image.dtype:
        raise TypeError(f"text and image must have one dtype, got {text.dtype} and {image.dtype}")
    shape = (text.shape[0], text.shape[1], image.shape[1])
    chosen = _choose_backend(backend, text.device, "banzhaf_interaction_from_tokens", shape[1], shape[2],
                             estimator)
    if chosen in ("triton", "cuda"):
        text_mask, image_mask, text_weight, image_weight, seed64 = _check_arguments(
            shape, text, text_mask, image_mask, text_weight, image_weight, num_samples, seed, estimator)
        args = (text.contiguous(), image.contiguous(), text_mask.contiguous(), image_mask.contiguous(),
                text_weight.contiguous(), image_weight.contiguous(), num_samples, seed64, estimator)
        if chosen == "triton":
            from . import _triton_ops

            _check_values("banzhaf_interaction_from_tokens", None, text_mask, image_mask, text_weight, image_weight)
            return BanzhafResult(*_triton_ops.banzhaf_interaction_from_tokens(*args))
        return BanzhafResult(*torch.ops.cbd_fast.banzhaf_interaction_from_tokens(*args))
    dtype = result_dtype(text.dtype)
    sim = torch.bmm(text.to(dtype), image.to(dtype).transpose(1, 2))
    return banzhaf_interaction(sim, text_mask, image_mask, text_weight, image_weight, num_samples, seed,
                               estimator, chosen)


# --- torch.library registration: shapes for tracing, and the fused backward ---------------------------------------

def _register() -> None:
    register_banzhaf_op("cbd_fast::banzhaf_interaction", "cbd_fast::banzhaf_interaction_backward")
    if hasattr(torch.ops.cbd_fast, "banzhaf_interaction_from_tokens"):  # the CUDA-only fused op
        register_from_tokens_op("cbd_fast::banzhaf_interaction_from_tokens", "cbd_fast::banzhaf_interaction_backward")


if has_extension():
    _register()
