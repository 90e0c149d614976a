"""Loading OpenAI CLIP (ViT) checkpoints from a local file into :class:`DualEncoder`.

Nothing here downloads anything: ``path`` must already be on disk. Two formats are read:

- a TorchScript archive as released by OpenAI (``ViT-B-32.pt``): ``torch.jit.load(path).state_dict()``;
- a plain state dict saved with ``torch.save`` (optionally wrapped as ``{"state_dict": ...}`` and/or with a
  ``module.`` prefix from DataParallel), read with ``weights_only=True``.

Key layout of CLIP (ViT) and where each key goes::

    visual.conv1.weight                        -> visual.trunk.patch_embed.proj.weight (its bias set to 0)
    visual.class_embedding [w]                 -> visual.trunk.cls_token [1, 1, w]
    visual.positional_embedding [1+g*g, w]     -> visual.trunk.pos_embed [1, 1+g*g, w]
    visual.ln_pre                              -> visual.trunk.norm_pre
    visual.transformer.resblocks.N.<block>     -> visual.trunk.blocks.N.<block'>
    visual.ln_post                             -> visual.trunk.norm
    visual.proj [w, D]                         -> visual.proj.weight [D, w] (transposed)
    token_embedding.weight                     -> text.token_embedding.weight
    positional_embedding [L, w]                -> text.positional_embedding
    transformer.resblocks.N.<block>            -> text.blocks.N.<block'>
    ln_final                                   -> text.norm
    text_projection [w, D]                     -> text.proj.weight [D, w] (transposed)
    logit_scale                                -> logit_scale

with ``<block>`` -> ``<block'>``: ``ln_1`` -> ``norm1``, ``attn.in_proj_weight/bias`` -> ``attn.qkv.weight/bias``,
``attn.out_proj`` -> ``attn.proj``, ``ln_2`` -> ``norm2``, ``mlp.c_fc`` -> ``mlp.fc1``, ``mlp.c_proj`` -> ``mlp.fc2``.
"""
from __future__ import annotations

import logging
import os
import re
import warnings
import zipfile
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple, Union

import torch
from torch import nn

logger = logging.getLogger(__name__)

StateDict = Dict[str, torch.Tensor]
PathLike = Union[str, os.PathLike]

# Non-weight entries of OpenAI's archives (hyper-parameters stored as buffers).
IGNORED_KEYS = {"input_resolution", "context_length", "vocab_size"}

_BLOCK_RENAMES = (
    ("ln_1.", "norm1."),
    ("attn.in_proj_weight", "attn.qkv.weight"),
    ("attn.in_proj_bias", "attn.qkv.bias"),
    ("attn.out_proj.", "attn.proj."),
    ("ln_2.", "norm2."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
)
_VISUAL_BLOCK = re.compile(r"visual\.transformer\.resblocks\.(\d+)\.(.+)")
_TEXT_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")

_Transform = Callable[[torch.Tensor], torch.Tensor]
_SAME: _Transform = lambda t: t  # noqa: E731
_TRANSPOSE: _Transform = lambda t: t.t()  # noqa: E731

_DIRECT: Dict[str, Tuple[str, _Transform]] = {
    "visual.conv1.weight": ("visual.trunk.patch_embed.proj.weight", _SAME),
    "visual.class_embedding": ("visual.trunk.cls_token", lambda t: t.reshape(1, 1, -1)),
    "visual.positional_embedding": ("visual.trunk.pos_embed", lambda t: t.unsqueeze(0)),
    "visual.ln_pre.weight": ("visual.trunk.norm_pre.weight", _SAME),
    "visual.ln_pre.bias": ("visual.trunk.norm_pre.bias", _SAME),
    "visual.ln_post.weight": ("visual.trunk.norm.weight", _SAME),
    "visual.ln_post.bias": ("visual.trunk.norm.bias", _SAME),
    "visual.proj": ("visual.proj.weight", _TRANSPOSE),
    "token_embedding.weight": ("text.token_embedding.weight", _SAME),
    "positional_embedding": ("text.positional_embedding", _SAME),
    "ln_final.weight": ("text.norm.weight", _SAME),
    "ln_final.bias": ("text.norm.bias", _SAME),
    "text_projection": ("text.proj.weight", _TRANSPOSE),
    "logit_scale": ("logit_scale", lambda t: t.reshape(())),
}


class ClipLoadReport(NamedTuple):
    """What :func:`load_openai_clip` did. ``missing``: model entries the checkpoint did not provide (heads,
    prompts, ... keep their initialisation); ``unexpected``: checkpoint keys with no place in the model."""

    loaded: List[str]
    missing: List[str]
    unexpected: List[str]


def _is_torchscript_archive(path: PathLike) -> bool:
    # TorchScript zips hold compiled code and a constants table; torch.save zips hold only data.pkl + data/.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def read_clip_state_dict(path: PathLike) -> StateDict:
    """CLIP state dict (tensors on CPU) from a local TorchScript archive or ``torch.save`` file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CLIP checkpoint not found: {path} (weights are never downloaded)")
    if _is_torchscript_archive(path):
        with warnings.catch_warnings():
            # torch deprecates TorchScript, but OpenAI released CLIP as TorchScript archives.
            warnings.filterwarnings("ignore", category=FutureWarning)
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def _block_count(state: StateDict, pattern: re.Pattern) -> int:
    blocks = {int(m.group(1)) for m in map(pattern.fullmatch, state) if m}
    return max(blocks) + 1 if blocks else 0


def clip_architecture(state: StateDict) -> Dict[str, Any]:
    """Sizes of a CLIP ViT checkpoint, as a partial model config (no heads: CLIP does not store them).

    Returns ``{"embed_dim", "image": {img_size, patch_size, width, depth, mlp_ratio, pre_norm},
    "text": {context_length, width, depth, mlp_ratio}}``.
    """
    if "visual.conv1.weight" not in state:
        if any(k.startswith("visual.layer1.") for k in state):
            raise ValueError("this is a ResNet CLIP checkpoint; only ViT image towers are supported")
        raise ValueError("not a CLIP checkpoint: 'visual.conv1.weight' is missing")
    required = ["visual.positional_embedding", "visual.proj", "text_projection", "positional_embedding",
                "token_embedding.weight", "ln_final.weight"]
    absent = [k for k in required if k not in state]
    if absent:
        raise ValueError(f"CLIP checkpoint lacks {', '.join(absent)}")
    conv = state["visual.conv1.weight"]
    width, patch = conv.shape[0], conv.shape[-1]
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    text_width = state["ln_final.weight"].shape[0]
    arch = {
        "embed_dim": int(state["text_projection"].shape[1]),
        "image": {"img_size": int(grid * patch), "patch_size": int(patch), "width": int(width),
                  "depth": _block_count(state, _VISUAL_BLOCK), "pre_norm": True},
        "text": {"context_length": int(state["positional_embedding"].shape[0]), "width": int(text_width),
                 "depth": _block_count(state, _TEXT_BLOCK)},
    }
    fc = state.get("visual.transformer.resblocks.0.mlp.c_fc.weight")
    if fc is not None:
        arch["image"]["mlp_ratio"] = fc.shape[0] / width
    fc = state.get("transformer.resblocks.0.mlp.c_fc.weight")
    if fc is not None:
        arch["text"]["mlp_ratio"] = fc.shape[0] / text_width
    if state["visual.proj"].shape[1] != arch["embed_dim"]:
        raise ValueError(f"visual.proj maps to {state['visual.proj'].shape[1]} dims, text_projection to "
                         f"{arch['embed_dim']}")
    return arch


def _target(key: str) -> Optional[Tuple[str, _Transform]]:
    if key in _DIRECT:
        return _DIRECT[key]
    for pattern, prefix in ((_VISUAL_BLOCK, "visual.trunk.blocks"), (_TEXT_BLOCK, "text.blocks")):
        match = pattern.fullmatch(key)
        if match:
            rest = match.group(2)
            for old, new in _BLOCK_RENAMES:
                if rest.startswith(old):
                    return f"{prefix}.{match.group(1)}.{new}{rest[len(old):]}", _SAME
            return None
    return None


def load_openai_clip(model: nn.Module, checkpoint: Union[PathLike, StateDict]) -> ClipLoadReport:
    """Copy an OpenAI CLIP (ViT) checkpoint into a :class:`DualEncoder` built with matching sizes.

    Args:
        model: the DualEncoder (its ``image.pre_norm`` must be true: CLIP has ``ln_pre``).
        checkpoint: a local path (TorchScript archive or state dict file) or an already read state dict.

    Shape mismatches raise ``ValueError`` listing all of them. Entries the checkpoint lacks (WTI heads,
    prompts, keys) keep their initialisation and are reported in ``missing``; the patch-embedding bias,
    absent from CLIP's bias-free convolution, is set to zero and counts as loaded. Values are cast to the
    model's dtype (OpenAI's archives are half precision).
    """
    state = read_clip_state_dict(checkpoint) if not isinstance(checkpoint, dict) else checkpoint
    own = model.state_dict()
    if "visual.trunk.norm_pre.weight" not in own and "visual.ln_pre.weight" in state:
        raise ValueError("CLIP has ln_pre: build the image tower with image.pre_norm = true")
    updates: Dict[str, torch.Tensor] = {}
    unexpected, mismatched = [], []
    for key, value in state.items():
        if key in IGNORED_KEYS:
            continue
        target = _target(key)
        if target is None or target[0] not in own:
            unexpected.append(key)
            continue
        name, transform = target
        value = transform(value)
        if value.shape != own[name].shape:
            mismatched.append(f"{key} {tuple(value.shape)} -> {name} {tuple(own[name].shape)}")
            continue
        updates[name] = value
    if mismatched:
        raise ValueError("CLIP checkpoint does not fit the model: " + "; ".join(mismatched))
    patch_bias = "visual.trunk.patch_embed.proj.bias"
    if patch_bias in own and "visual.trunk.patch_embed.proj.weight" in updates:
        updates[patch_bias] = torch.zeros_like(own[patch_bias])  # CLIP's conv1 has no bias
    with torch.no_grad():
        for name, value in updates.items():
            own[name].copy_(value.to(dtype=own[name].dtype))  # state_dict tensors share storage
    missing = [name for name in own if name not in updates]
    report = ClipLoadReport(sorted(updates), missing, unexpected)
    logger.info("loaded %d CLIP tensors; %d model entries kept their initialisation (%s); unexpected: %s",
                len(report.loaded), len(missing), ", ".join(missing) or "none", ", ".join(unexpected) or "none")
    return report
