"""Result types shared by the public ops and the reference."""
from __future__ import annotations

from typing import NamedTuple

import torch


class BanzhafResult(NamedTuple):
    """interaction[B,T,V] (text token i × image token j), text_value[B,T], image_value[B,V]."""

    interaction: torch.Tensor
    text_value: torch.Tensor
    image_value: torch.Tensor
