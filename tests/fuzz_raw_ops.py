"""The raw registered CPU ops (``torch.ops.cbd_fast.*`` as csrc/ops.cpp registers them, bypassing the public
functions' Python checks) called with one argument corrupted at a time.

Every op of the ``cbd_fast`` library is found in the dispatcher's registry (an op added later without a valid call
here fails the run) and called once with valid arguments, then once per corruption of one argument: another type
(None, a list, a number), another dtype, one dimension more or fewer, a 0-d tensor, one size one larger or empty,
a meta tensor, a non-contiguous layout, bad values (non-finite similarities, weight logits out of range), and
out-of-range or wrongly typed ints and strings (negative, zero and huge counts, integers beyond 64 bits). The
expected outcome:

* a non-contiguous layout of valid values: the valid call's result, bit for bit (or a clear error);
* anything else: a RuntimeError, ValueError or TypeError whose message names the corrupted argument (a size
  that no longer matches may be reported on either side: any tensor argument of the op) — never a result, never a
  crash. An op without a CPU kernel must refuse every call.

Valid calls where a side is empty (no texts, no tokens, no features, no draws) are checked too: ``maxsim_score``
and ``fill_coalitions`` accept them (zero scores and gradients of the documented shapes), the Banzhaf ops refuse
them naming ``sim``. A crash ends the process; ``tests/test_fuzz_ops.py`` runs this module in a subprocess, and the
case being run is written to stderr before each call, so a crash names it::

    python tests/fuzz_raw_ops.py   # prints {op: {outcome: count}} as JSON, a line per op
"""
from __future__ import annotations

import collections
import json
import os
import sys
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # fuzz_ops, also when started with PYTHONSAFEPATH
from fuzz_ops import _names  # noqa: E402

import cbd_fast  # noqa: E402
from cbd_fast.coalitions import philox_coalitions  # noqa: E402

ERRORS = (RuntimeError, ValueError, TypeError)
WRONG_DTYPES = {torch.bool: (torch.float32, torch.uint8, torch.int64),
                "float": (torch.int64, torch.int32, torch.complex64, torch.bool)}
INT_CORRUPTIONS = {"num_samples": (0, -1, -2**63, 2**32, 2**63 - 1, 2**64, 2.5, "4", None),
                   "seed": (2**64, -2**63 - 1, 1.5, "0", None)}
STR_CORRUPTIONS = ("shapley", "", "PAIRED", 3, None)


class Call:
    """Named arguments of one op call, in schema order."""

    def __init__(self, op_name: str, args: dict):
        self.op_name, self.args = op_name, args

    def run(self):
        """The op's outputs: its return value, or for the in-place op ``fill_coalitions`` the filled tensors."""
        result = getattr(torch.ops.cbd_fast, self.op_name)(*self.args.values())
        if result is None:
            return tuple(x for x in self.args.values() if isinstance(x, torch.Tensor))
        return result if isinstance(result, tuple) else (result,)

    def with_arg(self, name, value) -> "Call":
        return Call(self.op_name, {**self.args, name: value})


# --- valid calls --------------------------------------------------------------------------------------------------

def _features(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).float()


def _mask(gen, batch, length):
    mask = torch.rand(batch, length, generator=gen) < 0.7
    mask[:, :1] = True  # every pair has a valid token (when it has tokens)
    return mask


def _maxsim_args(num_texts=2, text_len=3, num_images=3, image_len=4, dim=5) -> dict:
    gen = torch.Generator().manual_seed(0)
    text_mask, image_mask = _mask(gen, num_texts, text_len), _mask(gen, num_images, image_len)
    return dict(text=_features(gen, num_texts, text_len, dim), image=_features(gen, num_images, image_len, dim),
                text_mask=text_mask, image_mask=image_mask,
                alpha=text_mask.float() / text_mask.sum(1, keepdim=True).clamp_min(1),
                beta=image_mask.float() / image_mask.sum(1, keepdim=True).clamp_min(1))


def _game_args(batch=2, text_len=3, image_len=4) -> dict:
    gen = torch.Generator().manual_seed(1)
    return dict(text_mask=_mask(gen, batch, text_len), image_mask=_mask(gen, batch, image_len),
                text_weight=_features(gen, batch, text_len), image_weight=_features(gen, batch, image_len),
                num_samples=4, seed=-7, estimator="paired")


def _banzhaf_grads(batch, text_len, image_len) -> dict:
    gen = torch.Generator().manual_seed(2)
    return dict(grad_interaction=_features(gen, batch, text_len, image_len),
                grad_text_value=_features(gen, batch, text_len), grad_image_value=_features(gen, batch, image_len))


def maxsim_score(**sizes) -> Call:
    return Call("maxsim_score", _maxsim_args(**sizes))


def maxsim_score_backward(**sizes) -> Call:
    args = _maxsim_args(**sizes)
    grad_score = _features(torch.Generator().manual_seed(3), args["text"].shape[0], args["image"].shape[0])
    return Call("maxsim_score_backward", {"grad_score": grad_score, **args})


def banzhaf_interaction(batch=2, text_len=3, image_len=4) -> Call:
    sim = _features(torch.Generator().manual_seed(4), batch, text_len, image_len)
    return Call("banzhaf_interaction", {"sim": sim, **_game_args(batch, text_len, image_len)})


def banzhaf_interaction_backward(batch=2, text_len=3, image_len=4) -> Call:
    forward = banzhaf_interaction(batch, text_len, image_len)
    return Call("banzhaf_interaction_backward", {**_banzhaf_grads(batch, text_len, image_len), **forward.args})


def banzhaf_interaction_from_tokens(batch=2, text_len=3, image_len=4, dim=5) -> Call:
    gen = torch.Generator().manual_seed(5)
    return Call("banzhaf_interaction_from_tokens", dict(
        text=_features(gen, batch, text_len, dim), image=_features(gen, batch, image_len, dim),
        **_game_args(batch, text_len, image_len)))


def fill_coalitions(num_samples=4, batch=2, text_len=3, image_len=40) -> Call:
    return Call("fill_coalitions", dict(text_in=torch.zeros(num_samples, batch, text_len, dtype=torch.bool),
                                        image_in=torch.zeros(num_samples, batch, image_len, dtype=torch.bool),
                                        seed=-7))


VALID_CALLS: dict[str, Callable[..., Call]] = {f.__name__: f for f in (
    maxsim_score, maxsim_score_backward, banzhaf_interaction, banzhaf_interaction_backward,
    banzhaf_interaction_from_tokens, fill_coalitions)}
# Valid calls with an empty side, and whether the op accepts them (else it must refuse them naming the argument).
EMPTY_SIDES = {
    "maxsim_score": [dict(num_texts=0), dict(num_images=0), dict(text_len=0), dict(image_len=0), dict(dim=0)],
    "maxsim_score_backward": [dict(num_texts=0), dict(num_images=0), dict(text_len=0), dict(image_len=0),
                              dict(dim=0)],
    "banzhaf_interaction": [dict(batch=0), dict(text_len=0), dict(image_len=0)],
    "banzhaf_interaction_backward": [dict(batch=0), dict(text_len=0), dict(image_len=0)],
    "fill_coalitions": [dict(num_samples=0), dict(batch=0), dict(text_len=0), dict(image_len=0)],
}
ACCEPTS_EMPTY = {"maxsim_score", "maxsim_score_backward", "fill_coalitions"}
FREE_DIMS = {"text_in": 2, "image_in": 2}  # T and V of fill_coalitions are independent: other sizes are valid


def registered_ops() -> list[str]:
    """The ops of the ``cbd_fast`` library that csrc/ops.cpp defines (the Triton family, Python custom ops named
    ``triton_*``, is left out: it runs on CPU only under the interpreter)."""
    cbd_fast.has_extension()  # loads the extension and the public modules' registrations
    return sorted(name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("cbd_fast::") and not name.startswith("cbd_fast::triton_"))


def has_cpu_kernel(op_name: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"cbd_fast::{op_name}", "CPU")


# --- corruptions --------------------------------------------------------------------------------------------------

class Corruption:
    """One argument of a valid call replaced. ``expect``: "error" (a clear error naming one of ``names``; None: any
    tensor argument, for a size that no longer matches the others), "same" (the valid call's result, or a clear
    error naming one of ``names``) or "valid" (a valid call of other sizes: its reference result)."""

    def __init__(self, name: str, kind: str, call: Call, expect: str = "error", names: set[str] | None = None):
        self.name, self.kind, self.call, self.expect, self.names = name, kind, call, expect, names

    def __str__(self):
        return f"{self.name}: {self.kind}"


def _tensor_corruptions(call: Call, name: str, x: torch.Tensor):
    """Wrong types, dtypes, ranks, sizes and device of tensor argument ``name``, and non-contiguous layouts of the
    same values."""
    def corrupt(kind, value, expect="error"):
        return Corruption(name, kind, call.with_arg(name, value), expect, {name})

    yield corrupt("None", None)
    yield corrupt("list", x.tolist())
    yield corrupt("number", 1.0)
    for dtype in WRONG_DTYPES[torch.bool if x.dtype == torch.bool else "float"]:
        yield corrupt(f"dtype {dtype}", x.to(dtype))
    yield corrupt("meta", x.to("meta"))
    yield corrupt("rank+1", x.unsqueeze(0))
    yield corrupt("rank-1", x[0])
    yield corrupt("0-d", torch.zeros((), dtype=x.dtype))
    for dim in range(x.dim()):
        free = FREE_DIMS.get(name) == dim
        for kind, value in ((f"size[{dim}]+1", torch.cat([x, x.narrow(dim, 0, 1)], dim)),
                            (f"size[{dim}]=0", x.narrow(dim, 0, 0))):
            yield Corruption(name, kind, call.with_arg(name, value), "valid" if free else "error", None)
    yield corrupt("layout transposed", x.transpose(-1, -2).contiguous().transpose(-1, -2), "same")
    yield corrupt("layout strided", torch.stack([x, torch.zeros_like(x)], -1)[..., 0], "same")


def _value_corruptions(call: Call):
    """Bad values of the Banzhaf ops' inputs, which their checks refuse: non-finite similarities or features, and
    weight logits of a valid token that are not finite or span more than 27 within a pair. (maxsim_score defines
    the score of an item with a non-finite feature as NaN: not an error.)"""
    if "text_weight" not in call.args:
        return
    for name in ("sim", "text", "image"):
        if name in call.args:
            for value in (float("nan"), float("inf")):
                x = call.args[name].clone()
                x[0, 0, 0] = value
                yield Corruption(name, f"value {value}", call.with_arg(name, x), names={name})
    for name in ("text_weight", "image_weight"):
        for value in (float("nan"), float("inf"), 40.0):
            x = call.args[name].clone()
            x[0, 0] = value  # token 0 is valid in every pair
            yield Corruption(name, f"value {value}", call.with_arg(name, x), names={name})


def corruptions(call: Call):
    """Every corruption of one argument of ``call``."""
    for name, value in call.args.items():
        if isinstance(value, torch.Tensor):
            yield from _tensor_corruptions(call, name, value)
        else:
            for corrupted in INT_CORRUPTIONS[name] if isinstance(value, int) else STR_CORRUPTIONS:
                yield Corruption(name, repr(corrupted), call.with_arg(name, corrupted), names={name})
    yield from _value_corruptions(call)


# --- running ------------------------------------------------------------------------------------------------------

def _no_kernel(error: Exception, op_name: str) -> bool:
    """The dispatcher's refusal of an op that has no kernel for the arguments' device."""
    message = str(error)
    return f"cbd_fast::{op_name}" in message and ("'CPU' backend" in message or "with Meta tensors" in message)


def _refused(call: Call, names: set[str] | None, no_kernel_ok: bool) -> str:
    """Checks that ``call`` raises a clear error naming one of ``names`` (None: any tensor argument) or, where
    ``no_kernel_ok``, the dispatcher's refusal for want of a kernel; returns the outcome's name."""
    if names is None:
        names = {n for n, v in call.args.items() if isinstance(v, torch.Tensor)}
    try:
        result = call.run()
    except ERRORS as error:
        if no_kernel_ok and _no_kernel(error, call.op_name):
            return "refused: no kernel for the device"
        assert _names(str(error), names), (f"{call.op_name}: the error does not name any of {sorted(names)}: "
                                           f"{type(error).__name__}: {error}")
        return "clear error"
    raise AssertionError(f"{call.op_name}: accepted, returning " + ", ".join(
        f"{x.dtype} {tuple(x.shape)} on {x.device}" for x in result))


def _same_result(op_name: str, what: str, result, expected) -> None:
    assert len(result) == len(expected), f"{op_name} ({what}): {len(result)} outputs, expected {len(expected)}"
    for i, (a, e) in enumerate(zip(result, expected)):
        assert a.shape == e.shape and a.dtype == e.dtype and a.device == e.device, \
            f"{op_name} ({what}): output {i} is {a.dtype} {tuple(a.shape)} on {a.device}, expected {e.dtype} " \
            f"{tuple(e.shape)} on {e.device}"
        assert torch.equal(a, e), f"{op_name} ({what}): output {i} differs from the expected result"


def _reference(call: Call) -> tuple[torch.Tensor, ...]:
    """What a valid call of other sizes must return: the coalitions' bits, or for an empty side zero scores and
    gradients."""
    a = call.args
    if call.op_name == "fill_coalitions":
        (num_samples, batch, text_len), image_len = a["text_in"].shape, a["image_in"].shape[2]
        return philox_coalitions(0, num_samples, batch, text_len, image_len, a["seed"] % 2**64)
    if call.op_name == "maxsim_score":
        return (torch.zeros(a["text"].shape[0], a["image"].shape[0]),)
    return tuple(torch.zeros(a[n].shape) for n in ("text", "image", "alpha", "beta"))


def sweep(op_name: str) -> collections.Counter:
    """The valid call of ``op_name``, every corruption of one of its arguments, and its calls with an empty side."""
    outcomes = collections.Counter()
    make = VALID_CALLS[op_name]
    cpu_kernel = has_cpu_kernel(op_name)
    _announce(op_name, "valid call")
    if cpu_kernel:
        expected = make().run()
        if op_name == "fill_coalitions":
            _same_result(op_name, "valid call", expected, _reference(make()))
        outcomes["valid call"] += 1
    else:
        outcomes[_refused(make(), set(), no_kernel_ok=True)] += 1
    cases = list(corruptions(make()))
    cases += [Corruption("sizes", f"empty side {sizes}", make(**sizes),
                         "valid" if op_name in ACCEPTS_EMPTY else "error", {"sim"})
              for sizes in EMPTY_SIDES.get(op_name, [])]
    for case in cases:
        _announce(op_name, str(case))
        if case.expect == "error" or not cpu_kernel:
            outcomes[_refused(case.call, case.names, no_kernel_ok=not cpu_kernel or case.kind == "meta")] += 1
            continue
        try:
            result = case.call.run()
        except ERRORS as error:
            assert case.expect == "same" and _names(str(error), case.names), \
                f"{op_name} ({case}): refused: {type(error).__name__}: {error}"
            outcomes["clear error"] += 1
            continue
        _same_result(op_name, str(case), result, expected if case.expect == "same" else _reference(case.call))
        outcomes["same result, other layout" if case.expect == "same" else "valid, other sizes"] += 1
    return outcomes


def _announce(op_name: str, what: str) -> None:
    print(f"{op_name}: {what}", file=sys.stderr, flush=True)  # the last line names the case that crashed, if any


def main() -> int:
    torch.set_num_threads(1)
    ops = registered_ops()
    missing = sorted(set(ops) - set(VALID_CALLS))
    assert not missing, f"registered ops without a valid call in {__file__}: {missing}"
    for op_name in ops:
        print(json.dumps({op_name: dict(sorted(sweep(op_name).items()))}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
