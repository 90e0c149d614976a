"""Run configuration: YAML files as data, defaults, dotted ``key=value`` overrides, strict key checking."""
from __future__ import annotations

import copy
import importlib.resources
import pathlib
from typing import Any

import yaml

# Every key a run understands, with its default. Sections owned by other modules (model, data) are validated there.
DEFAULTS: dict[str, Any] = {
    "name": "default",
    "seed": 0,
    "device": "auto",  # auto | cpu | cuda | cuda:N
    "output_dir": "runs",
    "model": {"preset": "tiny"},
    "data": {"scenario": "synthetic", "num_tasks": 3},
    "train": {
        "epochs": 6,
        "batch_size": 32,
        "lr": 1.0e-3,
        "weight_decay": 0.05,
        "warmup_steps": 20,
        "grad_clip": 1.0,
        "bf16": "auto",  # autocast to bf16 on GPU
        "prompt_query": "old_model",  # prompt-pool queries from the frozen previous-task model, or "prompt_free"
        "replay": {"strategy": "reservoir", "size": 128, "batch_size": 16},  # strategy: reservoir | per_task | none
    },
    "loss": {
        "method": "cbd",  # cbd | finetune (finetune turns every distillation term off)
        "sample": 1.0,  # λ_s
        "sample_temperature": 0.05,
        "token": 1.0,  # λ_tok
        "token_kind": "mse",  # mse | kl
        "token_temperature": 0.1,
        "banzhaf": 1.0,  # λ_bz
        "banzhaf_source": "estimator",  # estimator | module
        "banzhaf_samples": 64,
        "banzhaf_estimator": "paired",
        "banzhaf_temperature": 0.01,
        "module_hidden": 32,
        "prompt": 0.1,  # λ_p
    },
    # DESIGN §7: every caption of a test image is a query (all | first); cumulative: also retrieve within the
    # test sets of all tasks seen so far (per-task galleries are always evaluated)
    "eval": {"batch_size": 128, "prompt_selection": "key", "plot_metric": "mean_R@1", "captions": "all",
             "cumulative": True},
}


def _merge(base: dict, update: dict, path: str, strict_sections: tuple[str, ...]) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        where = f"{path}{key}"
        if key not in base and path.rstrip(".") in strict_sections:
            raise KeyError(f"unknown config key '{where}'; known keys in '{path.rstrip('.') or 'top level'}': "
                           f"{sorted(base)}")
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            out[key] = _merge(base[key], value, f"{where}.", strict_sections)
        else:
            out[key] = _coerce(where, base.get(key), copy.deepcopy(value))
    return out


def _coerce(where: str, default, value):
    """Numbers stay numbers: YAML 1.1 reads ``2e-3`` as a string, so a numeric key accepts numeric strings."""
    numeric_default = isinstance(default, (int, float)) and not isinstance(default, bool)
    if numeric_default and isinstance(value, str):
        try:
            value = float(value) if isinstance(default, float) or any(c in value for c in ".eE") else int(value)
        except ValueError:
            raise ValueError(f"config key '{where}' must be a number, got {value!r}") from None
    if numeric_default and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(f"config key '{where}' must be a number, got {value!r}")
    return value


STRICT_SECTIONS = ("", "train", "train.replay", "loss", "eval")


def resolve(user: dict | None = None, overrides: list[str] | None = None) -> dict:
    """Defaults ← user config ← ``key=value`` overrides (dotted keys, YAML values). Unknown keys raise."""
    config = _merge(DEFAULTS, user or {}, "", STRICT_SECTIONS)
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override must look like key=value (dotted keys allowed), got {item!r}")
        dotted, raw = item.split("=", 1)
        value = yaml.safe_load(raw)
        nested: dict = {}
        cursor = nested
        keys = dotted.strip().split(".")
        for key in keys[:-1]:
            cursor = cursor.setdefault(key, {})
        cursor[keys[-1]] = value
        config = _merge(config, nested, "", STRICT_SECTIONS)
    return config


def load_yaml(path: str | pathlib.Path) -> dict:
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    with path.open() as handle:
        data = yaml.safe_load(handle) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config must be a YAML mapping, got {type(data).__name__}")
    return data


def builtin_config(name: str) -> dict:
    """A config shipped with the package (``configs/<name>.yaml``, installed as ``cbd_fast.configs``)."""
    resource = importlib.resources.files("cbd_fast.configs").joinpath(f"{name}.yaml")
    if not resource.is_file():
        raise FileNotFoundError(f"no built-in config named {name!r}")
    return yaml.safe_load(resource.read_text()) or {}
