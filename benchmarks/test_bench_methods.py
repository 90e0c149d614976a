"""Per-step cost of every training method relative to ``finetune``, and the cost of DIME's re-ranking in evaluation.

Run from the repository root:

    python -m pytest benchmarks/test_bench_methods.py --benchmark-columns=median,min,rounds

Step cost: one ``Trainer`` per method at the default config (``configs/default.yaml``: tiny model, batch 32, no
replay — so ``er`` and ``alta`` bring their own reservoir of 128 and replay 16 samples per batch), put in the state
of the second task without training the first (the previous-task copy exists, the replay buffer holds task 1,
every method's ``end_task`` hook ran: EWC's Fisher, ALTA's logit memory and frozen encoders); ``joint``, which
trains only in its first stage, is timed there (its batches come from all tasks, its cost per step is
``finetune``'s). One timed round is
one sweep that runs one full training step (``Trainer._step``: forward, the method's losses, backward, clipping,
AdamW) of every method on the same batch, starting the sweep at a different method each round. Timed with one torch
thread as process CPU time, which other jobs on a shared machine do not stretch (wall-clock time is recorded too);
each method's cost is the median over rounds of its step's CPU time divided by ``finetune``'s in the same sweep.
On this scenario the previous-task model's outputs are kept per input (``cbd_fast/methods/frozen_features.py``:
its images are not augmented and it is small), so after the warm-up the teacher costs no forward pass; the rows
marked "previous-task model run every step" keep none, which is what a run on an augmented or large scenario does
(their ratio is to the ``finetune`` row marked so). The same
measurement, with nothing kept, for ``finetune`` and ``cbd`` at ViT-B/16 sizes (the ``vit_b16`` preset, T = 77 text and
V = 197 image tokens) at batch 16 — two trainers at batch 64 (models, previous-task copies, optimizer state and
activations) outgrow a 23 GB machine — in two rounds after a warm-up step on two rows.

DIME's evaluation: scoring a gallery of 250 captions × 250 images (tiny-model token sizes T = 32, V = 17, D = 64)
with MaxSim alone, and with DIME re-ranking each caption's and each image's top 16 (at most (250 + 250)·16 pairs
through the interaction module instead of 250²).
"""
from __future__ import annotations

import contextlib
import copy
import statistics
import time

import pytest
import torch

from cbd_fast import config as config_lib
from cbd_fast.methods import METHODS
from cbd_fast.model import TokenFeatures
from cbd_fast.train.loop import Trainer

ROUNDS = 10


@contextlib.contextmanager
def single_thread():
    """One torch thread, so that the process's CPU time is the work of one step (other jobs on a shared machine
    stretch the wall-clock time, not the CPU time)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


EVERY_STEP = " (previous-task model run every step)"  # a row keeping no outputs of it (FrozenFeatureCache)


def _task_two_trainer(name: str, output_dir, overrides: tuple[str, ...] = ()) -> tuple[Trainer, int]:
    """A trainer of the default config (with ``overrides``) in the state of its second stage, and that stage
    (``joint`` trains only in its first stage: it stays there). ``name``: a method, or a method followed by
    ``EVERY_STEP`` for one whose previous-task model runs at every step, as on an augmented or large scenario."""
    method = name.removesuffix(EVERY_STEP)
    cfg = config_lib.resolve(config_lib.builtin_config("default"),
                             [f"method={method}", "device=cpu", f"output_dir={output_dir}",
                              f"name={method}{'_every_step' if method != name else ''}", *overrides])
    trainer = Trainer(cfg, show_progress=False)
    if method != name:
        trainer.method.frozen_cache_bytes = 0
    trainer._start_task(0)
    if not trainer.method.train_tasks(1):
        return trainer, 0
    trainer.old_model = copy.deepcopy(trainer.model).eval().requires_grad_(False)
    trainer.replay.add_task(0, len(trainer.tasks[0].train), torch.Generator().manual_seed(0))
    trainer.method.end_task(0)
    trainer._start_task(1)
    return trainer, 1


def _interleaved_step_costs(benchmark, methods_record, table: str, names: list[str], output_dir, rounds: int,
                            overrides: tuple[str, ...] = (), warmup_rows: int | None = None) -> None:
    """Times one training step of every method in ``names`` on the same batch, ``rounds`` interleaved sweeps after
    a warm-up sweep (on the first ``warmup_rows`` rows of the batch when given: the optimizer state and the
    allocator are warm either way), and records each method's CPU time and median ratio to ``finetune``."""
    trainers, stages = {}, {}
    for name in names:
        trainers[name], stages[name] = _task_two_trainer(name, output_dir, overrides)
    batches = {name: next(iter(trainer._batches(stages[name], 0)))[1] for name, trainer in trainers.items()}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    wall: dict[str, list[float]] = {name: [] for name in names}
    sweep = iter(range(10**6))

    def one_sweep():
        index = next(sweep)
        start = index % len(names)
        for name in names[start:] + names[:start]:
            batch = batches[name]
            if index == 0 and warmup_rows is not None:
                batch = {key: value[:warmup_rows] for key, value in batch.items()}
            began, began_cpu = time.perf_counter(), time.process_time()
            terms = trainers[name]._step(batch, stages[name], 7)
            cpu[name].append(time.process_time() - began_cpu)
            wall[name].append(time.perf_counter() - began)
            assert torch.isfinite(terms.total), name

    with single_thread():
        benchmark.pedantic(one_sweep, rounds=rounds, warmup_rounds=1, iterations=1)
    if benchmark.disabled:
        return
    for name in names:
        cpu_s, wall_s = cpu[name][1:], wall[name][1:]  # the first sweep was the warm-up
        # against finetune run the same way (its prompt-pool queries also come from the previous-task model)
        base = "finetune" + EVERY_STEP if name.endswith(EVERY_STEP) and "finetune" + EVERY_STEP in cpu else names[0]
        ratio = statistics.median(t / f for t, f in zip(cpu_s, cpu[base][1:]))
        benchmark.extra_info[f"{name}_vs_finetune"] = round(ratio, 3)
        methods_record(table, name, dict(cpu_s=statistics.median(cpu_s), wall_s=statistics.median(wall_s),
                                         ratio=ratio, rows=int(batches[name]["images"].shape[0]), rounds=len(cpu_s)))


@pytest.mark.benchmark(group="method step cost (default config, task 2)")
def test_step_cost_of_every_method(benchmark, methods_record, tmp_path):
    _interleaved_step_costs(benchmark, methods_record, "step",
                            [*METHODS, *(name + EVERY_STEP for name in ("finetune", "lwf", "cbd"))], tmp_path, ROUNDS)


VIT_B16_ROUNDS = 2  # a CBD step at these sizes takes minutes of CPU time at one thread


VIT_B16_BATCH = 16


@pytest.mark.benchmark(group=f"cbd step cost at ViT-B/16 sizes (T=77, V=197, batch {VIT_B16_BATCH}, task 2)")
def test_cbd_step_cost_at_vit_b16_sizes(benchmark, methods_record, tmp_path):
    """``finetune`` and ``cbd`` with the ViT-B/16 preset (randomly initialised: the cost does not depend on the
    weights) at batch ``VIT_B16_BATCH``; in the ``--benchmark-disable`` smoke run, at batch 2."""
    batch = 2 if benchmark.disabled else VIT_B16_BATCH
    _interleaved_step_costs(benchmark, methods_record, "step_vit_b16", ["finetune" + EVERY_STEP, "cbd" + EVERY_STEP],
                            tmp_path, VIT_B16_ROUNDS, ("model.preset=vit_b16", f"train.batch_size={batch}"),
                            warmup_rows=2)


def _gallery(count: int, length: int, dim: int, seed: int, padded: bool) -> TokenFeatures:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.nn.functional.normalize(torch.randn(count, length, dim, generator=gen), dim=-1)
    mask = torch.ones(count, length, dtype=torch.bool)
    if padded:
        mask = torch.arange(length) < torch.randint(4, length + 1, (count, 1), generator=gen)
        tokens = tokens * mask.unsqueeze(-1)
    weight = torch.randn(count, length, generator=gen).masked_fill(~mask, 0.0)
    pooled = torch.nn.functional.normalize(torch.randn(count, dim, generator=gen), dim=-1)
    return TokenFeatures(tokens, mask, weight, pooled)


GALLERY = 250  # captions and images; 24 in the --benchmark-disable smoke run


@pytest.mark.benchmark(group=f"DIME evaluation: {GALLERY} x {GALLERY} gallery, top-16 re-ranking")
@pytest.mark.parametrize("variant", ["maxsim", "maxsim + dime re-ranking"])
def test_dime_reranking_cost(benchmark, variant, methods_record, tmp_path):
    from cbd_fast.eval.evaluate import score_blocks

    def gallery_scores(text, image):  # evaluation's MaxSim scoring, all captions in one block
        return score_blocks([(torch.arange(text.tokens.shape[0]), text)], image, text.tokens.shape[0])

    trainer, _ = _task_two_trainer("dime", tmp_path)
    size = 24 if benchmark.disabled else GALLERY
    text, image = _gallery(size, 32, 64, 0, True), _gallery(size, 17, 64, 1, False)

    cpu = []

    def score():
        began = time.process_time()
        scores = gallery_scores(text, image)
        scores = trainer.method.rescore(text, image, scores) if variant != "maxsim" else scores
        cpu.append(time.process_time() - began)
        return scores

    with single_thread():
        scores = benchmark.pedantic(score, rounds=3, warmup_rounds=0, iterations=1)
    assert scores.shape == (size, size) and torch.isfinite(scores).all()
    if not benchmark.disabled:
        reranked = int((scores > gallery_scores(text, image).max()).sum()) if variant != "maxsim" else 0
        methods_record("dime_eval", variant, dict(cpu_s=statistics.median(cpu), wall_s=benchmark.stats.stats.median,
                                                  pairs=reranked, gallery=size))
