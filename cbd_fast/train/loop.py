"""The continual training loop: tasks in sequence, the losses of the configured method (``cbd_fast.methods``),
replay, evaluation after every task, atomic checkpoints after every epoch, exact resume.

Single process; the pieces that a distributed run changes (sampler, loss reduction, checkpoint writer) are the
``_batches``, ``_step`` and ``_save`` methods.
"""
from __future__ import annotations

import bisect
import copy
import json
import logging
import math
import pathlib
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from ..data import Task, build_tasks, load_scenario
from ..eval.evaluate import evaluate_task
from ..eval.metrics import continual_summary
from ..eval.report import write_reports
from ..methods import create_method, resolve_method_config
from ..model import create_model
from . import checkpoint
from .replay import ReplayBuffer

_MIX = 0x9E3779B97F4A7C15
log = logging.getLogger("cbd_fast.train")


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers (run seed, task, epoch, step...): the same parts give the same seed."""
    value = 0x243F6A8885A308D3
    for part in parts:
        value = ((value ^ (part & 0xFFFFFFFFFFFFFFFF)) * _MIX + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 29
    return value & 0x7FFFFFFFFFFFFFFF


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} but no CUDA device is visible")
    return device


@dataclass
class LossTerms:
    total: torch.Tensor
    parts: dict[str, float] = field(default_factory=dict)


class Trainer:
    """Runs a resolved config (see :mod:`cbd_fast.config`) and writes everything under ``output_dir/name``."""

    def __init__(self, config: dict[str, Any], *, show_progress: bool = True, stop_after_epochs: int | None = None):
        self.config = config = resolve_method_config(config)
        self.run_dir = pathlib.Path(config["output_dir"]) / config["name"]
        self.device = resolve_device(config["device"])
        self.show_progress = show_progress
        self.stop_after_epochs = stop_after_epochs  # for tests: simulate an interruption after N epochs
        self.train_cfg = config["train"]
        torch.manual_seed(config["seed"])
        self.model = create_model(config["model"]).to(self.device)
        self.image_size = self.model.image_size
        data_cfg = config["data"]
        if isinstance(data_cfg, str):  # a scenario file, e.g. configs/scenarios/pascal_sentence.yaml
            data_cfg = load_scenario(data_cfg)
        self.tasks: list[Task] = build_tasks(data_cfg, self.image_size, config["seed"])
        self.method = create_method(config, self)
        self.old_model = None
        replay_cfg = self.train_cfg["replay"]
        self.replay = ReplayBuffer(replay_cfg["strategy"], replay_cfg["size"])
        self.autocast = self.device.type == "cuda" and self.train_cfg["bf16"] in ("auto", True)
        # progress: (task, epoch) of the next epoch to run; metrics gathered so far
        self.next_task, self.next_epoch = 0, 0
        self.results: list[list[dict[str, float]]] = []  # results[i][j]: metrics on task j after task i
        self.epoch_seconds: list[float] = []
        self.loss_history: list[dict[str, float]] = []  # mean of every loss term per epoch
        self.optimizer = self.scheduler = None

    # --- set-up per task -------------------------------------------------------------------------------------------

    def _parameters(self):
        return [p for group in self.method.parameter_groups() for p in group["params"]]

    def _start_task(self, task_index: int) -> None:
        cfg = self.train_cfg
        self.model.set_num_active_prompts(task_index + 1)
        self.method.start_task(task_index)
        self.optimizer = torch.optim.AdamW(self.method.parameter_groups(), lr=cfg["lr"],
                                           weight_decay=cfg["weight_decay"])
        steps = cfg["epochs"] * self._steps_per_epoch(task_index)
        warmup = min(cfg["warmup_steps"], max(1, steps // 5))

        def schedule(step: int) -> float:  # linear warm-up, then cosine to 0
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)

    def _steps_per_epoch(self, task_index: int) -> int:
        samples = sum(len(self.tasks[t].train) for t in self.method.train_tasks(task_index))
        return math.ceil(samples / self.train_cfg["batch_size"])

    # --- data ----------------------------------------------------------------------------------------------------

    def _batches(self, task_index: int, epoch: int):
        """Shuffled batches of the stage's training data (the task's training set, or the union of those the method
        trains on in this stage), each with a replay batch from earlier tasks appended."""
        sources = self.method.train_tasks(task_index)
        starts = [0]
        for source in sources:
            self.tasks[source].train.set_epoch(epoch)
            starts.append(starts[-1] + len(self.tasks[source].train))
        order = torch.randperm(starts[-1], generator=torch.Generator().manual_seed(
            derived_seed(self.config["seed"], task_index, epoch)))
        size = self.train_cfg["batch_size"]
        for step, start in enumerate(range(0, len(order), size)):
            items = []
            for position in order[start:start + size].tolist():
                which = bisect.bisect_right(starts, position) - 1
                items.append(dict(self.tasks[sources[which]].train[position - starts[which]], task=sources[which]))
            current = len(items)
            generator = torch.Generator().manual_seed(derived_seed(self.config["seed"], task_index, epoch, step, 1))
            for old_task, index in self.replay.sample(self.train_cfg["replay"]["batch_size"], generator):
                self.tasks[old_task].train.set_epoch(epoch)
                items.append(dict(self.tasks[old_task].train[index], task=old_task))
            batch = self._collate(items)
            batch["replay"] = torch.arange(len(items), device=self.device) >= current
            yield step, batch

    def _collate(self, items: list[dict]) -> dict[str, Any]:
        """Images, token ids and masks on the device; ``task[B]`` and ``index[B]`` (which training sample each
        row is) on the CPU."""
        ids, mask = self.model.tokenize([item["caption"] for item in items])
        return {"images": torch.stack([item["image"] for item in items]).to(self.device),
                "ids": ids.to(self.device), "mask": mask.to(self.device),
                "task": torch.tensor([item["task"] for item in items], dtype=torch.long),
                "index": torch.tensor([item["index"] for item in items], dtype=torch.long)}

    # --- losses --------------------------------------------------------------------------------------------------

    def _losses(self, batch, task_index: int, step_seed: int) -> LossTerms:
        terms = self.method.losses(batch, task_index, step_seed)
        return LossTerms(terms.total(), terms.values())

    # --- training ------------------------------------------------------------------------------------------------

    def _step(self, batch, task_index: int, step_seed: int) -> LossTerms:
        self.model.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            terms = self._losses(batch, task_index, step_seed)
        self.optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        if self.train_cfg["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(self._parameters(), self.train_cfg["grad_clip"])
        self.optimizer.step()
        self.scheduler.step()
        return terms

    def run(self) -> dict[str, Any]:
        """Train every remaining task, evaluating after each; returns the metrics document."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(self.config, sort_keys=False))
        epochs = self.train_cfg["epochs"]
        epochs_done_now = 0
        task_bar = tqdm(range(self.next_task, len(self.tasks)), desc="tasks", disable=not self.show_progress,
                        initial=self.next_task, total=len(self.tasks), position=0)
        for task_index in task_bar:
            task_bar.set_postfix(task=self.tasks[task_index].name)
            if not self.method.train_tasks(task_index):  # a stage without training (joint after its one stage)
                self._finish_task(task_index)
                self._save()
                continue
            if self.optimizer is None or self.next_epoch == 0:
                self._start_task(task_index)
            for epoch in range(self.next_epoch, epochs):
                started = time.perf_counter()
                bar = tqdm(self._batches(task_index, epoch), total=self._steps_per_epoch(task_index),
                           desc=f"task {task_index + 1}/{len(self.tasks)} epoch {epoch + 1}/{epochs}",
                           leave=False, disable=not self.show_progress, position=1)
                sums: dict[str, float] = {}
                for step, batch in bar:
                    seed = derived_seed(self.config["seed"], task_index, epoch, step, 2)
                    terms = self._step(batch, task_index, seed)
                    for name, value in (("loss", terms.total.item()), *terms.parts.items()):
                        sums[name] = sums.get(name, 0.0) + value
                    bar.set_postfix(loss=f"{terms.total.item():.3f}", **{k: f"{v:.3f}" for k, v in
                                                                          list(terms.parts.items())[:3]})
                self.epoch_seconds.append(time.perf_counter() - started)
                means = {name: total / (step + 1) for name, total in sums.items()}
                self.loss_history.append({"task": task_index, "epoch": epoch, **means})
                log.info("task %d epoch %d/%d  %s  (%.1f s)", task_index + 1, epoch + 1, epochs,
                         "  ".join(f"{k}={v:.4f}" for k, v in means.items()), self.epoch_seconds[-1])
                self.next_task, self.next_epoch = task_index, epoch + 1
                if epoch + 1 == epochs:
                    self._finish_task(task_index)
                self._save()
                epochs_done_now += 1
                if self.stop_after_epochs is not None and epochs_done_now >= self.stop_after_epochs:
                    return self.metrics_document()
        return self.metrics_document()

    def _finish_task(self, task_index: int) -> None:
        self.results.append([self.evaluate(j) for j in range(len(self.tasks))])
        self.old_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        generator = torch.Generator().manual_seed(derived_seed(self.config["seed"], task_index, 3))
        self.replay.add_task(task_index, len(self.tasks[task_index].train), generator)
        self.method.end_task(task_index)
        self.next_task, self.next_epoch = task_index + 1, 0
        write_reports(self.run_dir, self.metrics_document(), self.config["eval"]["plot_metric"])

    def evaluate(self, task_index: int, prompt_selection: str | None = None) -> dict[str, float]:
        selection = prompt_selection or self.config["eval"]["prompt_selection"]
        return evaluate_task(self.model, self.tasks[task_index], task_index, self.device,
                             self.config["eval"]["batch_size"], selection, rescore=self.method.rescore)

    # --- outputs and checkpoints ---------------------------------------------------------------------------------

    def metrics_document(self) -> dict[str, Any]:
        names = [task.name for task in self.tasks]
        metric_names = sorted(self.results[0][0]) if self.results else []
        matrices = {m: [[row[j][m] for j in range(len(names))] for row in self.results] for m in metric_names}
        summaries = {m: continual_summary([row[:i + 1] for i, row in enumerate(matrix)])
                     for m, matrix in matrices.items()}
        return {"name": self.config["name"], "tasks": names, "tasks_trained": len(self.results),
                "accuracy_matrices": matrices, "summary": summaries,
                "per_task_results": [{"after_task": i, "results": row} for i, row in enumerate(self.results)],
                "seconds_per_epoch": self.epoch_seconds, "loss_history": self.loss_history}

    def _save(self) -> None:
        state = {
            "config": json.dumps(self.config),
            "model": self.model.state_dict(),
            "old_model": self.old_model.state_dict() if self.old_model is not None else None,
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "replay": self.replay.state_dict(),
            "next_task": self.next_task, "next_epoch": self.next_epoch,
            "results": json.dumps(self.results), "epoch_seconds": self.epoch_seconds,
            "loss_history": json.dumps(self.loss_history),
        }
        checkpoint.save_atomic(state, self.run_dir / "checkpoints" / "last.pt")

    def resume(self, path: str | pathlib.Path | None = None) -> bool:
        """Restore from ``path`` (default: this run's last checkpoint). Returns False when there is none."""
        path = pathlib.Path(path) if path else self.run_dir / "checkpoints" / "last.pt"
        if not path.is_file():
            return False
        state = checkpoint.load(path)
        self.model.load_state_dict(state["model"])
        if state["old_model"] is not None:
            self.old_model = copy.deepcopy(self.model)
            self.old_model.load_state_dict(state["old_model"])
            self.old_model.eval().requires_grad_(False)
        self.method.load_state_dict(state["method"])
        self.replay.load_state_dict(state["replay"])
        self.results = json.loads(state["results"])
        self.epoch_seconds = list(state["epoch_seconds"])
        self.loss_history = json.loads(state["loss_history"])
        self.next_task, self.next_epoch = state["next_task"], state["next_epoch"]
        if self.next_task < len(self.tasks) and self.next_epoch > 0:
            # mid-task: the optimizer and schedule continue where they stopped
            self._start_task(self.next_task)
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        return True
