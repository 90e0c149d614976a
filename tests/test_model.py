"""Model layer: CLIP tokenizer, prompt pool."""
import gzip

import pytest
import torch
import torch.nn.functional as F

from cbd_fast.model import ClipTokenizer, PromptPool
from cbd_fast.model.tokenizer import VOCAB_PATH


# ------------------------------------------------------------------------------------------- tokenizer
@pytest.fixture(scope="module")
def tok():
    return ClipTokenizer(context_length=32)


def _merges_from_file():
    with gzip.open(VOCAB_PATH, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    return [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]


def _slow_bpe_ids(word, merges):
    """Independent reference: merge one lowest-ranked pair occurrence at a time; ids from the file layout
    (256 byte symbols, 256 with </w>, one per merge). Only for ASCII letters, whose byte symbol is the
    letter itself and whose id is ord(c) - ord('!')."""
    rank = {m: i for i, m in enumerate(merges)}
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while True:
        candidates = [(rank[p], i) for i, p in enumerate(zip(parts, parts[1:])) if p in rank]
        if not candidates:
            break
        _, i = min(candidates)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    ids = []
    for part in parts:
        if len(part) == 1:
            ids.append(ord(part) - ord("!"))
        elif part.endswith("</w>") and len(part) == 5:
            ids.append(256 + ord(part[0]) - ord("!"))
        else:
            ids.append(512 + [a + b for a, b in merges].index(part))
    return ids


def test_tokenizer_known_ids(tok):
    assert tok.vocab_size == 49408
    assert (tok.start_id, tok.end_id) == (49406, 49407)
    # CLIP's ids for "a photo of a cat": a</w>=320, photo</w>=1125, of</w>=539, cat</w>=2368.
    assert tok.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    merges = _merges_from_file()
    for word in ("a", "photo", "of", "cat", "supercalifragilistic", "retrieval", "banzhaf"):
        assert tok.encode(word) == _slow_bpe_ids(word, merges), word
    ids, mask = tok(["a photo of a cat"])
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert mask[0].tolist() == [True] * 7 + [False] * 25
    assert ids[0, 7:].eq(0).all()


def test_tokenizer_cleaning_and_round_trip(tok):
    assert tok.encode("  A   Photo\n of a CAT ") == tok.encode("a photo of a cat")
    assert tok.encode("cats &amp; dogs") == tok.encode("cats & dogs")
    assert tok.encode("cats &amp;amp; dogs") == tok.encode("cats & dogs")  # double-escaped captions
    for text in ("a photo of a cat", "naïve café in zürich", "a 🐈 on a mat", "gardens with blue flowers"):
        assert tok.decode(tok.encode(text)) == text
    # pieces end words: punctuation, contractions and single digits come back space-separated
    assert tok.decode(tok.encode("hi, it's 2024")) == "hi , it 's 2 0 2 4"
    assert tok.decode([49406, 320, 49407]) == "a"
    assert tok.decode([49406, 320, 49407], skip_special=False) == "<|startoftext|> a <|endoftext|>"
    assert tok.encode("<|endoftext|>") == [49407]


def test_tokenizer_truncation_keeps_end_token():
    tok = ClipTokenizer(context_length=8)
    ids, mask = tok(["one two three four five six seven eight nine ten", "cat"])
    assert ids.shape == mask.shape == (2, 8) and ids.dtype == torch.long and mask.dtype == torch.bool
    assert ids[0, 0] == 49406 and ids[0, -1] == 49407 and mask[0].all()
    assert ids[0, 1:7].tolist() == tok.encode("one two three four five six")
    assert mask[1].sum() == 3 and ids[1, 2] == 49407
    with pytest.raises(ValueError):
        ClipTokenizer(context_length=1)


# ------------------------------------------------------------------------------------------ prompt pool
def _pool_with_axis_keys():
    pool = PromptPool(pool_size=4, length=2, width=8, key_dim=4)
    with torch.no_grad():
        pool.keys.copy_(torch.eye(4) * torch.tensor([1.0, 2.0, 3.0, 4.0])[:, None])  # slot i <-> axis i
    return pool


def test_prompt_selection_per_sample_and_active_slots():
    pool = _pool_with_axis_keys()
    query = torch.tensor([[0.1, 0.9, 0.0, 0.0], [0.0, 0.0, 0.0, 5.0], [1.0, 0.0, 0.2, 0.0], [0.0, 0.0, 1.0, 0.1]])
    assert pool.num_active.item() == 1  # nothing trained yet: only slot 0
    pool.set_num_active(4)
    index, pull = pool.select(query)
    assert index.tolist() == [1, 3, 0, 2]  # every sample its own best key, no batch vote
    expected = F.cosine_similarity(query, pool.keys[index].detach(), dim=-1).mean()
    torch.testing.assert_close(pull, expected)
    pool.set_num_active(2)  # only tasks 0 and 1 seen: slots 2, 3 are never picked
    index, _ = pool.select(query)
    assert index.tolist() == [1, 0, 0, 0]  # samples 1 and 3 are orthogonal to both: ties go to slot 0
    with pytest.raises(ValueError):
        pool.set_num_active(5)


def test_prompt_selection_train_and_oracle():
    pool = _pool_with_axis_keys()
    query = torch.randn(5, 4, requires_grad=True)
    index, pull = pool.select(query, train_task=2)
    assert index.tolist() == [2] * 5 and pool.num_active.item() == 3  # training task 2 activates slots 0..2
    pull.backward()
    assert query.grad is None  # the pull loss only moves the keys
    assert pool.keys.grad[2].abs().sum() > 0 and pool.keys.grad[[0, 1, 3]].abs().sum() == 0
    assert pool.select(query, task_id=3)[0].tolist() == [3] * 5  # oracle beyond the active slots
    per_sample = torch.tensor([0, 3, 1, 1, 2])
    assert pool.select(query, task_id=per_sample)[0].tolist() == per_sample.tolist()
    with pytest.raises(ValueError):
        pool.select(query, task_id=1, train_task=1)
    with pytest.raises(ValueError):
        pool.select(query, train_task=4)
    with pytest.raises(ValueError):
        pool.select(query, task_id=torch.tensor([0, 0, 0, 0, 7]))
    assert pool(torch.tensor([3, 0])).shape == (2, 2, 8)
