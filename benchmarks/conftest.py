"""Collects the benchmark medians and prints / writes the summary tables (Banzhaf with its speed-up ratios and
instruction roofline, MaxSim with peak memory and GEMM roofline, the training methods' step cost, the evaluation at
COCO 5k size) to ``benchmarks/results/``."""
from __future__ import annotations

import datetime
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

RESULTS_KEY = pytest.StashKey[dict]()
MAXSIM_KEY = pytest.StashKey[dict]()
GPU_KEY = pytest.StashKey[dict]()
METHODS_KEY = pytest.StashKey[dict]()
EVAL_KEY = pytest.StashKey[dict]()
INSTRUCTIONS_KEY = pytest.StashKey[dict]()
RESULTS_FILE = Path(__file__).parent / "results" / "cpu_banzhaf.md"
MAXSIM_FILE = Path(__file__).parent / "results" / "cpu_maxsim.md"
EVAL_FILE = Path(__file__).parent / "results" / "cpu_eval.md"
PYTORCH_VARIANTS = ("torch", "reference", "per_pair")

# (label, size, mode, slower variant, target speed-up of "cpu" over it), one thread. Ratios compare the time per
# cell, which equals the ratio of medians wherever both variants ran the same number of draws.
RATIOS = (
    ("C++ vs reference, forward, anchor (per cell)", "anchor", "forward", "reference", 50),
    ("C++ vs reference, forward, clip (per cell)", "clip", "forward", "reference", 50),
    ("C++ vs reference, forward+backward, anchor (per cell)", "anchor", "forward+backward", "reference", 50),
    ("C++ vs torch backend, forward, anchor", "anchor", "forward", "torch", 3),
    ("C++ vs torch backend, forward, clip (per cell)", "clip", "forward", "torch", 3),
    ("C++ vs torch backend, forward+backward, anchor", "anchor", "forward+backward", "torch", 3),
    ("C++ vs per-pair textbook loop, per cell, anchor", "anchor", "forward", "per_pair", 1000),
)
# Instruction floor per cell (one draw of one interaction cell): 48 fp32 operations forward, 4× that forward and
# backward, in instructions of 8 float lanes (test_bench_banzhaf.py).
FLOOR_INSTRUCTIONS = {"forward": 6, "forward+backward": 24}
# Banzhaf acceptance: the C++ paired forward at the anchor, one thread, per (token pair, draw).
CPU_NS_PER_CELL_TARGET = 5.0

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
    """record(size, mode, variant, threads, median_s, min_s, extra_info): one Banzhaf row for the summary."""
    results = request.config.stash[RESULTS_KEY]

    def record(size, mode, variant, threads, median, minimum, extra_info):
        results[(size, mode, variant, threads)] = dict(extra_info, median_s=median, min_s=minimum)

    return record


@pytest.fixture
def maxsim_record(request):
    """record(size, mode, variant, threads, median_s, min_s, peak_bytes, floor_flops): one MaxSim row."""
    results = request.config.stash[MAXSIM_KEY]

    def record(size, mode, variant, threads, median, minimum, peak, flops):
        results[(size, mode, variant, threads)] = dict(median_s=median, min_s=minimum, peak_bytes=peak,
                                                       floor_flops=flops)

    return record


@pytest.fixture
def methods_record(request):
    """record(table, name, row): one row of the training-method summary (tables "step" and "dime_eval")."""
    results = request.config.stash[METHODS_KEY]

    def record(table, name, row):
        results.setdefault(table, {})[name] = row

    return record


@pytest.fixture
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
    if "step_vit_b16" in results:
        rounds = min(row["rounds"] for row in results["step_vit_b16"].values())
        rows = min(row["rows"] for row in results["step_vit_b16"].values())
        lines += ["", f"## One training step at ViT-B/16 sizes, task 2 (T = 77, V = 197, batch {rows}; {rounds} "
                  "interleaved rounds after a warm-up, 1 thread)", "",
                  "| method | rows per batch | CPU time per step | wall-clock | vs finetune (median of per-round "
                  "CPU-time ratios) |", "|---|---|---|---|---|"]
        for name, row in results["step_vit_b16"].items():
            lines.append(f"| {name} | {row['rows']} | {_format_time(row['cpu_s'])} | "
                         f"{_format_time(row['wall_s'])} | {row['ratio']:.2f}× |")
    if "dime_eval" in results:
        lines += ["", "## Scoring a gallery (tiny-model token sizes) with MaxSim, and with DIME re-ranking each "
                  "caption's and each image's top 16", "",
                  "| variant | captions × images | pairs through the DIME module | CPU time (median, 1 thread) | "
                  "wall-clock |", "|---|---|---|---|---|"]
        for name, row in results["dime_eval"].items():
            lines.append(f"| {name} | {row['gallery']} × {row['gallery']} | {row['pairs']} | "
                         f"{_format_time(row['cpu_s'])} | {_format_time(row['wall_s'])} |")
    _publish(terminalreporter, "training methods CPU benchmark summary",
             Path(__file__).parent / "results" / "cpu_methods.md", lines)


def _eval_summary(info: dict, metrics: dict) -> list[str]:
    mib = 2**20
    return [
        "| captions × images | torch threads | mean tokens per caption (padded in blocks) | scoring | metrics (both "
        "directions) | peak memory above the inputs | inputs (token features) |", "|---|---|---|---|---|---|---|",
        f"| {info['num_captions']:,} × {info['num_images']:,} | {info.get('threads', '?')} "
        f"| {info['mean_caption_tokens']:.1f} "
        f"({info['mean_padded_tokens']:.1f}) | {_format_time(info['scoring_s'])} | {_format_time(info['metrics_s'])} "
        f"| {info['peak_cpu_bytes'] / mib:,.0f} MiB | {info['feature_bytes'] / mib:,.0f} MiB |", "",
        "The peak holds the float32 score matrix (captions × images × 4 bytes) plus the chunked working memory of "
        "the scoring and of the metrics (which build the positives a row chunk at a time from each caption's image "
        "index); random features, so the recalls are chance level: "
        + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if k.endswith(("R@1", "MedR"))) + ".",
    ]


@pytest.fixture
def benchmark_enabled(request) -> bool:
    return not request.config.getoption("benchmark_disable")


@pytest.fixture(scope="session")
def banzhaf_instructions(request):
    """{"forward": instructions per cell} of the C++ paired forward (AVX2 version, anchor, one thread), counted by
    callgrind in a subprocess (a minute or two); None without valgrind or under --benchmark-disable. Stored for the
    summary."""
    if shutil.which("valgrind") is None or request.config.getoption("benchmark_disable"):
        return None
    here = Path(__file__).parent
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")]))
        done = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                               "--toggle-collect=*paired_forward_item_avx2_f32*", sys.executable,
                               str(here / "_callgrind_banzhaf.py")], capture_output=True, text=True, env=env,
                              timeout=1800)
        assert done.returncode == 0, done.stderr[-2000:]
        cells = int(re.search(r"cells (\d+)", done.stdout).group(1))
        collected = int(re.search(r"Collected : (\d+)", done.stderr).group(1))
    counts = {"forward": collected / cells}
    request.config.stash[INSTRUCTIONS_KEY] = counts
    return counts


def blas_gemm_rate(threads: int) -> float:
    """FLOP/s of torch.mm (the BLAS behind the torch backend) on a 2048×512 @ 512×2048 fp32 product, best of 5."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        a, b = torch.randn(2048, 512, generator=gen), torch.randn(512, 2048, generator=gen)
        out = torch.empty(2048, 2048)
        torch.mm(a, b, out=out)
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            torch.mm(a, b, out=out)
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return 2 * 2048 * 512 * 2048 / best


def _speed_ratio(reference_s: float, variant_s: float) -> str:
    """"2.5× faster" or "1.9× slower": the variant's time against the reference's, always a ratio >= 1."""
    ratio = reference_s / variant_s
    return f"{ratio:.3g}× faster" if ratio >= 1 else f"{1 / ratio:.3g}× slower"


def _versus_best(best: float | None, value: float, is_pytorch: bool) -> str:
    """The speed ratio against the best PyTorch variant; "best PyTorch" for that variant itself."""
    if best is None:
        return "n/a"
    if is_pytorch and value == best:
        return "best PyTorch"
    return _speed_ratio(best, value)


def _maxsim_summary(results: dict) -> list[str]:
    threads_used = sorted({key[3] for key in results})
    rates = {threads: blas_gemm_rate(threads) for threads in threads_used}
    lines = [f"BLAS GEMM rate measured in this run (`torch.mm`, 2048×512 @ 512×2048, fp32, best of 5): "
             + ", ".join(f"{rates[t] / 1e9:.1f} GFLOP/s at {t} thread{'s' if t > 1 else ''}" for t in threads_used),
             "", "| size | mode | variant | threads | median | min | peak memory | vs best PyTorch variant | "
             "GEMM floor | fraction of floor |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (size, mode, variant, threads), row in results.items():
        pytorch = [r for (s, m, v, t), r in results.items() if (s, m, t) == (size, mode, threads) and v != "cpu"]
        best = min((r["median_s"] for r in pytorch), default=None)
        versus = _versus_best(best, row["median_s"], variant != "cpu")
        floor_s = row["floor_flops"] / rates[threads]
        lines.append(f"| {size} | {mode} | {variant} | {threads} | {_format_time(row['median_s'])} | "
                     f"{_format_time(row['min_s'])} | {row['peak_bytes'] / 2**20:.2f} MiB | {versus} | "
                     f"{_format_time(floor_s)} | {floor_s / row['median_s']:.3g} |")
    lines += ["", "| acceptance (one thread) | measured | target | met |", "|---|---|---|---|"]

    def row(size, variant):
        return results.get((size, SIZES_MODES[size], variant, 1))

    checks = []
    cpu, torch_row = row("gallery", "cpu"), row("gallery", "torch")
    if cpu and torch_row:
        ratio = torch_row["median_s"] / cpu["median_s"]
        checks.append(("gallery forward: C++ vs torch backend", f"{ratio:.2f}× faster", "≥ 1.3×", ratio >= 1.3))
    cpu, ref, torch_row = row("batch", "cpu"), row("batch", "reference"), row("batch", "torch")
    if cpu and ref:
        ratio = ref["peak_bytes"] / cpu["peak_bytes"]
        checks.append(("batch forward+backward: peak memory, einsum vs C++", f"{ratio:.1f}× lower", "≥ 10×",
                       ratio >= 10))
    if cpu and torch_row:
        ratio = torch_row["median_s"] / cpu["median_s"]
        checks.append(("batch forward+backward: C++ vs torch backend", f"{ratio:.2f}× faster", "> 1×", ratio > 1))
    for label, measured, target, met in checks:
        lines.append(f"| {label} | {measured} | {target} | {'yes' if met else 'NO'} |")
    lines += ["", "GEMM floor: 2·Bt·Bi·T·V·D FLOPs (forward), 4× that (forward+backward), at the BLAS rate above for "
              "the row's thread count. vs best PyTorch variant: against the faster of the torch backend and the "
              "einsum reference at the same size, mode and thread count."]
    return lines


SIZES_MODES = {"batch": "forward+backward", "gallery": "forward"}


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
        f"- CPU: {cpu_model}, {os.cpu_count()} logical cores; torch threads as given per row; "
        f"instruction set of the C++ kernels: {cbd_fast.build_info().get('cpu_isa')} (Banzhaf: at most avx2)",
        f"- load average (1/5/15 min) at start: {config.stash[LOAD_AT_START_KEY]}; at end: {_load_average()} "
        "(the start value is taken before any benchmark runs: well above 0 means other processes were competing "
        "for the cores)",
        f"- python {platform.python_version()}, torch {torch.__version__}",
        f"- cbd_fast.build_info(): `{cbd_fast.build_info()}`",
        f"- git commit: {commit}",
    ]


def _summary(results: dict, instructions: dict | None) -> list[str]:
    # Instruction rate of this machine on the C++ kernel: callgrind's count over the measured time per cell.
    anchor = results.get(("anchor", "forward", "cpu", 1))
    rate = instructions["forward"] / anchor["ns_per_cell"] if instructions and anchor else None  # per ns
    lines = ["| size | mode | variant | threads | B | T | V | K | rounds | median | ns / cell | vs best PyTorch variant "
             "| fraction of floor |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (size, mode, variant, threads), row in results.items():
        pytorch = [r for (s, m, v, t), r in results.items()
                   if (s, m, t) == (size, mode, threads) and v in PYTORCH_VARIANTS]
        best = min((r["ns_per_cell"] for r in pytorch), default=None)
        versus = _versus_best(best, row["ns_per_cell"], variant in PYTORCH_VARIANTS)
        fraction = (f"{FLOOR_INSTRUCTIONS[mode] / (rate * threads) / row['ns_per_cell']:.3g}"
                    if rate is not None else "n/a")
        batch = f"{row['B']} (1 of the batch)" if variant == "per_pair" else row["B"]
        lines.append(f"| {size} | {mode} | {variant} | {threads} | {batch} | {row['T']} | {row['V']} | {row['K']} | "
                     f"{row['rounds']} | {_format_time(row['median_s'])} | {row['ns_per_cell']:.4g} | {versus} | "
                     f"{fraction} |")
    lines += ["", "| speed-up of C++ (`cpu`), one thread | ratio | target | met |", "|---|---|---|---|"]
    for label, size, mode, other, target in RATIOS:
        fast, slow = results.get((size, mode, "cpu", 1)), results.get((size, mode, other, 1))
        if fast is None or slow is None:
            lines.append(f"| {label} | n/a (not run) | ≥ {target}× | |")
            continue
        ratio = slow["ns_per_cell"] / fast["ns_per_cell"]
        lines.append(f"| {label} | {ratio:.1f}× | ≥ {target}× | {'yes' if ratio >= target else 'NO'} |")
    if anchor:
        met = anchor["ns_per_cell"] <= CPU_NS_PER_CELL_TARGET
        lines.append(f"| C++ forward, anchor: ns per (token pair, draw) | {anchor['ns_per_cell']:.3g} ns | "
                     f"≤ {CPU_NS_PER_CELL_TARGET:g} ns | {'yes' if met else 'NO'} |")
    lines += ["", "ns / cell = median / (K·B·T·V): one draw of one interaction cell (t, u) of one pair (for the per-pair "
              "loop: median / (K·T·V), the same unit of work). vs best PyTorch variant: against the fastest of the "
              "torch backend, the reference and the per-pair loop at the same size, mode and thread count, per cell."]
    if instructions:
        lines.append(f"Instruction floor: {FLOOR_INSTRUCTIONS['forward']} instructions per cell forward, "
                     f"{FLOOR_INSTRUCTIONS['forward+backward']} forward+backward (48 and 192 fp32 operations in "
                     f"8-lane AVX2 instructions). callgrind counts {instructions['forward']:.1f} instructions per "
                     f"cell in the C++ forward (AVX2 version, anchor, K=256, one thread), i.e. "
                     f"{rate:.3g} instructions per ns at its median; fraction of floor = the floor instructions at "
                     f"that rate (× threads) / the row's time per cell.")
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
    _publish(terminalreporter, f"GPU benchmark summary ({device})",
             Path(__file__).parent / "results" / f"gpu_{device.replace(' ', '_').lower()}.md", lines)


def _write_eval_summary(terminalreporter, config) -> None:
    results = config.stash.get(EVAL_KEY, {})
    if not results:
        return
    header = ["# CPU benchmark: retrieval evaluation at COCO 5k test size (25k captions × 5k images, vit_b32 token "
              "features: D=512, V=50; benchmarks/test_bench_eval.py)", "", *_machine_info(config), ""]
    _publish(terminalreporter, "evaluation CPU benchmark summary", EVAL_FILE,
             _eval_summary(results["info"], results["metrics"]), header)


def _publish(terminalreporter, title: str, path: Path, lines: list[str], header: list[str] | tuple = ()) -> None:
    """Print ``lines`` under ``title`` and write ``header`` + ``lines`` to ``path``."""
    terminalreporter.write_sep("=", title)
    for line in lines:
        terminalreporter.write_line(line)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([*header, *lines, ""]), encoding="utf-8")
    terminalreporter.write_line(f"written to {path}")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    _write_gpu_summary(terminalreporter, config)
    _write_methods_summary(terminalreporter, config)
    _write_eval_summary(terminalreporter, config)
    maxsim_results = config.stash.get(MAXSIM_KEY, {})
    if maxsim_results:
        header = ["# CPU benchmark: cbd_fast.maxsim (fp32, wti; batch: forward+backward Bt=Bi=64, T=32, V=50, D=256; "
                  "gallery: forward Bt=Bi=256, T=77, V=50, D=512)", "", *_machine_info(config), ""]
        _publish(terminalreporter, "MaxSim CPU benchmark summary (medians)", MAXSIM_FILE,
                 _maxsim_summary(maxsim_results), header)
    results = config.stash.get(RESULTS_KEY, {})
    if not results:
        return
    header = ["# CPU benchmark: cbd_fast.banzhaf_interaction (paired, fp32)", "", *_machine_info(config), ""]
    _publish(terminalreporter, "Banzhaf CPU benchmark summary (medians)", RESULTS_FILE,
             _summary(results, config.stash.get(INSTRUCTIONS_KEY, None)), header)
