"""The method registry and every method's loss on hand-checkable cases (cbd_fast.methods)."""
import copy
import math

import pytest
import torch

import cbd_fast
import cbd_fast.model
from cbd_fast import config as config_lib
from cbd_fast.methods import METHODS, resolve_method_config
from cbd_fast.methods.base import Terms
from cbd_fast.methods.dime import Router, candidate_pairs, gram_mismatch
from cbd_fast.methods.ewc import ewc_penalty
from cbd_fast.methods.icsd import soft_label_loss
from cbd_fast.methods.modx import modx_distillation_loss
from cbd_fast.methods.rvlr import relation, soft_cross_entropy, structure_losses
from cbd_fast.train.loop import Trainer
from cbd_fast.train.losses import contrastive_loss, sample_distillation_loss

needs_ops = pytest.mark.skipif(not cbd_fast.has_extension(), reason="training uses the compiled ops")

NAMES = ("finetune", "joint", "er", "lwf", "ewc", "modx", "cbd", "rvlr", "icsd", "alta", "dime")


def make_trainer(tmp_path, method, prompts=True, replay=None, **args):
    """A Trainer on a tiny 2-task synthetic scenario (8 train / 2 test samples per class, 4 classes per task)."""
    user = {"name": method, "seed": 1, "device": "cpu", "output_dir": str(tmp_path), "method": method,
            "method_args": args, "model": {"preset": "tiny", "prompts": {"enabled": prompts}},
            "data": {"scenario": "synthetic", "num_tasks": 2, "train_per_class": 8, "test_per_class": 2},
            "train": {"epochs": 1, "batch_size": 8, "warmup_steps": 1,
                      "replay": replay or {"strategy": "none", "size": 0, "batch_size": 0}}}
    return Trainer(config_lib.resolve(user), show_progress=False)


def first_batch(trainer, task_index=0, epoch=0):
    return next(iter(trainer._batches(task_index, epoch)))[1]


def after_first_task(trainer):
    """State as after task 1 without training it: the frozen copy, the replay buffer and the method's hook."""
    trainer._start_task(0)
    trainer.old_model = copy.deepcopy(trainer.model).eval().requires_grad_(False)
    trainer.replay.add_task(0, len(trainer.tasks[0].train), torch.Generator().manual_seed(0))
    trainer.method.end_task(0)
    trainer._start_task(1)
    return trainer


def perturb(model, scale=0.05, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


# --- registry and configuration ---------------------------------------------------------------------------------

def test_registry_holds_the_eleven_methods_with_documented_defaults():
    assert tuple(METHODS) == NAMES
    for name, cls in METHODS.items():
        assert cls.name == name and "prompt" in cls.defaults
        doc = cls.__doc__
        assert "Preserves:" in doc and "Defaults:" in doc and "Distributed training:" in doc, name
        for key in cls.defaults:  # every argument is named in the docstring
            assert f"``{key}" in doc, (name, key)
    for name in ("rvlr", "icsd", "alta", "dime"):  # the ports state their substitutions
        assert "Substitutions" in METHODS[name].__doc__


def test_method_override_and_argument_validation():
    cfg = config_lib.resolve(config_lib.builtin_config("default"), ["method=lwf"])
    assert cfg["method"] == "lwf" and cfg["method_args"] == {"prompt": 0.1, "weight": 1.0, "temperature": 0.05}
    cfg = config_lib.resolve({}, ["method=cbd", "method_args.banzhaf=0", "method_args.banzhaf_samples=8"])
    assert cfg["method_args"]["banzhaf"] == 0 and cfg["method_args"]["banzhaf_samples"] == 8
    with pytest.raises(config_lib.ConfigError, match=r"method_args\.banzaf' for method 'cbd' \(did you mean "
                                                     r"'method_args\.banzhaf'\?\); its known keys: .*banzhaf,"):
        config_lib.resolve({}, ["method_args.banzaf=1"])
    with pytest.raises(config_lib.ConfigError, match=r"method_args\.banzhaf' for method 'lwf'"):  # args belong to a method
        config_lib.resolve({"method_args": {"banzhaf": 1.0}}, ["method=lwf"])
    with pytest.raises(config_lib.ConfigError, match="'method' must be one of finetune, joint"):
        config_lib.resolve({}, ["method=lwff"])
    with pytest.raises(config_lib.ConfigError, match=r"method_args.token_kind' must be one of mse, kl \(method 'cbd'\)"):
        config_lib.resolve({}, ["method_args.token_kind=l1"])
    with pytest.raises(config_lib.ConfigError, match=r"method_args.weight' must be a finite number ≥ 0 \(method 'ewc'\)"):
        config_lib.resolve({}, ["method=ewc", "method_args.weight=-1"])
    with pytest.raises(config_lib.ConfigError,
                       match=r"method_args.temperature' must be a finite number > 0 \(method 'lwf'\)"):
        config_lib.resolve({}, ["method=lwf", "method_args.temperature=0"])
    with pytest.raises(config_lib.ConfigError, match=r"method_args.layers' must be an integer ≥ 1 \(method 'dime'\)"):
        config_lib.resolve({}, ["method=dime", "method_args.layers=2.5"])
    with pytest.raises(config_lib.ConfigError, match="method_args.weight' must be a finite number ≥ 0"):
        config_lib.resolve({}, ["method=lwf", "method_args.weight=strong"])
    with pytest.raises(ValueError, match="cross_temperature_init"):
        config_lib.resolve({}, ["method=icsd", "method_args.cross_temperature_init=2"])
    # the configuration before the registry is refused with the way to migrate (also from an old checkpoint)
    for user, overrides in (({"loss": {"method": "finetune"}}, []), ({}, ["loss.banzhaf=0"])):
        with pytest.raises(config_lib.ConfigError, match="choose the method with 'method'.*loss.K=V -> method_args.K=V"):
            config_lib.resolve(user, overrides)
    old = {key: value for key, value in config_lib.resolve({}).items() if key not in ("method", "method_args")}
    with pytest.raises(config_lib.ConfigError, match="config key 'loss' is gone"):
        resolve_method_config(dict(old, loss={"method": "cbd"}))


def test_replay_requirements():
    none = {"train": {"replay": {"strategy": "none", "size": 0, "batch_size": 0}}}
    for name in ("er", "alta"):  # replay is part of the method: a default buffer when none is configured
        cfg = config_lib.resolve(dict(none, method=name))
        assert cfg["train"]["replay"] == {"strategy": "reservoir", "size": 128, "batch_size": 16}
        given = config_lib.resolve({"method": name, "train": {"replay": {"strategy": "per_task", "size": 40}}})
        assert given["train"]["replay"] == {"strategy": "per_task", "size": 40, "batch_size": 16}
    assert config_lib.resolve(dict(none, method="lwf"))["train"]["replay"]["strategy"] == "none"
    with pytest.raises(config_lib.ConfigError, match="method 'joint' does not combine with replay"):
        config_lib.resolve({"method": "joint", "train": {"replay": {"strategy": "reservoir", "size": 128,
                                                                    "batch_size": 16}}})
    assert resolve_method_config(config_lib.resolve(dict(none, method="joint")))["method"] == "joint"


def test_terms_sum_in_order_and_log_unweighted_values():
    terms = Terms()
    terms.add("a", torch.tensor(2.0))
    terms.add("b", torch.tensor(3.0), -0.5)
    assert terms.total().item() == 0.5 and terms.values() == {"a": 2.0, "b": 3.0}
    with pytest.raises(ValueError, match="'a' added twice"):
        terms.add("a", torch.tensor(1.0))


# --- loss functions on hand-made inputs -------------------------------------------------------------------------

def test_modx_zero_for_equal_models_and_by_hand():
    gen = torch.Generator().manual_seed(0)
    old = torch.randn(5, 5, generator=gen) + 4 * torch.eye(5)  # every matched pair ranked first
    assert modx_distillation_loss(old, old, 1.0).item() == pytest.approx(0, abs=1e-7)
    new = torch.randn(5, 5, generator=gen)

    def kl_rows(n, o):  # KL(softmax(o) || softmax(n)) per row
        return (torch.softmax(o, -1) * (torch.log_softmax(o, -1) - torch.log_softmax(n, -1))).sum(-1)

    expected = 0.5 * (kl_rows(new, old).sum() + kl_rows(new.t(), old.t()).sum())  # summed over rows
    assert modx_distillation_loss(new, old, 1.0).item() == pytest.approx(expected.item(), rel=1e-6)
    wrong = old.clone()
    wrong[2, 0] = wrong[2, 2] + 1  # text 2: the old model ranks image 0 first -> that row is left out
    kept_text = kl_rows(new, wrong)
    kept_text[2] = 0
    kept_image = torch.where(wrong.t().argmax(-1) == torch.arange(5), kl_rows(new.t(), wrong.t()), 0.0)
    by_hand = 0.5 * (kept_text.sum() + kept_image.sum())
    assert modx_distillation_loss(new, wrong, 1.0).item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_modx_ignores_rows_the_old_model_misranks():
    gen = torch.Generator().manual_seed(1)
    old = torch.randn(4, 4, generator=gen) + 4 * torch.eye(4)
    old[3, 0] = old[3, 3] + 1  # text 3: the old model prefers image 0
    old[0, 3] = old[3, 3] + 1  # image 3: the old model prefers text 0
    new = torch.randn(4, 4, generator=gen)
    moved = new.clone()
    moved[3, 3] -= 2.0  # entry (3, 3) lies only in text row 3 and image column 3, both left out
    assert modx_distillation_loss(moved, old, 0.5).item() == pytest.approx(
        modx_distillation_loss(new, old, 0.5).item(), rel=1e-6)
    moved[2, 2] -= 2.0  # a kept row: the loss changes
    assert modx_distillation_loss(moved, old, 0.5).item() != pytest.approx(
        modx_distillation_loss(new, old, 0.5).item(), rel=1e-6)


def test_ewc_penalty_zero_at_the_anchor_and_quadratic_around_it():
    gen = torch.Generator().manual_seed(0)
    anchor = {"w": torch.randn(3, 4, generator=gen), "b": torch.randn(4, generator=gen)}
    fisher = {"w": torch.rand(3, 4, generator=gen), "b": torch.rand(4, generator=gen)}
    direction = {k: torch.randn(v.shape, generator=gen) for k, v in anchor.items()}
    at = lambda t: ewc_penalty({k: anchor[k] + t * direction[k] for k in anchor}, anchor, fisher)  # noqa: E731
    assert at(0.0).item() == 0.0
    assert at(2.0).item() == pytest.approx(4 * at(1.0).item(), rel=1e-6)
    assert at(-1.0).item() == pytest.approx(at(1.0).item(), rel=1e-6)
    by_hand = 0.5 * sum((fisher[k] * direction[k] ** 2).sum() for k in anchor)
    assert at(1.0).item() == pytest.approx(by_hand.item(), rel=1e-6)
    # a parameter without Fisher weight is free
    assert ewc_penalty({"w": anchor["w"], "b": anchor["b"] + 1}, anchor, {"w": fisher["w"]}).item() == 0.0


def test_rvlr_structure_terms_by_hand():
    gen = torch.Generator().manual_seed(0)
    unit = lambda n: torch.nn.functional.normalize(torch.randn(n, 8, generator=gen), dim=-1)  # noqa: E731
    text, image, student = unit(5), unit(5), unit(5)
    assert relation(text, 0.5).shape == (5, 4)
    assert torch.allclose(relation(text, 0.5)[0], (text[0] @ text[1:].t()) / 0.5)
    gap = (relation(text, 0.07) - relation(image, 0.07)).abs().mean()
    for mix in (0.0, 0.3, 1.0):  # the teacher terms only keep λ in [0, 1]: they sum to mean|R^T - R^I|
        _, kdi, kdt = structure_losses(student, text, image, torch.tensor(mix), 0.07)
        assert (kdi + kdt).item() == pytest.approx(gap.item(), rel=1e-5)
    kd, _, _ = structure_losses(text, text, image, torch.tensor(1.0), 0.07)  # student relations = E
    assert kd.item() == pytest.approx(0, abs=1e-6)
    logits = torch.randn(4, 4, generator=gen)
    assert soft_cross_entropy(logits, torch.eye(4)).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, torch.arange(4)).item(), rel=1e-6)


def test_icsd_soft_label_loss_by_hand():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(5, 5, generator=gen)
    tau_c = torch.tensor(0.45)
    # targets whose softmax at τ_s equals the scores' softmax at τ_c: zero
    zero = soft_label_loss(scores, scores.t() / 0.45, scores / 0.45, 1.0, tau_c)
    assert zero.item() == pytest.approx(0, abs=1e-6)
    image_rel, text_rel = torch.randn(5, 5, generator=gen), torch.randn(5, 5, generator=gen)
    def kl(target, logits):
        p = torch.softmax(target, -1)
        return (p * (torch.log_softmax(target, -1) - torch.log_softmax(logits / 0.45, -1))).sum(-1).mean()
    expected = 0.5 * (kl(image_rel, scores.t()) + kl(text_rel, scores))
    assert soft_label_loss(scores, image_rel, text_rel, 1.0, tau_c).item() == pytest.approx(expected.item(), rel=1e-6)


def test_dime_router_outputs_in_range_and_candidates():
    torch.manual_seed(0)
    router = Router(16, 4)
    x = 10 * torch.randn(6, 5, 16)
    mask = torch.ones(6, 5, dtype=torch.bool)
    weights = router(x, mask)
    assert weights.shape == (6, 4) and (weights >= 0).all() and (weights < 1).all()
    assert (router.net[-1].bias == 1.5).all()  # every path starts open
    with torch.no_grad():
        router.net[-1].bias.fill_(-50.0)
    assert (router(x, mask) == 0).all()  # closed paths weigh exactly 0 (relu of tanh)
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.7], [0.3, 0.6, 0.4]])
    row_pick, row_ok, col_pick, col_ok = candidate_pairs(scores, 2, torch.eye(3, dtype=torch.bool))
    assert row_pick.tolist() == [[2, 1], [2, 0], [1, 0]] and row_ok.all()
    assert col_pick.tolist() == [[2, 1], [2, 0], [1, 0]] and col_ok.all()
    _, row_ok, _, _ = candidate_pairs(scores, 3, torch.eye(3, dtype=torch.bool))
    assert row_ok.sum(1).tolist() == [2, 2, 2]  # only two non-matching images per caption
    a = torch.randn(4, 3)
    assert gram_mismatch(a, a).item() == 0.0 and gram_mismatch(a, 2 * a).item() > 0


# --- methods on a tiny trainer ----------------------------------------------------------------------------------

@needs_ops
@pytest.mark.parametrize("name", ["lwf", "modx", "cbd"])
def test_distillation_is_zero_when_student_equals_teacher(tmp_path, name):
    trainer = after_first_task(make_trainer(tmp_path, name, prompts=False))
    batch = first_batch(trainer, 1)
    terms = trainer.method.losses(batch, 1, step_seed=5)
    distilled = {"lwf": ["lwf"], "modx": ["modx"], "cbd": ["sample", "token", "banzhaf"]}[name]
    for term in distilled:
        assert terms.values()[term] == pytest.approx(0, abs=1e-6), term
    perturb(trainer.model)
    terms = trainer.method.losses(batch, 1, step_seed=5)
    for term in distilled:
        assert terms.values()[term] > 1e-6, term
    if name == "lwf":  # the term is DESIGN §6's L_sample on the score matrices
        student = trainer.method.student(batch, 1)
        teacher = trainer.method.teacher(batch)
        assert terms.values()["lwf"] == pytest.approx(sample_distillation_loss(
            student.scores, teacher.scores, 0.05).item(), rel=1e-5)


@needs_ops
@pytest.mark.parametrize("name", NAMES)
def test_every_share_of_a_batch_gets_the_same_terms(tmp_path, name):
    """The shares the ranks of a distributed run get of one global batch (8 current rows, then 4 replayed; joint:
    8 current rows): current rows only, current and replay rows, one replay row, a single row. The loop sums the
    ranks' loss terms by name, so every method must add the same terms in the same order whatever rows a share
    holds — a term with no rows in a share is added as zero (ALTA's buffer terms, DIME's hinge and path terms)."""
    replay = None if name == "joint" else {"strategy": "reservoir", "size": 16, "batch_size": 4}
    trainer = make_trainer(tmp_path, name, replay=replay)
    task = 0 if name == "joint" else 1  # joint trains in its first stage only, on both tasks at once
    if task:
        after_first_task(trainer)
    else:
        trainer._start_task(0)
    batch = first_batch(trainer, task)
    assert batch["replay"].sum() == (0 if name == "joint" else 4)
    last = batch["images"].shape[0] - 1
    shares = [[0, 1, 2, 3], list(range(4, last + 1)), [0, 1, last]]
    if name != "rvlr":  # its relations need two samples in the global batch, which has ≥ 2 rows in any run of W ≥ 2
        shares.append([0])
    names = []
    for rows in shares:
        index = torch.tensor(rows)
        share = {key: value[index.to(value.device)] for key, value in batch.items()}
        names.append(list(trainer.method.losses(share, task, step_seed=3).values()))
    assert all(these == names[0] for these in names), dict(zip(map(str, shares), names))
    whole = list(trainer.method.losses(batch, task, step_seed=3).values())
    assert whole == names[0]


@needs_ops
def test_finetune_terms_and_joint_stages(tmp_path):
    trainer = make_trainer(tmp_path, "finetune")
    trainer._start_task(0)
    batch = first_batch(trainer)
    terms = trainer.method.losses(batch, 0, 0)
    assert list(terms.values()) == ["contrastive", "prompt_key_cos"]
    student = trainer.method.student(batch, 0)
    assert terms.values()["contrastive"] == pytest.approx(
        contrastive_loss(student.scores, trainer.model.scale()).item(), rel=1e-6)
    assert batch["replay"].sum() == 0 and batch["task"].tolist() == [0] * 8

    joint = make_trainer(tmp_path, "joint")
    assert joint.method.train_tasks(0) == [0, 1] and joint.method.train_tasks(1) == []
    seen = [(t, i) for _, b in joint._batches(0, 0) for t, i in zip(b["task"].tolist(), b["index"].tolist())]
    union = [(t, i) for t in (0, 1) for i in range(len(joint.tasks[t].train))]
    assert sorted(seen) == union and len(seen) == len(union)  # every sample of both tasks once per epoch
    assert joint._steps_per_epoch(0) == math.ceil(len(union) / 8) and joint._steps_per_epoch(1) == 0


@needs_ops
def test_er_appends_replay_rows(tmp_path):
    trainer = after_first_task(make_trainer(tmp_path, "er"))
    batch = first_batch(trainer, 1)
    assert batch["replay"].tolist() == [False] * 8 + [True] * 16
    assert batch["task"].tolist() == [1] * 8 + [0] * 16


@needs_ops
def test_ewc_fisher_and_penalty_in_the_loop(tmp_path):
    trainer = after_first_task(make_trainer(tmp_path, "ewc", weight=10.0, decay=0.5))
    method = trainer.method
    trainable = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert set(method.fisher) == trainable and all((f >= 0).all() for f in method.fisher.values())
    assert sum(f.sum() for f in method.fisher.values()) > 0
    # slot 1 of the prompt pools was not used by task 1: no Fisher weight there
    assert (method.fisher["text_prompts.prompts"][1] == 0).all()
    batch = first_batch(trainer, 1)
    assert method.losses(batch, 1, 0).values()["ewc"] == 0.0  # at the anchor
    perturb(trainer.model)
    penalty = method.losses(batch, 1, 0).values()["ewc"]
    assert penalty == pytest.approx(ewc_penalty(dict(trainer.model.named_parameters()), method.anchor,
                                                method.fisher).item(), rel=1e-6) and penalty > 0
    # online accumulation: F <- decay F + F_t (here the same model again, so F_t is the first Fisher)
    first = {k: v.clone() for k, v in method.fisher.items()}
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            p.copy_(method.anchor[name])
    method.end_task(0)
    for name, value in method.fisher.items():
        assert torch.allclose(value, 1.5 * first[name], rtol=1e-5, atol=1e-12)


@needs_ops
def test_rvlr_and_icsd_parameters_and_teachers(tmp_path):
    trainer = make_trainer(tmp_path, "rvlr")
    trainer._start_task(0)
    params = trainer._parameters()
    assert any(p is trainer.method.mix for p in params)  # λ and the projections are trained
    assert any(p is trainer.method.image_projection.weight for p in params)
    assert set(trainer.method.losses(first_batch(trainer), 0, 0).values()) == {"contrastive", "prompt_key_cos"}
    after_first_task(trainer)
    assert {"iic", "ttc", "kd", "kdi", "kdt"} <= set(trainer.method.losses(first_batch(trainer, 1), 1, 0).values())

    icsd = make_trainer(tmp_path, "icsd")
    assert icsd.method.cross_temperature().item() == pytest.approx(0.45, rel=1e-6)
    icsd._start_task(0)
    assert "soft" in icsd.method.losses(first_batch(icsd), 0, 0).values()  # first task: S_int only
    initial = make_trainer(tmp_path, "icsd", teacher="initial")
    frozen = initial.method._initial[0]
    assert all(torch.equal(a, b) for a, b in zip(frozen.parameters(), initial.model.parameters()))
    assert not any(p.requires_grad for p in frozen.parameters())
    assert all(p is not q for p in initial._parameters() for q in frozen.parameters())


@needs_ops
def test_alta_freezes_encoders_and_snapshots(tmp_path):
    trainer = make_trainer(tmp_path, "alta")
    model = trainer.model
    trainer._start_task(0)  # the first task trains everything (the stand-in for pretrained CLIP)
    assert all(p.requires_grad for p in model.parameters())
    for _, batch in trainer._batches(0, 0):
        trainer._step(batch, 0, 0)
    trainer.old_model = copy.deepcopy(model).eval().requires_grad_(False)
    trainer.replay.add_task(0, len(trainer.tasks[0].train), torch.Generator().manual_seed(0))
    trainer.method.end_task(0)
    assert sorted(trainer.method.memory_keys) == sorted(tuple(e) for e in trainer.replay.entries)
    snapshot = {name: p.detach().clone() for name, p in model.named_parameters()}
    adapter = [p.detach().clone() for p in trainer.method.adapter.parameters()]
    trainer._start_task(1)
    for pool in ("image_prompts", "text_prompts"):  # the context continues from the previous slot
        assert torch.equal(getattr(model, pool).prompts[1], snapshot[f"{pool}.prompts"][0])
    trainer._start_task(1)  # idempotent (as after a resume): the slot is not copied again
    batch = first_batch(trainer, 1)
    first = trainer.method.losses(batch, 1, 0).values()
    assert first["logit_memory"] == pytest.approx(0, abs=1e-8)  # same model, same captions as when stored
    for _, batch in trainer._batches(1, 0):
        trainer._step(batch, 1, 0)
    for name, p in model.named_parameters():
        if name.endswith(("prompts.prompts", "prompts.keys")):
            assert torch.equal(p[0], snapshot[name][0]), name  # old-task snapshots: bit for bit
            assert not torch.equal(p[1], snapshot[name][1]), name  # the current slot trains
        else:
            assert torch.equal(p, snapshot[name]) and not p.requires_grad, name  # frozen encoders
    assert any(not torch.equal(a, b) for a, b in zip(adapter, trainer.method.adapter.parameters()))
    # evaluation scores = MaxSim + adapter term
    trainer.method.eval()
    out = trainer.method.student(batch, 1)
    rescored = trainer.method.rescore(out.text, out.image, out.scores)
    extra = out.text.pooled @ trainer.method.adapted(out.image.pooled).t()
    assert torch.allclose(rescored, out.scores + extra, atol=1e-6)


@needs_ops
def test_dime_training_terms_and_reranking(tmp_path):
    trainer = after_first_task(make_trainer(tmp_path, "dime", rerank_top_k=2, train_negatives=2))
    method = trainer.method
    batch = first_batch(trainer, 1)
    values = method.losses(batch, 1, 0).values()
    assert {"contrastive", "rank", "path", "lwf"} <= set(values) and 0 <= values["rank"] <= 2 * (2 + 0.2)
    student = method.student(batch, 1)
    rows = torch.arange(8)
    pair, (paths_i2t, paths_t2i) = method.pair_scores(student.text, student.image, rows, rows)
    assert pair.shape == (8,) and (pair.abs() <= 1 + 1e-6).all()
    assert paths_i2t.shape == (8, method.image_to_text.num_paths) == (8, 4 * 4 * 2 + 4)
    assert ((paths_i2t >= 0) & (paths_i2t < 1)).all() and ((paths_t2i >= 0) & (paths_t2i < 1)).all()
    # re-ranking: each caption's top-2 and each image's top-2 come first, in DIME's order; the rest keep theirs
    scores = student.scores.detach()
    rescored = method.rescore(student.text, student.image, scores)
    row_pick, _, col_pick, _ = candidate_pairs(scores, 2)
    candidate = torch.zeros(8, 8, dtype=torch.bool)
    candidate.scatter_(1, row_pick, True)
    candidate.t().scatter_(1, col_pick, True)
    assert candidate.sum() <= (8 + 8) * 2
    assert rescored[candidate].min() > rescored[~candidate].max()
    assert torch.equal(rescored[~candidate], scores[~candidate])
    q, g = candidate.nonzero(as_tuple=True)
    dime, _ = method.pair_scores(student.text, student.image, q, g)
    assert torch.equal(rescored[q, g].argsort(), dime.argsort())
    method.args["rerank_top_k"] = 0  # the dual encoder alone
    assert method.rescore(student.text, student.image, scores) is scores


@needs_ops
def test_dime_gradients_are_run_to_run_identical_with_two_threads(tmp_path):
    # the candidate pairs repeat rows; their gradients must be summed in a fixed order whatever the threads
    method = make_trainer(tmp_path, "dime").method
    gen = torch.Generator().manual_seed(0)
    def features(count, length):
        return cbd_fast.model.TokenFeatures(torch.randn(count, length, 64, generator=gen).requires_grad_(),
                                            torch.ones(count, length, dtype=torch.bool),
                                            torch.zeros(count, length), torch.randn(count, 64, generator=gen))
    text, image = features(48, 32), features(48, 17)
    rows = torch.cat([torch.arange(48), torch.arange(48).repeat_interleave(2)])
    columns = torch.cat([torch.arange(48), torch.randint(0, 48, (96,), generator=gen)])
    torch.set_num_threads(2)  # restored by the autouse fixture
    gradients = []
    for _ in range(6):
        scores, _ = method.pair_scores(text, image, rows, columns)
        gradients.append(torch.autograd.grad(scores.sum(), (text.tokens, image.tokens)))
    assert all(torch.equal(g[0], gradients[0][0]) and torch.equal(g[1], gradients[0][1]) for g in gradients)


# --- the frozen model's outputs, kept per input ------------------------------------------------------------------

def _frozen_cache(trainer, max_bytes=None):
    from cbd_fast.methods.frozen_features import FrozenFeatureCache
    train = [task.train for task in trainer.tasks]
    return FrozenFeatureCache(trainer.old_model, lambda task: train[task].augment is not None,
                              captions=sum(len(c) for dataset in train for c in dataset.captions),
                              images=sum(len(dataset) for dataset in train), max_bytes=max_bytes)


def _fresh(trainer, batch, rows=None):
    """The previous-task model's queries and prompted features of ``batch`` (its ``rows``, each alone when given),
    computed as without the cache."""
    from cbd_fast.methods.base import encode, prompt_queries
    if rows == "alone":
        parts = [_fresh(trainer, {key: value[i:i + 1] for key, value in batch.items()})
                 for i in range(batch["ids"].shape[0])]
        return tuple(torch.cat(column) for column in zip(*parts))
    queries = prompt_queries(trainer.old_model, batch)
    with torch.no_grad():
        out = encode(trainer.old_model, batch, queries, train_task=None)
    return (*queries, *out.image, *out.text)


def _looked_up(cache, batch):
    queries = cache.queries(batch)
    image, text = cache.features(batch, queries)
    return (*queries, *image, *text)


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _close(a, b):
    return len(a) == len(b) and all(torch.allclose(x.float(), y.float(), atol=1e-6) for x, y in zip(a, b))


def _mixed(first, second, rows=3):
    return {key: torch.cat([first[key][:rows], second[key]]) for key in ("images", "ids", "mask", "task", "index")}


def test_frozen_feature_cache_rows_are_computed_alone(tmp_path):
    trainer = after_first_task(make_trainer(tmp_path, "cbd"))
    perturb(trainer.old_model)  # prompts chosen by key matching, not all the same slot
    batch = first_batch(trainer, 1)
    cache = _frozen_cache(trainer)
    looked_up = _looked_up(cache, batch)
    # each row as its input encoded alone gives it, whatever the batch; and within rounding of the batch's encode
    assert _same(looked_up, _fresh(trainer, batch, "alone")) and _close(looked_up, _fresh(trainer, batch))
    captions = len({bytes(row.numpy()) for row in batch["ids"]})
    assert cache.keep and len(cache.rows) == 2 * captions + 2 * batch["images"].shape[0]
    mixed = _mixed(batch, first_batch(trainer, 0, epoch=1))
    assert _same(_looked_up(cache, mixed), _fresh(trainer, mixed, "alone"))
    # a scenario that could outgrow the budget keeps nothing: every batch is encoded whole, as without the cache
    small = _frozen_cache(trainer, max_bytes=10_000)
    assert _same(_looked_up(small, mixed), _fresh(trainer, mixed)) and small.keep is False and small.rows == {}


def test_frozen_feature_cache_keeps_no_augmented_image(tmp_path):
    trainer = after_first_task(make_trainer(tmp_path, "cbd"))
    batch = first_batch(trainer, 1)
    from cbd_fast.data.images import Augment
    trainer.tasks[1].train.augment = Augment()
    cache = _frozen_cache(trainer)
    looked_up = _looked_up(cache, batch)
    fresh, alone = _fresh(trainer, batch), _fresh(trainer, batch, "alone")
    assert _same(looked_up[:1] + looked_up[2:6], fresh[:1] + fresh[2:6])  # images: with their batch
    assert _same(looked_up[1:2] + looked_up[6:], alone[1:2] + alone[6:])  # captions: alone
    assert {table for table, _ in cache.rows} == {"text query", "text"}


@needs_ops
@pytest.mark.parametrize("name", ["cbd", "lwf"])
def test_frozen_feature_cache_trains_as_encoding_every_step(tmp_path, monkeypatch, name):
    """Two tasks with the cache and with every batch encoded at every step: the same run within rounding (a kept
    row is computed alone, a batch's rows together), and the cache holds the scenario's inputs."""
    import cbd_fast.methods.frozen_features as frozen_features

    def run(folder, cache_bytes):
        monkeypatch.setattr(frozen_features, "CACHE_BYTES", cache_bytes)
        trainer = make_trainer(tmp_path / folder, name)
        trainer.train_cfg["epochs"] = 2
        trainer.run()
        return trainer, trainer.method._frozen_cache

    cached, cache = run("cached", frozen_features.CACHE_BYTES)
    fresh, no_cache = run("fresh", 0)
    assert cache.keep and len(cache.rows) > 0 and no_cache.keep is False and no_cache.rows == {}
    for a, b in zip(cached.model.state_dict().values(), fresh.model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-4)


@needs_ops
def test_cbd_terms_over_the_longest_caption_equal_those_over_the_padded_length(tmp_path, monkeypatch):
    from cbd_fast.model import TokenFeatures
    trainer = after_first_task(make_trainer(tmp_path, "cbd"))
    perturb(trainer.model)
    batch = first_batch(trainer, 1)
    padded = batch["mask"].shape[1]
    text = trainer.method.student(batch, 1).text
    assert text.mask.shape[1] == padded > text.without_trailing_padding().mask.shape[1]  # captions leave padding
    trimmed = trainer.method.losses(batch, 1, step_seed=5).values()
    monkeypatch.setattr(TokenFeatures, "without_trailing_padding", lambda features: features)
    full = trainer.method.losses(batch, 1, step_seed=5).values()
    assert trimmed.keys() == full.keys() and trimmed["banzhaf"] > 0 and trimmed["token"] > 0
    for name in full:
        assert trimmed[name] == pytest.approx(full[name], rel=1e-6, abs=1e-9), name
