"""cbd_fast: fused kernels for Coalition Banzhaf Distillation.

Public ops: :func:`banzhaf_interaction`, :func:`banzhaf_interaction_from_tokens`, :func:`maxsim`,
:func:`coalitions`; plain-PyTorch definitions live in :mod:`cbd_fast.reference`.
"""
from . import reference
from ._ops import build_info, has_extension
from .banzhaf import BanzhafResult, banzhaf_interaction, banzhaf_interaction_from_tokens
from .coalitions import coalitions
from .maxsim import maxsim

__all__ = [
    "BanzhafResult",
    "banzhaf_interaction",
    "banzhaf_interaction_from_tokens",
    "build_info",
    "coalitions",
    "has_extension",
    "maxsim",
    "reference",
]
__version__ = "0.1.0"
