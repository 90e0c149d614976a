"""``er``: experience replay with the loop's buffer of earlier tasks' samples."""
from __future__ import annotations

from .finetune import Finetune


class ExperienceReplay(Finetune):
    """Experience replay: fine-tuning on every batch of the current task with a batch drawn from a buffer of
    earlier tasks' training samples appended (one InfoNCE over both, as ``finetune`` with replay).

    Preserves: the earlier tasks' image–caption alignment, by training on stored samples of them.

    Defaults: ``prompt: 0.1``. The buffer is ``train.replay`` (reservoir of sample indices, DESIGN §6); when that
    is ``strategy: none`` (the default config), ``er`` uses ``strategy: reservoir, size: 128, batch_size: 16``
    and the resolved config records it.

    Distributed training: global — the contrastive loss (current and replay rows of every rank).
    """

    name = "er"
    replay = "required"
