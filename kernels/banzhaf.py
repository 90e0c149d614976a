"""Triton kernels of the fused Monte Carlo Banzhaf pass (DESIGN §3-§4): forward, backward and from-tokens.

The estimates and gradients are those of the C++ CPU op ``torch.ops.cbd_fast.banzhaf_interaction`` /
``banzhaf_interaction_backward`` (csrc/cpu/banzhaf_cpu.cpp): the same Philox coalitions (generated in the kernel,
DESIGN §4.2), the same per-draw quantities (HalfGame::prepare/accumulate/backward, msr_*) and the same tie rule
(a max goes to the lowest index, the one entry its gradient flows through).

Work decomposition
    One program per (pair, slice of draws). Each program writes its partial sums to its own row of a
    ``[B * slices, ...]`` buffer and the slices are summed afterwards in a fixed order: no atomics, results are
    bit-identical from run to run. The number of slices, the path and the block sizes depend on (B, T, V, K, dtype)
    only, never on the device. The backward regenerates every draw from the seed.

Two paths
    * tile: the whole padded T×V similarity tile stays in registers for all draws of a program (the padded shapes
      of ``TILE_SHAPES``, the anchor T=32, V=50 among them). The paired backward runs one launch per half of the
      game, which keeps each kernel within the register file;
    * blocked: larger tiles are walked in [BLOCK_T, BLOCK_V] blocks, several passes per draw. The draw's
      memberships and the per-draw row and column statistics live in a small per-program float64 scratch buffer,
      the accumulators in the program's row of the partial buffer (read-modify-write by the owning program only),
      with a barrier between passes.

One draw, one half of the game
    Rows are the players whose weighted mean is taken, columns the players maxed over: the text half has rows =
    text tokens; the image half is the same on Sᵀ (in the code: the same [T, V] block with ``ROW_AXIS=1``). With A
    the member rows, C the member columns, per row r the top-two maxima over C (t1, i1, t2, i2) and

        Q[r,c] = max(S[r,c], t1[r]) − [C∖c ≠ ∅] · (c == i1[r] ? t2[r] : t1[r])

    the second difference f11 − f01 − f10 + f00 of the C++ code (and its row and column effects) rearranges to

        sd[r,c]   = α_r · (Q[r,c] − β_r · Σ_{r'∈A∖r} w_r' Q[r',c])
        row[r]    = α_r · (t1[r] − β_r · Σ_{r'∈A∖r} w_r' t1[r'])           (0 when C = ∅)
        col[c]    = Σ_{r∈A} w_r Q[r,c] / Σ_{r∈A} w_r                        (0 when A = ∅)

    with W'_r = Σ_{A∖r} w, α_r = w_r / (W'_r + w_r) and β_r = 1 / W'_r (0 when A∖r = ∅). The leave-one-out sums
    Σ_{A∖r} are a float64 total minus the row's own term, which stays accurate for the skewed weights that make the
    float32 version cancel; everything else is computed in float32 (float64 for float64 inputs). The backward
    differentiates these expressions (see ``_half_backward_tile``), so no term of size 1/W'_r is ever cancelled
    against another one in float32.
"""
from __future__ import annotations

import dataclasses
import os

import torch
import triton
import triton.language as tl

from ._spec import CompileSpec

MAX_TEXT_TOKENS = 256  # T limit
MAX_IMAGE_TOKENS = 576  # V limit (ViT-L/14@336)
ESTIMATORS = ("paired", "msr")

# Programs aimed at: 2 per SM of a 132-SM H100. A constant, so that the slicing (and hence the rounding of the
# result) depends on the problem only, never on the device.
TARGET_PROGRAMS = 264
# Draw counts per slice are accumulated in float32 (msr), exact up to 2^24.
MAX_DRAWS_PER_SLICE = 1 << 24
# Padded (T, V) tiles of the tile path per compute dtype, smallest first: a problem takes the first tile that holds
# it, else the blocked path. A fixed set, each one spill-free on sm_90a (compile_specs lists them all; on some other
# shapes ptxas trades a few bytes of spills for occupancy). Warps of the tile kernels per (estimator, float64?).
TILE_SHAPES = {torch.float32: ((16, 64), (32, 64), (16, 128)), torch.float64: ((16, 64),)}
TILE_WARPS = {("paired", False): 8, ("paired", True): 16, ("msr", False): 16, ("msr", True): 16}
# Blocks of the blocked path (float32, float64) and its warps, chosen by the sm_90a spill check. Block sizes are
# powers of two <= 128.
BLOCK_T, BLOCK_V = 32, 32
BLOCK_T_FP64, BLOCK_V_FP64 = 16, 64
BLOCKED_WARPS = 8
# D chunk of the in-kernel similarity (tl.dot needs every dimension >= 16, as every tile shape is).
BLOCK_D = 32
# Per-program float64 scratch of the blocked path: slots of max(T, V) entries.
# (draw memberships of both sides, per-row top-two maxima, per-column sums, per-row backward terms)
(_SLOT_TEXT_IN, _SLOT_IMAGE_IN, _SLOT_TOP1, _SLOT_TOP1_INDEX, _SLOT_TOP2, _SLOT_TOP2_INDEX, _SLOT_COL_TOTAL, _SLOT_OWN,
 _SLOT_Z, _SLOT_H) = range(10)
_NUM_SLOTS = 10

_PAIRED: tl.constexpr = tl.constexpr(0)
_MSR: tl.constexpr = tl.constexpr(1)
_NO_INDEX: tl.constexpr = tl.constexpr(1 << 30)
_PHILOX_MUL0: tl.constexpr = tl.constexpr(0xD2511F53)
_PHILOX_MUL1: tl.constexpr = tl.constexpr(0xCD9E8D57)
_PHILOX_WEYL0: tl.constexpr = tl.constexpr(0x9E3779B9)
_PHILOX_WEYL1: tl.constexpr = tl.constexpr(0xBB67AE85)
_S_TEXT_IN: tl.constexpr = tl.constexpr(_SLOT_TEXT_IN)  # _SLOT_IMAGE_IN follows it: slot _S_TEXT_IN + side
_S_TOP1: tl.constexpr = tl.constexpr(_SLOT_TOP1)
_S_TOP1_INDEX: tl.constexpr = tl.constexpr(_SLOT_TOP1_INDEX)
_S_TOP2: tl.constexpr = tl.constexpr(_SLOT_TOP2)
_S_TOP2_INDEX: tl.constexpr = tl.constexpr(_SLOT_TOP2_INDEX)
_S_COL_TOTAL: tl.constexpr = tl.constexpr(_SLOT_COL_TOTAL)
_S_OWN: tl.constexpr = tl.constexpr(_SLOT_OWN)
_S_Z: tl.constexpr = tl.constexpr(_SLOT_Z)
_S_H: tl.constexpr = tl.constexpr(_SLOT_H)
_N_SLOTS: tl.constexpr = tl.constexpr(_NUM_SLOTS)
_INTERPRETED: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


def _device_fn(fn):
    """``triton.jit`` for the device helpers of the kernels. Under the Triton interpreter (TRITON_INTERPRET=1, read
    at import like triton.jit does) they stay plain Python functions: the interpreter re-patches triton.language on
    every nested jit call, which would dominate the run time of the CPU tests; the helpers only use tl builtins, so
    they behave the same either way."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return fn
    return triton.jit(fn)


# =====================================================================================================================
# Coalitions
# =====================================================================================================================

@_device_fn
def _philox_words(key0, key1, draw, pair, SIDE: tl.constexpr, chunk):
    """Philox4x32-10 of counter (draw, pair, SIDE, chunk) under key (key0, key1): four uint32 scalars."""
    c0 = draw
    c1 = pair
    c2 = draw * 0 + SIDE
    c3 = tl.cast(chunk, tl.uint32)
    k0 = key0
    k1 = key1
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, _PHILOX_MUL0)
        lo0 = tl.mul(c0, _PHILOX_MUL0, sanitize_overflow=False)
        hi1 = tl.umulhi(c2, _PHILOX_MUL1)
        lo1 = tl.mul(c2, _PHILOX_MUL1, sanitize_overflow=False)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = tl.add(k0, _PHILOX_WEYL0, sanitize_overflow=False)  # uint32 wrap-around is intended
        k1 = tl.add(k1, _PHILOX_WEYL1, sanitize_overflow=False)
    return c0, c1, c2, c3


@_device_fn
def _members(key0, key1, draw, pair, SIDE: tl.constexpr, first, token, valid):
    """Coalition membership (bool) of each token (DESIGN §4.2): its Philox bit is set and it is valid.

    key0/key1: uint32 seed halves; draw, pair: uint32 scalars; token: int32 vector whose tokens all lie in the
    128-token chunk of ``first`` (blocks of at most 128 tokens aligned to their size), so one Philox call (a
    scalar, shared by the whole vector) gives every bit: token t is bit t % 32 of word (t % 128) // 32."""
    w0, w1, w2, w3 = _philox_words(key0, key1, draw, pair, SIDE, first // 128)
    word = (token % 128) // 32
    bits = tl.where(word == 0, w0, tl.where(word == 1, w1, tl.where(word == 2, w2, w3)))
    return valid & (((bits >> (token % 32).to(tl.uint32)) & 1) != 0)


@triton.jit(do_not_specialize=("seed_lo", "seed_hi"))  # seed 1 would become a constexpr int
def _coalition_bits_kernel(text_out_ptr, image_out_ptr, seed_lo, seed_hi, batch, T, V):
    """Raw coalition bits of draw program_id(0) for pair program_id(1): text_out [K, B, T], image_out [K, B, V]
    (int8); checks the in-kernel generator against cbd_fast.coalitions."""
    draw = tl.program_id(0)
    pair = tl.program_id(1)
    key0 = seed_lo.to(tl.uint32, bitcast=True)
    key1 = seed_hi.to(tl.uint32, bitcast=True)
    row = draw.to(tl.int64) * batch + pair
    for first in range(0, T, 128):
        token = first + tl.arange(0, 128)
        bits = _members(key0, key1, draw.to(tl.uint32), pair.to(tl.uint32), 0, first, token, token < T)
        tl.store(text_out_ptr + row * T + token, bits.to(tl.int8), mask=token < T)
    for first in range(0, V, 128):
        token = first + tl.arange(0, 128)
        bits = _members(key0, key1, draw.to(tl.uint32), pair.to(tl.uint32), 1, first, token, token < V)
        tl.store(image_out_ptr + row * V + token, bits.to(tl.int8), mask=token < V)


# =====================================================================================================================
# One half of the game on a block: rows along ROW_AXIS of the [T, V] block, columns along the other axis
# =====================================================================================================================

@_device_fn
def _exclusive(total, own):
    """total − own, with total a float64 sum that includes the float32 term ``own``: the sum of the others,
    accurate even when ``own`` dominates. Returned in own's dtype."""
    return (total - own.to(tl.float64)).to(own.dtype)


@_device_fn
def _top_one(sim, col_in, col_index, ROW_AXIS: tl.constexpr):
    """Per row: max over the member columns and its column (lowest index on ties); -inf / -1 when C is empty."""
    member = tl.expand_dims(col_in, ROW_AXIS)
    index = tl.expand_dims(col_index, ROW_AXIS)
    x = tl.where(member, sim, float("-inf"))
    top1 = tl.max(x, axis=1 - ROW_AXIS)
    hit = member & (x == tl.expand_dims(top1, 1 - ROW_AXIS))
    top1_index = tl.min(tl.where(hit, index, _NO_INDEX), axis=1 - ROW_AXIS)
    return top1, tl.where(top1_index == _NO_INDEX, -1, top1_index)


@_device_fn
def _top_two(sim, col_in, col_index, ROW_AXIS: tl.constexpr):
    """Per row: the two largest entries over the member columns and their columns (lowest index on ties, the
    second is the max over C without the first); -inf / -1 for missing ones."""
    top1, top1_index = _top_one(sim, col_in, col_index, ROW_AXIS)
    index = tl.expand_dims(col_index, ROW_AXIS)
    rest = tl.expand_dims(col_in, ROW_AXIS) & (index != tl.expand_dims(top1_index, 1 - ROW_AXIS))
    x = tl.where(rest, sim, float("-inf"))
    top2 = tl.max(x, axis=1 - ROW_AXIS)
    hit = rest & (x == tl.expand_dims(top2, 1 - ROW_AXIS))
    top2_index = tl.min(tl.where(hit, index, _NO_INDEX), axis=1 - ROW_AXIS)
    return top1, top1_index, top2, tl.where(top2_index == _NO_INDEX, -1, top2_index)


@_device_fn
def _merge_top_two(a1, a1_index, a2, a2_index, b1, b1_index, b2, b2_index):
    """Top two of the union of two column ranges, every column of ``a`` before every column of ``b``: ties go to
    ``a`` (the lower index), which keeps the lowest-index rule of a single sweep."""
    a_first = (a1_index >= 0) & ((b1_index < 0) | (a1 >= b1))
    top1 = tl.where(a_first, a1, b1)
    top1_index = tl.where(a_first, a1_index, b1_index)
    lower = tl.where(a_first, a2, a1)  # the runner-up candidate from a
    lower_index = tl.where(a_first, a2_index, a1_index)
    upper = tl.where(a_first, b1, b2)  # ... and from b
    upper_index = tl.where(a_first, b1_index, b2_index)
    lower_wins = (lower_index >= 0) & ((upper_index < 0) | (lower >= upper))
    return (top1, top1_index, tl.where(lower_wins, lower, upper), tl.where(lower_wins, lower_index, upper_index))


@_device_fn
def _marginal_max(sim, top1, top1_index, top2, col_index, col_rest_nonempty, ROW_AXIS: tl.constexpr):
    """Q[r,c] = max over C∪{c} of row r, minus the max over C∖{c} when C∖{c} is not empty. Always finite."""
    t1 = tl.expand_dims(top1, 1 - ROW_AXIS)
    with_col = tl.maximum(sim, t1)
    drop_top1 = tl.expand_dims(col_index, ROW_AXIS) == tl.expand_dims(top1_index, 1 - ROW_AXIS)
    without_col = tl.where(drop_top1, tl.expand_dims(top2, 1 - ROW_AXIS), t1)
    return with_col - tl.where(tl.expand_dims(col_rest_nonempty, ROW_AXIS), without_col, 0.0)


@_device_fn
def _divide(x, y):
    """x / y. In float64 without a division instruction: ptxas turns a float64 division into a subroutine call,
    whose stack frame shows up as spills in the sm_90a check; a float32 reciprocal refined by two Newton steps is
    float64-accurate (y within float32 range, as every denominator here)."""
    if y.dtype == tl.float64:
        r = (1.0 / y.to(tl.float32)).to(tl.float64)
        r = r * (2.0 - y * r)
        r = r * (2.0 - y * r)
        return x * r
    else:
        return x / y


@_device_fn
def _leave_one_out(row_w, row_valid, row_in, n_rows_in, total_w):
    """Per row: α = w / (W' + w), β = 1 / W' (0 when A∖r = ∅) and 1 − α = W' / (W' + w), W' = Σ_{A∖r} w.

    row_w: weights, total_w = Σ_A w in float64. W' is formed in float64 (the subtraction is where float32 would
    cancel), the quotients in row_w's dtype. 0 on invalid rows."""
    w = row_w.to(tl.float64)
    rest_nonempty = (n_rows_in - row_in.to(tl.int32)) > 0
    rest64 = tl.where(rest_nonempty, total_w - tl.where(row_in, w, 0.0), 0.0)
    den = tl.where(row_valid, rest64 + w, 1.0).to(row_w.dtype)
    den = tl.where(den > 0.0, den, 1.0)
    rest = rest64.to(row_w.dtype)
    alpha = tl.where(row_valid, _divide(row_w, den), 0.0)
    one_minus_alpha = tl.where(row_valid, _divide(rest, den), 0.0)
    beta = tl.where(rest_nonempty, _divide(1.0, tl.where(rest_nonempty, rest, 1.0)), 0.0)
    return alpha, beta, one_minus_alpha


@_device_fn
def _row_terms(top1, row_w, row_in, n_cols_in):
    """w_r · t1_r of the member rows (0 elsewhere, and when C = ∅): summed, the numerator of f(A, C)."""
    cols_nonempty = n_cols_in > 0
    return tl.where(row_in & cols_nonempty, row_w * tl.where(cols_nonempty, top1, 0.0), 0.0)


@_device_fn
def _row_effect(top1, term, term_total, row_valid, n_cols_in, alpha, beta):
    """f(A'∪r, C) − f(A', C) per row, the leave-one-out mean β Σ_{A∖r} w t1, and t1 (0 when C = ∅)."""
    cols_nonempty = n_cols_in > 0
    mean_rest = beta * _exclusive(term_total, term)
    top1_or_0 = tl.where(cols_nonempty, top1, 0.0)
    effect = tl.where(row_valid & cols_nonempty, alpha * (top1_or_0 - mean_rest), 0.0)
    return effect, mean_rest, top1_or_0


@_device_fn
def _col_effect(col_total, n_rows_in, total_w, CT: tl.constexpr):
    """f(A, C∪c) − f(A, C∖c) per column = Σ_A w Q[·,c] / Σ_A w, in CT (0 when A = ∅); also any x / W."""
    return tl.where(n_rows_in > 0, _divide(col_total.to(CT), tl.where(n_rows_in > 0, total_w, 1.0).to(CT)), 0.0)


@_device_fn
def _route_block(sim, q_bar, top1, top1_index, col_index, col_rest_nonempty, ROW_AXIS: tl.constexpr):
    """Where dL/dQ goes in S: Q[r,c] = max_with − [C∖c≠∅] max_without, each max flowing to its arg-max column.

    max_with comes from c itself (S[r,c] beats t1, ties to the lower index) or from i1[r]; max_without from i2[r]
    when c == i1[r], else from i1[r]. Returns (the part that stays at (r, c), per-row sums for i1[r] and i2[r])."""
    c = tl.expand_dims(col_index, ROW_AXIS)
    t1 = tl.expand_dims(top1, 1 - ROW_AXIS)
    i1 = tl.expand_dims(top1_index, 1 - ROW_AXIS)
    from_col = (sim > t1) | ((sim == t1) & (c < i1))
    is_top1 = c == i1
    rest = tl.expand_dims(col_rest_nonempty, ROW_AXIS)
    direct = tl.where(from_col, q_bar, 0.0)
    to_top1 = tl.sum(tl.where(from_col, 0.0, q_bar) - tl.where(rest & (c != i1), q_bar, 0.0), axis=1 - ROW_AXIS)
    to_top2 = -tl.sum(tl.where(rest & is_top1, q_bar, 0.0), axis=1 - ROW_AXIS)
    return direct, to_top1, to_top2


@_device_fn
def _place(index_b, rows_target, value, ROW_AXIS: tl.constexpr):
    """One-hot tile: value[r] at column rows_target[r] of each row (the arg-max scatter without atomics)."""
    return tl.where(index_b == tl.expand_dims(rows_target, 1 - ROW_AXIS), tl.expand_dims(value, 1 - ROW_AXIS), 0.0)


# =====================================================================================================================
# Whole-tile halves (tile path)
# =====================================================================================================================

@_device_fn
def _half_forward_tile(sim, row_w, row_valid, row_in, col_in, col_index, n_rows_in, n_cols_in, total_w,
                       ROW_AXIS: tl.constexpr):
    """One draw of one half (paired estimator) on the whole tile.

    Returns sd [T_PAD, V_PAD] (rows along ROW_AXIS), row effects [rows], column effects [cols]."""
    top1, top1_index, top2, top2_index = _top_two(sim, col_in, col_index, ROW_AXIS)
    col_rest_nonempty = (n_cols_in - col_in.to(tl.int32)) > 0
    q = _marginal_max(sim, top1, top1_index, top2, col_index, col_rest_nonempty, ROW_AXIS)
    alpha, beta, one_minus_alpha = _leave_one_out(row_w, row_valid, row_in, n_rows_in, total_w)
    weighted = tl.expand_dims(tl.where(row_in, row_w, 0.0), 1 - ROW_AXIS) * q
    col_total = tl.sum(weighted.to(tl.float64), axis=ROW_AXIS)
    mean_rest = tl.expand_dims(beta, 1 - ROW_AXIS) * _exclusive(tl.expand_dims(col_total, ROW_AXIS), weighted)
    sd = tl.expand_dims(alpha, 1 - ROW_AXIS) * (q - mean_rest)
    term = _row_terms(top1, row_w, row_in, n_cols_in)
    term_total = tl.sum(term.to(tl.float64), axis=0)
    row_effect, top1_mean_rest, top1_or_0 = _row_effect(top1, term, term_total, row_valid, n_cols_in, alpha, beta)
    col_effect = _col_effect(col_total, n_rows_in, total_w, sim.dtype)
    return sd, row_effect, col_effect


@_device_fn
def _half_backward_tile(sim, coef_sd, coef_row, coef_col, row_w, row_valid, row_in, col_in, col_index, n_rows_in,
                        n_cols_in, total_w, ROW_AXIS: tl.constexpr):
    """Gradient of L = Σ g·sd + Σ gr·row_effect + Σ gc·col_effect of one draw of one half (paired estimator).

    With m_r(c) = β_r Σ_{A∖r} w Q[·,c] (so sd = α (Q − m)), E_r = Σ_c g (Q − m) + gr (t1 − mf), M_r = Σ_c g m + gr mf
    (mf the same mean of t1), Z_r = β_r (α_r (1−α_r) E_r − α_r M_r) and H_r'(c) = Σ_{r≠r'} α_r β_r g[r,c]:
      dL/dQ[r',c]  = α g[r',c] + [r'∈A] w_r' (gc(c)/W − H_r'(c))
      dL/dt1[r']   = α gr − [r'∈A] w_r' Σ_{r≠r'} α_r β_r gr_r
      dL/dlogit_r' = α(1−α) E_r' + [r'∈A] w_r' (Σ_c Q[r',c] (gc/W − H_r'(c)) − Σ_c gc col_c / W − Σ_{r≠r'} Z_r
                                                 − t1[r'] Σ_{r≠r'} α_r β_r gr_r)
    Every Σ_{r≠r'} is a float64 total minus the own term. Returns (dL/dS tile, dL/dlogit per row)."""
    CT = sim.dtype
    top1, top1_index, top2, top2_index = _top_two(sim, col_in, col_index, ROW_AXIS)
    col_rest_nonempty = (n_cols_in - col_in.to(tl.int32)) > 0
    q = _marginal_max(sim, top1, top1_index, top2, col_index, col_rest_nonempty, ROW_AXIS)
    alpha, beta, one_minus_alpha = _leave_one_out(row_w, row_valid, row_in, n_rows_in, total_w)
    row_w_in = tl.where(row_in, row_w, 0.0)
    weighted = tl.expand_dims(row_w_in, 1 - ROW_AXIS) * q
    col_total = tl.sum(weighted.to(tl.float64), axis=ROW_AXIS)
    mean_rest = tl.expand_dims(beta, 1 - ROW_AXIS) * _exclusive(tl.expand_dims(col_total, ROW_AXIS), weighted)
    term = _row_terms(top1, row_w, row_in, n_cols_in)
    term_total = tl.sum(term.to(tl.float64), axis=0)
    row_effect, top1_mean_rest, top1_or_0 = _row_effect(top1, term, term_total, row_valid, n_cols_in, alpha, beta)
    coef_row = tl.where(n_cols_in > 0, coef_row, 0.0)  # the row effect is 0 when C = ∅
    own = tl.sum(coef_sd * (q - mean_rest), axis=1 - ROW_AXIS) + coef_row * (top1_or_0 - top1_mean_rest)
    through_mean = tl.sum(coef_sd * mean_rest, axis=1 - ROW_AXIS) + coef_row * top1_mean_rest
    z = beta * (alpha * one_minus_alpha * own - alpha * through_mean)
    alpha_beta = alpha * beta
    h = tl.expand_dims(alpha_beta, 1 - ROW_AXIS) * coef_sd
    h_rest = _exclusive(tl.expand_dims(tl.sum(h.to(tl.float64), axis=ROW_AXIS), ROW_AXIS), h)
    hf = alpha_beta * coef_row
    hf_rest = _exclusive(tl.sum(hf.to(tl.float64), axis=0), hf)
    z_rest = _exclusive(tl.sum(z.to(tl.float64), axis=0), z)
    col_coef_per_w = _col_effect(coef_col, n_rows_in, total_w, CT)  # gc / W
    col_term = tl.sum(col_coef_per_w * _col_effect(col_total, n_rows_in, total_w, CT), axis=0)
    y = tl.expand_dims(col_coef_per_w, ROW_AXIS) - h_rest
    q_bar = coef_sd * tl.expand_dims(alpha, 1 - ROW_AXIS) + tl.expand_dims(row_w_in, 1 - ROW_AXIS) * y
    t1_bar = coef_row * alpha - row_w_in * hf_rest
    logit_grad = alpha * one_minus_alpha * own + row_w_in * (
        tl.sum(q * y, axis=1 - ROW_AXIS) - col_term - z_rest - top1_or_0 * hf_rest)
    direct, to_top1, to_top2 = _route_block(sim, q_bar, top1, top1_index, col_index, col_rest_nonempty, ROW_AXIS)
    c = tl.expand_dims(col_index, ROW_AXIS)
    grad = direct + _place(c, top1_index, to_top1 + t1_bar, ROW_AXIS) + _place(c, top2_index, to_top2, ROW_AXIS)
    return grad, logit_grad


@_device_fn
def _half_value_tile(sim, row_w, row_in, col_in, col_index, n_rows_in, n_cols_in, total_w, ROW_AXIS: tl.constexpr):
    """Half value f(A, C) of one draw, plus t1 and its column per row (for the msr backward)."""
    top1, top1_index = _top_one(sim, col_in, col_index, ROW_AXIS)
    term = _row_terms(top1, row_w, row_in, n_cols_in)
    value = _col_effect(tl.sum(term.to(tl.float64), axis=0), n_rows_in, total_w, sim.dtype)
    return value, top1, top1_index


@_device_fn
def _half_value_backward_tile(sim, coef, row_w, row_in, col_in, col_index, n_rows_in, n_cols_in, total_w,
                              ROW_AXIS: tl.constexpr):
    """Gradient of coef · f(A, C): dL/dS at (r, i1[r]) = coef w_r / W, dL/dlogit_r = coef w_r (t1_r − f) / W."""
    value, top1, top1_index = _half_value_tile(sim, row_w, row_in, col_in, col_index, n_rows_in, n_cols_in,
                                               total_w, ROW_AXIS)
    active = row_in & (n_rows_in > 0) & (n_cols_in > 0)
    to_top1 = tl.where(active, row_w * _col_effect(coef, n_rows_in, total_w, sim.dtype), 0.0)
    logit_grad = to_top1 * (tl.where(active, top1, 0.0) - value)
    return _place(tl.expand_dims(col_index, ROW_AXIS), top1_index, to_top1, ROW_AXIS), logit_grad


# =====================================================================================================================
# Tile-path kernels
# =====================================================================================================================

@_device_fn
def _program_draws(slices, draws_per_slice, num_samples):
    """(pair, first draw, end draw) of this program; draws as int64 (K may exceed 2^31)."""
    pid = tl.program_id(0)
    pair = pid // slices
    first = (pid % slices).to(tl.int64) * draws_per_slice
    first = tl.minimum(first, num_samples)
    end = tl.minimum(first + draws_per_slice, num_samples)
    return pid.to(tl.int64), pair, first, end


@_device_fn
def _load_tile(ptr, t_idx, u_idx, T, V, CT: tl.constexpr):
    """[T_PAD, V_PAD] tile of a row-major [T, V] matrix at ptr, 0 outside, as CT."""
    mask = (t_idx[:, None] < T) & (u_idx[None, :] < V)
    return tl.load(ptr + t_idx[:, None] * V + u_idx[None, :], mask=mask, other=0.0).to(CT)


@_device_fn
def _similarity_tile(text_ptr, image_ptr, t_idx, u_idx, T, V, D, BLOCK_D: tl.constexpr, CT: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    """text [T, D] @ image [V, D]ᵀ as a [T_PAD, V_PAD] tile: tl.dot over D chunks, accumulated in CT."""
    acc = tl.zeros([t_idx.shape[0], u_idx.shape[0]], dtype=CT)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(text_ptr + t_idx[:, None] * D + d[None, :], mask=(t_idx[:, None] < T) & (d[None, :] < D),
                    other=0.0)
        y = tl.load(image_ptr + u_idx[None, :] * D + d[:, None], mask=(u_idx[None, :] < V) & (d[:, None] < D),
                    other=0.0)
        if _INTERPRETED:  # the interpreter's tl.dot multiplies bf16 operands as their raw 16-bit integers
            x = x.to(tl.float32)
            y = y.to(tl.float32)
        if CT == tl.float64:
            acc += tl.dot(x.to(tl.float64), y.to(tl.float64), input_precision=DOT_PRECISION, out_dtype=tl.float64)
        else:
            acc = tl.dot(x, y, acc, input_precision=DOT_PRECISION, out_dtype=tl.float32)
    return acc


@triton.jit(do_not_specialize=("seed_lo", "seed_hi"))  # seed 1 would become a constexpr int
def _forward_tile_kernel(
        sim_ptr, text_ptr, image_ptr,
        text_valid_ptr, image_valid_ptr, text_w_ptr, image_w_ptr,
        out_pair_ptr, out_text_ptr, out_image_ptr,
        count_pair_ptr, count_text_ptr, count_image_ptr, out_total_ptr,
        seed_lo, seed_hi, T, V, D, num_samples, slices, draws_per_slice,
        T_PAD: tl.constexpr, V_PAD: tl.constexpr, BLOCK_D: tl.constexpr, ESTIMATOR: tl.constexpr,
        FROM_TOKENS: tl.constexpr, CT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Forward of one (pair, draw slice) with the whole tile in registers.

    sim [B,T,V] (or text [B,T,D] and image [B,V,D] with FROM_TOKENS), masks [B,T]/[B,V] bool, exp-weights
    [B,T]/[B,V] CT. paired: out_pair/out_text/out_image [P,T,V]/[P,T]/[P,V] get Σ_draws of sd, row + column
    effects. msr: the same buffers get Σ v over the draws where the token (pair) is in the coalition, count_* the
    numbers of those draws, out_total [P] Σ v."""
    pid, pair, first, end = _program_draws(slices, draws_per_slice, num_samples)
    pair64 = pair.to(tl.int64)
    key0 = seed_lo.to(tl.uint32, bitcast=True)
    key1 = seed_hi.to(tl.uint32, bitcast=True)
    t_idx = tl.arange(0, T_PAD)
    u_idx = tl.arange(0, V_PAD)
    text_valid = tl.load(text_valid_ptr + pair64 * T + t_idx, mask=t_idx < T, other=0) != 0
    image_valid = tl.load(image_valid_ptr + pair64 * V + u_idx, mask=u_idx < V, other=0) != 0
    text_w = tl.load(text_w_ptr + pair64 * T + t_idx, mask=t_idx < T, other=0.0).to(CT)
    image_w = tl.load(image_w_ptr + pair64 * V + u_idx, mask=u_idx < V, other=0.0).to(CT)
    if FROM_TOKENS:
        sim = _similarity_tile(text_ptr + pair64 * T * D, image_ptr + pair64 * V * D, t_idx, u_idx, T, V, D,
                               BLOCK_D, CT, DOT_PRECISION)
    else:
        sim = _load_tile(sim_ptr + pair64 * T * V, t_idx, u_idx, T, V, CT)

    acc_pair = tl.zeros([T_PAD, V_PAD], dtype=CT)
    acc_text = tl.zeros([T_PAD], dtype=CT)
    acc_image = tl.zeros([V_PAD], dtype=CT)
    count_pair = tl.zeros([T_PAD, V_PAD], dtype=tl.int32)
    count_text = tl.zeros([T_PAD], dtype=tl.int32)
    count_image = tl.zeros([V_PAD], dtype=tl.int32)
    acc_total = tl.zeros([1], dtype=tl.float64)
    for i in range(0, end - first):
        draw = (first + i).to(tl.uint32)  # counter word 0 (the draw index, < 2^32)
        text_in = _members(key0, key1, draw, pair.to(tl.uint32), 0, 0, t_idx, text_valid)
        image_in = _members(key0, key1, draw, pair.to(tl.uint32), 1, 0, u_idx, image_valid)
        n_text = tl.sum(text_in.to(tl.int32), axis=0)
        n_image = tl.sum(image_in.to(tl.int32), axis=0)
        w_text = tl.sum(tl.where(text_in, text_w, 0.0).to(tl.float64), axis=0)
        w_image = tl.sum(tl.where(image_in, image_w, 0.0).to(tl.float64), axis=0)
        if ESTIMATOR == _PAIRED:
            sd_t, row_t, col_t = _half_forward_tile(sim, text_w, text_valid, text_in, image_in, u_idx, n_text,
                                                    n_image, w_text, 0)
            sd_v, row_v, col_v = _half_forward_tile(sim, image_w, image_valid, image_in, text_in, t_idx, n_image,
                                                    n_text, w_image, 1)
            acc_pair += sd_t + sd_v
            acc_text += row_t + col_v
            acc_image += col_t + row_v
        else:
            f_text, text_top1, text_top1_index = _half_value_tile(sim, text_w, text_in, image_in, u_idx, n_text,
                                                                  n_image, w_text, 0)
            f_image, image_top1, image_top1_index = _half_value_tile(sim, image_w, image_in, text_in, t_idx, n_image,
                                                                     n_text, w_image, 1)
            value = 0.5 * (f_text + f_image)
            pair_in = text_in[:, None] & image_in[None, :]
            acc_pair += tl.where(pair_in, value, 0.0)
            acc_text += tl.where(text_in, value, 0.0)
            acc_image += tl.where(image_in, value, 0.0)
            count_pair += pair_in.to(tl.int32)
            count_text += text_in.to(tl.int32)
            count_image += image_in.to(tl.int32)
            acc_total += value.to(tl.float64)

    tile_mask = (t_idx[:, None] < T) & (u_idx[None, :] < V)
    tile_offset = t_idx[:, None] * V + u_idx[None, :]
    tl.store(out_pair_ptr + pid * T * V + tile_offset, acc_pair, mask=tile_mask)
    tl.store(out_text_ptr + pid * T + t_idx, acc_text, mask=t_idx < T)
    tl.store(out_image_ptr + pid * V + u_idx, acc_image, mask=u_idx < V)
    if ESTIMATOR == _MSR:
        tl.store(count_pair_ptr + pid * T * V + tile_offset, count_pair.to(CT), mask=tile_mask)
        tl.store(count_text_ptr + pid * T + t_idx, count_text.to(CT), mask=t_idx < T)
        tl.store(count_image_ptr + pid * V + u_idx, count_image.to(CT), mask=u_idx < V)
        tl.store(out_total_ptr + pid + tl.arange(0, 1), acc_total.to(CT))


@_device_fn
def _half_tile_offsets(row_idx, col_idx, T, V, ROWS_ARE_TEXT: tl.constexpr):
    """Offsets and mask into a row-major [T, V] matrix of a [cols, rows] tile of one half (rows along axis 1)."""
    if ROWS_ARE_TEXT:
        offsets = col_idx[:, None] + row_idx[None, :] * V
        mask = (col_idx[:, None] < V) & (row_idx[None, :] < T)
    else:
        offsets = col_idx[:, None] * V + row_idx[None, :]
        mask = (col_idx[:, None] < T) & (row_idx[None, :] < V)
    return offsets, mask


@triton.jit(do_not_specialize=("seed_lo", "seed_hi"))  # seed 1 would become a constexpr int
def _backward_tile_kernel(
        sim_ptr, text_valid_ptr, image_valid_ptr, text_w_ptr, image_w_ptr,
        coef_pair_ptr, coef_text_ptr, coef_image_ptr, coef_const_ptr,
        grad_sim_ptr, grad_text_ptr, grad_image_ptr,
        seed_lo, seed_hi, T, V, num_samples, slices, draws_per_slice,
        T_PAD: tl.constexpr, V_PAD: tl.constexpr, ESTIMATOR: tl.constexpr, HALF: tl.constexpr, CT: tl.constexpr):
    """Backward of one (pair, draw slice) with the whole tile in registers; every draw is regenerated from the seed.

    paired: coef_pair/coef_text/coef_image [B,T,V]/[B,T]/[B,V] are the masked output gradients; one launch per half
    (HALF=0: rows = text tokens, HALF=1: rows = image tokens), each on a [cols, rows] tile so that the rows lie along
    axis 1, the layout that needs fewer registers; it writes Σ_draws of the half's dL/dS [P,T,V] and dL/dlogit of its
    rows ([P,T] into grad_text or [P,V] into grad_image). msr (HALF=2, both halves): the coefficient of draw k's
    value is Σ a c coef_pair + Σ a coef_text + Σ c coef_image + coef_const[b] (a, c: memberships).
    Without the final ½/K (paired) or ½ (msr) scale."""
    pid, pair, first, end = _program_draws(slices, draws_per_slice, num_samples)
    pair64 = pair.to(tl.int64)
    pair32 = pair.to(tl.uint32)
    key0 = seed_lo.to(tl.uint32, bitcast=True)
    key1 = seed_hi.to(tl.uint32, bitcast=True)
    if HALF == 2:
        t_idx = tl.arange(0, T_PAD)
        u_idx = tl.arange(0, V_PAD)
        text_valid = tl.load(text_valid_ptr + pair64 * T + t_idx, mask=t_idx < T, other=0) != 0
        image_valid = tl.load(image_valid_ptr + pair64 * V + u_idx, mask=u_idx < V, other=0) != 0
        text_w = tl.load(text_w_ptr + pair64 * T + t_idx, mask=t_idx < T, other=0.0).to(CT)
        image_w = tl.load(image_w_ptr + pair64 * V + u_idx, mask=u_idx < V, other=0.0).to(CT)
        sim = _load_tile(sim_ptr + pair64 * T * V, t_idx, u_idx, T, V, CT)
        coef_pair = _load_tile(coef_pair_ptr + pair64 * T * V, t_idx, u_idx, T, V, CT)
        coef_text = tl.load(coef_text_ptr + pair64 * T + t_idx, mask=t_idx < T, other=0.0).to(CT)
        coef_image = tl.load(coef_image_ptr + pair64 * V + u_idx, mask=u_idx < V, other=0.0).to(CT)
        grad_sim = tl.zeros([T_PAD, V_PAD], dtype=CT)
        grad_text = tl.zeros([T_PAD], dtype=CT)
        grad_image = tl.zeros([V_PAD], dtype=CT)
        for i in range(0, end - first):
            draw = (first + i).to(tl.uint32)  # counter word 0 (the draw index, < 2^32)
            text_in = _members(key0, key1, draw, pair32, 0, 0, t_idx, text_valid)
            image_in = _members(key0, key1, draw, pair32, 1, 0, u_idx, image_valid)
            n_text = tl.sum(text_in.to(tl.int32), axis=0)
            n_image = tl.sum(image_in.to(tl.int32), axis=0)
            w_text = tl.sum(tl.where(text_in, text_w, 0.0).to(tl.float64), axis=0)
            w_image = tl.sum(tl.where(image_in, image_w, 0.0).to(tl.float64), axis=0)
            pair_in = text_in[:, None] & image_in[None, :]
            coef = (tl.sum(tl.sum(tl.where(pair_in, coef_pair, 0.0), axis=1), axis=0)
                    + tl.sum(tl.where(text_in, coef_text, 0.0), axis=0)
                    + tl.sum(tl.where(image_in, coef_image, 0.0), axis=0)
                    + tl.load(coef_const_ptr + pair64).to(CT))
            g_t, lg_t = _half_value_backward_tile(sim, coef, text_w, text_in, image_in, u_idx, n_text, n_image,
                                                  w_text, 0)
            g_v, lg_v = _half_value_backward_tile(sim, coef, image_w, image_in, text_in, t_idx, n_image, n_text,
                                                  w_image, 1)
            grad_sim += g_t + g_v
            grad_text += lg_t
            grad_image += lg_v
        tile_mask = (t_idx[:, None] < T) & (u_idx[None, :] < V)
        tl.store(grad_sim_ptr + pid * T * V + t_idx[:, None] * V + u_idx[None, :], grad_sim, mask=tile_mask)
        tl.store(grad_text_ptr + pid * T + t_idx, grad_text, mask=t_idx < T)
        tl.store(grad_image_ptr + pid * V + u_idx, grad_image, mask=u_idx < V)
    else:
        if HALF == 0:
            row_idx = tl.arange(0, T_PAD)
            col_idx = tl.arange(0, V_PAD)
            R = T
            C = V
            row_valid_ptr = text_valid_ptr + pair64 * T
            col_valid_ptr = image_valid_ptr + pair64 * V
            row_w_ptr = text_w_ptr + pair64 * T
            col_w_ptr = image_w_ptr + pair64 * V
            coef_row_ptr = coef_text_ptr + pair64 * T
            coef_col_ptr = coef_image_ptr + pair64 * V
            row_grad_ptr = grad_text_ptr + pid * T
        else:
            row_idx = tl.arange(0, V_PAD)
            col_idx = tl.arange(0, T_PAD)
            R = V
            C = T
            row_valid_ptr = image_valid_ptr + pair64 * V
            col_valid_ptr = text_valid_ptr + pair64 * T
            row_w_ptr = image_w_ptr + pair64 * V
            col_w_ptr = text_w_ptr + pair64 * T
            coef_row_ptr = coef_image_ptr + pair64 * V
            coef_col_ptr = coef_text_ptr + pair64 * T
            row_grad_ptr = grad_image_ptr + pid * V
        offsets, tile_mask = _half_tile_offsets(row_idx, col_idx, T, V, HALF == 0)
        row_valid = tl.load(row_valid_ptr + row_idx, mask=row_idx < R, other=0) != 0
        col_valid = tl.load(col_valid_ptr + col_idx, mask=col_idx < C, other=0) != 0
        row_w = tl.load(row_w_ptr + row_idx, mask=row_idx < R, other=0.0).to(CT)
        col_w = tl.load(col_w_ptr + col_idx, mask=col_idx < C, other=0.0).to(CT)
        sim = tl.load(sim_ptr + pair64 * T * V + offsets, mask=tile_mask, other=0.0).to(CT)
        coef_sd = tl.load(coef_pair_ptr + pair64 * T * V + offsets, mask=tile_mask, other=0.0).to(CT)
        coef_row = tl.load(coef_row_ptr + row_idx, mask=row_idx < R, other=0.0).to(CT)
        coef_col = tl.load(coef_col_ptr + col_idx, mask=col_idx < C, other=0.0).to(CT)
        grad_sim = tl.zeros([col_idx.shape[0], row_idx.shape[0]], dtype=CT)
        grad_rows = tl.zeros([row_idx.shape[0]], dtype=CT)
        for i in range(0, end - first):
            draw = (first + i).to(tl.uint32)  # counter word 0 (the draw index, < 2^32)
            row_in = _members(key0, key1, draw, pair32, HALF, 0, row_idx, row_valid)
            col_in = _members(key0, key1, draw, pair32, 1 - HALF, 0, col_idx, col_valid)
            n_rows_in = tl.sum(row_in.to(tl.int32), axis=0)
            n_cols_in = tl.sum(col_in.to(tl.int32), axis=0)
            w_rows = tl.sum(tl.where(row_in, row_w, 0.0).to(tl.float64), axis=0)
            grad, logit_grad = _half_backward_tile(sim, coef_sd, coef_row, coef_col, row_w, row_valid, row_in,
                                                   col_in, col_idx, n_rows_in, n_cols_in, w_rows, 1)
            grad_sim += grad
            grad_rows += logit_grad
        tl.store(grad_sim_ptr + pid * T * V + offsets, grad_sim, mask=tile_mask)
        tl.store(row_grad_ptr + row_idx, grad_rows, mask=row_idx < R)


# =====================================================================================================================
# Blocked path: helpers
# =====================================================================================================================

@_device_fn
def _block_offsets(rows, cols, T, V, ROW_AXIS: tl.constexpr):
    """Offsets into a row-major [T, V] matrix of the block (rows of the half along ROW_AXIS) and its mask."""
    if ROW_AXIS == 0:
        t = rows[:, None]
        u = cols[None, :]
    else:
        t = cols[:, None]
        u = rows[None, :]
    return t * V + u, (t < T) & (u < V)


@_device_fn
def _load_block(ptr, rows, cols, T, V, ROW_AXIS: tl.constexpr, CT: tl.constexpr):
    offsets, mask = _block_offsets(rows, cols, T, V, ROW_AXIS)
    return tl.load(ptr + offsets, mask=mask, other=0.0).to(CT)


@_device_fn
def _add_block(ptr, rows, cols, T, V, value, ROW_AXIS: tl.constexpr):
    """ptr[block] += value (read-modify-write of memory only this program touches)."""
    offsets, mask = _block_offsets(rows, cols, T, V, ROW_AXIS)
    tl.store(ptr + offsets, tl.load(ptr + offsets, mask=mask, other=0.0) + value, mask=mask)


@_device_fn
def _add_at(ptr, rows, target_cols, R, T, V, value, ROW_AXIS: tl.constexpr):
    """ptr[(r, target_cols[r])] += value[r] for the rows of the half (skipped where target_cols < 0)."""
    mask = (rows < R) & (target_cols >= 0)
    if ROW_AXIS == 0:
        offsets = rows * V + target_cols
    else:
        offsets = target_cols * V + rows
    tl.store(ptr + offsets, tl.load(ptr + offsets, mask=mask, other=0.0) + value, mask=mask)


@_device_fn
def _add_vector(ptr, idx, n, value):
    tl.store(ptr + idx, tl.load(ptr + idx, mask=idx < n, other=0.0) + value, mask=idx < n)


@_device_fn
def _load_slot(scratch, SLOT: tl.constexpr, idx, n, scratch_len, CT: tl.constexpr):
    return tl.load(scratch + SLOT * scratch_len + idx, mask=idx < n, other=0.0).to(CT)


@_device_fn
def _store_slot(scratch, SLOT: tl.constexpr, idx, n, scratch_len, value):
    tl.store(scratch + SLOT * scratch_len + idx, value.to(tl.float64), mask=idx < n)


@_device_fn
def _draw_members(scratch, scratch_len, n, valid_ptr, w_ptr, key0, key1, draw, pair, SIDE: tl.constexpr,
                  CT: tl.constexpr):
    """Membership of every token of one side in the draw's coalition, into the side's scratch slot (one Philox call
    per 128 tokens, once per draw); returns the number of members and their total weight (float64)."""
    count = tl.zeros([1], dtype=tl.int32)
    total = tl.zeros([1], dtype=tl.float64)
    for first in range(0, n, 128):
        idx = first + tl.arange(0, 128)
        valid = tl.load(valid_ptr + idx, mask=idx < n, other=0) != 0
        member = _members(key0, key1, draw, pair, SIDE, first, idx, valid)
        _store_slot(scratch, _S_TEXT_IN + SIDE, idx, n, scratch_len, member.to(tl.float64))
        w = tl.load(w_ptr + idx, mask=idx < n, other=0.0).to(CT)
        count += tl.sum(member.to(tl.int32), axis=0)
        total += tl.sum(tl.where(member, w, 0.0).to(tl.float64), axis=0)
    return tl.sum(count, axis=0), tl.sum(total, axis=0)


@_device_fn
def _side_members(scratch, scratch_len, idx, n, SIDE: tl.constexpr):
    """Membership of tokens idx (< n) of one side, from the scratch written by _draw_members."""
    return _load_slot(scratch, _S_TEXT_IN + SIDE, idx, n, scratch_len, tl.float64) != 0.0


@_device_fn
def _side(scratch, scratch_len, idx, n, valid_ptr, w_ptr, SIDE: tl.constexpr, CT: tl.constexpr):
    """Validity, membership and weight of tokens idx (< n) of one side."""
    valid = tl.load(valid_ptr + idx, mask=idx < n, other=0) != 0
    member = _side_members(scratch, scratch_len, idx, n, SIDE)
    return valid, member, tl.load(w_ptr + idx, mask=idx < n, other=0.0).to(CT)


@_device_fn
def _row_stats(scratch, rows, R, scratch_len, CT: tl.constexpr):
    """(t1, i1, t2, i2) of the rows, from the scratch written by _stats_pass."""
    top1 = _load_slot(scratch, _S_TOP1, rows, R, scratch_len, CT)
    top1_index = _load_slot(scratch, _S_TOP1_INDEX, rows, R, scratch_len, tl.float64).to(tl.int32)
    top2 = _load_slot(scratch, _S_TOP2, rows, R, scratch_len, CT)
    top2_index = _load_slot(scratch, _S_TOP2_INDEX, rows, R, scratch_len, tl.float64).to(tl.int32)
    return top1, top1_index, top2, top2_index


@_device_fn
def _half_rows(text_valid_ptr, image_valid_ptr, text_w_ptr, image_w_ptr, T, V, ROW_AXIS: tl.constexpr):
    """(row validity pointer, row weight pointer, R, C) of the half."""
    if ROW_AXIS == 0:
        return text_valid_ptr, text_w_ptr, T, V
    else:
        return image_valid_ptr, image_w_ptr, V, T


@_device_fn
def _q_block(sim_ptr, rows, cols, scratch, scratch_len, R, C, n_cols_in, T, V, ROW_AXIS: tl.constexpr,
             CT: tl.constexpr):
    """S block, Q block (row statistics from scratch) and [C∖c ≠ ∅] of the block's columns."""
    top1, top1_index, top2, top2_index = _row_stats(scratch, rows, R, scratch_len, CT)
    col_in = _side_members(scratch, scratch_len, cols, C, 1 - ROW_AXIS)
    col_rest_nonempty = (n_cols_in - col_in.to(tl.int32)) > 0
    sim = _load_block(sim_ptr, rows, cols, T, V, ROW_AXIS, CT)
    return sim, _marginal_max(sim, top1, top1_index, top2, cols, col_rest_nonempty, ROW_AXIS), col_rest_nonempty


@_device_fn
def _mean_rest_block(q, row_w_in, beta, scratch, scratch_len, cols, C, ROW_AXIS: tl.constexpr):
    """m[r,c] = β_r Σ_{r'∈A∖r} w_r' Q[r',c], from the float64 column totals in scratch."""
    col_total = tl.load(scratch + _S_COL_TOTAL * scratch_len + cols, mask=cols < C, other=0.0)
    weighted = tl.expand_dims(row_w_in, 1 - ROW_AXIS) * q
    return tl.expand_dims(beta, 1 - ROW_AXIS) * _exclusive(tl.expand_dims(col_total, ROW_AXIS), weighted)


@_device_fn
def _row_vectors(rows, R, scratch, scratch_len, row_valid_ptr, row_w_ptr, n_rows_in, n_cols_in, total_w, term_total,
                 ROW_AXIS: tl.constexpr, CT: tl.constexpr):
    """Per row of a row block: t1, i1, i2, member weight, α, β, 1 − α, row effect, β Σ_{A∖r} w t1, t1 (0 if C = ∅)."""
    top1, top1_index, top2, top2_index = _row_stats(scratch, rows, R, scratch_len, CT)
    row_valid, row_in, row_w = _side(scratch, scratch_len, rows, R, row_valid_ptr, row_w_ptr, ROW_AXIS, CT)
    alpha, beta, one_minus_alpha = _leave_one_out(row_w, row_valid, row_in, n_rows_in, total_w)
    effect, top1_mean_rest, top1_or_0 = _row_effect(top1, _row_terms(top1, row_w, row_in, n_cols_in), term_total,
                                                    row_valid, n_cols_in, alpha, beta)
    return (top1, top1_index, top2_index, tl.where(row_in, row_w, 0.0), alpha, beta, one_minus_alpha, effect,
            top1_mean_rest, top1_or_0)


# =====================================================================================================================
# Blocked path: passes over the tile for one draw and one half (memberships already in scratch)
# =====================================================================================================================

@_device_fn
def _stats_pass(sim_ptr, scratch, scratch_len, text_valid_ptr, image_valid_ptr, text_w_ptr, image_w_ptr, T, V,
                n_cols_in, ROW_AXIS: tl.constexpr, ROW_BLOCK: tl.constexpr, COL_BLOCK: tl.constexpr,
                CT: tl.constexpr):
    """Top-two maxima over the member columns of every row into scratch; returns Σ_{r∈A} w_r t1_r (float64)."""
    row_valid_ptr, row_w_ptr, R, C = _half_rows(text_valid_ptr, image_valid_ptr, text_w_ptr, image_w_ptr, T, V,
                                                ROW_AXIS)
    term_total = tl.zeros([1], dtype=tl.float64)
    for row0 in range(0, R, ROW_BLOCK):
        rows = row0 + tl.arange(0, ROW_BLOCK)
        top1 = tl.full([ROW_BLOCK], float("-inf"), CT)
        top1_index = tl.full([ROW_BLOCK], -1, tl.int32)
        top2 = tl.full([ROW_BLOCK], float("-inf"), CT)
        top2_index = tl.full([ROW_BLOCK], -1, tl.int32)
        for col0 in range(0, C, COL_BLOCK):
            cols = col0 + tl.arange(0, COL_BLOCK)
            col_in = _side_members(scratch, scratch_len, cols, C, 1 - ROW_AXIS)
            sim = _load_block(sim_ptr, rows, cols, T, V, ROW_AXIS, CT)
            b1, b1_index, b2, b2_index = _top_two(sim, col_in, cols, ROW_AXIS)
            top1, top1_index, top2, top2_index = _merge_top_two(top1, top1_index, top2, top2_index, b1, b1_index,
                                                                b2, b2_index)
        _store_slot(scratch, _S_TOP1, rows, R, scratch_len, top1)
        _store_slot(scratch, _S_TOP1_INDEX, rows, R, scratch_len, top1_index)
        _store_slot(scratch, _S_TOP2, rows, R, scratch_len, top2)
        _store_slot(scratch, _S_TOP2_INDEX, rows, R, scratch_len, top2_index)
        row_valid, row_in, row_w = _side(scratch, scratch_len, rows, R, row_valid_ptr, row_w_ptr, ROW_AXIS, CT)
        term_total += tl.sum(_row_terms(top1, row_w, row_in, n_cols_in).to(tl.float64), axis=0)
    return tl.sum(term_total, axis=0)


@_device_fn
def _col_total_pass(sim_ptr, scratch, scratch_len, text_valid_ptr, image_valid_ptr, text_w_ptr, image_w_ptr, T, V,
                    n_cols_in, ROW_AXIS: tl.constexpr, ROW_BLOCK: tl.constexpr, COL_BLOCK: tl.constexpr,
                    CT: tl.constexpr):
    """Σ_{r∈A} w_r Q[r,c] per column (float64) into scratch."""
    row_valid_ptr, row_w_ptr, R, C = _half_rows(text_valid_ptr, image_valid_ptr, text_w_ptr, image_w_ptr, T, V,
                                                ROW_AXIS)
    for col0 in range(0, C, COL_BLOCK):
        cols = col0 + tl.arange(0, COL_BLOCK)
        col_total = tl.zeros([COL_BLOCK], dtype=tl.float64)
        for row0 in range(0, R, ROW_BLOCK):
            rows = row0 + tl.arange(0, ROW_BLOCK)
            row_valid, row_in, row_w = _side(scratch, scratch_len, rows, R, row_valid_ptr, row_w_ptr, ROW_AXIS, CT)
            sim, q, col_rest_nonempty = _q_block(sim_ptr, rows, cols, scratch, scratch_len, R, C, n_cols_in, T, V,
                                                 ROW_AXIS, CT)
            weighted = tl.expand_dims(tl.where(row_in, row_w, 0.0), 1 - ROW_AXIS) * q
            col_total += tl.sum(weighted.to(tl.float64), axis=ROW_AXIS)
        _store_slot(scratch, _S_COL_TOTAL, cols, C, scratch_len, col_total)


@_device_fn
def _accumulate_pass(sim_ptr, scratch, scratch_len, text_valid_ptr, image_valid_ptr, text_w_ptr, image_w_ptr,
                     T, V, out_pair_ptr, out_text_ptr, out_image_ptr, n_rows_in, n_cols_in, total_w, term_total,
                     ROW_AXIS: tl.constexpr, ROW_BLOCK: tl.constexpr, COL_BLOCK: tl.constexpr, CT: tl.constexpr):
    """Adds the draw's sd of the half to out_pair and its row / column effects to the row / column side values."""
    row_valid_ptr, row_w_ptr, R, C = _half_rows(text_valid_ptr, image_valid_ptr, text_w_ptr, image_w_ptr, T, V,
                                                ROW_AXIS)
    if ROW_AXIS == 0:
        row_out_ptr = out_text_ptr
        col_out_ptr = out_image_ptr
    else:
        row_out_ptr = out_image_ptr
        col_out_ptr = out_text_ptr
    for row0 in range(0, R, ROW_BLOCK):
        rows = row0 + tl.arange(0, ROW_BLOCK)
        (top1, top1_index, top2_index, row_w_in, alpha, beta, one_minus_alpha, effect, top1_mean_rest,
         top1_or_0) = _row_vectors(rows, R, scratch, scratch_len, row_valid_ptr, row_w_ptr, n_rows_in, n_cols_in,
                                   total_w, term_total, ROW_AXIS, CT)
        _add_vector(row_out_ptr, rows, R, effect)
        for col0 in range(0, C, COL_BLOCK):
            cols = col0 + tl.arange(0, COL_BLOCK)
            sim, q, col_rest_nonempty = _q_block(sim_ptr, rows, cols, scratch, scratch_len, R, C, n_cols_in, T, V,
                                                 ROW_AXIS, CT)
            mean_rest = _mean_rest_block(q, row_w_in, beta, scratch, scratch_len, cols, C, ROW_AXIS)
            _add_block(out_pair_ptr, rows, cols, T, V, tl.expand_dims(alpha, 1 - ROW_AXIS) * (q - mean_rest),
                       ROW_AXIS)
    for col0 in range(0, C, COL_BLOCK):
        cols = col0 + tl.arange(0, COL_BLOCK)
        col_total = tl.load(scratch + _S_COL_TOTAL * scratch_len + cols, mask=cols < C, other=0.0)
        _add_vector(col_out_ptr, cols, C, _col_effect(col_total, n_rows_in, total_w, CT))


@_device_fn
def _adjoint_row_pass(sim_ptr, coef_pair_ptr, coef_row_ptr, scratch, scratch_len, text_valid_ptr, image_valid_ptr,
                      text_w_ptr, image_w_ptr, T, V, n_rows_in, n_cols_in, total_w, term_total,
                      ROW_AXIS: tl.constexpr, ROW_BLOCK: tl.constexpr, COL_BLOCK: tl.constexpr, CT: tl.constexpr):
    """Per row: α(1−α)E and Z into scratch; returns (Σ Z, Σ α β gr) in float64 (notation of _half_backward_tile)."""
    row_valid_ptr, row_w_ptr, R, C = _half_rows(text_valid_ptr, image_valid_ptr, text_w_ptr, image_w_ptr, T, V,
                                                ROW_AXIS)
    z_total = tl.zeros([1], dtype=tl.float64)
    hf_total = tl.zeros([1], dtype=tl.float64)
    for row0 in range(0, R, ROW_BLOCK):
        rows = row0 + tl.arange(0, ROW_BLOCK)
        (top1, top1_index, top2_index, row_w_in, alpha, beta, one_minus_alpha, effect, top1_mean_rest,
         top1_or_0) = _row_vectors(rows, R, scratch, scratch_len, row_valid_ptr, row_w_ptr, n_rows_in, n_cols_in,
                                   total_w, term_total, ROW_AXIS, CT)
        coef_row = tl.load(coef_row_ptr + rows, mask=rows < R, other=0.0).to(CT)
        coef_row = tl.where(n_cols_in > 0, coef_row, 0.0)
        own = coef_row * (top1_or_0 - top1_mean_rest)
        through_mean = coef_row * top1_mean_rest
        for col0 in range(0, C, COL_BLOCK):
            cols = col0 + tl.arange(0, COL_BLOCK)
            sim, q, col_rest_nonempty = _q_block(sim_ptr, rows, cols, scratch, scratch_len, R, C, n_cols_in, T, V,
                                                 ROW_AXIS, CT)
            mean_rest = _mean_rest_block(q, row_w_in, beta, scratch, scratch_len, cols, C, ROW_AXIS)
            coef_sd = _load_block(coef_pair_ptr, rows, cols, T, V, ROW_AXIS, CT)
            own += tl.sum(coef_sd * (q - mean_rest), axis=1 - ROW_AXIS)
            through_mean += tl.sum(coef_sd * mean_rest, axis=1 - ROW_AXIS)
        z = beta * (alpha * one_minus_alpha * own - alpha * through_mean)
        _store_slot(scratch, _S_OWN, rows, R, scratch_len, alpha * one_minus_alpha * own)
        _store_slot(scratch, _S_Z, rows, R, scratch_len, z)
        z_total += tl.sum(z.to(tl.float64), axis=0)
        hf_total += tl.sum((alpha * beta * coef_row).to(tl.float64), axis=0)
    return tl.sum(z_total, axis=0), tl.sum(hf_total, axis=0)


@_device_fn
def _h_col_pass(coef_pair_ptr, scratch, scratch_len, text_valid_ptr, image_valid_ptr, text_w_ptr, image_w_ptr, T, V,
                n_rows_in, total_w, ROW_AXIS: tl.constexpr, ROW_BLOCK: tl.constexpr, COL_BLOCK: tl.constexpr,
                CT: tl.constexpr):
    """H(c) = Σ_r α_r β_r g[r,c] per column (float64) into scratch."""
    row_valid_ptr, row_w_ptr, R, C = _half_rows(text_valid_ptr, image_valid_ptr, text_w_ptr, image_w_ptr, T, V,
                                                ROW_AXIS)
    for col0 in range(0, C, COL_BLOCK):
        cols = col0 + tl.arange(0, COL_BLOCK)
        h_total = tl.zeros([COL_BLOCK], dtype=tl.float64)
        for row0 in range(0, R, ROW_BLOCK):
            rows = row0 + tl.arange(0, ROW_BLOCK)
            row_valid, row_in, row_w = _side(scratch, scratch_len, rows, R, row_valid_ptr, row_w_ptr, ROW_AXIS, CT)
            alpha, beta, one_minus_alpha = _leave_one_out(row_w, row_valid, row_in, n_rows_in, total_w)
            coef_sd = _load_block(coef_pair_ptr, rows, cols, T, V, ROW_AXIS, CT)
            h_total += tl.sum((tl.expand_dims(alpha * beta, 1 - ROW_AXIS) * coef_sd).to(tl.float64), axis=ROW_AXIS)
        _store_slot(scratch, _S_H, cols, C, scratch_len, h_total)


@_device_fn
def _grad_row_pass(sim_ptr, coef_pair_ptr, coef_row_ptr, coef_col_ptr, grad_sim_ptr, grad_text_ptr, grad_image_ptr,
                   scratch, scratch_len, text_valid_ptr, image_valid_ptr, text_w_ptr, image_w_ptr, T, V,
                   n_rows_in, n_cols_in, total_w, term_total, z_total, hf_total, ROW_AXIS: tl.constexpr,
                   ROW_BLOCK: tl.constexpr, COL_BLOCK: tl.constexpr, CT: tl.constexpr):
    """Adds the half's dL/dS (direct part per block, arg-max parts per row) and dL/dlogit of its rows."""
    row_valid_ptr, row_w_ptr, R, C = _half_rows(text_valid_ptr, image_valid_ptr, text_w_ptr, image_w_ptr, T, V,
                                                ROW_AXIS)
    if ROW_AXIS == 0:
        row_grad_ptr = grad_text_ptr
    else:
        row_grad_ptr = grad_image_ptr
    # Σ_c gc(c) · col_effect(c) / W, a scalar of the draw
    col_term = tl.zeros([1], dtype=CT)
    for col0 in range(0, C, COL_BLOCK):
        cols = col0 + tl.arange(0, COL_BLOCK)
        col_total = tl.load(scratch + _S_COL_TOTAL * scratch_len + cols, mask=cols < C, other=0.0)
        coef_col = tl.load(coef_col_ptr + cols, mask=cols < C, other=0.0).to(CT)
        col_term += tl.sum(_col_effect(coef_col, n_rows_in, total_w, CT)
                           * _col_effect(col_total, n_rows_in, total_w, CT), axis=0)
    col_term = tl.sum(col_term, axis=0)
    for row0 in range(0, R, ROW_BLOCK):
        rows = row0 + tl.arange(0, ROW_BLOCK)
        (top1, top1_index, top2_index, row_w_in, alpha, beta, one_minus_alpha, effect, top1_mean_rest,
         top1_or_0) = _row_vectors(rows, R, scratch, scratch_len, row_valid_ptr, row_w_ptr, n_rows_in, n_cols_in,
                                   total_w, term_total, ROW_AXIS, CT)
        coef_row = tl.load(coef_row_ptr + rows, mask=rows < R, other=0.0).to(CT)
        coef_row = tl.where(n_cols_in > 0, coef_row, 0.0)
        hf_rest = _exclusive(hf_total, alpha * beta * coef_row)
        to_top1 = coef_row * alpha - row_w_in * hf_rest  # dL/dt1 flows to i1 too
        to_top2 = tl.zeros([ROW_BLOCK], dtype=CT)
        q_dot_y = tl.zeros([ROW_BLOCK], dtype=CT)
        for col0 in range(0, C, COL_BLOCK):
            cols = col0 + tl.arange(0, COL_BLOCK)
            sim, q, col_rest_nonempty = _q_block(sim_ptr, rows, cols, scratch, scratch_len, R, C, n_cols_in, T, V,
                                                 ROW_AXIS, CT)
            coef_sd = _load_block(coef_pair_ptr, rows, cols, T, V, ROW_AXIS, CT)
            h = tl.expand_dims(alpha * beta, 1 - ROW_AXIS) * coef_sd
            h_total = tl.load(scratch + _S_H * scratch_len + cols, mask=cols < C, other=0.0)
            h_rest = _exclusive(tl.expand_dims(h_total, ROW_AXIS), h)
            coef_col = tl.load(coef_col_ptr + cols, mask=cols < C, other=0.0).to(CT)
            y = tl.expand_dims(_col_effect(coef_col, n_rows_in, total_w, CT), ROW_AXIS) - h_rest
            q_bar = coef_sd * tl.expand_dims(alpha, 1 - ROW_AXIS) + tl.expand_dims(row_w_in, 1 - ROW_AXIS) * y
            q_dot_y += tl.sum(q * y, axis=1 - ROW_AXIS)
            direct, block_top1, block_top2 = _route_block(sim, q_bar, top1, top1_index, cols, col_rest_nonempty,
                                                          ROW_AXIS)
            _add_block(grad_sim_ptr, rows, cols, T, V, direct, ROW_AXIS)
            to_top1 += block_top1
            to_top2 += block_top2
        tl.debug_barrier()  # the direct parts of these rows are stored before the arg-max parts are added
        _add_at(grad_sim_ptr, rows, top1_index, R, T, V, to_top1, ROW_AXIS)
        tl.debug_barrier()
        _add_at(grad_sim_ptr, rows, top2_index, R, T, V, to_top2, ROW_AXIS)
        own_term = _load_slot(scratch, _S_OWN, rows, R, scratch_len, CT)
        z_rest = _exclusive(z_total, _load_slot(scratch, _S_Z, rows, R, scratch_len, CT))
        logit_grad = own_term + row_w_in * (q_dot_y - col_term - z_rest - top1_or_0 * hf_rest)
        _add_vector(row_grad_ptr, rows, R, logit_grad)


@_device_fn
def _value_grad_pass(scratch, scratch_len, text_valid_ptr, image_valid_ptr, text_w_ptr, image_w_ptr, T, V,
                     grad_sim_ptr, grad_text_ptr, grad_image_ptr, n_rows_in, n_cols_in, total_w, term_total, coef,
                     ROW_AXIS: tl.constexpr, ROW_BLOCK: tl.constexpr, CT: tl.constexpr):
    """msr: gradient of coef · f(A, C) of the half (see _half_value_backward_tile), rows from scratch."""
    row_valid_ptr, row_w_ptr, R, C = _half_rows(text_valid_ptr, image_valid_ptr, text_w_ptr, image_w_ptr, T, V,
                                                ROW_AXIS)
    if ROW_AXIS == 0:
        row_grad_ptr = grad_text_ptr
    else:
        row_grad_ptr = grad_image_ptr
    value = _col_effect(term_total, n_rows_in, total_w, CT)
    scale = _col_effect(coef, n_rows_in, total_w, CT)
    for row0 in range(0, R, ROW_BLOCK):
        rows = row0 + tl.arange(0, ROW_BLOCK)
        top1, top1_index, top2, top2_index = _row_stats(scratch, rows, R, scratch_len, CT)
        row_valid, row_in, row_w = _side(scratch, scratch_len, rows, R, row_valid_ptr, row_w_ptr, ROW_AXIS, CT)
        active = row_in & (n_rows_in > 0) & (n_cols_in > 0)
        to_top1 = tl.where(active, row_w * scale, 0.0)
        _add_at(grad_sim_ptr, rows, top1_index, R, T, V, to_top1, ROW_AXIS)
        _add_vector(row_grad_ptr, rows, R, to_top1 * (tl.where(active, top1, 0.0) - value))


@_device_fn
def _msr_value_pass(scratch, scratch_len, out_pair, out_text, out_image, count_pair, count_text, count_image, T, V,
                    value, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, CT: tl.constexpr):
    """msr forward: adds the draw's value to the sums of every token (pair) in the coalition, and counts them."""
    for row0 in range(0, T, BLOCK_T):
        rows = row0 + tl.arange(0, BLOCK_T)
        text_in = _side_members(scratch, scratch_len, rows, T, 0)
        for col0 in range(0, V, BLOCK_V):
            cols = col0 + tl.arange(0, BLOCK_V)
            pair_in = text_in[:, None] & _side_members(scratch, scratch_len, cols, V, 1)[None, :]
            _add_block(out_pair, rows, cols, T, V, tl.where(pair_in, value, 0.0), 0)
            _add_block(count_pair, rows, cols, T, V, pair_in.to(CT), 0)
        _add_vector(out_text, rows, T, tl.where(text_in, value, 0.0))
        _add_vector(count_text, rows, T, text_in.to(CT))
    for col0 in range(0, V, BLOCK_V):
        cols = col0 + tl.arange(0, BLOCK_V)
        image_in = _side_members(scratch, scratch_len, cols, V, 1)
        _add_vector(out_image, cols, V, tl.where(image_in, value, 0.0))
        _add_vector(count_image, cols, V, image_in.to(CT))


@_device_fn
def _msr_coefficient(scratch, scratch_len, coef_pair, coef_text, coef_image, coef_const, T, V,
                     BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, CT: tl.constexpr):
    """msr backward: Σ_ij a_i c_j M_ij + Σ_i a_i ra_i + Σ_j c_j rc_j + z, the coefficient of the draw's value."""
    total = tl.zeros([1], dtype=CT)
    for row0 in range(0, T, BLOCK_T):
        rows = row0 + tl.arange(0, BLOCK_T)
        text_in = _side_members(scratch, scratch_len, rows, T, 0)
        for col0 in range(0, V, BLOCK_V):
            cols = col0 + tl.arange(0, BLOCK_V)
            pair_in = text_in[:, None] & _side_members(scratch, scratch_len, cols, V, 1)[None, :]
            block = _load_block(coef_pair, rows, cols, T, V, 0, CT)
            total += tl.sum(tl.sum(tl.where(pair_in, block, 0.0), axis=1), axis=0)
        row_coef = tl.load(coef_text + rows, mask=rows < T, other=0.0).to(CT)
        total += tl.sum(tl.where(text_in, row_coef, 0.0), axis=0)
    for col0 in range(0, V, BLOCK_V):
        cols = col0 + tl.arange(0, BLOCK_V)
        image_in = _side_members(scratch, scratch_len, cols, V, 1)
        col_coef = tl.load(coef_image + cols, mask=cols < V, other=0.0).to(CT)
        total += tl.sum(tl.where(image_in, col_coef, 0.0), axis=0)
    return tl.sum(total, axis=0) + tl.load(coef_const).to(CT)


# =====================================================================================================================
# Blocked-path kernels
# =====================================================================================================================

@_device_fn
def _draw_blocked(scratch, scratch_len, text_valid_pair, image_valid_pair, text_w_pair, image_w_pair, T, V,
                  key0, key1, first, i, pair32, CT: tl.constexpr):
    """Generates draw first + i into scratch: (n_text, Σ text weights, n_image, Σ image weights)."""
    draw = (first + i).to(tl.uint32)  # counter word 0 (the draw index, < 2^32)
    n_text, w_text = _draw_members(scratch, scratch_len, T, text_valid_pair, text_w_pair, key0, key1, draw, pair32,
                                   0, CT)
    n_image, w_image = _draw_members(scratch, scratch_len, V, image_valid_pair, image_w_pair, key0, key1, draw,
                                     pair32, 1, CT)
    tl.debug_barrier()
    return n_text, w_text, n_image, w_image


@triton.jit(do_not_specialize=("seed_lo", "seed_hi"))  # seed 1 would become a constexpr int
def _forward_blocked_kernel(
        sim_ptr, text_valid_ptr, image_valid_ptr, text_w_ptr, image_w_ptr,
        out_pair_ptr, out_text_ptr, out_image_ptr,
        count_pair_ptr, count_text_ptr, count_image_ptr, out_total_ptr,
        scratch_ptr, seed_lo, seed_hi, T, V, num_samples, slices, draws_per_slice, scratch_len,
        BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, ESTIMATOR: tl.constexpr, CT: tl.constexpr):
    """Forward of one (pair, draw slice) in [BLOCK_T, BLOCK_V] blocks; same outputs as _forward_tile_kernel.
    The output buffers must be zero on entry (they are accumulated in place)."""
    pid, pair, first, end = _program_draws(slices, draws_per_slice, num_samples)
    pair64 = pair.to(tl.int64)
    key0 = seed_lo.to(tl.uint32, bitcast=True)
    key1 = seed_hi.to(tl.uint32, bitcast=True)
    sim_pair = sim_ptr + pair64 * T * V
    text_valid_pair = text_valid_ptr + pair64 * T
    image_valid_pair = image_valid_ptr + pair64 * V
    text_w_pair = text_w_ptr + pair64 * T
    image_w_pair = image_w_ptr + pair64 * V
    scratch = scratch_ptr + pid * _N_SLOTS * scratch_len
    out_pair = out_pair_ptr + pid * T * V
    out_text = out_text_ptr + pid * T
    out_image = out_image_ptr + pid * V
    acc_total = tl.zeros([1], dtype=tl.float64)
    for i in range(0, end - first):
        n_text, w_text, n_image, w_image = _draw_blocked(scratch, scratch_len, text_valid_pair, image_valid_pair,
                                                         text_w_pair, image_w_pair, T, V, key0, key1, first, i,
                                                         pair.to(tl.uint32), CT)
        sf_text = _stats_pass(sim_pair, scratch, scratch_len, text_valid_pair, image_valid_pair, text_w_pair,
                              image_w_pair, T, V, n_image, 0, BLOCK_T, BLOCK_V, CT)
        tl.debug_barrier()
        if ESTIMATOR == _PAIRED:
            _col_total_pass(sim_pair, scratch, scratch_len, text_valid_pair, image_valid_pair, text_w_pair,
                            image_w_pair, T, V, n_image, 0, BLOCK_T, BLOCK_V, CT)
            tl.debug_barrier()
            _accumulate_pass(sim_pair, scratch, scratch_len, text_valid_pair, image_valid_pair, text_w_pair,
                             image_w_pair, T, V, out_pair, out_text, out_image, n_text, n_image, w_text, sf_text, 0,
                             BLOCK_T, BLOCK_V, CT)
            tl.debug_barrier()
        sf_image = _stats_pass(sim_pair, scratch, scratch_len, text_valid_pair, image_valid_pair, text_w_pair,
                               image_w_pair, T, V, n_text, 1, BLOCK_V, BLOCK_T, CT)
        tl.debug_barrier()
        if ESTIMATOR == _PAIRED:
            _col_total_pass(sim_pair, scratch, scratch_len, text_valid_pair, image_valid_pair, text_w_pair,
                            image_w_pair, T, V, n_text, 1, BLOCK_V, BLOCK_T, CT)
            tl.debug_barrier()
            _accumulate_pass(sim_pair, scratch, scratch_len, text_valid_pair, image_valid_pair, text_w_pair,
                             image_w_pair, T, V, out_pair, out_text, out_image, n_image, n_text, w_image, sf_image,
                             1, BLOCK_V, BLOCK_T, CT)
        else:
            f_text = _col_effect(sf_text, n_text, w_text, CT)  # sf is 0 when the other side is empty
            f_image = _col_effect(sf_image, n_image, w_image, CT)
            value = 0.5 * (f_text + f_image)
            acc_total += value.to(tl.float64)
            _msr_value_pass(scratch, scratch_len, out_pair, out_text, out_image, count_pair_ptr + pid * T * V,
                            count_text_ptr + pid * T, count_image_ptr + pid * V, T, V, value, BLOCK_T, BLOCK_V, CT)
        tl.debug_barrier()
    if ESTIMATOR == _MSR:
        tl.store(out_total_ptr + pid + tl.arange(0, 1), acc_total.to(CT))


@_device_fn
def _backward_half_blocked(sim_pair, coef_pair, coef_text, coef_image, grad_sim, grad_text, grad_image, scratch,
                           scratch_len, text_valid_pair, image_valid_pair, text_w_pair, image_w_pair, T, V,
                           n_text, n_image, w_text, w_image, msr_coef, ROW_AXIS: tl.constexpr,
                           ESTIMATOR: tl.constexpr, ROW_BLOCK: tl.constexpr, COL_BLOCK: tl.constexpr,
                           CT: tl.constexpr):
    """All passes of one half of one draw of the backward (blocked path)."""
    if ROW_AXIS == 0:
        n_rows_in = n_text
        n_cols_in = n_image
        total_w = w_text
        coef_row = coef_text
        coef_col = coef_image
    else:
        n_rows_in = n_image
        n_cols_in = n_text
        total_w = w_image
        coef_row = coef_image
        coef_col = coef_text
    term_total = _stats_pass(sim_pair, scratch, scratch_len, text_valid_pair, image_valid_pair, text_w_pair,
                             image_w_pair, T, V, n_cols_in, ROW_AXIS, ROW_BLOCK, COL_BLOCK, CT)
    tl.debug_barrier()
    if ESTIMATOR == _PAIRED:
        _col_total_pass(sim_pair, scratch, scratch_len, text_valid_pair, image_valid_pair, text_w_pair,
                        image_w_pair, T, V, n_cols_in, ROW_AXIS, ROW_BLOCK, COL_BLOCK, CT)
        _h_col_pass(coef_pair, scratch, scratch_len, text_valid_pair, image_valid_pair, text_w_pair, image_w_pair,
                    T, V, n_rows_in, total_w, ROW_AXIS, ROW_BLOCK, COL_BLOCK, CT)
        tl.debug_barrier()
        z_total, hf_total = _adjoint_row_pass(sim_pair, coef_pair, coef_row, scratch, scratch_len, text_valid_pair,
                                              image_valid_pair, text_w_pair, image_w_pair, T, V, n_rows_in,
                                              n_cols_in, total_w, term_total, ROW_AXIS, ROW_BLOCK, COL_BLOCK, CT)
        tl.debug_barrier()
        _grad_row_pass(sim_pair, coef_pair, coef_row, coef_col, grad_sim, grad_text, grad_image, scratch,
                       scratch_len, text_valid_pair, image_valid_pair, text_w_pair, image_w_pair, T, V, n_rows_in,
                       n_cols_in, total_w, term_total, z_total, hf_total, ROW_AXIS, ROW_BLOCK, COL_BLOCK, CT)
    else:
        _value_grad_pass(scratch, scratch_len, text_valid_pair, image_valid_pair, text_w_pair, image_w_pair, T, V,
                         grad_sim, grad_text, grad_image, n_rows_in, n_cols_in, total_w, term_total, msr_coef,
                         ROW_AXIS, ROW_BLOCK, CT)
    tl.debug_barrier()


@triton.jit(do_not_specialize=("seed_lo", "seed_hi"))  # seed 1 would become a constexpr int
def _backward_blocked_kernel(
        sim_ptr, text_valid_ptr, image_valid_ptr, text_w_ptr, image_w_ptr,
        coef_pair_ptr, coef_text_ptr, coef_image_ptr, coef_const_ptr,
        grad_sim_ptr, grad_text_ptr, grad_image_ptr,
        scratch_ptr, seed_lo, seed_hi, T, V, num_samples, slices, draws_per_slice, scratch_len,
        BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, ESTIMATOR: tl.constexpr, CT: tl.constexpr):
    """Backward of one (pair, draw slice) in blocks; same inputs and outputs as _backward_tile_kernel.
    The gradient buffers must be zero on entry."""
    pid, pair, first, end = _program_draws(slices, draws_per_slice, num_samples)
    pair64 = pair.to(tl.int64)
    key0 = seed_lo.to(tl.uint32, bitcast=True)
    key1 = seed_hi.to(tl.uint32, bitcast=True)
    sim_pair = sim_ptr + pair64 * T * V
    coef_pair = coef_pair_ptr + pair64 * T * V
    coef_text = coef_text_ptr + pair64 * T
    coef_image = coef_image_ptr + pair64 * V
    text_valid_pair = text_valid_ptr + pair64 * T
    image_valid_pair = image_valid_ptr + pair64 * V
    text_w_pair = text_w_ptr + pair64 * T
    image_w_pair = image_w_ptr + pair64 * V
    scratch = scratch_ptr + pid * _N_SLOTS * scratch_len
    grad_sim = grad_sim_ptr + pid * T * V
    grad_text = grad_text_ptr + pid * T
    grad_image = grad_image_ptr + pid * V
    for i in range(0, end - first):
        n_text, w_text, n_image, w_image = _draw_blocked(scratch, scratch_len, text_valid_pair, image_valid_pair,
                                                         text_w_pair, image_w_pair, T, V, key0, key1, first, i,
                                                         pair.to(tl.uint32), CT)
        coef = tl.sum(tl.zeros([1], dtype=CT), axis=0)
        if ESTIMATOR == _MSR:
            coef = _msr_coefficient(scratch, scratch_len, coef_pair, coef_text, coef_image, coef_const_ptr + pair64,
                                    T, V, BLOCK_T, BLOCK_V, CT)
        _backward_half_blocked(sim_pair, coef_pair, coef_text, coef_image, grad_sim, grad_text, grad_image, scratch,
                               scratch_len, text_valid_pair, image_valid_pair, text_w_pair, image_w_pair, T, V,
                               n_text, n_image, w_text, w_image, coef, 0, ESTIMATOR, BLOCK_T, BLOCK_V, CT)
        _backward_half_blocked(sim_pair, coef_pair, coef_text, coef_image, grad_sim, grad_text, grad_image, scratch,
                               scratch_len, text_valid_pair, image_valid_pair, text_w_pair, image_w_pair, T, V,
                               n_text, n_image, w_text, w_image, coef, 1, ESTIMATOR, BLOCK_V, BLOCK_T, CT)


@triton.jit
def _similarity_kernel(text_ptr, image_ptr, sim_ptr, T, V, D, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
                       BLOCK_D: tl.constexpr, CT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """sim[b] = text[b] @ image[b]ᵀ for the blocked from-tokens path: grid (B, T blocks, V blocks)."""
    pair = tl.program_id(0).to(tl.int64)
    t_idx = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    u_idx = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
    tile = _similarity_tile(text_ptr + pair * T * D, image_ptr + pair * V * D, t_idx, u_idx, T, V, D, BLOCK_D, CT,
                            DOT_PRECISION)
    mask = (t_idx[:, None] < T) & (u_idx[None, :] < V)
    tl.store(sim_ptr + pair * T * V + t_idx[:, None] * V + u_idx[None, :], tile, mask=mask)


# =====================================================================================================================
# Launchers
# =====================================================================================================================

def _check_sizes(text_len: int, image_len: int) -> None:
    if text_len > MAX_TEXT_TOKENS:
        raise ValueError(f"the Triton Banzhaf kernels support T <= {MAX_TEXT_TOKENS} text tokens, got T={text_len}")
    if image_len > MAX_IMAGE_TOKENS:
        raise ValueError(f"the Triton Banzhaf kernels support V <= {MAX_IMAGE_TOKENS} image tokens, "
                         f"got V={image_len}")


def _check_estimator(estimator: str) -> None:
    if estimator == "exact":
        raise ValueError("estimator='exact' enumerates 2**n coalitions and has no Triton kernel; use backend='cpu' "
                         "(or backend='torch')")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS} for the Triton kernels, got {estimator!r}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 inputs are computed in float64, everything else in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _triton_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _dot_precision(dtype: torch.dtype) -> str:
    """Exact fp32 products for fp32/fp64 features (as torch.bmm), tensor cores for fp16/bf16."""
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def _seed_halves(seed: int) -> tuple[int, int]:
    """The seed's 64 bits (two's complement for negative int64) as two int32 kernel arguments (lo, hi)."""
    bits = int(seed) & 0xFFFFFFFFFFFFFFFF
    lo, hi = bits & 0xFFFFFFFF, bits >> 32
    return tuple(x - (1 << 32) if x >= (1 << 31) else x for x in (lo, hi))


def _tile_warps(estimator: str, compute: torch.dtype) -> int:
    return TILE_WARPS[estimator, compute == torch.float64]


def _tile_shape(text_len: int, image_len: int, compute: torch.dtype) -> tuple[int, int] | None:
    """(T_PAD, V_PAD) of the tile path for this problem, or None when it needs the blocked path."""
    for t_pad, v_pad in TILE_SHAPES[compute]:
        if text_len <= t_pad and image_len <= v_pad:
            return t_pad, v_pad
    return None


def _slicing(batch: int, num_samples: int) -> tuple[int, int]:
    """(slices per pair, draws per slice): about TARGET_PROGRAMS programs, from B and K only."""
    slices = min(max(1, -(-TARGET_PROGRAMS // batch)), num_samples)
    slices = max(slices, -(-num_samples // MAX_DRAWS_PER_SLICE))
    per_slice = -(-num_samples // slices)
    return -(-num_samples // per_slice), per_slice


def _blocks(text_len: int, image_len: int, compute: torch.dtype, block) -> tuple[int, int] | None:
    """None for the tile path, else (BLOCK_T, BLOCK_V) of the blocked path (``block`` forces it)."""
    if block is not None:
        for size in block:
            if size < 1 or size > 128 or size & (size - 1):
                raise ValueError(f"_block sizes must be powers of two <= 128 (one Philox chunk), got {block}")
        return int(block[0]), int(block[1])
    if _tile_shape(text_len, image_len, compute) is not None:
        return None
    return (BLOCK_T_FP64, BLOCK_V_FP64) if compute == torch.float64 else (BLOCK_T, BLOCK_V)


def _exp_weights(logits: torch.Tensor, valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """exp(logit − max valid logit) [B, n] in ``dtype``, 0 on invalid tokens (as the C++ kernel)."""
    masked = logits.to(torch.float64).masked_fill(~valid, float("-inf"))
    shift = masked.amax(dim=1, keepdim=True).clamp_min(-1e300)
    return (masked - shift).exp().masked_fill(~valid, 0.0).to(dtype).contiguous()


def _sum_slices(partial: torch.Tensor, batch: int, slices: int) -> torch.Tensor:
    """[B*slices, ...] -> [B, ...] in float64, summed over the slices of each pair in slice order."""
    return partial.view(batch, slices, *partial.shape[1:]).sum(1, dtype=torch.float64)


def _similarity(text: torch.Tensor, image: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
    """sim [B,T,V] = text @ imageᵀ with the same tl.dot as the tile path (used by the blocked from-tokens path)."""
    batch, text_len, dim = text.shape
    image_len = image.shape[1]
    sim = torch.empty((batch, text_len, image_len), dtype=compute, device=text.device)
    block_t, block_v = 32, 32
    grid = (batch, triton.cdiv(text_len, block_t), triton.cdiv(image_len, block_v))
    _similarity_kernel[grid](text, image, sim, text_len, image_len, dim, BLOCK_T=block_t, BLOCK_V=block_v,
                             BLOCK_D=BLOCK_D, CT=_triton_dtype(compute), DOT_PRECISION=_dot_precision(text.dtype))
    return sim


def _forward_partials(sim, text, image, text_mask, image_mask, text_weight, image_weight, num_samples, seed,
                      estimator, compute, block):
    """Launches the forward kernels; returns the per-pair sums over all draws (float64 [B, ...] tensors by name:
    pair, text, image, and for msr the counts and the total of the values).

    Either ``sim`` [B,T,V] or (``text`` [B,T,D], ``image`` [B,V,D]) is given."""
    batch, text_len = text_mask.shape
    image_len = image_mask.shape[1]
    device = text_mask.device
    blocks = _blocks(text_len, image_len, compute, block)
    text_w = _exp_weights(text_weight, text_mask, compute)
    image_w = _exp_weights(image_weight, image_mask, compute)
    slices, per_slice = _slicing(batch, num_samples)
    programs = batch * slices
    msr = estimator == "msr"
    alloc = torch.empty if blocks is None else torch.zeros  # the blocked path accumulates in place

    def buffers():
        return (alloc((programs, text_len, image_len), dtype=compute, device=device),
                alloc((programs, text_len), dtype=compute, device=device),
                alloc((programs, image_len), dtype=compute, device=device))

    out_pair, out_text, out_image = buffers()
    count_pair, count_text, count_image = buffers() if msr else (out_pair, out_text, out_image)
    out_total = alloc((programs,), dtype=compute, device=device) if msr else out_text
    seed_lo, seed_hi = _seed_halves(seed)
    estimator_id = 1 if msr else 0
    ct = _triton_dtype(compute)
    masks_and_weights = (text_mask, image_mask, text_w, image_w)
    outputs = (out_pair, out_text, out_image, count_pair, count_text, count_image, out_total)
    if blocks is None:
        tile = _tile_shape(text_len, image_len, compute)
        from_tokens = sim is None
        dim = text.shape[2] if from_tokens else 1
        placeholder = text_w  # for the pointer arguments this launch does not read
        _forward_tile_kernel[(programs,)](
            placeholder if from_tokens else sim, text if from_tokens else placeholder,
            image if from_tokens else placeholder, *masks_and_weights, *outputs, seed_lo, seed_hi, text_len,
            image_len, dim, num_samples, slices, per_slice, T_PAD=tile[0], V_PAD=tile[1],
            BLOCK_D=BLOCK_D, ESTIMATOR=estimator_id, FROM_TOKENS=from_tokens, CT=ct,
            DOT_PRECISION=_dot_precision(text.dtype if from_tokens else sim.dtype),
            num_warps=_tile_warps(estimator, compute))
    else:
        if sim is None:
            sim = _similarity(text, image, compute)
        scratch_len = max(text_len, image_len)
        scratch = torch.empty((programs, _NUM_SLOTS, scratch_len), dtype=torch.float64, device=device)
        _forward_blocked_kernel[(programs,)](
            sim, *masks_and_weights, *outputs, scratch, seed_lo, seed_hi, text_len, image_len, num_samples, slices,
            per_slice, scratch_len, BLOCK_T=blocks[0], BLOCK_V=blocks[1], ESTIMATOR=estimator_id, CT=ct,
            num_warps=BLOCKED_WARPS)
    sums = {"pair": _sum_slices(out_pair, batch, slices), "text": _sum_slices(out_text, batch, slices),
            "image": _sum_slices(out_image, batch, slices)}
    if msr:
        sums.update(count_pair=_sum_slices(count_pair, batch, slices),
                    count_text=_sum_slices(count_text, batch, slices),
                    count_image=_sum_slices(count_image, batch, slices),
                    total=_sum_slices(out_total, batch, slices))
    return sums


def _msr_strata(sums: dict, num_samples: int) -> dict:
    """The four strata (i in/out × j in/out) of every pair and the two of every token, as (sum, count) [float64]."""
    s_tv, s_t, s_v, s_all = sums["pair"], sums["text"][:, :, None], sums["image"][:, None, :], sums["total"]
    n_tv, n_t, n_v = sums["count_pair"], sums["count_text"][:, :, None], sums["count_image"][:, None, :]
    s_all = s_all[:, None, None]
    return {
        "11": (s_tv, n_tv), "10": (s_t - s_tv, n_t - n_tv), "01": (s_v - s_tv, n_v - n_tv),
        "00": (s_all - s_t - s_v + s_tv, num_samples - n_t - n_v + n_tv),
        "t1": (sums["text"], sums["count_text"]),
        "t0": (s_all[:, :, 0] - sums["text"], num_samples - sums["count_text"]),
        "v1": (sums["image"], sums["count_image"]),
        "v0": (s_all[:, 0, :] - sums["image"], num_samples - sums["count_image"]),
    }


def _stratum_mean(sum_and_count) -> torch.Tensor:
    total, count = sum_and_count
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros((), dtype=total.dtype, device=total.device))


def _inverse_count(count: torch.Tensor) -> torch.Tensor:
    return torch.where(count > 0, 1.0 / count.clamp_min(1), torch.zeros((), dtype=count.dtype, device=count.device))


def _masked(x: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device)).to(dtype)


def _forward(sim, text, image, text_mask, image_mask, text_weight, image_weight, num_samples, seed, estimator,
             compute, block):
    batch, text_len = text_mask.shape
    image_len = image_mask.shape[1]
    _check_sizes(text_len, image_len)
    _check_estimator(estimator)
    sums = _forward_partials(sim, text, image, text_mask, image_mask, text_weight, image_weight, num_samples, seed,
                             estimator, compute, block)
    if estimator == "paired":
        scale = 0.5 / num_samples
        interaction, text_value, image_value = sums["pair"] * scale, sums["text"] * scale, sums["image"] * scale
    else:
        strata = _msr_strata(sums, num_samples)
        mean = {key: _stratum_mean(value) for key, value in strata.items()}
        interaction = mean["11"] - mean["10"] - mean["01"] + mean["00"]
        text_value = mean["t1"] - mean["t0"]
        image_value = mean["v1"] - mean["v0"]
    pair_mask = text_mask[:, :, None] & image_mask[:, None, :]
    return (_masked(interaction, pair_mask, compute), _masked(text_value, text_mask, compute),
            _masked(image_value, image_mask, compute))


def banzhaf_forward(sim: torch.Tensor, text_mask: torch.Tensor, image_mask: torch.Tensor, text_weight: torch.Tensor,
                    image_weight: torch.Tensor, num_samples: int, seed: int, estimator: str, *,
                    _block: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Monte Carlo Banzhaf interactions and single-token values, as ``torch.ops.cbd_fast.banzhaf_interaction``.

    Args:
        sim: ``[B,T,V]`` similarities (fp32/fp16/bf16/fp64), contiguous. T <= 256, V <= 576.
        text_mask, image_mask: ``[B,T]`` / ``[B,V]`` bool validity.
        text_weight, image_weight: ``[B,T]`` / ``[B,V]`` weight logits (floating).
        num_samples: draws K in [1, 2**32). seed: Philox seed (int64 or uint64 bits).
        estimator: ``"paired"`` or ``"msr"`` (``"exact"`` raises: use the CPU backend).
        _block: forces the blocked path with these (BLOCK_T, BLOCK_V) (tests).

    Returns:
        ``(interaction [B,T,V], text_value [B,T], image_value [B,V])``, float64 for float64 ``sim``, else float32;
        0 on invalid tokens.
    """
    compute = _compute_dtype(sim.dtype)
    return _forward(sim, None, None, text_mask, image_mask, text_weight, image_weight, num_samples, seed, estimator,
                    compute, _block)


def banzhaf_forward_from_tokens(text: torch.Tensor, image: torch.Tensor, text_mask: torch.Tensor,
                                image_mask: torch.Tensor, text_weight: torch.Tensor, image_weight: torch.Tensor,
                                num_samples: int, seed: int, estimator: str, *,
                                _block: tuple[int, int] | None = None
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`banzhaf_forward` of ``sim[b] = text[b] @ image[b]ᵀ`` with the product formed inside the kernel.

    text ``[B,T,D]``, image ``[B,V,D]`` (one dtype). tl.dot with float32 accumulation (tensor cores for bf16/fp16,
    exact fp32 products for float32; float64 for float64 features). Small tiles keep S in registers; the blocked
    path writes it to a [B,T,V] workspace first. Same outputs as ``banzhaf_forward(torch.bmm(text, imageᵀ))`` up
    to the summation order of the products."""
    compute = _compute_dtype(text.dtype)
    return _forward(None, text, image, text_mask, image_mask, text_weight, image_weight, num_samples, seed,
                    estimator, compute, _block)


def _backward_coefficients(grad_interaction, grad_text_value, grad_image_value, sim, text_mask, image_mask,
                           text_weight, image_weight, num_samples, seed, estimator, compute, block):
    """Per-pair inputs of the backward kernels (float64) and the final scale.

    paired: the masked output gradients, scale ½/K. msr: the coefficient of draw k's value,
    Σ_ij a_i c_j M_ij + Σ_i a_i ra_i + Σ_j c_j rc_j + z (the stratum weights ±g/N of the C++ code, regrouped), scale ½.
    """
    pair_mask = text_mask[:, :, None] & image_mask[:, None, :]
    zero = torch.zeros((), dtype=torch.float64, device=sim.device)
    g_pair = torch.where(pair_mask, grad_interaction.to(torch.float64), zero)
    g_text = torch.where(text_mask, grad_text_value.to(torch.float64), zero)
    g_image = torch.where(image_mask, grad_image_value.to(torch.float64), zero)
    if estimator == "paired":
        return g_pair, g_text, g_image, torch.zeros(sim.shape[0], dtype=torch.float64, device=sim.device), \
            0.5 / num_samples
    sums = _forward_partials(sim, None, None, text_mask, image_mask, text_weight, image_weight, num_samples, seed,
                             estimator, compute, block)
    strata = _msr_strata(sums, num_samples)
    p11 = g_pair * _inverse_count(strata["11"][1])
    p10 = -g_pair * _inverse_count(strata["10"][1])
    p01 = -g_pair * _inverse_count(strata["01"][1])
    p00 = g_pair * _inverse_count(strata["00"][1])
    pt1, pt0 = g_text * _inverse_count(strata["t1"][1]), -g_text * _inverse_count(strata["t0"][1])
    pv1, pv0 = g_image * _inverse_count(strata["v1"][1]), -g_image * _inverse_count(strata["v0"][1])
    coef_pair = p11 - p10 - p01 + p00
    coef_text = (p10 - p00).sum(2) + pt1 - pt0
    coef_image = (p01 - p00).sum(1) + pv1 - pv0
    coef_const = p00.sum((1, 2)) + pt0.sum(1) + pv0.sum(1)
    return coef_pair, coef_text, coef_image, coef_const, 0.5


def banzhaf_backward(grad_interaction: torch.Tensor, grad_text_value: torch.Tensor, grad_image_value: torch.Tensor,
                     sim: torch.Tensor, text_mask: torch.Tensor, image_mask: torch.Tensor, text_weight: torch.Tensor,
                     image_weight: torch.Tensor, num_samples: int, seed: int, estimator: str, *,
                     _block: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the estimate w.r.t. sim and the weight logits, as ``torch.ops.cbd_fast.banzhaf_interaction_
    backward``: every draw is regenerated from the seed (nothing is stored by the forward).

    grad_interaction ``[B,T,V]``, grad_text_value ``[B,T]``, grad_image_value ``[B,V]`` (None = zeros); the other
    arguments as :func:`banzhaf_forward`. Returns ``(grad_sim [B,T,V] in sim.dtype, grad_text_weight [B,T],
    grad_image_weight [B,V])`` in the weights' dtypes; gradients of masked-out outputs do not flow.
    """
    batch, text_len, image_len = sim.shape
    _check_sizes(text_len, image_len)
    _check_estimator(estimator)
    compute = _compute_dtype(sim.dtype)
    grads = [g if g is not None else torch.zeros(shape, dtype=compute, device=sim.device)
             for g, shape in ((grad_interaction, sim.shape), (grad_text_value, text_mask.shape),
                              (grad_image_value, image_mask.shape))]
    coef_pair, coef_text, coef_image, coef_const, scale = _backward_coefficients(
        *grads, sim, text_mask, image_mask, text_weight, image_weight, num_samples, seed, estimator, compute, _block)
    coefs = [x.to(compute).contiguous() for x in (coef_pair, coef_text, coef_image, coef_const)]
    text_w = _exp_weights(text_weight, text_mask, compute)
    image_w = _exp_weights(image_weight, image_mask, compute)
    slices, per_slice = _slicing(batch, num_samples)
    programs = batch * slices
    blocks = _blocks(text_len, image_len, compute, _block)
    alloc = torch.empty if blocks is None else torch.zeros
    grad_sim = alloc((programs, text_len, image_len), dtype=compute, device=sim.device)
    grad_text = alloc((programs, text_len), dtype=compute, device=sim.device)
    grad_image = alloc((programs, image_len), dtype=compute, device=sim.device)
    seed_lo, seed_hi = _seed_halves(seed)
    estimator_id = 1 if estimator == "msr" else 0
    ct = _triton_dtype(compute)
    grad_sim_image_half = None
    if blocks is None:
        launch = _backward_tile_kernel[(programs,)]
        args = (sim, text_mask, image_mask, text_w, image_w, *coefs)
        scalars = (seed_lo, seed_hi, text_len, image_len, num_samples, slices, per_slice)
        tile = _tile_shape(text_len, image_len, compute)
        options = dict(T_PAD=tile[0], V_PAD=tile[1], ESTIMATOR=estimator_id, CT=ct,
                       num_warps=_tile_warps(estimator, compute))
        if estimator == "msr":
            launch(*args, grad_sim, grad_text, grad_image, *scalars, HALF=2, **options)
        else:  # one launch per half; the image half's dL/dS goes to its own buffer
            grad_sim_image_half = torch.empty_like(grad_sim)
            launch(*args, grad_sim, grad_text, grad_image, *scalars, HALF=0, **options)
            launch(*args, grad_sim_image_half, grad_text, grad_image, *scalars, HALF=1, **options)
    else:
        scratch_len = max(text_len, image_len)
        scratch = torch.empty((programs, _NUM_SLOTS, scratch_len), dtype=torch.float64, device=sim.device)
        _backward_blocked_kernel[(programs,)](
            sim, text_mask, image_mask, text_w, image_w, *coefs, grad_sim, grad_text, grad_image, scratch, seed_lo,
            seed_hi, text_len, image_len, num_samples, slices, per_slice, scratch_len, BLOCK_T=blocks[0],
            BLOCK_V=blocks[1], ESTIMATOR=estimator_id, CT=ct, num_warps=BLOCKED_WARPS)
    grad_sim_total = _sum_slices(grad_sim, batch, slices)
    if grad_sim_image_half is not None:
        grad_sim_total += _sum_slices(grad_sim_image_half, batch, slices)
    return ((grad_sim_total * scale).to(sim.dtype),
            _masked(_sum_slices(grad_text, batch, slices) * scale, text_mask, text_weight.dtype),
            _masked(_sum_slices(grad_image, batch, slices) * scale, image_mask, image_weight.dtype))


def coalition_bits(batch: int, text_len: int, image_len: int, num_samples: int, seed: int,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The raw Philox bits the kernels draw: (text [K,B,T], image [K,B,V]) bool, to compare with
    ``cbd_fast.coalitions`` (a token is a member when its bit is set and it is valid)."""
    text = torch.empty((num_samples, batch, text_len), dtype=torch.int8, device=device)
    image = torch.empty((num_samples, batch, image_len), dtype=torch.int8, device=device)
    seed_lo, seed_hi = _seed_halves(seed)
    _coalition_bits_kernel[(num_samples, batch)](text, image, seed_lo, seed_hi, batch, text_len, image_len)
    return text.bool(), image.bool()


# =====================================================================================================================
# Compile check
# =====================================================================================================================

_POINTER_TYPES = {torch.float32: "*fp32", torch.float64: "*fp64", torch.bfloat16: "*bf16", torch.float16: "*fp16"}


def _signature(kernel, pointer_types: dict[str, str], constexprs: dict) -> dict[str, str]:
    """Triton signature of ``kernel``: names in ``pointer_types`` get that pointer type, names ending in ``_ptr``
    the compute-dtype pointer ``pointer_types['*']``, constexprs 'constexpr', the rest i32."""
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointer_types:
            signature[name] = pointer_types[name]
        elif name.endswith("_ptr"):
            signature[name] = pointer_types["*"]
        else:
            signature[name] = "i32"
    return signature


def _tile_specs(t_pad: int, v_pad: int, input_dtype: torch.dtype, estimator: str) -> list[CompileSpec]:
    """Tile-path kernels of one (tile shape, input dtype, estimator): forward from sim and from tokens, backward."""
    compute = _compute_dtype(input_dtype)
    ct, warps = _triton_dtype(compute), _tile_warps(estimator, compute)
    estimator_id = ESTIMATORS.index(estimator)
    pointers = {"*": _POINTER_TYPES[compute], "sim_ptr": _POINTER_TYPES[input_dtype], "text_ptr":
                _POINTER_TYPES[input_dtype], "image_ptr": _POINTER_TYPES[input_dtype], "text_valid_ptr": "*i1",
                "image_valid_ptr": "*i1"}
    specs = []
    for from_tokens in (False, True):
        constexprs = dict(T_PAD=t_pad, V_PAD=v_pad, BLOCK_D=BLOCK_D, ESTIMATOR=estimator_id, FROM_TOKENS=from_tokens,
                          CT=ct, DOT_PRECISION=_dot_precision(input_dtype))
        specs.append(CompileSpec(f"forward{'_from_tokens' if from_tokens else ''}", _forward_tile_kernel,
                                 _signature(_forward_tile_kernel, pointers, constexprs), constexprs, num_warps=warps))
    for half in ((0, 1) if estimator == "paired" else (2,)):
        constexprs = dict(T_PAD=t_pad, V_PAD=v_pad, ESTIMATOR=estimator_id, HALF=half, CT=ct)
        specs.append(CompileSpec(f"backward_half{half}", _backward_tile_kernel,
                                 _signature(_backward_tile_kernel, pointers, constexprs), constexprs, num_warps=warps))
    return specs


def _blocked_specs(input_dtype: torch.dtype, estimator: str) -> list[CompileSpec]:
    """Blocked-path kernels of one (input dtype, estimator); T and V are runtime arguments."""
    compute = _compute_dtype(input_dtype)
    block_t, block_v = _blocks(MAX_TEXT_TOKENS, MAX_IMAGE_TOKENS, compute, None)
    pointers = {"*": _POINTER_TYPES[compute], "sim_ptr": _POINTER_TYPES[input_dtype], "text_valid_ptr": "*i1",
                "image_valid_ptr": "*i1", "scratch_ptr": "*fp64"}
    constexprs = dict(BLOCK_T=block_t, BLOCK_V=block_v, ESTIMATOR=ESTIMATORS.index(estimator),
                      CT=_triton_dtype(compute))
    return [CompileSpec(name, kernel, _signature(kernel, pointers, constexprs), constexprs, num_warps=BLOCKED_WARPS)
            for name, kernel in (("forward", _forward_blocked_kernel), ("backward", _backward_blocked_kernel))]


def _similarity_spec(input_dtype: torch.dtype) -> CompileSpec:
    """The S = text @ imageᵀ kernel of the blocked from-tokens path."""
    compute = _compute_dtype(input_dtype)
    constexprs = dict(BLOCK_T=32, BLOCK_V=32, BLOCK_D=BLOCK_D, CT=_triton_dtype(compute),
                      DOT_PRECISION=_dot_precision(input_dtype))
    pointers = {"*": _POINTER_TYPES[compute], "text_ptr": _POINTER_TYPES[input_dtype],
                "image_ptr": _POINTER_TYPES[input_dtype]}
    return CompileSpec(f"banzhaf_similarity_{str(input_dtype).split('.')[-1]}", _similarity_kernel,
                       _signature(_similarity_kernel, pointers, constexprs), constexprs)


def compile_specs() -> list[CompileSpec]:
    """Every kernel of this module in representative configurations for the sm_90a spill check: both estimators,
    fp32, bf16 and fp64 inputs, and every tile shape of the tile path (32×64 holds the anchor T=32, V=50) and the
    blocked path (ViT-B/16 T=77, V=197 and the limit T=256, V=576; T and V are runtime arguments there, so both
    compile to the same kernels). Names say which problem shapes each configuration serves."""
    shapes = {"anchor": (32, 50), "tile16x64": (16, 50), "tile16x128": (16, 128), "vitb16": (77, 197),
              "limit": (MAX_TEXT_TOKENS, MAX_IMAGE_TOKENS)}
    configs: dict[str, tuple[list[str], list[CompileSpec]]] = {}
    for input_dtype in (torch.float32, torch.bfloat16, torch.float64):
        compute = _compute_dtype(input_dtype)
        for estimator in ESTIMATORS:
            for shape_name, (text_len, image_len) in shapes.items():
                tile = _tile_shape(text_len, image_len, compute)
                path = f"tile{tile[0]}x{tile[1]}" if tile else "blocked"
                key = f"{path}_{estimator}_{str(input_dtype).split('.')[-1]}"
                if key not in configs:
                    specs = _tile_specs(*tile, input_dtype, estimator) if tile else _blocked_specs(input_dtype,
                                                                                                 estimator)
                    configs[key] = ([], specs)
                configs[key][0].append(shape_name)
    specs = [dataclasses.replace(spec, name=f"banzhaf_{spec.name}_{key}_for_{'+'.join(shape_names)}")
             for key, (shape_names, key_specs) in configs.items() for spec in key_specs]
    specs += [_similarity_spec(input_dtype) for input_dtype in (torch.float32, torch.bfloat16, torch.float64)]
    specs.append(CompileSpec("banzhaf_coalition_bits", _coalition_bits_kernel,
                             _signature(_coalition_bits_kernel, {"*": "*i8"}, {}), {}))
    return specs
