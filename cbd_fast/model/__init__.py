"""Model layer of cbd_fast: CLIP-style dual encoder with token outputs, WTI heads and prompt pools."""
from .image import ImageTower
from .prompts import PromptPool
from .text import TextTower
from .tokenizer import ClipTokenizer

__all__ = ["ClipTokenizer", "ImageTower", "PromptPool", "TextTower"]
