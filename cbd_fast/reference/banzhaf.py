"""Definition-level Banzhaf estimates in plain PyTorch (DESIGN §3-§4).

Readable on purpose: every interaction sample evaluates the game value four times, exactly as the formula is
written. Vectorised over draws and token pairs, and chunked so memory stays bounded. The fast backends are
tested against these functions; they are not meant to be fast.
"""
from __future__ import annotations


import torch

from .._result import BanzhafResult
from ..coalitions import exact_coalitions, num_exact_draws, philox_coalitions

NEG_INF = float("-inf")


def token_weights(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """exp(weight) on valid tokens, 0 elsewhere, shifted by the row max (the game is scale-invariant). [B,L]."""
    logits = weight.masked_fill(~mask, NEG_INF)
    shift = logits.amax(-1, keepdim=True).clamp_min(-1e30).detach()
    return torch.exp(logits - shift).masked_fill(~mask, 0.0)


def masked_max(values: torch.Tensor, members: torch.Tensor, dim: int) -> torch.Tensor:
    """Max of ``values`` over the members along ``dim`` (ties -> lowest index); -inf when there is none."""
    masked = values.masked_fill(~members, NEG_INF)
    index = masked.argmax(dim, keepdim=True)
    return masked.gather(dim, index).squeeze(dim)


def coalition_value(sim: torch.Tensor, text_in: torch.Tensor, image_in: torch.Tensor, text_w: torch.Tensor,
                    image_w: torch.Tensor) -> torch.Tensor:
    """The game value v(A, C) of DESIGN §3, broadcast over leading dimensions.

    sim[..., T, V]; text_in[..., T] and image_in[..., V] bool membership (already restricted to valid tokens);
    text_w[..., T], image_w[..., V] positive token weights. Returns v[...]; 0 when A or C is empty.
    """
    text_any, image_any = text_in.any(-1, keepdim=True), image_in.any(-1, keepdim=True)
    # A max over an empty set is -inf; such terms are excluded, and replaced by 0 so no inf or nan reaches the
    # sums or their gradients.
    row_max = torch.where(text_in & image_any, masked_max(sim, image_in.unsqueeze(-2), dim=-1), 0.0)  # r_t(C)
    col_max = torch.where(image_in & text_any, masked_max(sim, text_in.unsqueeze(-1), dim=-2), 0.0)  # c_u(A)
    text_w = torch.where(text_in, text_w, 0.0)
    image_w = torch.where(image_in, image_w, 0.0)
    text_total, image_total = text_w.sum(-1), image_w.sum(-1)
    text_term = (text_w * row_max).sum(-1) / torch.where(text_total > 0, text_total, 1.0)
    image_term = (image_w * col_max).sum(-1) / torch.where(image_total > 0, image_total, 1.0)
    nonempty = text_any.squeeze(-1) & image_any.squeeze(-1)
    return torch.where(nonempty, 0.5 * (text_term + image_term), 0.0)


def _prepare(sim, text_mask, image_mask, text_weight, image_weight):
    batch, text_len, image_len = sim.shape
    dtype = torch.float64 if sim.dtype == torch.float64 else torch.float32
    text_mask = torch.ones(batch, text_len, dtype=torch.bool, device=sim.device) if text_mask is None else text_mask
    image_mask = torch.ones(batch, image_len, dtype=torch.bool, device=sim.device) if image_mask is None \
        else image_mask
    text_weight = torch.zeros(batch, text_len, dtype=dtype, device=sim.device) if text_weight is None \
        else text_weight
    image_weight = torch.zeros(batch, image_len, dtype=dtype, device=sim.device) if image_weight is None \
        else image_weight
    return (sim.to(dtype), text_mask, image_mask, token_weights(text_weight.to(dtype), text_mask),
            token_weights(image_weight.to(dtype), image_mask))


def _draw_source(estimator, batch, text_len, image_len, num_samples, seed, text_mask, image_mask):
    """(number of draws, function giving the valid-restricted coalitions of draws [k0, k1))."""
    if estimator == "exact":
        return num_exact_draws(text_mask, image_mask), lambda k0, k1: exact_coalitions(k0, k1, text_mask, image_mask)

    def philox(k0, k1):
        text_in, image_in = philox_coalitions(k0, k1, batch, text_len, image_len, seed, text_mask.device)
        return text_in & text_mask, image_in & image_mask

    return num_samples, philox


def banzhaf_interaction(sim, text_mask=None, image_mask=None, text_weight=None, image_weight=None,
                        num_samples: int = 256, seed: int = 0, estimator: str = "paired",
                        max_elements: int = 2**24):
    """Reference of :func:`cbd_fast.banzhaf_interaction` (same coalitions, same estimate).

    sim[B,T,V] -> (interaction[B,T,V], text_value[B,T], image_value[B,V]) in float32 (float64 for float64 input).
    ``paired`` and ``exact`` average the second difference of four values per (i, j) and per draw; ``msr``
    combines stratum means of one value per draw. ``max_elements`` bounds the largest intermediate tensor.
    """
    batch, text_len, image_len = sim.shape
    sim, text_mask, image_mask, text_w, image_w = _prepare(sim, text_mask, image_mask, text_weight, image_weight)
    num_draws, draw = _draw_source(estimator, batch, text_len, image_len, num_samples, seed, text_mask, image_mask)
    if estimator == "msr":
        result = _msr(sim, text_w, image_w, num_draws, draw, max_elements)
    else:
        result = _paired(sim, text_w, image_w, num_draws, draw, max_elements)
    interaction, text_value, image_value = result
    pair_mask = text_mask.unsqueeze(-1) & image_mask.unsqueeze(-2)
    return BanzhafResult(torch.where(pair_mask, interaction, 0.0), torch.where(text_mask, text_value, 0.0),
                         torch.where(image_mask, image_value, 0.0))


def _paired(sim, text_w, image_w, num_draws, draw, max_elements):
    batch, text_len, image_len = sim.shape
    eye_t = torch.eye(text_len, dtype=torch.bool, device=sim.device)  # row i: token i alone
    eye_v = torch.eye(image_len, dtype=torch.bool, device=sim.device)
    per_draw = batch * text_len * image_len * text_len * image_len
    chunk = max(1, max_elements // per_draw)
    interaction = sim.new_zeros(batch, text_len, image_len)
    text_value = sim.new_zeros(batch, text_len)
    image_value = sim.new_zeros(batch, image_len)
    # Broadcast layout: [draw, pair, i, j, T, V] for the interaction, [draw, pair, i, T, V] for the values.
    s6 = sim[None, :, None, None]
    tw6, iw6 = text_w[None, :, None, None], image_w[None, :, None, None]
    for k0 in range(0, num_draws, chunk):
        text_in, image_in = draw(k0, min(num_draws, k0 + chunk))
        valid_t = text_w > 0
        valid_v = image_w > 0
        # A ∖ i and A ∪ i for every text token i (only valid i can join): [k, B, i, T]
        a_out = text_in[:, :, None, :] & ~eye_t
        a_in = a_out | (eye_t & valid_t[None, :, :, None])
        c_out = image_in[:, :, None, :] & ~eye_v
        c_in = c_out | (eye_v & valid_v[None, :, :, None])

        def v(a, c):  # a: [k,B,i,T], c: [k,B,j,V] -> v over all (i, j): [k,B,i,j]
            return coalition_value(s6, a[:, :, :, None, :], c[:, :, None, :, :], tw6, iw6)

        second_difference = v(a_in, c_in) - v(a_in, c_out) - v(a_out, c_in) + v(a_out, c_out)
        interaction += second_difference.sum(0)
        s5 = sim[None, :, None]
        full_c = image_in[:, :, None, :]
        full_a = text_in[:, :, None, :]
        text_value += (coalition_value(s5, a_in, full_c, text_w[None, :, None], image_w[None, :, None])
                       - coalition_value(s5, a_out, full_c, text_w[None, :, None], image_w[None, :, None])).sum(0)
        image_value += (coalition_value(s5, full_a, c_in, text_w[None, :, None], image_w[None, :, None])
                        - coalition_value(s5, full_a, c_out, text_w[None, :, None], image_w[None, :, None])).sum(0)
    return interaction / num_draws, text_value / num_draws, image_value / num_draws


def _msr(sim, text_w, image_w, num_draws, draw, max_elements):
    batch, text_len, image_len = sim.shape
    chunk = max(1, max_elements // (batch * text_len * image_len))
    # Sums and counts of v over the four strata (i in/out of A) x (j in/out of C), and the value strata.
    stratum_sum = sim.new_zeros(2, 2, batch, text_len, image_len)
    stratum_count = sim.new_zeros(2, 2, batch, text_len, image_len)
    text_sum, text_count = sim.new_zeros(2, batch, text_len), sim.new_zeros(2, batch, text_len)
    image_sum, image_count = sim.new_zeros(2, batch, image_len), sim.new_zeros(2, batch, image_len)
    for k0 in range(0, num_draws, chunk):
        text_in, image_in = draw(k0, min(num_draws, k0 + chunk))
        value = coalition_value(sim[None], text_in, image_in, text_w[None], image_w[None])  # [k, B]
        t_side = torch.stack([text_in, ~text_in]).to(sim.dtype)  # [2, k, B, T]
        v_side = torch.stack([image_in, ~image_in]).to(sim.dtype)
        stratum_sum += torch.einsum("kb,xkbi,ykbj->xybij", value, t_side, v_side)
        stratum_count += torch.einsum("xkbi,ykbj->xybij", t_side, v_side)
        text_sum += torch.einsum("kb,xkbi->xbi", value, t_side)
        text_count += t_side.sum(1)
        image_sum += torch.einsum("kb,xkbj->xbj", value, v_side)
        image_count += v_side.sum(1)

    def mean(total, count):  # empty strata count as 0
        return torch.where(count > 0, total / count.clamp_min(1), 0.0)

    strata = mean(stratum_sum, stratum_count)
    interaction = strata[0, 0] - strata[0, 1] - strata[1, 0] + strata[1, 1]
    text_means, image_means = mean(text_sum, text_count), mean(image_sum, image_count)
    return interaction, text_means[0] - text_means[1], image_means[0] - image_means[1]


def banzhaf_interaction_from_tokens(text, image, text_mask=None, image_mask=None, text_weight=None,
                                    image_weight=None, num_samples: int = 256, seed: int = 0,
                                    estimator: str = "paired", max_elements: int = 2**24):
    """Reference of :func:`cbd_fast.banzhaf_interaction_from_tokens`: ``sim = text @ image^T`` per pair."""
    dtype = torch.float64 if text.dtype == torch.float64 else torch.float32
    sim = torch.bmm(text.to(dtype), image.to(dtype).transpose(1, 2))
    return banzhaf_interaction(sim, text_mask, image_mask, text_weight, image_weight, num_samples, seed, estimator,
                               max_elements)


def banzhaf_interaction_per_pair_mc(sim, text_mask=None, image_mask=None, text_weight=None, image_weight=None,
                                    num_samples: int = 64, seed: int = 0) -> torch.Tensor:
    """The textbook Monte Carlo estimate, as research code writes it: a Python loop over token pairs (i, j),
    fresh independent coalitions for every pair, four value evaluations per draw. Benchmark baseline only.

    Returns interaction[B,T,V]. Coalitions come from ``torch.Generator`` (not the Philox stream).
    """
    batch, text_len, image_len = sim.shape
    sim, text_mask, image_mask, text_w, image_w = _prepare(sim, text_mask, image_mask, text_weight, image_weight)
    generator = torch.Generator(device=sim.device).manual_seed(seed)
    interaction = sim.new_zeros(batch, text_len, image_len)
    for b in range(batch):
        for i in range(text_len):
            for j in range(image_len):
                if not (text_mask[b, i] and image_mask[b, j]):
                    continue
                a = (torch.rand(num_samples, text_len, generator=generator, device=sim.device) < 0.5) & text_mask[b]
                c = (torch.rand(num_samples, image_len, generator=generator, device=sim.device) < 0.5) \
                    & image_mask[b]
                a[:, i] = False
                c[:, j] = False
                a_i, c_j = a.clone(), c.clone()
                a_i[:, i] = True
                c_j[:, j] = True
                args = (sim[b], text_w[b], image_w[b])
                total = (coalition_value(args[0], a_i, c_j, args[1], args[2])
                         - coalition_value(args[0], a_i, c, args[1], args[2])
                         - coalition_value(args[0], a, c_j, args[1], args[2])
                         + coalition_value(args[0], a, c, args[1], args[2]))
                interaction[b, i, j] = total.mean()
    return interaction


