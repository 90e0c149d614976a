"""Semantics of banzhaf_interaction: exact enumeration, backend parity, gradients, edge cases, bad input."""
import functools
import subprocess
import sys

import pytest
import torch
from brute_force import exact_banzhaf
from conftest import random_game, requires_extension

import cbd_fast
from cbd_fast import reference

BACKENDS = [pytest.param("cpu", marks=requires_extension), "torch"]
# every backend that runs without a GPU (Triton under its interpreter)
ALL_CPU_BACKENDS = BACKENDS + [pytest.param("triton", marks=pytest.mark.skipif(
    not cbd_fast.build_info()["triton"], reason="triton not installed"))]


def brute_force_batch(sim, text_mask, image_mask, text_weight, image_weight):
    outputs = [exact_banzhaf(sim[b].tolist(), text_mask[b].tolist(), image_mask[b].tolist(),
                             text_weight[b].tolist(), image_weight[b].tolist()) for b in range(sim.shape[0])]
    return tuple(torch.tensor([o[k] for o in outputs], dtype=torch.float64) for k in range(3))


def assert_result_close(actual, expected, rtol, atol):
    for name, a, e in zip(("interaction", "text_value", "image_value"), actual, expected):
        torch.testing.assert_close(a, e.to(a.dtype), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


# --- exact enumeration ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("shape,seed", [((3, 3, 4), 0), ((2, 4, 3), 1), ((2, 1, 5), 2), ((2, 5, 1), 3)])
def test_exact_matches_brute_force(backend, shape, seed):
    game = random_game(*shape, seed=seed)
    expected = brute_force_batch(*game)
    if backend == "reference":
        actual = reference.banzhaf_interaction(*game, estimator="exact")
    else:
        actual = cbd_fast.banzhaf_interaction(*game, estimator="exact", backend=backend)
    assert_result_close(actual, expected, rtol=1e-10, atol=1e-12)
    # invalid tokens are not players
    assert (actual.interaction[~game[1]] == 0).all() and (actual.text_value[~game[1]] == 0).all()


def test_exact_with_ties_matches_brute_force():
    sim = torch.tensor([[[0.5, 0.5, 0.1], [0.5, -0.2, 0.5], [0.3, 0.3, 0.3]]], dtype=torch.float64)
    game = (sim, torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 3, dtype=torch.bool),
            torch.zeros(1, 3, dtype=torch.float64), torch.zeros(1, 3, dtype=torch.float64))
    expected = brute_force_batch(*game)
    for backend in ("cpu", "torch") if cbd_fast.has_extension() else ("torch",):
        assert_result_close(cbd_fast.banzhaf_interaction(*game, estimator="exact", backend=backend), expected,
                            rtol=1e-10, atol=1e-12)


# --- backend parity: same seed, same coalitions, same estimate ------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ["paired", "msr"])
@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float64, 1e-10, 1e-12), (torch.float32, 1e-5, 1e-6)])
def test_backend_matches_reference(backend, estimator, dtype, rtol, atol):
    game = random_game(3, 6, 7, dtype=dtype, seed=11)
    expected = reference.banzhaf_interaction(*(x.double() if x.is_floating_point() else x for x in game),
                                             num_samples=48, seed=5, estimator=estimator)
    actual = cbd_fast.banzhaf_interaction(*game, num_samples=48, seed=5, estimator=estimator, backend=backend)
    assert actual.interaction.dtype == dtype
    assert_result_close(actual, expected, rtol=rtol, atol=atol)


@requires_extension
def test_cpu_estimate_uses_the_published_coalitions():
    """One draw of the paired estimate, recomputed by hand from cbd_fast.coalitions and the game value."""
    sim, text_mask, image_mask, text_weight, image_weight = random_game(2, 4, 5, seed=3, masked=False)
    text_in, image_in = cbd_fast.coalitions(2, 4, 5, 1, seed=99)
    estimate = cbd_fast.banzhaf_interaction(sim, text_mask, image_mask, text_weight, image_weight, num_samples=1,
                                            seed=99, backend="cpu")
    text_w, image_w = text_weight.exp(), image_weight.exp()
    for b in range(2):
        for i in range(4):
            for j in range(5):
                a = text_in[0, b].clone()
                c = image_in[0, b].clone()
                values = {}
                for a_i in (0, 1):
                    for c_j in (0, 1):
                        a[i], c[j] = bool(a_i), bool(c_j)
                        values[a_i, c_j] = reference.coalition_value(sim[b], a, c, text_w[b], image_w[b])
                expected = values[1, 1] - values[1, 0] - values[0, 1] + values[0, 0]
                torch.testing.assert_close(estimate.interaction[b, i, j], expected, rtol=1e-10, atol=1e-12)


@requires_extension
@pytest.mark.parametrize("estimator", ["paired", "msr", "exact"])
def test_cpu_result_independent_of_thread_count(estimator):
    game = random_game(5, 4, 5, dtype=torch.float32, seed=4)
    sim = game[0].clone().requires_grad_()
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out = cbd_fast.banzhaf_interaction(sim, *game[1:], num_samples=64, seed=1, estimator=estimator,
                                           backend="cpu")
        (grad,) = torch.autograd.grad(out.interaction.sum() + out.text_value.sum(), sim)
        results.append((*out, grad))
    for first, second in zip(*results):
        assert torch.equal(first, second)


def spanning_game(span, seed=0):
    """Cosine similarities of unit features in float32, ~20% padding, and weight logits whose valid values span
    exactly `span` in every pair (a token at each end)."""
    batch, text_len, image_len = 3, 6, 7
    gen = torch.Generator().manual_seed(seed)
    text = torch.nn.functional.normalize(torch.randn(batch, text_len, 16, generator=gen), dim=-1)
    image = torch.nn.functional.normalize(torch.randn(batch, image_len, 16, generator=gen), dim=-1)
    text_mask = torch.rand(batch, text_len, generator=gen) > 0.2
    image_mask = torch.rand(batch, image_len, generator=gen) > 0.2
    text_mask[:, :2] = True
    image_mask[:, :2] = True

    def logits(length):
        x = torch.rand(batch, length, generator=gen)
        x[:, 0], x[:, 1] = 0.0, 1.0
        return span * (x - 0.5)

    return torch.bmm(text, image.transpose(1, 2)), text_mask, image_mask, logits(text_len), logits(image_len)


def relative_error(actual, expected):
    """Largest deviation relative to the largest entry (entries near 0 have no relative precision to speak of)."""
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max())


@requires_extension
@pytest.mark.parametrize("span", [0, 12, 20, 27])
@pytest.mark.parametrize("estimator", ["paired", "msr"])
def test_cpu_float32_keeps_float64_precision_over_the_weight_span(estimator, span):
    """float32 sims are estimated in float32 to within 1e-6 of the float64 reference (relative to the largest
    entry of each output) at every weight span the op accepts: the leave-one-out sums are exact, so weights
    e^27 apart cancel nothing. Gradients are within 1e-5 of the float64 kernel's."""
    game = spanning_game(span)
    expected = reference.banzhaf_interaction(*(x.double() if x.is_floating_point() else x for x in game),
                                             num_samples=64, seed=3, estimator=estimator)
    actual = cbd_fast.banzhaf_interaction(*game, num_samples=64, seed=3, estimator=estimator, backend="cpu")
    assert actual.interaction.dtype == torch.float32
    for name, a, e in zip(("interaction", "text_value", "image_value"), actual, expected):
        assert relative_error(a, e) <= 1e-6, (name, relative_error(a, e))

    def gradients(dtype):
        leaves = [x.to(dtype).requires_grad_() for x in (game[0], game[3], game[4])]
        out = cbd_fast.banzhaf_interaction(leaves[0], game[1], game[2], *leaves[1:], num_samples=64, seed=3,
                                           estimator=estimator, backend="cpu")
        gen = torch.Generator().manual_seed(1)
        return torch.autograd.grad(out, leaves, [torch.randn(x.shape, generator=gen).to(dtype) for x in out])

    for name, a, e in zip(("sim", "text_weight", "image_weight"), gradients(torch.float32), gradients(torch.float64)):
        assert relative_error(a, e) <= 1e-5, (name, relative_error(a, e))


@requires_extension
@pytest.mark.skipif(cbd_fast.build_info().get("cpu_isa") not in ("avx2", "avx512"), reason="needs an AVX2 CPU")
def test_cpu_instruction_set_versions_agree_bit_for_bit(monkeypatch):
    """The AVX2 and the portable versions run the same IEEE operations in the same order."""
    runs = []
    for isa in ("avx2", "portable"):
        monkeypatch.setenv("CBD_FAST_CPU_ISA", isa)
        outputs = []
        for estimator, dtype in (("paired", torch.float32), ("paired", torch.float64), ("msr", torch.float32),
                                 ("exact", torch.float32)):
            shape = (3, 5, 4) if estimator == "exact" else (3, 9, 13)
            sim, text_mask, image_mask, text_weight, image_weight = random_game(*shape, dtype=dtype, seed=7)
            leaves = [x.requires_grad_() for x in (sim, text_weight, image_weight)]
            out = cbd_fast.banzhaf_interaction(leaves[0], text_mask, image_mask, *leaves[1:], num_samples=40,
                                               seed=5, estimator=estimator, backend="cpu")
            gen = torch.Generator().manual_seed(1)
            outputs += [*out, *torch.autograd.grad(out, leaves, [torch.randn(x.shape, generator=gen, dtype=dtype)
                                                                  for x in out])]
        runs.append(outputs)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@requires_extension
def test_same_seed_same_result_other_seed_differs():
    game = random_game(2, 5, 6, seed=8)
    first = cbd_fast.banzhaf_interaction(*game, num_samples=32, seed=3)
    again = cbd_fast.banzhaf_interaction(*game, num_samples=32, seed=3)
    other = cbd_fast.banzhaf_interaction(*game, num_samples=32, seed=4)
    assert torch.equal(first.interaction, again.interaction)
    assert not torch.allclose(first.interaction, other.interaction)


# --- gradients ----------------------------------------------------------------------------------------------------

@requires_extension
@pytest.mark.parametrize("estimator", ["paired", "msr", "exact"])
def test_cpu_gradcheck(estimator):
    sim, text_mask, image_mask, text_weight, image_weight = random_game(2, 3, 4, seed=21)
    inputs = (sim.requires_grad_(), text_weight.requires_grad_(), image_weight.requires_grad_())

    def fn(s, tw, iw):
        return tuple(cbd_fast.banzhaf_interaction(s, text_mask, image_mask, tw, iw, num_samples=16, seed=2,
                                                  estimator=estimator, backend="cpu"))

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ["paired", "msr"])
def test_gradients_match_reference_autograd(backend, estimator):
    game = random_game(3, 5, 6, seed=31)
    cotangents = [torch.randn(3, 5, 6, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64),
                  torch.randn(3, 6, dtype=torch.float64)]
    grads = []
    for run in ("reference", backend):
        sim, tw, iw = (game[0].clone().requires_grad_(), game[3].clone().requires_grad_(),
                       game[4].clone().requires_grad_())
        args = (sim, game[1], game[2], tw, iw)
        kwargs = dict(num_samples=24, seed=6, estimator=estimator)
        out = reference.banzhaf_interaction(*args, **kwargs) if run == "reference" else \
            cbd_fast.banzhaf_interaction(*args, **kwargs, backend=backend)
        loss = sum((o * c).sum() for o, c in zip(out, cotangents))
        grads.append(torch.autograd.grad(loss, (sim, tw, iw)))
    for expected, actual in zip(*grads):
        torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-11)


@requires_extension
def test_opcheck():
    sim, text_mask, image_mask, text_weight, image_weight = random_game(2, 3, 4, dtype=torch.float32, seed=1)
    args = (sim.requires_grad_(), text_mask, image_mask, text_weight.requires_grad_(),
            image_weight.requires_grad_(), 8, 0, "paired")
    torch.library.opcheck(torch.ops.cbd_fast.banzhaf_interaction.default, args)
    torch.library.opcheck(torch.ops.cbd_fast.banzhaf_interaction.default, args[:-1] + ("msr",))


# --- token-feature entry point --------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_from_tokens_equals_similarity_path_and_is_differentiable(backend):
    gen = torch.Generator().manual_seed(0)
    text = torch.randn(2, 4, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    image = torch.randn(2, 5, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    out = cbd_fast.banzhaf_interaction_from_tokens(text, image, num_samples=16, seed=1, backend=backend)
    expected = reference.banzhaf_interaction_from_tokens(text, image, num_samples=16, seed=1)
    assert_result_close(out, expected, rtol=1e-10, atol=1e-12)
    grad_text, grad_image = torch.autograd.grad(out.interaction.sum(), (text, image))
    ref_text, ref_image = torch.autograd.grad(expected.interaction.sum(), (text, image))
    torch.testing.assert_close(grad_text, ref_text)
    torch.testing.assert_close(grad_image, ref_image)


# --- edge cases -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_all_masked_pairs_give_zero_and_finite_gradients(backend):
    sim, text_mask, image_mask, text_weight, image_weight = random_game(3, 4, 5, seed=2, masked=False)
    text_mask[1] = False  # no text tokens at all
    image_mask[2] = False  # no image tokens at all
    sim.requires_grad_()
    text_weight.requires_grad_()
    out = cbd_fast.banzhaf_interaction(sim, text_mask, image_mask, text_weight, image_weight, num_samples=16,
                                       backend=backend)
    for x in out:
        assert torch.isfinite(x).all()
    assert (out.interaction[1:] == 0).all() and (out.text_value[1:] == 0).all()
    assert (out.image_value[1:] == 0).all()
    assert out.interaction[0].abs().sum() > 0
    grads = torch.autograd.grad(sum(x.sum() for x in out), (sim, text_weight))
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[0][1:] == 0).all()


@requires_extension
def test_single_player_per_side():
    sim = torch.tensor([[[0.7]]], dtype=torch.float64)
    out = cbd_fast.banzhaf_interaction(sim, estimator="exact")
    # v({i},{j}) = 0.7, every smaller coalition is worth 0: I = 0.7, phi = 0.7 / 2
    torch.testing.assert_close(out.interaction, torch.full((1, 1, 1), 0.7, dtype=torch.float64))
    torch.testing.assert_close(out.text_value, torch.full((1, 1), 0.35, dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    sim, text_mask, image_mask, text_weight, image_weight = random_game(2, 5, 4, seed=9)
    sim_t = sim.transpose(1, 2).contiguous().transpose(1, 2)  # same values, non-contiguous strides
    assert not sim_t.is_contiguous()
    wide = torch.zeros(2, 10, dtype=torch.float64)
    wide[:, ::2] = text_weight
    expected = cbd_fast.banzhaf_interaction(sim, text_mask, image_mask, text_weight, image_weight, num_samples=16,
                                            backend=backend)
    actual = cbd_fast.banzhaf_interaction(sim_t, text_mask, image_mask, wide[:, ::2], image_weight, num_samples=16,
                                          backend=backend)
    assert_result_close(actual, expected, rtol=0, atol=0)


@requires_extension
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_float32(dtype):
    sim, text_mask, image_mask, text_weight, image_weight = random_game(2, 6, 5, dtype=dtype, seed=12)
    out = cbd_fast.banzhaf_interaction(sim, text_mask, image_mask, text_weight, image_weight, num_samples=32)
    assert out.interaction.dtype == torch.float32
    expected = reference.banzhaf_interaction(sim.double(), text_mask, image_mask, text_weight.double(),
                                             image_weight.double(), num_samples=32)
    assert_result_close(out, expected, rtol=1e-5, atol=1e-6)  # the upcast is exact: only float32 rounding is left
    sim.requires_grad_()
    (grad,) = torch.autograd.grad(cbd_fast.banzhaf_interaction(sim, text_mask, image_mask, num_samples=8)
                                  .interaction.sum(), sim)
    assert grad.dtype == dtype and torch.isfinite(grad.float()).all()


# --- bad input ------------------------------------------------------------------------------------------------------

def _ok():
    return random_game(2, 3, 4, dtype=torch.float32, seed=0, masked=False)


@pytest.mark.parametrize("mutate,error,match", [
    (lambda a: a.update(sim=torch.randn(3, 4)), ValueError, r"sim must have shape \[B,T,V\]"),
    (lambda a: a.update(sim=torch.ones(2, 3, 4, dtype=torch.int64)), TypeError, "sim must be float"),
    (lambda a: a.update(sim=torch.randn(2, 0, 4)), ValueError, "B, T, V >= 1"),
    (lambda a: a.update(text_mask=torch.ones(2, 3, dtype=torch.int64)), TypeError, "text_mask must be a bool"),
    (lambda a: a.update(text_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, r"text_mask must have shape"),
    (lambda a: a.update(image_mask=torch.ones(1, 4, dtype=torch.bool)), ValueError, r"image_mask must have shape"),
    (lambda a: a.update(text_weight=torch.zeros(2, 3, dtype=torch.int64)), TypeError, "text_weight must be"),
    (lambda a: a.update(image_weight=torch.zeros(2, 5)), ValueError, r"image_weight must have shape"),
    (lambda a: a.update(text_mask=torch.ones(2, 3, dtype=torch.bool, device="meta")), ValueError,
     "text_mask is on meta"),
    (lambda a: a.update(num_samples=0), ValueError, "num_samples"),
    (lambda a: a.update(num_samples=-3), ValueError, "num_samples"),
    (lambda a: a.update(num_samples=2.5), TypeError, "num_samples"),
    (lambda a: a.update(seed=-1), ValueError, "seed"),
    (lambda a: a.update(estimator="shapley"), ValueError, "estimator must be one of"),
    (lambda a: a.update(backend="fortran"), ValueError, "backend must be one of"),
    (lambda a: a.update(sim=torch.randn(1, 11, 10), text_mask=None, image_mask=None, text_weight=None,
                        image_weight=None, estimator="exact"), ValueError, "n=21"),
])
def test_bad_input_is_a_clear_error(mutate, error, match):
    sim, text_mask, image_mask, text_weight, image_weight = _ok()
    args = dict(sim=sim, text_mask=text_mask, image_mask=image_mask, text_weight=text_weight,
                image_weight=image_weight, num_samples=4, seed=0, estimator="paired", backend="auto")
    mutate(args)
    with pytest.raises(error, match=match):
        cbd_fast.banzhaf_interaction(**args)


@pytest.mark.parametrize("backend", ALL_CPU_BACKENDS)
def test_every_backend_refuses_non_finite_values_and_wide_weight_spans(backend, kernel_device):
    device = kernel_device if backend == "triton" else torch.device("cpu")
    sim, text_mask, image_mask, text_weight, image_weight = (
        x.to(device) for x in random_game(2, 4, 5, dtype=torch.float32, seed=1, masked=False))
    run = functools.partial(cbd_fast.banzhaf_interaction, num_samples=4, backend=backend)
    for value in (float("nan"), float("inf")):
        bad = sim.clone()
        bad[1, 2, 3] = value
        with pytest.raises(ValueError, match="banzhaf_interaction: sim must be finite"):
            run(bad)
    for name, weight in (("text_weight", text_weight), ("image_weight", image_weight)):
        bad = weight.clone()
        bad[1, 0] = float("nan")
        with pytest.raises(ValueError, match=f"{name} must be finite on valid tokens"):
            run(sim, **{name: bad})
        wide = weight.clone()
        wide[1] = torch.linspace(-20.0, 7.01, weight.shape[1])  # e^27 between two tokens: leave-one-out territory
        with pytest.raises(ValueError, match=f"valid {name} logits of a pair span 27 > 27"):
            run(sim, **{name: wide})
    # what lies on padding tokens is not part of the game
    text_mask = text_mask.clone()
    text_mask[0, 0] = False
    padded = text_weight.clone()
    padded[0, 0] = float("nan")
    assert torch.isfinite(run(sim, text_mask=text_mask, text_weight=padded).interaction).all()
    padded[0, 0] = 100.0
    assert torch.isfinite(run(sim, text_mask=text_mask, text_weight=padded).interaction).all()
    at_limit = text_weight.clone()
    at_limit[1] = torch.linspace(-20.0, 7.0, text_weight.shape[1])
    assert torch.isfinite(run(sim, text_weight=at_limit).interaction).all()


@pytest.mark.parametrize("backend", ALL_CPU_BACKENDS)
def test_from_tokens_refuses_non_finite_features_and_overflowing_similarities(backend, kernel_device):
    device = kernel_device if backend == "triton" else torch.device("cpu")
    text, image = torch.randn(2, 3, 4, device=device), torch.randn(2, 5, 4, device=device)
    run = functools.partial(cbd_fast.banzhaf_interaction_from_tokens, num_samples=4, backend=backend)
    bad = image.clone()
    bad[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="banzhaf_interaction_from_tokens: text and image must be finite"):
        run(text, bad)
    huge_text, huge_image = text.clone(), image.clone()
    huge_text[0, 1], huge_image[0, 2] = 1e20, 1e20  # finite, but their product is not in float32
    with pytest.raises(ValueError, match="text·imageᵀ overflow torch.float32"):
        run(huge_text, huge_image)
    assert torch.isfinite(run(huge_text.double(), huge_image.double()).interaction).all()  # float64 holds it


@requires_extension
def test_compiled_op_checks_values_itself():
    """The public functions check values for every backend; the registered op keeps its own checks for direct
    calls."""
    sim, text_mask, image_mask, text_weight, image_weight = random_game(2, 4, 5, seed=1, masked=False)
    bad = sim.clone()
    bad[1, 2, 3] = float("nan")
    with pytest.raises(RuntimeError, match="sim must be finite"):
        torch.ops.cbd_fast.banzhaf_interaction(bad, text_mask, image_mask, text_weight, image_weight, 4, 0,
                                               "paired")


def _skewed_game(span: float, kind: str, seed: int):
    """fp32 game whose valid weight logits span exactly ``span`` in every pair: ``spread`` logits uniform in
    [0, span]; ``dominant`` one token per side at ``span`` and all others at 0, the case where leave-one-out sums
    by subtraction cancel. Returns (float32 inputs, float64 copies of the same values)."""
    batch, text_len, image_len = 4, 6, 7
    gen = torch.Generator().manual_seed(seed)
    sim = torch.randn(batch, text_len, image_len, generator=gen)
    weights = []
    for length in (text_len, image_len):
        if kind == "spread":
            logits = torch.rand(batch, length, generator=gen) * span
            logits[:, 0], logits[:, 1] = 0.0, span
        else:
            logits = torch.zeros(batch, length)
            logits[torch.arange(batch), torch.randint(0, length, (batch,), generator=gen)] = span
        weights.append(logits)
    return (sim, *weights), tuple(x.double() for x in (sim, *weights))


# Error bounds, relative to the largest output of the reference, that each backend meets in float32 at each span.
# The C++ kernel's leave-one-out sums are a float64 total minus the own term (csrc/banzhaf_common.h): near the span
# limit that keeps about 1e-4 relative precision in the sums, which shows up at 27. The torch backend takes the
# heaviest member's sum without subtracting (cbd_fast/_banzhaf_torch.py) and keeps float32 precision throughout.
SPAN_TOLERANCE = {"torch": lambda span: (1e-6, 1e-5), "cpu": lambda span: (1e-6, 1e-5) if span < 27 else (1e-4, 1e-3)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["spread", "dominant"])
@pytest.mark.parametrize("span", [0.0, 12.0, 20.0, 27.0])
def test_float32_accuracy_over_the_weight_logit_span(backend, kind, span):
    forward_tol, gradient_tol = SPAN_TOLERANCE[backend](span)
    game32, game64 = _skewed_game(span, kind, seed=int(span))
    gen = torch.Generator().manual_seed(1)
    cotangents = [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in ((4, 6, 7), (4, 6), (4, 7))]

    def run(fn, sim, text_weight, image_weight):
        inputs = [x.clone().requires_grad_() for x in (sim, text_weight, image_weight)]
        out = fn(inputs[0], None, None, inputs[1], inputs[2], num_samples=64, seed=3)
        grads = torch.autograd.grad(sum((o * c.to(o.dtype)).sum() for o, c in zip(out, cotangents)), inputs)
        return [o.detach() for o in out], grads

    expected, expected_grads = run(reference.banzhaf_interaction, *game64)
    actual, actual_grads = run(functools.partial(cbd_fast.banzhaf_interaction, backend=backend), *game32)
    for name, a, e, tol in [*zip(("interaction", "text_value", "image_value"), actual, expected, [forward_tol] * 3),
                            *zip(("grad sim", "grad text_weight", "grad image_weight"), actual_grads,
                                 expected_grads, [gradient_tol] * 3)]:
        assert a.dtype == torch.float32 and torch.isfinite(a).all(), name
        error = float((a.double() - e).abs().max() / e.abs().max())
        assert error <= tol, f"{name}: error {error:.2e} of the largest entry > {tol:.0e} at span {span}"


@requires_extension
def test_cpu_kernel_size_limit_is_a_clear_error():
    with pytest.raises(ValueError, match="T, V <= 4096"):
        cbd_fast.banzhaf_interaction(torch.zeros(1, 1, 4097), num_samples=1, backend="cpu")


@requires_extension
@pytest.mark.parametrize("shape", [(0, 2, 3), (2, 0, 3), (2, 3, 0)])
def test_raw_cpu_ops_refuse_empty_games(shape):
    """The registered ops, called directly, check every size they index with."""
    batch, text_len, image_len = shape
    game = (torch.zeros(shape), torch.ones(batch, text_len, dtype=torch.bool),
            torch.ones(batch, image_len, dtype=torch.bool), torch.zeros(batch, text_len), torch.zeros(batch, image_len))
    with pytest.raises(RuntimeError, match=r"sim must have B, T, V >= 1"):
        torch.ops.cbd_fast.banzhaf_interaction(*game, 4, 0, "paired")
    grads = (torch.zeros(shape), torch.zeros(batch, text_len), torch.zeros(batch, image_len))
    with pytest.raises(RuntimeError, match=r"sim must have B, T, V >= 1"):
        torch.ops.cbd_fast.banzhaf_interaction_backward(*grads, *game, 4, 0, "paired")


def test_backend_that_cannot_run_says_why():
    with pytest.raises(ValueError, match="backend='cuda'.*CUDA tensors"):
        cbd_fast.banzhaf_interaction(torch.zeros(1, 2, 2), backend="cuda")
    with pytest.raises(ValueError, match="backend='triton'.*meta"):
        cbd_fast.banzhaf_interaction(torch.zeros(1, 2, 2, device="meta"), backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        cbd_fast.banzhaf_interaction(torch.zeros(1, 2, 2), backend="gpu")
    if cbd_fast.has_extension():
        with pytest.raises(ValueError, match="CPU tensors"):
            cbd_fast.banzhaf_interaction(torch.zeros(1, 2, 2, device="meta"), backend="cpu")


@pytest.mark.skipif(not cbd_fast.build_info()["triton"], reason="triton not installed")
def test_triton_refuses_the_exact_estimator(kernel_device):
    with pytest.raises(ValueError, match="exact"):
        cbd_fast.banzhaf_interaction(torch.zeros(2, 3, 4, device=kernel_device), estimator="exact", backend="triton")


def test_from_tokens_shape_mismatch():
    with pytest.raises(ValueError, match="agree in B and D"):
        cbd_fast.banzhaf_interaction_from_tokens(torch.randn(2, 3, 8), torch.randn(2, 4, 7))


@pytest.mark.parametrize("text_shape,image_shape", [((2, 0, 4), (2, 3, 4)), ((2, 3, 4), (2, 0, 4)),
                                                    ((0, 3, 4), (0, 5, 4))])
def test_from_tokens_without_tokens_names_its_arguments(text_shape, image_shape):
    with pytest.raises(ValueError, match=r"text \[B,T,D\] and image \[B,V,D\] must have B, T, V >= 1"):
        cbd_fast.banzhaf_interaction_from_tokens(torch.randn(text_shape), torch.randn(image_shape))


@pytest.mark.parametrize("backend", BACKENDS)
def test_from_tokens_with_no_feature_dimension_is_the_zero_game(backend):
    out = cbd_fast.banzhaf_interaction_from_tokens(torch.randn(2, 3, 0), torch.randn(2, 4, 0), num_samples=8,
                                                   backend=backend)
    assert all(torch.equal(x, torch.zeros_like(x)) for x in out)


def _run_with_memory_cap(code: str, headroom: int = 2**30) -> subprocess.CompletedProcess:
    """Runs ``code`` after ``import torch, cbd_fast`` in a fresh interpreter whose address space may grow by at
    most ``headroom`` bytes: an allocation of several GiB fails there instead of filling this machine."""
    prelude = ("import resource, torch, cbd_fast\n"
               "size = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()\n"
               f"resource.setrlimit(resource.RLIMIT_AS, (size + {headroom}, size + {headroom}))\n")
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("call", [
    "cbd_fast.banzhaf_interaction(torch.zeros(1, 1, 1).expand(2**32, 1, 1), num_samples=1)",
    "cbd_fast.banzhaf_interaction_from_tokens(torch.zeros(1, 1, 1).expand(2**32, 1, 1), "
    "torch.zeros(1, 1, 1).expand(2**32, 1, 1), num_samples=1)",
], ids=["sim", "from_tokens"])
def test_batch_limit_is_checked_before_any_allocation_of_its_size(call):
    """A batch of 2**32 pairs (a stride-0 view: no memory) is refused before the default masks and weights,
    B×(T+V) each (40 GiB here), are allocated."""
    result = _run_with_memory_cap(f"try:\n    {call}\nexcept ValueError as error:\n    print(error)\n")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "the batch B must be < 2**32" in result.stdout


def test_meta_tensors_trace_shapes_and_refuse_the_exact_estimator():
    sim = torch.empty(2, 3, 4, device="meta")
    out = cbd_fast.banzhaf_interaction(sim, num_samples=8)
    assert [tuple(x.shape) for x in out] == [(2, 3, 4), (2, 3), (2, 4)] and out.interaction.is_meta
    with pytest.raises(ValueError, match="estimator='exact'.*meta tensors"):
        cbd_fast.banzhaf_interaction(sim, estimator="exact")
    with pytest.raises(ValueError, match="estimator='exact'.*meta tensors"):
        cbd_fast.banzhaf_interaction_from_tokens(torch.empty(2, 3, 8, device="meta"),
                                                 torch.empty(2, 4, 8, device="meta"), estimator="exact")


@pytest.mark.skipif(not cbd_fast.build_info()["triton"], reason="triton not installed")
def test_triton_ops_pass_opcheck(kernel_device):
    from cbd_fast import _triton_ops

    sim, text_mask, image_mask, text_weight, image_weight = (
        x.to(kernel_device) for x in random_game(2, 3, 4, dtype=torch.float32, seed=7))
    sim.requires_grad_(True)
    torch.library.opcheck(_triton_ops.banzhaf_interaction,
                          (sim, text_mask, image_mask, text_weight, image_weight, 8, 3, "paired"))
    text = torch.randn(2, 3, 16, device=kernel_device, requires_grad=True)
    image = torch.randn(2, 4, 16, device=kernel_device, requires_grad=True)
    torch.library.opcheck(_triton_ops.banzhaf_interaction_from_tokens,
                          (text, image, text_mask, image_mask, text_weight, image_weight, 8, 3, "paired"))
    alpha = torch.full((2, 3), 1 / 3, device=kernel_device)
    beta = torch.full((2, 4), 1 / 4, device=kernel_device)
    torch.library.opcheck(_triton_ops.maxsim_score, (text, image, text_mask, image_mask, alpha, beta))
