"""End to end: cbd-train on a minutes-sized scenario with every loss on; outputs, metric ranges, exact resume,
the run-folder policy, resume checks, a run stopped by a non-finite loss, cbd-report on finished and unfinished
runs, cbd-eval."""
import csv
import json
import os
import stat

import pytest
import torch
import yaml

import cbd_fast
from cbd_fast.cli import eval_main, train_main
from cbd_fast.eval.compare import main as report_main
from cbd_fast.train import checkpoint

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
        assert _run(tmp_path, "cbd_s3") == 0
    finally:
        os.umask(old_umask)
    printed = capsys.readouterr().out
    assert "forgetting" in printed and "Final avg" in printed and "FWT" in printed
    run = tmp_path / "runs" / "cbd_s3"
    for name in ("config.yaml", "metrics.json", "metrics.csv", "accuracy_matrix.png", "task_curves.png",
                 "checkpoints/last.pt"):
        assert (run / name).is_file(), name
    for name in ("config.yaml", "checkpoints/last.pt", "metrics.json", "metrics.csv", "accuracy_matrix.png",
                 "task_curves.png"):
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o644, name  # readable by the group, like open()
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    assert recorded["device"] == "cpu" and recorded["data"] == dict(TINY["data"], workers=0)
    assert recorded["method"] == "cbd" and recorded["method_args"]["banzhaf"] == 1.0
    assert recorded["method_args"]["banzhaf_estimator"] == "paired"  # defaults are filled in and recorded

    # a second run into the same folder is refused: the finished run stays as it was
    before = (run / "checkpoints" / "last.pt").read_bytes()
    assert _run(tmp_path, "cbd_s3") == 2
    error = capsys.readouterr().err
    assert "already holds a run, finished (2/2 tasks trained); there is nothing to continue (--resume only prints" \
           " its results table)" in error and "continues" not in error
    assert (run / "checkpoints" / "last.pt").read_bytes() == before
    document = _metrics(tmp_path, "cbd_s3")
    assert document["tasks_trained"] == 2
    assert document["protocol"]["test_captions"] == [3 * n for n in document["protocol"]["test_images"]]
    for gallery in ("per_task", "cumulative"):  # both galleries, each with the pre-training row
        content = document["galleries"][gallery]
        matrix = content["matrices"]["mean_R@1"]
        assert len(matrix) == 3 and all(len(row) == 2 for row in matrix)
        for metric, rows in content["matrices"].items():
            for row in rows:
                assert all(v >= 1.0 if metric.endswith("MedR") else 0.0 <= v <= (600.0 if metric == "rsum" else 100.0)
                           for v in row), metric
        summary = content["summary"]["mean_R@1"]
        assert summary["forward_transfer"] == pytest.approx(matrix[1][1] - matrix[0][1])
        assert summary["final_average"] == pytest.approx((matrix[2][0] + matrix[2][1]) / 2)
    per_task, cumulative = (document["galleries"][g]["matrices"]["mean_R@1"] for g in ("per_task", "cumulative"))
    assert cumulative[0][0] == per_task[0][0] and cumulative[1][0] == per_task[1][0]  # gallery: task 1 alone
    assert "t2i_mAP" in document["galleries"]["per_task"]["matrices"]  # the synthetic tasks carry labels
    assert len(document["seconds_per_epoch"]) == 4 and len(document["evaluation_seconds"]) == 3
    with (run / "metrics.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 2 * (3 * 2 + 8)  # 2 galleries x (3 rows x 2 tasks + 8 summaries)
    assert rows[0]["after_task"] == "0" and rows[0]["task"] == "1" and rows[0]["summary"] == ""
    assert not any(value.startswith("-0.00") for row in rows for value in row.values())
    assert all(len(value.split(".")[-1]) == 2 for row in rows for value in (row["t2i_R@1"],) if value)

    # interrupted after 3 of 4 epochs (mid task 2); cbd-report on it, a second seed and the first run
    assert _run(tmp_path, "interrupted", ["--stop-after-epochs", "3"]) == 0
    assert _metrics(tmp_path, "interrupted")["tasks_trained"] == 1
    assert _run(tmp_path, "cbd_s4", ["seed=4"]) == 0
    capsys.readouterr()
    report = tmp_path / "report"
    assert report_main([str(tmp_path / "runs" / n) for n in ("cbd_s3", "cbd_s4", "interrupted")]
                       + ["--out", str(report)]) == 0
    markdown = (report / "report.md").read_text()
    assert "| cbd | 2 (3, 4) |" in markdown and "interrupted: unfinished (1/2 tasks trained)" in markdown
    for name in ("report.csv", "report.tex", "stability_plasticity.png"):
        assert (report / name).stat().st_size > 0
    with (report / "report.csv").open() as stream:
        assert [row["runs"] for row in csv.DictReader(stream)] == ["cbd_s3 cbd_s4"]

    capsys.readouterr()
    # under another config the run cannot be resumed: the message lists what differs
    assert _run(tmp_path, "interrupted", ["--resume", "train.lr=0.01", "data.num_tasks=3"]) == 2
    error = capsys.readouterr().err
    assert "another config" in error and "data.num_tasks: 2 -> 3; train.lr: 0.0005 -> 0.01" in error
    stale = tmp_path / "runs" / "interrupted" / "checkpoints" / ".last.pt.k1ll3d.tmp"  # from a killed write
    stale.write_bytes(b"partial")
    assert _run(tmp_path, "interrupted", ["--resume"]) == 0
    assert not stale.exists()
    resumed = _metrics(tmp_path, "interrupted")  # the uninterrupted run's metrics, pre-training row and
    assert resumed["galleries"] == document["galleries"]  # cumulative gallery included
    # resuming a finished run says so, and trains nothing
    capsys.readouterr()
    assert _run(tmp_path, "interrupted", ["--resume"]) == 0
    captured = capsys.readouterr()
    assert "the run is finished (all 2 tasks trained); nothing to resume" in captured.err
    assert "forgetting" in captured.out and _metrics(tmp_path, "interrupted") == resumed

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

    real = cbd_method.global_sample_distillation

    def diverging(*args, **kwargs):  # the distillation term of task 2 becomes NaN
        return real(*args, **kwargs) * float("nan")

    monkeypatch.setattr(cbd_method, "global_sample_distillation", diverging)
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
