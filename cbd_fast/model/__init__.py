"""Model layer of cbd_fast: CLIP-style dual encoder with token outputs, WTI heads and prompt pools.

``create_model(model_cfg)`` builds a :class:`DualEncoder` from a nested config dict (see
:mod:`cbd_fast.model.config` for keys and defaults, ``MODEL_PRESETS`` for named sizes) and, when
``pretrained`` names a local OpenAI CLIP checkpoint, takes the sizes from it and loads its weights.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from .clip_checkpoint import ClipLoadReport, clip_architecture, load_openai_clip, read_clip_state_dict
from .config import (DEFAULT_MODEL_CONFIG, DEFAULT_PRESET, MODEL_PRESETS, check_model_config_keys,
                     resolve_model_config)
from .dual_encoder import DualEncoder, DualEncoderOutput, TokenFeatures, TokenWeightHead
from .image import ImageTower
from .prompts import PromptPool
from .text import TextTower
from .tokenizer import ClipTokenizer

__all__ = [
    "ClipLoadReport",
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
    "clip_architecture",
    "create_model",
    "load_openai_clip",
    "read_clip_state_dict",
    "resolve_model_config",
]


def create_model(model_cfg: Optional[Mapping[str, Any]] = None) -> DualEncoder:
    """Build a :class:`DualEncoder` from a (partial) model config dict.

    With ``pretrained: <path>`` the checkpoint is read once: its sizes define the architecture (explicit
    sizes must agree) and its weights are loaded; the load report is kept as ``model.load_report``.
    """
    model_cfg = dict(model_cfg or {})
    path = model_cfg.get("pretrained")
    if path is None:
        return DualEncoder(model_cfg)
    check_model_config_keys(model_cfg)  # fail before reading a large file
    state = read_clip_state_dict(path)
    cfg = resolve_model_config(model_cfg, checkpoint_arch=clip_architecture(state))
    model = DualEncoder(cfg)
    model.load_report = load_openai_clip(model, state)
    return model
