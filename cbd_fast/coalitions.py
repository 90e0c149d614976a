"""Random coalitions shared by every backend (DESIGN §4.2) and the exact enumeration.

``coalitions`` returns the raw Philox bits; a token is a member when its bit is set *and* it is valid.
"""
from __future__ import annotations

import torch

from ._checks import check_fits_in_memory
from ._ops import has_extension

_MASK32 = 0xFFFFFFFF
_PHILOX_MUL = (0xD2511F53, 0xCD9E8D57)
_PHILOX_WEYL = (0x9E3779B9, 0xBB67AE85)
MAX_EXACT_PLAYERS = 20


def _mulhilo32(constant: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of constant·x for int64 tensors holding uint32 values, without 64-bit overflow."""
    c_lo, c_hi = constant & 0xFFFF, constant >> 16
    low_part = x * c_lo  # < 2^48
    high_part = x * c_hi  # < 2^48
    partial = low_part + ((high_part & 0xFFFF) << 16)  # < 2^49
    lo = partial & _MASK32
    hi = (high_part >> 16) + (partial >> 32)
    return hi & _MASK32, lo


def philox4x32_10(counter: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """Philox4x32-10 on int64 tensors holding uint32 counter words; returns the four output words."""
    c0, c1, c2, c3 = counter
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi0, lo0 = _mulhilo32(_PHILOX_MUL[0], c0)
        hi1, lo1 = _mulhilo32(_PHILOX_MUL[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _PHILOX_WEYL[0]) & _MASK32
        k1 = (k1 + _PHILOX_WEYL[1]) & _MASK32
    return [c0, c1, c2, c3]


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    return seed


def _check_device(device) -> torch.device:
    if device is None:
        return torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be a torch.device or a device string such as 'cpu', got {device!r}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r}, but no CUDA device is available")
    return device


def seed_as_int64(seed: int) -> int:
    """The seed's 64 bits as a signed int64 (what the compiled ops take)."""
    seed = _check_seed(seed)
    return seed - 2**64 if seed >= 2**63 else seed


def _side_bits(draws: torch.Tensor, batch: int, length: int, side: int, seed: int) -> torch.Tensor:
    device = draws.device
    num_chunks = (length + 127) // 128
    k = draws.view(-1, 1, 1)
    b = torch.arange(batch, device=device, dtype=torch.int64).view(1, -1, 1)
    chunk = torch.arange(num_chunks, device=device, dtype=torch.int64).view(1, 1, -1)
    shape = (draws.numel(), batch, num_chunks)
    counter = [k.expand(shape), b.expand(shape), torch.full(shape, side, dtype=torch.int64, device=device),
               chunk.expand(shape)]
    words = torch.stack(philox4x32_10(counter, seed), dim=-1).reshape(draws.numel(), batch, num_chunks * 4)
    token = torch.arange(length, device=device)
    return ((words[..., token // 32] >> (token % 32)) & 1).bool()


def philox_coalitions(draw_start: int, draw_end: int, batch: int, text_len: int, image_len: int, seed: int,
                      device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Bits of draws ``[draw_start, draw_end)`` in plain PyTorch: (text_in[K',B,T], image_in[K',B,V]) bool."""
    draws = torch.arange(draw_start, draw_end, dtype=torch.int64, device=device)
    return (_side_bits(draws, batch, text_len, 0, seed), _side_bits(draws, batch, image_len, 1, seed))


def coalitions(batch: int, text_len: int, image_len: int, num_samples: int, seed: int = 0,
               device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The random coalitions every backend uses for ``seed``.

    Returns ``(text_in[K,B,T], image_in[K,B,V])`` bool, ``K = num_samples``: bit ``t`` of draw ``k``, pair ``b``
    comes from Philox4x32-10 with key (seed lo, seed hi) and counter ``(k, b, side, t // 128)`` (DESIGN §4.2).
    Computed by the compiled kernel when available (CPU or CUDA), else in plain PyTorch; the bits are identical.
    A result larger than the device's memory (``num_samples·batch·(text_len + image_len)`` bools) is refused with
    a ValueError before anything is allocated.
    """
    for name, value in (("batch", batch), ("text_len", text_len), ("image_len", image_len),
                        ("num_samples", num_samples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if num_samples >= 2**32 or batch >= 2**32:
        raise ValueError("num_samples and batch must be < 2**32 (they are 32-bit Philox counter words)")
    seed = _check_seed(seed)
    device = _check_device(device)
    size = num_samples * batch * (text_len + image_len)
    check_fits_in_memory("coalitions", f"the result (num_samples·batch·(text_len + image_len) = {size} bools)", size,
                         device, "ask for fewer num_samples or a smaller batch at a time")
    if has_extension() and (device.type == "cpu" or (device.type == "cuda" and _has_cuda_kernels())):
        text_in = torch.empty((num_samples, batch, text_len), dtype=torch.bool, device=device)
        image_in = torch.empty((num_samples, batch, image_len), dtype=torch.bool, device=device)
        torch.ops.cbd_fast.fill_coalitions(text_in, image_in, seed_as_int64(seed))
        return text_in, image_in
    return philox_coalitions(0, num_samples, batch, text_len, image_len, seed, device)


def _has_cuda_kernels() -> bool:
    from ._ops import has_cuda_kernels

    return has_cuda_kernels()


def exact_coalitions(draw_start: int, draw_end: int, text_mask: torch.Tensor,
                     image_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coalitions ``[draw_start, draw_end)`` of the exact enumeration (estimator="exact").

    Player ``p`` of pair ``b`` (valid text tokens in order, then valid image tokens) is in coalition ``k`` when
    bit ``p`` of ``k`` is set. With ``2**n_max`` draws every pair sees each of its ``2**n_b`` coalitions equally
    often, so averaging over the draws is the exact Banzhaf average. Returns (text_in[K',B,T], image_in[K',B,V]).
    """
    device = text_mask.device
    draws = torch.arange(draw_start, draw_end, dtype=torch.int64, device=device).view(-1, 1, 1)
    text_rank = torch.cumsum(text_mask.long(), dim=1) - 1  # player index of each valid text token
    image_rank = torch.cumsum(image_mask.long(), dim=1) - 1 + text_mask.long().sum(1, keepdim=True)
    text_in = ((draws >> text_rank.clamp_min(0).unsqueeze(0)) & 1).bool() & text_mask
    image_in = ((draws >> image_rank.clamp_min(0).unsqueeze(0)) & 1).bool() & image_mask
    return text_in, image_in


def num_exact_draws(text_mask: torch.Tensor, image_mask: torch.Tensor) -> int:
    """``2**n_max`` for the exact enumeration; raises when a pair has more than 20 players."""
    players = text_mask.sum(1) + image_mask.sum(1)
    n_max = int(players.max()) if players.numel() else 0
    if n_max > MAX_EXACT_PLAYERS:
        pair = int(players.argmax())
        raise ValueError(f"estimator='exact' enumerates 2**n coalitions and supports n <= {MAX_EXACT_PLAYERS} "
                         f"players per pair; pair {pair} has n={n_max} valid tokens (use 'paired')")
    return 2**n_max
