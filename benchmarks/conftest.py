"""Collects the benchmark medians and prints / writes the summary tables (Banzhaf with its speed-up ratios, MaxSim
with peak memory, the training methods' step cost) to ``benchmarks/results/``."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

import pytest
import torch

RESULTS_KEY = pytest.StashKey[dict]()
MAXSIM_KEY = pytest.StashKey[dict]()
GPU_KEY = pytest.StashKey[dict]()
METHODS_KEY = pytest.StashKey[dict]()
EVAL_KEY = pytest.StashKey[dict]()
RESULTS_FILE = Path(__file__).parent / "results" / "cpu_banzhaf.md"
MAXSIM_FILE = Path(__file__).parent / "results" / "cpu_maxsim.md"
EVAL_FILE = Path(__file__).parent / "results" / "cpu_eval.md"

# (label, size, mode, slower variant, target speed-up of "cpu" over it). Ratios compare per-draw times, which
# equal the ratio of medians wherever both variants ran the same number of draws.
RATIOS = (
    ("C++ vs reference, forward, anchor (same K)", "anchor", "forward", "reference", 50),
    ("C++ vs reference, forward, clip (per draw)", "clip", "forward", "reference", 50),
    ("C++ vs reference, forward+backward, anchor (per draw)", "anchor", "forward+backward", "reference", 50),
    ("C++ vs torch backend, forward, anchor", "anchor", "forward", "torch", 3),
    ("C++ vs torch backend, forward, clip", "clip", "forward", "torch", 3),
    ("C++ vs torch backend, forward+backward, anchor", "anchor", "forward+backward", "torch", 3),
    ("C++ vs per-pair textbook loop, per draw of a whole T×V map, anchor", "anchor", "forward", "per_pair", 1000),
)


LOAD_AT_START_KEY = pytest.StashKey[str]()


def _load_average() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def pytest_configure(config):
    config.stash[RESULTS_KEY] = {}
    config.stash[MAXSIM_KEY] = {}
    config.stash[GPU_KEY] = {}
    config.stash[METHODS_KEY] = {}
    config.stash[EVAL_KEY] = {}
    config.stash[LOAD_AT_START_KEY] = _load_average()


@pytest.fixture
def bench_record(request):
    """record(size, mode, variant, median_s, min_s, extra_info): keep one measured row for the session summary."""
    results = request.config.stash[RESULTS_KEY]

    def record(size, mode, variant, median, minimum, extra_info):
        results[(size, mode, variant)] = dict(extra_info, median_s=median, min_s=minimum)

    return record


@pytest.fixture
def maxsim_record(request):
    """record(variant, median_s, min_s, peak_bytes): one MaxSim row for the session summary."""
    results = request.config.stash[MAXSIM_KEY]

    def record(variant, median, minimum, peak):
        results[variant] = dict(median_s=median, min_s=minimum, peak_bytes=peak)

    return record


@pytest.fixture
def methods_record(request):
    """record(table, name, row): one row of the training-method summary (tables "step" and "dime_eval")."""
    results = request.config.stash[METHODS_KEY]

    def record(table, name, row):
        results.setdefault(table, {})[name] = row
def eval_record(request):
    """record(info, metrics): the evaluation benchmark's measurements (extra_info) and its metrics."""
    results = request.config.stash[EVAL_KEY]

    def record(info, metrics):
        results.update(info=info, metrics=metrics)

    return record


def _write_methods_summary(terminalreporter, config) -> None:
    results = config.stash.get(METHODS_KEY, {})
    if not results:
        return
    lines = ["# CPU benchmark: per-step cost of the training methods (`benchmarks/test_bench_methods.py`)", "",
             *_machine_info(config),
             "- the machine is a 2-core CPU shared with other jobs: wall-clock times move with its load, so the "
             "costs are process CPU times with one torch thread, from interleaved sweeps (one step of every method "
             "per round, same batch)", ""]
    if "step" in results:
        lines += ["## One training step at the default config, task 2 (medians over rounds, 1 thread)", "",
                  "| method | rows per batch | CPU time per step | wall-clock | vs finetune (median of per-round "
                  "CPU-time ratios) |", "|---|---|---|---|---|"]
        for name, row in results["step"].items():
            lines.append(f"| {name} | {row['rows']} | {_format_time(row['cpu_s'])} | "
                         f"{_format_time(row['wall_s'])} | {row['ratio']:.2f}× |")
        lines += ["", "Rows: 32 current samples, plus 16 replayed for `er` and `alta` (their default buffer)."]
    if "dime_eval" in results:
        lines += ["", "## Scoring a gallery (tiny-model token sizes) with MaxSim, and with DIME re-ranking each "
                  "caption's and each image's top 16", "",
                  "| variant | captions × images | pairs through the DIME module | CPU time (median, 1 thread) | "
                  "wall-clock |", "|---|---|---|---|---|"]
        for name, row in results["dime_eval"].items():
            lines.append(f"| {name} | {row['gallery']} × {row['gallery']} | {row['pairs']} | "
                         f"{_format_time(row['cpu_s'])} | {_format_time(row['wall_s'])} |")
    terminalreporter.write_sep("=", "training methods CPU benchmark summary")
    for line in lines:
        terminalreporter.write_line(line)
    path = Path(__file__).parent / "results" / "cpu_methods.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    terminalreporter.write_line(f"written to {path}")
def _eval_summary(info: dict, metrics: dict) -> list[str]:
    mib = 2**20
    return [
        "| captions × images | mean tokens per caption (padded in blocks) | scoring | metrics (both directions) | "
        "peak memory above the inputs | inputs (token features) |", "|---|---|---|---|---|---|",
        f"| {info['num_captions']:,} × {info['num_images']:,} | {info['mean_caption_tokens']:.1f} "
        f"({info['mean_padded_tokens']:.1f}) | {_format_time(info['scoring_s'])} | {_format_time(info['metrics_s'])} "
        f"| {info['peak_cpu_bytes'] / mib:,.0f} MiB | {info['feature_bytes'] / mib:,.0f} MiB |", "",
        "The peak holds the float32 score matrix (captions × images × 4 bytes) and the positive mask (1 byte per "
        "entry) plus the chunked working memory; random features, so the recalls are chance level: "
        + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if k.endswith(("R@1", "MedR"))) + ".",
    ]


def _maxsim_summary(results: dict) -> list[str]:
    lines = ["| variant | median | min | peak memory | time vs C++ | memory vs C++ |", "|---|---|---|---|---|---|"]
    fast = results.get("cpu")
    for variant, row in results.items():
        time_ratio = f"{row['median_s'] / fast['median_s']:.2f}×" if fast else "n/a"
        memory_ratio = f"{row['peak_bytes'] / fast['peak_bytes']:.1f}×" if fast and fast["peak_bytes"] else "n/a"
        lines.append(f"| {variant} | {_format_time(row['median_s'])} | {_format_time(row['min_s'])} | "
                     f"{row['peak_bytes'] / 2**20:.2f} MiB | {time_ratio} | {memory_ratio} |")
    return lines


def _format_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _machine_info(config) -> list[str]:
    cpu_model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import cbd_fast

    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    if _git("status", "--porcelain", "--untracked-files=no"):
        commit += " (working tree has uncommitted changes)"
    return [
        f"- command: `pytest {' '.join(config.invocation_params.args)}`",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- CPU: {cpu_model}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}",
        f"- load average (1/5/15 min) at start: {config.stash[LOAD_AT_START_KEY]}; at end: {_load_average()} "
        "(the start value is taken before any benchmark runs: well above 0 means other processes were competing "
        "for the cores)",
        f"- python {platform.python_version()}, torch {torch.__version__}",
        f"- cbd_fast.build_info(): `{cbd_fast.build_info()}`",
        f"- git commit: {commit}",
    ]


def _summary(results: dict) -> list[str]:
    lines = ["| size | mode | variant | B | T | V | K | rounds | median | min | per draw (µs, median) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (size, mode, variant), row in results.items():
        batch = f"{row['B']} (1 of the batch)" if variant == "per_pair" else row["B"]
        lines.append(f"| {size} | {mode} | {variant} | {batch} | {row['T']} | {row['V']} | {row['K']} | "
                     f"{row['rounds']} | {_format_time(row['median_s'])} | {_format_time(row['min_s'])} | "
                     f"{row['per_draw_us']:.4g} |")
    lines += ["", "| speed-up of C++ (`cpu`) | ratio | target | met |", "|---|---|---|---|"]
    for label, size, mode, other, target in RATIOS:
        fast, slow = results.get((size, mode, "cpu")), results.get((size, mode, other))
        if fast is None or slow is None:
            lines.append(f"| {label} | n/a (not run) | ≥ {target}× | |")
            continue
        ratio = slow["per_draw_us"] / fast["per_draw_us"]
        lines.append(f"| {label} | {ratio:.1f}× | ≥ {target}× | {'yes' if ratio >= target else 'NO'} |")
    lines += ["", "Per draw = median / (K·B) for batched variants (one coalition draw of one image-text pair); for "
              "the per-pair loop = median / (K·pairs) × (T·V), the same unit of work. Ratios are per draw; they "
              "equal the ratio of medians where K and B agree."]
    return lines


def _gpu_banzhaf_summary(results: dict) -> list[str]:
    lines = ["| size | dtype | variant | B | K | median | per draw (µs) | floor | fraction of floor |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (size, dtype, variant), row in results.items():
        lines.append(f"| {size} | {dtype} | {variant} | {row['B']} | {row['K']} | {_format_time(row['median_s'])} | "
                     f"{row['per_draw_us']:.4g} | {_format_time(row['floor_s'])} | "
                     f"{row['fraction_of_floor']:.3g} |")
    lines += ["", "| size | dtype | fastest fused | vs other fused | vs torch backend (per draw) | "
              "vs per-pair loop (per draw) |", "|---|---|---|---|---|---|"]
    for size, dtype in dict.fromkeys((size, dtype) for size, dtype, _ in results):
        fused = {v: results[(size, dtype, v)] for v in ("triton", "cuda") if (size, dtype, v) in results}
        if not fused:
            continue
        best = min(fused, key=lambda v: fused[v]["per_draw_us"])
        cells = [f"{best} ({_format_time(fused[best]['median_s'])})"]
        other = [v for v in fused if v != best]
        cells.append(f"{fused[other[0]]['per_draw_us'] / fused[best]['per_draw_us']:.2f}× slower ({other[0]})"
                     if other else "n/a")
        for slow in ("torch", "per_pair"):
            row = results.get((size, dtype, slow))
            cells.append(f"{row['per_draw_us'] / fused[best]['per_draw_us']:.3g}×" if row else "n/a")
        lines.append(f"| {size} | {dtype} | " + " | ".join(cells) + " |")
    return lines


def _speed_ratio(reference_s: float, variant_s: float) -> str:
    """"2.5× faster" or "1.9× slower": the variant's time against the reference's, always a ratio >= 1."""
    ratio = reference_s / variant_s
    return f"{ratio:.3g}× faster" if ratio >= 1 else f"{1 / ratio:.3g}× slower"


def _gpu_maxsim_summary(results: dict) -> list[str]:
    lines = ["| size | dtype | mode | variant | median | peak memory | floor | fraction of floor | time vs reference "
             "| memory vs reference |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (size, dtype, mode, variant), row in results.items():
        ref = results.get((size, dtype, mode, "reference"))
        time_ratio = _speed_ratio(ref["median_s"], row["median_s"]) if ref else "n/a"
        memory_ratio = f"{ref['peak_bytes'] / max(row['peak_bytes'], 1):.1f}× less" if ref else "n/a"
        lines.append(f"| {size} | {dtype} | {mode} | {variant} | {_format_time(row['median_s'])} | "
                     f"{row['peak_bytes'] / 2**20:.1f} MiB | {_format_time(row['floor_s'])} | "
                     f"{row['fraction_of_floor']:.3g} | {time_ratio} | {memory_ratio} |")
    return lines


def _write_gpu_summary(terminalreporter, config) -> None:
    results = config.stash.get(GPU_KEY, {})
    if not results:
        return
    import triton

    device = torch.cuda.get_device_name()
    lines = [f"# GPU benchmark on {device}", "", *_machine_info(config),
             f"- GPU: {device}, CUDA runtime {torch.version.cuda}, triton {triton.__version__}", ""]
    if "banzhaf" in results:
        lines += ["## Fused paired Banzhaf pass (`banzhaf_interaction_from_tokens`, `_sim` = on a given sim)", "",
                  *_gpu_banzhaf_summary(results["banzhaf"]), ""]
    if "maxsim" in results:
        lines += ["## MaxSim (`maxsim`, wti)", "", *_gpu_maxsim_summary(results["maxsim"]), ""]
    terminalreporter.write_sep("=", f"GPU benchmark summary ({device})")
    for line in lines:
        terminalreporter.write_line(line)
    path = Path(__file__).parent / "results" / f"gpu_{device.replace(' ', '_').lower()}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    terminalreporter.write_line(f"written to {path}")


def _write_eval_summary(terminalreporter, config) -> None:
    results = config.stash.get(EVAL_KEY, {})
    if not results:
        return
    lines = _eval_summary(results["info"], results["metrics"])
    terminalreporter.write_sep("=", "evaluation CPU benchmark summary")
    for line in lines:
        terminalreporter.write_line(line)
    header = ["# CPU benchmark: retrieval evaluation at COCO 5k test size (25k captions × 5k images, vit_b32 token "
              "features: D=512, V=50; benchmarks/test_bench_eval.py)", "", *_machine_info(config), ""]
    EVAL_FILE.parent.mkdir(parents=True, exist_ok=True)
    EVAL_FILE.write_text("\n".join([*header, *lines, ""]), encoding="utf-8")
    terminalreporter.write_line(f"written to {EVAL_FILE}")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    _write_gpu_summary(terminalreporter, config)
    _write_methods_summary(terminalreporter, config)
    _write_eval_summary(terminalreporter, config)
    maxsim_results = config.stash.get(MAXSIM_KEY, {})
    if maxsim_results:
        lines = _maxsim_summary(maxsim_results)
        terminalreporter.write_sep("=", "MaxSim CPU benchmark summary (forward+backward, medians)")
        for line in lines:
            terminalreporter.write_line(line)
        header = ["# CPU benchmark: cbd_fast.maxsim forward+backward (Bt=Bi=64, T=32, V=50, D=256, wti, fp32)", "",
                  *_machine_info(config), ""]
        MAXSIM_FILE.parent.mkdir(parents=True, exist_ok=True)
        MAXSIM_FILE.write_text("\n".join([*header, *lines, ""]), encoding="utf-8")
        terminalreporter.write_line(f"written to {MAXSIM_FILE}")
    results = config.stash.get(RESULTS_KEY, {})
    if not results:
        return
    lines = _summary(results)
    terminalreporter.write_sep("=", "Banzhaf CPU benchmark summary (medians)")
    for line in lines:
        terminalreporter.write_line(line)
    RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    header = ["# CPU benchmark: cbd_fast.banzhaf_interaction (paired, fp32)", "",
              *_machine_info(config), ""]
    RESULTS_FILE.write_text("\n".join([*header, *lines, ""]), encoding="utf-8")
    terminalreporter.write_line(f"written to {RESULTS_FILE}")
