"""CLIP's byte-level BPE tokenizer.

Text is cleaned (ftfy repair, HTML unescape, whitespace collapse, lower case), split into pieces by CLIP's
regular expression, each piece's UTF-8 bytes are spelled with one printable character per byte, and the
spelling is merged by the ranked merge list of ``bpe_simple_vocab_16e6.txt.gz`` (OpenAI CLIP, MIT licence,
see ``VOCAB_LICENSE.txt``). The last symbol of every piece carries the end-of-word marker ``</w>``, which is
how decoding knows where the spaces were.

Token ids follow CLIP exactly, so a pretrained CLIP text tower can be used with it:

- ``0..255``: the 256 single-byte symbols, ``256..511``: the same with ``</w>``,
- ``512..49405``: one id per merge, in merge-rank order,
- ``49406``: ``<|startoftext|>``, ``49407``: ``<|endoftext|>``.
"""
from __future__ import annotations

import functools
import gzip
import html
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import ftfy
import regex
import torch

VOCAB_PATH = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
# CLIP keeps the first 49152 - 256 - 2 merges of the file: 256 byte symbols + 256 with </w> + merges +
# 2 specials = 49408 ids.
NUM_MERGES = 49152 - 256 - 2

# Contractions, runs of letters, single digits, runs of other non-space characters (CLIP's split).
# The special tokens come first so that they survive as whole pieces.
_PIECE_PATTERN = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")


def byte_symbols() -> List[str]:
    """The printable character standing for each byte value, indexed by byte (list of 256 str).

    Bytes that are visible Latin-1 characters stand for themselves; the remaining 68 (controls, space,
    soft hyphen, ...) are moved to code points 256, 257, ... in byte order, so that no symbol is whitespace
    or a control character and the BPE never has to handle them.
    """
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbol = {b: chr(b) for b in visible}
    shifted = 0
    for b in range(256):
        if b not in symbol:
            symbol[b] = chr(256 + shifted)
            shifted += 1
    return [symbol[b] for b in range(256)]


def _alphabet_order() -> List[int]:
    """Byte values in the order of their ids: visible bytes first, then the shifted ones (CLIP's order)."""
    symbols = byte_symbols()
    return sorted(range(256), key=lambda b: ord(symbols[b]))


@functools.lru_cache(maxsize=None)
def _load_vocabulary(path: str) -> Tuple[Dict[str, int], Dict[Tuple[str, str], int]]:
    """(token string -> id, merge pair -> rank) from the gzip merge list; cached per path."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # line 0 is a version header
    merges = [tuple(line.split()) for line in lines[1:1 + NUM_MERGES]]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path} is not a CLIP BPE merge list ({len(merges)} merges read, {NUM_MERGES} needed)")
    symbols = byte_symbols()
    alphabet = [symbols[b] for b in _alphabet_order()]
    tokens = alphabet + [s + END_OF_WORD for s in alphabet] + [a + b for a, b in merges] + [START_TOKEN, END_TOKEN]
    token_to_id = {token: i for i, token in enumerate(tokens)}
    merge_rank = {pair: rank for rank, pair in enumerate(merges)}
    return token_to_id, merge_rank


def clean_text(text: str) -> str:
    """ftfy repair, HTML unescape (twice: captions are often double-escaped), collapse whitespace, lower."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return _WHITESPACE.sub(" ", text).strip().lower()


class ClipTokenizer:
    """CLIP BPE tokenizer producing fixed-length id tensors and validity masks.

    Args:
        context_length: length ``L`` of every row of ids (CLIP: 77). Longer texts are truncated and keep the
            end token as their last token (the text tower pools at the end token).
        vocab_path: the gzip merge list; defaults to the packaged CLIP vocabulary.

    ``tok(texts)`` returns ``(ids LongTensor[B, L], mask BoolTensor[B, L])``; ``mask`` marks real tokens,
    start and end tokens included; padding ids are 0 (a real byte symbol, so never read them without the mask).
    """

    def __init__(self, context_length: int = 77, vocab_path: Union[str, Path, None] = None):
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (start and end tokens), got {context_length}")
        self.context_length = int(context_length)
        self.token_to_id, self.merge_rank = _load_vocabulary(str(vocab_path or VOCAB_PATH))
        self.id_to_token = {i: t for t, i in self.token_to_id.items()}
        self.start_id = self.token_to_id[START_TOKEN]
        self.end_id = self.token_to_id[END_TOKEN]
        symbols = byte_symbols()
        self._byte_to_symbol = symbols
        self._symbol_to_byte = {s: b for b, s in enumerate(symbols)}
        self._piece_cache: Dict[str, List[int]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.token_to_id)

    def _merge(self, spelled: str) -> List[str]:
        """Apply the ranked merges to one piece spelled in byte symbols; returns its BPE tokens."""
        symbols = list(spelled[:-1]) + [spelled[-1] + END_OF_WORD]
        while len(symbols) > 1:
            pairs = list(zip(symbols, symbols[1:]))
            best = min(pairs, key=lambda pair: self.merge_rank.get(pair, NUM_MERGES))
            if best not in self.merge_rank:  # no adjacent pair is a known merge
                break
            first, second = best
            merged: List[str] = []
            i = 0
            # merge every occurrence of the best pair, left to right, non-overlapping
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def _encode_piece(self, piece: str) -> List[int]:
        ids = self._piece_cache.get(piece)
        if ids is None:
            if piece in (START_TOKEN, END_TOKEN):
                ids = [self.token_to_id[piece]]
            else:
                spelled = "".join(self._byte_to_symbol[b] for b in piece.encode("utf-8"))
                ids = [self.token_to_id[t] for t in self._merge(spelled)]
            self._piece_cache[piece] = ids
        return ids

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text`` without start/end tokens and without truncation."""
        ids: List[int] = []
        for piece in _PIECE_PATTERN.findall(clean_text(text)):
            ids.extend(self._encode_piece(piece))
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of ``ids`` (no padding please: id 0 is the symbol ``!``).

        Every end-of-word marker becomes one space, so words come back space-separated, punctuation included
        (``"hi, there"`` decodes to ``"hi , there"``: BPE does not record whether a space preceded a piece).
        """
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        specials = (self.start_id, self.end_id)
        spelled = "".join(self.id_to_token[int(i)] for i in ids if not (skip_special and int(i) in specials))
        words = spelled.replace(START_TOKEN, START_TOKEN + END_OF_WORD).replace(END_TOKEN, END_TOKEN + END_OF_WORD)
        text = []
        for word in words.split(END_OF_WORD):
            if word in (START_TOKEN, END_TOKEN):
                text.append(word)
            elif word:
                text.append(bytes(self._symbol_to_byte[s] for s in word).decode("utf-8", errors="replace"))
        return " ".join(text)

    def __call__(self, texts: Union[str, Sequence[str]]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(ids LongTensor[B, L], mask BoolTensor[B, L])`` for a list of ``B`` texts (a str counts as one)."""
        if isinstance(texts, str):
            texts = [texts]
        length = self.context_length
        ids = torch.zeros(len(texts), length, dtype=torch.long)
        mask = torch.zeros(len(texts), length, dtype=torch.bool)
        for row, text in enumerate(texts):
            body = self.encode(text)[:length - 2]  # room for start and end
            tokens = [self.start_id, *body, self.end_id]
            ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, :len(tokens)] = True
        return ids, mask

    def __repr__(self) -> str:
        return f"ClipTokenizer(context_length={self.context_length}, vocab_size={self.vocab_size})"
