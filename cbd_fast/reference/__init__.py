"""Plain-PyTorch, definition-level versions of every op: readable, vectorised, chunked. The oracle of the tests."""
from .banzhaf import (banzhaf_interaction, banzhaf_interaction_from_tokens, banzhaf_interaction_per_pair_mc,
                      coalition_value)
from ..coalitions import coalitions

__all__ = [
    "banzhaf_interaction",
    "banzhaf_interaction_from_tokens",
    "banzhaf_interaction_per_pair_mc",
    "coalition_value",
    "coalitions",
]
