"""Second derivatives: the torch backend has them; every compiled op (C++, CUDA, Triton) refuses them clearly."""
import pytest
import torch
from conftest import random_game, requires_extension

import cbd_fast

has_triton = cbd_fast.build_info()["triton"]
requires_triton = pytest.mark.skipif(not has_triton, reason="triton not installed")
# The CUDA backend's cases run on a GPU (.ci/gpu runs this file); here they are collected and skipped.
requires_cuda_kernels = [pytest.mark.gpu,
                         pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
                         pytest.mark.skipif(not cbd_fast.build_info()["cuda"], reason="CUDA kernels not compiled")]
NO_SECOND_DERIVATIVE = r"cbd_fast::\w+ has no second derivative.*backend='torch'"


def _features(seed=0, dtype=torch.float64, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    text = torch.randn(2, 3, 4, generator=gen, dtype=dtype).to(device).requires_grad_()
    image = torch.randn(2, 5, 4, generator=gen, dtype=dtype).to(device).requires_grad_()
    return text, image


def _ops(backend, device="cpu"):
    """(name, function of differentiable inputs, inputs) for each public op on ``backend``, in float64 on
    ``device``."""
    sim, text_mask, image_mask, text_weight, image_weight = (x.to(device) for x in random_game(2, 3, 4, seed=3))
    inputs = (sim.requires_grad_(), text_weight.requires_grad_(), image_weight.requires_grad_())
    text, image = _features(device=device)
    return [
        ("banzhaf_interaction", lambda s, tw, iw: tuple(cbd_fast.banzhaf_interaction(
            s, text_mask, image_mask, tw, iw, num_samples=8, seed=1, backend=backend)), inputs),
        ("banzhaf_interaction_from_tokens", lambda x, y: tuple(cbd_fast.banzhaf_interaction_from_tokens(
            x, y, num_samples=8, seed=1, backend=backend)), (text, image)),
        ("maxsim", lambda x, y, tw: cbd_fast.maxsim(x, y, text_weight=tw, backend=backend),
         (text, image, torch.randn(2, 3, dtype=torch.float64).to(device).requires_grad_())),
    ]


def _first_derivatives(fn, inputs, create_graph):
    outputs = fn(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return torch.autograd.grad(sum(o.sum() for o in outputs), inputs, create_graph=create_graph)


@pytest.mark.parametrize("index", range(3), ids=["banzhaf_interaction", "from_tokens", "maxsim"])
def test_torch_backend_passes_gradgradcheck(index):
    _, fn, inputs = _ops("torch")[index]
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("estimator", ["msr", "exact"])
def test_torch_backend_passes_gradgradcheck_for_every_estimator(estimator):
    sim, text_mask, image_mask, text_weight, image_weight = random_game(1, 2, 3, seed=5)

    def fn(s, tw):
        return tuple(cbd_fast.banzhaf_interaction(s, text_mask, image_mask, tw, image_weight, num_samples=8,
                                                  estimator=estimator, backend="torch"))

    assert torch.autograd.gradgradcheck(fn, (sim.requires_grad_(), text_weight.requires_grad_()))


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=requires_extension),
                                     pytest.param("cuda", marks=requires_cuda_kernels),
                                     pytest.param("triton", marks=requires_triton)])
@pytest.mark.parametrize("index", range(3), ids=["banzhaf_interaction", "from_tokens", "maxsim"])
def test_compiled_ops_refuse_second_derivatives(backend, index, kernel_device):
    """First derivatives taken with create_graph=True through each compiled backend, on its device (Triton: the GPU
    where there is one, else CPU under the interpreter), then a second backward: the clear error."""
    device = {"cpu": torch.device("cpu"), "cuda": torch.device("cuda")}.get(backend, kernel_device)
    _, fn, inputs = _ops(backend, device)[index]
    assert all(x.device.type == device.type for x in inputs)
    first = _first_derivatives(fn, inputs, create_graph=True)
    with pytest.raises(RuntimeError, match=NO_SECOND_DERIVATIVE):
        torch.autograd.grad(sum((g * g).sum() for g in first), inputs)
    # first derivatives taken with create_graph=True are the ordinary ones
    for with_graph, plain in zip(first, _first_derivatives(fn, inputs, create_graph=False)):
        torch.testing.assert_close(with_graph, plain, rtol=0, atol=0)


@requires_extension
def test_gradgradcheck_of_a_compiled_op_is_the_clear_error():
    sim = torch.randn(1, 2, 2, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"cbd_fast::banzhaf_interaction has no second derivative"):
        torch.autograd.gradgradcheck(lambda s: cbd_fast.banzhaf_interaction(s, num_samples=4, backend="cpu")[0],
                                     (sim,))


@requires_extension
def test_maxsim_score_refuses_second_derivatives_on_meta_tensors():
    """The maxsim_score op (C++ and CUDA kernels), run through its autograd formula and shape functions on meta
    tensors: the registration it shares with the Triton ops makes a second derivative the same clear error."""
    text, image = (x.detach().to("meta").requires_grad_() for x in _features(dtype=torch.float32))
    text_mask = torch.ones(2, 3, dtype=torch.bool, device="meta")
    image_mask = torch.ones(2, 5, dtype=torch.bool, device="meta")
    alpha = torch.empty(2, 3, device="meta", requires_grad=True)
    beta = torch.empty(2, 5, device="meta", requires_grad=True)
    score = torch.ops.cbd_fast.maxsim_score(text, image, text_mask, image_mask, alpha, beta)
    first = torch.autograd.grad(score.sum(), (text, image, alpha, beta), create_graph=True)
    assert first[0].shape == text.shape
    with pytest.raises(RuntimeError, match=r"cbd_fast::maxsim_score has no second derivative"):
        torch.autograd.grad(first[0].sum(), text)
    result = torch.ops.cbd_fast.banzhaf_interaction_from_tokens(
        text, image, text_mask, image_mask, alpha, beta, 8, 0, "paired")
    first = torch.autograd.grad(result[0].sum(), (text, image), create_graph=True)
    with pytest.raises(RuntimeError, match=NO_SECOND_DERIVATIVE):
        torch.autograd.grad(first[1].sum(), image)


@requires_extension
def test_every_compiled_backward_op_has_an_autograd_formula():
    """Every backward op the extension registers has an autograd formula (the refusal), so none is left to autograd's
    fallback, which only warns and treats its outputs as constants. (The Triton ops are torch.library custom ops,
    which always have one; their refusal is tested above.)"""
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("cbd_fast::") and n.endswith("backward")]
    assert {"cbd_fast::banzhaf_interaction_backward", "cbd_fast::maxsim_score_backward"} <= set(names)
    for name in names:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "Autograd"), name
