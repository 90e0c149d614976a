"""Retrieval metrics and continual-learning summaries (DESIGN §7).

Retrieval: ``scores[Q, G]`` ranks a gallery of ``G`` items for each of ``Q`` queries and ``positive`` marks the
matches — any number per query and per gallery item (five captions per image, a duplicated image or caption):
either a bool matrix ``[Q, G]`` or :class:`Matches` (query and gallery ids, ``positive[q, g] = query_ids[q] ==
gallery_ids[g]``), whose rows are built a chunk at a time, so that the metrics hold O(chunk · gallery) of it and
nothing of size ``Q · G`` besides the scores. A query's rank is the rank of its best-placed positive, and ties
count against the query (the pessimistic rank): ``rank = 1 + #{non-positive g : scores[q, g] >= best positive
score}``. A constant score matrix therefore ranks every query last but its positives, never first; non-finite
scores are an error. Class labels, when every item has one, give the class-level mAP@all, with ties again ordered
against the query (non-relevant items first within a tie).

Continual summaries: ``matrix[i][j]`` is a metric on task ``j + 1`` after training tasks ``1..i``; row 0 is the
model before any training.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

RECALL_AT = (1, 5, 10)
# Score entries a ranking pass holds at once (with its positives, boolean and index temporaries): bounds the memory
# of the metrics to O(chunk · gallery) whatever the number of queries. Measured (torch CPU allocator peak): about
# 10 bytes per entry for the ranks (40 MiB), about 49 for class mAP's sorts and float64 precisions (196 MiB).
CHUNK_ELEMENTS = 2**22
# Every key of retrieval_metrics (mAP only where class labels exist). Median rank is the one where lower is
# better: the continual summaries are not computed for it.
METRIC_NAMES = tuple(f"{direction}_{name}" for direction in ("t2i", "i2t")
                     for name in (*(f"R@{k}" for k in RECALL_AT), "MedR", "MRR", "mAP")) + ("rsum", "mean_R@1")
LOWER_IS_BETTER = ("t2i_MedR", "i2t_MedR")


@dataclass(frozen=True)
class Matches:
    """A match relation given by ids: ``positive[q, g] = query_ids[q] == gallery_ids[g]``, ``[Q, G]``.

    Caption→image retrieval: each caption's image index against the gallery images' indices (a duplicated image:
    its index twice); class relevance: query labels against gallery labels. Equal to the dense bool matrix, but
    :meth:`rows` builds it a row chunk at a time.
    """

    query_ids: torch.Tensor  # [Q] integer
    gallery_ids: torch.Tensor  # [G] integer

    @property
    def shape(self) -> tuple[int, int]:
        return (self.query_ids.shape[0], self.gallery_ids.shape[0])

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """``positive[start:stop]``: ``[stop - start, G]`` bool."""
        return self.query_ids[start:stop, None] == self.gallery_ids[None, :]

    def t(self) -> "Matches":
        """The relation with queries and gallery swapped, ``[G, Q]`` (image→text from text→image)."""
        return Matches(self.gallery_ids, self.query_ids)


Positive = torch.Tensor | Matches  # a dense bool [Q, G] matrix or its ids


def _positive_rows(positive: Positive, start: int, stop: int) -> torch.Tensor:
    return positive.rows(start, stop) if isinstance(positive, Matches) else positive[start:stop]


def _check_positive(positive: Positive, shape: tuple[int, ...], name: str, where: str) -> None:
    if isinstance(positive, Matches):
        ids = (positive.query_ids, positive.gallery_ids)
        if any(x.dim() != 1 or x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool
               for x in ids) or positive.shape != shape:
            raise ValueError(f"{where}: {name} ids must be integer vectors of [queries] and [gallery] = "
                             f"{list(shape)} entries, got {[(x.dtype, tuple(x.shape)) for x in ids]}")
    elif not isinstance(positive, torch.Tensor) or positive.shape != shape or positive.dtype != torch.bool:
        got = (f"{positive.dtype} {tuple(positive.shape)}" if isinstance(positive, torch.Tensor)
               else type(positive).__name__)
        raise ValueError(f"{where}: {name} must be a bool matrix of the scores' shape {shape} or Matches, "
                         f"got {got}")


def _check_scores(scores: torch.Tensor, positive: Positive, where: str, name: str = "positive") -> None:
    if scores.dim() != 2:
        raise ValueError(f"{where}: scores must be a [queries, gallery] matrix, got shape {tuple(scores.shape)}")
    _check_positive(positive, tuple(scores.shape), name, where)
    if scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"{where}: empty score matrix {tuple(scores.shape)}: no queries or no gallery items")
    # chunk by chunk: isfinite of the whole matrix would hold a float copy and two masks of it at once
    bad = sum(int((~torch.isfinite(scores[start:stop])).sum()) for start, stop in _row_chunks(*scores.shape))
    if bad:
        raise ValueError(f"{where}: {bad} of {scores.numel()} retrieval scores are NaN or infinite; a model "
                         "that produces them cannot be ranked (did training diverge?)")


def _row_chunks(num_rows: int, num_cols: int):
    step = max(1, CHUNK_ELEMENTS // max(1, num_cols))
    return ((start, min(num_rows, start + step)) for start in range(0, num_rows, step))


def best_positive_ranks(scores: torch.Tensor, positive: Positive, where: str = "scores") -> torch.Tensor:
    """1-based pessimistic rank of each query's best-placed positive: ``[Q]`` long.

    ``rank[q] = 1 + #{g not positive : scores[q, g] >= max_{p positive} scores[q, p]}``. A query without a
    positive in the gallery is an error (its rank is undefined). ``positive``: bool ``[Q, G]`` or :class:`Matches`.
    """
    _check_scores(scores, positive, where)
    ranks = []
    for start, stop in _row_chunks(*scores.shape):
        block, pos = scores[start:stop], _positive_rows(positive, start, stop)
        has_positive = pos.any(1)
        if not bool(has_positive.all()):
            query = start + int((~has_positive).nonzero()[0])
            raise ValueError(f"{where}: query {query} has no positive item in the gallery of {scores.shape[1]} "
                             "(is its match in another task's test set?)")
        best = block.masked_fill(~pos, float("-inf")).amax(1, keepdim=True)
        ranks.append(1 + ((block >= best) & ~pos).sum(1))
    return torch.cat(ranks)


def average_precision(scores: torch.Tensor, relevant: Positive, where: str = "scores") -> torch.Tensor:
    """AP over the whole ranking of each row, ties ordered against the query: ``[Q]`` float64.

    Within a group of equal scores the non-relevant items are ranked first, so the k-th relevant item of a tie
    group sits after all of the group's non-relevant ones. A row without any relevant item is an error.
    ``relevant``: bool ``[Q, G]`` or :class:`Matches` (e.g. query labels against gallery labels).
    """
    _check_scores(scores, relevant, where, "relevant")
    out = []
    for start, stop in _row_chunks(*scores.shape):
        block, rel = scores[start:stop], _positive_rows(relevant, start, stop)
        count = rel.sum(1)
        if not bool((count > 0).all()):
            query = start + int((count == 0).nonzero()[0])
            raise ValueError(f"{where}: query {query} has no item of its class in the gallery")
        # two stable sorts: relevance ascending, then score descending (ties keep non-relevant first)
        by_relevance = rel.to(torch.uint8).argsort(dim=1, stable=True)
        by_score = block.gather(1, by_relevance).argsort(dim=1, descending=True, stable=True)
        hits = rel.gather(1, by_relevance).gather(1, by_score).double()
        precision = hits.cumsum(1) / torch.arange(1, hits.shape[1] + 1, dtype=torch.float64)
        out.append((precision * hits).sum(1) / count.double())
    return torch.cat(out)


def median_rank(ranks: torch.Tensor) -> float:
    """``MedR`` of 1-based ``ranks[Q]`` as VSE++ and SCAN compute it, ``floor(median(ranks - 1)) + 1``: the middle
    rank, and for an even count the floor of the mean of the two middle ranks (DESIGN §7)."""
    middle = ranks.sort().values[[(len(ranks) - 1) // 2, len(ranks) // 2]]
    return float(int(middle.sum()) // 2)


def query_metrics(scores: torch.Tensor, positive: Positive, query_labels: torch.Tensor | None = None,
                  gallery_labels: torch.Tensor | None = None, where: str = "scores") -> dict[str, float]:
    """One retrieval direction, queries in rows: ``R@1``, ``R@5``, ``R@10``, ``MRR`` (percent), ``MedR`` (rank,
    :func:`median_rank`) and, when every query and gallery item has a class label (>= 0), ``mAP`` (class-level mAP@all, percent)."""
    ranks = best_positive_ranks(scores, positive, where)
    out = {f"R@{k}": 100.0 * (ranks <= k).double().mean().item() for k in RECALL_AT}
    out["MedR"] = median_rank(ranks)
    out["MRR"] = 100.0 * (1.0 / ranks.double()).mean().item()
    if query_labels is not None and gallery_labels is not None:
        query_labels, gallery_labels = query_labels.reshape(-1).cpu(), gallery_labels.reshape(-1).cpu()
        if query_labels.numel() != scores.shape[0] or gallery_labels.numel() != scores.shape[1]:
            raise ValueError(f"{where}: {query_labels.numel()} query and {gallery_labels.numel()} gallery labels "
                             f"for a {tuple(scores.shape)} score matrix")
        if bool((query_labels >= 0).all()) and bool((gallery_labels >= 0).all()):
            relevant = Matches(query_labels, gallery_labels)
            out["mAP"] = 100.0 * average_precision(scores, relevant, where).mean().item()
    return out


def combine_directions(text_to_image: dict[str, float], image_to_text: dict[str, float]) -> dict[str, float]:
    """Prefix both directions (``t2i_``, ``i2t_``) and add ``rsum`` (sum of the six recalls, 0–600) and
    ``mean_R@1`` (mean of the two R@1)."""
    out = {f"t2i_{k}": v for k, v in text_to_image.items()}
    out.update({f"i2t_{k}": v for k, v in image_to_text.items()})
    out["rsum"] = sum(out[f"{d}_R@{k}"] for d in ("t2i", "i2t") for k in RECALL_AT)
    out["mean_R@1"] = 0.5 * (out["t2i_R@1"] + out["i2t_R@1"])
    return out


def retrieval_metrics(scores: torch.Tensor, positive: Positive, text_labels: torch.Tensor | None = None,
                      image_labels: torch.Tensor | None = None, where: str = "scores") -> dict[str, float]:
    """Both directions over one gallery: ``scores[Q_text, G_image]`` with ``positive[Q_text, G_image]`` (bool or
    :class:`Matches`).

    Text→image ranks each caption's image(s) among the images; image→text ranks the best-placed of each image's
    captions among the captions. Keys: see :func:`query_metrics` and :func:`combine_directions`.
    """
    text_to_image = query_metrics(scores, positive, text_labels, image_labels, f"{where} (text→image)")
    image_to_text = query_metrics(scores.t(), positive.t(), image_labels, text_labels, f"{where} (image→text)")
    return combine_directions(text_to_image, image_to_text)


# --------------------------------------------------------------------------------------- continual summaries

SUMMARIES = ("final_average", "learning_accuracy", "forgetting", "backward_transfer", "forward_transfer",
             "transfer", "mtil_average", "initial_average")


def _mean(values: list[float | None]) -> float | None:
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)


def continual_summary(matrix: Sequence[Sequence[float | None]]) -> dict[str, float | None]:
    """Summaries of an accuracy matrix with the pre-training row (DESIGN §7).

    ``matrix[i][j - 1]`` = ``a[i][j]``, the metric on task ``j`` after training tasks ``1..i``; row 0 is the model
    before any training. With ``t = len(matrix) - 1`` tasks trained, every summary is over tasks ``1..t`` (extra
    columns, tasks not trained yet, are ignored). A summary that needs a missing entry (None) or more tasks
    than were trained (forgetting, BWT, FWT and Transfer need t >= 2) is None.
    """
    t = len(matrix) - 1
    if t < 0:
        raise ValueError("empty accuracy matrix: it needs at least the pre-training row")
    if any(len(row) < t for row in matrix):
        raise ValueError(f"accuracy matrix rows must hold at least the {t} trained tasks, got lengths "
                         f"{[len(row) for row in matrix]}")

    def a(i: int, j: int) -> float | None:  # 1-based tasks, row 0 = before training
        return matrix[i][j - 1]

    tasks, earlier, later = range(1, t + 1), range(1, t), range(2, t + 1)

    def forgetting(j: int) -> float | None:
        seen = [a(i, j) for i in range(j, t)]
        return None if a(t, j) is None or any(v is None for v in seen) else max(seen) - a(t, j)

    def difference(x: float | None, y: float | None) -> float | None:
        return None if x is None or y is None else x - y

    return {
        "final_average": _mean([a(t, j) for j in tasks]),
        "learning_accuracy": _mean([a(j, j) for j in tasks]),
        "forgetting": _mean([forgetting(j) for j in earlier]),
        "backward_transfer": _mean([difference(a(t, j), a(j, j)) for j in earlier]),
        "forward_transfer": _mean([difference(a(j - 1, j), a(0, j)) for j in later]),
        "transfer": _mean([_mean([a(i, j) for i in range(1, j)]) for j in later]),
        "mtil_average": _mean([_mean([a(i, j) for i in range(1, t + 1)]) for j in tasks]),
        "initial_average": _mean([a(0, j) for j in tasks]),
    }
