"""Run configuration: one file of defaults, a user's YAML file over it, dotted ``key=value`` overrides over that.

``configs/default.yaml`` (installed as ``cbd_fast.configs``) is the only source of defaults and lists every key.
:func:`resolve` merges a user's config and the command-line overrides over it and checks every key of the run
sections (name, type, range): errors are :class:`ConfigError` naming the key and what was expected. The
``model`` and ``data`` sections are checked by their own modules when the run is built.

Merging is key by key, with one exception: naming another scenario (``data.scenario``, or a scenario file as
``data: path.yaml``) or another architecture (``model.preset``, ``model.pretrained``) starts that section afresh
from what is given, since the old section's keys belong to the old scenario or architecture. Overrides apply
whole sections before single keys, so ``data=my_scenario.yaml data.num_tasks=3`` reads the file, then changes
``num_tasks``, in either order.

This module imports torch only to check a method's arguments (:func:`resolve`), so ``cbd-train --help`` answers
at once.
"""
from __future__ import annotations

import copy
import difflib
import hashlib
import importlib.resources
import json
import math
import pathlib
import re
import warnings
from typing import Any, Callable

import yaml

from .errors import InputError


class ConfigError(InputError, ValueError):
    """A configuration that cannot be used as written; the message names the key and what was expected."""


class ConfigWarning(UserWarning):
    """A configuration that runs, but probably not as intended."""


def load_yaml(path: str | pathlib.Path, what: str = "config file") -> dict:
    """A YAML file holding a mapping (``{}`` when empty)."""
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with path.open(encoding="utf-8-sig") as handle:
            data = yaml.safe_load(handle)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable YAML file ({exc})".replace("\n", " ")) from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a {what} must be a YAML mapping of keys, got {type(data).__name__}")
    return data


def _builtin(relative: str):
    return importlib.resources.files("cbd_fast.configs").joinpath(relative)


def builtin_config(name: str) -> dict:
    """A config shipped with the package (``configs/<name>.yaml``, installed as ``cbd_fast.configs``)."""
    resource = _builtin(f"{name}.yaml")
    if not resource.is_file():
        raise FileNotFoundError(f"no built-in config named {name!r}")
    return yaml.safe_load(resource.read_text(encoding="utf-8")) or {}


def builtin_scenarios() -> list[str]:
    """Names of the scenario files shipped in ``configs/scenarios/``."""
    return sorted(entry.name[:-len(".yaml")] for entry in _builtin("scenarios").iterdir()
                  if entry.name.endswith(".yaml"))


def load_scenario(path: str | pathlib.Path) -> dict:
    """A scenario file's mapping; a name of a shipped scenario (``synthetic5``) also works."""
    file = pathlib.Path(path).expanduser()
    if not file.is_file() and str(path).removesuffix(".yaml") in builtin_scenarios():
        return builtin_config(f"scenarios/{str(path).removesuffix('.yaml')}")
    if not file.is_file():
        raise FileNotFoundError(f"scenario file not found: {file} (built-in scenarios: "
                                f"{', '.join(builtin_scenarios())})")
    return load_yaml(file, "scenario file")


DEFAULTS: dict[str, Any] = builtin_config("default")
# Sections whose keys are all listed in configs/default.yaml (model and data are checked by their own modules).
STRICT_SECTIONS = ("", "train", "train.replay", "eval", "logging")  # method_args: checked per method (cbd_fast.methods)
# Keys that pick what the rest of a section means: naming another value starts the section afresh.
_SECTION_KINDS = {"data": ("scenario",), "model": ("preset", "pretrained")}
_SECTION_DEFAULT_KIND = {"data": {"scenario": "synthetic"}, "model": {}}
# Keys of the data section that belong to the loader, not the scenario: they stay when the scenario changes.
LOADER_KEYS = ("workers",)


def _unknown_key(where: str, key: str, known) -> ConfigError:
    section = where.rpartition(".")[0]
    close = [f"{section + '.' if section else ''}{match}" for match in
             difflib.get_close_matches(key, [str(k) for k in known], n=1)]
    # a key of another section, e.g. lr=... for train.lr=...
    close = close or [dotted for dotted in leaf_keys(DEFAULTS) if dotted.rpartition(".")[2] == key][:1]
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    section = section or "the top level"
    return ConfigError(f"unknown config key '{where}'{hint}; keys in {section}: {', '.join(map(str, known))}")


def _restarts(section: str, base: dict, update: dict) -> bool:
    defaults = _SECTION_DEFAULT_KIND[section]
    return any(key in update and update[key] != base.get(key, defaults.get(key)) for key in _SECTION_KINDS[section])


def _merge_kinded(section: str, base: Any, value: Any) -> dict:
    """``data`` / ``model``: a scenario file is read; another scenario or architecture replaces the section."""
    loader = {key: base[key] for key in LOADER_KEYS if section == "data" and isinstance(base, dict) and key in base}
    if section == "data" and isinstance(value, (str, pathlib.PurePath)):
        return {**load_scenario(value), **loader}
    if not isinstance(value, dict):
        raise ConfigError(f"config key '{section}' must be a mapping of keys"
                          + (" or a scenario file" if section == "data" else "") + f", got {value!r}")
    if not isinstance(base, dict) or _restarts(section, base, value):
        return {**loader, **copy.deepcopy(value)}
    return _merge(base, value, f"{section}.")


def _merge(base: dict, update: dict, path: str) -> dict:
    out = copy.deepcopy(base)
    strict = path.rstrip(".") in STRICT_SECTIONS
    for key, value in update.items():
        where = f"{path}{key}"
        if where in _SECTION_KINDS:
            out[key] = _merge_kinded(where, base.get(key), value)
        elif strict and key not in base:
            raise _unknown_key(where, str(key), base)
        elif isinstance(base.get(key), dict) and strict:
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{where}' is a section: give a mapping of its keys "
                                  f"({', '.join(base[key])}), got {value!r}")
            out[key] = _merge(base[key], value, f"{where}.")
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            out[key] = _merge(base[key], value, f"{where}.")
        else:
            out[key] = _coerce(base.get(key), copy.deepcopy(value))
    return out


def _coerce(default: Any, value: Any) -> Any:
    """Numbers stay numbers: YAML 1.1 reads ``2e-3`` as a string, so a numeric key accepts numeric strings."""
    numeric_default = isinstance(default, (int, float)) and not isinstance(default, bool)
    if numeric_default and isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            try:
                return float(value)
            except ValueError:
                return value  # left for validate() to reject, naming the key
    return value


def _override(item: str) -> dict:
    """``a.b.c=value`` (value in YAML) as ``{"a": {"b": {"c": value}}}``."""
    dotted, sep, raw = item.partition("=")
    keys = dotted.strip().split(".")
    if not sep or not all(keys):
        raise ConfigError(f"override must look like key=value (dotted keys allowed, e.g. train.epochs=2), "
                          f"got {item!r}")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    nested: dict = {}
    cursor = nested
    for key in keys[:-1]:
        cursor = cursor.setdefault(key, {})
    cursor[keys[-1]] = value
    return nested


LOSS_MIGRATION = ("config key '{key}' is gone: choose the method with 'method' and set its weights under "
                  "'method_args' (loss.method=M -> method=M, loss.K=V -> method_args.K=V; README: Methods)")


def resolve(user: dict | None = None, overrides: list[str] | None = None, warn: bool = True) -> dict:
    """Defaults ← user config ← ``key=value`` overrides, checked by :func:`validate`; then the method's arguments
    are checked and completed with its defaults (:func:`cbd_fast.methods.resolve_method_config`, which imports
    torch).

    Overrides apply in order of depth (``data=file.yaml`` before ``data.num_tasks=3``), then in the order given.
    A resolved config resolves to itself.
    """
    if user is not None and not isinstance(user, dict):
        raise ConfigError(f"a config must be a mapping of keys, got {type(user).__name__}")
    if "loss" in (user or {}):  # a config written before the method registry
        raise ConfigError(LOSS_MIGRATION.format(key="loss"))
    for item in overrides or []:
        if item.partition("=")[0].strip().split(".")[0] == "loss":
            raise ConfigError(LOSS_MIGRATION.format(key=item.partition("=")[0].strip()))
    config = _merge(DEFAULTS, user or {}, "")
    for item in sorted(overrides or [], key=lambda text: text.partition("=")[0].count(".")):
        config = _merge(config, _override(item), "")
    validate(config, warn)
    from .methods import resolve_method_config

    return resolve_method_config(config)


# --------------------------------------------------------------------------------------------- validation
Rule = Callable[[Any], "str | None"]  # value -> what was expected (None when the value is fine)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(minimum: int) -> Rule:
    return lambda v: None if _is_int(v) and v >= minimum else f"an integer ≥ {minimum}"


def _number(minimum: float = 0.0, positive: bool = False) -> Rule:
    def rule(value):
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
              and (value > minimum if positive else value >= minimum))
        return None if ok else f"a finite number {'>' if positive else '≥'} {minimum:g}"
    return rule


def _choice(*options: Any) -> Rule:
    shown = ", ".join(str(o).lower() if isinstance(o, bool) else str(o) for o in options)
    return lambda v: None if any(v == o and type(v) is type(o) for o in options) else f"one of {shown}"


def _text(value: Any) -> str | None:
    return None if isinstance(value, str) and value.strip() else "a non-empty string"


def _threads(value: Any) -> str | None:
    return None if value == "auto" or (_is_int(value) and value >= 1) else "auto or an integer ≥ 1"


_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")

RULES: dict[str, Rule] = {
    "name": _text,
    "seed": _integer(0),
    "device": lambda v: None if isinstance(v, str) and _DEVICE.fullmatch(v) else "auto, cpu, cuda or cuda:N",
    "threads": _threads,
    "output_dir": _text,
    "train.epochs": _integer(1),
    "train.batch_size": _integer(1),
    "train.lr": _number(),
    "train.weight_decay": _number(),
    "train.warmup_steps": _integer(0),
    "train.grad_clip": _number(),  # 0: no clipping
    "train.bf16": _choice("auto", True, False),
    "train.prompt_query": _choice("old_model", "prompt_free"),
    "train.accumulate": _integer(1),
    "train.checkpoint_interval_s": _number(),
    "train.checkpoint_every_steps": _integer(0),  # 0: at epoch and task ends only
    "train.keep_checkpoints": _integer(1),
    "train.replay.strategy": _choice("reservoir", "per_task", "none"),
    "train.replay.size": _integer(0),
    "train.replay.batch_size": _integer(0),
    "method": _text,  # the name and the arguments are checked by cbd_fast.methods
    "method_args": lambda v: None if isinstance(v, dict) else "a mapping of the method's arguments",
    "eval.batch_size": _integer(1),
    "eval.prompt_selection": _choice("key", "task_id"),
    "eval.captions": _choice("all", "first"),
    "eval.cumulative": _choice(True, False),
    "eval.plot_metric": _text,
    "data.workers": _integer(0),
    "logging.tensorboard": _choice(True, False),
}


def leaf_keys(config: dict, prefix: str = "") -> dict[str, Any]:
    """Dotted key → value for every leaf of a nested mapping."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(leaf_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def validate(config: dict, warn: bool = True) -> None:
    """Check every key of the run sections; raise one :class:`ConfigError` listing every problem. With ``warn``,
    settings that run but defeat their purpose give a :class:`ConfigWarning`."""
    problems = []
    values = leaf_keys({k: v for k, v in config.items() if k not in _SECTION_KINDS and k != "method_args"})
    values["method_args"] = config.get("method_args")
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    values.update({f"data.{key}": data.get(key) for key in LOADER_KEYS})
    for key, rule in RULES.items():
        expected = rule(values.get(key))
        if expected is not None:
            problems.append(f"config key '{key}' must be {expected}, got {values.get(key)!r}")
    if problems:
        raise ConfigError("; ".join(problems))
    train = config["train"]
    if warn and train["batch_size"] == 1 and (train["replay"]["strategy"] == "none" or train["replay"]["batch_size"] == 0):
        warnings.warn("train.batch_size=1: a batch of one pair has nothing to contrast with, so the contrastive "
                      "loss is identically 0 and the model learns only from the other terms", ConfigWarning,
                      stacklevel=3)


def dump(config: dict) -> str:
    """The config as YAML, keys in their order."""
    return yaml.safe_dump(config, sort_keys=False, allow_unicode=True)


# ------------------------------------------------------------------------------------------- run identity
# Keys that may change when a run is resumed: where its outputs go, what it runs on, how its data is loaded and
# how often it is saved. (A different device, thread count or number of processes gives results that are not
# bit-identical to an uninterrupted run; the trainer warns.)
RESUMABLE_KEYS = ("name", "output_dir", "device", "threads", "data.workers", "train.checkpoint_interval_s",
                  "train.checkpoint_every_steps",
                  "train.keep_checkpoints", "logging.tensorboard")


def _run_defining(config: dict) -> dict[str, Any]:
    return {key: value for key, value in leaf_keys(config).items() if key not in RESUMABLE_KEYS}


def fingerprint(config: dict) -> str:
    """SHA-256 of every key that defines what a run computes (all but :data:`RESUMABLE_KEYS`)."""
    return hashlib.sha256(json.dumps(_run_defining(config), sort_keys=True).encode()).hexdigest()


def differences(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every run-defining key whose value differs (``absent`` for a missing key)."""
    before, after = _run_defining(old), _run_defining(new)
    missing = object()
    out = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key, missing), after.get(key, missing)
        if a != b or type(a) is not type(b):
            out.append(f"{key}: {'absent' if a is missing else json.dumps(a)} -> "
                       f"{'absent' if b is missing else json.dumps(b)}")
    return out
