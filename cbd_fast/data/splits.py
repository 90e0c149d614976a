"""Seeded, order-independent splitting: classes into tasks, samples into train/test, samples into chunks."""
from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

from .config import ConfigError


def rng_for(seed: int, *keys: int | str) -> np.random.Generator:
    """A generator for one named stream: ``(seed, *keys)`` seeds it, so streams never share draws.

    Strings are hashed with CRC-32 (stable across runs and platforms, unlike ``hash``).
    """
    entropy = [seed % (1 << 64)]
    for key in keys:
        entropy.append(zlib.crc32(key.encode()) if isinstance(key, str) else key % (1 << 64))
    return np.random.default_rng(entropy)


def even_chunks(count: int, num_chunks: int) -> list[range]:
    """Split ``range(count)`` into ``num_chunks`` contiguous ranges whose sizes differ by at most one
    (the first ones take the remainder: 20 into 3 → 7, 7, 6)."""
    base, extra = divmod(count, num_chunks)
    bounds, start = [], 0
    for chunk in range(num_chunks):
        stop = start + base + (1 if chunk < extra else 0)
        bounds.append(range(start, stop))
        start = stop
    return bounds


def split_classes(class_names: Sequence[str], num_tasks: int | None, classes_per_task, seed: int,
                  shuffle: bool, where: str) -> list[list[str]]:
    """Class-disjoint groups, one per task.

    ``classes_per_task``: ``None`` (all classes, as evenly as possible), an int ``k`` (``k`` classes per task;
    the rest unused), or explicit lists of class names (``num_tasks``, if given, must equal their number).
    Without explicit lists the class order is sorted, then permuted by ``seed`` when ``shuffle``.
    """
    names = sorted(class_names)
    if isinstance(classes_per_task, (list, tuple)):
        groups = [list(group) if isinstance(group, (list, tuple)) else None for group in classes_per_task]
        if any(group is None or not group for group in groups):
            raise ConfigError(f"{where}: classes_per_task must be a list of non-empty lists of class names")
        if num_tasks is not None and num_tasks != len(groups):
            raise ConfigError(f"{where}: num_tasks={num_tasks} but classes_per_task lists {len(groups)} tasks")
        known = set(names)
        seen: set[str] = set()
        for group in groups:
            for name in group:
                if name not in known:
                    raise ConfigError(f"{where}: unknown class {name!r} in classes_per_task; "
                                      f"known classes: {', '.join(names)}")
                if name in seen:
                    raise ConfigError(f"{where}: class {name!r} appears in more than one task")
                seen.add(name)
        return [[str(n) for n in group] for group in groups]

    if num_tasks is None:
        num_tasks = 1
    if shuffle:
        names = [names[i] for i in rng_for(seed, "class-order").permutation(len(names))]
    if classes_per_task is None:
        if num_tasks > len(names):
            raise ConfigError(f"{where}: num_tasks={num_tasks} but only {len(names)} classes")
        return [names[chunk.start:chunk.stop] for chunk in even_chunks(len(names), num_tasks)]
    if isinstance(classes_per_task, bool) or not isinstance(classes_per_task, int) or classes_per_task < 1:
        raise ConfigError(f"{where}: classes_per_task must be null, a positive integer or lists of class names, "
                          f"got {classes_per_task!r}")
    if num_tasks * classes_per_task > len(names):
        raise ConfigError(f"{where}: {num_tasks} tasks × {classes_per_task} classes needs "
                          f"{num_tasks * classes_per_task} classes, only {len(names)} exist")
    return [names[t * classes_per_task:(t + 1) * classes_per_task] for t in range(num_tasks)]


def split_train_test(count: int, test_fraction: float, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """Indices ``0..count-1`` into (train, test), ``round(test_fraction · count)`` test items, both sorted.

    With at least two items and a positive fraction both sides keep at least one item, so that every class
    of a split is present in train and in test.
    """
    num_test = round(test_fraction * count)
    if count >= 2 and test_fraction > 0:
        num_test = min(max(num_test, 1), count - 1)
    order = rng.permutation(count)
    return sorted(order[num_test:].tolist()), sorted(order[:num_test].tolist())
