"""Scenario configuration: key checking with readable errors, and YAML loading."""
from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A scenario configuration that cannot be used as written (unknown key, bad value, wrong type)."""


def check_keys(cfg: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    """Raise :class:`ConfigError` naming every key of ``cfg`` not in ``allowed`` (with a close match if any)."""
    allowed = sorted(set(allowed))
    unknown = [key for key in cfg if key not in allowed]
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), allowed, n=1)
        hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise ConfigError(f"{where}: unknown key(s) {', '.join(hints)}; allowed keys: {', '.join(allowed)}")


def get_int(cfg: Mapping[str, Any], key: str, default: int, where: str, minimum: int = 0) -> int:
    """``cfg[key]`` as an int ≥ ``minimum`` (``default`` when absent or null)."""
    value = cfg.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{where}: {key} must be ≥ {minimum}, got {value}")
    return value


def get_fraction(cfg: Mapping[str, Any], key: str, default: float, where: str) -> float:
    """``cfg[key]`` as a float in [0, 1]."""
    value = cfg.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ConfigError(f"{where}: {key} must be a number in [0, 1], got {value!r}")
    return float(value)


def get_bool(cfg: Mapping[str, Any], key: str, default: bool, where: str) -> bool:
    value = cfg.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
    return value


def load_scenario(path: str | Path) -> dict:
    """Read a scenario YAML file (``configs/scenarios/*.yaml``) into the ``data_cfg`` dict of :func:`build_tasks`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"scenario file not found: {path}")
    with path.open() as handle:
        cfg = yaml.safe_load(handle)
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a mapping of keys, got {type(cfg).__name__}")
    return cfg
