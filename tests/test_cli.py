"""cbd-train as a user runs it: one subprocess per command line, on a CI-sized config."""
import errno
import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch
import yaml
from tqdm import tqdm

import cbd_fast
from cbd_fast import cli
from cbd_fast.train import checkpoint
from cbd_fast.train.loop import progress_label, progress_postfix
from test_train_e2e import TINY

CBD_TRAIN = shutil.which("cbd-train", path=str(pathlib.Path(sys.executable).parent)) or "cbd-train"
REPO = pathlib.Path(__file__).resolve().parents[1]


def run(*command, cwd, env=None, timeout=300):
    return subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_help_answers_without_torch_and_print_config_resolves(tmp_path):
    probe = ("import sys\n"
             "from cbd_fast.cli import train_main\n"
             "try:\n"
             "    train_main(['--help'])\n"
             "except SystemExit:\n"
             "    pass\n"
             "print('torch imported:', 'torch' in sys.modules)\n")
    result = run(sys.executable, "-c", probe, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "torch imported: False" in result.stdout and "--print-config" in result.stdout
    # --print-config: overrides on both sides of a flag (intermixed), the method's arguments completed
    result = run(sys.executable, "-m", "cbd_fast.cli", "train.epochs=3", "--name", "n", "method_args.banzhaf=0.5",
                 "--print-config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert (printed["name"], printed["train"]["epochs"], printed["method_args"]["banzhaf"]) == ("n", 3, 0.5)
    assert printed["train"]["lr"] == 5.0e-4 and printed["threads"] == 1  # configs/default.yaml's values
    assert printed["method"] == "cbd" and printed["method_args"]["banzhaf_samples"] == 64  # the method's default


@pytest.mark.parametrize("arguments, message", [
    (["method_args.banzaf=1"], "unknown config key 'method_args.banzaf' for method 'cbd' (did you mean 'method_args.banzhaf'?)"),
    (["train.epochs=0"], "config key 'train.epochs' must be an integer ≥ 1, got 0"),
    (["--config", "missing.yaml"], "config file not found: missing.yaml"),
    (["data=missing.yaml"], "scenario file not found: missing.yaml"),
])
def test_user_errors_print_one_line_and_exit_2(tmp_path, arguments, message):
    result = run(CBD_TRAIN, *arguments, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(f"cbd-train: error: {message}") and result.stderr.count("\n") == 1
    assert not (tmp_path / "runs").exists()
    debug = run(CBD_TRAIN, *arguments, "--debug", cwd=tmp_path)
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_file_system_errors_are_named(capsys, tmp_path):
    path = tmp_path / "runs" / "x" / "checkpoints" / "last.pt"

    def full_disk():
        checkpoint.save_atomic({"w": torch.ones(3)}, path)
        return 0

    def write_fails(obj, stream):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "save", write_fails)
        assert cli._report_errors("cbd-train", False, full_disk) == 1
    assert capsys.readouterr().err == (f"cbd-train: error: no space left on device (ENOSPC) while writing {path}; "
                                       f"the previous version of the file, if any, is intact\n")

    def read_only():
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "runs"))

    assert cli._report_errors("cbd-train", False, read_only) == 1
    assert capsys.readouterr().err == f"cbd-train: error: Permission denied (EACCES): {tmp_path / 'runs'}\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_no_cuda_is_a_user_error(tmp_path):
    result = run(CBD_TRAIN, "--device", "cuda", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr == "cbd-train: error: device='cuda' but no CUDA device is visible to torch; use " \
                            "device=cpu (or auto)\n"


@pytest.mark.skipif(not cbd_fast.has_extension(), reason="training uses the compiled ops")
def test_a_logged_run_with_a_scenario_file_then_the_same_command_again(tmp_path):
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text(yaml.safe_dump(dict(TINY["data"], num_tasks=3)))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({k: v for k, v in TINY.items() if k != "data"}))
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    device = "cuda" if torch.cuda.is_available() else "cpu"  # what device=auto picks
    command = [CBD_TRAIN, "data.num_tasks=2", "--config", config, f"data={scenario}", "--threads", "2", "device=auto"]
    # stderr is a pipe (a redirected log): no bars, one line per epoch
    result = run(*command, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr
    epoch_lines = [line for line in result.stderr.splitlines() if " epoch " in line]
    assert [line.split()[1:5] for line in epoch_lines] == [
        ["task", f"{t}/2", "epoch", f"{e}/2"] for t in (1, 2) for e in (1, 2)]
    assert "prompt_key_cos=" in epoch_lines[0] and "prompt_pull" not in result.stderr
    assert f"device {device}; 2 CPU thread(s) (OMP_WAIT_POLICY=PASSIVE)" in result.stderr
    run_dir = tmp_path / "runs" / "e2e"
    recorded = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert recorded["data"] == dict(TINY["data"], num_tasks=2, workers=0)
    assert recorded["device"] == device  # the device in use, not "auto"
    document = json.loads((run_dir / "metrics.json").read_text())
    assert document["threads"] == 2 and len(document["tasks"]) == 2
    finished = (run_dir / "metrics.json").read_bytes()

    # the same command again: refused, the run is finished and stays as it was
    again = run(*command, cwd=tmp_path, env=env)
    assert again.returncode == 2 and again.stderr.count("\n") == 1, again.stderr
    assert again.stderr.startswith(f"cbd-train: error: run folder {pathlib.Path('runs', 'e2e')} already holds a run, "
                                   "finished (2/2 tasks trained); there is nothing to continue (--resume only prints "
                                   "its results table): --overwrite deletes it and trains again, --name NAME")
    # --resume: says it is finished and prints the table; the user's own OMP_WAIT_POLICY is kept, not made passive
    resumed = run(*command, "--resume", cwd=tmp_path, env=dict(env, OMP_WAIT_POLICY="ACTIVE"))
    assert resumed.returncode == 0, resumed.stderr
    assert "the run is finished (all 2 tasks trained); nothing to resume" in resumed.stderr
    assert "resuming" not in resumed.stderr and "forgetting" in resumed.stdout
    assert f"device {device}; 2 CPU thread(s) (OMP_WAIT_POLICY=ACTIVE)" in resumed.stderr
    # --resume under another config: refused, naming what differs
    changed = run(*command, "--resume", "train.lr=0.01", cwd=tmp_path, env=env)
    assert changed.returncode == 2, changed.stderr
    assert "another config, which --resume cannot continue; differences (checkpoint -> now): train.lr: 0.0005 -> " \
           "0.01." in changed.stderr and "Traceback" not in changed.stderr
    assert (run_dir / "metrics.json").read_bytes() == finished


def test_progress_bar_keeps_its_width_at_120_columns():
    line = tqdm.format_meter(4, 10, 3.2, ncols=120, prefix=progress_label(1, 3, 11, 60),
                             postfix=progress_postfix(12.3456))
    assert len(line) <= 120 and "loss=12.346" in line
    bar = line[line.index("|") + 1:line.rindex("|")]
    assert len(bar) >= 40  # a third of the line shows progress (four loss terms used to leave a few characters)


def test_source_tree_import_warns_once_naming_the_path(tmp_path):
    # a checkout without a build: the package folder without its compiled extension, next to setup.py and csrc/
    tree = tmp_path / "checkout"
    shutil.copytree(REPO / "cbd_fast", tree / "cbd_fast",
                    ignore=shutil.ignore_patterns("_C*.so", "_C*.pyd", "__pycache__"))
    (tree / "setup.py").write_text("")
    (tree / "csrc").mkdir()
    site = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    probe = ("import sys, warnings\n"
             f"sys.path[:0] = [''] + {site!r}\n"
             "warnings.simplefilter('default')\n"
             "import cbd_fast\n"
             "assert not cbd_fast.has_extension() and not cbd_fast.has_extension()\n"
             "print(cbd_fast.build_info()['extension_error'])\n")
    # -S: no site hooks, so an editable install's finder cannot supply the extension from elsewhere
    result = run(sys.executable, "-S", "-c", probe, cwd=tree)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "RuntimeWarning" in line]
    assert len(warnings) == 1 and f"source tree {tree}" in warnings[0]
    assert "pip install --no-build-isolation -e ." in warnings[0] and "circular" not in result.stdout
