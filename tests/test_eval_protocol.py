"""The evaluation protocol on a real (tiny) model and scenario: every caption, per-task and cumulative galleries,
blocked scoring equal to one-shot scoring, clear errors; and cbd-report on hand-made run folders."""
import csv
import json

import pytest
import torch
import yaml

import cbd_fast
from cbd_fast import config as config_lib
from cbd_fast.data import build_tasks
from cbd_fast.eval import compare, evaluate, report
from cbd_fast.eval.evaluate import collect_test_items, evaluate_tasks, score_blocks
from cbd_fast.eval.report import build_document, write_reports
from cbd_fast.maxsim import maxsim
from cbd_fast.model import create_model
from cbd_fast.model.dual_encoder import TokenFeatures

pytestmark = pytest.mark.skipif(not cbd_fast.has_extension(), reason="evaluation scores with the compiled maxsim")

EVAL = dict(config_lib.DEFAULTS["eval"], batch_size=8)
DATA = {"scenario": "synthetic", "num_tasks": 3, "train_per_class": 2, "test_per_class": 3}


@pytest.fixture(scope="module")
def model_and_tasks():
    torch.manual_seed(0)
    model = create_model({"preset": "tiny"})
    return model, build_tasks(DATA, model.image_size, 0)


def test_every_caption_of_every_test_image_is_a_query(model_and_tasks):
    _, tasks = model_and_tasks
    items = collect_test_items(tasks, "all")
    assert len(items.captions) == sum(len(c) for task in tasks for c in task.test.captions) == 3 * len(
        items.image_task)  # the synthetic default has 3 captions per image
    assert items.captions[:3] == tasks[0].test.captions_of(0)
    assert items.caption_image[:4].tolist() == [0, 0, 0, 1]
    first = collect_test_items(tasks, "first")
    assert len(first.captions) == len(first.image_task) and first.captions[1] == tasks[0].test.captions_of(1)[0]


def test_cumulative_and_per_task_galleries(model_and_tasks):
    model, tasks = model_and_tasks
    after_one = evaluate_tasks(model, tasks, 1, torch.device("cpu"), EVAL)
    per_task, cumulative = after_one["per_task"], after_one["cumulative"]
    assert len(per_task) == len(cumulative) == 3
    # task 1's cumulative gallery after one task is its own test set
    assert cumulative[0] == per_task[0]
    # later tasks compete with the earlier tasks' items: more gallery items, never a better rank
    for j in (1, 2):
        assert cumulative[j]["t2i_MedR"] >= per_task[j]["t2i_MedR"]
        assert cumulative[j]["t2i_R@1"] <= per_task[j]["t2i_R@1"]
    # the per-task numbers do not depend on whether the cumulative matrix was scored
    only_per_task = evaluate_tasks(model, tasks, 1, torch.device("cpu"), dict(EVAL, cumulative=False))
    assert only_per_task == {"per_task": per_task}
    # after all three tasks every cumulative gallery is the union of all test sets
    after_three = evaluate_tasks(model, tasks, 3, torch.device("cpu"), EVAL)
    assert after_three["per_task"] == per_task  # same model: the per-task gallery does not see the row
    assert after_three["cumulative"][2] == cumulative[2]  # task 3's gallery was already tasks 1-3
    assert after_three["cumulative"][0] != cumulative[0]


def test_gallery_metrics_take_one_kind_of_scores(model_and_tasks):
    _, tasks = model_and_tasks
    items = collect_test_items(tasks, "all")
    scores = torch.rand(len(items.captions), len(items.image_task), generator=torch.Generator().manual_seed(0))
    names = ["a", "b", "c"]
    whole = evaluate.gallery_metrics(items, 2, names, scores=scores)
    blocks = [scores[items.task_rows(j), items.task_cols(j)] for j in range(3)]
    assert evaluate.gallery_metrics(items, 2, names, task_scores=blocks) == {"per_task": whole["per_task"]}
    for kwargs in ({}, dict(scores=scores, task_scores=blocks)):
        with pytest.raises(ValueError, match="exactly one of them"):
            evaluate.gallery_metrics(items, 2, names, **kwargs)


def test_oracle_prompt_selection_runs_per_caption(model_and_tasks):
    model, tasks = model_and_tasks
    model.set_num_active_prompts(3)
    try:
        record = evaluate_tasks(model, tasks, 3, torch.device("cpu"), dict(EVAL, prompt_selection="task_id"))
    finally:
        model.set_num_active_prompts(1)
    assert all(0 <= record["per_task"][j]["t2i_R@1"] <= 100 for j in range(3))


def test_blocked_length_sorted_scoring_equals_one_shot(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    num_texts, num_images, text_len, image_len, dim = 23, 11, 9, 5, 16
    lengths = torch.randint(1, text_len + 1, (num_texts,), generator=gen)
    mask = torch.arange(text_len) < lengths[:, None]
    text = TokenFeatures(torch.nn.functional.normalize(torch.randn(num_texts, text_len, dim, generator=gen), dim=-1)
                         * mask[..., None], mask, torch.randn(num_texts, text_len, generator=gen) * mask,
                         torch.zeros(num_texts, dim))
    image = TokenFeatures(torch.nn.functional.normalize(torch.randn(num_images, image_len, dim, generator=gen), dim=-1),
                          torch.ones(num_images, image_len, dtype=torch.bool),
                          torch.randn(num_images, image_len, generator=gen), torch.zeros(num_images, dim))
    expected = maxsim(text.tokens, image.tokens, text.mask, image.mask, text.weight, image.weight)
    order = lengths.argsort(stable=True)
    blocks = []
    for start in range(0, num_texts, 4):  # blocks of 4 captions in length order, trimmed like the evaluation
        rows = order[start:start + 4]
        width = int(lengths[rows].max())
        blocks.append((rows, TokenFeatures(text.tokens[rows, :width], text.mask[rows, :width],
                                           text.weight[rows, :width], text.pooled[rows])))
    monkeypatch.setattr(evaluate, "SCORE_BLOCK_ELEMENTS", 4 * (text_len + image_len) * 3)  # 3 images a call
    assert torch.equal(score_blocks(iter(blocks), image, num_texts), expected)


def test_encoder_blocks_cover_every_caption_once(model_and_tasks, monkeypatch):
    model, tasks = model_and_tasks
    items = collect_test_items(tasks, "all")
    monkeypatch.setattr(evaluate, "TEXT_BLOCK", 20)
    blocks = list(evaluate.encode_caption_blocks(model, items.captions, items.caption_task, torch.device("cpu"),
                                                 8, False, block=20))
    rows = torch.cat([r for r, _ in blocks])
    assert sorted(rows.tolist()) == list(range(len(items.captions)))
    lengths = model.tokenize(items.captions)[1].sum(1)
    for block_rows, features in blocks:  # each block is trimmed to its longest caption
        assert features.tokens.shape[1] == int(lengths[block_rows].max())
        assert torch.equal(features.mask.sum(1), lengths[block_rows])


def test_nan_scores_are_an_error_naming_the_task(model_and_tasks, monkeypatch):
    model, tasks = model_and_tasks
    monkeypatch.setattr(evaluate, "maxsim", lambda text, image, *args: torch.full(
        (text.shape[0], image.shape[0]), float("nan")))
    with pytest.raises(ValueError, match=r"synthetic/task0 \(per-task gallery\) \(text→image\): .* NaN"):
        evaluate_tasks(model, tasks, 0, torch.device("cpu"), EVAL, [t.name for t in tasks])


@pytest.mark.parametrize("key, value, message", [
    ("captions", "some", "eval.captions must be one of all, first"),
    ("cumulative", "yes", "eval.cumulative must be true or false"),
    ("prompt_selection", "vote", "eval.prompt_selection must be one of key, task_id"),
    ("plot_metric", "R@1", "eval.plot_metric must be one of"),
    ("batch_size", 0, "eval.batch_size must be an integer >= 1"),
])
def test_bad_eval_config_names_the_key(model_and_tasks, key, value, message):
    model, tasks = model_and_tasks
    with pytest.raises(ValueError, match=message):
        evaluate_tasks(model, tasks, 0, torch.device("cpu"), dict(EVAL, **{key: value}))


def test_run_plots_scale_to_the_data_and_number_tasks_from_1(tmp_path, monkeypatch):
    """accuracy_matrix.png and task_curves.png of a run whose best value is 41: colours and curves span the data
    (a fixed 0–100 scale draws every cell dark), and tasks are numbered from 1 as in the log."""
    rows = [[2.0, 3.0], [41.0, 6.0], [30.0, 38.0]]  # before training, after task 1, after task 2
    results = [{"per_task": [{"mean_R@1": v} for v in row], "cumulative": [{"mean_R@1": v - 1.0} for v in row]}
               for row in rows]
    document = build_document("run", ["a", "b"], results, {"captions": "all"})
    figures = {}
    monkeypatch.setattr(report, "save_figure", lambda fig, path: figures.__setitem__(path.name, fig))
    report.plot_accuracy(tmp_path, document, "mean_R@1")
    assert sorted(figures) == ["accuracy_matrix.png", "task_curves.png"]

    heatmaps = [ax for ax in figures["accuracy_matrix.png"].axes if ax.images]  # not the colour bars
    assert len(heatmaps) == 2  # per-task and cumulative gallery
    for ax in heatmaps:
        assert ax.images[0].get_clim() == (1.0, 41.0)  # the data's range over both galleries, not 0–100
        assert [label.get_text() for label in ax.get_xticklabels()] == ["task 1\na", "task 2\nb"]
        assert [label.get_text() for label in ax.get_yticklabels()] == ["before training", "after task 1",
                                                                          "after task 2"]
    curves = figures["task_curves.png"].axes
    assert len(curves) == 2
    for ax in curves:
        low, high = ax.get_ylim()
        plotted = [y for line in ax.get_lines() for y in line.get_ydata()]
        assert low <= min(plotted) and max(plotted) <= high  # every point visible
        assert -1.0 <= low < 1.0 and 41.0 < high <= 43.0  # and the axis no wider than the data and a margin
        assert list(ax.get_xticks()) == [0, 1, 2]  # tasks trained, 0 = before training
    legend = curves[-1].get_legend()
    assert [text.get_text() for text in legend.get_texts()] == ["task 1: a", "task 2: b"]


# ------------------------------------------------------------------------------------------- cbd-report

def _metrics(offset: float) -> dict:
    return {"t2i_R@1": 10 + offset, "i2t_R@1": 20 + offset, "mean_R@1": 15 + offset, "t2i_MedR": 3.0}


def _fake_run(root, name, seed, lr, rows, tasks=("t0", "t1"), **config_keys):
    """A run folder as cbd-train writes it, with hand-made evaluation rows (offsets of mean_R@1 - 15)."""
    run = root / name
    run.mkdir(parents=True)
    config = config_lib.resolve({"name": name, "seed": seed, "train": {"lr": lr}, **config_keys})
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    results = [{"per_task": [_metrics(v) for v in row], "cumulative": [_metrics(v - 5) for v in row], "seconds": 1.0}
               for row in rows]
    # epochs: task 1 takes 9 s (no teacher), task 2 takes 1, 2, 6 s: the median of task 2 is 2
    document = build_document(name, list(tasks), results, {"captions": "all"},
                              seconds_per_epoch=[9.0, 9.0, 1.0, 2.0, 6.0],
                              loss_history=[{"task": 0}, {"task": 0}, {"task": 1}, {"task": 1}, {"task": 1}])
    write_reports(run, document, "mean_R@1")
    return run


def test_cbd_report_groups_seeds_skips_unfinished_and_writes_three_formats(tmp_path, capsys):
    runs = tmp_path / "runs"
    # final average of mean_R@1: (15 + a) + (15 + b) / 2 with rows [a0, b0], [a1, b1], [a2, b2]
    # Final avg 55, MTIL Avg ((55 + 45) / 2 + (20 + 65) / 2) / 2 = 46.25, LA 60, F 10, FWT 5, Initial avg 15
    _fake_run(runs, "cbd_s0", 0, 1e-3, [[0, 0], [40, 5], [30, 50]])
    # Final avg 65, MTIL Avg ((65 + 55) / 2 + (30 + 75) / 2) / 2 = 56.25, LA 70, F 10, FWT 15, Initial avg 15
    _fake_run(runs, "cbd_s1", 1, 1e-3, [[0, 0], [50, 15], [40, 60]])
    _fake_run(runs, "cbd_s2", 2, 1e-3, [[0, 0], [45, 10]])  # unfinished: 1 of 2 tasks
    _fake_run(runs, "cbd_lr_s0", 0, 2e-3, [[0, 0], [10, 0], [0, 20]])  # another lr: its own group
    (runs / "notes").mkdir()  # not a run
    out = tmp_path / "report"
    assert compare.main([str(p) for p in sorted(runs.iterdir())] + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for name in ("report.md", "report.csv", "report.tex", "stability_plasticity.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    markdown = (out / "report.md").read_text()
    assert markdown in printed
    assert markdown.startswith("| scenario | method | seeds | Final avg | MTIL Avg | LA | F | BWT | FWT | Transfer | "
                               "Initial avg | cum. Final avg | s / epoch |")
    assert "| synthetic (2 tasks) | cbd | 2 (0, 1) | 60.0 ± 7.1 | 51.2 ± 7.1 | 65.0 ± 7.1 | 10.0 ± 0.0 | " \
           "-10.0 ± 0.0 | 10.0 ± 7.1 | 25.0 ± 7.1 | 15.0 ± 0.0 | 55.0 ± 7.1 | 2.00 ± 0.00 |" in markdown
    assert "| synthetic (2 tasks) | cbd_lr | 1 (0) | 25.0 | 22.5 | 30.0 | 10.0 |" in markdown  # one seed: no ± std
    assert "left out:" in markdown and "cbd_s2: unfinished (1/2 tasks trained)" in markdown
    assert "notes: no metrics.json" in markdown
    assert "cbd_s2" not in markdown.split("\n\n")[0]  # not in the table
    with (out / "report.csv").open() as stream:
        rows = {row["method"]: row for row in csv.DictReader(stream)}
    assert rows["cbd"]["per_task_final_average_mean"] == "60.00" and rows["cbd"]["seeds"] == "0 1"
    assert rows["cbd"]["seconds_per_epoch_mean"] == "2.000"  # median of task 2's epochs, not task 1's 9 s
    assert rows["cbd"]["cumulative_final_average_mean"] == "55.00"
    assert rows["cbd"]["per_task_mtil_average_mean"] == "51.25" and rows["cbd"]["per_task_mtil_average_std"] == "7.07"
    assert rows["cbd"]["per_task_initial_average_mean"] == "15.00"
    assert rows["cbd_lr"]["per_task_final_average_std"] == ""
    latex = (out / "report.tex").read_text()
    assert r"\begin{tabular}" in latex and r"cbd\_lr" in latex and r"$60.0 \pm 7.1$" in latex
    assert "Final avg & MTIL Avg & LA" in latex and r"Initial avg & cum. Final avg & s / epoch \\" in latex


def test_cbd_report_latex_escapes_every_special_character(tmp_path):
    _fake_run(tmp_path, "cbd_s0", 0, 1e-3, [[0, 0], [40, 5], [30, 50]])
    report = compare.build_report([tmp_path / "cbd_s0"])
    report.groups[0].method = "a_b%c&d#e$f{g}h~i^j\\k"
    report.groups[0].scenario = "x^2 ~ {y}"
    latex = compare.to_latex(report)
    assert latex.splitlines()[1] == r"% needs \usepackage{booktabs}"
    row = latex.splitlines()[6]
    assert row.startswith(r"x\textasciicircum{}2 \textasciitilde{} \{y\} & a\_b\%c\&d\#e\$f\{g\}h\textasciitilde{}i"
                          r"\textasciicircum{}j\textbackslash{}k & 1 & $55.0$"), row


def test_cbd_report_names_what_differs_between_groups_with_one_name(tmp_path, capsys):
    runs = tmp_path / "runs"
    _fake_run(runs / "a", "cbd_s0", 0, 1e-3, [[0, 0], [40, 5], [30, 50]])
    _fake_run(runs / "b", "cbd_s0", 0, 2e-3, [[0, 0], [40, 5], [30, 50]])
    assert compare.main([str(runs / "a" / "cbd_s0"), str(runs / "b" / "cbd_s0"), "--out", str(tmp_path / "r")]) == 0
    markdown = capsys.readouterr().out
    assert "cbd [train.lr=0.001]" in markdown and "cbd [train.lr=0.002]" in markdown


def test_cbd_report_pairs_each_method_with_the_baseline_seed_by_seed(tmp_path, capsys):
    runs = tmp_path / "runs"
    for seed in range(4):
        _fake_run(runs, f"finetune_s{seed}", seed, 1e-3, [[0, 0], [40, 5], [30, 50]])  # Avg 55, F 10
    # cbd's final average is 55 + d on the seed with d = 2, 4, 6, 4 (task 2's final score 50 + 2d); same forgetting
    for seed, d in enumerate((2, 4, 6, 4)):
        _fake_run(runs, f"cbd_s{seed}", seed, 2e-3, [[0, 0], [40, 5], [30, 50 + 2 * d]])
    _fake_run(runs, "cbd_s9", 9, 2e-3, [[0, 0], [40, 5], [30, 90]])  # no finetune run with seed 9: not paired

    def paired_row(paths):
        assert compare.main([*map(str, paths), "--out", str(tmp_path / "r")]) == 0
        markdown = capsys.readouterr().out
        assert "Paired against `finetune`" in markdown and "| Δ Final avg (95 % CI) | beyond noise |" in markdown
        # the paired table's row: its third column is a bare count (the main table lists the seeds)
        return next(line for line in markdown.splitlines() if line.startswith("| synthetic (2 tasks) | cbd |")
                    and line.split("|")[3].strip().isdigit())

    three = sorted(runs.glob("*_s[0-2]")) + [runs / "cbd_s9"]
    # d = 2, 4, 6: mean 4, std 2, 95 % CI 4.303 * 2 / sqrt(3) = 4.97 > 4: within seed noise; ΔF = 0 exactly
    assert paired_row(three) == "| synthetic (2 tasks) | cbd | 3 | +4.0 ± 5.0 | no | +0.0 ± 0.0 | no |"
    # one more seed (d = 4): std 1.63, CI 3.182 * 1.63 / 2 = 2.60 < 4: beyond seed noise
    assert paired_row(sorted(runs.iterdir())) == "| synthetic (2 tasks) | cbd | 4 | +4.0 ± 2.6 | yes | +0.0 ± 0.0 | no |"
    assert compare.main([*map(str, three), "--out", str(tmp_path / "r"), "--baseline", "er"]) == 2
    assert "--baseline 'er' is not a group; groups: " in capsys.readouterr().err
    assert compare.main([*map(str, three), "--out", str(tmp_path / "r"), "--baseline", "none"]) == 0
    assert "Paired against" not in capsys.readouterr().out


def test_cbd_report_joins_a_weight_sweep_into_a_curve(tmp_path, capsys):
    runs = tmp_path / "runs"
    rows = [[0, 0], [40, 5], [30, 50]]  # Avg 55, F 10
    for name, args in (("cbd", {}), ("cbd_w0.3", dict(sample=0.3, token=0.3, banzhaf=0.3)),
                       ("cbd_w3", dict(sample=3, token=3, banzhaf=3)),
                       ("cbd_no_banzhaf", dict(banzhaf=0)),  # an ablation, not a multiple of the defaults
                       ("cbd_mixed", dict(sample=0.3, token=0.1, banzhaf=0.3)),
                       ("lwf_w3", dict(weight=3.0)), ("lwf", {})):
        method = name.split("_")[0]
        _fake_run(runs, f"{name}_s0", 0, 1e-3, rows, method=method, method_args=args)
    _fake_run(runs, "cbd_lr_s0", 0, 2e-3, rows, method="cbd", method_args={"banzhaf": 3.0})  # another lr, alone
    report = compare.build_report(sorted(runs.iterdir()))
    curves = [[(scale, report.groups[index].method) for scale, index in curve]
              for curve in compare.sweep_curves(report)]
    assert sorted(curves) == [[(0.3, "cbd_w0.3"), (1.0, "cbd"), (3.0, "cbd_w3")], [(1.0, "lwf"), (3.0, "lwf_w3")]]
    assert compare.main([*map(str, sorted(runs.iterdir())), "--out", str(tmp_path / "r")]) == 0
    markdown = capsys.readouterr().out
    assert ("- synthetic (2 tasks), cbd: ×0.3 (cbd_w0.3): 55.0 / 10.0; ×1 (cbd): 55.0 / 10.0; ×3 (cbd_w3): 55.0 / "
            "10.0") in markdown and "Final avg / F per multiple" in markdown


def test_cbd_report_without_finished_runs(tmp_path, capsys):
    _fake_run(tmp_path, "cbd_s0", 0, 1e-3, [[0, 0]])
    assert compare.main([str(tmp_path / "cbd_s0"), "--out", str(tmp_path / "r")]) == 1
    assert "unfinished (0/2 tasks trained)" in capsys.readouterr().err


def test_old_metrics_files_are_left_out_with_a_reason(tmp_path):
    old = tmp_path / "old_s0"
    old.mkdir()
    (old / "metrics.json").write_text(json.dumps({"name": "old_s0", "tasks": ["a"], "tasks_trained": 1,
                                                  "accuracy_matrices": {}, "summary": {}}))
    report = compare.build_report([old])
    assert not report.groups and "predates the evaluation protocol" in report.notes[0]
