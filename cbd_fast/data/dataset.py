"""The one dataset class every scenario produces, and the task record that pairs two of them."""
from __future__ import annotations

from collections.abc import Sequence
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .images import Augment, BadImageError, augment_image, image_file_problem, load_image, normalize_uint8, \
    resize_uint8

logger = logging.getLogger("cbd_fast.data")

ON_BAD_IMAGE = ("error", "skip")

_MASK64 = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    """One SplitMix64 step: a cheap, well-mixed 64-bit hash that needs no global random state."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def caption_choice(seed: int, index: int, epoch: int, num_captions: int) -> int:
    """Which caption a train item shows at ``epoch``: a per-sample offset from ``(seed, index)`` plus the epoch.

    Adding the epoch (rather than hashing it in) makes every sample cycle through all its captions once per
    ``num_captions`` epochs, while the offset keeps different samples on different captions in the same epoch.
    """
    offset = _splitmix64(_splitmix64(seed & _MASK64) ^ (index & _MASK64))
    return (offset + epoch) % num_captions


_AUGMENT_SALT = 0x6175676D656E7421  # keeps the augmentation stream apart from the caption offset


def augment_seed(seed: int, index: int, epoch: int) -> int:
    """Seed of the per-item generator that draws the train augmentation of sample ``index`` at ``epoch``."""
    value = _splitmix64(_splitmix64(_splitmix64((seed ^ _AUGMENT_SALT) & _MASK64) ^ (index & _MASK64))
                        ^ (epoch & _MASK64))
    return value & ((1 << 63) - 1)


def report_skipped_images(skipped: Sequence[tuple[Path, str]], shown: int = 5) -> None:
    """One warning for images dropped by ``on_bad_image: skip``: the count, then the first few with the reason."""
    if not skipped:
        return
    lines = "\n  ".join(f"{path}: {reason}" for path, reason in skipped[:shown])
    more = f"\n  … and {len(skipped) - shown} more" if len(skipped) > shown else ""
    logger.warning("skipped %d unreadable image file(s) (on_bad_image: skip) with their captions:\n  %s%s",
                   len(skipped), lines, more)


class ImageTextDataset(Dataset):
    """Image–caption pairs of one split of one task.

    Item ``i`` is ``dict(image=float32 [3, S, S] (CLIP-normalised), caption=str, label=int, index=i)``, S being
    ``image_size``. A sample may have several captions: ``captions_of(i)`` lists all of them; a train dataset
    returns the one picked by :func:`caption_choice` from ``(seed, i, epoch)`` (see :meth:`set_epoch`), a test
    dataset always returns the first.

    Images are either held (``uint8`` tensor ``[N, 3, H, W]``, resized once to S if needed) or given as file paths
    decoded on every access (or once up front with ``preload=True``).

    ``augment`` (train datasets only; ignored when ``train`` is false) applies :func:`augment_image` to the
    ``uint8`` image before normalisation, drawing from a generator seeded by :func:`augment_seed` of
    ``(seed, index, epoch)``: the same item at the same epoch is always the same tensor, whatever the worker,
    process or global RNG state.

    ``on_bad_image`` (file paths only): every file is checked here (:func:`image_file_problem`: it exists and
    decodes), so that a bad file stops a run before training, not in a later task. ``"error"`` raises
    :class:`~cbd_fast.data.images.BadImageError` naming every bad file; ``"skip"`` drops the bad ones with their
    captions and labels, listing their paths in ``skipped`` (and why, in ``skip_reasons``) and logging a warning
    unless ``report_skipped=False`` (the scenario builder reports once for all its datasets instead). A file
    that goes bad after the check still raises :class:`~cbd_fast.data.images.BadImageError` naming it when read.
    """

    def __init__(self, images: torch.Tensor | Sequence[str | Path], captions: Sequence[Sequence[str]],
                 labels: Sequence[int] | torch.Tensor | None = None, *, image_size: int, train: bool,
                 seed: int = 0, preload: bool = False, augment: Augment | None = None,
                 on_bad_image: str = "error", report_skipped: bool = True):
        num_samples = len(captions)
        if len(images) != num_samples:
            raise ValueError(f"{len(images)} images but {num_samples} caption lists")
        if on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"on_bad_image must be one of {', '.join(ON_BAD_IMAGE)}, got {on_bad_image!r}")
        self.skipped: list[Path] = []  # dropped image files (on_bad_image="skip"), in input order
        self.skip_reasons: dict[Path, str] = {}
        if not isinstance(images, torch.Tensor):
            problems = [image_file_problem(path) for path in images]
            if any(problems) and on_bad_image == "error":
                bad = [(Path(path), problem) for path, problem in zip(images, problems) if problem]
                raise BadImageError(f"{len(bad)} of {len(images)} image file(s) cannot be used (on_bad_image: "
                                    f"error; `skip` drops them with their captions): "
                                    + "; ".join(f"{path}: {problem}" for path, problem in bad[:5])
                                    + (f"; … and {len(bad) - 5} more" if len(bad) > 5 else ""))
            if any(problems):
                keep = [i for i, problem in enumerate(problems) if problem is None]
                self.skip_reasons = {Path(images[i]): problem for i, problem in enumerate(problems) if problem}
                self.skipped = [Path(images[i]) for i, problem in enumerate(problems) if problem]
                images, captions = [images[i] for i in keep], [captions[i] for i in keep]
                if labels is not None:
                    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
                    if labels.numel() != num_samples:
                        raise ValueError(f"{labels.numel()} labels but {num_samples} samples")
                    labels = labels[keep]
                num_samples = len(keep)
                if report_skipped:
                    report_skipped_images([(path, self.skip_reasons[path]) for path in self.skipped])
        self.captions: list[list[str]] = [list(caps) for caps in captions]
        for index, caps in enumerate(self.captions):
            if not caps or any(not isinstance(c, str) or not c.strip() for c in caps):
                raise ValueError(f"sample {index} needs at least one caption, each a non-blank string, got {caps!r}")
        if labels is None:
            labels = [-1] * num_samples
        self.labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if self.labels.numel() != num_samples:
            raise ValueError(f"{self.labels.numel()} labels but {num_samples} samples")
        self.image_size = int(image_size)
        self.train = bool(train)
        self.seed = int(seed)
        self.epoch = 0
        self.augment = augment if self.train else None

        self.image_paths: list[Path] | None = None
        self.image_tensor: torch.Tensor | None = None  # uint8 [N, 3, S, S] when held in memory
        if isinstance(images, torch.Tensor):
            if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
                raise ValueError(f"held images must be uint8 [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
            self.image_tensor = resize_uint8(images, self.image_size).contiguous()
        else:
            self.image_paths = [Path(p) for p in images]
            if preload:
                if num_samples:
                    self.image_tensor = torch.stack([load_image(p, self.image_size) for p in self.image_paths])
                else:
                    self.image_tensor = torch.empty(0, 3, self.image_size, self.image_size, dtype=torch.uint8)

    def __len__(self) -> int:
        return len(self.captions)

    def set_epoch(self, epoch: int) -> None:
        """Select the caption and augmentation of train items (no effect on test datasets)."""
        self.epoch = int(epoch)

    def captions_of(self, index: int) -> list[str]:
        """All captions of sample ``index``, in their stored order (the first is the test caption)."""
        return list(self.captions[index])

    def caption_index(self, index: int) -> int:
        """Position in ``captions_of(index)`` of the caption that ``self[index]`` returns now."""
        num_captions = len(self.captions[index])
        if not self.train or num_captions == 1:
            return 0
        return caption_choice(self.seed, index, self.epoch, num_captions)

    def image_uint8(self, index: int) -> torch.Tensor:
        """The image of sample ``index`` as ``uint8 [3, S, S]`` before normalisation."""
        if self.image_tensor is not None:
            return self.image_tensor[index]
        assert self.image_paths is not None
        return load_image(self.image_paths[index], self.image_size)

    def image_float(self, index: int) -> torch.Tensor:
        """The image of sample ``index`` as ``[3, S, S]`` before normalisation: augmented (``float32`` in
        [0, 255]) when this is a train dataset with ``augment``, else the ``uint8`` image."""
        image = self.image_uint8(index)
        if self.augment is None:
            return image
        generator = torch.Generator().manual_seed(augment_seed(self.seed, index, self.epoch))
        return augment_image(image, self.augment, generator)

    def __getitem__(self, index: int) -> dict:
        index = int(index)  # samplers may hand over numpy or tensor integers; items carry a plain int
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        return {
            "image": normalize_uint8(self.image_float(index)),
            "caption": self.captions[index][self.caption_index(index)],
            "label": int(self.labels[index]),
            "index": index,
        }

    def __repr__(self) -> str:
        source = "held" if self.image_tensor is not None else "files"
        extra = f", augment={self.augment}" if self.augment is not None else ""
        extra += f", skipped={len(self.skipped)}" if self.skipped else ""
        return (f"ImageTextDataset(n={len(self)}, image_size={self.image_size}, train={self.train}, "
                f"images={source}, captions/sample≤{max((len(c) for c in self.captions), default=0)}{extra})")


@dataclass
class Task:
    """One step of a continual scenario.

    ``class_names[k]`` is the class whose label (in ``train.labels`` / ``test.labels``) is ``class_ids[k]``;
    labels are unique across all tasks of a scenario (contiguous per task, in task order) and empty lists mean
    the task has no class labels (labels are -1).
    """

    name: str
    train: ImageTextDataset
    test: ImageTextDataset
    class_names: list[str]
    class_ids: list[int] = field(default_factory=list)
