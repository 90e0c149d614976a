"""Loading OpenAI CLIP (ViT) checkpoints from a local file into :class:`DualEncoder`.

Nothing here downloads anything: ``path`` must already be on disk, and nothing in the file is ever run. Two
formats are read:

- a TorchScript archive as released by OpenAI (``ViT-B-32.pt``). ``torch.jit.load`` would compile and run the
  archive's code (a crafted archive's ``__setstate__`` can write files), so it is not used: the archive is a zip
  whose ``data.pkl`` pickles the module tree, and :func:`read_torchscript_tensors` unpickles it with a restricted
  unpickler that rebuilds tensors and records every TorchScript object's attributes as plain data, refusing any
  other global;
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
import pickle
import re
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


class _ScriptObject:
    """Stands in for an instance of a class defined by a TorchScript archive's code (``__torch__.*``): keeps the
    pickled state as data and runs none of the archive's code."""

    def __init__(self, *args: Any):
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


# Storage classes named in the pickle's persistent ids, and the dtype each stands for.
_STORAGE_DTYPES = {
    "HalfStorage": torch.float16, "FloatStorage": torch.float32, "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
# The only callables a TorchScript data.pkl may name: tensor rebuilding, plus TorchScript's typed-container tags.
_ALLOWED_GLOBALS: Dict[Tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("collections", "OrderedDict"): dict,
    ("torch.jit._pickle", "restore_type_tag"): lambda value, type_name: value,
    ("torch.jit._pickle", "build_intlist"): list,
    ("torch.jit._pickle", "build_doublelist"): list,
    ("torch.jit._pickle", "build_boollist"): list,
    ("torch.jit._pickle", "build_tensorlist"): list,
}


class _StorageType:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class _TensorUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript ``data.pkl``: tensors from the archive's ``data/`` records, ``__torch__``
    objects as :class:`_ScriptObject`; any other global is refused."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str, path: PathLike):
        super().__init__(archive.open(f"{prefix}data.pkl"))
        self.archive, self.prefix, self.path = archive, prefix, path
        self.storages: Dict[str, Any] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            return _ScriptObject
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        raise ValueError(f"{self.path}: the TorchScript archive refers to {module}.{name}, which is not part of "
                         f"a tensor; refusing to read it (only weights are read from archives, no code runs)")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise ValueError(f"{self.path}: unexpected record {pid!r} in the TorchScript archive")
        _, storage_type, key, _location, numel = pid
        if key not in self.storages:
            raw = bytearray(self.archive.read(f"{self.prefix}data/{key}"))
            itemsize = torch.empty((), dtype=storage_type.dtype).element_size()
            if len(raw) != numel * itemsize:
                raise ValueError(f"{self.path}: record data/{key} holds {len(raw)} bytes, expected {numel * itemsize}")
            untyped = torch.frombuffer(raw, dtype=torch.uint8).untyped_storage() if raw else torch.UntypedStorage(0)
            self.storages[key] = torch.storage.TypedStorage(wrap_storage=untyped, dtype=storage_type.dtype,
                                                            _internal=True)
        return self.storages[key]


def _named_tensors(state: Any, prefix: str, out: StateDict) -> None:
    """Tensors among the attributes of a module tree of :class:`_ScriptObject`, with dotted names."""
    if isinstance(state, _ScriptObject):
        state = state.state
    if not isinstance(state, dict):
        return  # an object with custom __getstate__: no attribute names to go by
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            out[f"{prefix}{key}"] = value.detach()
        elif isinstance(value, (_ScriptObject, dict)):
            _named_tensors(value, f"{prefix}{key}.", out)


def read_torchscript_tensors(path: PathLike) -> StateDict:
    """Every tensor attribute (parameters and buffers) of the module tree in a TorchScript archive, by dotted
    name as ``state_dict()`` names them, read without compiling or running any of the archive's code."""
    with zipfile.ZipFile(path) as archive:
        roots = [name for name in archive.namelist() if name.endswith("/data.pkl") and name.count("/") == 1]
        if len(roots) != 1:
            raise ValueError(f"{path}: expected one <name>/data.pkl in the TorchScript archive, found {roots}")
        unpickler = _TensorUnpickler(archive, roots[0][:-len("data.pkl")], path)
        try:
            root = unpickler.load()
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError, AttributeError, RuntimeError) as exc:
            raise ValueError(f"{path}: unreadable TorchScript archive ({type(exc).__name__}: {exc})") from None
    tensors: StateDict = {}
    _named_tensors(root, "", tensors)
    return tensors


def read_clip_state_dict(path: PathLike) -> StateDict:
    """CLIP state dict (tensors on CPU) from a local TorchScript archive or ``torch.save`` file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CLIP checkpoint not found: {path} (weights are never downloaded)")
    if _is_torchscript_archive(path):
        state = read_torchscript_tensors(path)
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
