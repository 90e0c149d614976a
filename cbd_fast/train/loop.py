"""The continual training loop: tasks in sequence, the losses of the configured method (``cbd_fast.methods``),
replay, evaluation after every task, atomic checkpoints at task ends and at most every 30 s between them (at
epoch ends), exact resume.

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
from tqdm.auto import tqdm

from .. import config as config_lib
from .._files import remove_stale_temporaries, write_text_atomic
from ..config import ConfigError
from ..data import Task, build_tasks
from ..errors import RunFailed
from ..eval.evaluate import count_test_items, evaluate_tasks
from ..eval.report import build_document, write_reports
from ..methods import create_method
from ..model import create_model
from . import checkpoint
from .optim import create_optimizer
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
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"config key 'device' must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but no CUDA device is visible to torch; use device=cpu (or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device={name!r} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


class NonFiniteError(RunFailed, RuntimeError):
    """Training produced a non-finite loss, gradient or parameter; the run stopped before saving it."""


@dataclass
class LossTerms:
    total: torch.Tensor
    parts: dict[str, float] = field(default_factory=dict)


class Trainer:
    """Runs a config (:func:`cbd_fast.config.resolve` completes a partial one from the defaults and checks it) and
    writes everything under ``output_dir/name``.

    The checkpoint is written at the end of every task and after any epoch that ends ``checkpoint_interval_s``
    seconds or more after the last write (a 55 MB fsync'd write after each of the default run's one-second
    epochs was 4 % of its time); a run stopped by ``stop_after_epochs`` saves where it stops."""

    checkpoint_interval_s: float = 30.0

    def __init__(self, config: dict[str, Any], *, show_progress: bool = True, stop_after_epochs: int | None = None):
        config = config_lib.resolve(config, warn=False)  # cbd-train resolved (and warned about) it already
        self.config = config
        self.run_dir = pathlib.Path(config["output_dir"]) / config["name"]
        self.checkpoint_path = self.run_dir / "checkpoints" / "last.pt"
        self.device = resolve_device(config["device"])
        if config["threads"] != "auto":
            torch.set_num_threads(config["threads"])
        self.threads = torch.get_num_threads()
        self.show_progress = show_progress
        self.stop_after_epochs = stop_after_epochs  # for tests: simulate an interruption after N epochs
        self.train_cfg = config["train"]
        torch.manual_seed(config["seed"])
        try:
            self.model = create_model(config["model"]).to(self.device)
        except ValueError as exc:  # the model config's own checks (keys, sizes, checkpoint fit)
            raise ConfigError(f"model: {exc}") from exc
        self.image_size = self.model.image_size
        self.tasks: list[Task] = build_tasks(config["data"], self.image_size, config["seed"])
        self.method = create_method(config, self)
        self.old_model = None
        replay_cfg = self.train_cfg["replay"]
        self.replay = ReplayBuffer(replay_cfg["strategy"], replay_cfg["size"])
        self.autocast = self.device.type == "cuda" and self.train_cfg["bf16"] in ("auto", True)
        # progress: (task, epoch) of the next epoch to run; metrics gathered so far
        self.next_task, self.next_epoch = 0, 0
        self.results: list[dict[str, Any]] = []  # results[i]: evaluation after i tasks (0: before training)
        self.epoch_seconds: list[float] = []
        self.loss_history: list[dict[str, float]] = []  # mean of every loss term per epoch
        self.optimizer = self.scheduler = None
        self.saved_at: str | None = None  # where the last checkpoint written or read stands, e.g. "task 1/3, ..."
        self._saved_clock = time.monotonic()  # when it was written (or the run started)

    @property
    def finished(self) -> bool:
        """True when every task has been trained (and evaluated)."""
        return self.next_task >= len(self.tasks)

    def position(self, task_index: int, epoch: int) -> str:
        """``task 2/3, epoch 5/60``: a training position in the log's 1-based numbering."""
        return f"task {task_index + 1}/{len(self.tasks)}, epoch {epoch + 1}/{self.train_cfg['epochs']}"

    def _last_epoch_done(self) -> str:
        """:meth:`position` of the epoch before (``next_task``, ``next_epoch``)."""
        if self.next_epoch:
            return self.position(self.next_task, self.next_epoch - 1)
        return self.position(self.next_task - 1, self.train_cfg["epochs"] - 1)

    # --- set-up per task -------------------------------------------------------------------------------------------

    def _parameters(self):
        return [p for group in self.method.parameter_groups() for p in group["params"]]

    def _start_task(self, task_index: int) -> None:
        cfg = self.train_cfg
        self.model.set_num_active_prompts(task_index + 1)
        self.method.start_task(task_index)
        self.optimizer = create_optimizer(self.model, self.method.parameter_groups(), cfg["lr"], cfg["weight_decay"])
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

    def _step(self, batch, task_index: int, step_seed: int, where: str = "a training step") -> LossTerms:
        """One optimizer step; raises :class:`NonFiniteError` (before any parameter changes) on a non-finite
        loss term or gradient."""
        self.model.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            terms = self._losses(batch, task_index, step_seed)
        values = {"loss": terms.total.item(), **terms.parts}
        if not all(math.isfinite(value) for value in values.values()):
            bad = ", ".join(f"{name}={value}" for name, value in values.items() if not math.isfinite(value))
            good = ", ".join(f"{name}={value:.4g}" for name, value in values.items() if math.isfinite(value))
            raise self._diverged(f"non-finite loss at {where}: {bad}" + (f" (finite: {good})" if good else ""))
        self.optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        # clipping at +inf (grad_clip 0) scales by exactly 1: the norm is needed for the check either way
        norm = torch.nn.utils.clip_grad_norm_(self._parameters(), self.train_cfg["grad_clip"] or math.inf)
        if not math.isfinite(norm.item()):
            raise self._diverged(f"non-finite gradient at {where}: gradient norm {norm.item()} (loss "
                                 f"{values['loss']:.4g})")
        self.optimizer.step()
        self.scheduler.step()
        return terms

    def _diverged(self, what: str) -> NonFiniteError:
        kept = (f"the last checkpoint, {self.checkpoint_path} (saved after {self.saved_at}), is intact"
                if self.saved_at else "no checkpoint had been written yet")
        return NonFiniteError(f"{what}. Training stopped; {kept}. Lower train.lr or raise the loss temperatures "
                              f"and start again (or continue from the checkpoint with --resume)")

    def run(self) -> dict[str, Any]:
        """Train every remaining task, evaluating before the first and after each; returns the metrics document."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._saved_clock = time.monotonic()
        # the config as run: the scenario's content (resolve() inlines scenario files) and the device in use
        write_text_atomic(self.run_dir / "config.yaml", config_lib.dump(dict(self.config, device=str(self.device))))
        if not self.results:  # row 0 of every accuracy matrix: the model before any training
            self._record_evaluation()
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
                steps = self._steps_per_epoch(task_index)
                bar = tqdm(self._batches(task_index, epoch), total=steps, desc=progress_label(task_index, len(
                    self.tasks), epoch, epochs), leave=False, disable=not self.show_progress, position=1)
                sums: dict[str, float] = {}
                for step, batch in bar:
                    seed = derived_seed(self.config["seed"], task_index, epoch, step, 2)
                    terms = self._step(batch, task_index, seed,
                                       f"{self.position(task_index, epoch)}, step {step + 1}/{steps}")
                    for name, value in (("loss", terms.total.item()), *terms.parts.items()):
                        sums[name] = sums.get(name, 0.0) + value
                    bar.set_postfix_str(progress_postfix(terms.total.item()), refresh=False)
                self.epoch_seconds.append(time.perf_counter() - started)
                means = {name: total / (step + 1) for name, total in sums.items()}
                self.loss_history.append({"task": task_index, "epoch": epoch, **means})
                log.info("%s  %s  (%.1f s)", progress_label(task_index, len(self.tasks), epoch, epochs),
                         "  ".join(f"{k}={v:.4f}" for k, v in means.items()), self.epoch_seconds[-1])
                self.next_task, self.next_epoch = task_index, epoch + 1
                if epoch + 1 == epochs:
                    self._finish_task(task_index)
                epochs_done_now += 1
                stopping = self.stop_after_epochs is not None and epochs_done_now >= self.stop_after_epochs
                if epoch + 1 == epochs or stopping or self._checkpoint_due():
                    self._save()
                if stopping:
                    return self.metrics_document()
        return self.metrics_document()

    def _finish_task(self, task_index: int) -> None:
        self._record_evaluation()
        self.old_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        generator = torch.Generator().manual_seed(derived_seed(self.config["seed"], task_index, 3))
        self.replay.add_task(task_index, len(self.tasks[task_index].train), generator)
        self.method.end_task(task_index)
        self.next_task, self.next_epoch = task_index + 1, 0

    def _record_evaluation(self) -> None:
        """Evaluate after the tasks trained so far, append the row to ``results`` and rewrite the reports."""
        self.results.append(self.evaluate_all(tasks_trained=len(self.results)))
        write_reports(self.run_dir, self.metrics_document(), self.config["eval"]["plot_metric"])

    def evaluate_all(self, tasks_trained: int, prompt_selection: str | None = None) -> dict[str, Any]:
        """One row of every accuracy matrix: retrieval on every task's test set, in the per-task and (with
        ``eval.cumulative``) the cumulative gallery after ``tasks_trained`` tasks (DESIGN §7), and its seconds."""
        eval_cfg = dict(self.config["eval"], **({"prompt_selection": prompt_selection} if prompt_selection else {}))
        started = time.perf_counter()
        record = evaluate_tasks(self.model, self.tasks, tasks_trained, self.device, eval_cfg,
                                [task.name for task in self.tasks], rescore=self.method.rescore)
        record["seconds"] = time.perf_counter() - started
        return record

    # --- outputs and checkpoints ---------------------------------------------------------------------------------

    def metrics_document(self) -> dict[str, Any]:
        eval_cfg = self.config["eval"]
        protocol = {"captions": eval_cfg["captions"], "prompt_selection": eval_cfg["prompt_selection"],
                    "cumulative": eval_cfg["cumulative"], **count_test_items(self.tasks, eval_cfg["captions"])}
        return build_document(self.config["name"], [task.name for task in self.tasks], self.results, protocol,
                              threads=self.threads, seconds_per_epoch=self.epoch_seconds,
                              loss_history=self.loss_history)

    def _checkpoint_due(self) -> bool:
        """True once ``checkpoint_interval_s`` seconds have passed since the last checkpoint (or the start of
        :meth:`run`): with task ends always saved, a killed run loses at most that long plus one epoch."""
        return time.monotonic() - self._saved_clock >= self.checkpoint_interval_s

    def _save(self) -> None:
        position = self._last_epoch_done()
        broken = [name for name, p in self.model.named_parameters() if not torch.isfinite(p).all()]
        if broken:
            raise self._diverged(f"non-finite parameters after {position}: {', '.join(broken[:3])}"
                                 + (f" and {len(broken) - 3} more" if len(broken) > 3 else ""))
        state = {
            "config": json.dumps(self.config),
            "fingerprint": config_lib.fingerprint(self.config),
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
        checkpoint.save_atomic(state, self.checkpoint_path)
        self.saved_at = position
        self._saved_clock = time.monotonic()

    def resume(self, path: str | pathlib.Path | None = None) -> bool:
        """Restore from ``path`` (default: this run's last checkpoint). Returns False when there is none.

        The checkpoint must come from a run of the same config (:func:`cbd_fast.config.differences`), else
        :class:`~cbd_fast.config.ConfigError` lists the keys that differ.
        """
        path = pathlib.Path(path) if path else self.checkpoint_path
        remove_stale_temporaries(path)  # left by a write that was killed
        if not path.is_file():
            return False
        state = checkpoint.load(path)
        self._check_same_run(state, path)
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
        self.saved_at = self._last_epoch_done()
        return True

    def _check_same_run(self, state: dict[str, Any], path: pathlib.Path) -> None:
        stored = json.loads(state["config"])
        differences = [] if state.get("fingerprint") == config_lib.fingerprint(self.config) else \
            config_lib.differences(stored, self.config)
        if differences:
            raise ConfigError(f"{path} belongs to a run with another config, which --resume cannot continue; "
                              f"differences (checkpoint -> now): {'; '.join(differences)}. Resume with the "
                              f"run's own config ({self.run_dir / 'config.yaml'}) or start a new run "
                              f"(--name, or --overwrite)")
        for key in ("device", "threads"):
            if stored.get(key) != self.config[key]:
                log.warning("resuming with %s=%s where the run had %s=%s: the results will not be bit-identical "
                            "to an uninterrupted run", key, self.config[key], key, stored.get(key))


def progress_label(task_index: int, num_tasks: int, epoch: int, epochs: int) -> str:
    """The progress bar's description: ``task 2/3 epoch 5/60``."""
    return f"task {task_index + 1}/{num_tasks} epoch {epoch + 1}/{epochs}"


def progress_postfix(loss: float) -> str:
    """The progress bar's postfix: the step's total loss only (every term is in the per-epoch log line), so
    that the bar keeps its width at 120 columns."""
    return f"loss={loss:.3f}"
