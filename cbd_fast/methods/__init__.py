"""Continual-learning methods, one file each, selected by the top-level config key ``method: <name>`` with their
arguments under ``method_args:`` (see :mod:`cbd_fast.methods.base` for the interface the loop calls).

``METHODS`` maps every registered name to its class; :func:`resolve_method_config` validates a run config's
``method``/``method_args`` (unknown keys are errors naming the key and the method's known keys) and fills in the
defaults; :func:`create_method` builds the method for a trainer.
"""
from __future__ import annotations

import copy
import difflib
from typing import Any

from .alta import ALTA
from .base import Method, Outputs, Terms, check_args
from .cbd import CBD
from .dime import DIME
from .er import ExperienceReplay
from .ewc import EWC
from .finetune import Finetune
from .icsd import ICSD
from .joint import Joint
from .lwf import LwF
from .modx import ModX
from .rvlr import RVLR

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (
    Finetune, Joint, ExperienceReplay, LwF, EWC, ModX, CBD, RVLR, ICSD, ALTA, DIME)}

__all__ = ["METHODS", "Method", "Outputs", "Terms", "create_method", "method_class", "resolve_method_config"]


def method_class(name: Any) -> type[Method]:
    from ..config import ConfigError

    if name not in METHODS:
        raise ConfigError(f"config key 'method' must be one of {', '.join(METHODS)}, got {name!r}")
    return METHODS[name]


def resolve_method_config(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` whose ``method_args`` hold every argument of ``config['method']`` (given or default),
    and whose ``train.replay`` is the buffer the method trains with."""
    from ..config import LOSS_MIGRATION, ConfigError, _coerce

    if "loss" in config:  # a config written before the registry (e.g. in an older checkpoint)
        raise ConfigError(LOSS_MIGRATION.format(key="loss"))
    config = copy.deepcopy(config)
    cls = method_class(config.get("method"))
    given = config.get("method_args") or {}
    if not isinstance(given, dict):
        raise ConfigError(f"config key 'method_args' must be a mapping, got {given!r}")
    unknown = sorted(set(given) - set(cls.defaults))
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), list(cls.defaults), n=1)
        hint = f" (did you mean 'method_args.{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown config key 'method_args.{unknown[0]}' for method {cls.name!r}{hint}; its known "
                          f"keys: {', '.join(sorted(cls.defaults))}")
    args = {key: _coerce(default, copy.deepcopy(given.get(key, default))) for key, default in cls.defaults.items()}
    try:
        check_args(cls, args)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    config["method_args"] = args
    replay = config["train"]["replay"]
    if cls.replay == "forbidden" and replay["strategy"] != "none" and replay["size"] and replay["batch_size"]:
        raise ConfigError(f"method {cls.name!r} does not combine with replay: set train.replay.strategy to none")
    if cls.replay == "required":  # the method's own buffer settings fill in what the config leaves unset
        config["train"]["replay"] = {key: value if value not in ("none", 0) else cls.REQUIRED_REPLAY[key]
                                     for key, value in replay.items()}
    return config


def create_method(config: dict[str, Any], trainer) -> Method:
    """The method of a config resolved by :func:`resolve_method_config`, bound to ``trainer``, on its device."""
    return method_class(config["method"])(config["method_args"], trainer).to(trainer.device)
