import os
import sys

import pytest
import torch

# Without a GPU the Triton kernels run under the interpreter on CPU tensors. The flag must be set before any
# kernel module is imported (triton.jit reads it at decoration time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # brute_force.py and helpers

# Child interpreters (torchrun, kill -9 and Ctrl-C probes) start in the checkout's root. Without this, `python -c`
# and `python -m` put that folder first on sys.path and import the unbuilt source tree instead of the installed
# package (CI installs non-editable).
os.environ["PYTHONSAFEPATH"] = "1"

import cbd_fast  # noqa: E402

requires_extension = pytest.mark.skipif(not cbd_fast.has_extension(), reason="cbd_fast._C not built")


@pytest.fixture
def kernel_device():
    """Where the Triton kernels run in this session: the GPU when there is one, else CPU under the interpreter."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def random_game(batch, text_len, image_len, dtype=torch.float64, seed=0, masked=True, weighted=True):
    """sim, masks with some padding, and non-uniform weight logits for tests."""
    gen = torch.Generator().manual_seed(seed)
    sim = torch.randn(batch, text_len, image_len, generator=gen, dtype=torch.float64).to(dtype)
    text_mask = torch.ones(batch, text_len, dtype=torch.bool)
    image_mask = torch.ones(batch, image_len, dtype=torch.bool)
    if masked:
        text_lengths = torch.randint(1, text_len + 1, (batch,), generator=gen)
        image_lengths = torch.randint(1, image_len + 1, (batch,), generator=gen)
        text_mask = torch.arange(text_len) < text_lengths[:, None]
        image_mask = torch.rand(batch, image_len, generator=gen) < 0.8
        image_mask[torch.arange(batch), torch.randint(0, image_len, (batch,), generator=gen)] = True
        del image_lengths
    text_weight = torch.randn(batch, text_len, generator=gen, dtype=torch.float64).to(dtype) if weighted else None
    image_weight = torch.randn(batch, image_len, generator=gen, dtype=torch.float64).to(dtype) if weighted else None
    return sim, text_mask, image_mask, text_weight, image_weight


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
