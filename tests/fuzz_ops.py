"""Property-based fuzzing of the public ops with hypothesis: ``banzhaf_interaction``,
``banzhaf_interaction_from_tokens``, ``maxsim`` and ``coalitions``, on every backend that runs without a GPU
(``cpu``, ``torch``, ``auto``; ``triton`` under its interpreter, forward only, on a few small cases).

Each example draws a set of arguments — shapes down to 0, every float dtype, masks with padding and empty rows,
weight logits up to and beyond the allowed span, ties, non-contiguous layouts, values on padding tokens that must
not matter — and then corrupts at most one argument (wrong type, shape, dtype, device or value). The expected
outcome is derived from the final arguments, and the observed one is classified:

* valid arguments: a result of the documented shapes and dtypes, finite, and equal within a stated tolerance to the
  plain-PyTorch definition (``cbd_fast.reference``, the pure-PyTorch Philox stream), gradients included;
* invalid arguments: a ValueError or TypeError whose message names an offending argument.

Anything else — another exception, a wrong, non-finite or silently accepted result — fails the run. A crash ends
the process; ``tests/test_fuzz_ops.py`` runs this module in a subprocess, so a crash is a failed test, not a lost
test session::

    python tests/fuzz_ops.py [--examples N] [op ...]   # prints {op: {outcome: count}} as JSON, a line per op
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import re
import sys

import torch

if not torch.cuda.is_available():  # Triton kernels run under the interpreter; set before any kernel module import
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import cbd_fast  # noqa: E402
from cbd_fast import reference  # noqa: E402
from cbd_fast.banzhaf import MAX_WEIGHT_SPAN  # noqa: E402
from cbd_fast.coalitions import philox_coalitions  # noqa: E402

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
HAS_TRITON = cbd_fast.build_info()["triton"] and (torch.cuda.is_available()
                                                  or os.environ.get("TRITON_INTERPRET") == "1")
# Backends drawn for valid calls; "triton" (interpreted: ~0.4 s a call) is drawn for small forward-only cases.
CPU_BACKENDS = ("auto", "cpu", "torch") if cbd_fast.has_extension() else ("auto", "torch")
OUTCOMES: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


class Case:
    """The arguments of one call, the arguments that make it invalid (empty: valid), and how to check it."""

    def __init__(self, kwargs: dict, offending: set[str], check_grad: bool):
        self.kwargs, self.offending, self.check_grad = kwargs, offending, check_grad

    def __repr__(self):
        def show(x):
            if isinstance(x, torch.Tensor):
                return (f"tensor({list(x.shape)}, {x.dtype}, {x.device.type}, stride={x.stride()}, "
                        f"values={x.tolist() if not x.is_meta and x.numel() <= 64 else '...'})")
            return repr(x)
        args = ", ".join(f"{k}={show(v)}" for k, v in self.kwargs.items())
        return f"Case({args}; offending={sorted(self.offending)}, check_grad={self.check_grad})"


# --- drawing arguments --------------------------------------------------------------------------------------------

VALUE_KINDS = ("normal", "ties", "large", "tiny")


def _pick(gen: torch.Generator, options):
    """One of ``options``, uniformly from ``gen``. Value-level choices (dtypes, spans, backends) come from the
    example's generator, whose seed hypothesis draws: its own choices lean to the first option, which would
    leave the wide spans and the rarer backends almost untested."""
    return options[int(torch.randint(len(options), (), generator=gen))]


def _backend(gen: torch.Generator, triton_ok: bool) -> str:
    """A backend for a valid call: Triton (interpreted, ~0.4 s a call) for one call in 12."""
    if HAS_TRITON and triton_ok and float(torch.rand((), generator=gen)) < 1 / 12:
        return "triton"
    return _pick(gen, CPU_BACKENDS)


def _values(gen: torch.Generator, shape, dtype, kind: str) -> torch.Tensor:
    """Random values of ``shape`` in ``dtype``: normal, with many ties (halves), large or tiny."""
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    x = {"normal": x, "ties": (2 * x).round() / 2, "large": 1e3 * x, "tiny": 1e-3 * x}[kind]
    return x.to(dtype)


def _mask(draw, gen, batch, length):
    mode = draw(st.sampled_from(["none", "random", "random", "empty_row", "all_false"]))
    if mode == "none":
        return None
    mask = torch.rand(batch, length, generator=gen) < 0.7
    if mode == "empty_row":
        mask[draw(st.integers(0, batch - 1)) if batch else slice(0)] = False
    if mode == "all_false":
        mask[:] = False
    return mask


def _weight(draw, gen, batch, length, mask):
    """Logits spanning a drawn span from 0 to the limit 27 within each pair (where the end tokens are valid):
    spread over it, or one dominant token over the rest (where leave-one-out sums by subtraction cancel); in a
    drawn float dtype, with NaN or huge values on padding tokens (which must not matter)."""
    if draw(st.booleans()):
        return None
    span = _pick(gen, [0.0, 1.0, 5.0, 12.0, 20.0, MAX_WEIGHT_SPAN])
    if _pick(gen, ["spread", "dominant"]) == "spread":
        logits = torch.rand(batch, length, generator=gen, dtype=torch.float64) * span
        logits[:, 0], logits[:, -1] = 0.0, span
    else:
        logits = torch.zeros(batch, length, dtype=torch.float64)
        logits[torch.arange(batch), torch.randint(length, (batch,), generator=gen)] = span
    logits = logits + _pick(gen, [0.0, -13.5])
    if mask is not None and draw(st.booleans()):
        logits = logits.masked_fill(~mask, _pick(gen, [math.nan, 1e4, -math.inf]))
    return logits.to(_pick(gen, FLOAT_DTYPES))


def _layout(draw, x):
    """``x`` as given or with the same values in a non-contiguous layout."""
    if x is None or x.dim() < 2 or not draw(st.booleans()):
        return x
    return x.transpose(-1, -2).contiguous().transpose(-1, -2)


def _weight_problems(name, weight, mask) -> set[str]:
    """{name} when the valid logits are not finite or span more than MAX_WEIGHT_SPAN within a pair."""
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.is_meta or weight.dim() != 2:
        return set()  # wrong in type, dtype, device or shape: offending by construction
    valid = torch.ones(weight.shape, dtype=torch.bool) if mask is None else mask
    if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool or valid.is_meta \
            or valid.shape != weight.shape:
        return set()  # the mask itself is wrong, which is what the error will name
    w = weight.double()
    if not torch.isfinite(w[valid]).all():
        return {name}
    span = (w.masked_fill(~valid, -math.inf).amax(1) - w.masked_fill(~valid, math.inf).amin(1))[valid.any(1)]
    return {name} if span.numel() and float(span.max()) > MAX_WEIGHT_SPAN else set()


def _corrupt_tensor(draw, x, shape, *, required: bool, meta: bool = True):
    """A wrong value for a tensor argument currently ``x`` (None when absent) of shape ``shape``: another type, a
    wrong number of dimensions, a wrong size, an integer or complex dtype, or (``meta``) another device.
    ``required`` arguments may also be None; a wrong size is left to optional ones (a required tensor's size is
    what the others are checked against)."""
    kinds = ["type", "ndim", "dtype"] + (["size"] if not required else []) + (["device"] if meta else [])
    kind = draw(st.sampled_from(kinds))
    ref = x if x is not None else torch.zeros(shape)
    if kind == "type":
        return draw(st.sampled_from([[1.0, 2.0], 3, "x"] + ([None] if required else [])))
    if kind == "ndim":
        return torch.zeros(*ref.shape, 2) if draw(st.booleans()) else torch.zeros(ref.shape[:-1])
    if kind == "size":
        return torch.zeros(*ref.shape[:-1], ref.shape[-1] + draw(st.integers(1, 2)), dtype=ref.dtype)
    if kind == "dtype":
        return torch.zeros(ref.shape, dtype=draw(st.sampled_from([torch.int64, torch.int32, torch.complex64])))
    return ref.to("meta")


SCALAR_CORRUPTIONS = {
    "num_samples": [0, -3, 2**32, 2**40, 2.5, True, "4", None],
    "seed": [-1, 2**64, 1.5, "0", None, True],
    "estimator": ["shapley", "", None, 3, "PAIRED"],
    "backend": ["fortran", "cuda", "gpu", None, 1] + ([] if HAS_TRITON else ["triton"]),
    "reduction": ["max", None, 1, "WTI"],
}


def _valid_tokens(mask, batch, length):
    return torch.ones(batch, length, dtype=torch.bool) if mask is None else mask


@st.composite
def banzhaf_cases(draw, from_tokens: bool):
    batch, text_len, image_len = draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    dtype, kind = _pick(gen, FLOAT_DTYPES), _pick(gen, VALUE_KINDS)
    inputs = ("text", "image") if from_tokens else ("sim",)
    kwargs = {}
    if from_tokens:
        dim = draw(st.integers(0, 6))
        kwargs["text"] = _layout(draw, _values(gen, (batch, text_len, dim), dtype, kind))
        kwargs["image"] = _layout(draw, _values(gen, (batch, image_len, dim), dtype, kind))
    else:
        kwargs["sim"] = _layout(draw, _values(gen, (batch, text_len, image_len), dtype, kind))
    shapes = {"text_mask": (batch, text_len), "image_mask": (batch, image_len), "text_weight": (batch, text_len),
              "image_weight": (batch, image_len), "sim": (batch, text_len, image_len)}
    kwargs["text_mask"] = _mask(draw, gen, batch, text_len)
    kwargs["image_mask"] = _mask(draw, gen, batch, image_len)
    kwargs["text_weight"] = _layout(draw, _weight(draw, gen, batch, text_len, kwargs["text_mask"]))
    kwargs["image_weight"] = _layout(draw, _weight(draw, gen, batch, image_len, kwargs["image_mask"]))
    kwargs["num_samples"] = draw(st.integers(1, 12))
    kwargs["seed"] = draw(st.integers(0, 2**64 - 1))
    kwargs["estimator"] = _pick(gen, ["paired", "paired", "msr", "exact"])  # exact: n <= 10 players here
    kwargs["backend"] = _backend(gen, triton_ok=kwargs["estimator"] != "exact")

    offending = set()  # arguments that are wrong by construction; wrong weight values are found at the end
    target = draw(st.sampled_from([None] * 6 + list(kwargs)))
    if target in ("num_samples", "seed", "estimator", "backend"):
        kwargs[target] = draw(st.sampled_from(SCALAR_CORRUPTIONS[target]))
        exact_ignores_it = (target == "num_samples" and kwargs["estimator"] == "exact"
                            and type(kwargs[target]) is int)
        offending |= set() if exact_ignores_it else {target}
    elif target in ("text_weight", "image_weight") and draw(st.booleans()):  # a bad value on a valid token
        valid = _valid_tokens(kwargs[target.replace("weight", "mask")], *shapes[target])
        assume(bool(valid.any()))
        weight = torch.zeros(valid.shape) if kwargs[target] is None else kwargs[target].clone()
        b, t = valid.nonzero()[draw(st.integers(0, int(valid.sum()) - 1))].tolist()
        weight[b, t] = draw(st.sampled_from([float("nan"), float("inf"), 40.0, -30.0]))
        kwargs[target] = weight
    elif target in inputs and draw(st.booleans()):  # no tokens, or a non-finite value
        x = kwargs[target]
        if draw(st.booleans()) or x.numel() == 0:
            shape = list(x.shape)
            shape[draw(st.integers(0, x.dim() - 2 if from_tokens else x.dim() - 1))] = 0
            kwargs[target] = torch.zeros(shape, dtype=x.dtype)
        else:
            x = x.clone()
            x[tuple(draw(st.integers(0, n - 1)) for n in x.shape)] = draw(st.sampled_from([math.nan, math.inf]))
            kwargs[target] = x
        offending |= set(inputs)
    elif target is not None:
        required = target in inputs
        shape = kwargs[target].shape if required else shapes[target]
        kwargs[target] = _corrupt_tensor(draw, kwargs[target], shape, required=required, meta=not required)
        offending |= set(inputs) if from_tokens and required else {target}
    if from_tokens and target is None and float(torch.rand((), generator=gen)) < 0.05:
        kwargs["image"] = kwargs["image"].to(torch.float64 if dtype != torch.float64 else torch.float32)
        offending |= {"text", "image"}  # one dtype for both
    for name in ("text_weight", "image_weight"):
        offending |= _weight_problems(name, kwargs[name], kwargs[name.replace("weight", "mask")])
    check_grad = kwargs["backend"] != "triton" and draw(st.booleans())
    return Case(kwargs, offending, check_grad)


@st.composite
def too_many_players(draw):
    """estimator='exact' with n = 21 players in a pair: refused (the enumeration is 2**n)."""
    return Case(dict(sim=torch.zeros(1, 11, 10), estimator="exact", backend=draw(st.sampled_from(CPU_BACKENDS))),
                {"estimator"}, False)


@st.composite
def maxsim_cases(draw):
    num_texts, num_images = draw(st.integers(0, 3)), draw(st.integers(0, 3))
    text_len, image_len, dim = draw(st.integers(0, 4)), draw(st.integers(0, 4)), draw(st.integers(0, 8))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    dtype, kind = _pick(gen, FLOAT_DTYPES), _pick(gen, VALUE_KINDS)
    kwargs = dict(text=_layout(draw, _values(gen, (num_texts, text_len, dim), dtype, kind)),
                  image=_layout(draw, _values(gen, (num_images, image_len, dim), dtype, kind)))
    kwargs["text_mask"] = _mask(draw, gen, num_texts, text_len)
    kwargs["image_mask"] = _mask(draw, gen, num_images, image_len)
    for side in ("text", "image"):  # whatever padding tokens hold must not matter
        mask = kwargs[f"{side}_mask"]
        if mask is not None and draw(st.booleans()):
            kwargs[side] = kwargs[side].masked_fill(~mask.unsqueeze(-1), float("nan"))
    for side, count, length in (("text", num_texts, text_len), ("image", num_images, image_len)):
        kwargs[f"{side}_weight"] = None if draw(st.booleans()) else _layout(draw, (
            torch.randn(count, length, generator=gen, dtype=torch.float64) * _pick(gen, [1.0, 30.0])).to(
            _pick(gen, FLOAT_DTYPES)))
        mask = kwargs[f"{side}_mask"]
        if kwargs[f"{side}_weight"] is not None and mask is not None and draw(st.booleans()):
            kwargs[f"{side}_weight"] = kwargs[f"{side}_weight"].masked_fill(~mask, float("nan"))
    kwargs["reduction"] = _pick(gen, ["wti", "sum", "mean"])
    kwargs["backend"] = _backend(gen, triton_ok=True)
    offending = set()
    target = draw(st.sampled_from([None] * 5 + list(kwargs)))
    if target in ("reduction", "backend"):
        kwargs[target] = draw(st.sampled_from(SCALAR_CORRUPTIONS[target]))
    elif target in ("text", "image"):
        kind = draw(st.sampled_from(["tensor", "dim", "dtype"]))
        if kind == "tensor":
            kwargs[target] = _corrupt_tensor(draw, kwargs[target], kwargs[target].shape, required=True)
        elif kind == "dim":
            x = kwargs[target]
            kwargs[target] = torch.zeros(*x.shape[:-1], x.shape[-1] + 1, dtype=x.dtype)
        else:
            kwargs[target] = kwargs[target].to(torch.float64 if dtype != torch.float64 else torch.float32)
        target = "text|image"
    elif target is not None:
        side = "text" if target.startswith("text") else "image"
        shape = (num_texts, text_len) if side == "text" else (num_images, image_len)
        kwargs[target] = _corrupt_tensor(draw, kwargs[target], shape, required=False)
    if target is not None:
        offending |= set(target.split("|"))
    return Case(kwargs, offending, kwargs["backend"] != "triton" and draw(st.booleans()))


@st.composite
def coalitions_cases(draw):
    kwargs = dict(batch=draw(st.integers(1, 4)), text_len=draw(st.integers(1, 6)), image_len=draw(st.integers(1, 6)),
                  num_samples=draw(st.integers(1, 6)), seed=draw(st.integers(0, 2**64 - 1)),
                  device=draw(st.sampled_from([None, "cpu", torch.device("cpu"), "meta"])))
    target = draw(st.sampled_from([None] * 3 + list(kwargs)))
    if target in ("batch", "text_len", "image_len", "num_samples"):
        kwargs[target] = draw(st.sampled_from([0, -1, 2.0, True, None, "3"] + (
            [2**32] if target in ("batch", "num_samples") else [])))
    elif target == "seed":
        kwargs[target] = draw(st.sampled_from(SCALAR_CORRUPTIONS["seed"]))
    elif target == "device":
        kwargs[target] = draw(st.sampled_from(["gpu0", 3.5, "cuda"] if not torch.cuda.is_available() else ["gpu0"]))
    return Case(kwargs, {target} if target else set(), False)


# --- checking outcomes --------------------------------------------------------------------------------------------

def _names(message: str, names: set[str]) -> bool:
    return any(re.search(rf"(?<![A-Za-z_]){re.escape(name)}(?![A-Za-z_])", message) for name in names)


def _call(op: str, fn, case: Case):
    """Runs ``fn(**kwargs)``; an error must be a ValueError/TypeError naming an offending argument, a result must
    come from valid arguments. Returns the result or None."""
    try:
        result = fn(**case.kwargs)
    except (ValueError, TypeError) as error:
        assert case.offending, f"{op}: valid arguments refused: {type(error).__name__}: {error}"
        assert _names(str(error), case.offending), \
            f"{op}: the error does not name any of {sorted(case.offending)}: {error}"
        OUTCOMES[op]["clear error"] += 1
        return None
    assert not case.offending, f"{op}: invalid {sorted(case.offending)} accepted"
    return result


def _float_or_none(x):
    return x.double() if isinstance(x, torch.Tensor) else x


def _max_span(*weights_and_masks) -> float:
    span = 0.0
    for weight, mask in weights_and_masks:
        if weight is None:
            continue
        valid = torch.ones(weight.shape, dtype=torch.bool) if mask is None else mask
        w = weight.double()
        s = (w.masked_fill(~valid, -math.inf).amax(1) - w.masked_fill(~valid, math.inf).amin(1))[valid.any(1)]
        span = max(span, float(s.max()) if s.numel() else 0.0)
    return span


def _assert_close(op, what, actual, expected, tol, floor=0.0):
    """Every tensor of ``actual`` finite and within ``tol`` × (the largest entry of ``expected``, at least
    ``floor``: the magnitude of the inputs, which sets the rounding error of an output that cancels to ~0)."""
    scale = max([float(e.abs().max()) for e in expected if e.numel()] + [floor]) + 1e-300
    for name, a, e in zip(what, actual, expected):
        assert a.shape == e.shape, f"{op}: {name} has shape {tuple(a.shape)}, expected {tuple(e.shape)}"
        assert torch.isfinite(a).all(), f"{op}: {name} is not finite"
        error = float((a.double() - e.double()).abs().max()) if a.numel() else 0.0
        assert error <= tol * scale, f"{op}: {name} is off by {error:.3g} (tolerance {tol:.1e} × {scale:.3g})"


def _check_gradients(op, leaves: dict, grads, expected_grads, tol: float, floor: float) -> None:
    """Gradients in their leaves' dtypes, finite and within ``tol`` (2e-2 for half-precision leaves) of the
    reference's — except a gradient whose reference value overflows its leaf's dtype (a float16 gradient beyond
    65504 is inf in any implementation)."""
    names, actual, expected = [], [], []
    for (name, leaf), grad, expected_grad in zip(leaves.items(), grads, expected_grads):
        assert grad.dtype == leaf.dtype, f"{op}: grad {name} is {grad.dtype}, expected {leaf.dtype}"
        if torch.isfinite(expected_grad.to(leaf.dtype)).all():
            names.append(f"grad {name}")
            actual.append(grad)
            expected.append(expected_grad)
    half = any(x.dtype in (torch.float16, torch.bfloat16) for x in leaves.values())
    _assert_close(op, names, actual, expected, 2e-2 if half else tol, floor)
    OUTCOMES[op]["correct gradients"] += 1


def _banzhaf_tolerance(dtype: torch.dtype, span: float, backend: str) -> float:
    """Relative to the largest output: rounding of the result dtype, plus for the compiled kernels the error of
    their leave-one-out sums (a float64 total minus the own term: ~1e-16·e^span, see csrc/banzhaf_common.h). The
    torch backend's leave-one-out sums subtract nothing that could cancel: no allowance."""
    compiled = backend != "torch" and not (backend == "auto" and not cbd_fast.has_extension())
    return (1e-9 if dtype == torch.float64 else 2e-5) + (1e-15 * math.exp(span) if compiled else 0.0)


def check_banzhaf(case: Case, from_tokens: bool) -> None:
    op = "banzhaf_interaction_from_tokens" if from_tokens else "banzhaf_interaction"
    kw = case.kwargs
    leaves = {}
    if case.check_grad and not case.offending:  # differentiate w.r.t. the input(s) and the given weights
        for name in ("text", "image") if from_tokens else ("sim",):
            leaves[name] = kw[name].detach().clone().requires_grad_()
        for name in ("text_weight", "image_weight"):
            if kw[name] is not None:
                leaves[name] = kw[name].detach().clone().requires_grad_()
    args = {**kw, **leaves}
    result = _call(op, getattr(cbd_fast, op), Case(args, case.offending, case.check_grad))
    if result is None:
        return
    first = kw["text"] if from_tokens else kw["sim"]
    dtype = first.dtype if first.dtype in (torch.float32, torch.float64) else torch.float32
    assert all(x.dtype == dtype for x in result), f"{op}: result dtypes {[x.dtype for x in result]}, expected {dtype}"

    def reference_of(values):
        sim = (torch.bmm(values["text"].to(dtype), values["image"].to(dtype).transpose(1, 2)).double() if from_tokens
               else values["sim"].double())
        return reference.banzhaf_interaction(sim, kw["text_mask"], kw["image_mask"],
                                             _float_or_none(values["text_weight"]),
                                             _float_or_none(values["image_weight"]), kw["num_samples"], kw["seed"],
                                             kw["estimator"]), sim

    ref_leaves = {name: x.detach().clone().requires_grad_() for name, x in leaves.items()}
    expected, sim = reference_of({**kw, **ref_leaves})
    floor = float(sim.detach().abs().max())
    tol = _banzhaf_tolerance(dtype, _max_span((kw["text_weight"], kw["text_mask"]),
                                             (kw["image_weight"], kw["image_mask"])), kw["backend"])
    if from_tokens and kw["backend"] == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        # Under the interpreter the in-kernel similarity is a float32 product even for float64 features
        # (kernels/banzhaf.py, _similarity_tile): float32 rounding of the similarities.
        tol = max(tol, _banzhaf_tolerance(torch.float32, 0.0, "triton"))
    _assert_close(op, ("interaction", "text_value", "image_value"), [x.detach() for x in result],
                  [x.detach() for x in expected], tol, floor)
    OUTCOMES[op][f"correct result ({kw['backend']})"] += 1
    if leaves:
        gen = torch.Generator().manual_seed(kw["seed"] % 2**31)
        cotangents = [torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in expected]
        grads = torch.autograd.grad(sum((x * c.to(x.dtype)).sum() for x, c in zip(result, cotangents)),
                                    list(leaves.values()))
        expected_grads = torch.autograd.grad(sum((x * c).sum() for x, c in zip(expected, cotangents)),
                                             list(ref_leaves.values()))
        _check_gradients(op, leaves, grads, expected_grads, 10 * tol, floor)


def check_maxsim(case: Case) -> None:
    kw = case.kwargs
    leaves = {}
    if case.check_grad and not case.offending:
        leaves = {n: kw[n].detach().clone().requires_grad_() for n in ("text", "image", "text_weight", "image_weight")
                  if kw[n] is not None}
    score = _call("maxsim", cbd_fast.maxsim, Case({**kw, **leaves}, case.offending, case.check_grad))
    if score is None:
        return
    text, image = kw["text"], kw["image"]
    dtype = text.dtype if text.dtype in (torch.float32, torch.float64) else torch.float32
    assert score.dtype == dtype and score.shape == (text.shape[0], image.shape[0]), \
        f"maxsim: score {score.dtype} {tuple(score.shape)}"

    def clean(x, mask, is_features):  # the definition ignores padding tokens: give the reference finite values
        if x is None or mask is None:
            return x
        return x.masked_fill(~(mask.unsqueeze(-1) if is_features else mask), 0.0)

    ref_leaves = {n: x.detach().clone().requires_grad_() for n, x in leaves.items()}
    values = {**kw, **ref_leaves}
    expected = reference.maxsim(clean(values["text"], kw["text_mask"], True).double(),
                                clean(values["image"], kw["image_mask"], True).double(), kw["text_mask"],
                                kw["image_mask"], _float_or_none(clean(values["text_weight"], kw["text_mask"], False)),
                                _float_or_none(clean(values["image_weight"], kw["image_mask"], False)),
                                kw["reduction"])
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    # |⟨x, y⟩| <= |x|·|y|: the similarity scale that float rounding is relative to
    norms = [clean(x, m, True).double().norm(dim=-1).max() if x.numel() else torch.zeros(())
             for x, m in ((text, kw["text_mask"]), (image, kw["image_mask"]))]
    floor = float(norms[0] * norms[1])
    _assert_close("maxsim", ["score"], [score.detach()], [expected.detach()], tol, floor)
    OUTCOMES["maxsim"][f"correct result ({kw['backend']})"] += 1
    if leaves and score.numel():
        cotangent = torch.randn(score.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        grads = torch.autograd.grad((score * cotangent.to(score.dtype)).sum(), list(leaves.values()),
                                    allow_unused=True)
        expected_grads = torch.autograd.grad((expected * cotangent).sum(), list(ref_leaves.values()),
                                             allow_unused=True)
        grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves.values())]
        expected_grads = [torch.zeros_like(x, dtype=torch.float64) if g is None else g
                          for g, x in zip(expected_grads, leaves.values())]
        _check_gradients("maxsim", leaves, grads, expected_grads, 10 * tol, floor)


def check_coalitions(case: Case) -> None:
    result = _call("coalitions", cbd_fast.coalitions, case)
    if result is None:
        return
    kw = case.kwargs
    text_in, image_in = result
    shapes = ((kw["num_samples"], kw["batch"], kw["text_len"]), (kw["num_samples"], kw["batch"], kw["image_len"]))
    assert (tuple(text_in.shape), tuple(image_in.shape)) == shapes and text_in.dtype == torch.bool
    if not text_in.is_meta:
        expected = philox_coalitions(0, kw["num_samples"], kw["batch"], kw["text_len"], kw["image_len"], kw["seed"])
        assert torch.equal(text_in, expected[0]) and torch.equal(image_in, expected[1]), "coalitions: wrong bits"
    OUTCOMES["coalitions"]["correct result"] += 1


# --- running ------------------------------------------------------------------------------------------------------

FUZZERS = {
    "banzhaf_interaction": (st.one_of(banzhaf_cases(False), too_many_players()), lambda c: check_banzhaf(c, False)),
    "banzhaf_interaction_from_tokens": (banzhaf_cases(True), lambda c: check_banzhaf(c, True)),
    "maxsim": (maxsim_cases(), check_maxsim),
    "coalitions": (coalitions_cases(), check_coalitions),
}


def fuzz(op: str, examples: int) -> collections.Counter:
    """Runs ``examples`` derandomized hypothesis examples of ``op``; raises on the first failing one (shrunk)."""
    strategy, check = FUZZERS[op]

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None, print_blob=False,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(case):
        check(case)

    run()
    return OUTCOMES[op]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ops", nargs="*", help=f"ops to fuzz (default: all of {', '.join(FUZZERS)})")
    parser.add_argument("--examples", type=int, default=100, help="examples per op")
    args = parser.parse_args(argv)
    ops = args.ops or list(FUZZERS)
    unknown = sorted(set(ops) - set(FUZZERS))
    if unknown:
        parser.error(f"unknown ops {unknown}; choose from {list(FUZZERS)}")
    torch.set_num_threads(1)
    for op in ops:  # one line per op, as soon as it is done
        print(json.dumps({op: dict(sorted(fuzz(op, args.examples).items()))}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
