"""Retrieval evaluation of a model on the test splits of a scenario's tasks (DESIGN §7).

Every caption of every test image is a query (``eval.captions: all``; ``first`` keeps one per image). The
images of all tasks are encoded once and held; captions are encoded in batches sorted by token count, trimmed to
their longest caption and scored against the images with ``maxsim`` in blocks, so that besides the image features
and the ``[captions, images]`` float32 score matrix the scoring holds one block of caption features and one
call's ``[block, gallery chunk]`` scores (see ``SCORE_BLOCK_ELEMENTS``). The score matrix is kept whole: image→text
ranks each image against every caption, class mAP sorts whole rows and a method's ``rescore`` replaces the whole
matrix; the metrics then hold O(chunk · gallery) more (:data:`~cbd_fast.eval.metrics.CHUNK_ELEMENTS`). Every
gallery is a slice of that matrix:

* per-task gallery: task ``j``'s captions against task ``j``'s images;
* cumulative gallery of task ``j`` after ``i`` trained tasks: the test sets of tasks ``1..max(i, j)`` together
  (the tasks seen so far; a task not trained yet is added to them, so that its column has the same gallery in
  every row before it is learned and forward transfer compares like with like).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..maxsim import maxsim
from .metrics import METRIC_NAMES, Matches, combine_directions, query_metrics, retrieval_metrics

CAPTIONS = ("all", "first")
PROMPT_SELECTION = ("key", "task_id")
# Captions scored against the gallery in one pass (padded to the longest of them): large enough that the
# per-call work dwarfs the overhead, small enough that the length sort keeps the padding low.
TEXT_BLOCK = 1024
# (caption, image, token) entries of one maxsim call: a block of b captions is scored against chunks of
# SCORE_BLOCK_ELEMENTS / (b · (T + V)) images, so a call returns b · chunk = SCORE_BLOCK_ELEMENTS / (T + V) scores
# (512 KiB at T + V = 64). That output is what this bounds: the C++ CPU forward keeps no per-entry state (it folds
# cache-sized similarity tiles into the pairs' maxima as they are made, holding besides its output only the token
# coefficients and a fixed tile workspace of about 2 MiB per thread), and the torch backend holds at most
# TORCH_BLOCK_ELEMENTS similarities whatever the call's size.
SCORE_BLOCK_ELEMENTS = 2**23


def _check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"eval.{key} must be one of {', '.join(choices)}, got {value!r}")


def check_eval_config(eval_cfg: dict[str, Any]) -> None:
    """Validate the ``eval:`` keys this module reads; errors name the key and what was expected."""
    _check_choice("captions", eval_cfg.get("captions"), CAPTIONS)
    _check_choice("prompt_selection", eval_cfg.get("prompt_selection"), PROMPT_SELECTION)
    if not isinstance(eval_cfg.get("cumulative"), bool):
        raise ValueError(f"eval.cumulative must be true or false, got {eval_cfg.get('cumulative')!r}")
    batch_size = eval_cfg.get("batch_size")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"eval.batch_size must be an integer >= 1, got {batch_size!r}")
    _check_choice("plot_metric", eval_cfg.get("plot_metric"), METRIC_NAMES)


@dataclass
class EvalItems:
    """The test captions and images of a list of tasks, in task order.

    ``captions[q]`` describes image ``caption_image[q]``; ``caption_task[q]`` and ``image_task[g]`` are 0-based
    task indices; ``image_labels[g]`` class ids (-1 unknown). Task ``j``'s captions are the rows
    ``caption_start[j]:caption_start[j + 1]`` and its images ``image_start[j]:image_start[j + 1]``.
    """

    captions: list[str]
    caption_image: torch.Tensor  # [Q] long
    caption_task: torch.Tensor  # [Q] long
    image_task: torch.Tensor  # [G] long
    image_labels: torch.Tensor  # [G] long
    caption_start: list[int]  # [num_tasks + 1]
    image_start: list[int]  # [num_tasks + 1]

    @property
    def caption_labels(self) -> torch.Tensor:
        return self.image_labels[self.caption_image]

    def positive(self, caption_rows: slice, image_cols: slice) -> Matches:
        """``[rows, cols]``: caption q describes image g, as ids (each caption's image index against the gallery
        images' indices), so the metrics build it a row chunk at a time."""
        return Matches(self.caption_image[caption_rows], torch.arange(image_cols.start, image_cols.stop))

    def task_rows(self, task: int) -> slice:
        """The captions of task ``task`` (0-based)."""
        return slice(self.caption_start[task], self.caption_start[task + 1])

    def task_cols(self, task: int) -> slice:
        """The images of task ``task`` (0-based)."""
        return slice(self.image_start[task], self.image_start[task + 1])


def collect_test_items(tasks, captions: str = "all") -> EvalItems:
    """Every test caption (or the first of each image) and image of ``tasks``."""
    _check_choice("captions", captions, CAPTIONS)
    texts, caption_image, caption_task, image_task, labels = [], [], [], [], []
    caption_start, image_start = [0], [0]
    for task_index, task in enumerate(tasks):
        dataset = task.test
        for index in range(len(dataset)):
            own = dataset.captions_of(index)
            own = own if captions == "all" else own[:1]
            texts.extend(own)
            caption_image.extend([len(image_task)] * len(own))
            caption_task.extend([task_index] * len(own))
            image_task.append(task_index)
        labels.append(dataset.labels.reshape(-1))
        caption_start.append(len(texts))
        image_start.append(len(image_task))
    return EvalItems(texts, torch.tensor(caption_image, dtype=torch.long), torch.tensor(caption_task, dtype=torch.long),
                     torch.tensor(image_task, dtype=torch.long),
                     torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long), caption_start, image_start)


def count_test_items(tasks, captions: str = "all") -> dict[str, list[int]]:
    """``{"test_images": [per task], "test_captions": [per task]}``: the gallery sizes of each task."""
    items = collect_test_items(tasks, captions)
    return {"test_images": [b - a for a, b in zip(items.image_start, items.image_start[1:])],
            "test_captions": [b - a for a, b in zip(items.caption_start, items.caption_start[1:])]}


def _concat(features):
    """TokenFeatures of several batches in one, padded to the longest token count (float32)."""
    width = max(f.tokens.shape[1] for f in features)

    def pad(x, value):
        return torch.nn.functional.pad(x, (0, 0, 0, width - x.shape[1]) if x.dim() == 3 else
                                       (0, width - x.shape[1]), value=value)

    return type(features[0])(tokens=torch.cat([pad(f.tokens.float(), 0.0) for f in features]),
                             mask=torch.cat([pad(f.mask, False) for f in features]),
                             weight=torch.cat([pad(f.weight.float(), 0.0) for f in features]),
                             pooled=torch.cat([f.pooled.float() for f in features]))


@torch.no_grad()
def encode_images(model, tasks, device: torch.device, batch_size: int, task_id: bool):
    """TokenFeatures of every test image ``[G, V, D]``; ``task_id`` = oracle prompt (each image its task's slot)."""
    model.eval()
    features = []
    for task_index, task in enumerate(tasks):
        dataset = task.test
        for start in range(0, len(dataset), batch_size):
            images = torch.stack([dataset[i]["image"] for i in range(start, min(len(dataset), start + batch_size))])
            images = images.to(device)
            index, _, _ = model.select_prompts(model.query_image(images), None,
                                               task_id=task_index if task_id else None)
            features.append(model.encode_image(images, prompt_index=index))
    return _concat(features)


@torch.no_grad()
def encode_caption_blocks(model, captions: list[str], caption_task: torch.Tensor, device: torch.device,
                          batch_size: int, task_id: bool, block: int = TEXT_BLOCK):
    """Yield ``(rows LongTensor[b], TokenFeatures [b, T_b, D])`` covering every caption once.

    Captions go in order of token count (a stable sort, so the order is a function of the captions), in encoder
    batches of ``batch_size`` grouped into blocks of about ``block`` captions, each trimmed to its longest caption.
    """
    model.eval()
    ids, mask = model.tokenize(captions)
    order = mask.sum(1).argsort(stable=True)
    pending, pending_rows = [], []
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch_ids, batch_mask = ids[rows].to(device), mask[rows].to(device)
        _, index, _ = model.select_prompts(None, model.query_text(batch_ids, batch_mask),
                                           task_id=caption_task[rows].to(device) if task_id else None)
        pending.append(model.encode_text(batch_ids, batch_mask, prompt_index=index).without_trailing_padding())
        pending_rows.append(rows)
        if sum(len(r) for r in pending_rows) >= block or start + batch_size >= len(order):
            yield torch.cat(pending_rows), _concat(pending).without_trailing_padding()
            pending, pending_rows = [], []


@torch.no_grad()
def score_blocks(text_blocks, image, num_texts: int) -> torch.Tensor:
    """MaxSim/WTI score of every caption against every image, ``[num_texts, G]`` float32 on the CPU.

    ``text_blocks`` yields ``(rows, TokenFeatures)`` (see :func:`encode_caption_blocks`); each block is scored
    against the images in chunks of at most ``SCORE_BLOCK_ELEMENTS / (b · (T + V))`` images.
    """
    num_images, image_len = image.tokens.shape[:2]
    scores = torch.empty(num_texts, num_images, dtype=torch.float32)
    for rows, text in text_blocks:
        per_image = text.tokens.shape[0] * (text.tokens.shape[1] + image_len)
        chunk = max(1, SCORE_BLOCK_ELEMENTS // max(1, per_image))
        for start in range(0, num_images, chunk):
            part = slice(start, min(num_images, start + chunk))
            scores[rows, part] = maxsim(text.tokens, image.tokens[part], text.mask, image.mask[part],
                                        text.weight, image.weight[part]).float().cpu()
    return scores


def score_captions(model, items: EvalItems, caption_rows: slice, image, image_cols: slice, device: torch.device,
                   batch_size: int, task_id: bool, rescore=None) -> torch.Tensor:
    """Scores of the captions ``caption_rows`` of ``items`` against the encoded images ``image_cols``.

    ``rescore(text, image, scores) -> scores`` (a method that scores differently, see
    :attr:`cbd_fast.methods.Method.rescore`) then replaces the MaxSim scores of this whole matrix; it needs every
    caption's token features at once, which are kept only then."""
    captions = items.captions[caption_rows]
    blocks = encode_caption_blocks(model, captions, items.caption_task[caption_rows], device, batch_size, task_id)
    gallery = type(image)(*(x[image_cols] for x in image))
    if rescore is None:
        return score_blocks(blocks, gallery, len(captions))
    kept = list(blocks)
    scores = score_blocks(kept, gallery, len(captions))
    text = _concat([features for _, features in kept])  # blocks padded to the longest caption
    order = torch.cat([rows for rows, _ in kept]).argsort()  # back to the captions' own order
    return rescore(type(text)(*(x[order] for x in text)), gallery, scores)


def evaluate_tasks(model, tasks, tasks_trained: int, device: torch.device, eval_cfg: dict[str, Any],
                   names: list[str] | None = None, rescore=None) -> dict[str, list[dict[str, float]]]:
    """Retrieval metrics of ``model`` on every task after ``tasks_trained`` tasks (0 = before training).

    Returns ``{"per_task": [metrics of task j], "cumulative": [...]}`` (``cumulative`` only with
    ``eval.cumulative``), metrics as in :func:`~cbd_fast.eval.metrics.retrieval_metrics`. ``rescore`` (see
    :func:`score_captions`) re-scores the matrix that is scored: with ``eval.cumulative`` the one over every
    task's test set, whose slices give every gallery; otherwise each task's own block.
    """
    check_eval_config(eval_cfg)
    names = names or [f"task {j + 1}" for j in range(len(tasks))]
    items = collect_test_items(tasks, eval_cfg["captions"])
    task_id = eval_cfg["prompt_selection"] == "task_id"
    batch_size = eval_cfg["batch_size"]
    image = encode_images(model, tasks, device, batch_size, task_id)
    num_tasks = len(tasks)
    if eval_cfg["cumulative"]:  # one matrix over all tasks: every gallery is a slice of it
        scores = score_captions(model, items, slice(0, len(items.captions)), image, slice(0, len(items.image_task)),
                                device, batch_size, task_id, rescore)
        return gallery_metrics(items, tasks_trained, names, scores=scores)
    task_scores = [score_captions(model, items, items.task_rows(j), image, items.task_cols(j), device, batch_size,
                                  task_id, rescore) for j in range(num_tasks)]  # only the per-task blocks
    return gallery_metrics(items, tasks_trained, names, task_scores=task_scores)


def gallery_metrics(items: EvalItems, tasks_trained: int, names: list[str], scores: torch.Tensor | None = None,
                    task_scores: list[torch.Tensor] | None = None) -> dict[str, list[dict[str, float]]]:
    """The record of :func:`evaluate_tasks` from the scores: exactly one of ``scores`` (``[Q, G]`` over every
    task's test set: per-task and cumulative galleries) and ``task_scores`` (task ``j``'s captions against its own
    images: per-task galleries only).

    Positives are :meth:`EvalItems.positive` ids and class relevance label ids, built a row chunk at a time by the
    metrics; the score matrix and its slices (views) are the only ``O(Q · G)`` memory.
    """
    if (scores is None) == (task_scores is None):
        raise ValueError("gallery_metrics takes scores over every task or per-task scores, exactly one of them")
    num_tasks = len(items.caption_start) - 1
    rows = [items.task_rows(j) for j in range(num_tasks)]
    cols = [items.task_cols(j) for j in range(num_tasks)]
    if scores is not None:
        task_scores = [scores[rows[j], cols[j]] for j in range(num_tasks)]
    text_labels, image_labels = items.caption_labels, items.image_labels
    per_task = [retrieval_metrics(task_scores[j], items.positive(rows[j], cols[j]), text_labels[rows[j]],
                                  image_labels[cols[j]], where=f"{names[j]} (per-task gallery)")
                for j in range(num_tasks)]
    record: dict[str, list[dict[str, float]]] = {"per_task": per_task}
    if scores is not None:
        record["cumulative"] = []
        for j in range(num_tasks):
            seen = max(tasks_trained, j + 1)  # the union of tasks 1..seen
            union_rows = slice(0, items.caption_start[seen])
            union_cols = slice(0, items.image_start[seen])
            where = f"{names[j]} (cumulative gallery of tasks 1-{seen})"
            t2i = query_metrics(scores[rows[j], union_cols], items.positive(rows[j], union_cols),
                                text_labels[rows[j]], image_labels[union_cols], f"{where} (text→image)")
            i2t = query_metrics(scores[union_rows, cols[j]].t(), items.positive(union_rows, cols[j]).t(),
                                image_labels[cols[j]], text_labels[union_rows], f"{where} (image→text)")
            record["cumulative"].append(combine_directions(t2i, i2t))
    return record
