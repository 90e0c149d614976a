"""Semantics of banzhaf_interaction: exact enumeration, backend parity, gradients, edge cases, bad input."""
import pytest
import torch
from brute_force import exact_banzhaf
from conftest import random_game, requires_extension

import cbd_fast
from cbd_fast import reference

BACKENDS = [pytest.param("cpu", marks=requires_extension), "torch"]


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


@requires_extension
def test_cpu_kernel_refuses_non_finite_input_and_extreme_weight_spans():
    sim, text_mask, image_mask, text_weight, image_weight = random_game(2, 4, 5, seed=1, masked=False)
    bad = sim.clone()
    bad[1, 2, 3] = float("nan")
    with pytest.raises(RuntimeError, match="sim must be finite"):
        cbd_fast.banzhaf_interaction(bad, num_samples=4, backend="cpu")
    wide = text_weight.clone()
    wide[0, 0] = 40.0  # e^40 of one token against O(1) others: leave-one-out sums would cancel
    with pytest.raises(RuntimeError, match="text_weight logits of a pair span"):
        cbd_fast.banzhaf_interaction(sim, text_weight=wide, num_samples=4, backend="cpu")
    masked_wide = wide.clone()
    text_mask = torch.ones(2, 4, dtype=torch.bool)
    text_mask[0, 0] = False  # the extreme logit is on a padding token: not part of the game
    out = cbd_fast.banzhaf_interaction(sim, text_mask=text_mask, text_weight=masked_wide, num_samples=4,
                                       backend="cpu")
    assert torch.isfinite(out.interaction).all()


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
def test_triton_path_refuses_what_the_compiled_kernels_refuse(kernel_device):
    sim = torch.zeros(2, 3, 4, device=kernel_device)
    wide = torch.zeros(2, 3, device=kernel_device)
    wide[1, 0] = 30.0
    with pytest.raises(ValueError, match="text_weight logits of a pair span 30"):
        cbd_fast.banzhaf_interaction(sim, text_weight=wide, num_samples=4, backend="triton")
    with pytest.raises(ValueError, match="sim must be finite"):
        cbd_fast.banzhaf_interaction(torch.full((1, 2, 2), float("nan"), device=kernel_device), backend="triton")
    with pytest.raises(ValueError, match="exact"):
        cbd_fast.banzhaf_interaction(sim, estimator="exact", backend="triton")


def test_from_tokens_shape_mismatch():
    with pytest.raises(ValueError, match="agree in B and D"):
        cbd_fast.banzhaf_interaction_from_tokens(torch.randn(2, 3, 8), torch.randn(2, 4, 7))


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
