"""``ewc``: Elastic Weight Consolidation with the diagonal Fisher of the contrastive loss."""
from __future__ import annotations

import torch

from ..train.losses import contrastive_loss
from .base import Method, encode, prompt_queries


def ewc_penalty(params: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor],
                fisher: dict[str, torch.Tensor]) -> torch.Tensor:
    """``½ Σ_i F_i (θ_i − θ*_i)²`` over the named parameters present in ``fisher``."""
    total = None
    for name, weight in fisher.items():
        term = (weight * (params[name] - anchor[name]) ** 2).sum()
        total = term if total is None else total + term
    return 0.5 * total


class EWC(Method):
    """Elastic Weight Consolidation (Kirkpatrick et al. 2017), online form (Schwarz et al. 2018): after each task,
    the diagonal empirical Fisher of the contrastive loss on that task's training data is added to the decayed
    running Fisher, ``F ← decay·F + F_t``, and the parameters become the anchor ``θ*``; later tasks add
    ``weight · ½ Σ F (θ − θ*)²``.

    ``F_t`` is the mean over the task's training batches (``train.batch_size``, index order, no replay, prompt
    slot of the task) of the squared minibatch gradient, as in Avalanche's EWC; per-sample gradients would cost a
    backward pass per sample.

    Preserves: the parameters that mattered for earlier tasks' contrastive loss, in proportion to their Fisher.

    Defaults: ``weight: 1000.0`` (λ), ``decay: 1.0`` (γ; 1 sums the tasks' Fishers), ``prompt: 0.1``. With
    λ = 1000 the penalty is about a tenth of the loss on the default scenario (``ewc`` ≈ 1–2·10⁻⁴ during tasks 2
    and 3 of a 10-epoch run, against a contrastive loss of about 2). Combines with replay.

    Distributed training: global — the contrastive loss; the penalty involves no batch; every rank computes the
    Fisher on the whole task at its end (the same numbers on every rank, no communication).
    """

    name = "ewc"
    sweep_weights = ("weight",)
    defaults = dict(Method.defaults, weight=1000.0, decay=1.0)

    def __init__(self, args, trainer):
        super().__init__(args, trainer)
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

    def loss_terms(self, student, batch, task_index, step_seed):
        terms = super().loss_terms(student, batch, task_index, step_seed)
        if self.fisher and self.args["weight"]:
            terms.add("ewc", ewc_penalty(dict(self.model.named_parameters()), self.anchor, self.fisher),
                      self.args["weight"])
        return terms

    def end_task(self, task_index):
        model = self.model
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        squares = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in named}
        batches = 0
        model.train()
        for batch in self.task_batches(task_index):
            model.zero_grad(set_to_none=True)
            with self.autocast():
                scores = encode(model, batch, prompt_queries(model, batch), train_task=task_index).scores
                loss = contrastive_loss(scores.float(), model.scale())
            loss.backward()
            for name, p in named:
                if p.grad is not None:
                    squares[name] += p.grad.float() ** 2
            batches += 1
        model.zero_grad(set_to_none=True)
        decay = self.args["decay"]
        for name, square in squares.items():
            fresh = square / max(1, batches)
            self.fisher[name] = decay * self.fisher[name] + fresh if name in self.fisher else fresh
        self.anchor = {name: p.detach().clone() for name, p in named}

    def get_extra_state(self):
        return {"fisher": self.fisher, "anchor": self.anchor}

    def set_extra_state(self, state):
        device = self.trainer.device
        self.fisher = {name: value.to(device) for name, value in state["fisher"].items()}
        self.anchor = {name: value.to(device) for name, value in state["anchor"].items()}
