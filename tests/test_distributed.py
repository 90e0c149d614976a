"""Data-parallel training on the CPU (gloo, two processes under torchrun): the same training as one process with the
same global batch, exact resume after kill -9 of the whole job, and batches that do not depend on the number of
DataLoader workers; the collectives (gathering with gradient, the ranks' agreement checks) in two plain gloo
processes; and in one process the pieces: sharding, the local-loss forms of the global terms, gradient
accumulation, the resume check."""
import json
import logging
import math
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import yaml

import cbd_fast
from cbd_fast.cli import train_main
from cbd_fast.config import ConfigError, resolve
from cbd_fast.methods.base import Outputs, global_contrastive, global_sample_distillation
from cbd_fast.methods.modx import global_modx_distillation, modx_distillation_loss
from cbd_fast.train import checkpoint
from cbd_fast.train.data_loader import StepDataset, Step, epoch_plan, make_loader
from cbd_fast.train.distributed import launch_environment, shard_bounds
from cbd_fast.train.loop import Trainer, different_checkpoints_error, different_terms_error
from cbd_fast.train.losses import contrastive_loss, sample_distillation_loss
from cbd_fast.train.replay import ReplayBuffer

pytestmark = pytest.mark.skipif(not cbd_fast.has_extension(), reason="training uses the compiled ops")

# 2 tasks of 24 training samples: 3 batches of 8 (4 per rank) per epoch; replay after task 1 (4 more rows, 2 per
# rank); 2 batches per optimizer step (the epoch's last optimizer step has 1).
TINY = {
    "seed": 5,
    "device": "cpu",
    "threads": 1,
    "model": {"preset": "tiny"},
    "data": {"scenario": "synthetic", "num_tasks": 2, "train_per_class": 6, "test_per_class": 4},
    "train": {"epochs": 2, "batch_size": 8, "warmup_steps": 2, "accumulate": 2, "lr": 5e-4,
              "checkpoint_interval_s": 0,  # a checkpoint after every epoch, whatever the machine's speed
              "replay": {"strategy": "reservoir", "size": 16, "batch_size": 4}},
    "method": "lwf",
    "method_args": {"temperature": 0.2},
}
# every term of cbd, Banzhaf included; a checkpoint after every optimizer step, the newest 3 kept
CBD = dict(TINY, method="cbd", method_args={"banzhaf_samples": 16},
           train=dict(TINY["train"], checkpoint_every_steps=1, keep_checkpoints=3))


def _write_config(tmp_path, name, config):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(dict(config, output_dir=str(tmp_path / "runs"), name=name)))
    return path


def _torchrun(tmp_path, name, config, *extra):
    """Start ``cbd-train`` in 2 processes under torchrun, in a process group of its own (for kill -9)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "cbd_fast.cli", "--config", str(_write_config(tmp_path, name, config)), "--no-progress", *extra]
    log = (tmp_path / f"{name}.log").open("ab")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _finish(process, tmp_path, name):
    try:
        code = process.wait(timeout=150)
    except subprocess.TimeoutExpired:  # a hung collective: end the job rather than leave it running
        _kill_job(process)
        code = "killed after 150 s"
    assert code == 0, (tmp_path / f"{name}.log").read_text()[-3000:]


def _kill_job(process):
    """SIGKILL torchrun's agent and every process it started (each rank runs in a session of its own)."""
    for pid in _process_tree(process.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # a DataLoader worker that ended between the listing and the kill
            pass
    process.wait()


def _run_dir(tmp_path, name):
    return tmp_path / "runs" / name


def _model(tmp_path, name):
    return checkpoint.load(_run_dir(tmp_path, name) / "checkpoints" / "last.pt")["model"]


def _metrics(tmp_path, name):
    return json.loads((_run_dir(tmp_path, name) / "metrics.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """one: 1 process; two: 2 processes (lwf); cbd: 2 processes (cbd); cbd_killed: as cbd with 2 DataLoader workers
    per rank, killed with SIGKILL in task 2 and resumed."""
    tmp_path = tmp_path_factory.mktemp("distributed")
    tensorboard = {"logging": {"tensorboard": True}} if _has_tensorboard() else {}
    saved = dict(TINY["train"], checkpoint_every_steps=1, keep_checkpoints=3)  # keys that do not change the run
    assert train_main(["--config", str(_write_config(tmp_path, "one", dict(TINY, train=saved, **tensorboard))),
                       "--no-progress"]) == 0
    two = _torchrun(tmp_path, "two", TINY)
    rvlr = dict(TINY, method="rvlr", method_args={})  # every term global, relations over the global batch
    assert train_main(["--config", str(_write_config(tmp_path, "rvlr_one", rvlr)), "--no-progress"]) == 0
    _finish(two, tmp_path, "two")
    _finish(_torchrun(tmp_path, "rvlr_two", rvlr), tmp_path, "rvlr_two")
    _finish(_torchrun(tmp_path, "cbd", CBD), tmp_path, "cbd")

    killed = dict(CBD, data=dict(CBD["data"], workers=2))
    process = _torchrun(tmp_path, "cbd_killed", killed)
    run = _run_dir(tmp_path, "cbd_killed")
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:  # wait for a step checkpoint inside task 2
        state = _position(run / "checkpoints" / "last.pt")
        if state is not None and state[0] == 1 and state[2] > 0:
            break
        time.sleep(0.02)
    _kill_job(process)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = _position(run / "checkpoints" / "last.pt")
    _finish(_torchrun(tmp_path, "cbd_killed", killed, "--resume"), tmp_path, "cbd_killed")
    return tmp_path, killed_at


def _process_tree(root):
    """``root`` and all its descendants (from /proc), parents first."""
    children = {}
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, rest = stat.read_text().split(" (", 1)
        except OSError:
            continue
        children.setdefault(int(rest.rsplit(") ", 1)[1].split()[1]), []).append(int(pid))
    tree, frontier = [], [root]
    while frontier:
        pid = frontier.pop(0)
        tree.append(pid)
        frontier += children.get(pid, [])
    return tree


def _has_tensorboard():
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def _position(path):
    """(next_task, next_epoch, next_step) of a checkpoint, or None while there is none (or it is being replaced)."""
    try:
        state = checkpoint.load(path)
    except (FileNotFoundError, checkpoint.CheckpointError, OSError):
        return None
    return state["next_task"], state["next_epoch"], state["next_step"]


def test_two_processes_train_as_one_process_with_the_same_global_batch(runs):
    """Not bitwise: two processes sum the same terms in another order — each rank's loss is the mean over its rows
    weighted by its share, the score matrix of the global batch is computed in two [6 x 12] row blocks instead of
    one [12 x 12] matrix, and the ranks' gradients are added by an all-reduce — so the losses agree to float32
    rounding, amplified a little over 8 optimizer steps (7.5e-6 relative measured; 1e-4 asserted). AdamW moves
    every parameter by about lr per step whatever the size of its gradient, so a gradient entry near zero whose
    sign the rounding flips moves its parameter by up to 2·lr = 1e-3 per step: the parameters agree to 2e-3
    (4.5e-4 measured). A wrong share (the logged losses are the share-weighted sums) or a gather without the
    gradient of the other ranks' rows changes the losses by far more than 1e-4."""
    tmp_path, _ = runs
    one, two = _model(tmp_path, "one"), _model(tmp_path, "two")
    assert one.keys() == two.keys()
    worst = max(float((one[k].float() - two[k].float()).abs().max()) for k in one)
    assert worst < 2e-3, worst
    assert any(not torch.equal(one[k], two[k]) for k in one)  # two processes really ran their own sums
    history_one, history_two = (_metrics(tmp_path, n)["loss_history"] for n in ("one", "two"))
    assert len(history_one) == len(history_two) == 4
    for a, b in zip(history_one, history_two):
        assert a.keys() == b.keys() and "lwf" in history_one[-1]
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert _metrics(tmp_path, "one")["galleries"] == _metrics(tmp_path, "two")["galleries"]


def test_two_processes_train_rvlr_as_one_process(runs):
    """RVLR's representation and relation terms on the global batch (same tolerances and reasons as above)."""
    tmp_path, _ = runs
    one, two = _model(tmp_path, "rvlr_one"), _model(tmp_path, "rvlr_two")
    assert max(float((one[k].float() - two[k].float()).abs().max()) for k in one) < 2e-3
    history_one, history_two = (_metrics(tmp_path, n)["loss_history"] for n in ("rvlr_one", "rvlr_two"))
    assert {"iic", "ttc", "kd", "kdi", "kdt"} <= set(history_one[-1])
    for a, b in zip(history_one, history_two, strict=True):
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


def test_kill_9_of_the_whole_job_resumes_exactly_with_any_worker_count(runs):
    """The run with 2 DataLoader workers per rank, killed in task 2 and resumed, ends bitwise where the
    uninterrupted run with 0 workers ends: the resume is exact and the batches do not depend on the workers."""
    tmp_path, killed_at = runs
    # inside task 2: the kill follows a step checkpoint there, usually mid-epoch, but on a busy machine the epoch's
    # end may be written before the kill lands (mid-epoch resume from a step checkpoint: the test below)
    assert killed_at is not None and killed_at[0] == 1 and killed_at[1:] != (0, 0), killed_at
    log = (tmp_path / "cbd_killed.log").read_text()
    assert "resuming" in log and "task 2/2" in log
    reference, resumed = _model(tmp_path, "cbd"), _model(tmp_path, "cbd_killed")
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    a, b = _metrics(tmp_path, "cbd"), _metrics(tmp_path, "cbd_killed")
    assert a["galleries"] == b["galleries"] and a["loss_history"] == b["loss_history"]
    assert "banzhaf" in a["loss_history"][-1]
    # rank 0 alone wrote, and kept the newest 3 checkpoints besides last.pt's own name
    kept = sorted(p.name for p in (_run_dir(tmp_path, "cbd") / "checkpoints").iterdir())
    assert len(kept) == 4 and kept[-1] == "last.pt" and kept[0].startswith("0000"), kept
    final = _run_dir(tmp_path, "cbd") / "checkpoints" / kept[-2]
    assert final.read_bytes() == (_run_dir(tmp_path, "cbd") / "checkpoints" / "last.pt").read_bytes()


def test_resume_from_a_kept_checkpoint_file(runs):
    """One process: --resume PATH continues from a kept step checkpoint (mid-epoch of task 2) into another run
    folder and ends bitwise where the uninterrupted run ended."""
    tmp_path, _ = runs
    kept = sorted((_run_dir(tmp_path, "one") / "checkpoints").glob("0*.pt"))
    assert [p.name.split("-", 1)[1] for p in kept] == ["task2-epoch1.pt", "task2-epoch2-step2.pt",
                                                        "task2-epoch2.pt"]  # the newest 3, in the order written
    config = _write_config(tmp_path, "one_again", dict(TINY, train=dict(TINY["train"], checkpoint_every_steps=1)))
    assert train_main(["--config", str(config), "--no-progress", "--resume", str(kept[1])]) == 0
    one, again = _model(tmp_path, "one"), _model(tmp_path, "one_again")
    assert all(torch.equal(one[k], again[k]) for k in one)
    assert _metrics(tmp_path, "one")["loss_history"] == _metrics(tmp_path, "one_again")["loss_history"]
    assert train_main(["--config", str(config), "--no-progress", "--resume", str(tmp_path / "nothing.pt")]) == 2


def test_resume_latest_continues_from_the_run_folders_last_checkpoint(runs):
    """``--resume latest`` (the word, as typed): the run folder's ``last.pt`` — here a run folder as a run
    interrupted in task 2 leaves it, from the kept step checkpoint of the 1-process run — and the run ends bitwise
    where the uninterrupted run ended."""
    tmp_path, _ = runs
    kept = sorted((_run_dir(tmp_path, "one") / "checkpoints").glob("0*.pt"))[1]
    config = _write_config(tmp_path, "one_latest", dict(TINY, train=dict(TINY["train"], checkpoint_every_steps=1)))
    run = _run_dir(tmp_path, "one_latest")
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(kept.read_bytes())
    (run / "config.yaml").write_text((_run_dir(tmp_path, "one") / "config.yaml").read_text())
    assert train_main(["--config", str(config), "--no-progress", "--resume", "latest"]) == 0
    one, again = _model(tmp_path, "one"), _model(tmp_path, "one_latest")
    assert all(torch.equal(one[k], again[k]) for k in one)
    assert _metrics(tmp_path, "one")["loss_history"] == _metrics(tmp_path, "one_latest")["loss_history"]


def test_resume_with_another_number_of_processes(runs):
    """A checkpoint of the 2-process run, resumed in 1 process: allowed, with a warning that the result is not
    bit-identical; the run finishes the same training (same global batches)."""
    tmp_path, _ = runs
    kept = sorted((_run_dir(tmp_path, "cbd") / "checkpoints").glob("0*.pt"))
    config = _write_config(tmp_path, "cbd_one_process", CBD)
    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("cbd_fast.train").addHandler(handler)
    try:
        assert train_main(["--config", str(config), "--no-progress", "--resume", str(kept[0])]) == 0
    finally:
        logging.getLogger("cbd_fast.train").removeHandler(handler)
    assert any("resuming a run of 2 process(es) with 1" in message for message in warnings), warnings
    resumed, reference = _metrics(tmp_path, "cbd_one_process"), _metrics(tmp_path, "cbd")
    assert resumed["tasks_trained"] == 2
    assert resumed["loss_history"][:3] == reference["loss_history"][:3]  # the epochs done before the resume


def test_two_processes_train_alta_with_fewer_replay_rows_than_processes(tmp_path):
    """One replayed row per global batch for two processes: rank 1 has no replay rows, and still adds ALTA's
    buffer terms (as zeros), so that both ranks sum the same list of terms — a rank that left them out made the
    ranks' reductions differ in length (gloo aborts; NCCL would hang). ALTA's terms are local (each rank's InfoNCE
    is over its own rows, DESIGN §6.2), so two processes do not train as one and there is no one-process result
    to match: the check is that the run finishes, with finite losses and metrics and the buffer terms logged in
    task 2 (the first with a replay buffer)."""
    alta = dict(TINY, method="alta", method_args={}, model={"preset": "tiny", "prompts": {"enabled": True}},
                train=dict(TINY["train"], epochs=1, replay=dict(TINY["train"]["replay"], batch_size=1)))
    _finish(_torchrun(tmp_path, "alta", alta), tmp_path, "alta")
    metrics = _metrics(tmp_path, "alta")
    history = metrics["loss_history"]
    assert [row["task"] for row in history] == [0, 1]
    assert "buffer_contrastive" not in history[0] and {"buffer_contrastive", "logit_memory"} <= set(history[1])
    assert all(math.isfinite(value) for row in history for value in row.values())
    assert metrics["tasks_trained"] == 2
    recalls = metrics["galleries"]["per_task"]["matrices"]["mean_R@1"][-1]
    assert len(recalls) == 2 and all(math.isfinite(r) for r in recalls), recalls


def test_tensorboard_scalars(runs):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp_path, _ = runs
    events = EventAccumulator(str(_run_dir(tmp_path, "one") / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/contrastive", "train/lwf", "train/lr"} <= set(tags)
    steps = [event.step for event in events.Scalars("train/loss")]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) == 2 * 2 * 2  # 2 tasks x 2 epochs x 2 steps
    assert all(math.isfinite(event.value) for event in events.Scalars("train/loss"))
    assert any(tag.startswith("eval_per_task/") for tag in tags)


# --------------------------------------------------------------------------------------- collectives, two processes
COLLECTIVES = """
import json, torch
from cbd_fast.train.distributed import Distributed
cpu = torch.device("cpu")
group = Distributed.from_environment(cpu)
rank, sizes = group.rank, [3, 2]
x = (torch.arange(2 * sizes[rank], dtype=torch.float64).view(-1, 2) + 10 * rank).requires_grad_()
gathered = group.gather(x, sizes)  # [5, 2]
(gathered * torch.arange(10, dtype=torch.float64).view(5, 2) * (rank + 1)).sum().backward()
print(json.dumps({"gathered": gathered.tolist(), "grad": x.grad.tolist(),
                  "same": group.disagreement(["contrastive", "lwf"], cpu),
                  "different": group.disagreement(["contrastive", "lwf"] if rank == 0 else ["contrastive"], cpu),
                  "found": group.disagreement({"sha256": "ab"} if rank == 0 else None, cpu)}))
group.close()
"""


def test_gather_with_gradient_and_agreement_checks_in_two_processes():
    """Two gloo processes of unequal shares (3 and 2 rows). Gathering: every rank gets the rows of both in rank
    order, and the gradient of a rank's rows is the sum of what both ranks' losses send to them (rank r's loss
    weighs the gathered rows by (r + 1)·w, so each rank's rows get 3·w). Agreement: equal values give None on both
    ranks; different ones give every rank's value on both ranks, so that both raise the same error rather than one
    of them waiting in the next collective (the loss terms of a step, the checkpoint found on resume)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    processes = [subprocess.Popen([sys.executable, "-c", COLLECTIVES], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True,
                                  env=dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1"))
                 for rank in range(2)]
    try:
        outputs = [process.communicate(timeout=120) for process in processes]
    finally:
        for process in processes:
            process.kill()
    assert [process.returncode for process in processes] == [0, 0], [err[-2000:] for _, err in outputs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    rows = [[0, 1], [2, 3], [4, 5], [10, 11], [12, 13]]
    weights = [[3.0 * (2 * i), 3.0 * (2 * i + 1)] for i in range(5)]
    for rank, result in enumerate(results):
        assert result["gathered"] == rows
        assert result["grad"] == (weights[:3] if rank == 0 else weights[3:])
        assert result["same"] is None
        assert result["different"] == [["contrastive", "lwf"], ["contrastive"]]
        assert result["found"] == [{"sha256": "ab"}, None]


def test_the_error_of_different_loss_terms_names_every_ranks_terms():
    message = str(different_terms_error([["contrastive", "lwf"], []], "task 2/2, epoch 1/1, step 3/3", "lwf"))
    assert "at task 2/2, epoch 1/1, step 3/3 (rank 0: contrastive, lwf; rank 1: none)" in message
    assert "Method 'lwf' must add the same terms in the same order on every rank" in message


# --------------------------------------------------------------------------------------- pieces, one process
def test_shards_cover_the_batch_in_order():
    assert shard_bounds(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert shard_bounds(4, 2) == [(0, 2), (2, 4)]
    step = Step([(0, i) for i in range(5)], [(1, 9), (1, 8), (1, 7)])
    shares = [step.share(r, 2) for r in range(2)]
    assert [s.current for s in shares] == [[(0, 0), (0, 1), (0, 2)], [(0, 3), (0, 4)]]
    assert [s.replay for s in shares] == [[(1, 9), (1, 8)], [(1, 7)]]
    assert step.shard_sizes(2) == [5, 3]


def test_launch_environment():
    assert launch_environment({}) == (0, 1, 0)
    assert launch_environment({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (1, 4, 1)
    slurm = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8"}
    with pytest.raises(cbd_fast.config.ConfigError, match="MASTER_ADDR and MASTER_PORT"):
        launch_environment(slurm)
    assert launch_environment(dict(slurm, MASTER_ADDR="node1", MASTER_PORT="29500")) == (5, 8, 1)
    # the batch script of an 8-task allocation is one process, not rank 0 of 8
    assert launch_environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0"}) == (0, 1, 0)
    with pytest.raises(cbd_fast.config.ConfigError, match="RANK=4 is not in"):
        launch_environment({"RANK": "4", "WORLD_SIZE": "4"})


def test_loader_batches_do_not_depend_on_the_number_of_workers():
    trainer = Trainer(resolve(dict(TINY, data=dict(TINY["data"], num_tasks=2))), show_progress=False)
    replay = ReplayBuffer("reservoir", 8)
    replay.add_task(0, len(trainer.tasks[0].train), torch.Generator().manual_seed(0))
    plan = epoch_plan(trainer.tasks, [1], replay, 5, 1, 3, 8, 4)
    assert [len(step.current) for step in plan] == [8, 8, 8] and all(len(s.replay) == 4 for s in plan)
    dataset = StepDataset(trainer.tasks, [step.share(1, 2) for step in plan], 3, trainer.model.tokenizer)
    serial, parallel = (list(make_loader(dataset, workers, pin_memory=False)) for workers in (0, 2))
    for a, b in zip(serial, parallel, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
        assert a["replay"].tolist() == [False] * 4 + [True] * 2


def test_nproc_starts_torchrun_on_the_same_command(monkeypatch):
    import cbd_fast.cli as cli

    started = []
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr("subprocess.call", lambda command: started.append(command) or 0)
    assert train_main(["--nproc", "2", "train.epochs=1", "--name", "x", "--resume"]) == 0
    assert started == [[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "cbd_fast.cli", "train.epochs=1", "--name", "x", "--resume"]]
    assert train_main(["--nproc=0"]) == cli.EXIT_INPUT_ERROR and len(started) == 1


def test_decoding_and_augmentation_in_workers_do_not_depend_on_the_number_of_workers(tmp_path):
    """JPEG files decoded and augmented (random resized crop, flip) in 2 worker processes: the batches are bitwise
    those built in the training process, and the augmentation does change with the epoch."""
    import numpy as np
    from PIL import Image

    from cbd_fast.data import build_tasks
    from cbd_fast.model.tokenizer import ClipTokenizer

    rng = np.random.default_rng(0)
    images = []
    for k in range(14):
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(tmp_path / f"{k}.jpg")
        images.append({"filename": f"{k}.jpg", "split": "train" if k < 10 else "test",
                       "sentences": [{"raw": f"picture {k} caption {c}"} for c in range(3)]})
    (tmp_path / "dataset.json").write_text(json.dumps({"images": images}))
    tasks = build_tasks({"scenario": "karpathy", "root": str(tmp_path), "annotations": "dataset.json",
                         "num_tasks": 1, "augment": {"crop_scale": [0.5, 1.0], "flip": True}}, 24, 7)
    steps = epoch_plan(tasks, [0], ReplayBuffer("none", 0), 7, 0, 0, 4, 0)
    tokenize = ClipTokenizer(16)
    batches = {}
    for epoch in (0, 1):
        for workers in (0, 2):
            loader = make_loader(StepDataset(tasks, steps, epoch, tokenize), workers, pin_memory=False)
            batches[epoch, workers] = list(loader)
    for epoch in (0, 1):
        for a, b in zip(batches[epoch, 0], batches[epoch, 2], strict=True):
            assert all(torch.equal(a[key], b[key]) for key in a)
    assert not torch.equal(batches[0, 0][0]["images"], batches[1, 0][0]["images"])  # another epoch, another view


def _row_blocks(new, old, sizes):
    """Every rank's ``(student, teacher)`` Outputs of a global batch whose score matrices are ``new[N,N]`` and
    ``old[N,N]``, in the local-loss form a distributed run gives them (``Outputs.rows``: the rank's caption rows,
    its image rows, its offset)."""
    shares, start = [], 0
    for n in sizes:
        block = [Outputs(None, None, scores[start:start + n], None, None, sizes,
                         (scores[start:start + n], scores[:, start:start + n].t(), start)) for scores in (new, old)]
        shares.append(block)
        start += n
    return shares


@pytest.mark.parametrize("sizes", [[4, 3], [3, 2, 2]])
def test_local_loss_forms_sum_to_the_global_batch_loss(sizes):
    """The global terms as the methods compute them in a distributed run (each rank's rows of the global score
    matrices, ``global_*``), weighted by the rank's share n_r / N as the loop weights a rank's loss: the sum over
    ranks is the one-process loss of the global batch, and so is its gradient. Mod-X's row sum is scaled by N / n_r
    first. The teacher misranks some rows, so Mod-X leaves out rows in both directions."""
    gen = torch.Generator().manual_seed(0)
    total = sum(sizes)
    new = (torch.randn(total, total, generator=gen) + 2 * torch.eye(total)).requires_grad_()
    old = torch.randn(total, total, generator=gen) + 1.5 * torch.eye(total)
    text_kept, image_kept = (old.argmax(1) == torch.arange(total)), (old.argmax(0) == torch.arange(total))
    assert 0 < int(text_kept.sum()) < total and 0 < int(image_kept.sum()) < total
    scale = torch.tensor(5.0)
    forms = {  # the terms compute in float32: equal to float32 rounding
        "contrastive": (lambda s, t: global_contrastive(s, scale), lambda: contrastive_loss(new, scale)),
        "sample": (lambda s, t: global_sample_distillation(s, t, 0.5),
                   lambda: sample_distillation_loss(new, old, 0.5)),
        "modx": (lambda s, t: global_modx_distillation(s, t, 2.0), lambda: modx_distillation_loss(new, old, 2.0)),
    }
    for name, (local, whole) in forms.items():
        expected = whole()
        (expected_grad,) = torch.autograd.grad(expected, new)
        summed = sum(local(student, teacher) * (n / total)
                     for (student, teacher), n in zip(_row_blocks(new, old, sizes), sizes))
        (grad,) = torch.autograd.grad(summed, new)
        assert summed.item() == pytest.approx(expected.item(), rel=1e-6), name
        assert torch.allclose(grad, expected_grad, rtol=1e-5, atol=1e-7), name
        # one rank's form alone is not the whole: the weighting matters
        student, teacher = _row_blocks(new, old, sizes)[0]
        assert local(student, teacher).item() != pytest.approx(expected.item(), rel=1e-6), name


def test_gradient_accumulation_steps_once_per_two_batches_with_their_mean_gradient(tmp_path):
    """``train.accumulate: 2`` on an epoch of 3 batches: two optimizer steps, the first with the mean of the first
    two batches' gradients, the second (the epoch's end) with the last batch's own (DESIGN §6.2: the step's loss is
    the mean of its batches' losses). Each batch's gradient is recomputed alone at the parameters of its step."""
    config = resolve(dict(TINY, output_dir=str(tmp_path), name="accumulate", method="finetune", method_args={},
                          train=dict(TINY["train"], batch_size=10, accumulate=2, grad_clip=0.0,
                                     replay={"strategy": "none", "size": 0, "batch_size": 0})), warn=False)
    trainer = Trainer(config, show_progress=False)
    named = [(name, p) for name, p in trainer.model.named_parameters() if p.requires_grad]
    steps = []  # (parameters, gradients) at each optimizer step
    apply = trainer._apply_gradients

    def recording(where, loss):
        steps.append(({name: p.detach().clone() for name, p in named},
                      {name: p.grad.clone() for name, p in named if p.grad is not None}))
        apply(where, loss)

    trainer._apply_gradients = recording
    trainer._start_task(0)
    batches = [batch for _, batch in trainer._batches(0, 0)]
    assert [b["images"].shape[0] for b in batches] == [10, 10, 4]
    trainer._train_epoch(0, 0, show_progress=False)
    assert len(steps) == 2 and trainer.optimizer_steps == 2

    def gradient(batch, step):
        trainer.model.zero_grad(set_to_none=True)
        trainer.model.train()
        trainer.method.losses(batch, 0, trainer._step_seed(0, 0, step)).total().backward()
        return {name: p.grad.clone() for name, p in named if p.grad is not None}

    for (parameters, applied), group in zip(steps, ([0, 1], [2])):
        with torch.no_grad():
            for name, p in named:
                p.copy_(parameters[name])
        alone = [gradient(batches[step], step) for step in group]
        assert applied.keys() == alone[0].keys()
        for name in applied:
            expected = sum(g[name] for g in alone) / len(alone)
            assert torch.allclose(applied[name], expected, rtol=1e-5, atol=1e-7), name
        if len(group) == 2:  # the two batches' gradients differ: the mean is not either one
            assert any(not torch.allclose(alone[0][n], alone[1][n], rtol=1e-3) for n in applied)


def test_resume_stops_every_rank_when_the_ranks_see_different_checkpoints(tmp_path, monkeypatch):
    """Only rank 0 writes checkpoints: with output_dir on a disk of each node, the other nodes find none (or an
    older one). The ranks compare what they found before reading any state; here the other rank's view is faked
    (no checkpoint, then another one) and this rank raises a ConfigError that names the shared file system."""
    config = resolve(dict(TINY, output_dir=str(tmp_path), name="local_disk"), warn=False)
    trainer = Trainer(config, show_progress=False)
    trainer.run_dir.mkdir(parents=True)
    trainer._save()
    assert trainer.resume()  # one process: nothing to compare
    for other in (None, {"sha256": "0" * 64, "next_task": 0, "next_epoch": 1, "next_step": 0}):
        monkeypatch.setattr(trainer.dist, "disagreement", lambda view, device: [view, other])
        with pytest.raises(ConfigError, match="rank 0: a checkpoint after 0 task.*rank 1: (no checkpoint|a "
                                              "checkpoint after 0 task.s. . 1 epoch).*shared by all nodes"):
            trainer.resume()
    # no checkpoint on rank 0, one on ranks 1 and 2
    view = {"sha256": "ab" * 32, "next_task": 1, "next_epoch": 0, "next_step": 2}
    message = str(different_checkpoints_error(tmp_path / "last.pt", [None, view, view], str(tmp_path)))
    assert "rank 0: no checkpoint; ranks 1, 2: a checkpoint after 1 task(s) + 0 epoch(s) + 2 step(s) " \
           "(SHA-256 abababababab…)" in message and f"output_dir ({tmp_path})" in message
