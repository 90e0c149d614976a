"""Plain-PyTorch, definition-level versions of every op: readable, vectorised, chunked. The oracle of the tests."""
from ..coalitions import coalitions
from .banzhaf import (banzhaf_interaction, banzhaf_interaction_from_tokens, banzhaf_interaction_per_pair_mc,
                      coalition_value)
from .maxsim import maxsim

__all__ = [
    "banzhaf_interaction",
    "banzhaf_interaction_from_tokens",
    "banzhaf_interaction_per_pair_mc",
    "coalition_value",
    "coalitions",
    "maxsim",
]
