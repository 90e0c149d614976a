"""The losses of Coalition Banzhaf Distillation (DESIGN §6).

All inputs follow the shapes of the ops: per-pair token similarities ``sim[B,T,V]``, validity masks
``text_mask[B,T]``, ``image_mask[B,V]``, all-pairs scores ``scores[B,B]`` (text rows, image columns, pair i ↔ i).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NEG_INF = float("-inf")


def contrastive_loss(scores: torch.Tensor, logit_scale: torch.Tensor, image_rows: torch.Tensor | None = None,
                     offset: int = 0) -> torch.Tensor:
    """Symmetric InfoNCE on the fine-grained scores. scores[B,B] -> scalar.

    Local-loss form (a rank's rows of a global batch of N, DESIGN §6.2): ``scores[n,N]`` (the rank's captions
    against every image), ``image_rows[n,N]`` (its images against every caption), matched pair of row i in
    column ``offset + i``; the result is the mean over the rank's rows."""
    if image_rows is None:
        logits = scores * logit_scale
        target = torch.arange(scores.shape[0], device=scores.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
    target = torch.arange(offset, offset + scores.shape[0], device=scores.device)
    return 0.5 * (F.cross_entropy(scores * logit_scale, target) + F.cross_entropy(image_rows * logit_scale, target))


def _masked_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Σ over rows with any valid entry of KL(softmax(teacher) || softmax(student)) along the last dim, over valid
    entries only; divided by the number of such rows ("batchmean" over valid rows). Returns 0 without valid rows."""
    teacher = torch.log_softmax(teacher_logits.masked_fill(~valid, NEG_INF), dim=-1)
    student = torch.log_softmax(student_logits.masked_fill(~valid, NEG_INF), dim=-1)
    rows = valid.any(-1)
    pointwise = torch.where(valid & rows.unsqueeze(-1), teacher.exp() * (teacher - student), 0.0)
    return pointwise.sum() / rows.sum().clamp_min(1)


def sample_distillation_loss(scores_new: torch.Tensor, scores_old: torch.Tensor, temperature: float,
                             image_rows_new: torch.Tensor | None = None,
                             image_rows_old: torch.Tensor | None = None) -> torch.Tensor:
    """KL from the old to the new row-softmax of the score matrix, text→image and image→text. scores[B,B].

    Local-loss form (DESIGN §6.2): caption rows ``scores_*[n,N]`` and image rows ``image_rows_*[n,N]`` of a rank's
    share of a global batch; the mean over those rows."""
    valid = torch.ones_like(scores_new, dtype=torch.bool)
    new, old = scores_new / temperature, scores_old.detach() / temperature
    if image_rows_new is None:
        return 0.5 * (_masked_kl(old, new, valid) + _masked_kl(old.t(), new.t(), valid))
    image_new, image_old = image_rows_new / temperature, image_rows_old.detach() / temperature
    return 0.5 * (_masked_kl(old, new, valid) + _masked_kl(image_old, image_new, torch.ones_like(valid)))


def token_similarity_loss(sim_new: torch.Tensor, sim_old: torch.Tensor, text_mask: torch.Tensor,
                          image_mask: torch.Tensor, kind: str = "mse", temperature: float = 0.1) -> torch.Tensor:
    """Closeness of per-pair token similarity matrices sim[B,T,V]: MSE over valid entries, or row-wise KL."""
    pair_mask = text_mask.unsqueeze(-1) & image_mask.unsqueeze(-2)
    sim_old = sim_old.detach()
    if kind == "mse":
        return torch.where(pair_mask, (sim_new - sim_old) ** 2, 0.0).sum() / pair_mask.sum().clamp_min(1)
    if kind == "kl":
        return _masked_kl(sim_old / temperature, sim_new / temperature, pair_mask)
    raise ValueError(f"token loss kind must be 'mse' or 'kl', got {kind!r}")


def banzhaf_distillation_loss(interaction_new: torch.Tensor, interaction_old: torch.Tensor,
                              text_mask: torch.Tensor, image_mask: torch.Tensor,
                              temperature: float) -> torch.Tensor:
    """KL between row-softmaxes of interaction maps I[B,T,V]: over image tokens for each text token and over text
    tokens for each image token, each ``batchmean`` over valid rows; the mean of the two."""
    pair_mask = text_mask.unsqueeze(-1) & image_mask.unsqueeze(-2)
    new, old = interaction_new / temperature, interaction_old.detach() / temperature
    over_image = _masked_kl(old, new, pair_mask)
    over_text = _masked_kl(old.transpose(1, 2), new.transpose(1, 2), pair_mask.transpose(1, 2))
    return 0.5 * (over_image + over_text)


class InteractionPredictor(nn.Module):
    """``banzhaf_source: module``: a small network predicting the interaction map from the similarity map.

    Each entry (t, u) is described by S[t,u] and its standing in its row and column (gap to the row/column
    maximum and mean over valid tokens); a per-entry MLP maps these features to I[t,u]. Trained online by
    regression onto the estimator's output. sim[B,T,V] -> interaction[B,T,V].
    """

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, 1))

    def forward(self, sim: torch.Tensor, text_mask: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
        pair_mask = text_mask.unsqueeze(-1) & image_mask.unsqueeze(-2)
        masked = sim.masked_fill(~pair_mask, NEG_INF)
        row_max = masked.amax(-1, keepdim=True).clamp_min(-1e4)
        col_max = masked.amax(-2, keepdim=True).clamp_min(-1e4)
        zero = torch.zeros((), dtype=sim.dtype, device=sim.device)
        valid_sim = torch.where(pair_mask, sim, zero)
        row_mean = valid_sim.sum(-1, keepdim=True) / pair_mask.sum(-1, keepdim=True).clamp_min(1)
        col_mean = valid_sim.sum(-2, keepdim=True) / pair_mask.sum(-2, keepdim=True).clamp_min(1)
        features = torch.stack(torch.broadcast_tensors(sim, sim - row_max, sim - col_max, row_mean, col_mean), -1)
        prediction = self.net(torch.where(pair_mask.unsqueeze(-1), features, zero)).squeeze(-1)
        return torch.where(pair_mask, prediction, zero)
