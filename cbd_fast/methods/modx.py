"""``modx``: Mod-X, distillation of the old model's contrastive matrix rows with its misranked rows left out."""
from __future__ import annotations

import torch

from .base import Method, Outputs


def modx_distillation_loss(scores_new: torch.Tensor, scores_old: torch.Tensor, temperature: float,
                           image_rows_new: torch.Tensor | None = None, image_rows_old: torch.Tensor | None = None,
                           offset: int = 0) -> torch.Tensor:
    """Mod-X's loss on score matrices ``[B,B]`` (text rows, image columns, pair i ↔ i).

    For each direction (text→image rows, image→text rows): ``Σ_i KL(softmax(old_i/τ) ‖ softmax(new_i/τ))`` over
    the rows ``i`` whose matched pair the old model ranks first (``argmax_j old_ij = i``, ties to the lowest
    index); the other rows are the old model's misalignments and are left out. Summed over rows, not averaged;
    the mean of the two directions.

    Local-loss form (DESIGN §6.2): caption rows ``scores_*[n,N]`` and image rows ``image_rows_*[n,N]`` of a rank's
    share of a global batch, matched pair of row i in column ``offset + i``; summed over those rows."""
    def one_direction(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        keep = old.argmax(-1) == torch.arange(offset, offset + old.shape[0], device=old.device)
        log_old = torch.log_softmax(old / temperature, dim=-1)
        log_new = torch.log_softmax(new / temperature, dim=-1)
        rows = (log_old.exp() * (log_old - log_new)).sum(-1)
        return torch.where(keep, rows, 0.0).sum()

    old = scores_old.detach()
    if image_rows_new is None:
        return 0.5 * (one_direction(scores_new, old) + one_direction(scores_new.t(), old.t()))
    return 0.5 * (one_direction(scores_new, old) + one_direction(image_rows_new, image_rows_old.detach()))


def global_modx_distillation(new: Outputs, old: Outputs, temperature: float) -> torch.Tensor:
    """:func:`modx_distillation_loss` on the global batch's score matrices. In a distributed run: this rank's rows
    of them, their sum scaled by ``N / n`` so that the loop's ``n / N`` weighting of the rank's loss leaves the
    global batch's row sum (DESIGN §6.2)."""
    if not new.distributed:
        return modx_distillation_loss(new.scores.float(), old.scores.float(), temperature)
    (text_new, image_new, offset), (text_old, image_old, _) = new.rows(), old.rows()
    local = modx_distillation_loss(text_new.float(), text_old.float(), temperature, image_new.float(),
                                   image_old.float(), offset)
    return local * (sum(new.shard_sizes) / text_new.shape[0])


class ModX(Method):
    """Mod-X (Ni et al., ICML 2023), on the MaxSim scores: the KL from the previous-task model's contrastive-matrix
    rows to the current model's, both directions, on the current (and replay) batch, after "cognition alignment":
    rows where the old model ranks a wrong pair first are left out (the public code replaces them by the new
    model's rows, which contributes nothing).

    Preserves: the old model's distribution of similarity over the non-matching pairs of each row (the
    off-diagonal information) wherever the old model was right.

    Defaults: ``weight: 20.0`` (α), ``temperature: 1.0``, ``prompt: 0.1`` — the public code's α = 20, softmax of
    the raw cosine matrix (τ = 1) and a KL summed over rows (so its strength grows with the batch). The public code
    distils global-embedding cosines; here the rows are the backbone's MaxSim scores. Combines with replay.

    Distributed training: global — the contrastive and the distillation terms (each rank's rows of the global
    score matrices; the rank's sum is scaled by ``N / n`` so that the loop's ``n / N`` weighting leaves the
    global batch's row sum, as in one process).
    """

    name = "modx"
    sweep_weights = ("weight",)
    defaults = dict(Method.defaults, weight=20.0, temperature=1.0)
    positive = ("temperature",)

    def loss_terms(self, student, batch, task_index, step_seed):
        terms = super().loss_terms(student, batch, task_index, step_seed)
        teacher = self.teacher(batch)
        if teacher is not None and self.args["weight"]:
            terms.add("modx", global_modx_distillation(student, teacher, self.args["temperature"]),
                      self.args["weight"])
        return terms
