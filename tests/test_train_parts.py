"""Pieces of the training stack that stand alone: losses, replay, checkpoints, config (metrics: test_eval_metrics)."""
import pytest
import torch

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


def test_config_overrides_and_unknown_keys():
    cfg = config_lib.resolve({"loss": {"method": "finetune"}}, ["train.epochs=2", "loss.banzhaf=0.5"])
    assert cfg["loss"]["method"] == "finetune" and cfg["train"]["epochs"] == 2 and cfg["loss"]["banzhaf"] == 0.5
    assert cfg["train"]["batch_size"] == config_lib.DEFAULTS["train"]["batch_size"]
    with pytest.raises(KeyError, match="loss.banzaf"):
        config_lib.resolve({}, ["loss.banzaf=1"])
    assert config_lib.resolve({}, ["train.lr=2e-3"])["train"]["lr"] == pytest.approx(2e-3)  # YAML 1.1 string
    with pytest.raises(ValueError, match="train.epochs' must be a number"):
        config_lib.resolve({}, ["train.epochs=many"])
    with pytest.raises(ValueError, match="key=value"):
        config_lib.resolve({}, ["train.epochs"])
    assert config_lib.builtin_config("default")["data"]["scenario"] == "synthetic"
