"""cbd_fast: fused kernels for Coalition Banzhaf Distillation."""
from ._ops import build_info, has_extension

__all__ = ["build_info", "has_extension"]
__version__ = "0.1.0"
