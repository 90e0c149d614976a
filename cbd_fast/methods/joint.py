"""``joint``: one training stage on the union of all tasks' data, the upper bound."""
from __future__ import annotations

from .finetune import Finetune


class Joint(Finetune):
    """Joint training: the first stage trains on the union of every task's training set (``train.epochs``
    epochs over all of it, one shuffled stream, prompt slot 0, InfoNCE and the pull term as ``finetune``); the
    later stages train nothing.

    Preserves: everything, by never leaving any task's data; the upper bound of every table.

    Evaluation rows: the loop still evaluates after every stage, so the accuracy matrix keeps one row per task.
    Row 1 (after the first stage) is the joint model on every task; the later rows evaluate the same, unchanged
    model again and repeat it, so forgetting and backward transfer are 0 by construction and the diagonal
    ("learning accuracy") is the joint model's accuracy on each task. Only the final row is the reference a
    sequential method is compared with. ``seconds_per_epoch`` holds the first stage's epochs only (each an epoch
    over all tasks' data).

    Defaults: ``prompt: 0.1``. Does not combine with replay (every sample is already there): ``train.replay``
    must be ``none``.

    Distributed training: global — the contrastive loss.
    """

    name = "joint"
    replay = "forbidden"

    def train_tasks(self, task_index: int) -> list[int]:
        return list(range(len(self.trainer.tasks))) if task_index == 0 else []
