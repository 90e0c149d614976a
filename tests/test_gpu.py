"""GPU checks: run where a CUDA device is visible (`pytest tests -m gpu`); skipped elsewhere."""
import pytest
import torch
from conftest import random_game

import cbd_fast

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.skipif(not cbd_fast.build_info()["cuda"], reason="CUDA kernels not compiled")
def test_cuda_coalitions_match_cpu():
    cpu = cbd_fast.coalitions(7, 77, 300, 33, seed=2**40 + 1)
    gpu = cbd_fast.coalitions(7, 77, 300, 33, seed=2**40 + 1, device="cuda")
    assert torch.equal(cpu[0], gpu[0].cpu()) and torch.equal(cpu[1], gpu[1].cpu())


@pytest.mark.parametrize("estimator", ["paired", "msr", "exact"])
def test_torch_backend_on_gpu_matches_cpu(estimator):
    game = random_game(3, 4, 5, seed=1)
    cpu = cbd_fast.banzhaf_interaction(*game, num_samples=64, seed=3, estimator=estimator)
    gpu = cbd_fast.banzhaf_interaction(*(x.cuda() for x in game), num_samples=64, seed=3, estimator=estimator)
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-10, atol=1e-12)


# --- parity of the Triton and CUDA kernels with the C++ kernels at realistic sizes -------------------------------

GPU_BACKENDS = [pytest.param("triton", marks=pytest.mark.skipif(not cbd_fast.build_info()["triton"],
                                                                 reason="triton not installed")),
                pytest.param("cuda", marks=pytest.mark.skipif(not cbd_fast.build_info()["cuda"],
                                                               reason="CUDA kernels not compiled"))]
SIZES = [(4, 32, 50), (2, 77, 197), (1, 256, 576)]


def _half_tolerance(dtype):
    return dict(rtol=1e-5, atol=1e-6) if dtype in (torch.float32, torch.float64) else dict(rtol=2e-3, atol=2e-4)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("size", SIZES, ids=str)
@pytest.mark.parametrize("estimator", ["paired", "msr"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_banzhaf_gpu_matches_cpu_forward_and_backward(backend, size, estimator, dtype):
    sim, text_mask, image_mask, text_weight, image_weight = random_game(*size, dtype=torch.float32, seed=5)
    leaves_cpu = [x.clone().requires_grad_(True) for x in ((sim / 3).to(dtype), text_weight, image_weight)]
    leaves_gpu = [x.detach().cuda().requires_grad_(True) for x in leaves_cpu]
    out_cpu = cbd_fast.banzhaf_interaction(leaves_cpu[0], text_mask, image_mask, *leaves_cpu[1:], num_samples=64,
                                           seed=11, estimator=estimator, backend="cpu")
    out_gpu = cbd_fast.banzhaf_interaction(leaves_gpu[0], text_mask.cuda(), image_mask.cuda(), *leaves_gpu[1:],
                                           num_samples=64, seed=11, estimator=estimator, backend=backend)
    for a, b in zip(out_cpu, out_gpu):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-5)
    gen = torch.Generator().manual_seed(0)
    upstream = [torch.randn(x.shape, generator=gen, dtype=x.dtype) for x in out_cpu]
    grads_cpu = torch.autograd.grad(out_cpu, leaves_cpu, upstream)
    grads_gpu = torch.autograd.grad(out_gpu, leaves_gpu, [u.cuda() for u in upstream])
    for a, b in zip(grads_cpu, grads_gpu):  # grad_sim is rounded to sim's dtype: one bf16 ulp apart at most
        tolerance = dict(rtol=1e-2, atol=1e-4) if a.dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b.cpu(), a, **tolerance)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_banzhaf_from_tokens_gpu_matches_cpu(backend, dtype):
    gen = torch.Generator().manual_seed(3)
    text = torch.nn.functional.normalize(torch.randn(8, 32, 64, generator=gen), dim=-1).to(dtype)
    image = torch.nn.functional.normalize(torch.randn(8, 50, 64, generator=gen), dim=-1).to(dtype)
    cpu = cbd_fast.banzhaf_interaction_from_tokens(text, image, num_samples=128, seed=4, backend="cpu")
    gpu = cbd_fast.banzhaf_interaction_from_tokens(text.cuda(), image.cuda(), num_samples=128, seed=4,
                                                   backend=backend)
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b.cpu(), a, **_half_tolerance(dtype))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_banzhaf_gpu_is_bitwise_deterministic(backend):
    game = [x.cuda() for x in random_game(16, 32, 50, dtype=torch.float32, seed=2)]
    first = cbd_fast.banzhaf_interaction(*game, num_samples=1024, seed=9, backend=backend)
    for _ in range(3):
        again = cbd_fast.banzhaf_interaction(*game, num_samples=1024, seed=9, backend=backend)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_banzhaf_gpu_limits_are_clear_errors(backend):
    with pytest.raises(ValueError, match="T <= 256 and V <= 576"):
        cbd_fast.banzhaf_interaction(torch.zeros(1, 257, 4, device="cuda"), num_samples=4, backend=backend)
    with pytest.raises(ValueError, match="exact"):
        cbd_fast.banzhaf_interaction(torch.zeros(1, 2, 2, device="cuda"), estimator="exact", backend=backend)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("shape", [(16, 16, 32, 50, 512), (3, 5, 77, 197, 64), (2, 2, 256, 576, 1024)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", ["wti", "sum"])
def test_maxsim_gpu_matches_cpu(backend, shape, dtype, reduction):
    num_texts, num_images, text_len, image_len, dim = shape
    gen = torch.Generator().manual_seed(1)
    text = torch.nn.functional.normalize(torch.randn(num_texts, text_len, dim, generator=gen), dim=-1).to(dtype)
    image = torch.nn.functional.normalize(torch.randn(num_images, image_len, dim, generator=gen), dim=-1).to(dtype)
    text_mask = torch.rand(num_texts, text_len, generator=gen) < 0.8
    image_mask = torch.rand(num_images, image_len, generator=gen) < 0.9
    text_mask[0] = False  # a text with no valid token scores 0
    weights = [torch.randn(num_texts, text_len, generator=gen), torch.randn(num_images, image_len, generator=gen)]
    leaves_cpu = [x.clone().requires_grad_(True) for x in (text, image, *weights)]
    leaves_gpu = [x.detach().cuda().requires_grad_(True) for x in leaves_cpu]
    score_cpu = cbd_fast.maxsim(leaves_cpu[0], leaves_cpu[1], text_mask, image_mask, *leaves_cpu[2:],
                                reduction=reduction, backend="cpu")
    score_gpu = cbd_fast.maxsim(leaves_gpu[0], leaves_gpu[1], text_mask.cuda(), image_mask.cuda(), *leaves_gpu[2:],
                                reduction=reduction, backend=backend)
    torch.testing.assert_close(score_gpu.cpu(), score_cpu, **_half_tolerance(dtype))
    upstream = torch.randn(score_cpu.shape, generator=gen, dtype=score_cpu.dtype)
    # "sum" ignores the weight logits: the C++ op returns zero gradients for them, the GPU path leaves them out of
    # the graph; both mean zero.
    unused = dict(allow_unused=True, materialize_grads=True)
    grads_cpu = torch.autograd.grad(score_cpu, leaves_cpu, upstream, **unused)
    grads_gpu = torch.autograd.grad(score_gpu, leaves_gpu, upstream.cuda(), **unused)
    for a, b in zip(grads_cpu, grads_gpu):  # feature gradients come back in the features' dtype
        tolerance = dict(rtol=1e-2, atol=1e-3) if a.dtype == torch.bfloat16 else _half_tolerance(dtype)
        torch.testing.assert_close(b.cpu(), a, **tolerance)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_maxsim_gpu_is_bitwise_deterministic_and_light(backend):
    gen = torch.Generator(device="cuda").manual_seed(0)
    text = torch.randn(256, 32, 512, device="cuda", generator=gen, requires_grad=True)
    image = torch.randn(256, 50, 512, device="cuda", generator=gen, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    score = cbd_fast.maxsim(text, image, backend=backend)
    grads = torch.autograd.grad(score.sum(), (text, image))
    # The gradients (43 MB) and at most O(Bt·Bi·(T+V)) saved maxima, never the [Bt, Bi, T, V] similarity tensor
    # (420 MB here in fp32).
    similarity_bytes = 256 * 256 * 32 * 50 * 4
    assert torch.cuda.max_memory_allocated() - base < similarity_bytes / 3
    again = cbd_fast.maxsim(text, image, backend=backend)
    grads_again = torch.autograd.grad(again.sum(), (text, image))
    assert torch.equal(score, again) and all(torch.equal(a, b) for a, b in zip(grads, grads_again))


def test_auto_backend_uses_the_gpu_kernels():
    from cbd_fast._backend import resolve_backend

    chosen = resolve_backend("auto", torch.device("cuda"), "banzhaf_interaction")
    info = cbd_fast.build_info()
    assert chosen in (("cuda", "triton") if info["cuda"] or info["triton"] else ("torch",))
