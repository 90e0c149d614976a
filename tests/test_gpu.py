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
