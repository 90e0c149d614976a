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
# Widest span of a pair's valid weight logits (kMaxWeightSpan in csrc/banzhaf_common.h): beyond it the C++, CUDA and
# Triton kernels' leave-one-out sums lose precision. Checked here for every backend (the compiled launchers check
# again, for direct calls of the ops).
MAX_WEIGHT_SPAN = 27.0


def _check_arguments(op: str, shape, ref, text_mask, image_mask, text_weight, image_weight, num_samples, seed,
                     estimator):
    """Checks the arguments of a game of ``shape = (B, T, V)`` (each >= 1) on ``ref``'s device; returns the masks and
    weights with their defaults and the seed as int64. The scalars and the batch bound come first, so that nothing
    of size B×(T+V) is allocated for a problem that is then refused."""
    batch, text_len, image_len = shape
    check_choice("estimator", estimator, ESTIMATORS)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int):
        raise TypeError(f"num_samples must be an int, got {type(num_samples).__name__}")
    if estimator != "exact" and not 0 < num_samples < 2**32:
        raise ValueError(f"num_samples must be in [1, 2**32) for estimator={estimator!r} (a 32-bit Philox counter "
                         f"word), got {num_samples}")
    seed64 = seed_as_int64(seed)
    if batch >= 2**32:
        raise ValueError(f"{op}: the batch B must be < 2**32 (a 32-bit Philox counter word), got {batch}")
    text_mask = mask_or_default("text_mask", text_mask, (batch, text_len), ref, "[B,T]")
    image_mask = mask_or_default("image_mask", image_mask, (batch, image_len), ref, "[B,V]")
    text_weight = weight_or_default("text_weight", text_weight, (batch, text_len), ref, "[B,T]")
    image_weight = weight_or_default("image_weight", image_weight, (batch, image_len), ref, "[B,V]")
    if estimator == "exact":
        if ref.device.type == "meta":
            raise ValueError(f"{op}: estimator='exact' sizes its enumeration by each pair's number of valid tokens, "
                             "which meta tensors do not carry (trace shapes with estimator='paired' or 'msr')")
        num_exact_draws(text_mask, image_mask)  # refuses pairs with more than 20 players
    return text_mask, image_mask, text_weight, image_weight, seed64


def _check_values(op: str, inputs_name: str, inputs: tuple[torch.Tensor, ...], text_mask, image_mask, text_weight,
                  image_weight) -> None:
    """The value checks of the compiled kernels, for every backend, with one device-to-host copy: finite
    ``inputs`` (the similarity, or the token features), finite valid weight logits spanning at most
    MAX_WEIGHT_SPAN within each pair and, for token features (``inputs = (text, image)``), similarities that
    cannot overflow their accumulation dtype. Meta tensors carry no values and are not checked."""
    if text_mask.device.type == "meta":
        return
    flags = [torch.stack([torch.isfinite(x).all() for x in inputs]).all().double()]
    for weight, mask in ((text_weight, text_mask), (image_weight, image_mask)):
        weight = weight.detach().double()
        flags.append(torch.isfinite(weight).logical_or(~mask).all().double())
        high = weight.masked_fill(~mask, float("-inf")).amax(1)
        low = weight.masked_fill(~mask, float("inf")).amin(1)
        flags.append(torch.where(mask.any(1), high - low, 0.0).amax())
    if len(inputs) == 2:  # |text_t · image_u| <= |text_t|·|image_u| (Cauchy-Schwarz): the largest product of norms
        flags += [torch.linalg.vector_norm(x.detach(), dim=-1, dtype=torch.float64).amax(-1) for x in inputs]
    finite, text_finite, text_span, image_finite, image_span, *norms = torch.cat(
        [f.reshape(-1) for f in flags]).tolist()
    if not finite:
        raise ValueError(f"{op}: {inputs_name} must be finite")
    for name, weight_finite, span in (("text_weight", text_finite, text_span),
                                      ("image_weight", image_finite, image_span)):
        if not weight_finite:
            raise ValueError(f"{op}: {name} must be finite on valid tokens")
        if span > MAX_WEIGHT_SPAN:
            raise ValueError(f"{op}: the valid {name} logits of a pair span {span:.3g} > {MAX_WEIGHT_SPAN:g}; beyond "
                             "that the leave-one-out sums lose precision (bound the logits, e.g. with a scaled tanh)")
    if norms:
        batch = len(norms) // 2
        bound = max(a * b for a, b in zip(norms[:batch], norms[batch:]))
        dtype = result_dtype(inputs[0].dtype)
        if not bound <= torch.finfo(dtype).max / 2:
            raise ValueError(f"{op}: text and image token norms up to {max(norms[:batch]):.3g} and "
                             f"{max(norms[batch:]):.3g} let text·imageᵀ overflow {dtype} (scale the features down)")


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
        inputs, else ``sim.dtype``. Differentiable w.r.t. ``sim`` and both weights (to any order with
        ``backend="torch"``; the compiled kernels give first derivatives).

    Raises:
        ValueError / TypeError naming the argument: wrong types, shapes, dtypes or devices; non-finite ``sim``;
        non-finite valid weight logits or ones spanning more than MAX_WEIGHT_SPAN (27) within a pair.
    """
    check_float_tensor("sim", sim, 3, "[B,T,V]")
    if min(sim.shape) < 1:
        raise ValueError(f"sim must have B, T, V >= 1, got shape {tuple(sim.shape)}")
    op = "banzhaf_interaction"
    chosen = _choose_backend(backend, sim.device, op, sim.shape[1], sim.shape[2], estimator)
    text_mask, image_mask, text_weight, image_weight, seed64 = _check_arguments(
        op, sim.shape, sim, text_mask, image_mask, text_weight, image_weight, num_samples, seed, estimator)
    _check_values(op, "sim", (sim,), text_mask, image_mask, text_weight, image_weight)
    return _run(chosen, sim, text_mask, image_mask, text_weight, image_weight, num_samples, seed, seed64, estimator)


def _run(chosen: str, sim, text_mask, image_mask, text_weight, image_weight, num_samples, seed, seed64,
         estimator) -> BanzhafResult:
    """The estimate of checked arguments on backend ``chosen``."""
    if chosen == "torch":
        result = _banzhaf_torch.banzhaf_interaction(sim, text_mask, image_mask, text_weight, image_weight,
                                                     num_samples, seed, estimator)
        dtype = result_dtype(sim.dtype)
        return BanzhafResult(*(x.to(dtype) for x in result))
    args = (sim.contiguous(), text_mask.contiguous(), image_mask.contiguous(), text_weight.contiguous(),
            image_weight.contiguous(), num_samples, seed64, estimator)
    if chosen == "triton":
        from . import _triton_ops

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
    Besides the checks of :func:`banzhaf_interaction`, text and image must be finite and their token norms small
    enough that no similarity overflows (|text_t·image_u| <= |text_t|·|image_u| < half the dtype's maximum).
    """
    check_float_tensor("text", text, 3, "[B,T,D]")
    check_float_tensor("image", image, 3, "[B,V,D]")
    check_same_device("text", text, "image", image)
    if text.shape[0] != image.shape[0] or text.shape[2] != image.shape[2]:
        raise ValueError(f"text [B,T,D] and image [B,V,D] must agree in B and D, got {tuple(text.shape)} and "
                         f"{tuple(image.shape)}")
    if text.dtype != image.dtype:
        raise TypeError(f"text and image must have one dtype, got {text.dtype} and {image.dtype}")
    if min(text.shape[:2]) < 1 or image.shape[1] < 1:
        raise ValueError(f"text [B,T,D] and image [B,V,D] must have B, T, V >= 1, got {tuple(text.shape)} and "
                         f"{tuple(image.shape)}")
    op = "banzhaf_interaction_from_tokens"
    shape = (text.shape[0], text.shape[1], image.shape[1])
    chosen = _choose_backend(backend, text.device, op, shape[1], shape[2], estimator)
    text_mask, image_mask, text_weight, image_weight, seed64 = _check_arguments(
        op, shape, text, text_mask, image_mask, text_weight, image_weight, num_samples, seed, estimator)
    _check_values(op, "text and image", (text, image), text_mask, image_mask, text_weight, image_weight)
    if chosen in ("triton", "cuda") and text.shape[2] > 0:
        args = (text.contiguous(), image.contiguous(), text_mask.contiguous(), image_mask.contiguous(),
                text_weight.contiguous(), image_weight.contiguous(), num_samples, seed64, estimator)
        if chosen == "triton":
            from . import _triton_ops

            return BanzhafResult(*_triton_ops.banzhaf_interaction_from_tokens(*args))
        return BanzhafResult(*torch.ops.cbd_fast.banzhaf_interaction_from_tokens(*args))
    dtype = result_dtype(text.dtype)
    sim = torch.bmm(text.to(dtype), image.to(dtype).transpose(1, 2))  # finite: the norm check bounds it
    return _run(chosen, sim, text_mask, image_mask, text_weight, image_weight, num_samples, seed, seed64, estimator)


# --- torch.library registration: shapes for tracing, and the fused backward ---------------------------------------

def _register() -> None:
    register_banzhaf_op("cbd_fast::banzhaf_interaction", "cbd_fast::banzhaf_interaction_backward")
    if hasattr(torch.ops.cbd_fast, "banzhaf_interaction_from_tokens"):  # the CUDA-only fused op
        register_from_tokens_op("cbd_fast::banzhaf_interaction_from_tokens", "cbd_fast::banzhaf_interaction_backward")


if has_extension():
    _register()
