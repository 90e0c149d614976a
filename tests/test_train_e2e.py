"""End to end: cbd-train on a minutes-sized scenario with every loss on; outputs, metric ranges, exact resume."""
import csv
import json

import pytest
import yaml

import cbd_fast
from cbd_fast.cli import eval_main, train_main
from cbd_fast.eval.compare import compare

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
    assert _run(tmp_path, "full") == 0
    printed = capsys.readouterr().out
    assert "forgetting" in printed and "average" in printed
    run = tmp_path / "runs" / "full"
    for name in ("config.yaml", "metrics.json", "metrics.csv", "accuracy_matrix.png", "task_curves.png",
                 "checkpoints/last.pt"):
        assert (run / name).is_file(), name
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
    assert _run(tmp_path, "interrupted", ["--resume"]) == 0
    resumed = _metrics(tmp_path, "interrupted")
    assert resumed["accuracy_matrices"] == document["accuracy_matrices"]

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
