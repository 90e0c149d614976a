"""Result types shared by the public ops and the reference."""
from __future__ import annotations

from typing import NamedTuple

import torch


class BanzhafResult(NamedTuple):
    """interaction[B,T,V] (text token i × image token j), text_value[B,T], image_value[B,V]."""

    interaction: torch.Tensor
    text_value: torch.Tensor
    image_value: torch.Tensor


def empty_banzhaf_outputs(ref: torch.Tensor, batch: int, text_len: int, image_len: int,
                          dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uninitialised (interaction[B,T,V], text_value[B,T], image_value[B,V]) on ``ref``'s device: the shapes the
    Banzhaf ops' fake (tracing) implementations report."""
    return (ref.new_empty((batch, text_len, image_len), dtype=dtype), ref.new_empty((batch, text_len), dtype=dtype),
            ref.new_empty((batch, image_len), dtype=dtype))
