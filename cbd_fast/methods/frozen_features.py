"""Outputs of the frozen previous-task model, kept per input for the length of a task.

During a task the previous-task model is frozen and runs in eval mode, and each tower's prompt is chosen from that
tower's own prompt-free feature alone (DESIGN §5). What it computes for a caption — the prompt-pool query and the
prompted token features the distillation terms compare with — is therefore a function of the caption; so is what
it computes for a training image when the image's dataset is not augmented (the synthetic scenarios; augmented
images differ from epoch to epoch and are never kept). A method asks this cache instead of running the frozen
towers again: on the default run that removes the teacher's forward pass and the prompt-query pass from every
step once each input has been seen.

A kept row is computed on its input alone (a batch of one), never within the batch it first came in: a matrix
library may block a product differently for other row counts, so a row computed in a batch can depend in its last
bits on the rest of the batch, and a kept row would then depend on when its input was first seen — which a resumed
run, whose cache starts empty, does not reproduce. Computed alone, a row is the same in every run with the same
thread count, so kill and resume stay exact. Whether a task's rows are kept at all is decided once, from the number
of inputs the scenario holds: if they could pass :data:`CACHE_BYTES`, nothing is kept and every step encodes its
batch as without the cache.
"""
from __future__ import annotations

from typing import Callable, Hashable, Optional, Sequence

import numpy as np
import torch

from ..model import TokenFeatures

CACHE_BYTES = 1 << 30  # the most a task's kept rows may take; a scenario that could need more keeps none

Encode = Callable[[slice | list[int]], Sequence[torch.Tensor]]  # rows of the batch -> per-row tensors, batch first


class FrozenFeatureCache:
    """The frozen ``model``'s outputs for the inputs seen so far: per input, the prompt-pool query ``[D]`` and the
    prompted :class:`TokenFeatures` rows (``tokens[N,D]``, ``mask[N]``, ``weight[N]``, ``pooled[D]``).

    A caption's key is its token ids and mask up to its last valid token; an image's key is its (task, training
    sample) when that task's training set is not augmented (else it is encoded with its batch at every step).
    ``captions`` and ``images`` are how many distinct captions and non-augmented training images the scenario
    holds (the bound on what a task can keep). A batch is the loop's: ``images[B,3,S,S]``, ``ids[B,L]``,
    ``mask[B,L]`` and, for image keys, ``task[B]`` and ``index[B]``; ``augmented(task)`` says whether a task's
    training images are augmented."""

    def __init__(self, model, augmented: Callable[[int], bool], captions: int, images: int,
                 max_bytes: Optional[int] = None) -> None:
        self.model = model
        self.augmented = augmented
        self.inputs = {"text": captions, "image": images}
        self.max_bytes = CACHE_BYTES if max_bytes is None else max_bytes
        self.rows: dict[tuple[str, Hashable], tuple[torch.Tensor, ...]] = {}
        self.keep: Optional[bool] = None  # decided at the first lookup

    def queries(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt-free pooled features ``([B,D], [B,D])`` of the batch's images and captions (the prompt-pool
        queries), as ``prompt_queries(model, batch)`` gives them."""
        self._decide(batch)
        images, ids, mask = batch["images"], batch["ids"], batch["mask"]
        model = self.model
        (image,) = self._lookup("image query", self._image_keys(batch), lambda rows: (model.query_image(images[rows]),))
        (text,) = self._lookup("text query", self._caption_keys(batch),
                               lambda rows: (model.query_text(ids[rows], mask[rows]),))
        return image, text

    @torch.no_grad()
    def features(self, batch, queries: tuple[torch.Tensor, torch.Tensor]) -> tuple[TokenFeatures, TokenFeatures]:
        """The prompted image and text features of the batch, each prompt chosen from ``queries`` (the batch's
        :meth:`queries`) by key matching, as ``encode(model, batch, queries, train_task=None)`` gives them."""
        self._decide(batch)
        images, ids, mask = batch["images"], batch["ids"], batch["mask"]
        model = self.model

        def encode_image(rows):
            prompt, _, _ = model.select_prompts(queries[0][rows], None, train_task=None)
            return model.encode_image(images[rows], prompt_index=prompt)

        def encode_text(rows):
            _, prompt, _ = model.select_prompts(None, queries[1][rows], train_task=None)
            return model.encode_text(ids[rows], mask[rows], prompt_index=prompt)

        image = TokenFeatures(*self._lookup("image", self._image_keys(batch), encode_image))
        text = TokenFeatures(*self._lookup("text", self._caption_keys(batch), encode_text))
        return image, text

    def _image_keys(self, batch) -> list[Optional[Hashable]]:
        if "task" not in batch or "index" not in batch:
            return [None] * batch["images"].shape[0]
        return [None if self.augmented(task) else (task, index)
                for task, index in zip(batch["task"].tolist(), batch["index"].tolist())]

    @staticmethod
    def _caption_keys(batch) -> list[Optional[Hashable]]:
        ids, valid = batch["ids"].cpu().numpy(), batch["mask"].cpu().numpy()
        lengths = (valid * np.arange(1, valid.shape[1] + 1)).max(1, initial=0)  # up to the last valid token
        return [ids[i, :n].tobytes() + valid[i, :n].tobytes() for i, n in enumerate(lengths.tolist())]

    @torch.no_grad()
    def _lookup(self, table: str, keys: list[Optional[Hashable]], encode: Encode) -> tuple[torch.Tensor, ...]:
        """The batch's rows of ``table``: kept rows, each computed alone when its input was first seen, and rows
        without a key (or all, when the task keeps none) encoded together now."""
        if self.keep is False or all(key is None for key in keys):
            return tuple(encode(slice(None)))
        rows = []
        for i, key in enumerate(keys):
            if key is not None and (table, key) not in self.rows:
                self.rows[(table, key)] = tuple(column[0].clone() for column in encode([i]))
            rows.append(None if key is None else self.rows[(table, key)])
        fresh = [i for i, row in enumerate(rows) if row is None]
        if fresh:
            columns = encode(fresh)
            for j, i in enumerate(fresh):
                rows[i] = tuple(column[j] for column in columns)
        return tuple(torch.stack(column) for column in zip(*rows))

    def _decide(self, batch) -> None:
        """Whether the task keeps rows: all the scenario's inputs in all four tables must fit the budget, at the
        sizes of the first row of the first batch looked up."""
        if self.keep is not None:
            return
        one = {key: value[:1] for key, value in batch.items() if key in ("images", "ids", "mask")}
        with torch.no_grad():
            queries = self.model.query_image(one["images"]), self.model.query_text(one["ids"], one["mask"])
            image_prompt, text_prompt, _ = self.model.select_prompts(*queries, train_task=None)
            image = self.model.encode_image(one["images"], prompt_index=image_prompt)
            text = self.model.encode_text(one["ids"], one["mask"], prompt_index=text_prompt)
        size = lambda tensors: sum(t[0].numel() * t[0].element_size() for t in tensors)  # noqa: E731
        need = (self.inputs["image"] * (size([queries[0]]) + size(image))
                + self.inputs["text"] * (size([queries[1]]) + size(text)))
        self.keep = need <= self.max_bytes
