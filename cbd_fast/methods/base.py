"""The interface between the continual loop and a training method.

The loop (:class:`cbd_fast.train.loop.Trainer`) owns the model, the data, the optimiser, the replay buffer of
sample indices and the frozen copy of the model after the previous task (``trainer.old_model``, which also
answers the prompt-pool queries when ``train.prompt_query: old_model``). A :class:`Method` owns everything else
that makes one continual-learning method differ from another: its extra state (teachers other than the
previous-task model, Fisher information, snapshots, stored features), its extra modules and their parameters,
its loss terms on a batch, and its hooks at the start and end of a task, in the checkpoint, and in evaluation.

A batch (from ``Trainer._batches``) is a dict: ``images[B,3,S,S]``, ``ids[B,L]``, ``mask[B,L]`` on the device;
``task[B]``, ``index[B]`` (long, CPU: which training sample each row is) and ``replay[B]`` (bool, device: rows
drawn from the replay buffer, always after the current task's rows). In a distributed run it is the rank's share of
the global batch and also holds ``shard_sizes`` (every rank's row count, in rank order).

Distributed runs (DESIGN §6.2): a loss term is either *global* — defined on the global batch, computed by each
rank for its own rows against every rank's features (:meth:`Outputs.rows`, :func:`global_contrastive`,
:func:`global_sample_distillation`) — or *local* — per pair or per rank's shard, computed on the rank's rows only.
Each method's docstring says which of its terms are which. The loop weights every rank's total by its share of the
global batch, so a global term sums to exactly its single-process value.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional

import torch
from torch import nn

from ..maxsim import maxsim
from ..model import TokenFeatures
from ..train.losses import contrastive_loss, sample_distillation_loss
from .frozen_features import FrozenFeatureCache

COMMON_DEFAULTS: dict[str, Any] = {"prompt": 0.1}  # λ_p: weight of the prompt pull constraint (DESIGN §6)

# Evaluation hook: (text TokenFeatures [Q,T,D], image TokenFeatures [G,V,D], dual-encoder scores [Q,G]) -> [Q,G]
Rescorer = Callable[[TokenFeatures, TokenFeatures, torch.Tensor], torch.Tensor]


class Terms:
    """The named loss terms of one step. ``total()`` = Σ weight · value in the order the terms were added;
    ``values()`` = the unweighted value of every term (what the loop logs and checks for non-finite numbers)."""

    def __init__(self) -> None:
        self.terms: dict[str, tuple[float, torch.Tensor]] = {}

    def add(self, name: str, value: torch.Tensor, weight: float = 1.0) -> None:
        if name in self.terms:
            raise ValueError(f"loss term {name!r} added twice")
        self.terms[name] = (float(weight), value)

    def total(self) -> torch.Tensor:
        total = None
        for weight, value in self.terms.values():
            total = weight * value if total is None else total + weight * value
        if total is None:
            raise ValueError("no loss term was added")
        return total

    def values(self) -> dict[str, float]:
        return {name: value.item() for name, (_, value) in self.terms.items()}

    def __contains__(self, name: str) -> bool:
        return name in self.terms

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.terms[name][1]


@dataclass
class Outputs:
    """One model's outputs on a batch: token features of both towers, the all-pairs MaxSim/WTI scores
    ``scores[B,B]`` (text rows, image columns, pair i ↔ i) and the prompt pull term (scalar). In a distributed
    run ``scores`` is among the rank's own rows, and :meth:`rows` gives the rank's rows of the global batch's."""

    text: TokenFeatures
    image: TokenFeatures
    scores: torch.Tensor
    pull: torch.Tensor
    dist: Any = None  # a distributed cbd_fast.train.distributed.Distributed, or None
    shard_sizes: Optional[list[int]] = None  # rows of every rank's share of the global batch
    _rows: Optional[tuple[torch.Tensor, torch.Tensor, int]] = None

    @property
    def distributed(self) -> bool:
        return self.shard_sizes is not None

    def rows(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The local-loss form of the global score matrix: ``(text_rows[n,N], image_rows[n,N], offset)`` —
        this rank's captions against every image, this rank's images against every caption, and the column of
        local row 0's matched pair. Single process: ``(scores, scores.t(), 0)``.

        Each rank scores its captions against every rank's images (gathered with their gradient) and the ranks'
        score rows are gathered (with gradient) into the ``[N, N]`` matrix, whose columns give the image rows: the
        MaxSim work of the global matrix is done once, split over the ranks, and caption tokens never travel. The
        first call communicates, so every rank must call it at the same point of the step."""
        if not self.distributed:
            return self.scores, self.scores.t(), 0
        if self._rows is None:
            sizes, dist, image = self.shard_sizes, self.dist, self.image
            offset = sum(sizes[:dist.rank])
            images = TokenFeatures(dist.gather(image.tokens, sizes), dist.gather(image.mask, sizes, grad=False),
                                   dist.gather(image.weight, sizes), image.pooled)
            text_rows = pair_scores(self.text, images)  # [n, N]
            matrix = dist.gather(text_rows, sizes)  # [N, N]: every caption against every image
            self._rows = (text_rows, matrix[:, offset:offset + sizes[dist.rank]].t(), offset)
        return self._rows


@torch.no_grad()
def prompt_queries(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt-pool queries: the model's prompt-free pooled image and text features, ``([B,D], [B,D])``."""
    return model.query_image(batch["images"]), model.query_text(batch["ids"], batch["mask"])


def encode(model, batch, queries, train_task: Optional[int], dist=None, text: Optional[TokenFeatures] = None,
           image: Optional[TokenFeatures] = None) -> Outputs:
    """Token features and scores of ``model`` on ``batch`` with prompts chosen from ``queries`` (the slot of
    ``train_task`` when given, else by key matching as at test time). ``text``, ``image``: a tower's features of
    the batch when they are known already (its prompt is not chosen again then). With a distributed ``dist``
    (:class:`cbd_fast.train.distributed.Distributed`) and ``batch["shard_sizes"]``, :meth:`Outputs.rows` gives
    the global batch's scores."""
    query_image, query_text = queries
    image_prompt, text_prompt, pull = model.select_prompts(query_image if image is None else None,
                                                           query_text if text is None else None,
                                                           train_task=train_task)
    if image is None:
        image = model.encode_image(batch["images"], prompt_index=image_prompt)
    if text is None:
        text = model.encode_text(batch["ids"], batch["mask"], prompt_index=text_prompt)
    distributed = dist is not None and dist.enabled and "shard_sizes" in batch
    return Outputs(text, image, pair_scores(text, image), pull, dist if distributed else None,
                   batch["shard_sizes"] if distributed else None)


def pair_scores(text: TokenFeatures, image: TokenFeatures) -> torch.Tensor:
    """MaxSim/WTI scores of every text against every image: ``[Bt, Bi]``."""
    return maxsim(text.tokens, image.tokens, text.mask, image.mask, text.weight, image.weight)


def global_contrastive(out: Outputs, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE on the global batch's MaxSim scores (this rank's rows of it in a distributed run)."""
    if not out.distributed:
        return contrastive_loss(out.scores.float(), logit_scale)
    text_rows, image_rows, offset = out.rows()
    return contrastive_loss(text_rows.float(), logit_scale, image_rows.float(), offset)


def global_sample_distillation(new: Outputs, old: Outputs, temperature: float) -> torch.Tensor:
    """:func:`~cbd_fast.train.losses.sample_distillation_loss` on the global batch's score rows."""
    if not new.distributed:
        return sample_distillation_loss(new.scores.float(), old.scores.float(), temperature)
    (text_new, image_new, _), (text_old, image_old, _) = new.rows(), old.rows()
    return sample_distillation_loss(text_new.float(), text_old.float(), temperature, image_new.float(),
                                    image_old.float())


def global_rows(x: torch.Tensor, batch, dist) -> tuple[torch.Tensor, int]:
    """``(x_all[N, ...], offset)``: every rank's rows of ``x[n, ...]`` in rank order, gathered with their gradient,
    and where this rank's rows start; ``(x, 0)`` in a single process."""
    if dist is None or not dist.enabled or "shard_sizes" not in batch:
        return x, 0
    sizes = batch["shard_sizes"]
    return dist.gather(x, sizes), sum(sizes[:dist.rank])


def global_same_sample(batch, dist) -> torch.Tensor:
    """``[n, N]`` bool on the device: this rank's row i and global row j are the same training sample
    (:func:`same_sample` against the whole global batch)."""
    key = (batch["task"] * (1 << 40) + batch["index"]).to(batch["images"].device)
    every, _ = global_rows(key, batch, dist)
    return key[:, None] == every[None, :]


def same_sample(batch) -> torch.Tensor:
    """``[B,B]`` bool on the device: rows i and j are the same training sample (a replay draw may repeat one)."""
    key = batch["task"] * (1 << 40) + batch["index"]
    return (key[:, None] == key[None, :]).to(batch["images"].device)


class Method(nn.Module):
    """Base class of the continual-learning methods; on its own, plain fine-tuning.

    Class attributes a method sets:

    * ``name``: the registry name (``method: <name>``).
    * ``defaults``: its ``method_args`` and their defaults (always including ``prompt``, λ_p).
    * ``choices``: allowed values of string arguments; ``positive``: arguments that must be > 0; every other
      numeric argument must be >= 0.
    * ``replay``: ``"optional"`` (uses ``train.replay`` as configured), ``"required"`` (with
      ``train.replay.strategy: none`` the method brings ``REQUIRED_REPLAY``) or ``"forbidden"``.
    * ``sweep_weights``: the loss weights that set its stability–plasticity trade-off, scaled together by a sweep:
      ``cbd-report`` draws runs whose weights are one common multiple of these defaults (all else equal) as one
      curve.

    Hooks the loop calls: :meth:`train_tasks`, :meth:`start_task` (also again after a mid-task resume: it must
    be idempotent), :meth:`parameter_groups`, :meth:`losses`, :meth:`end_task` (after the evaluation, the
    previous-task copy and the replay update), ``state_dict``/``load_state_dict`` (the module's parameters and
    buffers plus :meth:`get_extra_state`) and :attr:`rescore` (None, or a function that re-scores an evaluation
    gallery).
    """

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = dict(COMMON_DEFAULTS)
    choices: ClassVar[dict[str, tuple[str, ...]]] = {}
    positive: ClassVar[tuple[str, ...]] = ()
    replay: ClassVar[str] = "optional"
    sweep_weights: ClassVar[tuple[str, ...]] = ()
    REQUIRED_REPLAY: ClassVar[dict[str, Any]] = {"strategy": "reservoir", "size": 128, "batch_size": 16}
    # Budget of the previous-task model's kept outputs per task (FrozenFeatureCache; None: its CACHE_BYTES, 0: keep
    # none, so every step encodes its batch as the first does).
    frozen_cache_bytes: Optional[int] = None

    def __init__(self, args: dict[str, Any], trainer) -> None:
        super().__init__()
        self.args = dict(args)
        self.trainer = trainer  # not a module: the model is saved by the loop, not in the method's state
        self._step_queries = None
        self._frozen_cache: Optional[FrozenFeatureCache] = None  # the previous-task model's outputs, per task

    @classmethod
    def check(cls, args: dict[str, Any]) -> None:
        """Checks of argument values beyond :func:`check_args` (raise ``ValueError`` naming the key)."""

    # --- what the loop asks -----------------------------------------------------------------------------------

    def train_tasks(self, task_index: int) -> list[int]:
        """Tasks whose training sets make up the training data of stage ``task_index`` (empty: no training)."""
        return [task_index]

    def start_task(self, task_index: int) -> None:
        """Before the first step of a task (and again, for the same task, when a run resumes mid-task)."""

    def end_task(self, task_index: int) -> None:
        """After a task: its evaluation, ``trainer.old_model`` and the replay buffer are up to date."""

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups: the model's trainable parameters, then the method's own."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        return [{"params": params + [p for p in self.parameters() if p.requires_grad]}]

    rescore: Optional[Rescorer] = None

    def losses(self, batch, task_index: int, step_seed: int) -> Terms:
        """The loss terms of one training step on ``batch`` (task ``task_index``; ``step_seed`` seeds any random
        estimate of the step)."""
        self.train()
        return self.loss_terms(self.student(batch, task_index), batch, task_index, step_seed)

    def loss_terms(self, student: Outputs, batch, task_index: int, step_seed: int) -> Terms:
        """Symmetric InfoNCE on the MaxSim scores and the prompt pull; subclasses add their terms."""
        terms = Terms()
        terms.add("contrastive", global_contrastive(student, self.model.scale()))
        if self.args["prompt"]:
            terms.add("prompt_key_cos", student.pull, -self.args["prompt"])
        return terms

    # --- shared pieces ----------------------------------------------------------------------------------------

    @property
    def model(self):
        return self.trainer.model

    @property
    def old_model(self):
        """The frozen model after the previous task (None during the first task)."""
        return self.trainer.old_model

    def _queries(self, batch):
        use_old = self.old_model is not None and self.trainer.train_cfg["prompt_query"] == "old_model"
        if not use_old:
            return prompt_queries(self.model, batch), False
        return self._frozen().queries(batch), True

    def _frozen(self) -> FrozenFeatureCache:
        """The task's :class:`~cbd_fast.methods.frozen_features.FrozenFeatureCache` of the previous-task model."""
        if self._frozen_cache is None or self._frozen_cache.model is not self.old_model:
            train = [task.train for task in self.trainer.tasks]
            self._frozen_cache = FrozenFeatureCache(
                self.old_model, lambda task: train[task].augment is not None,
                captions=sum(len(captions) for dataset in train for captions in dataset.captions),
                images=sum(len(dataset) for dataset in train if dataset.augment is None),
                max_bytes=self.frozen_cache_bytes)
        return self._frozen_cache

    def student(self, batch, task_index: int) -> Outputs:
        """The trained model's outputs, with the prompt slot of ``task_index``."""
        queries, use_old = self._queries(batch)
        self._step_queries = queries if use_old else None  # shared with the teacher, computed once per step
        return encode(self.model, batch, queries, train_task=task_index, dist=self.trainer.dist)

    @torch.no_grad()
    def teacher(self, batch) -> Optional[Outputs]:
        """The previous-task model's outputs (prompts picked as at test time), or None during the first task.
        Call after :meth:`student` in the same step."""
        if self.old_model is None:
            return None
        frozen = self._frozen()
        queries = self._step_queries if self._step_queries is not None else frozen.queries(batch)
        image, text = frozen.features(batch, queries)
        return encode(self.old_model, batch, queries, train_task=None, dist=self.trainer.dist, text=text, image=image)

    def step_has_replay(self) -> bool:
        """Whether the global batch of a training step holds replay rows: the loop appends
        ``train.replay.batch_size`` draws whenever the buffer holds an entry. In a distributed run a rank's share
        may have none of them (fewer replay rows than ranks); a term over replay rows is then added as zero on that
        rank, so that every rank has the same terms (the loop reduces them by name)."""
        return len(self.trainer.replay) > 0 and self.trainer.train_cfg["replay"]["batch_size"] > 0

    def frozen_copy(self, model: nn.Module) -> nn.Module:
        return copy.deepcopy(model).eval().requires_grad_(False)

    def task_batches(self, task_index: int):
        """Every training sample of a task once, in index order, in batches of ``train.batch_size`` (captions and
        augmentation of epoch 0), without replay: the data a method reads at the end of a task."""
        dataset = self.trainer.tasks[task_index].train
        dataset.set_epoch(0)
        size = self.trainer.train_cfg["batch_size"]
        for start in range(0, len(dataset), size):
            items = [dict(dataset[i], task=task_index) for i in range(start, min(len(dataset), start + size))]
            yield self.trainer._collate(items)

    def autocast(self):
        return torch.autocast(self.trainer.device.type, dtype=torch.bfloat16, enabled=self.trainer.autocast)


def check_args(cls: type[Method], args: dict[str, Any]) -> None:
    """Value checks shared by every method: choices, > 0 for ``positive``, >= 0 for other numbers; then the
    method's own :meth:`Method.check`. Messages read like those of :mod:`cbd_fast.config`."""
    for key, value in args.items():
        default = cls.defaults[key]
        if key in cls.choices:
            ok, expected = value in cls.choices[key], f"one of {', '.join(map(str, cls.choices[key]))}"
        elif isinstance(default, bool):
            ok, expected = isinstance(value, bool), "true or false"
        elif isinstance(default, (int, float)):
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if isinstance(default, int):
                minimum = 1 if key in cls.positive else 0
                ok, expected = number and isinstance(value, int) and value >= minimum, f"an integer ≥ {minimum}"
            elif key in cls.positive:
                ok, expected = number and value > 0, "a finite number > 0"
            else:
                ok, expected = number and value >= 0, "a finite number ≥ 0"
        else:
            continue
        if not ok:
            raise ValueError(f"config key 'method_args.{key}' must be {expected} (method {cls.name!r}), "
                             f"got {value!r}")
    cls.check(args)
