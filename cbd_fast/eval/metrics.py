"""Retrieval metrics and continual-learning summaries (DESIGN §7).

Test sets pair text i with image i, so the ground truth of a score matrix ``scores[N_text, N_image]`` is its
diagonal. Class labels (when known) give the class-level mAP@all: every item of the query's class is relevant.
"""
from __future__ import annotations

import math

import torch

RECALL_AT = (1, 5, 10)


def _ranks_of_diagonal(scores: torch.Tensor) -> torch.Tensor:
    """1-based rank of scores[i, i] within row i (ties count against the query). [N]."""
    diagonal = scores.diagonal().unsqueeze(1)
    return (scores > diagonal).sum(1) + 1


def _average_precision(scores: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """AP over the full ranking of each row. scores[Q, N], relevant[Q, N] bool -> [Q] (rows with none: nan)."""
    order = scores.argsort(dim=1, descending=True, stable=True)
    hits = relevant.gather(1, order).double()
    precision_at_hit = hits.cumsum(1) / torch.arange(1, hits.shape[1] + 1, dtype=torch.float64)
    count = hits.sum(1)
    return torch.where(count > 0, (precision_at_hit * hits).sum(1) / count.clamp_min(1), float("nan"))


def retrieval_metrics(scores: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, float]:
    """Both directions of retrieval for a square ``scores[N, N]`` (text rows, image columns; pair i matches i).

    Returns percentages: ``t2i_R@k``, ``i2t_R@k`` for k in 1/5/10, ``t2i_MRR``, ``i2t_MRR`` (instance level) and,
    when ``labels[N]`` (class ids, -1 unknown) are given for every item, ``t2i_mAP``, ``i2t_mAP`` (class level,
    mAP@all), plus ``mean_R@1`` (average of both directions).
    """
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"scores must be square [N, N] (text i matches image i), got {tuple(scores.shape)}")
    scores = scores.double().cpu()
    out: dict[str, float] = {}
    for direction, matrix in (("t2i", scores), ("i2t", scores.t())):
        ranks = _ranks_of_diagonal(matrix)
        for k in RECALL_AT:
            out[f"{direction}_R@{k}"] = 100.0 * (ranks <= k).double().mean().item()
        out[f"{direction}_MRR"] = 100.0 * (1.0 / ranks.double()).mean().item()
        if labels is not None and bool((labels >= 0).all()):
            labels_cpu = labels.cpu()
            relevant = labels_cpu.unsqueeze(1) == labels_cpu.unsqueeze(0)
            out[f"{direction}_mAP"] = 100.0 * _average_precision(matrix, relevant).nanmean().item()
    out["mean_R@1"] = 0.5 * (out["t2i_R@1"] + out["i2t_R@1"])
    return out


def continual_summary(matrix: list[list[float | None]]) -> dict[str, float]:
    """Final average, forgetting and backward transfer of an accuracy matrix.

    ``matrix[i][j]`` = metric on task j after training task i (None where j > i was not evaluated).
    Forgetting = mean over earlier tasks j of (max_{i<last} a[i][j] − a[last][j]); BWT = mean_j a[last][j] − a[j][j].
    """
    last = len(matrix) - 1
    if last < 0:
        raise ValueError("empty accuracy matrix")
    final = [matrix[last][j] for j in range(last + 1)]
    summary = {"final_average": sum(final) / len(final), "forgetting": math.nan, "backward_transfer": math.nan}
    if last > 0:
        earlier = range(last)
        summary["forgetting"] = sum(max(matrix[i][j] for i in range(j, last)) - matrix[last][j]
                                    for j in earlier) / last
        summary["backward_transfer"] = sum(matrix[last][j] - matrix[j][j] for j in earlier) / last
    return summary
