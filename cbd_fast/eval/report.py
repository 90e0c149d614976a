"""Run outputs: metrics.json, metrics.csv, the accuracy-matrix heatmap and per-task curves, a terminal table.

Layout of ``metrics.json`` (DESIGN §7): ``galleries.<gallery>.matrices.<metric>[i][j]`` = the metric on task
``j + 1`` after training tasks ``1..i`` (row 0: before training), ``galleries.<gallery>.summary.<metric>`` = the
continual summaries of that matrix, for ``gallery`` in ``per_task`` and (with ``eval.cumulative``)
``cumulative``. Undefined values are ``null``.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import pathlib
import tempfile
from typing import Any

from .metrics import LOWER_IS_BETTER, METRIC_NAMES, SUMMARIES, continual_summary

log = logging.getLogger("cbd_fast.eval")

GALLERIES = ("per_task", "cumulative")
GALLERY_TITLES = {"per_task": "per-task gallery", "cumulative": "cumulative gallery"}
# the names cbd-report's columns use too: "Final avg" (MTIL's "Last") is not MTIL's "Avg"
SUMMARY_TITLES = {"final_average": "Final avg", "learning_accuracy": "learning acc.", "forgetting": "forgetting",
                  "backward_transfer": "BWT", "forward_transfer": "FWT", "transfer": "Transfer (MTIL)",
                  "mtil_average": "MTIL Avg", "initial_average": "Initial avg"}
PROTOCOL_NOTE = ("row 0 = before training, row i = after training task i; ties count against the query; "
                 "cumulative gallery of task j after i tasks = test sets of tasks 1..max(i, j)")


def write_file(path: pathlib.Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file + rename), with the mode a plain ``open`` gives
    (0644 under the usual umask 022; ``mkstemp`` alone would leave 0600)."""
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data.encode("utf-8") if isinstance(data, str) else data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def build_document(name: str, task_names: list[str], results: list[dict[str, Any]], protocol: dict[str, Any],
                   **extra: Any) -> dict[str, Any]:
    """The metrics document of a run from its evaluation records.

    ``results[i]`` is the evaluation after ``i`` trained tasks (row 0 before training):
    ``{"per_task": [metrics of task j], "cumulative": [...] (optional), "seconds": float}``. ``extra`` (seconds per
    epoch, loss history...) is copied as is.
    """
    if results and not (isinstance(results[0], dict) and "per_task" in results[0]):
        raise ValueError("these results predate the evaluation protocol (no pre-training row, one caption per "
                         "image, no cumulative gallery); evaluate the run again or re-run it")
    galleries: dict[str, Any] = {}
    for gallery in GALLERIES:
        if not results or gallery not in results[0]:
            continue
        rows = [record[gallery] for record in results]
        metrics = [m for m in METRIC_NAMES if any(m in entry for row in rows for entry in row)]
        matrices = {m: [[entry.get(m) for entry in row] for row in rows] for m in metrics}
        summary = {m: continual_summary(matrix) for m, matrix in matrices.items() if m not in LOWER_IS_BETTER}
        galleries[gallery] = {"matrices": matrices, "summary": summary}
    return {"name": name, "tasks": task_names, "tasks_trained": max(0, len(results) - 1),
            "protocol": dict(protocol, rows=PROTOCOL_NOTE), "galleries": galleries,
            "evaluation_seconds": [record.get("seconds") for record in results], **extra}


# ------------------------------------------------------------------------------------------------ files

def format_number(value: float | None, digits: int = 2) -> str:
    """``value`` with ``digits`` decimals; '' for None; never '-0.00'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    text = f"{value:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def metrics_csv(document: dict[str, Any]) -> str:
    """Every matrix entry and every summary as CSV rows: ``gallery, summary, after_task, task, task_name`` and one
    column per metric. Result rows leave ``summary`` empty (``after_task`` 0 = before training, tasks 1-based);
    summary rows name the summary and leave the task columns empty. Values have 2 decimals."""
    stream = io.StringIO()
    writer = csv.writer(stream, lineterminator="\n")
    metrics = list(dict.fromkeys(m for g in document["galleries"].values() for m in g["matrices"]))
    writer.writerow(["gallery", "summary", "after_task", "task", "task_name", *metrics])
    for gallery, content in document["galleries"].items():
        matrices = content["matrices"]
        for i in range(document["tasks_trained"] + 1):
            for j, task_name in enumerate(document["tasks"]):
                writer.writerow([gallery, "", i, j + 1, task_name,
                                 *(format_number(matrices[m][i][j]) if m in matrices else "" for m in metrics)])
        for summary in SUMMARIES:
            writer.writerow([gallery, summary, "", "", "",
                             *(format_number(content["summary"][m][summary]) if m in content["summary"] else ""
                               for m in metrics)])
    return stream.getvalue()


def write_reports(run_dir: pathlib.Path, document: dict[str, Any], plot_metric: str) -> None:
    """metrics.json, metrics.csv, accuracy_matrix.png and task_curves.png in ``run_dir``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_file(run_dir / "metrics.json", json.dumps(document, indent=1, allow_nan=False))
    write_file(run_dir / "metrics.csv", metrics_csv(document))
    if document["galleries"] and all(plot_metric in g["matrices"] for g in document["galleries"].values()):
        plot_accuracy(run_dir, document, plot_metric)
    elif document["galleries"]:
        log.warning("no plots: eval.plot_metric %s was not computed (class mAP needs class labels)", plot_metric)


def _summary_line(summary: dict[str, float | None]) -> str:
    keys = ("final_average", "forgetting", "backward_transfer", "forward_transfer")
    return " · ".join(f"{SUMMARY_TITLES[key]} {format_number(summary[key], 1)}" for key in keys
                      if summary[key] is not None)


def save_figure(fig, path: pathlib.Path) -> None:
    """A matplotlib figure as PNG, written like :func:`write_file`."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    write_file(path, buffer.getvalue())


def plot_accuracy(run_dir: pathlib.Path, document: dict[str, Any], metric: str) -> None:
    """accuracy_matrix.png (rows: before training, after task i; columns: evaluated task) and task_curves.png
    (each task across the sequence), one panel per gallery, colour and y scales fitted to the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    galleries = document["galleries"]
    names = document["tasks"]
    rows = document["tasks_trained"] + 1
    values = [v for g in galleries.values() for row in g["matrices"][metric] for v in row if v is not None]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    if high - low < 1e-9:
        low, high = low - 1.0, high + 1.0
    column_labels = [f"task {j + 1}\n{name}" for j, name in enumerate(names)]
    row_labels = ["before training"] + [f"after task {i}" for i in range(1, rows)]

    fig, axes = plt.subplots(1, len(galleries), squeeze=False,
                             figsize=(len(galleries) * (1.25 * len(names) + 2.6), 0.6 * rows + 2.4))
    for ax, (gallery, content) in zip(axes[0], galleries.items()):
        matrix = [[math.nan if v is None else v for v in row] for row in content["matrices"][metric]]
        image = ax.imshow(matrix, cmap="viridis", vmin=low, vmax=high, aspect="auto")
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                if not math.isnan(value):
                    bright = (value - low) / (high - low) > 0.6
                    ax.text(j, i, format_number(value, 1), ha="center", va="center", fontsize=8,
                            color="black" if bright else "white")
        ax.set_xticks(range(len(names)), column_labels, fontsize=8)
        ax.set_yticks(range(rows), row_labels, fontsize=8)
        ax.set_xlabel("evaluated task")
        ax.set_title(f"{GALLERY_TITLES[gallery]}\n{_summary_line(content['summary'].get(metric, {}))}", fontsize=9)
        fig.colorbar(image, ax=ax, label=metric)
    fig.suptitle(f"{document['name']}: {metric}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, run_dir / "accuracy_matrix.png")
    plt.close(fig)

    fig, axes = plt.subplots(1, len(galleries), squeeze=False, figsize=(len(galleries) * 5.5, 4), sharey=True)
    for ax, (gallery, content) in zip(axes[0], galleries.items()):
        matrix = content["matrices"][metric]
        for j, name in enumerate(names):
            # dashed up to the row where task j + 1 is trained (before it: transfer), solid from there on
            for style, steps in (("--", range(0, min(j + 2, rows))), ("-", range(j + 1, rows))):
                points = [(i, matrix[i][j]) for i in steps if matrix[i][j] is not None]
                ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", markersize=3,
                        color=f"C{j % 10}", label=f"task {j + 1}: {name}" if style == "--" else None)
        ax.set_xlabel("tasks trained (0 = before training)")
        ax.set_xticks(range(rows))
        margin = 0.05 * (high - low)
        ax.set_ylim(low - margin, high + margin)
        ax.grid(alpha=0.3)
        ax.set_title(GALLERY_TITLES[gallery], fontsize=9)
    axes[0][0].set_ylabel(metric)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"{document['name']}: each task across the sequence (dashed: before it is trained)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, run_dir / "task_curves.png")
    plt.close(fig)


# -------------------------------------------------------------------------------------------- terminal

TABLE_COLUMNS = (("per_task", "t2i_R@1", "t2i R@1"), ("per_task", "i2t_R@1", "i2t R@1"),
                 ("per_task", "rsum", "rsum"), ("per_task", "mean_R@1", "R@1"), ("cumulative", "mean_R@1", "cum R@1"))
TABLE_SUMMARIES = ("final_average", "learning_accuracy", "forgetting", "backward_transfer", "forward_transfer")


def format_table(document: dict[str, Any]) -> str:
    """Per-task results after the last trained task, then the main summaries of each column.

    ``R@1`` is the mean of both directions; ``cum R@1`` the same in the cumulative gallery.
    """
    trained = document["tasks_trained"]
    galleries = document["galleries"]
    if not galleries:
        return "nothing evaluated yet"
    columns = [(g, m, label) for g, m, label in TABLE_COLUMNS if g in galleries and m in galleries[g]["matrices"]]
    title = "before training" if trained == 0 else f"after task {trained}/{len(document['tasks'])}"
    lines = [f"results {title} ({document['name']}; {document['protocol'].get('captions', 'all')} captions per "
             f"image, ties count against the query)",
             "task".ljust(22) + "".join(label.rjust(10) for _, _, label in columns)]
    for j in range(trained or len(document["tasks"])):  # the trained tasks; before training, all of them
        lines.append(f"{j + 1} {document['tasks'][j]}"[:21].ljust(22) +
                     "".join(format_number(galleries[g]["matrices"][m][trained][j]).rjust(10)
                             for g, m, _ in columns))
    for key in TABLE_SUMMARIES if trained else ():
        cells = [format_number(galleries[g]["summary"][m][key]) or "n/a" for g, m, _ in columns]
        lines.append(SUMMARY_TITLES[key][:21].ljust(22) + "".join(cell.rjust(10) for cell in cells))
    return "\n".join(lines)
