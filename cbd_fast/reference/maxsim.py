"""Definition-level all-pairs score of DESIGN §5 in plain PyTorch: the test oracle for ``cbd_fast.maxsim``.

Readable on purpose: it forms the similarity matrix of every (text, image) pair with one einsum, takes the
masked maxima along both token axes, and weights them exactly as the formula is written. Texts go in chunks
of at most ``max_elements`` similarities; with a large ``max_elements`` it is the naive one-shot version.
"""
from __future__ import annotations

import torch

NEG_INF = float("-inf")


def token_weights(weight: torch.Tensor, mask: torch.Tensor, reduction: str) -> torch.Tensor:
    """α (or β) of DESIGN §5: ``[B, L]`` weights of the valid tokens, 0 on invalid ones and on empty rows.

    "wti": exp(w) / Σ_valid exp(w); "sum": 1; "mean": 1 / number of valid tokens.
    """
    valid = mask.to(weight.dtype)
    if reduction == "sum" or mask.shape[-1] == 0:  # no tokens (L = 0): nothing to weight
        return valid
    if reduction == "mean":
        return valid / valid.sum(-1, keepdim=True).clamp_min(1)
    if reduction != "wti":
        raise ValueError(f"reduction must be 'wti', 'sum' or 'mean', got {reduction!r}")
    logits = weight.masked_fill(~mask, NEG_INF)
    # Softmax is shift-invariant; shifting by the row max keeps exp finite (finfo.min for rows with no token).
    shift = logits.amax(-1, keepdim=True).clamp_min(torch.finfo(weight.dtype).min).detach()
    exp = torch.exp(logits - shift)  # 0 on invalid tokens
    return exp / exp.sum(-1, keepdim=True).clamp_min(torch.finfo(weight.dtype).tiny)


def masked_max(values: torch.Tensor, valid: torch.Tensor, dim: int) -> torch.Tensor:
    """Max of ``values`` over the ``valid`` entries along ``dim``; 0 where there is none.

    Taken with argmax + gather so that ties go to the lowest index and the gradient reaches that one entry.
    """
    if values.shape[dim] == 0:  # no token at all (T or V = 0): the empty sum, 0
        return values.sum(dim)
    masked = values.masked_fill(~valid, NEG_INF)
    index = masked.argmax(dim, keepdim=True)
    best = masked.gather(dim, index).squeeze(dim)
    return torch.where(valid.any(dim), best, 0.0)


def maxsim(text: torch.Tensor, image: torch.Tensor, text_mask: torch.Tensor | None = None,
           image_mask: torch.Tensor | None = None, text_weight: torch.Tensor | None = None,
           image_weight: torch.Tensor | None = None, reduction: str = "wti",
           max_elements: int = 2**26) -> torch.Tensor:
    """``score[Bt, Bi]`` of text ``[Bt, T, D]`` against image ``[Bi, V, D]`` by the definition (DESIGN §5).

    Masks are bool ``[Bt, T]`` / ``[Bi, V]`` (None = all valid), weights are logits of the same shapes (None =
    zeros, used by "wti" only). Computed in float64 for float64 features, else float32 (half-precision
    features are upcast). Materialises ``[chunk, Bi, T, V]`` with ``chunk · Bi · T · V <= max_elements``
    (at least one text per chunk).
    """
    dtype = torch.float64 if text.dtype == torch.float64 else torch.float32
    text, image = text.to(dtype), image.to(dtype)
    num_texts, text_len, _ = text.shape
    num_images, image_len, _ = image.shape
    if text_mask is None:
        text_mask = torch.ones(num_texts, text_len, dtype=torch.bool, device=text.device)
    if image_mask is None:
        image_mask = torch.ones(num_images, image_len, dtype=torch.bool, device=text.device)
    if text_weight is None:
        text_weight = torch.zeros(num_texts, text_len, dtype=dtype, device=text.device)
    if image_weight is None:
        image_weight = torch.zeros(num_images, image_len, dtype=dtype, device=text.device)
    alpha = token_weights(text_weight.to(dtype), text_mask, reduction)  # [Bt, T]
    beta = token_weights(image_weight.to(dtype), image_mask, reduction)  # [Bi, V]

    chunk = max(1, max_elements // max(1, num_images * text_len * image_len))
    scores = [text.new_zeros((0, num_images))]
    for start in range(0, num_texts, chunk):
        texts = slice(start, start + chunk)
        sim = torch.einsum("atd,bvd->abtv", text[texts], image)  # S of every pair: [c, Bi, T, V]
        valid = text_mask[texts, None, :, None] & image_mask[None, :, None, :]  # both tokens valid
        best_image_token = masked_max(sim, valid, dim=3)  # max_u S[t, u]: [c, Bi, T]
        best_text_token = masked_max(sim, valid, dim=2)  # max_t S[t, u]: [c, Bi, V]
        text_term = (alpha[texts, None, :] * best_image_token).sum(-1)
        image_term = (beta[None, :, :] * best_text_token).sum(-1)
        scores.append(0.5 * (text_term + image_term))
    return torch.cat(scores, dim=0)
