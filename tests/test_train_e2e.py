"""End to end: cbd-train on a minutes-sized scenario with every loss on; outputs, metric ranges, exact resume,
the run-folder policy, resume checks, and a run stopped by a non-finite loss."""
import csv
import json
import os
import stat

import pytest
import torch
import yaml

import cbd_fast
from cbd_fast.cli import eval_main, train_main
from cbd_fast.eval.compare import compare
from cbd_fast.train import checkpoint, loop

pytestmark = pytest.mark.skipif(not cbd_fast.has_extension(), reason="training uses the compiled ops")

TINY = {
    "name": "e2e",
    "seed": 3,
    "device": "cpu",
    "model": {"preset": "tiny"},
    "data": {"scenario": "synthetic", "num_tasks": 2, "train_per_class": 6, "test_per_class": 4},
    "train": {"epochs": 2, "batch_size": 16, "warmup_steps": 2,
              "replay": {"strategy": "reservoir", "size": 16, "batch_size": 8}},
    "method": "cbd",
    "method_args": {"sample": 1.0, "token": 1.0, "banzhaf": 1.0, "banzhaf_samples": 16, "prompt": 0.1},
}


def _run(tmp_path, name, extra=(), config=TINY):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(dict(config, output_dir=str(tmp_path / "runs"))))
    return train_main(["--config", str(path), "--no-progress", "--name", name, *extra])


def _metrics(tmp_path, name):
    return json.loads((tmp_path / "runs" / name / "metrics.json").read_text())


def test_train_outputs_and_exact_resume(tmp_path, capsys):
    old_umask = os.umask(0o022)
    try:
        assert _run(tmp_path, "full") == 0
    finally:
        os.umask(old_umask)
    printed = capsys.readouterr().out
    assert "forgetting" in printed and "average" in printed
    run = tmp_path / "runs" / "full"
    for name in ("config.yaml", "metrics.json", "metrics.csv", "accuracy_matrix.png", "task_curves.png",
                 "checkpoints/last.pt"):
        assert (run / name).is_file(), name
    for name in ("config.yaml", "checkpoints/last.pt"):  # readable by the group, not 0600
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o644, name
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    assert recorded["device"] == "cpu" and recorded["data"] == TINY["data"]

    # a second run into the same folder is refused: the finished run stays as it was
    before = (run / "checkpoints" / "last.pt").read_bytes()
    assert _run(tmp_path, "full") == 2
    assert "already holds a run, finished (2/2 tasks trained); --resume" in capsys.readouterr().err
    assert (run / "checkpoints" / "last.pt").read_bytes() == before
    document = _metrics(tmp_path, "full")
    assert document["tasks_trained"] == 2
    matrix = document["accuracy_matrices"]["mean_R@1"]
    assert len(matrix) == 2 and all(len(row) == 2 for row in matrix)
    for row in document["per_task_results"]:
        for metrics in row["results"]:
            assert all(0.0 <= value <= 100.0 for value in metrics.values())
    assert "t2i_mAP" in document["per_task_results"][0]["results"][0]  # the synthetic tasks carry labels
    assert len(document["seconds_per_epoch"]) == 4
    with (run / "metrics.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 4 and {"after_task", "eval_task", "t2i_R@1"} <= set(rows[0])
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    assert recorded["method"] == "cbd" and recorded["method_args"]["banzhaf"] == 1.0
    assert recorded["method_args"]["banzhaf_estimator"] == "paired"  # defaults are filled in and recorded

    # interrupted after 3 of 4 epochs (mid task 2), then resumed: the same metrics as the uninterrupted run
    assert _run(tmp_path, "interrupted", ["--stop-after-epochs", "3"]) == 0
    assert _metrics(tmp_path, "interrupted")["tasks_trained"] == 1
    capsys.readouterr()
    # under another config the run cannot be resumed: the message lists what differs
    assert _run(tmp_path, "interrupted", ["--resume", "train.lr=0.01", "data.num_tasks=3"]) == 2
    error = capsys.readouterr().err
    assert "another config" in error and "data.num_tasks: 2 -> 3; train.lr: 0.002 -> 0.01" in error
    stale = tmp_path / "runs" / "interrupted" / "checkpoints" / ".last.pt.k1ll3d.tmp"  # from a killed write
    stale.write_bytes(b"partial")
    assert _run(tmp_path, "interrupted", ["--resume"]) == 0
    assert not stale.exists()
    resumed = _metrics(tmp_path, "interrupted")
    assert resumed["accuracy_matrices"] == document["accuracy_matrices"]
    # resuming a finished run says so, and trains nothing
    capsys.readouterr()
    assert _run(tmp_path, "interrupted", ["--resume"]) == 0
    captured = capsys.readouterr()
    assert "the run is finished (all 2 tasks trained); nothing to resume" in captured.err
    assert "forgetting" in captured.out and _metrics(tmp_path, "interrupted") == resumed

    # the comparison table groups runs by name and reads their summaries
    table = compare([run, tmp_path / "runs" / "interrupted"])
    assert table.count("\n| full | 1 |") == 1 and "| interrupted | 1 |" in table

    # cbd-eval on the final checkpoint prints the same table
    capsys.readouterr()
    assert eval_main([str(run / "checkpoints" / "last.pt")]) == 0
    assert "forgetting" in capsys.readouterr().out


def test_data_from_a_scenario_file(tmp_path):
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text(yaml.safe_dump(TINY["data"]))
    config = dict(TINY, data=str(scenario), train=dict(TINY["train"], epochs=1), method="finetune", method_args={})
    assert _run(tmp_path, "from_file", config=config) == 0
    assert _metrics(tmp_path, "from_file")["tasks"] == ["synthetic/task0", "synthetic/task1"]


def test_cbd_learned_module_runs(tmp_path):
    overrides = {"banzhaf_source": "module", "token_kind": "kl"}
    config = dict(TINY, train=dict(TINY["train"], epochs=1), method_args=dict(TINY["method_args"], **overrides))
    assert _run(tmp_path, "variant", config=config) == 0
    assert _metrics(tmp_path, "variant")["tasks_trained"] == 2


def test_non_finite_loss_stops_the_run_and_keeps_the_checkpoint(tmp_path, capsys, monkeypatch):
    from cbd_fast.methods import cbd as cbd_method

    real = cbd_method.sample_distillation_loss

    def diverging(*args, **kwargs):  # the distillation term of task 2 becomes NaN
        return real(*args, **kwargs) * float("nan")

    monkeypatch.setattr(cbd_method, "sample_distillation_loss", diverging)
    config = dict(TINY, train=dict(TINY["train"], epochs=1))
    assert _run(tmp_path, "nan", config=config) == 1
    error = capsys.readouterr().err
    path = tmp_path / "runs" / "nan" / "checkpoints" / "last.pt"
    assert "non-finite loss at task 2/2, epoch 1/1, step 1/" in error and "sample=nan" in error
    assert "contrastive=" in error.split("finite:")[1]  # the finite terms are shown as such
    assert f"the last checkpoint, {path} (saved after task 1/2, epoch 1/1), is intact" in error
    state = checkpoint.load(path)
    assert (state["next_task"], state["next_epoch"]) == (1, 0)
    assert all(torch.isfinite(value).all() for value in state["model"].values())


def test_run_folder_policy(tmp_path, capsys):
    foreign = tmp_path / "runs" / "foreign"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    assert _run(tmp_path, "foreign") == 2 and _run(tmp_path, "foreign", ["--overwrite"]) == 2
    assert "holds no cbd-train run" in capsys.readouterr().err and (foreign / "notes.txt").read_text() == "mine"
    with pytest.raises(SystemExit) as info:  # argparse: not allowed together
        _run(tmp_path, "x", ["--resume", "--overwrite"])
    assert info.value.code == 2

    old = tmp_path / "runs" / "old"  # a run folder: refused without a flag, replaced with --overwrite
    old.mkdir()
    (old / "config.yaml").write_text("name: old\n")
    (old / "leftover.png").write_text("from the old run")
    assert _run(tmp_path, "old") == 2
    assert "already holds a run, unfinished (no task finished)" in capsys.readouterr().err
    assert _run(tmp_path, "old", ["--overwrite", "--stop-after-epochs", "1"]) == 0
    assert not (old / "leftover.png").exists() and yaml.safe_load((old / "config.yaml").read_text())["seed"] == 3
