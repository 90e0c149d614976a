"""Retrieval evaluation of a model on one task's test split, MaxSim over the whole gallery in chunks."""
from __future__ import annotations

import torch

from ..maxsim import maxsim
from .metrics import retrieval_metrics


@torch.no_grad()
def encode_split(model, dataset, device: torch.device, batch_size: int, task_id: int | None):
    """Token features of every test pair: (text TokenFeatures, image TokenFeatures) concatenated over batches.

    ``task_id`` given = oracle prompt selection; None = each sample picks its prompt by key matching.
    """
    model.eval()
    texts, images = [], []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
        ids, mask = model.tokenize([item["caption"] for item in items])
        batch_images = torch.stack([item["image"] for item in items]).to(device)
        ids, mask = ids.to(device), mask.to(device)
        image_prompt, text_prompt, _ = model.select_prompts(model.query_image(batch_images),
                                                            model.query_text(ids, mask), task_id=task_id)
        texts.append(model.encode_text(ids, mask, prompt_index=text_prompt))
        images.append(model.encode_image(batch_images, prompt_index=image_prompt))
    return _concat(texts), _concat(images)


def _concat(features):
    width = max(f.tokens.shape[1] for f in features)

    def pad(x, value):  # text batches may differ in length
        return torch.nn.functional.pad(x, (0, 0, 0, width - x.shape[1]) if x.dim() == 3 else
                                       (0, width - x.shape[1]), value=value)

    return type(features[0])(tokens=torch.cat([pad(f.tokens.float(), 0.0) for f in features]),
                             mask=torch.cat([pad(f.mask, False) for f in features]),
                             weight=torch.cat([pad(f.weight.float(), 0.0) for f in features]),
                             pooled=torch.cat([f.pooled.float() for f in features]))


@torch.no_grad()
def gallery_scores(text, image, chunk: int = 256) -> torch.Tensor:
    """MaxSim/WTI scores of every text against every image: [N_text, N_image], computed chunk by chunk."""
    rows = [maxsim(text.tokens[s:s + chunk], image.tokens, text.mask[s:s + chunk], image.mask,
                   text.weight[s:s + chunk], image.weight) for s in range(0, text.tokens.shape[0], chunk)]
    return torch.cat(rows)


def evaluate_task(model, task, task_index: int, device: torch.device, batch_size: int,
                  prompt_selection: str = "key", rescore=None) -> dict[str, float]:
    """R@1/5/10, MRR and (with labels) mAP@all in both directions on ``task.test``.

    ``rescore(text, image, scores) -> scores``, when given, replaces the MaxSim scores ``[N_text, N_image]`` of
    the gallery (a method that scores differently, see :attr:`cbd_fast.methods.Method.rescore`)."""
    if prompt_selection not in ("key", "task_id"):
        raise ValueError(f"eval.prompt_selection must be 'key' or 'task_id', got {prompt_selection!r}")
    task_id = task_index if prompt_selection == "task_id" else None
    text, image = encode_split(model, task.test, device, batch_size, task_id)
    scores = gallery_scores(text, image)
    if rescore is not None:
        scores = rescore(text, image, scores)
    labels = task.test.labels
    return retrieval_metrics(scores.cpu(), labels if bool((labels >= 0).all()) else None)
