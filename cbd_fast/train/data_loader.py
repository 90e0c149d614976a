"""The training data pipeline: which samples make up each step (the epoch plan, the same on every rank and for
every worker count), and a ``torch.utils.data.DataLoader`` that decodes, augments, tokenises and collates a
rank's share of each step in worker processes.

Determinism: a training item is a pure function of ``(seed, epoch, index)`` (caption choice and augmentation are
seeded per item, :mod:`cbd_fast.data.dataset`), and the plan is a pure function of ``(seed, task, epoch, step)``,
so a batch is bitwise the same whichever process builds it: 0 or N workers, any rank, before or after a resume.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from ..data import Task
from .distributed import shard_bounds
from .replay import ReplayBuffer


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers (run seed, task, epoch, step...): the same parts give the same seed."""
    value = 0x243F6A8885A308D3
    for part in parts:
        value = ((value ^ (part & 0xFFFFFFFFFFFFFFFF)) * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) \
            & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 29
    return value & 0x7FFFFFFFFFFFFFFF


@dataclass
class Step:
    """The samples of one global step: ``current`` then ``replay`` rows, each a ``(task, index)`` pair."""

    current: list[tuple[int, int]]
    replay: list[tuple[int, int]]

    def share(self, rank: int, world_size: int) -> "Step":
        """Rank ``rank``'s contiguous share of the current rows and of the replay rows."""
        (a, b), (c, d) = (shard_bounds(len(rows), world_size)[rank] for rows in (self.current, self.replay))
        return Step(self.current[a:b], self.replay[c:d])

    def shard_sizes(self, world_size: int) -> list[int]:
        """Rows of every rank's share: ``[n_0, …, n_{W-1}]``."""
        return [b - a + d - c for (a, b), (c, d) in zip(shard_bounds(len(self.current), world_size),
                                                         shard_bounds(len(self.replay), world_size))]


def epoch_plan(tasks: Sequence[Task], sources: Sequence[int], replay: ReplayBuffer, seed: int, task_index: int,
               epoch: int, batch_size: int, replay_batch_size: int) -> list[Step]:
    """Every step of an epoch of stage ``task_index``: a shuffle of the union of the ``sources`` tasks' training
    sets (seeded by ``(seed, task, epoch)``) cut into batches of ``batch_size``, each with ``replay_batch_size``
    draws from the replay buffer (seeded by ``(seed, task, epoch, step)``)."""
    starts = [0]
    for source in sources:
        starts.append(starts[-1] + len(tasks[source].train))
    order = torch.randperm(starts[-1], generator=torch.Generator().manual_seed(
        derived_seed(seed, task_index, epoch))).tolist()
    steps = []
    for step, start in enumerate(range(0, len(order), batch_size)):
        current = []
        for position in order[start:start + batch_size]:
            which = bisect.bisect_right(starts, position) - 1
            current.append((sources[which], position - starts[which]))
        generator = torch.Generator().manual_seed(derived_seed(seed, task_index, epoch, step, 1))
        steps.append(Step(current, replay.sample(replay_batch_size, generator)))
    return steps


class StepDataset(Dataset):
    """Item ``k``: the collated batch of ``steps[k]`` at ``epoch`` (CPU tensors): ``images[n,3,S,S]``,
    ``ids[n,L]``, ``mask[n,L]``, ``task[n]``, ``index[n]``, ``replay[n]`` (bool, replay rows last)."""

    def __init__(self, tasks: Sequence[Task], steps: Sequence[Step], epoch: int,
                 tokenize: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]):
        self.datasets = [task.train for task in tasks]
        self.steps, self.epoch, self.tokenize = list(steps), epoch, tokenize

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, k: int) -> dict[str, Any]:
        step = self.steps[k]
        items = []
        for task, index in step.current + step.replay:
            dataset = self.datasets[task]
            dataset.set_epoch(self.epoch)  # a worker's own copy of the dataset: nothing shared changes
            items.append(dict(dataset[index], task=task))
        batch = collate(items, self.tokenize)
        batch["replay"] = torch.arange(len(items)) >= len(step.current)
        return batch


def collate(items: list[dict], tokenize) -> dict[str, Any]:
    """Images, token ids and masks, ``task[B]`` and ``index[B]`` (which training sample each row is), on the CPU."""
    ids, mask = tokenize([item["caption"] for item in items])
    return {"images": torch.stack([item["image"] for item in items]), "ids": ids, "mask": mask,
            "task": torch.tensor([item["task"] for item in items], dtype=torch.long),
            "index": torch.tensor([item["index"] for item in items], dtype=torch.long)}


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch with images, ids, mask and replay on ``device`` (``task`` and ``index`` stay on the CPU)."""
    moved = dict(batch)
    for key in ("images", "ids", "mask", "replay"):
        if key in moved:
            moved[key] = moved[key].to(device, non_blocking=True)
    return moved


def make_loader(dataset: StepDataset, workers: int, pin_memory: bool) -> DataLoader:
    """Batches in step order, built by ``workers`` processes (0: in this process), two steps ahead per worker,
    in page-locked memory when ``pin_memory`` (CUDA)."""
    return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers, pin_memory=pin_memory,
                      prefetch_factor=2 if workers else None, persistent_workers=False)
