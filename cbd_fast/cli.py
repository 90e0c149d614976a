"""Console entry points: ``cbd-train`` and ``cbd-eval``.

torch is imported only once the command line has been parsed and the config resolved: ``--help`` and
``--print-config`` answer at once, and the OpenMP wait policy can still be chosen before torch loads its OpenMP
runtime. Errors in what the user gave print one line and exit with status 2, a run that stops (non-finite loss,
full disk) prints its reason and exits with 1; ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import pathlib
import shutil
import sys
import warnings
from typing import Callable

from .errors import InputError, RunFailed

EXIT_INPUT_ERROR = 2
EXIT_RUN_FAILED = 1
# errors of the file system the run writes to: reported by their message, not as bugs
_OS_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


class RunFolderError(InputError):
    """The run folder holds something that this command must not overwrite."""


def _train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cbd-train",
        description="Continual image-text retrieval with Coalition Banzhaf Distillation. With no arguments it "
                    "trains the embedded default run (configs/default.yaml: 3 synthetic tasks, full CBD).",
        epilog="Config keys: `cbd-train --print-config` lists them all with their values. Outputs go to "
               "<output_dir>/<name> (runs/default); an existing run there is never overwritten silently.")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides anywhere on the line, e.g. method=lwf train.epochs=2 "
                             "data=configs/scenarios/pascal_sentence.yaml data.root=/data/pascal")
    parser.add_argument("--config", help="YAML config merged over the defaults (configs/default.yaml)")
    parser.add_argument("--name", help="run name: outputs go to <output_dir>/<name> (same as name=...)")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (same as device=...)")
    parser.add_argument("--threads", help="CPU threads: an integer or auto, one per core (same as threads=...)")
    folder = parser.add_mutually_exclusive_group()
    folder.add_argument("--resume", nargs="?", const="latest", metavar="PATH|latest",
                        help="continue the run in the run folder from its last checkpoint (latest, the default) or "
                             "from the checkpoint file PATH (same config only)")
    folder.add_argument("--overwrite", action="store_true",
                        help="delete the run already in the run folder and start again")
    parser.add_argument("--nproc", type=int, metavar="N",
                        help="train with N processes on this machine: starts `torchrun --standalone "
                             "--nproc_per_node=N` on this command (README: Scaling out)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (defaults, --config, overrides) and exit")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars, one log line per epoch (the default when stderr is not a terminal)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("--stop-after-epochs", type=int, help=argparse.SUPPRESS)  # simulates an interruption
    return parser


def _eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cbd-eval", description="Evaluate a checkpoint on its scenario's tasks.")
    parser.add_argument("checkpoint", help="path to a checkpoint written by cbd-train (checkpoints/last.pt)")
    parser.add_argument("--prompt-selection", choices=("key", "task_id"), default=None,
                        help="key matching per sample (default) or the oracle task id")
    parser.add_argument("--device", default=None)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
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


def prefer_passive_omp_wait() -> None:
    """Let idle OpenMP threads sleep rather than spin, unless the user chose (``OMP_WAIT_POLICY``).

    libgomp reads the policy once, when torch loads it, so this must run before torch is imported. Spinning
    threads keep their cores busy between parallel regions; on a machine with other load they take the cores
    the work needs (README, "Threads").
    """
    if "OMP_WAIT_POLICY" not in os.environ and "torch" not in sys.modules:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def _report_errors(prog: str, debug: bool, command: Callable[[], int]) -> int:
    """Run ``command``; errors in the user's input or a failed run print one message instead of a traceback."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"{prog}: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        try:
            return command()
        except KeyboardInterrupt:
            if debug:
                raise
            print(f"{prog}: interrupted", file=sys.stderr)
            return 130
        except (InputError, FileNotFoundError, NotADirectoryError) as exc:
            if debug:
                raise
            print(f"{prog}: error: {exc}", file=sys.stderr)
            return EXIT_INPUT_ERROR
        except (RunFailed, OSError) as exc:
            if debug or (not isinstance(exc, RunFailed) and exc.errno not in _OS_ERRORS):
                raise
            print(f"{prog}: error: {exc if isinstance(exc, RunFailed) else _os_error_message(exc)}", file=sys.stderr)
            return EXIT_RUN_FAILED


def _os_error_message(exc: OSError) -> str:
    """``No space left on device (ENOSPC): path``, without repeating what the message already says."""
    message = exc.strerror or str(exc)
    code = errno.errorcode.get(exc.errno)
    if code and code not in message:
        message += f" ({code})"
    if exc.filename and str(exc.filename) not in message:
        message += f": {exc.filename}"
    return message


def _run_state(run_dir: pathlib.Path) -> tuple[bool, str]:
    """Whether the run in ``run_dir`` is finished, and how far it got (``3/3 tasks trained``), from its
    metrics.json."""
    try:
        document = json.loads((run_dir / "metrics.json").read_text())
        trained, total = int(document["tasks_trained"]), len(document["tasks"])
    except (OSError, ValueError, KeyError, TypeError):
        return False, "no task finished"
    return trained >= total, f"{trained}/{total} tasks trained"


def check_run_folder(run_dir: pathlib.Path, resume: bool, overwrite: bool) -> None:
    """Refuse to write into a folder holding another run (unless resuming it or told to overwrite it) or
    anything that is not a cbd-train run."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise RunFolderError(f"run folder {run_dir} exists and is not a folder")
    if not any(run_dir.iterdir()):
        return
    if not (run_dir / "config.yaml").is_file():
        raise RunFolderError(f"run folder {run_dir} is not empty and holds no cbd-train run (no config.yaml); "
                             f"choose another name (--name) or output_dir")
    if resume or overwrite:
        return
    finished, progress = _run_state(run_dir)
    if finished:
        raise RunFolderError(f"run folder {run_dir} already holds a run, finished ({progress}); there is nothing "
                             f"to continue (--resume only prints its results table): --overwrite deletes it and "
                             f"trains again, --name NAME writes elsewhere")
    raise RunFolderError(f"run folder {run_dir} already holds a run, unfinished ({progress}); --resume continues "
                         f"it, --overwrite deletes it and starts again, --name NAME writes elsewhere")


def _resume_target(args: argparse.Namespace) -> None:
    """``--resume key=value``: the optional PATH took an override; give it back (a checkpoint path has no '=' or
    exists)."""
    if args.resume and args.resume != "latest" and "=" in args.resume and not pathlib.Path(args.resume).exists():
        args.overrides.insert(0, args.resume)
        args.resume = "latest"


def _torchrun(argv: list[str], nproc: int) -> int:
    """Run this command under ``torchrun --standalone --nproc_per_node=nproc`` (without ``--nproc``)."""
    if nproc < 1:
        raise RunFolderError(f"--nproc must be ≥ 1, got {nproc}")
    import subprocess

    rest, skip = [], False
    for index, item in enumerate(argv):
        if skip:
            skip = False
        elif item == "--nproc":
            skip = True
        elif not item.startswith("--nproc="):
            rest.append(item)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "cbd_fast.cli", *rest]
    return subprocess.call(command)


def _train(args: argparse.Namespace) -> int:
    prefer_passive_omp_wait()  # before resolve(), which imports torch to check the method's arguments
    from . import config as config_lib

    overrides = list(args.overrides)
    for flag in ("name", "device", "threads"):  # the flags win over key=value overrides of the same key
        if getattr(args, flag) is not None:
            overrides.append(f"{flag}={getattr(args, flag)}")
    cfg = config_lib.resolve(config_lib.load_yaml(args.config) if args.config else None, overrides)
    if args.print_config:
        print(config_lib.dump(cfg), end="")
        return 0
    run_dir = pathlib.Path(cfg["output_dir"]) / cfg["name"]
    check_run_folder(run_dir, args.resume, args.overwrite)  # before any data is read

    _configure_logging()
    from .train.loop import Trainer

    show_progress = not args.no_progress and sys.stderr.isatty()
    trainer = Trainer(cfg, show_progress=show_progress, stop_after_epochs=args.stop_after_epochs)
    try:
        return _train_with(trainer, args, run_dir)
    finally:
        trainer.dist.close()


def _train_with(trainer, args: argparse.Namespace, run_dir: pathlib.Path) -> int:
    import logging

    from tqdm.contrib.logging import logging_redirect_tqdm

    from .eval.report import format_table

    main = trainer.dist.is_main
    if not main:  # one log and one table per run: rank 0's
        logging.getLogger("cbd_fast").setLevel(logging.WARNING)
    log = logging.getLogger("cbd_fast.train")
    if args.overwrite and run_dir.exists() and main:
        shutil.rmtree(run_dir)
        log.info("deleted the previous run in %s (--overwrite)", run_dir)
    trainer.dist.barrier()  # no rank reads the run folder while rank 0 deletes it
    log.info("run folder %s; device %s; %d CPU thread(s) (OMP_WAIT_POLICY=%s)%s", run_dir, trainer.device,
             trainer.threads, os.environ.get("OMP_WAIT_POLICY", "unset"),
             f"; {trainer.dist.world_size} processes ({trainer.dist.backend})" if trainer.dist.enabled else "")
    if args.resume:
        path = None if args.resume == "latest" else pathlib.Path(args.resume)
        if not trainer.resume(path):  # (every rank looks; they agree, or all of them raise)
            if path is not None:
                raise FileNotFoundError(f"--resume {args.resume}: no such checkpoint file")
            log.info("no checkpoint in %s; starting from scratch", run_dir)
        elif trainer.finished:
            if main:
                print(f"{run_dir}: the run is finished (all {len(trainer.tasks)} tasks trained); nothing to "
                      f"resume. `cbd-eval {trainer.checkpoint_path}` evaluates it again, --overwrite trains it "
                      f"again.", file=sys.stderr)
                print(format_table(trainer.metrics_document()))
            return 0
        else:
            log.info("resuming %s after %s (from %s)", run_dir, trainer.saved_at, path or trainer.checkpoint_path)
    with logging_redirect_tqdm(loggers=[logging.getLogger("cbd_fast")]):  # log lines print above the bars
        document = trainer.run()
    if main:
        print(format_table(document))
        print(f"outputs: {trainer.run_dir}")
    return 0


def train_main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _train_parser().parse_intermixed_args(argv)
    _resume_target(args)
    if args.nproc is not None and "RANK" not in os.environ:
        return _report_errors("cbd-train", args.debug, lambda: _torchrun(argv, args.nproc))
    return _report_errors("cbd-train", args.debug, lambda: _train(args))


def _eval(args: argparse.Namespace) -> int:
    prefer_passive_omp_wait()
    from .eval.report import format_table
    from .train import checkpoint
    from .train.loop import Trainer

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


def eval_main(argv: list[str] | None = None) -> int:
    args = _eval_parser().parse_args(argv)
    return _report_errors("cbd-eval", args.debug, lambda: _eval(args))


def train_console() -> None:
    sys.exit(train_main(sys.argv[1:]))


def eval_console() -> None:
    sys.exit(eval_main(sys.argv[1:]))


if __name__ == "__main__":
    train_console()
