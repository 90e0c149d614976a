"""CPU time and peak memory of the retrieval evaluation (DESIGN §7) at the size of the COCO 5k test split.

Run from the repository root (the full size takes 5–10 minutes on 2 cores):

    python -m pytest benchmarks/test_bench_eval.py --benchmark-columns=median,rounds

Size with timing enabled: 25,000 captions × 5,000 images (COCO 5k test: 5 captions per image) with token features
of the ``vit_b32`` preset, i.e. CLIP ViT-B/32: D = 512, V = 50 image tokens (7×7 patches + CLS at 224 px), WTI
weights on both sides. Caption lengths (start and end tokens included) are ``3 + round(N(11, 2.5²))`` clipped to
[8, 51], mean ≈ 14: COCO captions average about 10.5 words, and the CLIP tokenizer adds a token or so for
punctuation and word pieces (an assumption; no COCO data is used). Under ``--benchmark-disable`` (the CI smoke
run) the same token counts at 1,000 × 200, which also checks the blocked scores against one ``maxsim`` call.

Timed, once: what :func:`cbd_fast.eval.evaluate.evaluate_tasks` does after encoding — caption features in
length-sorted blocks of ``TEXT_BLOCK`` trimmed to their longest caption, scored against the gallery with
``maxsim`` (C++ op) in chunks of ``SCORE_BLOCK_ELEMENTS``, into a ``[25000, 5000]`` float32 matrix, then
:func:`~cbd_fast.eval.evaluate.gallery_metrics` of that one gallery in both directions (pessimistic ranks,
R@1/5/10, MedR, MRR; positives built a row chunk at a time from each caption's image index). Peak memory is the
torch CPU allocator's high-water mark during that call above what was held before (the features, generated
beforehand, are not counted; their sizes are listed in the results file).

Also (not timed, in every run): the metrics' working memory does not grow with queries × gallery.
"""
from __future__ import annotations

import time

import pytest
import torch

from _memory import peak_cpu_bytes  # benchmarks/ is on sys.path (rootdir-less test folder)
import cbd_fast.eval.metrics
from cbd_fast.eval.evaluate import TEXT_BLOCK, EvalItems, gallery_metrics, score_blocks
from cbd_fast.maxsim import maxsim
from cbd_fast.model.dual_encoder import TokenFeatures

FULL = dict(num_images=5000, captions_per_image=5)  # COCO 5k test
SMOKE = dict(num_images=200, captions_per_image=5)
IMAGE_TOKENS, DIM = 50, 512  # vit_b32: 7x7 patches + CLS, joint width 512


def caption_lengths(num_captions: int, generator: torch.Generator) -> torch.Tensor:
    """COCO-like token counts (start and end included): 3 + round(N(11, 2.5^2)), clipped to [8, 51]."""
    return (3 + torch.normal(11.0, 2.5, (num_captions,), generator=generator).round()).clamp(8, 51).long()


def make_inputs(num_images: int, captions_per_image: int):
    """Image features ``[G, V, D]`` and the caption blocks the evaluation scores, in length order."""
    gen = torch.Generator().manual_seed(0)
    image = TokenFeatures(
        torch.nn.functional.normalize(torch.randn(num_images, IMAGE_TOKENS, DIM, generator=gen), dim=-1),
        torch.ones(num_images, IMAGE_TOKENS, dtype=torch.bool),
        0.5 * torch.randn(num_images, IMAGE_TOKENS, generator=gen), torch.zeros(num_images, DIM))
    num_captions = num_images * captions_per_image
    lengths = caption_lengths(num_captions, gen)
    order = lengths.argsort(stable=True)
    blocks = []
    for start in range(0, num_captions, TEXT_BLOCK):
        rows = order[start:start + TEXT_BLOCK]
        width = int(lengths[rows].max())
        mask = torch.arange(width) < lengths[rows, None]
        tokens = torch.nn.functional.normalize(torch.randn(len(rows), width, DIM, generator=gen), dim=-1)
        blocks.append((rows, TokenFeatures(tokens * mask[..., None], mask,
                                           0.5 * torch.randn(len(rows), width, generator=gen) * mask,
                                           torch.zeros(len(rows), DIM))))
    image_of_caption = torch.arange(num_captions) // captions_per_image
    return image, blocks, image_of_caption, lengths


def eval_items(image_of_caption: torch.Tensor, images_per_task: list[int]) -> EvalItems:
    """The captions (texts left empty) and images of consecutive tasks, unlabelled; ``image_of_caption`` sorted."""
    image_start = [0, *torch.tensor(images_per_task).cumsum(0).tolist()]
    caption_start = [int((image_of_caption < start).sum()) for start in image_start]
    image_task = torch.arange(len(images_per_task)).repeat_interleave(torch.tensor(images_per_task))
    return EvalItems([""] * len(image_of_caption), image_of_caption, image_task[image_of_caption], image_task,
                     torch.full((image_start[-1],), -1), caption_start, image_start)


def evaluate(image, blocks, image_of_caption, timings: dict) -> dict:
    started = time.perf_counter()
    scores = score_blocks(iter(blocks), image, len(image_of_caption))
    timings["scoring_s"] = time.perf_counter() - started
    items = eval_items(image_of_caption, [image.tokens.shape[0]])
    metrics = gallery_metrics(items, 1, ["benchmark"], task_scores=[scores])["per_task"][0]
    timings["total_s"] = time.perf_counter() - started
    timings["metrics_s"] = timings["total_s"] - timings["scoring_s"]
    timings["scores"] = scores
    return metrics


@pytest.mark.benchmark(group="evaluation: 25k captions x 5k images, D=512, V=50")
def test_coco5k_sized_evaluation(benchmark, eval_record):
    size = SMOKE if benchmark.disabled else FULL
    image, blocks, image_of_caption, lengths = make_inputs(**size)
    timings: dict = {}
    peak: list[int] = []

    def run():
        peak.append(peak_cpu_bytes(lambda: timings.update(metrics=evaluate(image, blocks, image_of_caption,
                                                                           timings))))

    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    scores, metrics = timings.pop("scores"), timings.pop("metrics")
    num_captions, num_images = scores.shape
    assert (num_captions, num_images) == (len(image_of_caption), size["num_images"])
    assert all(0.0 <= metrics[f"{d}_R@{k}"] <= 100.0 for d in ("t2i", "i2t") for k in (1, 5, 10))
    # the blocked, length-sorted, trimmed scores are those of one maxsim call on the padded features
    sample = set(torch.linspace(0, num_captions - 1, 16).long().tolist())
    width = int(lengths.max())
    checked = []
    for block_rows, text in blocks:
        for position, row in enumerate(block_rows.tolist()):
            if row in sample:
                pad = width - text.tokens.shape[1]
                tokens = torch.nn.functional.pad(text.tokens[position:position + 1], (0, 0, 0, pad))
                mask = torch.nn.functional.pad(text.mask[position:position + 1], (0, pad), value=False)
                weight = torch.nn.functional.pad(text.weight[position:position + 1], (0, pad))
                expected = maxsim(tokens, image.tokens, mask, image.mask, weight, image.weight)
                checked.append(torch.equal(scores[row:row + 1], expected))
    assert len(checked) == 16 and all(checked)
    feature_bytes = sum(t.tokens.numel() * 4 for _, t in blocks) + image.tokens.numel() * 4
    benchmark.extra_info.update(threads=torch.get_num_threads(), num_captions=num_captions, num_images=num_images,
                                peak_cpu_bytes=peak[0],
                                mean_caption_tokens=float(lengths.double().mean()),
                                mean_padded_tokens=sum(t.tokens.shape[0] * t.tokens.shape[1] for _, t in blocks)
                                / num_captions, feature_bytes=feature_bytes,
                                **{k: round(v, 3) for k, v in timings.items()})
    if not benchmark.disabled:
        eval_record(dict(benchmark.extra_info), metrics)


def test_metrics_hold_chunks_not_a_query_by_gallery_mask(monkeypatch):
    """Both galleries of two tasks (7,000 captions × 700 images, 5 per image, class labels: mAP too): the peak
    memory of the metrics above the score matrix stays below a quarter of one byte per score — positives and class
    relevance are built a row chunk at a time, not as [Q, G] masks — and does not grow with the gallery."""
    monkeypatch.setattr(cbd_fast.eval.metrics, "CHUNK_ELEMENTS", 2**13)
    gen = torch.Generator().manual_seed(0)
    peaks = []
    for num_images in (350, 700):
        image_of_caption = torch.arange(num_images).repeat_interleave(5)
        items = eval_items(image_of_caption, [num_images // 2, num_images - num_images // 2])
        items.image_labels = torch.randint(0, 10, (num_images,), generator=gen)
        scores = torch.randint(0, 50, (len(image_of_caption), num_images), generator=gen).float()  # with ties
        record = {}
        peaks.append(peak_cpu_bytes(lambda: record.update(gallery_metrics(items, 1, ["a", "b"], scores=scores))))
        assert len(record["per_task"]) == len(record["cumulative"]) == 2 and "t2i_mAP" in record["cumulative"][1]
    assert peaks[1] < scores.numel() / 4, (peaks, scores.numel())
    assert peaks[1] < 1.5 * peaks[0], peaks  # 4x the scores, about the same working memory
