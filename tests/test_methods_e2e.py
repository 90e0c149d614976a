"""Every registered method through ``cbd-train method=<name>`` on a CI-sized scenario; kill/resume exactness for
methods with extra state (EWC's Fisher, ALTA's snapshots and logit memory, DIME's module, RVLR's projections)
and for joint training's stages without training."""
import json

import pytest
import yaml

import cbd_fast
from cbd_fast.cli import train_main
from cbd_fast.methods import METHODS

pytestmark = pytest.mark.skipif(not cbd_fast.has_extension(), reason="training uses the compiled ops")

SMALL = {
    "seed": 2,
    "device": "cpu",
    "model": {"preset": "tiny"},
    "data": {"scenario": "synthetic", "num_tasks": 2, "train_per_class": 5, "test_per_class": 3},
    "train": {"epochs": 1, "batch_size": 10, "warmup_steps": 1,
              "replay": {"strategy": "none", "size": 0, "batch_size": 0}},
}
# a term of each method that is on from the second task (the first has no teacher / buffer / Fisher yet)
SECOND_TASK_TERM = {"finetune": "contrastive", "joint": None, "er": "contrastive", "lwf": "lwf", "ewc": "ewc",
                    "modx": "modx", "cbd": "banzhaf", "rvlr": "kd", "icsd": "soft", "alta": "logit_memory",
                    "dime": "rank"}


def _run(tmp_path, name, extra=(), config=SMALL):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(dict(config, output_dir=str(tmp_path / "runs"))))
    return train_main(["--config", str(path), "--no-progress", "--name", name, *extra])


def _metrics(tmp_path, name):
    return json.loads((tmp_path / "runs" / name / "metrics.json").read_text())


def test_every_method_is_tested():
    assert set(SECOND_TASK_TERM) == set(METHODS)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_trains_through_cbd_train(tmp_path, name):
    assert _run(tmp_path, name, [f"method={name}"]) == 0
    document = _metrics(tmp_path, name)
    assert document["tasks_trained"] == 2
    matrices = document["galleries"]["per_task"]["matrices"]
    for metric, matrix in matrices.items():
        assert len(matrix) == 3, metric  # row 0 = before training, then one row per task
        if "MedR" in metric:  # a rank, 1 .. gallery size
            assert all(value >= 1.0 for row in matrix for value in row), metric
        else:
            assert all(0.0 <= value <= (600.0 if metric == "rsum" else 100.0) for row in matrix for value in row), metric
    recorded = yaml.safe_load((tmp_path / "runs" / name / "config.yaml").read_text())
    assert recorded["method"] == name and set(recorded["method_args"]) == set(METHODS[name].defaults)
    history = document["loss_history"]
    if name == "joint":  # one stage over both tasks' data, nothing trained after it; the rows repeat
        assert [(h["task"], h["epoch"]) for h in history] == [(0, 0)]
        matrix = matrices["mean_R@1"]
        summary = document["galleries"]["per_task"]["summary"]["mean_R@1"]
        assert matrix[1] == matrix[2] and summary["forgetting"] == 0.0
    else:
        assert [(h["task"], h["epoch"]) for h in history] == [(0, 0), (1, 0)]
        assert SECOND_TASK_TERM[name] in history[1]


@pytest.mark.parametrize("name", ["ewc", "alta", "dime", "rvlr", "joint"])
def test_kill_and_resume_reproduce_the_run(tmp_path, name):
    config = dict(SMALL, method=name, train=dict(SMALL["train"], epochs=2))
    assert _run(tmp_path, "full", config=config) == 0
    stop = "1" if name == "joint" else "3"  # joint: mid-way through its single stage; others: mid task 2
    assert _run(tmp_path, "interrupted", ["--stop-after-epochs", stop], config=config) == 0
    if name == "joint":  # no stage finished: only the checkpoint
        assert (tmp_path / "runs" / "interrupted" / "checkpoints" / "last.pt").is_file()
    else:
        assert _metrics(tmp_path, "interrupted")["tasks_trained"] == 1
    assert _run(tmp_path, "interrupted", ["--resume"], config=config) == 0
    full, resumed = _metrics(tmp_path, "full"), _metrics(tmp_path, "interrupted")
    assert resumed["galleries"] == full["galleries"]
    assert resumed["loss_history"] == full["loss_history"]
