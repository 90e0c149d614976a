"""``finetune``: sequential fine-tuning, the lower bound."""
from __future__ import annotations

from .base import Method


class Finetune(Method):
    """Sequential fine-tuning: each task trains the model on its own data with the symmetric InfoNCE loss on the
    MaxSim/WTI scores and the prompt pull constraint, nothing else.

    Preserves: nothing beyond what the task's prompt slot keeps (earlier slots are no longer trained); the lower
    bound of every table.

    Defaults: ``prompt: 0.1`` (λ_p, the prompt pull weight, common to every method). Combines with
    ``train.replay.*`` (which makes it experience replay, see ``er``).

    Distributed training: global — the contrastive loss; local — the pull term, per sample.
    """

    name = "finetune"
