"""``cbd``: Coalition Banzhaf Distillation and its ablations (DESIGN §6)."""
from __future__ import annotations

import torch

from ..banzhaf import banzhaf_interaction
from ..train.losses import InteractionPredictor, banzhaf_distillation_loss, token_similarity_loss
from .base import Method, global_sample_distillation


class CBD(Method):
    """Coalition Banzhaf Distillation (DESIGN §6): on the current (and replay) batch, distil from the previous-task
    model (a) the sample-level score rows (KL, both directions), (b) the per-pair token similarity maps
    (MSE or row KL) and (c) the pairwise Banzhaf interactions of text and image tokens, estimated with
    ``banzhaf_interaction`` on both models' similarity maps with the same seed (common random numbers), with the
    gradient through the student's estimate.

    Preserves: the previous model's cross-modal structure at three grains — how it ranks the batch (sample), which
    token pairs match (token), and which token pairs cooperate in a match (Banzhaf interactions).

    Defaults: ``sample: 1.0`` (λ_s), ``sample_temperature: 0.05``, ``token: 1.0`` (λ_tok), ``token_kind: mse``
    (``mse`` | ``kl``), ``token_temperature: 0.1``, ``banzhaf: 1.0`` (λ_bz), ``banzhaf_source: estimator``
    (``estimator`` | ``module``), ``banzhaf_samples: 64`` (K paired draws), ``banzhaf_estimator: paired``
    (``paired`` | ``msr``), ``banzhaf_temperature: 0.01``, ``module_hidden: 32``, ``prompt: 0.1`` (λ_p).
    Ablations as arguments: sample-only ``token: 0, banzhaf: 0`` (= ``lwf``), no Banzhaf ``banzhaf: 0``, learned
    module ``banzhaf_source: module`` (a small network trained online by regression onto the estimator's output
    predicts the interaction maps of both models; its fit is the ``module_fit`` term). Combines with replay.

    Distributed training: global — the contrastive and sample-level terms (each rank's rows of the global score
    matrices); local — the token and Banzhaf terms and the module fit, which are per matched pair (each rank
    estimates its own pairs' interactions with its rank's Banzhaf seed, so the draws differ from one process's).
    """

    name = "cbd"
    sweep_weights = ("sample", "token", "banzhaf")
    defaults = dict(Method.defaults, sample=1.0, sample_temperature=0.05, token=1.0, token_kind="mse",
                    token_temperature=0.1, banzhaf=1.0, banzhaf_source="estimator", banzhaf_samples=64,
                    banzhaf_estimator="paired", banzhaf_temperature=0.01, module_hidden=32)
    choices = {"token_kind": ("mse", "kl"), "banzhaf_source": ("estimator", "module"),
               "banzhaf_estimator": ("paired", "msr")}
    positive = ("sample_temperature", "token_temperature", "banzhaf_samples", "banzhaf_temperature", "module_hidden")

    def __init__(self, args, trainer):
        super().__init__(args, trainer)
        self.predictor = InteractionPredictor(self.args["module_hidden"]) \
            if self.args["banzhaf_source"] == "module" else None

    def loss_terms(self, student, batch, task_index, step_seed):
        args = self.args
        terms = super().loss_terms(student, batch, task_index, step_seed)
        if not (args["sample"] or args["token"] or args["banzhaf"]):
            return terms
        teacher = self.teacher(batch)
        if teacher is None:
            return terms
        if args["sample"]:
            terms.add("sample", global_sample_distillation(student, teacher, args["sample_temperature"]),
                      args["sample"])
        if not (args["token"] or args["banzhaf"]):
            return terms
        # per-pair token similarity maps of matched pairs: S[b] = X[b] Y[b]^T, over the text positions up to the
        # batch's longest caption (the padding beyond is no player; the estimates of the others are bitwise those
        # over the padded length, for a third less of the kernels' work on the default captions)
        text, old_text = student.text.without_trailing_padding(), teacher.text.without_trailing_padding()
        image, old_image = student.image, teacher.image
        sim = torch.bmm(text.tokens.float(), image.tokens.float().transpose(1, 2))
        old_sim = torch.bmm(old_text.tokens.float(), old_image.tokens.float().transpose(1, 2))
        text_mask, image_mask = text.mask, image.mask
        if args["token"]:
            terms.add("token", token_similarity_loss(sim, old_sim, text_mask, image_mask, args["token_kind"],
                                                     args["token_temperature"]), args["token"])
        if args["banzhaf"]:
            def estimate(s, t, i):  # common random numbers: teacher and student share the seed
                return banzhaf_interaction(s, text_mask, image_mask, t.weight.float(), i.weight.float(),
                                           num_samples=args["banzhaf_samples"], seed=step_seed,
                                           estimator=args["banzhaf_estimator"]).interaction

            with torch.no_grad():
                old_interaction = estimate(old_sim, old_text, old_image)
            if self.predictor is None:
                new_interaction = estimate(sim, text, image)
            else:  # learned module: regress onto the estimator, distil the module's predictions
                fit = ((self.predictor(old_sim, text_mask, image_mask) - old_interaction) ** 2).mean()
                terms.add("module_fit", fit)
                new_interaction = self.predictor(sim, text_mask, image_mask)
                with torch.no_grad():
                    old_interaction = self.predictor(old_sim, text_mask, image_mask)
            terms.add("banzhaf", banzhaf_distillation_loss(new_interaction, old_interaction, text_mask, image_mask,
                                                           args["banzhaf_temperature"]), args["banzhaf"])
        return terms
