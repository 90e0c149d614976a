"""cbd_fast: fused kernels for Coalition Banzhaf Distillation.

Public ops: :func:`banzhaf_interaction`, :func:`banzhaf_interaction_from_tokens`, :func:`maxsim`,
:func:`coalitions`; plain-PyTorch definitions live in :mod:`cbd_fast.reference`.

The ops (and torch) load on first use of any public name, so that ``import cbd_fast.config`` and the command-line
tools' ``--help`` do not pay for importing torch; ``cbd_fast.has_extension()`` loads them explicitly (it also
registers the ``torch.ops.cbd_fast`` operators).
"""
import importlib as _importlib
import sys as _sys
import types as _types

__version__ = "0.1.0"

# public name -> the submodule defining it
_PUBLIC = {
    "BanzhafResult": "banzhaf",
    "banzhaf_interaction": "banzhaf",
    "banzhaf_interaction_from_tokens": "banzhaf",
    "build_info": "_ops",
    "coalitions": "coalitions",
    "has_extension": "_ops",
    "maxsim": "maxsim",
    "reference": None,  # the subpackage itself
}
__all__ = sorted(_PUBLIC)


def _load() -> None:
    for name, module in _PUBLIC.items():
        if module is None:
            value = _importlib.import_module(f"{__name__}.{name}")
        else:
            value = getattr(_importlib.import_module(f"{__name__}.{module}"), name)
        globals()[name] = value


def __getattr__(name: str):
    if name in _PUBLIC:
        _load()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))


class _Package(_types.ModuleType):
    def __setattr__(self, name, value):
        # Importing the submodule cbd_fast.maxsim (or .coalitions) binds it as an attribute of the package; the
        # public name means the function of the same name, which __getattr__ provides.
        if name in _PUBLIC and isinstance(value, _types.ModuleType) and _PUBLIC[name] is not None:
            return
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
