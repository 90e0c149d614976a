"""Model layer of cbd_fast: CLIP-style dual encoder with token outputs, WTI heads and prompt pools."""
from .tokenizer import ClipTokenizer

__all__ = ["ClipTokenizer"]
