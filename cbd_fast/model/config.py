"""Model configuration as data: defaults, presets, merging and validation.

A model config is a nested dict (YAML-friendly). Keys and defaults::

    preset: null                 # name in MODEL_PRESETS; null = "vit_b32" (or the checkpoint's sizes)
    embed_dim: <preset>          # joint embedding size D
    image:
      img_size: <preset>
      patch_size: <preset>
      width: <preset>
      depth: <preset>
      heads: <preset>
      mlp_ratio: 4.0
      act: quick_gelu            # quick_gelu (OpenAI CLIP) | gelu
      pre_norm: true             # LayerNorm before the blocks (CLIP's ln_pre)
    text:
      context_length: <preset>
      width: <preset>
      depth: <preset>
      heads: <preset>
      mlp_ratio: 4.0
      act: quick_gelu
    prompts:
      enabled: true
      pool_size: 10              # slots = maximal number of tasks
      length: 5                  # prompt tokens per slot and tower
    weight_head_hidden: null     # hidden size of the WTI weight MLPs; null = embed_dim
    init_temperature: 0.07       # logit_scale starts at log(1 / init_temperature)
    pretrained: null             # path of an OpenAI CLIP checkpoint (TorchScript or state dict)

With ``pretrained``, the architecture is read from the checkpoint; sizes named explicitly (directly or via
``preset``) must agree with it. Attention heads are not stored in CLIP checkpoints: they default to
``width // 64`` (CLIP's rule) unless given.
"""
from __future__ import annotations

import copy
import os
from typing import Any, Dict, List, Mapping, Optional

DEFAULT_PRESET = "vit_b32"

DEFAULT_MODEL_CONFIG: Dict[str, Any] = {
    "preset": None,
    "embed_dim": None,
    "image": {"img_size": None, "patch_size": None, "width": None, "depth": None, "heads": None,
              "mlp_ratio": 4.0, "act": "quick_gelu", "pre_norm": True},
    "text": {"context_length": None, "width": None, "depth": None, "heads": None,
             "mlp_ratio": 4.0, "act": "quick_gelu"},
    "prompts": {"enabled": True, "pool_size": 10, "length": 5},
    "weight_head_hidden": None,
    "init_temperature": 0.07,
    "pretrained": None,
}

MODEL_PRESETS: Dict[str, Dict[str, Any]] = {
    # CPU-sized model for tests and smoke runs.
    "tiny": {
        "embed_dim": 64,
        "image": {"img_size": 32, "patch_size": 8, "width": 64, "depth": 2, "heads": 4},
        "text": {"context_length": 32, "width": 64, "depth": 2, "heads": 4},
    },
    # OpenAI CLIP ViT-B/32 (the CBD paper's backbone).
    "vit_b32": {
        "embed_dim": 512,
        "image": {"img_size": 224, "patch_size": 32, "width": 768, "depth": 12, "heads": 12},
        "text": {"context_length": 77, "width": 512, "depth": 12, "heads": 8},
    },
    # OpenAI CLIP ViT-B/16.
    "vit_b16": {
        "embed_dim": 512,
        "image": {"img_size": 224, "patch_size": 16, "width": 768, "depth": 12, "heads": 12},
        "text": {"context_length": 77, "width": 512, "depth": 12, "heads": 8},
    },
}

ACTIVATIONS = ("quick_gelu", "gelu")
# Sizes a CLIP checkpoint determines (heads and activation are not stored in it).
CHECKPOINT_ARCH_KEYS = ("embed_dim", "image.img_size", "image.patch_size", "image.width", "image.depth",
                        "image.mlp_ratio", "image.pre_norm", "text.context_length", "text.width", "text.depth",
                        "text.mlp_ratio")


def _unknown_keys(given: Mapping[str, Any], schema: Mapping[str, Any], prefix: str = "") -> List[str]:
    unknown = []
    for key, value in given.items():
        name = f"{prefix}{key}"
        if key not in schema:
            unknown.append(name)
        elif isinstance(schema[key], dict):
            if not isinstance(value, Mapping):
                raise ValueError(f"model config key '{name}' must be a mapping, got {type(value).__name__}")
            unknown += _unknown_keys(value, schema[key], name + ".")
    return unknown


def _merge(base: Dict[str, Any], override: Mapping[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _get(cfg: Mapping[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _set(cfg: Dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = cfg
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def _validate(cfg: Dict[str, Any]) -> None:
    problems = []

    def positive_int(name: str) -> None:
        value = _get(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"{name} must be a positive int, got {value!r}")

    for name in ("embed_dim", "image.img_size", "image.patch_size", "image.width", "image.depth", "image.heads",
                 "text.context_length", "text.width", "text.depth", "text.heads", "prompts.pool_size",
                 "prompts.length"):
        positive_int(name)
    if cfg["weight_head_hidden"] is not None:
        positive_int("weight_head_hidden")
    for tower in ("image", "text"):
        width, heads = cfg[tower]["width"], cfg[tower]["heads"]
        if isinstance(width, int) and isinstance(heads, int) and heads > 0 and width % heads:
            problems.append(f"{tower}.width {width} is not divisible by {tower}.heads {heads}")
        if cfg[tower]["act"] not in ACTIVATIONS:
            problems.append(f"{tower}.act must be one of {ACTIVATIONS}, got {cfg[tower]['act']!r}")
        ratio = cfg[tower]["mlp_ratio"]
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio <= 0:
            problems.append(f"{tower}.mlp_ratio must be a positive number, got {ratio!r}")
    img, patch = cfg["image"]["img_size"], cfg["image"]["patch_size"]
    if isinstance(img, int) and isinstance(patch, int) and patch > 0 and img % patch:
        problems.append(f"image.img_size {img} is not a multiple of image.patch_size {patch}")
    if isinstance(cfg["text"]["context_length"], int) and cfg["text"]["context_length"] < 2:
        problems.append("text.context_length must be >= 2 (start and end tokens)")
    for name in ("image.pre_norm", "prompts.enabled"):
        if not isinstance(_get(cfg, name), bool):
            problems.append(f"{name} must be true or false, got {_get(cfg, name)!r}")
    temperature = cfg["init_temperature"]
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature <= 0:
        problems.append(f"init_temperature must be a positive number, got {temperature!r}")
    if cfg["pretrained"] is not None and not isinstance(cfg["pretrained"], (str, os.PathLike)):
        problems.append(f"pretrained must be a path or null, got {cfg['pretrained']!r}")
    if problems:
        raise ValueError("invalid model config: " + "; ".join(problems))


def check_model_config_keys(model_cfg: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming every unknown key (dotted) of ``model_cfg``, or an unknown preset."""
    unknown = _unknown_keys(model_cfg, DEFAULT_MODEL_CONFIG)
    if unknown:
        raise ValueError(f"unknown model config keys: {', '.join(unknown)} "
                         f"(known: {', '.join(_known_names(DEFAULT_MODEL_CONFIG))})")
    preset = model_cfg.get("preset")
    if preset is not None and preset not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; available: {', '.join(MODEL_PRESETS)}")


def resolve_model_config(model_cfg: Optional[Mapping[str, Any]] = None,
                         checkpoint_arch: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Full, validated model config: defaults <- preset (or checkpoint sizes) <- ``model_cfg``.

    Args:
        model_cfg: partial nested config (see the module docstring); unknown keys raise ``ValueError``
            naming them.
        checkpoint_arch: sizes read from a checkpoint (``{"embed_dim": .., "image": {..}, "text": {..}}``,
            keys among ``CHECKPOINT_ARCH_KEYS``). They take the place of the preset; sizes given explicitly
            must agree with them.
    """
    model_cfg = dict(model_cfg or {})
    check_model_config_keys(model_cfg)
    preset = model_cfg.get("preset")

    if checkpoint_arch is None:
        cfg = _merge(_merge(DEFAULT_MODEL_CONFIG, MODEL_PRESETS[preset or DEFAULT_PRESET]), model_cfg)
    else:
        explicit = _merge(MODEL_PRESETS[preset], model_cfg) if preset is not None else model_cfg
        conflicts = []
        for name in CHECKPOINT_ARCH_KEYS:
            given, found = _get(explicit, name), _get(checkpoint_arch, name)
            if given is not None and found is not None and given != found:
                conflicts.append(f"{name}: config {given!r}, checkpoint {found!r}")
        if conflicts:
            raise ValueError("model config disagrees with the checkpoint: " + "; ".join(conflicts))
        cfg = _merge(_merge(DEFAULT_MODEL_CONFIG, explicit), checkpoint_arch)
        for tower in ("image", "text"):
            if _get(explicit, f"{tower}.heads") is None:  # CLIP's rule: 64-dimensional heads
                _set(cfg, f"{tower}.heads", max(1, cfg[tower]["width"] // 64))
    _validate(cfg)
    return cfg


def _known_names(schema: Mapping[str, Any], prefix: str = "") -> List[str]:
    names = []
    for key, value in schema.items():
        names += _known_names(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]
    return names
