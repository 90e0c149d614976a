"""The continual training loop: tasks in sequence, the losses of the configured method (``cbd_fast.methods``),
replay, evaluation after every task, atomic checkpoints at task ends, after epochs ending 30 s or more after the
last one, and every N optimizer steps if asked; exact resume.

One process, or one rank of a data-parallel run (:mod:`cbd_fast.train.distributed`): every rank trains on its
share of every global batch (:mod:`cbd_fast.train.data_loader`), gradients are summed over ranks before each
optimizer step, and only rank 0 evaluates and writes.
"""
from __future__ import annotations

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
from .allocator import keep_freed_memory
from .data_loader import StepDataset, collate, derived_seed, epoch_plan, make_loader, to_device
from .distributed import Distributed, launch_environment
from .optim import create_optimizer
from .replay import ReplayBuffer

log = logging.getLogger("cbd_fast.train")


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
    """The loss to differentiate (this rank's), and the values of the global batch's total and terms."""

    total: torch.Tensor
    parts: dict[str, float] = field(default_factory=dict)
    value: float | None = None

    def __post_init__(self):
        if self.value is None:
            self.value = self.total.item()


class Trainer:
    """Runs a config (:func:`cbd_fast.config.resolve` completes a partial one from the defaults and checks it) and
    writes everything under ``output_dir/name``.

    The checkpoint is written at the end of every task and after any epoch that ends ``train.checkpoint_interval_s``
    seconds or more after the last write (a 55 MB fsync'd write after each of the default run's one-second
    epochs was 4 % of its time), and every ``train.checkpoint_every_steps`` optimizer steps when that is set; a run
    stopped by ``stop_after_epochs`` saves where it stops. In a distributed run each rank keeps its own clock, but
    only rank 0's decisions write anything."""

    def __init__(self, config: dict[str, Any], *, show_progress: bool = True, stop_after_epochs: int | None = None):
        config = config_lib.resolve(config, warn=False)  # cbd-train resolved (and warned about) it already
        self.config = config
        self.run_dir = pathlib.Path(config["output_dir"]) / config["name"]
        self.checkpoint_path = self.run_dir / "checkpoints" / "last.pt"
        self.device = rank_device(config["device"])
        self.dist = Distributed.from_environment(self.device)
        if config["threads"] != "auto":
            torch.set_num_threads(config["threads"])
        if self.device.type == "cpu":
            keep_freed_memory()  # every step frees and reallocates the same large buffers (allocator.py)
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
        self.tasks: list[Task] = build_tasks(scenario_config(config["data"]), self.image_size, config["seed"])
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
        # mid-epoch position (train.checkpoint_every_steps): the next step of epoch next_epoch, the loss sums and
        # seconds of the epoch so far
        self.next_step, self.epoch_sums, self.epoch_elapsed = 0, {}, 0.0
        self.optimizer_steps = 0  # over the whole run: TensorBoard's step axis and the step checkpoints' clock
        self.checkpoints_written = 0
        self._check_shards()
        self.tensorboard = None  # opened by run() on rank 0 with logging.tensorboard
        if config["logging"]["tensorboard"]:
            tensorboard_writer()  # fails now, not after the first epoch, when the package is missing
        self._saved_clock = time.monotonic()  # when the last checkpoint was written (or the run started)

    @property
    def finished(self) -> bool:
        """True when every task has been trained (and evaluated)."""
        return self.next_task >= len(self.tasks)

    def position(self, task_index: int, epoch: int) -> str:
        """``task 2/3, epoch 5/60``: a training position in the log's 1-based numbering."""
        return f"task {task_index + 1}/{len(self.tasks)}, epoch {epoch + 1}/{self.train_cfg['epochs']}"

    def _last_epoch_done(self) -> str:
        """:meth:`position` of the epoch before (``next_task``, ``next_epoch``), or of the last step done in it."""
        if self.next_step:
            return (f"{self.position(self.next_task, self.next_epoch)}, step {self.next_step}/"
                    f"{self._steps_per_epoch(self.next_task)}")
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
        steps = cfg["epochs"] * math.ceil(self._steps_per_epoch(task_index) / cfg["accumulate"])  # optimizer steps
        warmup = min(cfg["warmup_steps"], max(1, steps // 5))

        def schedule(step: int) -> float:  # linear warm-up, then cosine to 0
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)

    def _steps_per_epoch(self, task_index: int) -> int:
        """Batches (forward/backward passes) per epoch; ``train.accumulate`` of them make an optimizer step."""
        samples = sum(len(self.tasks[t].train) for t in self.method.train_tasks(task_index))
        return math.ceil(samples / self.train_cfg["batch_size"])

    def _check_shards(self) -> None:
        """Every rank needs at least one sample of every step: the last, partial batch of a stage included."""
        world, size = self.dist.world_size, self.train_cfg["batch_size"]
        if world == 1:
            return
        if size < world:
            raise ConfigError(f"config key 'train.batch_size' must be ≥ the number of processes ({world}): it is "
                              f"the global batch, shared by the ranks; got {size}")
        for task_index in range(len(self.tasks)):
            samples = sum(len(self.tasks[t].train) for t in self.method.train_tasks(task_index))
            last = samples - (math.ceil(samples / size) - 1) * size if samples else world
            if last < world:
                raise ConfigError(f"the last batch of task {task_index + 1} has {last} sample(s) "
                                  f"({samples} training samples, train.batch_size={size}), fewer than the "
                                  f"{world} processes; choose a train.batch_size that leaves at least {world}")

    # --- data ----------------------------------------------------------------------------------------------------

    def _batches(self, task_index: int, epoch: int, start: int = 0):
        """``(step, batch)`` from step ``start`` on: shuffled batches of the stage's training data (the task's
        training set, or the union of those the method trains on in this stage), each with a replay batch from
        earlier tasks appended; this rank's share of each (with ``shard_sizes``, every rank's row count, in a
        distributed run), built by ``data.workers`` worker processes."""
        cfg = self.train_cfg
        plan = epoch_plan(self.tasks, self.method.train_tasks(task_index), self.replay, self.config["seed"],
                          task_index, epoch, cfg["batch_size"], cfg["replay"]["batch_size"])[start:]
        world = self.dist.world_size
        shares = [step.share(self.dist.rank, world) for step in plan]
        loader = make_loader(StepDataset(self.tasks, shares, epoch, self.model.tokenizer),
                             self.config["data"]["workers"], pin_memory=self.device.type == "cuda")
        for step, (global_step, batch) in enumerate(zip(plan, loader), start):
            batch = to_device(batch, self.device)
            if self.dist.enabled:
                batch["shard_sizes"] = global_step.shard_sizes(world)
            yield step, batch

    def _collate(self, items: list[dict]) -> dict[str, Any]:
        """Images, token ids and masks on the device; ``task[B]`` and ``index[B]`` (which training sample each
        row is) on the CPU."""
        return to_device(collate(items, self.model.tokenize), self.device)

    # --- losses --------------------------------------------------------------------------------------------------

    def _losses(self, batch, task_index: int, step_seed: int) -> LossTerms:
        terms = self.method.losses(batch, task_index, step_seed)
        return LossTerms(terms.total(), terms.values())

    # --- training ------------------------------------------------------------------------------------------------

    def _step(self, batch, task_index: int, step_seed: int, where: str = "a training step") -> LossTerms:
        """One optimizer step on one batch; raises :class:`NonFiniteError` (before any parameter changes) on a
        non-finite loss term or gradient."""
        self.optimizer.zero_grad(set_to_none=True)
        terms = self._backward(batch, task_index, step_seed, where)
        self._apply_gradients(where, terms.total.item())
        return terms

    def _backward(self, batch, task_index: int, step_seed: int, where: str, accumulated: int = 1) -> LossTerms:
        """Forward and backward of one of ``accumulated`` batches of an optimizer step: gradients add up in
        ``.grad``. Returns the loss terms of the global batch (summed over ranks, each weighted by its share)."""
        self.model.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            terms = self._losses(batch, task_index, step_seed)
        share = 1.0
        if self.dist.enabled:  # this rank's part of the global batch's loss (DESIGN §6.2)
            share = batch["images"].shape[0] / sum(batch["shard_sizes"])
            names = list(terms.parts)
            every = self.dist.disagreement(names, self.device)
            if every is not None:  # the reduction below would pair up different terms, or fail, or hang
                raise different_terms_error(every, where, self.config["method"])
            local = torch.tensor([terms.total.item(), *terms.parts.values()], dtype=torch.float64) * share
            summed = self.dist.all_reduce_(local.to(self.device)).tolist()
            terms = LossTerms(terms.total, dict(zip(names, summed[1:])), summed[0])
        values = {"loss": terms.value, **terms.parts}
        if not all(math.isfinite(value) for value in values.values()):
            bad = ", ".join(f"{name}={value}" for name, value in values.items() if not math.isfinite(value))
            good = ", ".join(f"{name}={value:.4g}" for name, value in values.items() if math.isfinite(value))
            raise self._diverged(f"non-finite loss at {where}: {bad}" + (f" (finite: {good})" if good else ""))
        weight = share / accumulated
        (terms.total if weight == 1.0 else terms.total * weight).backward()
        return terms

    def _apply_gradients(self, where: str, loss: float) -> None:
        """Sum the gradients over ranks, clip, check and take the optimizer and schedule steps."""
        self.dist.sum_gradients(self._parameters())
        # clipping at +inf (grad_clip 0) scales by exactly 1: the norm is needed for the check either way
        norm = torch.nn.utils.clip_grad_norm_(self._parameters(), self.train_cfg["grad_clip"] or math.inf)
        if not math.isfinite(norm.item()):
            raise self._diverged(f"non-finite gradient at {where}: gradient norm {norm.item()} (loss "
                                 f"{loss:.4g})")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer_steps += 1

    def _diverged(self, what: str) -> NonFiniteError:
        kept = (f"the last checkpoint, {self.checkpoint_path} (saved after {self.saved_at}), is intact"
                if self.saved_at else "no checkpoint had been written yet")
        return NonFiniteError(f"{what}. Training stopped; {kept}. Lower train.lr or raise the loss temperatures "
                              f"and start again (or continue from the checkpoint with --resume)")

    def run(self) -> dict[str, Any]:
        """Train every remaining task, evaluating before the first and after each; returns the metrics document."""
        self._saved_clock = time.monotonic()
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if self.config["logging"]["tensorboard"] and self.tensorboard is None:
                self.tensorboard = tensorboard_writer()(log_dir=str(self.run_dir / "tensorboard"))
            # the config as run: the scenario's content (resolve() inlines scenario files) and the device in use
            write_text_atomic(self.run_dir / "config.yaml",
                              config_lib.dump(dict(self.config, device=str(self.device))))
        if not self.results:  # row 0 of every accuracy matrix: the model before any training
            self._record_evaluation()
        epochs = self.train_cfg["epochs"]
        epochs_done_now = 0
        show = self.show_progress and self.dist.is_main
        task_bar = tqdm(range(self.next_task, len(self.tasks)), desc="tasks", disable=not show,
                        initial=self.next_task, total=len(self.tasks), position=0)
        for task_index in task_bar:
            task_bar.set_postfix(task=self.tasks[task_index].name)
            if not self.method.train_tasks(task_index):  # a stage without training (joint after its one stage)
                self._finish_task(task_index)
                self._save()
                continue
            if self.optimizer is None or (self.next_epoch == 0 and self.next_step == 0):
                self._start_task(task_index)
            for epoch in range(self.next_epoch, epochs):
                self._train_epoch(task_index, epoch, show)
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

    def _train_epoch(self, task_index: int, epoch: int, show_progress: bool) -> None:
        """The epoch's steps from ``next_step`` on (0 unless resuming mid-epoch), ``train.accumulate`` batches
        per optimizer step, a checkpoint every ``train.checkpoint_every_steps`` optimizer steps; logs the means."""
        cfg, epochs = self.train_cfg, self.train_cfg["epochs"]
        accumulate, every = cfg["accumulate"], cfg["checkpoint_every_steps"]
        start = self.next_step
        sums: dict[str, float] = dict(self.epoch_sums) if start else {}
        started = time.perf_counter() - (self.epoch_elapsed if start else 0.0)
        steps = self._steps_per_epoch(task_index)
        bar = tqdm(self._batches(task_index, epoch, start), total=steps, initial=start, desc=progress_label(
            task_index, len(self.tasks), epoch, epochs), leave=False, disable=not show_progress, position=1)
        group: dict[str, float] = {}
        for step, batch in bar:
            first = step - step % accumulate
            count = min(accumulate, steps - first)  # batches in this optimizer step (fewer at the epoch's end)
            if step == first:
                self.optimizer.zero_grad(set_to_none=True)
                group = {}
            where = f"{self.position(task_index, epoch)}, step {step + 1}/{steps}"
            terms = self._backward(batch, task_index, self._step_seed(task_index, epoch, step), where, count)
            for name, value in (("loss", terms.value), *terms.parts.items()):
                sums[name] = sums.get(name, 0.0) + value
                group[name] = group.get(name, 0.0) + value / count
            bar.set_postfix_str(progress_postfix(terms.value), refresh=False)
            if step + 1 < first + count:
                continue
            self._apply_gradients(where, group["loss"])
            self._log_scalars({f"train/{name}": value for name, value in group.items()}
                              | {"train/lr": self.scheduler.get_last_lr()[0]})
            if every and self.optimizer_steps % every == 0 and step + 1 < steps:
                self.next_task, self.next_epoch, self.next_step = task_index, epoch, step + 1
                self.epoch_sums, self.epoch_elapsed = sums, time.perf_counter() - started
                self._save()
        self.next_step, self.epoch_sums, self.epoch_elapsed = 0, {}, 0.0
        self.epoch_seconds.append(time.perf_counter() - started)
        means = {name: total / steps for name, total in sums.items()}
        self.loss_history.append({"task": task_index, "epoch": epoch, **means})
        log.info("%s  %s  (%.1f s)", progress_label(task_index, len(self.tasks), epoch, epochs),
                 "  ".join(f"{k}={v:.4f}" for k, v in means.items()), self.epoch_seconds[-1])

    def _step_seed(self, task_index: int, epoch: int, step: int) -> int:
        """Seed of a step's random estimates (the Banzhaf draws): rank 0 has the single-process seed, every other
        rank its own, so that no two ranks draw the same coalitions for their pairs."""
        seed = derived_seed(self.config["seed"], task_index, epoch, step, 2)
        return seed if self.dist.rank == 0 else derived_seed(seed, self.dist.rank)

    def _log_scalars(self, values: dict[str, float]) -> None:
        if self.tensorboard is not None:
            for name, value in values.items():
                self.tensorboard.add_scalar(name, value, self.optimizer_steps)

    def _finish_task(self, task_index: int) -> None:
        self._record_evaluation()
        self.old_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        generator = torch.Generator().manual_seed(derived_seed(self.config["seed"], task_index, 3))
        self.replay.add_task(task_index, len(self.tasks[task_index].train), generator)
        self.method.end_task(task_index)
        self.next_task, self.next_epoch = task_index + 1, 0

    def _record_evaluation(self) -> None:
        """Evaluate after the tasks trained so far, append the row to ``results`` and rewrite the reports. In a
        distributed run rank 0 evaluates (the parameters are the same on every rank) and sends the row to the
        others."""
        record = self.evaluate_all(tasks_trained=len(self.results)) if self.dist.is_main else None
        self.results.append(self.dist.broadcast_json(record, self.device))
        if self.dist.is_main:
            write_reports(self.run_dir, self.metrics_document(), self.config["eval"]["plot_metric"])
            self._log_evaluation(len(self.results) - 1)

    def _log_evaluation(self, tasks_trained: int) -> None:
        """TensorBoard: every metric of every task, per gallery, at the run's optimizer step."""
        if self.tensorboard is None:
            return
        for gallery, rows in self.results[tasks_trained].items():
            if not isinstance(rows, list):
                continue
            for task, row in zip(self.tasks, rows):
                for metric, value in row.items():
                    if isinstance(value, (int, float)) and math.isfinite(value):
                        self.tensorboard.add_scalar(f"eval_{gallery}/{metric}/{task.name}", value,
                                                    self.optimizer_steps)
        self.tensorboard.flush()

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
        """True once ``train.checkpoint_interval_s`` seconds have passed since the last checkpoint (or the start of
        :meth:`run`): with task ends always saved, a killed run loses at most that long plus one epoch."""
        return time.monotonic() - self._saved_clock >= self.train_cfg["checkpoint_interval_s"]

    def _save(self) -> None:
        """Rank 0 writes the checkpoint (``checkpoints/last.pt``, atomically) and keeps the newest
        ``train.keep_checkpoints`` of them; every rank checks the parameters first."""
        position = self._last_epoch_done()
        broken = [name for name, p in self.model.named_parameters() if not torch.isfinite(p).all()]
        if broken:
            raise self._diverged(f"non-finite parameters after {position}: {', '.join(broken[:3])}"
                                 + (f" and {len(broken) - 3} more" if len(broken) > 3 else ""))
        self.checkpoints_written += 1
        if self.dist.is_main:
            self._write_checkpoint()
        self.saved_at = position
        self._saved_clock = time.monotonic()

    def _write_checkpoint(self) -> None:
        state = {
            "config": json.dumps(self.config),
            "fingerprint": config_lib.fingerprint(self.config),
            "model": self.model.state_dict(),
            "old_model": self.old_model.state_dict() if self.old_model is not None else None,
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "replay": self.replay.state_dict(),
            "next_task": self.next_task, "next_epoch": self.next_epoch, "next_step": self.next_step,
            "epoch_sums": json.dumps(self.epoch_sums), "epoch_elapsed": self.epoch_elapsed,
            "optimizer_steps": self.optimizer_steps, "checkpoints_written": self.checkpoints_written,
            "world_size": self.dist.world_size,
            "results": json.dumps(self.results), "epoch_seconds": self.epoch_seconds,
            "loss_history": json.dumps(self.loss_history),
        }
        checkpoint.save_atomic(state, self.checkpoint_path)
        keep = self.train_cfg["keep_checkpoints"]
        if keep > 1:
            if self.next_step:  # steps done in the epoch
                done = f"task{self.next_task + 1}-epoch{self.next_epoch + 1}-step{self.next_step}"
            elif self.next_epoch:
                done = f"task{self.next_task + 1}-epoch{self.next_epoch}"
            else:
                done = f"task{self.next_task}-epoch{self.train_cfg['epochs']}"
            checkpoint.keep_history(self.checkpoint_path, f"{self.checkpoints_written:06d}-{done}", keep)

    def resume(self, path: str | pathlib.Path | None = None) -> bool:
        """Restore from ``path`` (default: this run's last checkpoint). Returns False when there is none.

        In a distributed run every rank reads the checkpoint itself; unless all find the same one (or all find
        none), every rank raises :class:`~cbd_fast.config.ConfigError` — ``output_dir`` on a file system that is
        not shared by all nodes — rather than ranks training from different states.

        The checkpoint must come from a run of the same config (:func:`cbd_fast.config.differences`), else
        :class:`~cbd_fast.config.ConfigError` lists the keys that differ.
        """
        path = pathlib.Path(path) if path else self.checkpoint_path
        if self.dist.is_main:
            remove_stale_temporaries(path)  # left by a write that was killed
        state, view, failure = None, None, None  # view: what this rank found, compared with the other ranks'
        if path.is_file():
            try:
                state = checkpoint.load(path)
                view = {"sha256": checkpoint.stored_digest(path), "next_task": state["next_task"],
                        "next_epoch": state["next_epoch"], "next_step": state.get("next_step", 0)}
            except (checkpoint.CheckpointError, OSError) as exc:
                view, failure = {"error": str(exc)}, exc
        views = self.dist.disagreement(view, self.device)
        if views is not None:
            raise different_checkpoints_error(path, views, self.config["output_dir"])
        if failure is not None:  # the same unreadable file on every rank
            raise failure
        if state is None:
            return False
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
        # (checkpoints written before step checkpoints and distributed runs lack these keys)
        self.next_step, self.epoch_elapsed = state.get("next_step", 0), state.get("epoch_elapsed", 0.0)
        self.epoch_sums = json.loads(state.get("epoch_sums", "{}"))
        self.optimizer_steps = state.get("optimizer_steps", 0)
        self.checkpoints_written = state.get("checkpoints_written", 0)
        if state.get("world_size", 1) != self.dist.world_size:
            log.warning("resuming a run of %d process(es) with %d: the loss is the same function of the global "
                        "batch, but the Banzhaf draws and the order of floating-point sums change, so the results "
                        "will not be bit-identical to an uninterrupted run (README, Scaling out)",
                        state["world_size"], self.dist.world_size)
        if self.next_task < len(self.tasks) and (self.next_epoch > 0 or self.next_step > 0):
            # mid-task: the optimizer and schedule continue where they stopped
            self._start_task(self.next_task)
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        self.saved_at = self._last_epoch_done()
        return True

    def _check_same_run(self, state: dict[str, Any], path: pathlib.Path) -> None:
        # keys added to cbd_fast after the checkpoint was written take their defaults (their old behaviour)
        stored = config_lib.resolve(json.loads(state["config"]), warn=False)
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


def different_terms_error(every: list[list[str]], where: str, method: str) -> RuntimeError:
    """The error of a distributed step whose ranks computed different loss terms: ``every[r]``, rank r's names."""
    seen = "; ".join(f"rank {rank}: {', '.join(names) or 'none'}" for rank, names in enumerate(every))
    return RuntimeError(f"the processes computed different loss terms at {where} ({seen}). Method {method!r} must "
                        f"add the same terms in the same order on every rank (a term for which a rank's share has "
                        f"no rows is added as zero)")


def different_checkpoints_error(path: pathlib.Path, views: list, output_dir: str) -> ConfigError:
    """The error of a distributed resume whose ranks found different checkpoints at ``path``: ``views[r]`` is what
    rank r found (None: no file; ``{"error": message}``; or the checkpoint's ``sha256`` and position)."""
    def found(view) -> str:
        if view is None:
            return "no checkpoint"
        if "error" in view:
            return f"an unreadable file ({view['error']})"
        return (f"a checkpoint after {view['next_task']} task(s) + {view['next_epoch']} epoch(s) + "
                f"{view['next_step']} step(s) (SHA-256 {view['sha256'][:12]}…)")

    ranks: dict[str, list[int]] = {}
    for rank, view in enumerate(views):
        ranks.setdefault(found(view), []).append(rank)
    seen = "; ".join(f"rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}: {what}"
                     for what, r in ranks.items())
    return ConfigError(f"the {len(views)} processes do not see the same checkpoint at {path} ({seen}). Every "
                       f"process reads the checkpoint that rank 0 writes, so output_dir ({output_dir}) must be on a "
                       f"file system shared by all nodes (README, Scaling out); with --resume PATH, PATH must be "
                       f"the same file on every node")


def progress_label(task_index: int, num_tasks: int, epoch: int, epochs: int) -> str:
    """The progress bar's description: ``task 2/3 epoch 5/60``."""
    return f"task {task_index + 1}/{num_tasks} epoch {epoch + 1}/{epochs}"


def progress_postfix(loss: float) -> str:
    """The progress bar's postfix: the step's total loss only (every term is in the per-epoch log line), so
    that the bar keeps its width at 120 columns."""
    return f"loss={loss:.3f}"


def rank_device(name: str) -> torch.device:
    """The device of this process: ``device`` (:func:`resolve_device`), or in a distributed CUDA run the GPU of
    the process's local rank."""
    device = resolve_device(name)
    _, world, local = launch_environment()
    if world == 1 or device.type != "cuda":
        return device
    if device.index is not None:
        raise ConfigError(f"device={name!r} with {world} processes: each process uses the GPU of its local rank; "
                          f"use device=cuda (or auto) and choose GPUs with CUDA_VISIBLE_DEVICES")
    if local >= torch.cuda.device_count():
        raise ConfigError(f"local rank {local} but only {torch.cuda.device_count()} CUDA device(s) are visible: "
                          f"start at most that many processes per node")
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def scenario_config(data: dict[str, Any]) -> dict[str, Any]:
    """The ``data`` section without the loader's keys (``workers``), for :func:`cbd_fast.data.build_tasks`."""
    return {key: value for key, value in data.items() if key not in config_lib.LOADER_KEYS}


def tensorboard_writer():
    """``torch.utils.tensorboard.SummaryWriter`` (``logging.tensorboard: true``; needs the tensorboard package)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("logging.tensorboard is true but the tensorboard package is not installed: "
                          "pip install 'cbd_fast[tensorboard]' (or tensorboard), or set "
                          "logging.tensorboard=false") from None
    return SummaryWriter
