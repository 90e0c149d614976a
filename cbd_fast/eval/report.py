"""Run outputs: metrics.json, metrics.csv, the accuracy-matrix heatmap and per-task curves, a terminal table."""
from __future__ import annotations

import csv
import json
import math
import os
import pathlib
import tempfile
from typing import Any


def _write_text_atomic(path: pathlib.Path, text: str) -> None:
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(handle, "w") as stream:
        stream.write(text)
    os.replace(tmp, path)


def write_reports(run_dir: pathlib.Path, document: dict[str, Any], plot_metric: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_text_atomic(run_dir / "metrics.json", json.dumps(document, indent=1))
    rows = []
    for entry in document["per_task_results"]:
        for task_index, metrics in enumerate(entry["results"]):
            rows.append({"after_task": entry["after_task"], "eval_task": task_index,
                         "eval_task_name": document["tasks"][task_index], **metrics})
    if rows:
        with (run_dir / "metrics.csv").open("w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    if plot_metric in document["accuracy_matrices"]:
        plot_accuracy(run_dir, document, plot_metric)


def plot_accuracy(run_dir: pathlib.Path, document: dict[str, Any], metric: str) -> None:
    """accuracy_matrix.png (after task i × evaluated task j) and task_curves.png (each task across the sequence)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = document["accuracy_matrices"][metric]
    names = document["tasks"]
    trained = len(matrix)
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2.5, 0.9 * trained + 2))
    image = ax.imshow(matrix, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.1f}", ha="center", va="center", color="white" if value < 60 else "black",
                    fontsize=9)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(trained), [f"after {names[i]}" for i in range(trained)])
    ax.set_xlabel("evaluated task")
    ax.set_title(f"{document['name']}: {metric}")
    fig.colorbar(image, ax=ax, label=metric)
    fig.tight_layout()
    fig.savefig(run_dir / "accuracy_matrix.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for j, name in enumerate(names):
        points = [(i, matrix[i][j]) for i in range(j, trained)]
        if points:
            ax.plot([p[0] + 1 for p in points], [p[1] for p in points], marker="o", label=name)
    ax.set_xlabel("tasks trained")
    ax.set_ylabel(metric)
    ax.set_xticks(range(1, trained + 1))
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{document['name']}: each task across the sequence")
    fig.tight_layout()
    fig.savefig(run_dir / "task_curves.png", dpi=110)
    plt.close(fig)


def format_table(document: dict[str, Any], metrics: tuple[str, ...] = ("t2i_R@1", "i2t_R@1", "mean_R@1")) -> str:
    """Per-task results after the last trained task, then average, forgetting and backward transfer."""
    if not document["per_task_results"]:
        return "no task finished yet"
    last = document["per_task_results"][-1]
    trained = last["after_task"] + 1
    metrics = tuple(m for m in metrics if m in last["results"][0])
    lines = [f"results after task {trained}/{len(document['tasks'])} ({document['name']})",
             "task".ljust(18) + "".join(m.rjust(11) for m in metrics)]
    for j in range(trained):
        lines.append(document["tasks"][j][:17].ljust(18) +
                     "".join(f"{last['results'][j][m]:11.2f}" for m in metrics))
    for key, label in (("final_average", "average"), ("forgetting", "forgetting"),
                       ("backward_transfer", "backward transfer")):
        values = [document["summary"][m][key] for m in metrics]
        lines.append(label.ljust(18) + "".join("        n/a" if math.isnan(v) else f"{v:11.2f}" for v in values))
    return "\n".join(lines)
