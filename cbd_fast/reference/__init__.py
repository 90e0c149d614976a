from .maxsim import maxsim

__all__ = ["maxsim"]
