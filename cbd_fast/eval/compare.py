"""``cbd-report``: compare finished runs as a paper would, mean ± std over seeds.

    cbd-report runs/* [--out report] [--metric mean_R@1]
    python -m cbd_fast.eval.compare runs/*          (the same)

Runs form a group when their resolved configs (``config.yaml``) are equal except for the run's name, output
folder, device, thread count, evaluation batch size and ``seed`` — so within a group only the seed varies (which
also draws the synthetic data). Groups are labelled by scenario and by the run name without its ``_s<seed>``
suffix. Unfinished runs, folders without a ``metrics.json`` and runs evaluated under an older protocol are listed
in a note and left out. Writes ``report.md``, ``report.csv``, ``report.tex`` and ``stability_plasticity.png``
(final average against forgetting, one small point per run, one point per group with ± std error bars).

With a baseline group (``--baseline finetune``, the default when such a group exists) ``report.md`` also compares
every other group of the scenario with it seed by seed: runs with the same seed see the same synthetic data, so
the per-seed differences are far less noisy than the two groups' spreads suggest. A difference is called beyond
seed noise when its 95 % confidence interval (Student's t over the paired seeds) excludes 0.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import pathlib
import re
import statistics
import sys
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..config import RESUMABLE_KEYS
from .metrics import METRIC_NAMES
from .report import save_figure, write_file

# Config keys that do not change what a run computes: a group may differ in these — the keys a resume may change,
# the seed and the evaluation batch size (the thread count, device and number of processes change only last bits,
# which training amplifies: see the README on threads).
NON_DEFINING_KEYS = (*RESUMABLE_KEYS, "seed", "eval.batch_size")
# (gallery, summary, column title) of the table; values of the chosen metric. "Final avg" (the final average,
# MTIL's "Last") is named apart from MTIL's "Avg" (each task's mean over the rows after tasks 1..t).
COLUMNS = (("per_task", "final_average", "Final avg"), ("per_task", "mtil_average", "MTIL Avg"),
           ("per_task", "learning_accuracy", "LA"), ("per_task", "forgetting", "F"),
           ("per_task", "backward_transfer", "BWT"), ("per_task", "forward_transfer", "FWT"),
           ("per_task", "transfer", "Transfer"), ("per_task", "initial_average", "Initial avg"),
           ("cumulative", "final_average", "cum. Final avg"))


def _column(gallery: str, summary: str) -> int:
    """Position of ``summary`` of ``gallery`` in COLUMNS, and so in a report row."""
    return [(g, s) for g, s, _ in COLUMNS].index((gallery, summary))


# the two summaries the plot and the sweeps show
FINAL_AVERAGE, FORGETTING = _column("per_task", "final_average"), _column("per_task", "forgetting")
TIMING_NOTE = ("s / epoch: per run, the median over every epoch of tasks 2..N (the tasks trained with a teacher; "
               "training steps only, evaluation excluded), then mean ± std over the group's runs — the same epochs "
               "for every method; compare it only between runs made on the same machine under the same load")


@dataclass
class Run:
    path: pathlib.Path
    name: str
    seed: Any
    config: dict[str, Any]
    document: dict[str, Any]

    def value(self, gallery: str, summary: str, metric: str) -> float | None:
        content = self.document["galleries"].get(gallery)
        if content is None or metric not in content["summary"]:
            return None
        return content["summary"][metric][summary]

    def seconds_per_epoch(self) -> float | None:
        """Median seconds of the epochs of tasks 2..N (all epochs for a one-task scenario)."""
        seconds, history = self.document.get("seconds_per_epoch", []), self.document.get("loss_history", [])
        if not seconds or len(seconds) != len(history):
            return None
        later = [s for s, entry in zip(seconds, history) if entry.get("task", 0) >= 1]
        return statistics.median(later or seconds)


@dataclass
class Group:
    scenario: str
    method: str
    runs: list[Run] = field(default_factory=list)

    @property
    def seeds(self) -> list:
        return [run.seed for run in self.runs]


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _defining(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in _flatten(config).items() if k not in NON_DEFINING_KEYS}


def load_run(path: pathlib.Path) -> tuple[Run | None, str | None]:
    """``(run, None)`` for a finished run under the current protocol, else ``(None, why it is left out)``."""
    metrics, config_file = path / "metrics.json", path / "config.yaml"
    if not metrics.is_file():
        return None, f"{path}: no metrics.json (not started, or not a run folder)"
    try:
        document = json.loads(metrics.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return None, f"{path}: metrics.json unreadable ({error})"
    if "galleries" not in document:
        return None, f"{path}: metrics.json predates the evaluation protocol (no pre-training row); re-run it"
    if document["tasks_trained"] < len(document["tasks"]):
        return None, f"{path}: unfinished ({document['tasks_trained']}/{len(document['tasks'])} tasks trained)"
    if not config_file.is_file():
        return None, f"{path}: no config.yaml, so its method and seed are unknown"
    config = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
    return Run(path, document["name"], config.get("seed"), config, document), None


def _scenario_label(run: Run) -> str:
    data = run.config.get("data", {})
    if isinstance(data, str):
        label = pathlib.Path(data).stem
    else:
        label = str(data.get("name") or data.get("scenario", "synthetic"))
    return f"{label} ({len(run.document['tasks'])} tasks)"


def group_runs(runs: list[Run]) -> tuple[list[Group], list[str]]:
    """Runs grouped by equal defining config (see module doc), labelled; and notes on what to watch."""
    by_config: dict[str, list[Run]] = {}
    for run in runs:
        by_config.setdefault(json.dumps(_defining(run.config), sort_keys=True, default=str), []).append(run)
    groups, notes = [], []
    for members in by_config.values():
        stems = list(dict.fromkeys(re.sub(r"_s\d+$", "", run.name) for run in members))
        groups.append(Group(_scenario_label(members[0]), "/".join(stems), members))
        seeds = [run.seed for run in members]
        repeated = sorted({str(s) for s in seeds if seeds.count(s) > 1})
        if repeated:
            notes.append(f"{'/'.join(stems)}: seed(s) {', '.join(repeated)} appear in more than one run; each run "
                         "counts once in the mean")
    # groups that share a label differ in some config key: name it
    labels: dict[tuple[str, str], list[Group]] = {}
    for group in groups:
        labels.setdefault((group.scenario, group.method), []).append(group)
    for same in labels.values():
        if len(same) < 2:
            continue
        flats = [_defining(group.runs[0].config) for group in same]
        keys = sorted({k for flat in flats for k in flat if len({json.dumps(f.get(k), default=str) for f in flats}) > 1})
        for group, flat in zip(same, flats):
            group.method += " [" + ", ".join(f"{k}={flat.get(k)}" for k in keys) + "]"
    return groups, notes


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


@dataclass
class Report:
    metric: str
    groups: list[Group]
    notes: list[str]
    # per group: list of (mean, std) for COLUMNS then seconds per epoch
    cells: list[list[tuple[float | None, float | None]]]

    @property
    def headers(self) -> list[str]:
        return [title for _, _, title in COLUMNS] + ["s / epoch"]


def build_report(paths: list[pathlib.Path], metric: str = "mean_R@1") -> Report:
    if metric not in METRIC_NAMES:
        raise ValueError(f"--metric must be one of {', '.join(METRIC_NAMES)}, got {metric!r}")
    runs, notes = [], []
    for path in paths:
        run, why = load_run(path)
        if run is None:
            notes.append(f"left out: {why}")
        else:
            runs.append(run)
    groups, group_notes = group_runs(runs)
    cells = []
    for group in groups:
        row = [_mean_std([run.value(g, s, metric) for run in group.runs]) for g, s, _ in COLUMNS]
        row.append(_mean_std([run.seconds_per_epoch() for run in group.runs]))
        cells.append(row)
    return Report(metric, groups, notes + group_notes, cells)


def _cell(mean: float | None, std: float | None, digits: int, plus_minus: str = " ± ") -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f}" + ("" if std is None else f"{plus_minus}{std:.{digits}f}")


def _digits(column: int) -> int:
    return 2 if column == len(COLUMNS) else 1  # seconds per epoch: 2 decimals


def _seeds(group: Group) -> str:
    return f"{len(group.runs)} ({', '.join(str(s) for s in group.seeds)})"


def legend(report: Report) -> list[str]:
    return [f"Metric: {report.metric} (DESIGN §7), mean ± sample std over the runs of a group; a group's runs have "
            "equal configs except the seed (which also draws the synthetic data); n/a: undefined (e.g. fewer than "
            "2 tasks) or not evaluated. Final avg = final average over the tasks once the last is trained (MTIL's "
            "Last), MTIL Avg = MTIL's Avg (each task's mean over the rows after tasks 1..t, those before it is "
            "trained included, averaged over tasks), LA = learning accuracy, F = forgetting (Chaudhry), BWT/FWT "
            "(Lopez-Paz & Ranzato, FWT against the pre-training row), Transfer (MTIL), Initial avg = average before "
            "training (row 0), cum. Final avg = final average in the cumulative gallery.", TIMING_NOTE]


# Two-sided 95 % quantiles of Student's t by degrees of freedom (1..20); beyond 20 the value at 20 (conservative).
T_95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086)
# (summary, column title) of the paired comparison
PAIRED_COLUMNS = (("final_average", "Δ Final avg"), ("forgetting", "Δ F"))


@dataclass
class PairedDifference:
    """``group`` minus the baseline on the seeds both ran: per-seed differences, their mean and 95 % interval."""
    differences: list[float]

    @property
    def mean(self) -> float:
        return statistics.mean(self.differences)

    @property
    def half_width(self) -> float | None:
        n = len(self.differences)
        if n < 2:
            return None
        return T_95[min(n - 1, len(T_95)) - 1] * statistics.stdev(self.differences) / n ** 0.5

    @property
    def beyond_noise(self) -> bool | None:
        return None if self.half_width is None else abs(self.mean) > self.half_width


def paired_differences(report: Report, baseline: str) -> list[tuple[Group, list[PairedDifference | None]]]:
    """Every group of a scenario that has a ``baseline`` group, against it, on their common seeds."""
    bases = {g.scenario: g for g in report.groups if g.method == baseline}
    rows = []
    for group in report.groups:
        base = bases.get(group.scenario)
        if base is None or group is base:
            continue
        by_seed = {run.seed: run for run in base.runs}
        pairs = [(run, by_seed[run.seed]) for run in group.runs if run.seed in by_seed]
        cells = []
        for summary, _ in PAIRED_COLUMNS:
            values = [(a.value("per_task", summary, report.metric), b.value("per_task", summary, report.metric))
                      for a, b in pairs]
            differences = [a - b for a, b in values if a is not None and b is not None]
            cells.append(PairedDifference(differences) if differences else None)
        rows.append((group, cells))
    return rows


def paired_markdown(report: Report, baseline: str) -> list[str]:
    rows = paired_differences(report, baseline)
    if not rows:
        return []
    header = ["scenario", "method", "paired seeds"]
    for _, title in PAIRED_COLUMNS:
        header += [f"{title} (95 % CI)", "beyond noise"]
    lines = [f"Paired against `{baseline}` ({report.metric}): each method minus `{baseline}` on the same seed, "
             "mean and 95 % confidence interval over the seeds both ran (Student's t); *beyond noise* = the "
             "interval excludes 0.", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group, cells in rows:
        row = [group.scenario, group.method, str(max((len(c.differences) for c in cells if c), default=0))]
        for cell in cells:
            if cell is None:
                row += ["n/a", "n/a"]
            elif cell.half_width is None:
                row += [f"{cell.mean:+.1f}", "n/a (1 seed)"]
            else:
                row += [f"{cell.mean:+.1f} ± {cell.half_width:.1f}", "yes" if cell.beyond_noise else "no"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def sweep_markdown(report: Report) -> list[str]:
    """One line per weight sweep (:func:`sweep_curves`): the groups in order of scale with Final avg and F."""
    if not (curves := sweep_curves(report)):
        return []
    lines = ["Weight sweeps (each method's loss weights at a multiple × of its defaults; joined in the plot): "
             "Final avg / F per multiple, means over seeds."]
    for curve in curves:
        first = report.groups[curve[0][1]]
        points = []
        for scale, index in curve:
            (avg, _), (forget, _) = report.cells[index][FINAL_AVERAGE], report.cells[index][FORGETTING]
            points.append(f"×{scale:g} ({report.groups[index].method}): {_cell(avg, None, 1)} / "
                          f"{_cell(forget, None, 1)}")
        lines.append(f"- {first.scenario}, {first.runs[0].config['method']}: " + "; ".join(points))
    return lines


def to_markdown(report: Report, baseline: str | None = None) -> str:
    header = ["scenario", "method", "seeds", *report.headers]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group, row in zip(report.groups, report.cells):
        cells = [_cell(m, s, _digits(c)) for c, (m, s) in enumerate(row)]
        lines.append("| " + " | ".join([group.scenario, group.method, _seeds(group), *cells]) + " |")
    for paragraph in legend(report):
        lines += ["", paragraph]
    sweeps = sweep_markdown(report)
    if sweeps:
        lines += ["", *sweeps]
    paired = paired_markdown(report, baseline) if baseline else []
    if paired:
        lines += ["", *paired]
    if report.notes:
        lines += ["", *(f"- {note}" for note in report.notes)]
    return "\n".join(lines) + "\n"


def to_csv(report: Report) -> str:
    stream = io.StringIO()
    writer = csv.writer(stream, lineterminator="\n")
    keys = [f"{g}_{s}" for g, s, _ in COLUMNS] + ["seconds_per_epoch"]
    writer.writerow(["scenario", "method", "metric", "num_runs", "seeds", "runs",
                     *(f"{k}_{stat}" for k in keys for stat in ("mean", "std"))])
    for group, row in zip(report.groups, report.cells):
        values = []
        for c, (mean, std) in enumerate(row):
            digits = 3 if c == len(COLUMNS) else 2
            values += ["" if mean is None else f"{mean:.{digits}f}", "" if std is None else f"{std:.{digits}f}"]
        writer.writerow([group.scenario, group.method, report.metric, len(group.runs),
                         " ".join(str(s) for s in group.seeds), " ".join(run.name for run in group.runs), *values])
    return stream.getvalue()


# LaTeX's special characters in text mode and what typesets each as itself (one pass: a replacement's own
# backslash and braces are not escaped again)
LATEX_SPECIAL = {"\\": r"\textbackslash{}", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                 "^": r"\textasciicircum{}", "_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#", "$": r"\$"}


def _latex_escape(text: str) -> str:
    return re.sub(r"[\\{}~^_%&#$]", lambda match: LATEX_SPECIAL[match.group()], text)


def to_latex(report: Report) -> str:
    header = ["Scenario", "Method", "Seeds", *report.headers]
    lines = ["% cbd-report: " + _latex_escape(f"{report.metric}, mean ± std over seeds; notes in report.md"),
             r"% needs \usepackage{booktabs}", r"\begin{tabular}{ll" + "r" * (len(header) - 2) + "}", r"\toprule",
             " & ".join(_latex_escape(h) for h in header) + r" \\", r"\midrule"]
    for group, row in zip(report.groups, report.cells):
        cells = [_cell(m, s, _digits(c), r" \pm ") for c, (m, s) in enumerate(row)]
        cells = [c if c == "n/a" else f"${c}$" for c in cells]
        lines.append(" & ".join([_latex_escape(group.scenario), _latex_escape(group.method), str(len(group.runs)),
                                 *cells]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def _sweep_method(config: dict[str, Any]):
    """The run's method class when it has ``sweep_weights``, else None (no sweep weights, or an unknown method)."""
    from ..methods import METHODS

    cls = METHODS.get(config.get("method"))
    return cls if cls is not None and cls.sweep_weights else None


def sweep_scale(config: dict[str, Any]) -> float | None:
    """The common multiple ``s`` of the method's defaults that a run's ``sweep_weights`` are set to (every one of
    them ``s`` times its default), or None (the method has no sweep weights, or they are not one multiple)."""
    cls, args = _sweep_method(config), config.get("method_args") or {}
    if cls is None or any(not cls.defaults[key] or not isinstance(args.get(key), (int, float))
                          for key in cls.sweep_weights):
        return None
    scales = [args[key] / cls.defaults[key] for key in cls.sweep_weights]
    return scales[0] if scales[0] > 0 and all(math.isclose(x, scales[0], rel_tol=1e-9) for x in scales) else None


def sweep_curves(report: Report) -> list[list[tuple[float, int]]]:
    """Groups of one scenario and method that differ only in a common scale of the method's sweep weights (at two
    scales or more): each curve as ``[(scale, index into report.groups)]`` in increasing scale."""
    families: dict[str, list[tuple[float, int]]] = {}
    for index, group in enumerate(report.groups):
        config = group.runs[0].config
        scale = sweep_scale(config)
        if scale is None:
            continue
        sweep_keys = {f"method_args.{key}" for key in _sweep_method(config).sweep_weights}
        rest = {k: v for k, v in _defining(config).items() if k not in sweep_keys}
        families.setdefault(json.dumps([group.scenario, rest], sort_keys=True, default=str), []).append(
            (scale, index))
    return [sorted(members) for members in families.values() if len({scale for scale, _ in members}) > 1]


def plot_stability_plasticity(report: Report, path: pathlib.Path) -> None:
    """Final average (plasticity and retention) against forgetting (stability), per scenario."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(dict.fromkeys(group.scenario for group in report.groups)) or ["no finished runs"]
    curves = sweep_curves(report)
    fig, axes = plt.subplots(1, len(scenarios), squeeze=False, figsize=(7.4 * len(scenarios), 4.6))
    for ax, scenario in zip(axes[0], scenarios):
        for index, (group, row) in enumerate(zip(report.groups, report.cells)):
            if group.scenario != scenario:
                continue
            color = f"C{index % 10}"
            points = [(run.value("per_task", "forgetting", report.metric),
                       run.value("per_task", "final_average", report.metric)) for run in group.runs]
            points = [p for p in points if None not in p]
            ax.scatter([p[0] for p in points], [p[1] for p in points], s=14, alpha=0.35, color=color)
            (avg, avg_std), (forget, forget_std) = row[FINAL_AVERAGE], row[FORGETTING]
            if avg is not None and forget is not None:
                marker = "osD^v"[index // 10 % 5]  # 10 colours: groups beyond them differ in marker
                ax.errorbar(forget, avg, xerr=forget_std or 0.0, yerr=avg_std or 0.0, fmt=marker, color=color,
                            capsize=3, markersize=6, label=f"{group.method} (n={len(group.runs)})")
        for curve in curves:  # a method's weight sweep: its group means joined in order of scale
            if report.groups[curve[0][1]].scenario != scenario:
                continue
            means = [(report.cells[index][FORGETTING][0], report.cells[index][FINAL_AVERAGE][0], scale)
                     for scale, index in curve]
            means = [m for m in means if None not in m]
            color = f"C{curve[-1][1] % 10}"
            ax.plot([m[0] for m in means], [m[1] for m in means], "-", color=color, alpha=0.6, linewidth=1.2)
            for forget, avg, scale in means:
                ax.annotate(f"×{scale:g}", (forget, avg), textcoords="offset points", xytext=(4, 4), fontsize=6,
                            color=color)
        ax.set_xlabel(f"F: forgetting, {report.metric} (lower = more stable)")
        ax.set_ylabel(f"Final avg: final average, {report.metric}")
        ax.set_title(scenario, fontsize=9)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("stability–plasticity: runs (small), group mean ± std over seeds\nlines join a method's weight "
                 "sweep (×: multiple of its default loss weights)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def write_report(report: Report, out: pathlib.Path, baseline: str | None = None) -> list[pathlib.Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.md", out / "report.csv", out / "report.tex", out / "stability_plasticity.png"]
    write_file(paths[0], to_markdown(report, baseline))
    write_file(paths[1], to_csv(report))
    write_file(paths[2], to_latex(report))
    plot_stability_plasticity(report, paths[3])
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cbd-report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=pathlib.Path, help="run folders (runs/*)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("report"),
                        help="folder for report.md/.csv/.tex and the plot (default: ./report)")
    parser.add_argument("--metric", default="mean_R@1", choices=METRIC_NAMES,
                        help="metric of the table (default: mean_R@1, the mean of both directions' R@1)")
    parser.add_argument("--baseline", default="finetune",
                        help="group (method label) the others are compared with seed by seed (default: finetune, "
                             "when present; 'none' for no paired comparison)")
    args = parser.parse_args(argv)
    report = build_report([p for p in args.runs if p.resolve() != args.out.resolve()], args.metric)
    if not report.groups:
        print("\n".join(["no finished run to report", *report.notes]), file=sys.stderr)
        return 1
    labels = [group.method for group in report.groups]
    baseline = None if args.baseline == "none" else args.baseline
    if baseline is not None and baseline not in labels:
        if args.baseline != parser.get_default("baseline"):
            print(f"cbd-report: --baseline {baseline!r} is not a group; groups: {', '.join(labels)}", file=sys.stderr)
            return 2
        baseline = None  # the default baseline is optional
    paths = write_report(report, args.out, baseline)
    print(to_markdown(report, baseline), end="")
    print("written: " + ", ".join(str(p) for p in paths))
    return 0


def console() -> None:
    sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
    console()
