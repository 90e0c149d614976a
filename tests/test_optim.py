"""The training optimizer: row-sparse AdamW against torch.optim.AdamW, bit for bit."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cbd_fast.train.optim import AdamW, create_optimizer


class TinyModel(nn.Module):
    def __init__(self, vocab: int, width: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(ids)).square().mean()


def _train(model, optimizer, steps, seed, vocab_used):
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        # each step uses a few ids of a growing range: rows become active over time, the rest never are
        ids = torch.randint(0, min(vocab_used, 4 + 3 * step), (6, 4), generator=gen)
        optimizer.zero_grad(set_to_none=True)
        model(ids).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        optimizer.step()


@pytest.mark.parametrize("width", [8, 5])
def test_row_sparse_adamw_is_torch_adamw_bit_for_bit(width):
    torch.manual_seed(0)
    reference = TinyModel(60, width)
    model = TinyModel(60, width)
    model.load_state_dict(reference.state_dict())
    options = dict(lr=3e-2, weight_decay=0.05, betas=(0.9, 0.98), eps=1e-6)
    ours = AdamW(model.parameters(), row_sparse=[model.embedding.weight], **options)
    theirs = torch.optim.AdamW(reference.parameters(), foreach=False, **options)
    _train(model, ours, 8, 1, 20)
    _train(reference, theirs, 8, 1, 20)
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(a, b), name
    used = ours.state[model.embedding.weight]["exp_avg_sq"].ne(0).any(1)
    assert 4 < int(used.sum()) <= 20  # some rows were skipped, and they still decayed like torch's
    assert not torch.equal(model.embedding.weight[40:], TinyModel(60, width).embedding.weight[40:])
    # identical state dicts: a checkpoint of one resumes in the other, and resuming ours stays exact
    mine, reference_state = ours.state_dict(), theirs.state_dict()
    for key, state in reference_state["state"].items():
        for name, value in state.items():
            assert torch.equal(mine["state"][key][name], value), (key, name)
    resumed = TinyModel(60, width)
    resumed.load_state_dict(model.state_dict())
    again = AdamW(resumed.parameters(), row_sparse=[resumed.embedding.weight], **options)
    again.load_state_dict(copy.deepcopy(theirs.state_dict()))  # a checkpoint holds copies
    _train(resumed, again, 5, 2, 60)
    _train(reference, theirs, 5, 2, 60)
    for (name, a), b in zip(resumed.named_parameters(), reference.parameters()):
        assert torch.equal(a, b), name


def test_row_sparse_adamw_refuses_what_it_does_not_implement():
    table = nn.Parameter(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="2-d tables"):
        vector = nn.Parameter(torch.zeros(3))
        AdamW([table, vector], row_sparse=[vector])
    with pytest.raises(ValueError, match="amsgrad"):
        AdamW([table], row_sparse=[table], amsgrad=True)
    AdamW([table], amsgrad=True)  # without row-sparse parameters it is torch's AdamW, amsgrad included


def test_the_training_optimizer_skips_rows_of_the_token_embedding():
    from cbd_fast.model import create_model

    model = create_model({"preset": "tiny"})
    optimizer = create_optimizer(model, [{"params": list(model.parameters())}], 1e-3, 0.05)
    assert [id(p) for p in optimizer._row_sparse] == [id(model.text.token_embedding.weight)]


def test_rows_with_only_negative_zero_or_nan_gradients_match_torch():
    """The active-row test sees a row whose gradient is all ≤ 0 (its max is 0), leaves a row of -0.0 inactive and
    treats NaN as active, as torch's arithmetic does."""
    torch.manual_seed(0)
    weight = torch.randn(6, 4)
    grad = torch.zeros(6, 4)
    grad[1, 2] = -0.5                     # only a negative entry
    grad[2] = -0.0                        # negative zeros: AdamW gives the decay alone
    grad[3, 0], grad[3, 1] = 0.25, -0.75  # both signs
    grad[4, 3] = float("nan")
    ours_param, theirs_param = nn.Parameter(weight.clone()), nn.Parameter(weight.clone())
    ours = AdamW([ours_param], row_sparse=[ours_param], lr=0.1, weight_decay=0.05)
    theirs = torch.optim.AdamW([theirs_param], foreach=False, lr=0.1, weight_decay=0.05)
    for step in range(2):
        for param, optimizer in ((ours_param, ours), (theirs_param, theirs)):
            param.grad = grad.clone() if step == 0 else torch.zeros_like(grad)
            optimizer.step()
        torch.testing.assert_close(ours_param.detach(), theirs_param.detach(), rtol=0, atol=0, equal_nan=True)
    assert ours._active[id(ours_param)].tolist() == [False, True, False, True, True, False]
