"""The public ops under property-based fuzzing (tests/fuzz_ops.py): every call gives a correct result or a
ValueError/TypeError naming an argument. Each op is fuzzed in its own interpreter, so that a crash of a compiled
kernel (a signal) fails its test instead of ending the test session."""
import json
import pathlib
import subprocess
import sys

import pytest

import cbd_fast

FUZZER = pathlib.Path(__file__).with_name("fuzz_ops.py")
EXAMPLES = 200  # per op, derandomized: the same examples on every run (about 10 s per op on 2 cores)
OPS = ["banzhaf_interaction", "banzhaf_interaction_from_tokens", "maxsim", "coalitions"]


def _fuzz(op: str) -> dict:
    result = subprocess.run([sys.executable, str(FUZZER), "--examples", str(EXAMPLES), op], capture_output=True,
                            text=True, timeout=900)
    crashed = f" (killed by signal {-result.returncode})" if result.returncode < 0 else ""
    assert result.returncode == 0, (f"fuzzing {op} failed with exit code {result.returncode}{crashed}:\n"
                                    f"{result.stdout[-3000:]}\n{result.stderr[-8000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])[op]


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
