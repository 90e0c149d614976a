"""``icsd``: Intra-modal Consistency via Soft-label Distillation, ported to the continual dual encoder
(PEERS §3.4)."""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import Method, encode, prompt_queries


def soft_label_loss(scores: torch.Tensor, image_relation: torch.Tensor, text_relation: torch.Tensor,
                    soft_temperature: float, cross_temperature: torch.Tensor) -> torch.Tensor:
    """ICSD's soft-label loss: ``½[KL(softmax(F^I/τ_s) ‖ softmax(S_i2t/τ_c)) + KL(softmax(F^T/τ_s) ‖
    softmax(S_t2i/τ_c))]``, batchmean. ``scores[B,B]`` (text rows, image columns); ``image_relation``,
    ``text_relation`` ``[B,B]`` the fused intra-modal similarities F^I, F^T (targets; gradients flow through them
    as in the public code)."""
    def kl(target_logits, logits):
        target = torch.log_softmax(target_logits / soft_temperature, dim=-1)
        return (target.exp() * (target - torch.log_softmax(logits / cross_temperature, dim=-1))).sum(-1).mean()

    return 0.5 * (kl(image_relation, scores.t()) + kl(text_relation, scores))


class ICSD(Method):
    """ICSD ported to the continual dual encoder (PEERS §3.4): besides the InfoNCE on the MaxSim scores, for every
    image of the current (and replay) batch, the distribution of its scores over the batch's captions should match
    how similar the image is to the batch's other images (and likewise for captions):
    ``F^I = internal·S^I_int + (1 − internal)·S^I_ext`` fused from the student's own intra-modal cosines (pooled
    embeddings, not detached) and an external teacher's, and ``L_soft`` = the KL above with τ_s fixed and a
    learnable τ_c.

    Preserves: the teacher's intra-modal neighbourhoods (which images resemble which, which captions resemble
    which), imposed on the cross-modal score distribution.

    Defaults: ``soft: 0.15`` (weight of L_soft), ``internal: 0.3`` (weight of S_int; S_ext gets 1 − internal),
    ``soft_temperature: 1.0`` (τ_s), ``cross_temperature_init: 0.45``, ``cross_temperature_min: 0.1``,
    ``cross_temperature_max: 0.99`` (τ_c), ``teacher: previous`` (``previous`` | ``initial``), ``prompt: 0.1``.
    Combines with replay.

    Substitutions (the port's, stated in the README): the external teachers (precomputed Unicom image features
    and an online all-mpnet-base-v2 caption encoder) are replaced by the pooled embeddings of a frozen copy of this
    backbone — the previous-task model (``teacher: previous``; PEERS §3.4's continual variant; during the first
    task there is none and F = S_int) or the model before any training (``teacher: initial``, the analogue of a
    task-agnostic pretrained encoder when ``model.pretrained`` is set); the cross-modal similarity S is the
    backbone's MaxSim score, and the PDM (ContraNorm) heads are left out, so evaluation is unchanged and does not
    depend on the composition of a test batch; the InfoNCE uses the backbone's learnable temperature; τ_c is kept in
    [min, max] by a sigmoid parametrisation instead of clamping.

    Distributed training: global — the contrastive loss; local — the soft-label loss, on each rank's share of the
    batch, as in the public code (``is_all_gather: False``).
    """

    name = "icsd"
    sweep_weights = ("soft", "internal")
    defaults = dict(Method.defaults, soft=0.15, internal=0.3, soft_temperature=1.0, cross_temperature_init=0.45,
                    cross_temperature_min=0.1, cross_temperature_max=0.99, teacher="previous")
    choices = {"teacher": ("previous", "initial")}
    positive = ("soft_temperature", "cross_temperature_init", "cross_temperature_min", "cross_temperature_max")

    @classmethod
    def check(cls, args):
        if args["internal"] > 1:
            raise ValueError(f"method_args.internal (method 'icsd') must be in [0, 1], got {args['internal']!r}")
        low, high, init = args["cross_temperature_min"], args["cross_temperature_max"], args["cross_temperature_init"]
        if not low < init < high:
            raise ValueError("method_args.cross_temperature_init (method 'icsd') must lie strictly between "
                             f"cross_temperature_min and cross_temperature_max, got {low} < {init} < {high}")

    def __init__(self, args, trainer):
        super().__init__(args, trainer)
        low, high = self.args["cross_temperature_min"], self.args["cross_temperature_max"]
        fraction = (self.args["cross_temperature_init"] - low) / (high - low)
        self.cross_temperature_logit = nn.Parameter(torch.tensor(math.log(fraction / (1 - fraction))))
        # not a submodule: the initial model is rebuilt from the seed (or the pretrained checkpoint) on resume
        self._initial = [self.frozen_copy(trainer.model)] if self.args["teacher"] == "initial" else None

    def cross_temperature(self) -> torch.Tensor:
        low, high = self.args["cross_temperature_min"], self.args["cross_temperature_max"]
        return low + (high - low) * torch.sigmoid(self.cross_temperature_logit)

    @torch.no_grad()
    def external(self, batch):
        """The teacher's outputs on the batch, or None (previous-task teacher during the first task)."""
        if self._initial is None:
            return self.teacher(batch)
        model = self._initial[0]
        return encode(model, batch, prompt_queries(model, batch), train_task=None)

    def loss_terms(self, student, batch, task_index, step_seed):
        args = self.args
        terms = super().loss_terms(student, batch, task_index, step_seed)
        if not args["soft"]:
            return terms
        image, text = student.image.pooled.float(), student.text.pooled.float()
        image_relation, text_relation = image @ image.t(), text @ text.t()
        teacher = self.external(batch)
        if teacher is not None:
            old_image, old_text = teacher.image.pooled.float(), teacher.text.pooled.float()
            internal = args["internal"]
            image_relation = internal * image_relation + (1 - internal) * (old_image @ old_image.t())
            text_relation = internal * text_relation + (1 - internal) * (old_text @ old_text.t())
        terms.add("soft", soft_label_loss(student.scores.float(), image_relation, text_relation,
                                          args["soft_temperature"], self.cross_temperature()), args["soft"])
        return terms
