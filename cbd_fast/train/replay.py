"""Replay buffer of sample indices (task, index) from earlier tasks — never pixel copies."""
from __future__ import annotations

import torch


class ReplayBuffer:
    """``reservoir``: uniform reservoir sampling over every training sample seen; ``per_task``: an equal quota per
    finished task (the buffer is re-balanced when a task is added); ``none``: empty.

    Entries are ``(task, index)`` pairs into the tasks' training sets. Deterministic given the generator.
    """

    def __init__(self, strategy: str, size: int):
        if strategy not in ("reservoir", "per_task", "none"):
            raise ValueError(f"train.replay.strategy must be reservoir, per_task or none, got {strategy!r}")
        if size < 0:
            raise ValueError(f"train.replay.size must be >= 0, got {size}")
        self.strategy, self.size = strategy, size
        self.entries: list[tuple[int, int]] = []
        self.seen = 0
        self.per_task: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def add_task(self, task: int, num_samples: int, generator: torch.Generator) -> None:
        """Offer all ``num_samples`` training samples of a finished task."""
        if self.strategy == "none" or self.size == 0:
            return
        if self.strategy == "reservoir":
            for index in range(num_samples):
                self.seen += 1
                if len(self.entries) < self.size:
                    self.entries.append((task, index))
                else:
                    slot = int(torch.randint(0, self.seen, (1,), generator=generator))
                    if slot < self.size:
                        self.entries[slot] = (task, index)
            return
        self.per_task[task] = torch.randperm(num_samples, generator=generator).tolist()
        quota = self.size // len(self.per_task)
        self.entries = [(t, i) for t in sorted(self.per_task) for i in self.per_task[t][:quota]]

    def sample(self, count: int, generator: torch.Generator) -> list[tuple[int, int]]:
        """``count`` entries drawn uniformly with replacement (empty list when the buffer is empty)."""
        if not self.entries or count <= 0:
            return []
        picks = torch.randint(0, len(self.entries), (count,), generator=generator).tolist()
        return [self.entries[p] for p in picks]

    def state_dict(self) -> dict:
        return {"entries": [list(e) for e in self.entries], "seen": self.seen,
                "per_task": {str(k): v for k, v in self.per_task.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.entries = [tuple(e) for e in state["entries"]]
        self.seen = state["seen"]
        self.per_task = {int(k): v for k, v in state["per_task"].items()}
