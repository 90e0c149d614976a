"""The continual training loop: tasks in sequence, CBD losses against the frozen previous-task model, replay,
evaluation after every task, atomic checkpoints after every epoch, exact resume.

Single process; the pieces that a distributed run changes (sampler, loss reduction, checkpoint writer) are the
``_batches``, ``_step`` and ``_save`` methods.
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
import yaml
from tqdm.auto import tqdm

from ..data import Task, build_tasks, load_scenario
from ..eval.evaluate import count_test_items, evaluate_tasks
from ..eval.report import build_document, write_reports
from ..maxsim import maxsim
from ..banzhaf import banzhaf_interaction
from ..model import create_model
from . import checkpoint
from .losses import (InteractionPredictor, banzhaf_distillation_loss, contrastive_loss, sample_distillation_loss,
                     token_similarity_loss)
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
        self.config = config
        self.run_dir = pathlib.Path(config["output_dir"]) / config["name"]
        self.device = resolve_device(config["device"])
        self.show_progress = show_progress
        self.stop_after_epochs = stop_after_epochs  # for tests: simulate an interruption after N epochs
        self.train_cfg, self.loss_cfg = config["train"], config["loss"]
        if self.loss_cfg["method"] not in ("cbd", "finetune"):
            raise ValueError(f"loss.method must be 'cbd' or 'finetune', got {self.loss_cfg['method']!r}")
        if self.loss_cfg["banzhaf_source"] not in ("estimator", "module"):
            raise ValueError("loss.banzhaf_source must be 'estimator' or 'module', got "
                             f"{self.loss_cfg['banzhaf_source']!r}")
        torch.manual_seed(config["seed"])
        self.model = create_model(config["model"]).to(self.device)
        self.image_size = self.model.image_size
        data_cfg = config["data"]
        if isinstance(data_cfg, str):  # a scenario file, e.g. configs/scenarios/pascal_sentence.yaml
            data_cfg = load_scenario(data_cfg)
        self.tasks: list[Task] = build_tasks(data_cfg, self.image_size, config["seed"])
        self.predictor = InteractionPredictor(self.loss_cfg["module_hidden"]).to(self.device) \
            if self.loss_cfg["banzhaf_source"] == "module" else None
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

    # --- set-up per task -------------------------------------------------------------------------------------------

    def _parameters(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.predictor is not None:
            params += list(self.predictor.parameters())
        return params

    def _start_task(self, task_index: int) -> None:
        cfg = self.train_cfg
        self.model.set_num_active_prompts(task_index + 1)
        self.optimizer = torch.optim.AdamW(self._parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        steps = cfg["epochs"] * self._steps_per_epoch(task_index)
        warmup = min(cfg["warmup_steps"], max(1, steps // 5))

        def schedule(step: int) -> float:  # linear warm-up, then cosine to 0
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)

    def _steps_per_epoch(self, task_index: int) -> int:
        return math.ceil(len(self.tasks[task_index].train) / self.train_cfg["batch_size"])

    # --- data ----------------------------------------------------------------------------------------------------

    def _batches(self, task_index: int, epoch: int):
        """Shuffled batches of the task's training set, each with a replay batch from earlier tasks appended."""
        task = self.tasks[task_index]
        task.train.set_epoch(epoch)
        order = torch.randperm(len(task.train), generator=torch.Generator().manual_seed(
            derived_seed(self.config["seed"], task_index, epoch)))
        size = self.train_cfg["batch_size"]
        for step, start in enumerate(range(0, len(order), size)):
            items = [task.train[int(i)] for i in order[start:start + size]]
            generator = torch.Generator().manual_seed(derived_seed(self.config["seed"], task_index, epoch, step, 1))
            for old_task, index in self.replay.sample(self.train_cfg["replay"]["batch_size"], generator):
                self.tasks[old_task].train.set_epoch(epoch)
                items.append(self.tasks[old_task].train[index])
            yield step, self._collate(items)

    def _collate(self, items: list[dict]) -> dict[str, Any]:
        ids, mask = self.model.tokenize([item["caption"] for item in items])
        return {"images": torch.stack([item["image"] for item in items]).to(self.device),
                "ids": ids.to(self.device), "mask": mask.to(self.device)}

    # --- losses --------------------------------------------------------------------------------------------------

    @staticmethod
    @torch.no_grad()
    def _queries(model, batch):
        """Prompt-pool queries: the model's prompt-free pooled image and text features."""
        return model.query_image(batch["images"]), model.query_text(batch["ids"], batch["mask"])

    @staticmethod
    def _encode(model, batch, queries, train_task: int | None):
        """Token features of both towers with prompts chosen from ``queries``; and the pull loss."""
        image_prompt, text_prompt, pull = model.select_prompts(*queries, train_task=train_task)
        image = model.encode_image(batch["images"], prompt_index=image_prompt)
        text = model.encode_text(batch["ids"], batch["mask"], prompt_index=text_prompt)
        return text, image, pull

    @staticmethod
    def _scores(text, image) -> torch.Tensor:
        return maxsim(text.tokens, image.tokens, text.mask, image.mask, text.weight, image.weight)

    def _losses(self, batch, task_index: int, step_seed: int) -> LossTerms:
        cfg = self.loss_cfg
        # queries from the frozen previous-task model (train.prompt_query: old_model) or the prompt-free pass
        use_old = self.old_model is not None and self.train_cfg["prompt_query"] == "old_model"
        queries = self._queries(self.old_model if use_old else self.model, batch)
        text, image, pull = self._encode(self.model, batch, queries, train_task=task_index)
        scores = self._scores(text, image)
        total = contrastive_loss(scores.float(), self.model.scale())
        parts = {"contrastive": total.item()}
        if cfg["prompt"]:
            total = total - cfg["prompt"] * pull
            parts["prompt_pull"] = pull.item()
        if self.old_model is None or cfg["method"] == "finetune":
            return LossTerms(total, parts)
        with torch.no_grad():
            # the old model picks its prompts the way it would at test time
            old_queries = queries if use_old else self._queries(self.old_model, batch)
            old_text, old_image, _ = self._encode(self.old_model, batch, old_queries, train_task=None)
            old_scores = self._scores(old_text, old_image)
        if cfg["sample"]:
            term = sample_distillation_loss(scores.float(), old_scores.float(), cfg["sample_temperature"])
            total, parts["sample"] = total + cfg["sample"] * term, term.item()
        if not (cfg["token"] or cfg["banzhaf"]):
            return LossTerms(total, parts)
        # per-pair token similarity maps of matched pairs: S[b] = X[b] Y[b]^T
        sim = torch.bmm(text.tokens.float(), image.tokens.float().transpose(1, 2))
        old_sim = torch.bmm(old_text.tokens.float(), old_image.tokens.float().transpose(1, 2))
        text_mask, image_mask = text.mask, image.mask
        if cfg["token"]:
            term = token_similarity_loss(sim, old_sim, text_mask, image_mask, cfg["token_kind"],
                                         cfg["token_temperature"])
            total, parts["token"] = total + cfg["token"] * term, term.item()
        if cfg["banzhaf"]:
            def estimate(s, t, i):  # common random numbers: teacher and student share the seed
                return banzhaf_interaction(s, text_mask, image_mask, t.weight.float(), i.weight.float(),
                                           num_samples=cfg["banzhaf_samples"], seed=step_seed,
                                           estimator=cfg["banzhaf_estimator"]).interaction

            with torch.no_grad():
                old_interaction = estimate(old_sim, old_text, old_image)
            if self.predictor is None:
                new_interaction = estimate(sim, text, image)
            else:  # learned module: regress onto the estimator, distil the module's predictions
                fit = ((self.predictor(old_sim, text_mask, image_mask) - old_interaction) ** 2).mean()
                total, parts["module_fit"] = total + fit, fit.item()
                new_interaction = self.predictor(sim, text_mask, image_mask)
                with torch.no_grad():
                    old_interaction = self.predictor(old_sim, text_mask, image_mask)
            term = banzhaf_distillation_loss(new_interaction, old_interaction, text_mask, image_mask,
                                             cfg["banzhaf_temperature"])
            total, parts["banzhaf"] = total + cfg["banzhaf"] * term, term.item()
        return LossTerms(total, parts)

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
        """Train every remaining task, evaluating before the first and after each; returns the metrics document."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(self.config, sort_keys=False))
        if not self.results:  # row 0 of every accuracy matrix: the model before any training
            self._record_evaluation()
        epochs = self.train_cfg["epochs"]
        epochs_done_now = 0
        task_bar = tqdm(range(self.next_task, len(self.tasks)), desc="tasks", disable=not self.show_progress,
                        initial=self.next_task, total=len(self.tasks), position=0)
        for task_index in task_bar:
            task_bar.set_postfix(task=self.tasks[task_index].name)
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
        self._record_evaluation()
        self.old_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        generator = torch.Generator().manual_seed(derived_seed(self.config["seed"], task_index, 3))
        self.replay.add_task(task_index, len(self.tasks[task_index].train), generator)
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
                                [task.name for task in self.tasks])
        record["seconds"] = time.perf_counter() - started
        return record

    # --- outputs and checkpoints ---------------------------------------------------------------------------------

    def metrics_document(self) -> dict[str, Any]:
        eval_cfg = self.config["eval"]
        protocol = {"captions": eval_cfg["captions"], "prompt_selection": eval_cfg["prompt_selection"],
                    "cumulative": eval_cfg["cumulative"], **count_test_items(self.tasks, eval_cfg["captions"])}
        return build_document(self.config["name"], [task.name for task in self.tasks], self.results, protocol,
                              seconds_per_epoch=self.epoch_seconds, loss_history=self.loss_history)

    def _save(self) -> None:
        state = {
            "config": json.dumps(self.config),
            "model": self.model.state_dict(),
            "old_model": self.old_model.state_dict() if self.old_model is not None else None,
            "predictor": self.predictor.state_dict() if self.predictor is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
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
        if self.predictor is not None and state["predictor"] is not None:
            self.predictor.load_state_dict(state["predictor"])
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
