"""Scenario configuration: key checking with readable errors (files are read by :mod:`cbd_fast.config`)."""
from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

from ..config import ConfigError, load_scenario  # noqa: F401  (one error class and one reader for every config)
from .images import Augment


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


def get_choice(cfg: Mapping[str, Any], key: str, choices: Iterable[str], default: str, where: str) -> str:
    """``cfg[key]``, one of ``choices`` (``default`` when absent or null)."""
    choices = tuple(choices)
    value = cfg.get(key, default)
    if value is None:
        value = default
    if value not in choices:
        raise ConfigError(f"{where}: {key} must be one of {', '.join(choices)}, got {value!r}")
    return value


AUGMENT_KEYS = {"crop_scale", "crop_ratio", "flip"}


def _number_pair(value: Any, key: str, where: str) -> tuple[float, float]:
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value)):
        raise ConfigError(f"{where}: augment.{key} must be a list of two numbers [lo, hi], got {value!r}")
    return float(value[0]), float(value[1])


def get_augment(cfg: Mapping[str, Any], default: Augment | None, where: str) -> Augment | None:
    """The ``augment`` entry as an :class:`Augment`, or None for no augmentation.

    Absent: ``default``. ``null`` or ``false``: none. ``true``: the standard one (``Augment()``). A mapping:
    ``crop_scale: [lo, hi]`` (0 < lo ≤ hi ≤ 1), ``crop_ratio: [lo, hi]`` (width/height), ``flip: bool``; keys left
    out take the values of ``Augment()``.
    """
    if "augment" not in cfg:
        return default
    value = cfg["augment"]
    if value is None or value is False:
        return None
    if value is True:
        return Augment()
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: augment must be null, false, true or a mapping with keys "
                          f"{', '.join(sorted(AUGMENT_KEYS))}; got {value!r}")
    check_keys(value, AUGMENT_KEYS, f"{where}: augment")
    standard = Augment()
    options = {"crop_scale": _number_pair(value.get("crop_scale", standard.crop_scale), "crop_scale", where),
               "crop_ratio": _number_pair(value.get("crop_ratio", standard.crop_ratio), "crop_ratio", where),
               "flip": get_bool(value, "flip", standard.flip, f"{where}: augment")}
    try:
        return Augment(**options)
    except ValueError as exc:
        raise ConfigError(f"{where}: augment: {exc}") from None
