"""Training steps per second with the batches built in the training process (``data.workers: 0``) and by 2
DataLoader worker processes, on a Flickr30K-format scenario at 224 px on the CPU.

Run from the repository root:

    python -m pytest benchmarks/test_bench_data_loader.py --benchmark-columns=median,min,rounds

The scenario: a Karpathy-split JSON (``dataset_flickr30k.json``) over 336 JPEG files of 500 × 375 pixels (Flickr30K's
typical size; random content, which compresses and decodes like a photograph's texture), 5 captions each, 320 train
and 16 test images, one task, the shipped scenario's augmentation (random resized crop). The model: the tiny
preset at ``img_size: 224`` with 32-pixel patches (49 patch tokens), so that decoding, augmenting and tokenising
are a visible share of a step. One timed round is one epoch (20 steps of 16 pairs, ``finetune``, 1 torch thread);
also timed: the loader alone (the same epoch's batches, no training step). Wall-clock time: the workers are other
processes.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cbd_fast import config as config_lib
from cbd_fast.train.loop import Trainer

IMAGES, TRAIN, CAPTIONS = 336, 320, 5


@pytest.fixture(scope="module")
def flickr_format(tmp_path_factory):
    root = tmp_path_factory.mktemp("flickr30k")
    rng = np.random.default_rng(0)
    images = []
    for k in range(IMAGES):
        pixels = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{k}.jpg", quality=90)
        images.append({"filename": f"{k}.jpg", "split": "train" if k < TRAIN else "test",
                       "sentences": [{"raw": f"a photograph number {k} seen in caption {c} of five"}
                                     for c in range(CAPTIONS)]})
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    return root


def _trainer(root, workers: int) -> Trainer:
    config = config_lib.resolve({
        "device": "cpu", "threads": 1, "method": "finetune",
        "model": {"preset": "tiny", "image": {"img_size": 224, "patch_size": 32}},
        "data": dict(config_lib.load_scenario("flickr30k"), root=str(root), annotations="dataset_flickr30k.json",
                     num_tasks=1, workers=workers),
        "train": {"batch_size": 16},
    }, warn=False)
    trainer = Trainer(config, show_progress=False)
    trainer._start_task(0)
    return trainer


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("part", ["train_step", "loader_only"])
def test_steps_per_second(benchmark, flickr_format, workers, part):
    trainer = _trainer(flickr_format, workers)
    steps = trainer._steps_per_epoch(0)

    def epoch():
        for step, batch in trainer._batches(0, 0):
            if part == "train_step":
                trainer._step(batch, 0, step)
        return step + 1

    benchmark.group = f"data loader: {part}"
    assert benchmark.pedantic(epoch, rounds=3, iterations=1, warmup_rounds=0) == steps
    if benchmark.stats is not None:
        benchmark.extra_info["steps_per_second"] = steps / benchmark.stats.stats.median
    torch.set_num_threads(1)
