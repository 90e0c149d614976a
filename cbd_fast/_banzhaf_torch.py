"""``backend="torch"``: the O(T·V)-per-draw paired estimator of DESIGN §4.1, vectorised in plain PyTorch.

Runs on any device without the extension and is differentiable by autograd. For every draw (A, C) it keeps the
top-two maxima per row and column and the partial sums that give all four values of every token pair at once.
The game splits into a text half (rows = text tokens, max over image members) and an image half (the same
computation on the transposed similarity), so one function, :func:`_half_game`, serves both.

Precision: a value without row i needs the leave-one-out sums Σ_{A∖i}. "Total minus own term" cancels when
token i carries most of A's weight (with valid logits spanning 17, float32 keeps nothing of the other tokens). At
most one member per draw can: the heaviest one, h. Every other member i has W_{A∖i} >= w_h >= w_i, so
W_A <= 2·W_{A∖i} and total − own stays within a few roundings of its own scale; for h the sum is taken again
without it. The float32 result thus keeps float32 precision over the whole allowed logit span
(cbd_fast.banzhaf.MAX_WEIGHT_SPAN).
"""
from __future__ import annotations

import torch

from .reference.banzhaf import _draw_source, _msr, _prepare

NEG_INF = float("-inf")
# Elements of a draw chunk's largest tensors. Measured (one thread, medians of 3 interleaved rounds, chunks
# 2^16..2^22): 2^19 is within 6% of the fastest chunk at B=8, T=32, V=50, K=256 and B=16, T=77, V=197, K=32, forward
# and forward+backward; 2^22 was up to 2.1× slower, 2^16 up to 1.4×.
CHUNK_ELEMENTS = 2**19


def _leave_one_out(terms, heaviest, not_heaviest):
    """``(Σ_r terms[r], Σ_{r' ≠ r} terms[r'] for every r)`` over the rows of ``terms[..., R, C]``: shapes
    ``[..., 1, C]`` and ``[..., R, C]``. ``heaviest[..., 1, 1]`` indexes the member of largest weight and
    ``not_heaviest[..., R]`` is 0 there, 1 elsewhere: that row's sum is taken without it, every other row's is the
    total minus its own term (see the module docstring)."""
    index = heaviest.expand(*terms.shape[:-2], 1, terms.shape[-1])
    without_heaviest = torch.einsum("...rc,...r->...c", terms, not_heaviest).unsqueeze(-2)
    total = without_heaviest + terms.gather(-2, index)
    return total, (total - terms).scatter_(-2, index, without_heaviest)  # in place on a fresh tensor


def _half_game(sim, row_w, row_in, col_in, row_valid):
    """One half of v (weighted mean over row members of the row max over column members), for all pairs.

    sim[1,B,R,C]; row_w[B,R] token weights (0 on invalid rows); row_in[k,B,R], col_in[k,B,C] bool members;
    row_valid[B,R]. With A = row members, C = column members, A' = A∖i, C' = C∖j and f the half value, returns

    - ``second_difference[k,B,R,C]``: f(A'∪i, C'∪j) − f(A'∪i, C') − f(A', C'∪j) + f(A', C')
    - ``row_effect[k,B,R]``: f(A'∪i, C) − f(A', C)
    - ``col_effect[k,B,C]``: f(A, C∪j) − f(A, C∖j)
    """
    num_cols = sim.shape[-1]
    col_index = torch.arange(num_cols, device=sim.device)
    masked = sim.masked_fill(~col_in.unsqueeze(-2), NEG_INF)  # [k,B,R,C]
    top1_index = masked.argmax(-1, keepdim=True)  # first maximum = lowest index on ties
    top1 = masked.gather(-1, top1_index)  # r_t(C)          [k,B,R,1]
    without_top1 = masked.scatter(-1, top1_index, NEG_INF)
    top2 = without_top1.gather(-1, without_top1.argmax(-1, keepdim=True))
    j_wins = (sim > top1) | ((sim == top1) & (col_index < top1_index))
    max_with_j = torch.where(j_wins, sim, top1)  # r_t(C ∪ j)     [k,B,R,C]
    max_without_j = torch.where(col_index == top1_index, top2, top1)  # r_t(C ∖ j)

    col_count = col_in.sum(-1)  # [k,B]
    c_empty = (col_count == 0)[..., None, None]  # C = ∅
    c_out_empty = ((col_count.unsqueeze(-1) - col_in.long()) == 0).unsqueeze(-2)  # C ∖ j = ∅  [k,B,1,C]
    row_count = row_in.sum(-1)
    a_out_empty = ((row_count.unsqueeze(-1) - row_in.long()) == 0).unsqueeze(-1)  # A ∖ i = ∅  [k,B,R,1]
    a_empty = (row_count == 0)[..., None]

    member_w = torch.where(row_in, row_w, 0.0).unsqueeze(-1)  # [k,B,R,1]
    join_w = torch.where(row_in, 0.0, row_w).unsqueeze(-1)  # weight i adds when it joins A
    max_without_j = torch.where(c_out_empty, 0.0, max_without_j)
    top1 = torch.where(c_empty, 0.0, top1)
    terms_with_j = member_w * max_with_j  # w_t r_t(C ∪ j) of the members  [k,B,R,C]
    terms_without_j = member_w * max_without_j
    terms_full = member_w * top1  # [k,B,R,1]
    heaviest = member_w.argmax(-2, keepdim=True)  # [k,B,1,1]
    not_heaviest = torch.ones_like(member_w.squeeze(-1)).scatter(-1, heaviest.squeeze(-1), 0.0)  # [k,B,R]
    # Σ_{t∈A} and Σ_{t∈A∖i} of every term
    sum_with_j, others_with_j = _leave_one_out(terms_with_j, heaviest, not_heaviest)  # [k,B,1,C], [k,B,R,C]
    sum_without_j, others_without_j = _leave_one_out(terms_without_j, heaviest, not_heaviest)
    sum_full, others_full = _leave_one_out(terms_full, heaviest, not_heaviest)  # [k,B,1,1], [k,B,R,1]
    total_w, others_w = _leave_one_out(member_w, heaviest, not_heaviest)  # W_A, W_{A∖i}
    with_i_w = torch.where(row_valid.unsqueeze(-1), total_w + join_w, 1.0)  # W of A' ∪ i (guarded)
    without_i_w = torch.where(a_out_empty, 1.0, others_w)  # W of A'

    def joined(col_sum, row_term, empty):  # f(A' ∪ i, ·)
        return torch.where(empty, 0.0, (col_sum + join_w * row_term) / with_i_w)

    def left_out(others, empty):  # f(A', ·) = Σ_{A∖i} terms / W_{A∖i}
        return torch.where(empty, 0.0, others / without_i_w)

    no = torch.zeros((), dtype=torch.bool, device=sim.device)
    second_difference = (joined(sum_with_j, max_with_j, no) - joined(sum_without_j, max_without_j, c_out_empty)
                         - left_out(others_with_j, a_out_empty)
                         + left_out(others_without_j, a_out_empty | c_out_empty))
    row_effect = (joined(sum_full, top1, c_empty) - left_out(others_full, a_out_empty | c_empty)).squeeze(-1)
    safe_total = torch.where(a_empty, 1.0, total_w.squeeze(-1))
    col_effect = torch.where(a_empty, 0.0, (sum_with_j - sum_without_j).squeeze(-2) / safe_total)
    return second_difference, row_effect, col_effect


def banzhaf_interaction(sim, text_mask, image_mask, text_weight, image_weight, num_samples, seed, estimator,
                        max_elements: int = CHUNK_ELEMENTS):
    """Same contract as :func:`cbd_fast.banzhaf_interaction`; ``max_elements`` bounds a draw chunk's tensors."""
    batch, text_len, image_len = sim.shape
    sim, text_mask, image_mask, text_w, image_w = _prepare(sim, text_mask, image_mask, text_weight, image_weight)
    num_draws, draw = _draw_source(estimator, batch, text_len, image_len, num_samples, seed, text_mask, image_mask)
    if estimator == "msr":  # one O(T·V) value per draw already: the reference algorithm is the vectorised one
        interaction, text_value, image_value = _msr(sim, text_w, image_w, num_draws, draw, max_elements)
    else:
        chunk = max(1, max_elements // (batch * text_len * image_len))
        sim_t = sim.transpose(1, 2).unsqueeze(0)
        interaction = sim.new_zeros(batch, text_len, image_len)
        text_value, image_value = sim.new_zeros(batch, text_len), sim.new_zeros(batch, image_len)
        for k0 in range(0, num_draws, chunk):
            text_in, image_in = draw(k0, min(num_draws, k0 + chunk))
            text_sd, text_row, text_col = _half_game(sim.unsqueeze(0), text_w, text_in, image_in, text_mask)
            image_sd, image_row, image_col = _half_game(sim_t, image_w, image_in, text_in, image_mask)
            interaction = interaction + 0.5 * (text_sd.sum(0) + image_sd.sum(0).transpose(1, 2))
            text_value = text_value + 0.5 * (text_row.sum(0) + image_col.sum(0))
            image_value = image_value + 0.5 * (text_col.sum(0) + image_row.sum(0))
        interaction, text_value, image_value = (x / num_draws for x in (interaction, text_value, image_value))
    pair_mask = text_mask.unsqueeze(-1) & image_mask.unsqueeze(-2)
    return (torch.where(pair_mask, interaction, 0.0), torch.where(text_mask, text_value, 0.0),
            torch.where(image_mask, image_value, 0.0))
