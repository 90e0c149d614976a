"""Console entry points: ``cbd-train`` and ``cbd-eval``."""
from __future__ import annotations

import argparse
import json
import sys


def _train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cbd-train",
        description="Continual image-text retrieval with Coalition Banzhaf Distillation. With no arguments it "
                    "trains the embedded default scenario (3 synthetic tasks) with full CBD.")
    parser.add_argument("--config", help="YAML config (defaults to the built-in configs/default.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. loss.method=finetune")
    parser.add_argument("--device", help="cpu, cuda, cuda:N or auto (overrides the config)")
    parser.add_argument("--name", help="run name: outputs go to <output_dir>/<name>")
    parser.add_argument("--resume", action="store_true", help="continue the run from its last checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--stop-after-epochs", type=int, help=argparse.SUPPRESS)  # simulates an interruption
    return parser


def _configure_logging() -> None:
    """One concise line per epoch on stderr (the progress bars show the rest)."""
    import logging

    logger = logging.getLogger("cbd_fast")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def train_main(argv: list[str] | None = None) -> int:
    from . import config as config_lib
    from .eval.report import format_table
    from .train.loop import Trainer

    args = _train_parser().parse_args(argv)
    _configure_logging()
    user = config_lib.load_yaml(args.config) if args.config else config_lib.builtin_config("default")
    overrides = list(args.overrides)
    if args.device:
        overrides.append(f"device={args.device}")
    if args.name:
        overrides.append(f"name={args.name}")
    cfg = config_lib.resolve(user, overrides)
    trainer = Trainer(cfg, show_progress=not args.no_progress, stop_after_epochs=args.stop_after_epochs)
    if args.resume:
        if trainer.resume():
            print(f"resuming {trainer.run_dir} at task {trainer.next_task + 1}, epoch {trainer.next_epoch + 1}",
                  file=sys.stderr)
        else:
            print(f"no checkpoint in {trainer.run_dir}; starting from scratch", file=sys.stderr)
    from tqdm.contrib.logging import logging_redirect_tqdm

    import logging

    with logging_redirect_tqdm(loggers=[logging.getLogger("cbd_fast")]):  # log lines print above the bars
        document = trainer.run()
    print(format_table(document))
    print(f"outputs: {trainer.run_dir}")
    return 0


def eval_main(argv: list[str] | None = None) -> int:
    from .eval.report import format_table
    from .train import checkpoint
    from .train.loop import Trainer

    parser = argparse.ArgumentParser(prog="cbd-eval", description="Evaluate a checkpoint on its scenario's tasks.")
    parser.add_argument("checkpoint", help="path to a checkpoint written by cbd-train")
    parser.add_argument("--prompt-selection", choices=("key", "task_id"), default=None,
                        help="key matching per sample (default) or the oracle task id")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    state = checkpoint.load(args.checkpoint)
    cfg = json.loads(state["config"])
    if args.device:
        cfg["device"] = args.device
    trainer = Trainer(cfg, show_progress=False)
    trainer.resume(args.checkpoint)
    trained = max(0, len(trainer.results) - 1)  # results[0] is the evaluation before training
    trainer.model.set_num_active_prompts(max(1, trained))
    trainer.results[trained:] = [trainer.evaluate_all(trained, args.prompt_selection)]
    print(format_table(trainer.metrics_document()))
    return 0


def train_console() -> None:
    sys.exit(train_main(sys.argv[1:]))


def eval_console() -> None:
    sys.exit(eval_main(sys.argv[1:]))


if __name__ == "__main__":
    train_console()
