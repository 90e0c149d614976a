"""Text features of the frozen previous-task model, kept per caption for the length of a task.

During a task the previous-task model is frozen and runs in eval mode, and its text prompt is chosen from its own
prompt-free text feature alone (DESIGN §5). What it computes for a caption — the prompt-pool query and the
prompted token features the distillation terms compare with — is therefore the same at every step in which the
caption appears, unlike its image features, which change with each epoch's augmentation. A method asks this cache
instead of encoding the caption again: on the default run that removes the teacher's text tower (and the text
half of the prompt-query pass) from every step after an epoch.

The cache may only save time, never change a number. A tower's output for one caption can depend on the rest of
its batch (a matrix library may block a product differently for other row counts), which would make a cached row
differ from the row a fresh encode of another batch gives, and a resumed run (whose cache starts empty) differ
from the uninterrupted one. So the first lookup of every cache encodes its batch whole and in two other
groupings and compares the rows bit for bit; only if they agree does the cache keep rows. Otherwise, and once its
rows would pass :data:`CACHE_BYTES`, it encodes every step's captions as they come, as without it.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..model import TokenFeatures

CACHE_BYTES = 1 << 30  # at most this much of kept features per task (rows beyond it are encoded every step)


class FrozenTextCache:
    """The frozen ``model``'s text outputs for captions seen so far: per caption, the prompt-pool query ``[D]``
    and the prompted :class:`TokenFeatures` rows (``tokens[L,D]``, ``mask[L]``, ``weight[L]``, ``pooled[D]``).

    A caption's key is its token ids and mask up to its last valid token. Batches are ``ids[B,L]`` and ``mask[B,L]`` as the
    loop collates them (the same ``L`` for every batch of a run)."""

    def __init__(self, model, max_bytes: Optional[int] = None) -> None:
        self.model = model
        self.max_bytes = CACHE_BYTES if max_bytes is None else max_bytes
        self.rows: dict[bytes, tuple[torch.Tensor, ...]] = {}
        self.bytes = 0
        self.enabled: Optional[bool] = None  # decided at the first lookup (batch invariance)

    def lookup(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, TokenFeatures]:
        """``(query[B,D], TokenFeatures)`` of the batch's captions, bitwise what :meth:`encode` gives."""
        if self.enabled is None:
            self.enabled = self._batch_invariant(ids, mask)
        if not self.enabled:
            return self.encode(ids, mask)
        keys = [self._key(row, valid) for row, valid in zip(ids.cpu(), mask.cpu())]
        missing = [i for i, key in enumerate(keys) if key not in self.rows]
        fresh: dict[int, tuple[torch.Tensor, ...]] = {}
        if missing:
            index = torch.tensor(missing, device=ids.device)
            query, text = self.encode(ids.index_select(0, index), mask.index_select(0, index))
            for j, i in enumerate(missing):
                row = (query[j], text.tokens[j], text.mask[j], text.weight[j], text.pooled[j])
                fresh[i] = row
                size = sum(t.numel() * t.element_size() for t in row)
                if keys[i] not in self.rows and self.bytes + size <= self.max_bytes:
                    self.rows[keys[i]] = tuple(t.clone() for t in row)
                    self.bytes += size
        rows = [fresh[i] if i in fresh else self.rows[key] for i, key in enumerate(keys)]
        query, tokens, valid, weight, pooled = (torch.stack(column) for column in zip(*rows))
        return query, TokenFeatures(tokens, valid, weight, pooled)

    @torch.no_grad()
    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, TokenFeatures]:
        """The frozen model's query and prompted text features of ``ids[B,L]``, computed now."""
        query = self.model.query_text(ids, mask)
        _, text_prompt, _ = self.model.select_prompts(None, query, train_task=None)
        return query, self.model.encode_text(ids, mask, prompt_index=text_prompt)

    def _batch_invariant(self, ids: torch.Tensor, mask: torch.Tensor) -> bool:
        """Whether every caption of the batch gets the same bits encoded with the whole batch, alone, and with
        the batch's other half."""
        whole = self.encode(ids, mask)
        half = max(1, ids.shape[0] // 2)
        groupings = [(0, 1), (0, half), (half, ids.shape[0])]
        for start, stop in groupings:
            if start >= stop:
                continue
            part = self.encode(ids[start:stop], mask[start:stop])
            same = [torch.equal(a, b[start:stop]) for a, b in zip((part[0], *part[1]), (whole[0], *whole[1]))]
            if not all(same):
                return False
        return True

    @staticmethod
    def _key(ids: torch.Tensor, valid: torch.Tensor) -> bytes:
        length = int(valid.nonzero().max()) + 1 if bool(valid.any()) else 0
        return ids[:length].numpy().tobytes() + valid[:length].numpy().tobytes()
