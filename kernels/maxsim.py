"""Triton kernels for the all-pairs fine-grained score (MaxSim / WTI, DESIGN §5), forward and backward.

For every text ``a`` and image ``b``::

    s[a,b] = ½ ( Σ_t α[a,t] · max_{u valid} ⟨X[a,t], Y[b,u]⟩  +  Σ_u β[b,u] · max_{t valid} ⟨X[a,t], Y[b,u]⟩ )

with the token coefficients α ``[Bt, T]`` and β ``[Bi, V]`` computed by the caller (0 on invalid tokens).

Work is tiled like attention. A tile stacks every token of ``TEXTS_PER_TILE`` texts as its rows and takes
``BLOCK_V`` tokens of one image as its columns; its similarities come from ``tl.dot`` over ``BLOCK_D`` chunks of
the features (tensor cores for bf16/fp16 with fp32 accumulation; exact fp32/fp64 products otherwise). Row maxima
run over the image-token tiles, column maxima are complete within a tile. The ``[Bt, Bi, T, V]`` similarity
tensor never exists.

* Forward (``_maxsim_tile_kernel``): a program per block of texts and block of images; memory O(Bt·Bi), only
  the score is stored.
* Backward: the same kernel recomputes the maxima and arg-maxima tile by tile and saves them, O(Bt·Bi·(T+V))
  for a chunk of texts (at most ``MAXIMA_BUDGET_BYTES``). Two kernels without atomics then form the gradients as
  products of one-hot weight matrices with the features,
  ``W_ab[t,u] = ½·g[a,b]·(α[a,t]·1[u = argmax_u S[t,:]] + β[b,u]·1[t = argmax_t S[:,u]])``:
  ``grad_text[a] = Σ_b W_ab · Y[b]`` with ``grad_alpha[a,t] = Σ_b ½·g·max_u S[t,u]`` (a program per text block and
  feature chunk) and ``grad_image[b] = Σ_a W_abᵀ · X[a]`` with ``grad_beta[b,u] = Σ_a ½·g·max_t S[t,u]`` (a
  program per image, token tile and feature chunk). Both kernels read the one saved arg-max, so they agree on it.

Semantics are those of the C++ op: invalid tokens never enter a max (−∞, not 0); a max over no valid token is 0
and carries no gradient; ties go to the lowest index, the one entry the gradient flows through. Every output
element is owned by one program and reduced in a fixed order, so runs are bitwise reproducible; the tile
configuration depends on (T, V, D, dtype) only, never on the batch sizes.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ._spec import CompileSpec

MAX_TEXT_TOKENS = 256
MAX_IMAGE_TOKENS = 576
MAX_DIM = 1024

# Upper bound on the maxima the backward saves at once (row and column maxima with their arg-maxima for a chunk
# of texts against every image); larger batches are processed in chunks of texts.
MAXIMA_BUDGET_BYTES = 256 * 2**20

_HALF_DTYPES = (torch.float16, torch.bfloat16)
_TRITON_POINTER_TYPES = {torch.float32: "*fp32", torch.float64: "*fp64", torch.float16: "*fp16",
                         torch.bfloat16: "*bf16"}


# ---------------------------------------------------------------------------------------------------------------
# Shared device functions
# ---------------------------------------------------------------------------------------------------------------
# Addresses: a scalar int64 offset to the first token of a block plus int32 offsets within the block, so that a
# tile's pointers do not each hold a 64-bit sum. Rows and columns outside the tensors read the block's first
# token instead (always in bounds) and are excluded afterwards, so the feature loads need no row mask.

@triton.jit
def _text_block(text_block, num_texts, text_len, BLOCK_T: tl.constexpr, TEXTS_PER_TILE: tl.constexpr):
    """The rows of a tile: token ``row % BLOCK_T`` of text ``text_block * TEXTS_PER_TILE + row // BLOCK_T``.

    Returns (row_token, text_index, in_range, first_token, local_token) for the ``[TEXTS_PER_TILE * BLOCK_T]``
    rows, ``first_token`` = index of the block's first token in [Bt·T] (int64 scalar) and ``local_token`` =
    token index relative to it (int32; 0 for rows out of range).
    """
    rows = tl.arange(0, TEXTS_PER_TILE * BLOCK_T)
    row_token = rows % BLOCK_T
    first_text = text_block * TEXTS_PER_TILE
    text_index = first_text + rows // BLOCK_T
    in_range = (text_index < num_texts) & (row_token < text_len)
    first_token = tl.cast(first_text, tl.int64) * text_len
    local_token = tl.where(in_range, (rows // BLOCK_T) * text_len + row_token, 0)
    return row_token, text_index, in_range, first_token, local_token


@triton.jit
def _pair_offsets(text_index, image, num_images, token, length):
    """Offsets of (text, image, token) in a [Bt, Bi, length] array (int64; broadcasts over the arguments)."""
    return (tl.cast(text_index, tl.int64) * num_images + image) * length + token


@triton.jit
def _row_stride(dim, ALIGNED: tl.constexpr):
    """The feature dimension as row stride. ALIGNED (the launcher checked dim % 16 == 0 and 16-byte aligned
    feature arrays): written as (dim // 16) * 16, the same value, so that the compiler sees rows start
    16-aligned and vectorises the loads even where the launch was not specialised on it."""
    if ALIGNED:
        dim = (dim // 16) * 16
    return dim


@triton.jit
def _row_pointer(base_ptr, first_row, dim, ALIGNED: tl.constexpr):
    """Pointer to row ``first_row`` (int64 scalar) of a [rows, dim] array (16-byte aligned if ALIGNED)."""
    ptr = base_ptr + first_row * dim
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b. UPCAST: multiply in fp32 (the interpreter cannot multiply bfloat16 matrices; products of
    halves are exact in fp32, so only the summation order differs from the tensor cores)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _similarity_tile(text_rows_ptr, text_offsets, image_cols_ptr, image_offsets, dim, ACC_DTYPE: tl.constexpr,
                     ROWS: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                     PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """S[r, c] = ⟨X row r, Y row c⟩ as ``[ROWS, BLOCK_V]`` in ACC_DTYPE, summed over D in chunks of BLOCK_D in
    order. Row r of X starts at ``text_rows_ptr + text_offsets[r]``, row c of Y at ``image_cols_ptr +
    image_offsets[c]``. EVEN_D: BLOCK_D divides D (no feature mask)."""
    sim = tl.zeros([ROWS, BLOCK_V], ACC_DTYPE)
    d = tl.arange(0, BLOCK_D)
    for d_start in range(0, dim, BLOCK_D):
        # The offsets are formed inside the loop: hoisted out of it, a tile of pointers would stay in registers.
        x_ptrs = text_rows_ptr + (text_offsets + d_start)[:, None] + d[None, :]  # [ROWS, BLOCK_D]
        y_ptrs = image_cols_ptr + (image_offsets + d_start)[None, :] + d[:, None]  # [BLOCK_D, BLOCK_V]
        if EVEN_D:
            x = tl.load(x_ptrs)
            y_t = tl.load(y_ptrs)
        else:
            d_in = d_start + d < dim
            x = tl.load(x_ptrs, mask=d_in[None, :], other=0.0)
            y_t = tl.load(y_ptrs, mask=d_in[:, None], other=0.0)
        sim = _dot(x, y_t, sim, PRECISION, UPCAST)
    return sim


@triton.jit
def _one_hot_weights(row_argmax, row_weight, col_argmax, col_weight, cols, ROWS: tl.constexpr, BLOCK_T: tl.constexpr,
                     TEXTS_PER_TILE: tl.constexpr, BLOCK_V: tl.constexpr):
    """W[r, c] = row_weight[r]·1[row_argmax[r] = cols[c]] + col_weight[k, c]·1[col_argmax[k, c] = t] for row
    r = token t of stacked text k: ``[ROWS, BLOCK_V]`` (½g·α and ½g·β in the callers).

    ``row_argmax`` [ROWS]: the image token of each row's maximum; ``col_argmax`` [TEXTS_PER_TILE, BLOCK_V]: the
    text token of each column's maximum; −1 for none.
    """
    tokens = tl.arange(0, BLOCK_T)
    col_hit = tokens[None, :, None] == col_argmax[:, None, :]  # [TEXTS_PER_TILE, BLOCK_T, BLOCK_V]
    col_part = tl.reshape(tl.where(col_hit, col_weight[:, None, :], 0.0), [ROWS, BLOCK_V])
    return tl.where(row_argmax[:, None] == cols[None, :], row_weight[:, None], 0.0) + col_part


@triton.jit
def _weighted_features(weights, features, acc, SPLIT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + weights @ features for fp32/fp64 ``weights`` [M, K] and ``features`` [K, N] in the input dtype.

    SPLIT 0 (fp32/fp64 features): products at PRECISION, as for the similarity. SPLIT 1 (bf16): the weights as
    two bf16 parts (hi + lo: 16 significant bits, fp32 range), each multiplied with the features on the tensor
    cores. SPLIT 2 (fp16): the features too as two bf16 parts (exact: 8 + 8 bits hold fp16's 11), the lo·lo
    product dropped.
    """
    if SPLIT == 0:
        acc = tl.dot(weights, features, acc, input_precision=PRECISION)
    else:
        weights_hi = weights.to(tl.bfloat16)
        weights_lo = (weights - weights_hi.to(tl.float32)).to(tl.bfloat16)
        if SPLIT == 1:
            acc = _dot(weights_hi, features, acc, "tf32", UPCAST)
            acc = _dot(weights_lo, features, acc, "tf32", UPCAST)
        else:
            features_f32 = features.to(tl.float32)
            features_hi = features_f32.to(tl.bfloat16)
            features_lo = (features_f32 - features_hi.to(tl.float32)).to(tl.bfloat16)
            acc = _dot(weights_hi, features_hi, acc, "tf32", UPCAST)
            acc = _dot(weights_hi, features_lo, acc, "tf32", UPCAST)
            acc = _dot(weights_lo, features_hi, acc, "tf32", UPCAST)
    return acc


# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------

@triton.jit
def _maxsim_tile_kernel(text_ptr, image_ptr, text_mask_ptr, image_mask_ptr, alpha_ptr, beta_ptr, score_ptr,
                        row_max_ptr, row_argmax_ptr, col_max_ptr, col_argmax_ptr,
                        num_texts, num_images, text_len, image_len, dim,
                        BLOCK_T: tl.constexpr, TEXTS_PER_TILE: tl.constexpr, BLOCK_V: tl.constexpr,
                        BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, ALIGNED: tl.constexpr,
                        IMAGES_PER_PROGRAM: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                        SAVE_MAXIMA: tl.constexpr):
    """A block of TEXTS_PER_TILE texts against IMAGES_PER_PROGRAM images (1-D grid, images fastest).

    SAVE_MAXIMA = False: score[a, b] [Bt, Bi]. SAVE_MAXIMA = True (backward): row maxima and arg-maxima
    [Bt, Bi, T] and column maxima and arg-maxima [Bt, Bi, V] (0 and −1 where there is no valid token).
    """
    ACC_DTYPE: tl.constexpr = alpha_ptr.dtype.element_ty
    dim = _row_stride(dim, ALIGNED)
    ROWS: tl.constexpr = TEXTS_PER_TILE * BLOCK_T
    pid = tl.program_id(0)
    image_blocks = tl.cdiv(num_images, IMAGES_PER_PROGRAM)
    text_block = pid // image_blocks
    first_image = (pid % image_blocks) * IMAGES_PER_PROGRAM

    row_token, text_index, text_in, first_token, local_token = _text_block(text_block, num_texts, text_len,
                                                                           BLOCK_T, TEXTS_PER_TILE)
    text_valid = text_in & (tl.load(text_mask_ptr + first_token + local_token) != 0)
    alpha = tl.load(alpha_ptr + first_token + local_token, mask=text_in, other=0.0)
    text_rows_ptr = _row_pointer(text_ptr, first_token, dim, ALIGNED)
    text_offsets = local_token * dim
    tile_texts = text_block * TEXTS_PER_TILE + tl.arange(0, TEXTS_PER_TILE)  # [TEXTS_PER_TILE]

    for image in range(first_image, tl.minimum(first_image + IMAGES_PER_PROGRAM, num_images)):
        first_image_token = tl.cast(image, tl.int64) * image_len
        image_cols_ptr = _row_pointer(image_ptr, first_image_token, dim, ALIGNED)
        row_best = tl.full([ROWS], float("-inf"), ACC_DTYPE)
        row_argmax = tl.zeros([ROWS], tl.int32)
        image_term = tl.zeros([TEXTS_PER_TILE], ACC_DTYPE)
        for token_start in range(0, image_len, BLOCK_V):
            cols = token_start + tl.arange(0, BLOCK_V)
            image_in = cols < image_len
            local_col = tl.where(image_in, cols, 0)
            image_valid = image_in & (tl.load(image_mask_ptr + first_image_token + local_col) != 0)
            sim = _similarity_tile(text_rows_ptr, text_offsets, image_cols_ptr, local_col * dim, dim, ACC_DTYPE,
                                   ROWS, BLOCK_V, BLOCK_D, EVEN_D, PRECISION, UPCAST)
            sim = tl.where(text_valid[:, None] & image_valid[None, :], sim, float("-inf"))
            # Column maxima of each stacked text: complete here, since the tile holds every token of its texts.
            sim_by_text = tl.reshape(sim, [TEXTS_PER_TILE, BLOCK_T, BLOCK_V])
            if SAVE_MAXIMA:
                tile_best, tile_argmax = tl.max(sim, axis=1, return_indices=True, return_indices_tie_break_left=True)
                row_argmax = tl.where(tile_best > row_best, token_start + tile_argmax, row_argmax)  # earlier wins ties
                row_best = tl.maximum(row_best, tile_best)
                col_best, col_argmax = tl.max(sim_by_text, axis=1, return_indices=True,
                                              return_indices_tie_break_left=True)  # [TEXTS_PER_TILE, BLOCK_V]
                has_max = col_best > float("-inf")
                offsets = _pair_offsets(tile_texts[:, None], image, num_images, cols[None, :], image_len)
                store_mask = (tile_texts < num_texts)[:, None] & image_in[None, :]
                tl.store(col_max_ptr + offsets, tl.where(has_max, col_best, 0.0), mask=store_mask)
                tl.store(col_argmax_ptr + offsets, tl.where(has_max, col_argmax, -1), mask=store_mask)
            else:
                row_best = tl.maximum(row_best, tl.max(sim, axis=1))
                col_best = tl.max(sim_by_text, axis=1)
                beta = tl.load(beta_ptr + first_image_token + local_col, mask=image_in, other=0.0)
                image_term += tl.sum(beta[None, :] * tl.where(col_best > float("-inf"), col_best, 0.0), axis=1)
        has_row_max = row_best > float("-inf")
        row_value = tl.where(has_row_max, row_best, 0.0)
        if SAVE_MAXIMA:
            offsets = _pair_offsets(text_index, image, num_images, row_token, text_len)
            tl.store(row_max_ptr + offsets, row_value, mask=text_in)
            tl.store(row_argmax_ptr + offsets, tl.where(has_row_max, row_argmax, -1), mask=text_in)
        else:
            text_term = tl.sum(tl.reshape(alpha * row_value, [TEXTS_PER_TILE, BLOCK_T]), axis=1)
            tl.store(score_ptr + tl.cast(tile_texts, tl.int64) * num_images + image, 0.5 * (text_term + image_term),
                     mask=tile_texts < num_texts)


@triton.jit
def _maxsim_text_grad_kernel(grad_score_ptr, image_ptr, alpha_ptr, beta_ptr, row_max_ptr, row_argmax_ptr,
                             col_argmax_ptr, grad_text_ptr, grad_alpha_ptr,
                             num_texts, num_images, text_len, image_len, dim,
                             BLOCK_T: tl.constexpr, TEXTS_PER_TILE: tl.constexpr, BLOCK_V: tl.constexpr,
                             BLOCK_D_OUT: tl.constexpr, EVEN_D: tl.constexpr, ALIGNED: tl.constexpr,
                             SPLIT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """grad_text [Bt, T, D] (feature chunk ``program_id(1)``) and grad_alpha [Bt, T] (chunk 0) of a text block:
    Σ_b W_ab · Y[b] (token tiles outer, images inner, in order) and Σ_b ½·g[a,b]·row_max[a,b] (images in order).
    Grid (text blocks, D / BLOCK_D_OUT)."""
    ACC_DTYPE: tl.constexpr = alpha_ptr.dtype.element_ty
    ROWS: tl.constexpr = TEXTS_PER_TILE * BLOCK_T
    dim = _row_stride(dim, ALIGNED)
    text_block = tl.program_id(0)
    d_block = tl.program_id(1)
    row_token, text_index, text_in, first_token, local_token = _text_block(text_block, num_texts, text_len,
                                                                           BLOCK_T, TEXTS_PER_TILE)
    text_ok = text_index < num_texts
    alpha = tl.load(alpha_ptr + first_token + local_token, mask=text_in, other=0.0)
    tile_texts = text_block * TEXTS_PER_TILE + tl.arange(0, TEXTS_PER_TILE)
    tile_text_ok = tile_texts < num_texts
    d_out = d_block * BLOCK_D_OUT + tl.arange(0, BLOCK_D_OUT)

    if d_block == 0:
        grad_alpha = tl.zeros([ROWS], ACC_DTYPE)
        for image in range(0, num_images):
            half_grad = 0.5 * tl.load(grad_score_ptr + tl.cast(text_index, tl.int64) * num_images + image,
                                      mask=text_ok, other=0.0)
            row_max = tl.load(row_max_ptr + _pair_offsets(text_index, image, num_images, row_token, text_len),
                              mask=text_in, other=0.0)
            grad_alpha += half_grad * row_max
        tl.store(grad_alpha_ptr + first_token + local_token, grad_alpha, mask=text_in)

    grad_text = tl.zeros([ROWS, BLOCK_D_OUT], ACC_DTYPE)
    # Images innermost: everything per image changes every iteration, so nothing tile-sized is hoisted.
    for token_start in range(0, image_len, BLOCK_V):
        cols = token_start + tl.arange(0, BLOCK_V)
        image_in = cols < image_len
        local_col = tl.where(image_in, cols, 0)
        for image in range(0, num_images):
            first_image_token = tl.cast(image, tl.int64) * image_len
            half_grad = 0.5 * tl.load(grad_score_ptr + tl.cast(text_index, tl.int64) * num_images + image,
                                      mask=text_ok, other=0.0)
            text_half_grad = 0.5 * tl.load(grad_score_ptr + tl.cast(tile_texts, tl.int64) * num_images + image,
                                           mask=tile_text_ok, other=0.0)
            row_argmax = tl.load(row_argmax_ptr + _pair_offsets(text_index, image, num_images, row_token, text_len),
                                 mask=text_in, other=-1)
            col_argmax = tl.load(col_argmax_ptr + _pair_offsets(tile_texts[:, None], image, num_images,
                                                                cols[None, :], image_len),
                                 mask=tile_text_ok[:, None] & image_in[None, :], other=-1)
            beta = tl.load(beta_ptr + first_image_token + local_col, mask=image_in, other=0.0)
            weights = _one_hot_weights(row_argmax, half_grad * alpha, col_argmax,
                                       text_half_grad[:, None] * beta[None, :], cols, ROWS, BLOCK_T, TEXTS_PER_TILE,
                                       BLOCK_V)
            y_ptrs = (_row_pointer(image_ptr, first_image_token, dim, ALIGNED) + (local_col * dim)[:, None]
                      + d_out[None, :])  # [BLOCK_V, BLOCK_D_OUT]
            if EVEN_D:
                y = tl.load(y_ptrs)
            else:
                y = tl.load(y_ptrs, mask=(d_out < dim)[None, :], other=0.0)
            grad_text = _weighted_features(weights, y, grad_text, SPLIT, PRECISION, UPCAST)
    tl.store(_row_pointer(grad_text_ptr, first_token, dim, ALIGNED) + (local_token * dim)[:, None] + d_out[None, :],
             grad_text, mask=text_in[:, None] & (d_out < dim)[None, :])


@triton.jit
def _maxsim_image_grad_kernel(grad_score_ptr, text_ptr, alpha_ptr, beta_ptr, row_argmax_ptr, col_max_ptr,
                              col_argmax_ptr, grad_image_ptr, grad_beta_ptr,
                              num_texts, num_images, text_len, image_len, dim,
                              BLOCK_T: tl.constexpr, TEXTS_PER_TILE: tl.constexpr, BLOCK_V: tl.constexpr,
                              BLOCK_D_OUT: tl.constexpr, EVEN_D: tl.constexpr, ALIGNED: tl.constexpr,
                              SPLIT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                              ACCUMULATE: tl.constexpr):
    """grad_image [Bi, V, D] and grad_beta [Bi, V] (feature chunk 0) of one image's token tile: Σ over text blocks
    in order of W_abᵀ · X[a] and ½·g[a,b]·col_max[a,b]. Grid (Bi, V / BLOCK_V, D / BLOCK_D_OUT). ACCUMULATE
    continues the sums already in the outputs (the previous chunk of texts) in the same order."""
    ACC_DTYPE: tl.constexpr = alpha_ptr.dtype.element_ty
    dim = _row_stride(dim, ALIGNED)
    ROWS: tl.constexpr = TEXTS_PER_TILE * BLOCK_T
    image = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    image_in = cols < image_len
    local_col = tl.where(image_in, cols, 0)
    first_image_token = tl.cast(image, tl.int64) * image_len
    d_block = tl.program_id(2)
    d_out = d_block * BLOCK_D_OUT + tl.arange(0, BLOCK_D_OUT)
    beta = tl.load(beta_ptr + first_image_token + local_col, mask=image_in, other=0.0)
    beta_mask = image_in & (d_block == 0)
    out_rows_ptr = _row_pointer(grad_image_ptr, first_image_token, dim, ALIGNED)

    if ACCUMULATE:
        grad_image = tl.load(out_rows_ptr + (local_col * dim)[:, None] + d_out[None, :],
                             mask=image_in[:, None] & (d_out < dim)[None, :], other=0.0)
        grad_beta = tl.load(grad_beta_ptr + first_image_token + local_col, mask=beta_mask, other=0.0)
    else:
        grad_image = tl.zeros([BLOCK_V, BLOCK_D_OUT], ACC_DTYPE)
        grad_beta = tl.zeros([BLOCK_V], ACC_DTYPE)
    for text_block in range(0, tl.cdiv(num_texts, TEXTS_PER_TILE)):
        row_token, text_index, text_in, first_token, local_token = _text_block(text_block, num_texts, text_len,
                                                                               BLOCK_T, TEXTS_PER_TILE)
        tile_texts = text_block * TEXTS_PER_TILE + tl.arange(0, TEXTS_PER_TILE)
        alpha = tl.load(alpha_ptr + first_token + local_token, mask=text_in, other=0.0)
        half_grad = 0.5 * tl.load(grad_score_ptr + tl.cast(text_index, tl.int64) * num_images + image,
                                  mask=text_index < num_texts, other=0.0)
        row_argmax = tl.load(row_argmax_ptr + _pair_offsets(text_index, image, num_images, row_token, text_len),
                             mask=text_in, other=-1)
        col_offsets = _pair_offsets(tile_texts[:, None], image, num_images, cols[None, :], image_len)
        col_mask = (tile_texts < num_texts)[:, None] & image_in[None, :]
        col_argmax = tl.load(col_argmax_ptr + col_offsets, mask=col_mask, other=-1)
        text_half_grad = 0.5 * tl.load(grad_score_ptr + tl.cast(tile_texts, tl.int64) * num_images + image,
                                       mask=tile_texts < num_texts, other=0.0)
        weights = _one_hot_weights(row_argmax, half_grad * alpha, col_argmax, text_half_grad[:, None] * beta[None, :],
                                   cols, ROWS, BLOCK_T, TEXTS_PER_TILE, BLOCK_V)
        x_ptrs = (_row_pointer(text_ptr, first_token, dim, ALIGNED) + (local_token * dim)[:, None]
                  + d_out[None, :])  # [ROWS, BLOCK_D_OUT]
        if EVEN_D:
            x = tl.load(x_ptrs)
        else:
            x = tl.load(x_ptrs, mask=(d_out < dim)[None, :], other=0.0)
        grad_image = _weighted_features(tl.trans(weights), x, grad_image, SPLIT, PRECISION, UPCAST)
        # ½·g of each stacked text times its column maxima, one text at a time: the texts are summed in order
        # whatever the stacking.
        col_max = tl.load(col_max_ptr + col_offsets, mask=col_mask, other=0.0)
        for k in tl.static_range(TEXTS_PER_TILE):
            grad_beta += tl.sum(tl.where((tl.arange(0, TEXTS_PER_TILE) == k)[:, None],
                                         text_half_grad[:, None] * col_max, 0.0), axis=0)
    # The output tile's pointers and mask are formed here again: kept from the start, they would hold registers.
    tl.store(out_rows_ptr + (local_col * dim)[:, None] + d_out[None, :], grad_image,
             mask=image_in[:, None] & (d_out < dim)[None, :])
    tl.store(grad_beta_ptr + first_image_token + local_col, grad_beta, mask=beta_mask)


# ---------------------------------------------------------------------------------------------------------------
# Tile configuration
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Block sizes of the kernels (powers of two). ``block_t >= T``: a tile holds every token of its texts."""
    block_t: int  # text-token rows per text in a tile
    texts_per_tile: int  # texts stacked in one tile (tile rows = texts_per_tile * block_t)
    block_v: int  # image tokens per similarity tile
    block_d: int  # feature chunk of the similarity product
    images_per_program: int  # images one similarity program goes through
    num_warps: int  # of the similarity kernel (score or maxima)
    grad_block_v: int  # image tokens per tile of the gradient kernels
    block_d_out: int  # feature chunk of a gradient program
    grad_num_warps: int  # of the gradient kernels
    num_stages: int = 2


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# Per (tile rows, feature kind): (block_v, block_d, num_warps) of the similarity kernel and (grad_block_v,
# block_d_out, grad_num_warps) of the gradient kernels, chosen so that every kernel compiles for sm_90a without
# register spills (compile_specs; tests/test_compile_sm90.py). fp64 is not in that check; its tiles are halved.
_TILES = {
    (64, "half"): ((64, 64, 4), (64, 64, 8)),
    (128, "half"): ((64, 64, 8), (32, 64, 8)),
    (256, "half"): ((64, 64, 8), (16, 64, 8)),
    (64, "fp32"): ((64, 32, 4), (64, 32, 8)),
    (128, "fp32"): ((64, 32, 8), (32, 64, 8)),
    (256, "fp32"): ((32, 32, 8), (32, 32, 8)),
    (64, "fp64"): ((32, 16, 4), (32, 32, 8)),
    (128, "fp64"): ((16, 16, 8), (16, 32, 8)),
    (256, "fp64"): ((16, 16, 8), (16, 16, 8)),
}


def default_config(text_len: int, image_len: int, dim: int, dtype: torch.dtype) -> TileConfig:
    """The tiles for features of ``dtype``: a function of (T, V, D, dtype) only, never of the batch sizes.

    A tile holds every token of its texts (block_t = T rounded up to a power of two, at least 16), and short
    texts are stacked to 64 rows so that tl.dot has M >= 64 (a full wgmma on an H100).
    """
    block_t = max(16, _next_power_of_2(text_len))
    texts_per_tile = max(1, 64 // block_t)
    rows = texts_per_tile * block_t
    kind = "half" if dtype in _HALF_DTYPES else "fp64" if dtype == torch.float64 else "fp32"
    (block_v, block_d, num_warps), (grad_block_v, block_d_out, grad_num_warps) = _TILES[rows, kind]
    image_tokens = max(16, _next_power_of_2(image_len))
    features = max(16, _next_power_of_2(dim))
    return TileConfig(block_t=block_t, texts_per_tile=texts_per_tile, block_v=min(block_v, image_tokens),
                      block_d=min(block_d, features), images_per_program=8, num_warps=num_warps,
                      grad_block_v=min(grad_block_v, image_tokens), block_d_out=min(block_d_out, features),
                      grad_num_warps=grad_num_warps)


def _dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision for features of ``dtype``: exact products ("ieee") for fp32 and fp64, so that
    fp32 results agree with the C++ op to fp32 rounding (on an H100 "tf32x3" would be faster, at about 2^-21
    relative error per product). Half features are multiplied on the tensor cores, where it does not apply."""
    return "tf32" if dtype in _HALF_DTYPES else "ieee"


def _gradient_split(dtype: torch.dtype) -> int:
    """SPLIT of _weighted_features: 0 for fp32/fp64, 1 for bf16, 2 for fp16 features."""
    return {torch.bfloat16: 1, torch.float16: 2}.get(dtype, 0)


def _interpreted() -> bool:
    """True when the kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_maxsim_tile_kernel, InterpretedFunction)


def _upcast(dtype: torch.dtype) -> bool:
    """Whether tl.dot operands go to fp32 first: half features under the interpreter."""
    return dtype in _HALF_DTYPES and _interpreted()


def _aligned(dim: int, *features: torch.Tensor) -> bool:
    """ALIGNED of the kernels: D % 16 == 0 and every feature array 16-byte aligned, so every row is."""
    return dim % 16 == 0 and all(x.data_ptr() % 16 == 0 for x in features)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_limits(text: torch.Tensor, image: torch.Tensor) -> None:
    text_len, image_len, dim = text.shape[1], image.shape[1], text.shape[2]
    if text_len > MAX_TEXT_TOKENS:
        raise ValueError(f"text must have at most MAX_TEXT_TOKENS = {MAX_TEXT_TOKENS} tokens (text.shape[1]), "
                         f"got {text_len}")
    if image_len > MAX_IMAGE_TOKENS:
        raise ValueError(f"image must have at most MAX_IMAGE_TOKENS = {MAX_IMAGE_TOKENS} tokens (image.shape[1]), "
                         f"got {image_len}")
    if dim > MAX_DIM:
        raise ValueError(f"text and image must have a feature dimension of at most MAX_DIM = {MAX_DIM}, got {dim}")


def _resolve_config(config: TileConfig | None, text: torch.Tensor, image: torch.Tensor) -> TileConfig:
    text_len, image_len, dim = text.shape[1], image.shape[1], text.shape[2]
    config = config or default_config(text_len, image_len, dim, text.dtype)
    if config.block_t < text_len:
        raise ValueError(f"TileConfig.block_t = {config.block_t} must be at least the text length {text_len}")
    return config


# ---------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------

def _launch_tile_kernel(text, image, text_mask, image_mask, alpha, beta, config, score=None, maxima=None):
    """Runs _maxsim_tile_kernel: the score (``score`` [Bt, Bi]) or the maxima (``maxima`` = (row_max,
    row_argmax, col_max, col_argmax))."""
    num_texts, text_len, dim = text.shape
    num_images, image_len, _ = image.shape
    save_maxima = maxima is not None
    row_max, row_argmax, col_max, col_argmax = maxima if save_maxima else (score,) * 4  # unused ones: any tensor
    grid = (triton.cdiv(num_texts, config.texts_per_tile) * triton.cdiv(num_images, config.images_per_program),)
    _maxsim_tile_kernel[grid](
        text, image, text_mask.view(torch.uint8), image_mask.view(torch.uint8), alpha, beta,
        score if score is not None else row_max, row_max, row_argmax, col_max, col_argmax,
        num_texts, num_images, text_len, image_len, dim,
        BLOCK_T=config.block_t, TEXTS_PER_TILE=config.texts_per_tile, BLOCK_V=config.block_v,
        BLOCK_D=config.block_d, EVEN_D=dim % config.block_d == 0, ALIGNED=_aligned(dim, text, image),
        IMAGES_PER_PROGRAM=config.images_per_program,
        PRECISION=_dot_precision(text.dtype), UPCAST=_upcast(text.dtype), SAVE_MAXIMA=save_maxima,
        num_warps=config.num_warps, num_stages=config.num_stages)


def maxsim_forward(text: torch.Tensor, image: torch.Tensor, text_mask: torch.Tensor, image_mask: torch.Tensor,
                   alpha: torch.Tensor, beta: torch.Tensor, *, _config: TileConfig | None = None) -> torch.Tensor:
    """Fine-grained score of every text against every image (DESIGN §5).

    Args:
        text: ``[Bt, T, D]`` float32/float64/float16/bfloat16; image: ``[Bi, V, D]`` of the same dtype.
        text_mask, image_mask: bool ``[Bt, T]``, ``[Bi, V]``, True = valid token.
        alpha, beta: token coefficients ``[Bt, T]``, ``[Bi, V]`` in float32 (float64 for float64 features),
            0 on invalid tokens.
        _config: tile sizes (tests use small ones to reach every multi-tile path); None = default_config.

    Inputs are validated by the caller: contiguous, one device. Raises ValueError above MAX_TEXT_TOKENS,
    MAX_IMAGE_TOKENS or MAX_DIM.

    Returns:
        ``score [Bt, Bi]`` in float32 (float64 for float64 features).
    """
    _check_limits(text, image)
    num_texts, text_len, dim = text.shape
    num_images, image_len, _ = image.shape
    acc_dtype = _accumulation_dtype(text.dtype)
    score = torch.zeros((num_texts, num_images), dtype=acc_dtype, device=text.device)
    if score.numel() == 0 or text_len == 0 or image_len == 0 or dim == 0:
        return score  # no valid pair of tokens, or all similarities 0: every score is 0
    config = _resolve_config(_config, text, image)
    _launch_tile_kernel(text, image, text_mask, image_mask, alpha.to(acc_dtype), beta.to(acc_dtype), config,
                        score=score)
    return score


def _maxima_chunk(num_images: int, text_len: int, image_len: int) -> int:
    """Texts whose saved maxima (value and int32 index per row and column entry) fit MAXIMA_BUDGET_BYTES."""
    bytes_per_text = max(1, num_images * (text_len + image_len) * (8 + 4))
    return max(1, MAXIMA_BUDGET_BYTES // bytes_per_text)


def maxsim_backward(grad_score: torch.Tensor, text: torch.Tensor, image: torch.Tensor, text_mask: torch.Tensor,
                    image_mask: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, *,
                    _config: TileConfig | None = None, _max_texts_per_chunk: int | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of Σ grad_score·score w.r.t. the features and the token coefficients.

    Args:
        grad_score: ``[Bt, Bi]``; the other arguments as for :func:`maxsim_forward`.
        _config: tile sizes; None = default_config. _max_texts_per_chunk: cap on the texts whose maxima are
            saved at once (tests use it to reach the chunked path); None = from MAXIMA_BUDGET_BYTES.

    Returns:
        ``(grad_text [Bt, T, D], grad_image [Bi, V, D], grad_alpha [Bt, T], grad_beta [Bi, V])``; the feature
        gradients in float32 for half-precision features, else in the features' dtype, the coefficient
        gradients in the accumulation dtype (float32, float64 for float64 features). The gradient reaches only
        the arg-max entries (the lowest index on ties); invalid tokens get 0.
    """
    _check_limits(text, image)
    num_texts, text_len, dim = text.shape
    num_images, image_len, _ = image.shape
    acc_dtype = _accumulation_dtype(text.dtype)
    device = text.device
    grad_text = torch.zeros((num_texts, text_len, dim), dtype=acc_dtype, device=device)
    grad_image = torch.zeros((num_images, image_len, dim), dtype=acc_dtype, device=device)
    grad_alpha = torch.zeros((num_texts, text_len), dtype=acc_dtype, device=device)
    grad_beta = torch.zeros((num_images, image_len), dtype=acc_dtype, device=device)
    if num_texts == 0 or num_images == 0 or text_len == 0 or image_len == 0 or dim == 0:
        return grad_text, grad_image, grad_alpha, grad_beta  # no pair of tokens, or all similarities 0
    config = _resolve_config(_config, text, image)
    split, upcast = _gradient_split(text.dtype), _upcast(text.dtype)
    even_d = dim % config.block_d_out == 0
    aligned = _aligned(dim, text, image, grad_text, grad_image)
    grad_score = grad_score.to(acc_dtype).contiguous()
    alpha, beta = alpha.to(acc_dtype), beta.to(acc_dtype)
    chunk = _max_texts_per_chunk or _maxima_chunk(num_images, text_len, image_len)
    for start in range(0, num_texts, chunk):
        stop = min(start + chunk, num_texts)
        texts = slice(start, stop)
        count = stop - start
        maxima = (torch.empty((count, num_images, text_len), dtype=acc_dtype, device=device),
                  torch.empty((count, num_images, text_len), dtype=torch.int32, device=device),
                  torch.empty((count, num_images, image_len), dtype=acc_dtype, device=device),
                  torch.empty((count, num_images, image_len), dtype=torch.int32, device=device))
        row_max, row_argmax, col_max, col_argmax = maxima
        _launch_tile_kernel(text[texts], image, text_mask[texts], image_mask, alpha[texts], beta, config,
                            maxima=maxima)
        d_blocks = triton.cdiv(dim, config.block_d_out)
        _maxsim_text_grad_kernel[(triton.cdiv(count, config.texts_per_tile), d_blocks)](
            grad_score[texts], image, alpha[texts], beta, row_max, row_argmax, col_argmax, grad_text[texts],
            grad_alpha[texts], count, num_images, text_len, image_len, dim,
            BLOCK_T=config.block_t, TEXTS_PER_TILE=config.texts_per_tile, BLOCK_V=config.grad_block_v,
            BLOCK_D_OUT=config.block_d_out, EVEN_D=even_d, ALIGNED=aligned, SPLIT=split,
            PRECISION=_dot_precision(text.dtype), UPCAST=upcast, num_warps=config.grad_num_warps,
            num_stages=config.num_stages)
        _maxsim_image_grad_kernel[(num_images, triton.cdiv(image_len, config.grad_block_v), d_blocks)](
            grad_score[texts], text[texts], alpha[texts], beta, row_argmax, col_max, col_argmax, grad_image,
            grad_beta, count, num_images, text_len, image_len, dim,
            BLOCK_T=config.block_t, TEXTS_PER_TILE=config.texts_per_tile, BLOCK_V=config.grad_block_v,
            BLOCK_D_OUT=config.block_d_out, EVEN_D=even_d, ALIGNED=aligned, SPLIT=split,
            PRECISION=_dot_precision(text.dtype), UPCAST=upcast, ACCUMULATE=start > 0,
            num_warps=config.grad_num_warps, num_stages=config.num_stages)
    return grad_text, grad_image, grad_alpha, grad_beta


# ---------------------------------------------------------------------------------------------------------------
# Compile check
# ---------------------------------------------------------------------------------------------------------------

def _sizes_signature() -> dict[str, str]:
    return {"num_texts": "i32", "num_images": "i32", "text_len": "i32", "image_len": "i32", "dim": "i32"}


def _kernel_specs(text_len: int, image_len: int, dim: int, dtype: torch.dtype,
                  config: TileConfig | None = None) -> list[CompileSpec]:
    """The score, maxima and both gradient kernels of one shape, in ``config`` (None = default_config)."""
    config = config or default_config(text_len, image_len, dim, dtype)
    feature = _TRITON_POINTER_TYPES[dtype]
    acc = _TRITON_POINTER_TYPES[_accumulation_dtype(dtype)]
    tag = f"[T={text_len},V={image_len},D={dim},{str(dtype).removeprefix('torch.')}]"
    common = {"BLOCK_T": config.block_t, "TEXTS_PER_TILE": config.texts_per_tile, "ALIGNED": dim % 16 == 0,
              "PRECISION": _dot_precision(dtype), "UPCAST": False}
    tile_signature = {"text_ptr": feature, "image_ptr": feature, "text_mask_ptr": "*u8", "image_mask_ptr": "*u8",
                      "alpha_ptr": acc, "beta_ptr": acc, "score_ptr": acc, "row_max_ptr": acc,
                      "row_argmax_ptr": "*i32", "col_max_ptr": acc, "col_argmax_ptr": "*i32", **_sizes_signature()}
    grad = {**common, "BLOCK_V": config.grad_block_v, "BLOCK_D_OUT": config.block_d_out,
            "EVEN_D": dim % config.block_d_out == 0, "SPLIT": _gradient_split(dtype)}
    text_grad_signature = {"grad_score_ptr": acc, "image_ptr": feature, "alpha_ptr": acc, "beta_ptr": acc,
                           "row_max_ptr": acc, "row_argmax_ptr": "*i32", "col_argmax_ptr": "*i32",
                           "grad_text_ptr": acc, "grad_alpha_ptr": acc, **_sizes_signature()}
    image_grad_signature = {"grad_score_ptr": acc, "text_ptr": feature, "alpha_ptr": acc, "beta_ptr": acc,
                            "row_argmax_ptr": "*i32", "col_max_ptr": acc, "col_argmax_ptr": "*i32",
                            "grad_image_ptr": acc, "grad_beta_ptr": acc, **_sizes_signature()}
    kernels = [("maxsim_forward", _maxsim_tile_kernel, tile_signature, config.num_warps,
                {**common, "BLOCK_V": config.block_v, "BLOCK_D": config.block_d, "EVEN_D": dim % config.block_d == 0,
                 "IMAGES_PER_PROGRAM": config.images_per_program, "SAVE_MAXIMA": False}),
               ("maxsim_maxima", _maxsim_tile_kernel, tile_signature, config.num_warps,
                {**common, "BLOCK_V": config.block_v, "BLOCK_D": config.block_d, "EVEN_D": dim % config.block_d == 0,
                 "IMAGES_PER_PROGRAM": config.images_per_program, "SAVE_MAXIMA": True}),
               ("maxsim_text_grad", _maxsim_text_grad_kernel, text_grad_signature, config.grad_num_warps, grad),
               ("maxsim_image_grad", _maxsim_image_grad_kernel, image_grad_signature, config.grad_num_warps,
                {**grad, "ACCUMULATE": True})]
    return [CompileSpec(name + tag, kernel, {**signature, **{k: "constexpr" for k in constexprs}}, constexprs,
                        num_warps=num_warps, num_stages=config.num_stages)
            for name, kernel, signature, num_warps, constexprs in kernels]


COMPILE_SHAPES = ((32, 50, 512), (77, 197, 512), (256, 576, 1024))


def compile_specs() -> list[CompileSpec]:
    """Every kernel in representative configurations for the sm_90a spill check: (T, V, D) = (32, 50, 512),
    (77, 197, 512) and the limits (256, 576, 1024), in float32 and bfloat16."""
    return [spec for shape in COMPILE_SHAPES for dtype in (torch.float32, torch.bfloat16)
            for spec in _kernel_specs(*shape, dtype)]
