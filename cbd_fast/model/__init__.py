"""Model layer of cbd_fast: CLIP-style dual encoder with token outputs, WTI heads and prompt pools.

``create_model(model_cfg)`` builds a :class:`DualEncoder` from a nested config dict (see
:mod:`cbd_fast.model.config` for keys and defaults, ``MODEL_PRESETS`` for named sizes).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from .config import (DEFAULT_MODEL_CONFIG, DEFAULT_PRESET, MODEL_PRESETS, check_model_config_keys,
                     resolve_model_config)
from .dual_encoder import DualEncoder, DualEncoderOutput, TokenFeatures, TokenWeightHead
from .image import ImageTower
from .prompts import PromptPool
from .text import TextTower
from .tokenizer import ClipTokenizer

__all__ = [
    "ClipTokenizer",
    "DEFAULT_MODEL_CONFIG",
    "DEFAULT_PRESET",
    "DualEncoder",
    "DualEncoderOutput",
    "ImageTower",
    "MODEL_PRESETS",
    "PromptPool",
    "TextTower",
    "TokenFeatures",
    "TokenWeightHead",
    "check_model_config_keys",
    "create_model",
    "resolve_model_config",
]


def create_model(model_cfg: Optional[Mapping[str, Any]] = None) -> DualEncoder:
    """Build a :class:`DualEncoder` from a (partial) model config dict."""
    return DualEncoder(model_cfg)
