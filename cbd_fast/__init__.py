"""cbd_fast: fused kernels for Coalition Banzhaf Distillation."""
from ._ops import build_info, has_extension
from .maxsim import maxsim

__all__ = ["build_info", "has_extension", "maxsim"]
__version__ = "0.1.0"
