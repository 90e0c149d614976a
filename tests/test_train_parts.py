"""Pieces of the training stack that stand alone: losses, replay, checkpoints, config (metrics: test_eval_metrics)."""
import errno
import math
import os
import re
import stat

import pytest
import torch
import yaml

from cbd_fast import config as config_lib
from cbd_fast.train import checkpoint
from cbd_fast.train.losses import (InteractionPredictor, banzhaf_distillation_loss, contrastive_loss,
                                   sample_distillation_loss, token_similarity_loss)
from cbd_fast.train.replay import ReplayBuffer


def test_losses_are_zero_when_teacher_equals_student_and_positive_otherwise():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 6, generator=gen)
    assert sample_distillation_loss(scores, scores, 0.1).item() == pytest.approx(0, abs=1e-7)
    assert sample_distillation_loss(scores, torch.randn(6, 6, generator=gen), 0.1).item() > 0
    sim = torch.randn(4, 5, 7, generator=gen)
    tm = torch.ones(4, 5, dtype=torch.bool)
    im = torch.ones(4, 7, dtype=torch.bool)
    tm[0, 3:] = False
    im[1] = False  # a pair without image tokens: excluded, no nan
    for kind in ("mse", "kl"):
        assert token_similarity_loss(sim, sim, tm, im, kind).item() == pytest.approx(0, abs=1e-7)
        other = sim + 0.3 * torch.randn(4, 5, 7, generator=gen)
        value = token_similarity_loss(other, sim, tm, im, kind)
        assert value.item() > 0 and torch.isfinite(value)
    assert banzhaf_distillation_loss(sim, sim, tm, im, 0.05).item() == pytest.approx(0, abs=1e-6)
    other = sim + 0.3 * torch.randn(4, 5, 7, generator=gen)
    assert banzhaf_distillation_loss(other, sim, tm, im, 0.05).item() > 0
    # masked entries do not matter
    changed = other.clone()
    changed[0, 4] = 100.0
    assert banzhaf_distillation_loss(changed, sim, tm, im, 0.05).item() == pytest.approx(
        banzhaf_distillation_loss(other, sim, tm, im, 0.05).item())


def test_contrastive_loss_prefers_matched_pairs():
    matched = torch.eye(4) * 0.9
    assert contrastive_loss(matched, torch.tensor(20.0)) < contrastive_loss(matched.flip(0), torch.tensor(20.0))


def test_interaction_predictor_masks_and_learns():
    torch.manual_seed(0)
    net = InteractionPredictor(16)
    sim = torch.randn(8, 5, 6)
    tm = torch.ones(8, 5, dtype=torch.bool)
    im = torch.ones(8, 6, dtype=torch.bool)
    im[:, 4:] = False
    target = torch.where(tm[..., None] & im[:, None], sim - sim.amax(-1, keepdim=True), 0.0)
    optim = torch.optim.Adam(net.parameters(), lr=1e-2)
    first = None
    for _ in range(150):
        loss = ((net(sim, tm, im) - target) ** 2).mean()
        first = first if first is not None else loss.item()
        optim.zero_grad()
        loss.backward()
        optim.step()
    assert loss.item() < 0.2 * first
    assert (net(sim, tm, im)[:, :, 4:] == 0).all()


def test_replay_buffers():
    gen = torch.Generator().manual_seed(0)
    reservoir = ReplayBuffer("reservoir", 10)
    reservoir.add_task(0, 50, gen)
    reservoir.add_task(1, 50, gen)
    assert len(reservoir) == 10 and {t for t, _ in reservoir.entries} <= {0, 1}
    quota = ReplayBuffer("per_task", 10)
    quota.add_task(0, 50, gen)
    quota.add_task(1, 50, gen)
    assert sorted(t for t, _ in quota.entries) == [0] * 5 + [1] * 5
    restored = ReplayBuffer("per_task", 10)
    restored.load_state_dict(quota.state_dict())
    assert restored.entries == quota.entries
    assert ReplayBuffer("none", 10).sample(4, gen) == []
    with pytest.raises(ValueError, match="strategy"):
        ReplayBuffer("fifo", 3)


def test_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt" / "last.pt"
    checkpoint.save_atomic({"step": 1, "w": torch.ones(3)}, path)
    assert checkpoint.load(path)["step"] == 1

    def broken_save(obj, stream):
        stream.write(b"partial")
        raise KeyboardInterrupt  # interrupted mid-write

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_atomic({"step": 2}, path)
    monkeypatch.undo()
    assert checkpoint.load(path)["step"] == 1  # the old checkpoint survived intact
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary left behind


def test_checkpoint_checksum_and_foreign_files(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save_atomic({"step": 1, "w": torch.arange(1000.0)}, path)
    data = bytearray(path.read_bytes())
    problems = {}
    for name, content in {"empty": b"", "random": bytes(range(256)) * 40, "plain torch.save": None,
                          "one flipped byte": bytes(data[:-500]) + bytes([data[-500] ^ 1]) + bytes(data[-499:]),
                          "truncated": bytes(data[:len(data) // 2])}.items():
        bad = tmp_path / f"{name}.pt"
        if content is None:
            torch.save({"step": 1}, bad)
        else:
            bad.write_bytes(content)
        with pytest.raises(checkpoint.CheckpointError) as info:
            checkpoint.load(bad)
        message = str(info.value)
        assert str(bad) in message and "weights_only" not in message, message
        problems[name] = message
    for name in ("empty", "random", "plain torch.save"):
        assert "is not a cbd_fast checkpoint" in problems[name]
    for name in ("one flipped byte", "truncated"):
        assert "damaged" in problems[name] and "checksum" in problems[name]


def test_checkpoint_with_a_valid_checksum_still_runs_no_code(tmp_path):
    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    path = tmp_path / "last.pt"
    checkpoint.save_atomic({"payload": RunsCode()}, path)  # torch.save pickles anything; reading must not
    with pytest.raises(checkpoint.CheckpointError, match="posix.system|os.system") as info:
        checkpoint.load(path)
    assert "weights_only" not in str(info.value) and not (tmp_path / "ran").exists()


def test_checkpoint_write_errors_leftovers_and_permissions(tmp_path, monkeypatch):
    path = tmp_path / "ckpt" / "last.pt"
    checkpoint.save_atomic({"step": 1}, path)
    stale = path.parent / ".last.pt.k1ll3d.tmp"  # left by a write that was killed
    stale.write_bytes(b"partial")
    old_umask = os.umask(0o022)
    try:
        checkpoint.save_atomic({"step": 2}, path)
    finally:
        os.umask(old_umask)
    assert not stale.exists() and sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # readable by the group, like any new file

    def disk_full(obj, stream):
        stream.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match=r"ENOSPC.*" + re.escape(str(path))) as info:
        checkpoint.save_atomic({"step": 3}, path)
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC
    assert checkpoint.load(path)["step"] == 2 and sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]


# ------------------------------------------------------------------------------------------------- config
def test_config_overrides_and_unknown_keys():
    cfg = config_lib.resolve({"method": "cbd"}, ["train.epochs=2", "method_args.banzhaf=0.5"])
    assert cfg["method"] == "cbd" and cfg["train"]["epochs"] == 2 and cfg["method_args"]["banzhaf"] == 0.5
    assert cfg["train"]["batch_size"] == config_lib.DEFAULTS["train"]["batch_size"]
    with pytest.raises(config_lib.ConfigError, match="train.epoch.*did you mean 'train.epochs'"):
        config_lib.resolve({}, ["train.epoch=1"])
    with pytest.raises(config_lib.ConfigError, match="unknown config key 'lr' \\(did you mean 'train.lr'"):
        config_lib.resolve({}, ["lr=1e-3"])
    with pytest.raises(config_lib.ConfigError, match="method_args.banzaf' for method 'cbd' \\(did you mean "
                                                     "'method_args.banzhaf'"):
        config_lib.resolve({}, ["method_args.banzaf=1"])
    with pytest.raises(config_lib.ConfigError, match="config key 'loss.banzhaf' is gone"):
        config_lib.resolve({}, ["loss.banzhaf=1"])
    assert config_lib.resolve({}, ["train.lr=2e-3"])["train"]["lr"] == pytest.approx(2e-3)  # YAML 1.1 string
    with pytest.raises(config_lib.ConfigError, match="'train.epochs' must be an integer ≥ 1, got 'many'"):
        config_lib.resolve({}, ["train.epochs=many"])
    with pytest.raises(config_lib.ConfigError, match="key=value"):
        config_lib.resolve({}, ["train.epochs"])
    with pytest.raises(config_lib.ConfigError, match="'train' is a section"):
        config_lib.resolve({"train": 3})


def test_defaults_are_those_of_default_yaml():
    # one source of defaults: a user's config file is merged over configs/default.yaml
    assert config_lib.DEFAULTS == config_lib.builtin_config("default")
    cfg = config_lib.resolve({"train": {"epochs": 2}})
    assert cfg["train"]["lr"] == 5.0e-4 and cfg["train"]["replay"]["strategy"] == "none" and cfg["threads"] == 1
    # every key of the run sections has a rule, and every rule a default
    strict = {k: v for k, v in config_lib.DEFAULTS.items() if k not in ("model", "data")}
    loader = {f"data.{key}" for key in config_lib.LOADER_KEYS}  # the data section's keys that are not scenario's
    assert set(config_lib.leaf_keys(strict)) | loader == set(config_lib.RULES)
    assert loader <= set(config_lib.leaf_keys(config_lib.DEFAULTS))
    config_lib.validate(config_lib.DEFAULTS)


def test_scenario_file_and_data_overrides_merge(tmp_path):
    scenario = tmp_path / "scenario.yaml"
    content = {"scenario": "synthetic", "num_tasks": 5, "train_per_class": 6, "test_per_class": 4}
    scenario.write_text(yaml.safe_dump(content))
    for overrides in ([f"data={scenario}", "data.num_tasks=2"], ["data.num_tasks=2", f"data={scenario}"]):
        assert config_lib.resolve(None, overrides)["data"] == dict(content, num_tasks=2, workers=0)
    from_config = config_lib.resolve({"data": str(scenario)}, ["data.test_per_class=2"])
    assert from_config["data"] == dict(content, test_per_class=2, workers=0)
    # another scenario kind, or another architecture, starts its section afresh (the loader's keys stay)
    assert config_lib.resolve(None, ["data.scenario=csv", "data.path=x.csv"])["data"] == \
        {"scenario": "csv", "path": "x.csv", "workers": 0}
    assert config_lib.resolve(None, ["data.workers=2", f"data={scenario}"])["data"]["workers"] == 2
    assert config_lib.resolve({"model": {"pretrained": "ViT-B-32.pt"}})["model"] == {"pretrained": "ViT-B-32.pt"}
    assert config_lib.resolve(None, ["model.prompts.length=2"])["model"] == {"preset": "tiny", "prompts": {"length": 2}}
    assert config_lib.resolve(None, ["data=synthetic5"])["data"]["num_tasks"] == 5  # a shipped scenario by name
    with pytest.raises(FileNotFoundError, match="scenario file not found.*synthetic3"):
        config_lib.resolve(None, [f"data={tmp_path / 'missing.yaml'}"])


@pytest.mark.parametrize("override, key, expected", [
    ("train.epochs=0", "train.epochs", "an integer ≥ 1"),
    ("train.epochs=-3", "train.epochs", "an integer ≥ 1"),
    ("train.epochs=2.5", "train.epochs", "an integer ≥ 1"),
    ("train.batch_size=0", "train.batch_size", "an integer ≥ 1"),
    ("eval.batch_size=0", "eval.batch_size", "an integer ≥ 1"),
    ("train.lr=-1e-3", "train.lr", "a finite number ≥ 0"),
    ("train.lr=nan", "train.lr", "a finite number ≥ 0"),
    ("train.lr=.inf", "train.lr", "a finite number ≥ 0"),
    ("method_args.sample_temperature=0", "method_args.sample_temperature", "a finite number > 0"),
    ("method_args.token_temperature=-1", "method_args.token_temperature", "a finite number > 0"),
    ("method_args.banzhaf_temperature=0", "method_args.banzhaf_temperature", "a finite number > 0"),
    ("method_args.banzhaf=nan", "method_args.banzhaf", "a finite number ≥ 0"),
    ("method_args.banzhaf_samples=0", "method_args.banzhaf_samples", "an integer ≥ 1"),
    ("method=distill", "method", "one of finetune, joint, er"),
    ("train.bf16=yes please", "train.bf16", "one of auto, true, false"),
    ("threads=0", "threads", "auto or an integer ≥ 1"),
    ("device=gpu", "device", "auto, cpu, cuda or cuda:N"),
    ("seed=-1", "seed", "an integer ≥ 0"),
    ("train.accumulate=0", "train.accumulate", "an integer ≥ 1"),
    ("train.checkpoint_every_steps=-1", "train.checkpoint_every_steps", "an integer ≥ 0"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints", "an integer ≥ 1"),
    ("data.workers=-2", "data.workers", "an integer ≥ 0"),
    ("data.workers=two", "data.workers", "an integer ≥ 0"),
    ("logging.tensorboard=sometimes", "logging.tensorboard", "one of true, false"),
])
def test_config_ranges_are_checked_naming_the_key(override, key, expected):
    with pytest.raises(config_lib.ConfigError, match=re.escape(f"config key '{key}' must be {expected}")):
        config_lib.resolve(None, [override])


def test_batch_size_one_warns():
    with pytest.warns(config_lib.ConfigWarning, match="contrastive loss is identically 0"):
        config_lib.resolve(None, ["train.batch_size=1"])


def test_run_fingerprint_and_differences():
    base = config_lib.resolve(None)
    moved = config_lib.resolve(None, ["name=elsewhere", "output_dir=/tmp/x", "device=cpu", "threads=2",
                                      "data.workers=4", "train.checkpoint_every_steps=100",
                                      "train.keep_checkpoints=5", "logging.tensorboard=true"])
    assert config_lib.fingerprint(base) == config_lib.fingerprint(moved) and not config_lib.differences(base, moved)
    changed = config_lib.resolve(None, ["train.lr=0.01", "data.num_tasks=5"])
    assert config_lib.fingerprint(base) != config_lib.fingerprint(changed)
    assert config_lib.differences(base, changed) == ["data.num_tasks: 3 -> 5", "train.lr: 0.0005 -> 0.01"]
