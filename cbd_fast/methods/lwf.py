"""``lwf``: Learning without Forgetting for retrieval (KL between old and new score rows)."""
from __future__ import annotations

from .base import Method, global_sample_distillation


class LwF(Method):
    """Learning without Forgetting (Li & Hoiem 2016), for retrieval: on the current (and replay) batch, the KL
    from the previous-task model's row-softmax of the MaxSim score matrix to the current model's, text→image and
    image→text, at temperature ``temperature`` (DESIGN §6's ``L_sample``).

    Preserves: how the previous-task model ranks the batch's images for each caption and captions for each image.

    Defaults: ``weight: 1.0`` (λ), ``temperature: 0.05``, ``prompt: 0.1``. Identical to ``cbd`` with
    ``token: 0, banzhaf: 0`` (its sample-only ablation), kept under its standard name. Combines with replay.

    Distributed training: global — the contrastive and the KL terms (each rank's caption and image rows over all
    ranks' samples, as in one process).
    """

    name = "lwf"
    sweep_weights = ("weight",)
    defaults = dict(Method.defaults, weight=1.0, temperature=0.05)
    positive = ("temperature",)

    def loss_terms(self, student, batch, task_index, step_seed):
        terms = super().loss_terms(student, batch, task_index, step_seed)
        teacher = self.teacher(batch)
        if teacher is not None and self.args["weight"]:
            terms.add("lwf", global_sample_distillation(student, teacher, self.args["temperature"]),
                      self.args["weight"])
        return terms
