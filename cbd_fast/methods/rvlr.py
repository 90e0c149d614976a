"""``rvlr``: Rebalanced Vision-Language Retrieval (Yang et al., TIP 2024), ported to the dual encoder (PEERS §2.4)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Method, global_rows, global_same_sample


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``−Σ_j target_ij log softmax(logits)_ij``; ``logits``, ``target`` ``[N, M]``."""
    return -(target * torch.log_softmax(logits, dim=-1)).sum(-1).mean()


def relation(features: torch.Tensor, temperature: float, every: torch.Tensor | None = None,
             offset: int = 0) -> torch.Tensor:
    """Off-diagonal entries of ``f fᵀ / τ`` for L2-normalised ``features[N, D]``: ``[N, N−1]``.

    Rows of a share of the batch: ``features[n, D]`` are rows ``offset .. offset + n`` of ``every[N, D]``; the
    result is their ``[n, N−1]`` rows of the relation matrix."""
    every = features if every is None else every
    full = features @ every.t() / temperature
    rows = torch.arange(full.shape[0], device=full.device)
    keep = torch.arange(full.shape[1], device=full.device)[None, :] != (rows + offset)[:, None]
    return full[keep].view(full.shape[0], -1)


def structure_losses(student: torch.Tensor, teacher_text: torch.Tensor, teacher_image: torch.Tensor,
                     mix: torch.Tensor, temperature: float, everyone: tuple | None = None,
                     offset: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RVLR's structure-aware distillation (``distance: mae``) on ``[N, D]`` normalised features:
    ``E = λ R^T + (1 − λ) R^I``; returns ``(mean|R^F − E|, mean|R^I − E|, mean|R^T − E|)`` over the off-diagonal
    entries, where ``R^F`` relates the student's fused pair embeddings ``student`` and λ = ``mix``.

    A share of the batch (:func:`relation`): ``everyone = (student, teacher_text, teacher_image)`` of the whole
    batch, the arguments being its rows from ``offset`` on; the means are over the share's rows."""
    every_student, every_text, every_image = everyone or (None, None, None)
    r_text = relation(teacher_text, temperature, every_text, offset)
    r_image = relation(teacher_image, temperature, every_image, offset)
    ensemble = mix * r_text + (1 - mix) * r_image
    r_student = relation(student, temperature, every_student, offset)
    return ((r_student - ensemble).abs().mean(), (r_image - ensemble).abs().mean(),
            (r_text - ensemble).abs().mean())


class RVLR(Method):
    """RVLR ported to the continual dual encoder (PEERS §2.4). Besides the InfoNCE (RVLR's ITC, here on the MaxSim
    scores) on the current (and replay) batch, with teacher embeddings ``e^v``, ``e^t``:

    * representation-level distillation: ``L_iic = CE_soft(f^v g^vᵀ/τ, Y)`` and ``L_ttc = CE_soft(f^t g^tᵀ/τ, Y)``
      with ``g = normalize(W' e)`` through two new linear maps (D → D) and ``Y`` the same-sample matrix, row-normalised;
    * structure-aware distillation (``distance: mae``): teacher relations ``R^T``, ``R^I`` among the batch's
      captions and images, their mix ``E = λR^T + (1 − λ)R^I`` with a learnable λ (init 0.5, unclamped, as in the
      public code), and ``L_kd = mean|R^F − E|``, ``L_kdi = mean|R^I − E|``, ``L_kdt = mean|R^T − E|`` over
      off-diagonal pairs. As in the public code, ``L_kdi + L_kdt`` involves only λ and constants
      (= mean|R^T − R^I| for λ in [0, 1]); ``L_kd`` decides λ.

    Preserves: each caption's and image's relations to the others in the batch, as the previous-task model saw
    them, and its embeddings themselves (through the learned projections).

    Defaults: ``iic: 1.0``, ``ttc: 2.0``, ``kd: 2.0``, ``kdi: 1.0``, ``kdt: 1.0`` (the train scripts' weights),
    ``temperature: 0.07`` (τ), ``relation_temperature: 0.07`` (τ2), ``mix_init: 0.5``, ``prompt: 0.1``.
    Combines with replay.

    Substitutions (the port's, stated in the README): the teachers are the frozen previous-task model's pooled
    text and image embeddings (PEERS §2.4 option b) instead of precomputed features of external Swin-B/BERT
    teachers, so the distillation terms start at the second task; the student relation ``R^F`` relates the fused
    pair embeddings ``normalize(f^v + f^t)`` (a dual encoder has no fusion CLS); the ITM loss and its hard-negative
    sampling are dropped (no fusion encoder); ``f^v``, ``f^t`` are the backbone's pooled embeddings.

    Distributed training: global — every term, as in the public code (which all-gathers the batch): each rank's
    rows of the representation and relation matrices against every rank's (gathered with their gradient).
    """

    name = "rvlr"
    sweep_weights = ("iic", "ttc", "kd", "kdi", "kdt")
    defaults = dict(Method.defaults, iic=1.0, ttc=2.0, kd=2.0, kdi=1.0, kdt=1.0, temperature=0.07,
                    relation_temperature=0.07, mix_init=0.5)
    positive = ("temperature", "relation_temperature")

    def __init__(self, args, trainer):
        super().__init__(args, trainer)
        dim = trainer.model.config["embed_dim"]
        self.image_projection = nn.Linear(dim, dim)
        self.text_projection = nn.Linear(dim, dim)
        self.mix = nn.Parameter(torch.tensor(float(self.args["mix_init"])))

    def loss_terms(self, student, batch, task_index, step_seed):
        args = self.args
        terms = super().loss_terms(student, batch, task_index, step_seed)
        teacher = self.teacher(batch)
        if teacher is None:
            return terms
        image, text = student.image.pooled.float(), student.text.pooled.float()
        old_image, old_text = teacher.image.pooled.float(), teacher.text.pooled.float()
        dist = self.trainer.dist
        same = global_same_sample(batch, dist).float()  # [n, N]
        target = same / same.sum(-1, keepdim=True)
        tau = args["temperature"]
        if args["iic"]:
            projected, _ = global_rows(F.normalize(self.image_projection(old_image), dim=-1), batch, dist)
            terms.add("iic", soft_cross_entropy(image @ projected.t() / tau, target), args["iic"])
        if args["ttc"]:
            projected, _ = global_rows(F.normalize(self.text_projection(old_text), dim=-1), batch, dist)
            terms.add("ttc", soft_cross_entropy(text @ projected.t() / tau, target), args["ttc"])
        if (args["kd"] or args["kdi"] or args["kdt"]) and same.shape[1] > 1:  # relations need two samples
            fused = F.normalize(image + text, dim=-1)
            everyone, offset = None, 0
            if dist.enabled and "shard_sizes" in batch:  # a share of the global batch
                (every_fused, offset), (every_text, _), (every_image, _) = (
                    global_rows(x, batch, dist) for x in (fused, old_text, old_image))
                everyone = (every_fused, every_text, every_image)
            kd, kdi, kdt = structure_losses(fused, old_text, old_image, self.mix, args["relation_temperature"],
                                            everyone, offset)
            for name, value in (("kd", kd), ("kdi", kdi), ("kdt", kdt)):
                if args[name]:
                    terms.add(name, value, args[name])
        return terms
