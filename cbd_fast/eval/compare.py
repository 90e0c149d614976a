"""Compare finished runs: mean ± std over seeds of final average, forgetting and time per epoch.

    python -m cbd_fast.eval.compare runs/finetune_s0 runs/finetune_s1 runs/cbd_s0 ...

Runs whose names differ only in a trailing ``_s<seed>`` form one group (one row of the table).
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import re
import statistics

COLUMNS = (("mean_R@1", "final_average", "avg R@1"), ("mean_R@1", "forgetting", "forgetting R@1"),
           ("t2i_mAP", "final_average", "avg mAP"), ("t2i_mAP", "forgetting", "forgetting mAP"))


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "n/a"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {std:.1f}"


def compare(run_dirs: list[pathlib.Path]) -> str:
    """A markdown table, one row per group of seeds, in the order the groups first appear."""
    groups: dict[str, list[dict]] = {}
    for run_dir in run_dirs:
        document = json.loads((run_dir / "metrics.json").read_text())
        group = re.sub(r"_s\d+$", "", document["name"])
        groups.setdefault(group, []).append(document)
    header = ["method", "seeds", *(label for _, _, label in COLUMNS), "s / epoch"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group, documents in groups.items():
        cells = [group, str(len(documents))]
        for metric, key, _ in COLUMNS:
            cells.append(_mean_std([d["summary"][metric][key] for d in documents if metric in d["summary"]]))
        cells.append(_mean_std([statistics.mean(d["seconds_per_epoch"]) for d in documents]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=pathlib.Path, help="run folders holding metrics.json")
    args = parser.parse_args(argv)
    print(compare(args.runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
