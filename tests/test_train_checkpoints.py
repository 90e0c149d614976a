"""When the loop writes its checkpoint (task ends, and at most ``train.checkpoint_interval_s`` apart between them),
and that a run killed with SIGKILL between two checkpoints resumes to the uninterrupted run's results exactly."""
import os
import pathlib
import signal
import subprocess
import sys

import pytest

import cbd_fast
from cbd_fast import config as config_lib
from cbd_fast.train import checkpoint
from cbd_fast.train.loop import Trainer

pytestmark = pytest.mark.skipif(not cbd_fast.has_extension(), reason="training uses the compiled ops")

SMALL = {
    "seed": 5, "device": "cpu", "threads": 1, "model": {"preset": "tiny"}, "method": "cbd",
    "method_args": {"banzhaf_samples": 16},
    "data": {"scenario": "synthetic", "num_tasks": 2, "train_per_class": 5, "test_per_class": 3},
    "train": {"epochs": 3, "batch_size": 10, "warmup_steps": 1},
}

# Runs the config in a child process and kills it (SIGKILL: no handler, no flush) at its Nth training step.
KILLER = """
import os, signal, sys
from cbd_fast.train.loop import Trainer
from cbd_fast import config as config_lib
calls = 0
backward = Trainer._backward  # once per batch (train.accumulate = 1: once per optimizer step)
def dying_backward(self, *args, **kwargs):
    global calls
    calls += 1
    if calls == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)
    return backward(self, *args, **kwargs)
Trainer._backward = dying_backward
Trainer(config_lib.load_yaml(sys.argv[1]), show_progress=False).run()
"""


def _config(tmp_path: pathlib.Path, name: str, interval: float = 30.0) -> dict:
    train = dict(SMALL["train"], checkpoint_interval_s=interval)
    return config_lib.resolve(dict(SMALL, name=name, output_dir=str(tmp_path / "runs"), train=train), warn=False)


def _saved_positions(monkeypatch, tmp_path, interval: float) -> list[tuple[int, int]]:
    saved = []
    real = checkpoint.save_atomic
    monkeypatch.setattr(checkpoint, "save_atomic",
                        lambda state, path: (saved.append((state["next_task"], state["next_epoch"])),
                                             real(state, path)))
    Trainer(_config(tmp_path, f"every_{interval}", interval), show_progress=False).run()
    return saved


def test_checkpoints_at_task_ends_and_after_the_interval(monkeypatch, tmp_path):
    # a long interval: only the task ends (the second one also finishes the run)
    assert _saved_positions(monkeypatch, tmp_path, 3600.0) == [(1, 0), (2, 0)]
    # an interval shorter than an epoch: every epoch, as the positions a resume can continue from
    assert _saved_positions(monkeypatch, tmp_path, 0.0) == [(0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)]


def test_sigkill_between_checkpoints_resumes_exactly(tmp_path):
    full = Trainer(_config(tmp_path, "full"), show_progress=False)
    document = full.run()
    kill_at = 3 * full._steps_per_epoch(0) + full._steps_per_epoch(1) + 2  # task 2, epoch 2, step 2
    # a long interval: the last checkpoint is task 1's end; none: task 2's first epoch
    for interval, resumes_at in ((3600.0, (1, 0)), (0.0, (1, 1))):
        config = _config(tmp_path, f"killed_{interval}", interval)
        path = tmp_path / "killed.yaml"
        path.write_text(config_lib.dump(config))
        child = subprocess.run([sys.executable, "-c", KILLER, str(path), str(kill_at)],
                               capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
        assert child.returncode == -signal.SIGKILL, child.stderr
        state = checkpoint.load(tmp_path / "runs" / config["name"] / "checkpoints" / "last.pt")
        assert (state["next_task"], state["next_epoch"]) == resumes_at  # what came after it is lost, and redone
        resumed = Trainer(config, show_progress=False)
        assert resumed.resume()
        again = resumed.run()
        assert again["galleries"] == document["galleries"], interval
        assert again["loss_history"] == document["loss_history"], interval
