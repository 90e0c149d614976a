"""L2P-style prompt pool: one prompt slot per task, chosen at inference by key matching."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn


class PromptPool(nn.Module):
    """A pool of ``pool_size`` learnable prompts, each ``length`` tokens of size ``width``, with one key each.

    Parameters:
        prompts: ``[pool_size, length, width]``, initialised N(0, 0.02²) — the scale of CLIP's token
            embeddings, so that fresh prompts barely perturb a pretrained tower.
        keys: ``[pool_size, key_dim]``, initialised U(-1, 1) as in L2P (only their direction matters).

    Buffer ``num_active``: slots of the tasks seen so far; inference only picks among ``0 .. num_active-1``.
    It starts at 1, grows to ``t + 1`` whenever slot ``t`` is selected for training, and can be set with
    :meth:`set_num_active`. It is saved in the state dict.
    """

    def __init__(self, pool_size: int, length: int, width: int, key_dim: int):
        super().__init__()
        if pool_size < 1 or length < 1:
            raise ValueError(f"prompt pool needs pool_size >= 1 and length >= 1, got {pool_size}, {length}")
        self.pool_size = pool_size
        self.length = length
        self.prompts = nn.Parameter(torch.randn(pool_size, length, width) * 0.02)
        self.keys = nn.Parameter(torch.empty(pool_size, key_dim).uniform_(-1.0, 1.0))
        self.register_buffer("num_active", torch.tensor(1, dtype=torch.long))

    def set_num_active(self, n: int) -> None:
        """Restrict inference-time selection to slots ``0 .. n-1`` (the tasks seen so far)."""
        if not 1 <= n <= self.pool_size:
            raise ValueError(f"num_active must be in [1, {self.pool_size}], got {n}")
        self.num_active.fill_(n)

    def select(self, query: torch.Tensor, task_id: Union[int, torch.Tensor, None] = None,
               train_task: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Choose one slot per sample.

        Args:
            query: ``[B, key_dim]`` query features (detached here: the pull loss only moves the keys).
            task_id: oracle selection — an int for the whole batch or a ``[B]`` long tensor per sample.
            train_task: training on task ``t`` uses slot ``t`` for every sample.

        Without either, each sample independently takes the active slot whose key has the highest cosine
        with its own query (no batch vote; ties go to the lowest slot).

        Returns:
            ``(index LongTensor[B], pull_loss scalar)``; ``pull_loss`` is the mean cosine between each query and
            its selected key (to be maximised: the training loss subtracts it).
        """
        if task_id is not None and train_task is not None:
            raise ValueError("give task_id (oracle) or train_task, not both")
        batch = query.shape[0]
        query = query.detach()
        if train_task is not None:
            train_task = int(train_task)
            if not 0 <= train_task < self.pool_size:
                raise ValueError(f"train_task {train_task} is outside the pool of {self.pool_size} slots")
            index = torch.full((batch,), train_task, dtype=torch.long, device=query.device)
            self.num_active.clamp_(min=train_task + 1)
        elif task_id is not None:
            index = torch.as_tensor(task_id, dtype=torch.long, device=query.device).expand(batch).clone()
            if index.numel() and (index.min() < 0 or index.max() >= self.pool_size):
                raise ValueError(f"task_id outside the pool of {self.pool_size} slots: {index.tolist()}")
        else:
            cosine = F.normalize(query, dim=-1) @ F.normalize(self.keys, dim=-1).T.to(query.dtype)  # [B, pool]
            # Mask rather than slice the inactive slots: no device-to-host read of num_active.
            inactive = torch.arange(self.pool_size, device=query.device) >= self.num_active
            index = cosine.masked_fill(inactive, float("-inf")).argmax(dim=-1)
        pull_loss = F.cosine_similarity(query.to(self.keys.dtype), self.keys.index_select(0, index), dim=-1).mean()
        return index, pull_loss

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        """Prompt tokens of the selected slots: ``index[B]`` -> ``[B, length, width]``.

        ``index_select`` rather than ``prompts[index]``: its backward adds the samples' gradients into their slot
        in sample order (``index_add_``), so the gradient is the same bits at any thread count (the backward of
        advanced indexing sums them in another order)."""
        return self.prompts.index_select(0, index)

    def extra_repr(self) -> str:
        return f"pool_size={self.pool_size}, length={self.length}, width={self.prompts.shape[-1]}, " \
               f"key_dim={self.keys.shape[-1]}"
