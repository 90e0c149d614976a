"""The README as written: its Python example runs, and its results tables (the default and the 5-task scenario) are
what cbd-report computes from the stored runs."""
import contextlib
import io
import pathlib
import re

import pytest

from cbd_fast.eval import compare

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    result = namespace["result"]
    assert result.interaction.shape == (8, 32, 50)
    assert namespace["text"].grad is not None and namespace["text_weight"].grad is not None


# ------------------------------------------------------------------ the results sections and their runs

RESULTS = README.parent / "benchmarks" / "results"
RUNS = RESULTS / "training_default_cpu_runs"
RUNS_2THREADS = RESULTS / "training_default_cpu_runs_2threads"
RESULTS_PAGE = RESULTS / "training_default_cpu.md"
# scenario -> (the README section's heading, its stored runs, its results page)
SCENARIOS = {
    "default": ("### Results on the default scenario", RUNS, RESULTS_PAGE),
    "synthetic5": ("### Results on the 5-task scenario", RESULTS / "training_synthetic5_cpu_runs",
                   RESULTS / "training_synthetic5_cpu.md"),
}
# the README's column suffix -> the cbd-report metric
README_METRICS = {"R@1": "mean_R@1", "mAP": "t2i_mAP"}


def _tables(text: str) -> list[list[list[str]]]:
    """Every markdown table of ``text`` as rows of stripped cells (header first, separator row dropped)."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if not all(set(cell) <= set("-: ") for cell in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables


def _results_section(scenario: str) -> str:
    text = README.read_text()
    start = text.index(SCENARIOS[scenario][0])
    return text[start:text.index("\n#", start + 1)]


def _unbold(cell: str) -> str:
    return cell[2:-2] if cell.startswith("**") and cell.endswith("**") else cell


def _main_rows(table: list[list[str]]) -> dict[str, dict[str, str]]:
    """cbd-report's main table: ``{method: {column title: cell}}``."""
    return {row[1]: dict(zip(table[0], row)) for row in table[1:]}


def _paired_rows(table: list[list[str]]) -> dict[str, dict[str, tuple[str, str]]]:
    """cbd-report's paired table: ``{method: {"Δ Avg": (cell, beyond noise), "Δ F": ...}}``."""
    titles = [title.split(" (")[0] for title in table[0]]  # "Δ Avg (95 % CI)", "beyond noise", "Δ F (95 % CI)", ...
    return {row[1]: {titles[i]: (row[i], row[i + 1]) for i in range(3, len(row), 2)} for row in table[1:]}


@pytest.fixture(scope="module", params=sorted(SCENARIOS))
def regenerated(request, tmp_path_factory):
    """cbd-report on one scenario's stored runs, once per metric of the README's tables (with `finetune` as the
    baseline, as the README's command): ``(scenario, {metric: (report, {method: {column: cell}}, {method: {column:
    (cell, beyond noise)}})})`` from the main and the paired table of its report.md."""
    runs = sorted(SCENARIOS[request.param][1].iterdir())
    out = {}
    for metric in README_METRICS.values():
        folder = tmp_path_factory.mktemp(metric.replace("@", ""))
        with contextlib.redirect_stdout(io.StringIO()):
            assert compare.main([*map(str, runs), "--out", str(folder), "--metric", metric]) == 0
        main_table, paired_table = _tables((folder / "report.md").read_text())
        out[metric] = (compare.build_report(runs, metric), _main_rows(main_table), _paired_rows(paired_table))
    return request.param, out


def test_readme_results_table_is_what_cbd_report_computes_from_the_stored_runs(regenerated):
    scenario, regenerated = regenerated
    table = _tables(_results_section(scenario))[0]
    header, rows = table[0], table[1:]
    assert header[:2] == ["method", "seeds"]
    methods = [row[0].strip("`") for row in rows]
    assert sorted(methods) == sorted(regenerated["mean_R@1"][1])  # every stored group, no other
    checked = 0
    for row in rows:
        method = row[0].strip("`")
        for title, cell in zip(header[1:], row[1:]):
            if title == "seeds":
                assert cell == regenerated["mean_R@1"][1][method]["seeds"].split(" ")[0], method
                continue
            column, suffix = title.rsplit(" ", 1)
            computed = regenerated[README_METRICS[suffix]][1][method][column]
            assert cell == computed, f"README {method} {title}: {cell}, the stored runs give {computed}"
            checked += 1
    assert checked == len(rows) * 8


def test_readme_paired_table_is_what_cbd_report_computes_from_the_stored_runs(regenerated):
    scenario, regenerated = regenerated
    table = _tables(_results_section(scenario))[1]
    header, rows = table[0], table[1:]
    assert header[0].startswith("method − `finetune`")
    titles = [title.rsplit(" ", 1) for title in header[1:]]  # ("Δ Avg", "R@1"), ...
    for row in rows:
        # "`joint`" against finetune; "`cbd` − `lwf` (why)" against the second group
        names = re.findall(r"`([^`]+)`", row[0])
        method, baseline = names[0], names[1] if len(names) > 1 else "finetune"
        for (column, suffix), cell in zip(titles, row[1:]):
            report, _, paired = regenerated[README_METRICS[suffix]]
            if baseline != "finetune":  # the paired table cbd-report writes with --baseline <baseline>
                paired = _paired_rows(_tables("\n".join(compare.paired_markdown(report, baseline)))[0])
            computed, beyond_noise = paired[method][column]
            assert (_unbold(cell), cell.startswith("**")) == (computed, beyond_noise == "yes"), \
                f"README {row[0]} {column} {suffix}: {cell}; the stored runs: {computed}, beyond noise {beyond_noise}"


def test_results_page_tables_are_what_cbd_report_writes(regenerated):
    scenario, regenerated = regenerated
    page = _tables(SCENARIOS[scenario][2].read_text())
    for metric, first in (("mean_R@1", 0), ("t2i_mAP", 2)):
        _, rows, paired = regenerated[metric]
        assert _main_rows(page[first]) == rows and _paired_rows(page[first + 1]) == paired, metric


def test_thread_comparison_numbers_are_those_of_the_stored_runs():
    """The README's and the results page's 1- against 2-thread figures: the same config and seed run with 1 and 2
    threads (cbd, seeds 0 and 1), final average and forgetting of the mean R@1 in the per-task gallery."""
    apart = {}
    for seed in (0, 1):
        one, why = compare.load_run(RUNS / f"cbd_s{seed}")
        two, why_2 = compare.load_run(RUNS_2THREADS / f"cbd_2threads_s{seed}")
        assert one is not None and two is not None, (why, why_2)
        assert (one.config["threads"], two.config["threads"], one.seed, two.seed) == (1, 2, seed, seed)
        assert len(compare.group_runs([one, two])[0]) == 1  # nothing else differs that defines a run
        values = [[run.value("per_task", summary, "mean_R@1") for summary in ("final_average", "forgetting")]
                  for run in (one, two)]
        apart[seed] = values
    text = " ".join(README.read_text().split())  # sentences may wrap
    avg = [abs(apart[s][1][0] - apart[s][0][0]) for s in (0, 1)]
    forget = [abs(apart[s][1][1] - apart[s][0][1]) for s in (0, 1)]
    training = re.search(r"final average R@1 (\S+) and (\S+) points apart on seeds 0 and 1", text)
    results = re.search(r"seeds 0 and 1 of `cbd` rerun with 2 threads ended (\S+) and (\S+) R@1 points from the "
                        r"1-thread runs \(final average\) and (\S+) and (\S+) points \(forgetting\)", text)
    assert training and results, "the README's thread sentences moved: update this test"
    assert list(training.groups()) == [f"{a:.1f}" for a in avg]
    assert list(results.groups()) == [f"{a:.1f}" for a in avg + forget]
    table = next(t for t in _tables(RESULTS_PAGE.read_text()) if t[0][:3] == ["method", "seed", "1 thread"])
    assert len(table) == 3
    for row, seed in zip(table[1:], (0, 1)):
        (avg_1, f_1), (avg_2, f_2) = apart[seed]
        assert row == ["cbd", str(seed), f"{avg_1:.1f} / {f_1:.1f}", f"{avg_2:.1f} / {f_2:.1f}",
                       f"{avg_2 - avg_1:+.1f} / {f_2 - f_1:+.1f}"]
