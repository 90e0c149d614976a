"""The public ops under property-based fuzzing (tests/fuzz_ops.py): every call gives a correct result or a
ValueError/TypeError naming an argument; and the raw registered ops called with one argument corrupted at a time
(tests/fuzz_raw_ops.py): a clear error naming it. Each fuzzer runs in its own interpreter, so that a crash of a
compiled kernel (a signal) fails its test instead of ending the test session."""
import json
import pathlib
import subprocess
import sys

import pytest

import cbd_fast

FUZZER = pathlib.Path(__file__).with_name("fuzz_ops.py")
RAW_FUZZER = pathlib.Path(__file__).with_name("fuzz_raw_ops.py")
EXAMPLES = 200  # per op, derandomized: the same examples on every run (about 10 s per op on 2 cores)
OPS = ["banzhaf_interaction", "banzhaf_interaction_from_tokens", "maxsim", "coalitions"]
RAW_OPS = ["banzhaf_interaction", "banzhaf_interaction_backward", "banzhaf_interaction_from_tokens",
           "fill_coalitions", "maxsim_score", "maxsim_score_backward"]


def _run(fuzzer: pathlib.Path, *args: str) -> list[str]:
    """The lines ``fuzzer`` prints, run in its own interpreter; a failed check or a crash fails the test."""
    result = subprocess.run([sys.executable, str(fuzzer), *args], capture_output=True, text=True, timeout=900)
    crashed = f" (killed by signal {-result.returncode})" if result.returncode < 0 else ""
    assert result.returncode == 0, (f"{fuzzer.name} {' '.join(args)} failed with exit code {result.returncode}"
                                    f"{crashed}:\n{result.stdout[-3000:]}\n{result.stderr[-8000:]}")
    return result.stdout.strip().splitlines()


def _fuzz(op: str) -> dict:
    return json.loads(_run(FUZZER, "--examples", str(EXAMPLES), op)[-1])[op]


@pytest.mark.parametrize("op", OPS)
def test_fuzzed_calls_give_a_correct_result_or_a_clear_error(op):
    outcomes = _fuzz(op)
    assert sum(outcomes.values()) - outcomes.get("correct gradients", 0) == EXAMPLES
    # both kinds of outcome are exercised, and every backend that runs here returned checked results
    assert outcomes["clear error"] >= EXAMPLES // 5, outcomes
    if op == "coalitions":
        assert outcomes["correct result"] >= EXAMPLES // 5, outcomes
        return
    backends = ["auto", "torch"] + (["cpu"] if cbd_fast.has_extension() else [])
    backends += ["triton"] if cbd_fast.build_info()["triton"] else []
    for backend in backends:
        assert outcomes.get(f"correct result ({backend})", 0) >= 3, (backend, outcomes)
    assert outcomes["correct gradients"] >= 10, outcomes


@pytest.mark.skipif(not cbd_fast.has_extension(), reason="needs the compiled extension")
def test_raw_ops_refuse_every_corrupted_argument():
    """Every op csrc/ops.cpp registers, called directly on CPU tensors with one argument corrupted at a time (about
    700 calls, a few seconds): a clear error naming the argument, or for a non-contiguous layout of valid values the
    valid call's result; never a crash or a result from a wrong argument."""
    outcomes = {op: counts for line in _run(RAW_FUZZER) for op, counts in json.loads(line).items()}
    assert sorted(outcomes) == RAW_OPS
    for op, counts in outcomes.items():
        assert counts["clear error"] >= 25, (op, counts)
        if op == "banzhaf_interaction_from_tokens":  # CUDA only: refused on CPU tensors, by the dispatcher
            assert counts["refused: no kernel for the device"] >= 80, counts
        else:
            assert counts["valid call"] == 1, (op, counts)
        if op not in ("banzhaf_interaction_from_tokens", "fill_coalitions"):  # fill_coalitions refuses them
            assert counts["same result, other layout"] >= 10, (op, counts)
