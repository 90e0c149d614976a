"""Model layer: CLIP tokenizer, prompt pool, dual encoder, config."""
import gzip
import math

import pytest
import torch
import torch.nn.functional as F

from cbd_fast.model import (MODEL_PRESETS, ClipTokenizer, PromptPool, TokenFeatures, create_model,
                            resolve_model_config)
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


# ----------------------------------------------------------------------------------------- dual encoder
TINY = {"preset": "tiny", "prompts": {"pool_size": 4, "length": 3}}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model(TINY).eval()


@pytest.fixture(scope="module")
def batch(tiny):
    torch.manual_seed(1)
    images = torch.randn(3, 3, 32, 32)
    ids, mask = tiny.tokenize(["a photo of a cat", "two dogs play in the snow near a red house", "hi"])
    return images, ids, mask


def test_output_shapes_masks_and_norms(tiny, batch):
    images, ids, mask = batch
    with torch.no_grad():
        for index in (None, torch.tensor([0, 1, 3])):
            image = tiny.encode_image(images, index)
            text = tiny.encode_text(ids, mask, index)
            assert isinstance(image, TokenFeatures)
            assert image.tokens.shape == (3, 17, 64)  # CLS + 4x4 patches; prompt tokens not returned
            assert image.mask.shape == image.weight.shape == (3, 17) and image.mask.all()
            assert text.tokens.shape == (3, 32, 64)
            assert torch.equal(text.mask, mask)  # same mask as the tokenizer: prompts excluded, padding masked
            assert image.pooled.shape == text.pooled.shape == (3, 64)
            torch.testing.assert_close(image.tokens.norm(dim=-1), torch.ones(3, 17))
            torch.testing.assert_close(text.tokens.norm(dim=-1), mask.float())  # 1 on tokens, 0 on padding
            torch.testing.assert_close(image.pooled.norm(dim=-1), torch.ones(3))
            torch.testing.assert_close(text.pooled.norm(dim=-1), torch.ones(3))
            torch.testing.assert_close(image.pooled, image.tokens[:, 0])  # CLS
            end = mask.sum(1) - 1
            torch.testing.assert_close(text.pooled, text.tokens[torch.arange(3), end])  # end token
            assert ids[torch.arange(3), end].eq(49407).all()
            assert text.weight[~mask].eq(0).all()
    # the WTI heads start at uniform weights
    assert tiny.encode_image(images).weight.abs().max() == 0


def test_padding_does_not_change_text_features(tiny):
    ids, mask = tiny.tokenize(["a cat on a mat", "a much longer caption about a dog in a field"])
    noisy = ids.clone()
    noisy[~mask] = torch.randint(0, 49000, (int((~mask).sum()),))
    with torch.no_grad():
        for index in (None, torch.tensor([1, 2])):
            a = tiny.encode_text(ids, mask, index)
            b = tiny.encode_text(noisy, mask, index)
            short = tiny.encode_text(ids[:1, :8], mask[:1, :8], None if index is None else index[:1])
            torch.testing.assert_close(a.tokens, b.tokens)
            torch.testing.assert_close(a.pooled, b.pooled)
            torch.testing.assert_close(a.tokens[:1, :8], short.tokens, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(a.pooled[:1], short.pooled, atol=1e-5, rtol=1e-5)


def test_prompts_change_outputs_per_sample(tiny, batch):
    images, ids, mask = batch
    with torch.no_grad():
        plain = tiny.encode_image(images)
        mixed = tiny.encode_image(images, torch.tensor([0, 2, 2]))
        first = tiny.encode_image(images[:1], torch.tensor([0]))
        rest = tiny.encode_image(images[1:], torch.tensor([2, 2]))
        text_plain = tiny.encode_text(ids, mask).pooled
        text_prompted = tiny.encode_text(ids, mask, torch.tensor([1, 1, 1])).pooled
    assert not torch.allclose(plain.pooled, mixed.pooled)
    assert not torch.allclose(text_plain, text_prompted)
    torch.testing.assert_close(mixed.tokens, torch.cat([first.tokens, rest.tokens]), atol=1e-5, rtol=1e-5)


def test_gradients_reach_prompts_heads_and_scale(batch):
    images, ids, mask = batch
    torch.manual_seed(0)
    model = create_model(TINY)
    out = model(images, ids, mask, train_task=1)
    assert out.image_prompt_index.tolist() == [1, 1, 1] and out.text_prompt_index.tolist() == [1, 1, 1]
    sims = torch.einsum("btd,bvd->btv", out.text.tokens, out.image.tokens)
    loss = (model.scale() * sims.amax(-1) * out.text.weight.softmax(-1)).sum() \
        + (out.image.weight * out.image.tokens[..., 0]).sum() - 0.1 * out.pull_loss
    loss.backward()
    for pool in (model.image_prompts, model.text_prompts):
        assert pool.prompts.grad[1].abs().sum() > 0
        assert pool.prompts.grad[[0, 2, 3]].abs().sum() == 0  # only the training slot moves
        assert pool.keys.grad[1].abs().sum() > 0 and pool.keys.grad[[0, 2, 3]].abs().sum() == 0
    for head in (model.image_weight_head, model.text_weight_head):
        assert head.fc2.weight.grad.abs().sum() > 0
    assert model.logit_scale.grad.abs() > 0
    assert model.visual.trunk.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.text.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_logit_scale_init_and_clamp(tiny):
    assert tiny.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    model = create_model({"preset": "tiny", "init_temperature": 0.001})
    assert model.scale().item() == pytest.approx(100.0)


def test_dual_encoder_select_prompts(tiny, batch):
    images, ids, mask = batch
    qi, qt = tiny.query_image(images), tiny.query_text(ids, mask)
    assert not qi.requires_grad and qi.shape == (3, 64)
    torch.testing.assert_close(qi, tiny.encode_image(images).pooled)
    image_index, text_index, pull = tiny.select_prompts(qi, qt, task_id=torch.tensor([0, 1, 2]))
    assert image_index.tolist() == text_index.tolist() == [0, 1, 2]
    expected = 0.5 * (F.cosine_similarity(qi, tiny.image_prompts.keys[image_index], dim=-1).mean()
                      + F.cosine_similarity(qt, tiny.text_prompts.keys[text_index], dim=-1).mean())
    torch.testing.assert_close(pull, expected)
    no_prompts = create_model({"preset": "tiny", "prompts": {"enabled": False}})
    assert no_prompts.image_prompts is None
    image_index, text_index, pull = no_prompts.select_prompts(qi, qt, train_task=0)
    assert image_index is None and text_index is None and pull.item() == 0
    with pytest.raises(ValueError, match="prompts are disabled"):
        no_prompts.encode_image(images, torch.tensor([0, 0, 0]))


# ----------------------------------------------------------------------------------- config and presets
def test_presets_build_and_count():
    assert {"tiny", "vit_b32"} <= set(MODEL_PRESETS)
    cfg = resolve_model_config({"preset": "vit_b32"})
    assert cfg["image"] == {"img_size": 224, "patch_size": 32, "width": 768, "depth": 12, "heads": 12,
                            "mlp_ratio": 4.0, "act": "quick_gelu", "pre_norm": True}
    assert cfg["text"]["context_length"] == 77 and cfg["embed_dim"] == 512
    model = create_model({"preset": "vit_b32"})
    clip_part = sum(p.numel() for n, p in model.named_parameters() if "prompts" not in n and "weight_head" not in n)
    assert clip_part == 151_277_313  # OpenAI CLIP ViT-B/32
    assert model.visual.num_tokens == 50
    tiny = create_model({"preset": "tiny", "prompts": {"enabled": False}})
    assert tiny.visual.num_tokens == 17 and tiny.text.context_length == 32


def test_determinism_given_seed(batch):
    images, ids, mask = batch
    outputs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = create_model(TINY)
        with torch.no_grad():
            out = model(images, ids, mask, train_task=0)
        outputs.append((model.state_dict(), out))
    (sd_a, out_a), (sd_b, out_b) = outputs
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert torch.equal(out_a.image.tokens, out_b.image.tokens) and torch.equal(out_a.text.tokens, out_b.text.tokens)


def test_config_errors():
    with pytest.raises(ValueError, match=r"unknown model config keys: .*image\.widht.*colour"):
        create_model({"preset": "tiny", "image": {"widht": 8}, "colour": "red"})
    with pytest.raises(ValueError, match="prompts.size"):
        create_model({"prompts": {"size": 3}})
    with pytest.raises(ValueError, match="unknown model preset 'vit_z'"):
        create_model({"preset": "vit_z"})
    with pytest.raises(ValueError, match="not divisible"):
        create_model({"preset": "tiny", "image": {"heads": 3}})
    with pytest.raises(ValueError, match="act"):
        create_model({"preset": "tiny", "text": {"act": "relu"}})
