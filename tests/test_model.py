"""Model layer: CLIP tokenizer, towers, prompt pool, dual encoder, config and CLIP checkpoint loading."""
import gzip
import math
import os
import pickle
import zipfile
from typing import Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cbd_fast.model import (MODEL_PRESETS, ClipTokenizer, DualEncoder, PromptPool, TokenFeatures, create_model,
                            load_openai_clip, resolve_model_config)
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


@pytest.mark.parametrize("threads", [1, 2])
def test_prompt_gradients_sum_the_samples_in_order(threads):
    """Prompt and key gradients are the in-order sum of the samples' gradients at ViT-B sizes, at any thread count
    (the bits of a run do not depend on how the backward was scheduled)."""
    gen = torch.Generator().manual_seed(0)
    pool = PromptPool(pool_size=10, length=5, width=768, key_dim=512)
    index = torch.randint(0, 3, (64,), generator=gen)
    upstream = torch.randn(64, 5, 768, generator=gen)
    query = torch.randn(64, 512, generator=gen)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        (pool(index) * upstream).sum().backward()
        _, pull = pool.select(query, task_id=index)
        (pull * len(index)).backward()  # the mean's 1/64 and this 64 are exact: the sum of the per-sample cosines
    finally:
        torch.set_num_threads(previous)
    gathered = pool.keys.detach()[index].requires_grad_()  # one row per sample: the per-sample gradients
    F.cosine_similarity(query, gathered, dim=-1).sum().backward()
    expected_prompts, expected_keys = torch.zeros_like(pool.prompts), torch.zeros_like(pool.keys)
    for b, slot in enumerate(index.tolist()):
        expected_prompts[slot] += upstream[b]
        expected_keys[slot] += gathered.grad[b]
    assert torch.equal(pool.prompts.grad, expected_prompts)
    assert torch.equal(pool.keys.grad, expected_keys)


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
    with pytest.raises(FileNotFoundError):
        create_model({"pretrained": "/nonexistent/ViT-B-32.pt"})


# ---------------------------------------------------------------------------------- CLIP checkpoints
CLIP_SIZES = dict(vision_width=128, vision_layers=2, patch=8, grid=4, text_width=64, text_layers=2,
                  context=16, embed=32, vocab=49408)


def _clip_state_dict(seed=0, vision_width=128, vision_layers=2, patch=8, grid=4, text_width=64, text_layers=2,
                     context=16, embed=32, vocab=49408):
    """A random state dict with OpenAI CLIP's ViT key names and layouts, at tiny sizes."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.1):
        return torch.randn(*shape, generator=gen) * scale

    sd = {
        "visual.conv1.weight": rand(vision_width, 3, patch, patch),
        "visual.class_embedding": rand(vision_width),
        "visual.positional_embedding": rand(grid * grid + 1, vision_width),
        "visual.ln_pre.weight": 1 + rand(vision_width), "visual.ln_pre.bias": rand(vision_width),
        "visual.ln_post.weight": 1 + rand(vision_width), "visual.ln_post.bias": rand(vision_width),
        "visual.proj": rand(vision_width, embed),
        "token_embedding.weight": rand(vocab, text_width),
        "positional_embedding": rand(context, text_width),
        "ln_final.weight": 1 + rand(text_width), "ln_final.bias": rand(text_width),
        "text_projection": rand(text_width, embed),
        "logit_scale": torch.tensor(math.log(1 / 0.07)) + 0.5,
    }
    for prefix, width, layers in (("visual.transformer", vision_width, vision_layers),
                                  ("transformer", text_width, text_layers)):
        for n in range(layers):
            p = f"{prefix}.resblocks.{n}."
            sd.update({
                p + "ln_1.weight": 1 + rand(width), p + "ln_1.bias": rand(width),
                p + "attn.in_proj_weight": rand(3 * width, width), p + "attn.in_proj_bias": rand(3 * width),
                p + "attn.out_proj.weight": rand(width, width), p + "attn.out_proj.bias": rand(width),
                p + "ln_2.weight": 1 + rand(width), p + "ln_2.bias": rand(width),
                p + "mlp.c_fc.weight": rand(4 * width, width), p + "mlp.c_fc.bias": rand(4 * width),
                p + "mlp.c_proj.weight": rand(width, 4 * width), p + "mlp.c_proj.bias": rand(width),
            })
    return sd


class _Root(nn.Module):
    def forward(self) -> torch.Tensor:
        return self.logit_scale.exp()


def _save_torchscript(sd, path, dtype=torch.float16, root=None):
    """TorchScript archive of a module tree whose parameters carry CLIP's names (half precision, with the
    hyper-parameter buffers OpenAI's archives hold)."""
    root = _Root() if root is None else root
    for key, value in sd.items():
        *parents, last = key.split(".")
        node = root
        for name in parents:
            if name not in node._modules:
                node.add_module(name, nn.Module())
            node = node._modules[name]
        node.register_parameter(last, nn.Parameter(value.to(dtype), requires_grad=False))
    for name, value in (("input_resolution", 32), ("context_length", 16), ("vocab_size", 49408)):
        root.register_buffer(name, torch.tensor(value))
    with pytest.warns(FutureWarning):  # TorchScript is deprecated in torch, still OpenAI's format
        torch.jit.script(root).save(str(path))


def _layer_norm(x, sd, name):
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps=1e-5)


def _clip_block(x, sd, p, heads, additive_mask):
    batch, length, width = x.shape
    h = _layer_norm(x, sd, p + "ln_1")
    q, k, v = (h @ sd[p + "attn.in_proj_weight"].T + sd[p + "attn.in_proj_bias"]).chunk(3, dim=-1)
    q, k, v = (t.reshape(batch, length, heads, width // heads).transpose(1, 2) for t in (q, k, v))
    attn = (q @ k.transpose(-1, -2) / math.sqrt(width // heads) + additive_mask).softmax(-1)
    h = (attn @ v).transpose(1, 2).reshape(batch, length, width)
    x = x + h @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
    h = _layer_norm(x, sd, p + "ln_2") @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"]
    h = h * torch.sigmoid(1.702 * h)  # QuickGELU
    return x + h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]


def _clip_encode_image(sd, images, heads, layers):
    """CLIP's visual forward written out; returns (pooled [B, D], all tokens after ln_post @ proj)."""
    patch = sd["visual.conv1.weight"].shape[-1]
    x = F.conv2d(images, sd["visual.conv1.weight"], stride=patch).flatten(2).transpose(1, 2)
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + sd["visual.positional_embedding"]
    x = _layer_norm(x, sd, "visual.ln_pre")
    for n in range(layers):
        x = _clip_block(x, sd, f"visual.transformer.resblocks.{n}.", heads, 0.0)
    tokens = _layer_norm(x, sd, "visual.ln_post") @ sd["visual.proj"]
    return tokens[:, 0], tokens


def _clip_encode_text(sd, ids, heads, layers):
    """CLIP's text forward written out: causal -inf mask, pooled at the arg-max id (the end token)."""
    length = ids.shape[1]
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"][:length]
    causal = torch.full((length, length), float("-inf"), dtype=x.dtype).triu(1)
    for n in range(layers):
        x = _clip_block(x, sd, f"transformer.resblocks.{n}.", heads, causal)
    x = _layer_norm(x, sd, "ln_final")
    return x[torch.arange(ids.shape[0]), ids.argmax(dim=-1)] @ sd["text_projection"]


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    sd = _clip_state_dict(**CLIP_SIZES)
    folder = tmp_path_factory.mktemp("clip")
    torch.save(sd, folder / "clip_state_dict.pt")
    _save_torchscript(sd, folder / "clip_torchscript.pt")
    return sd, folder / "clip_state_dict.pt", folder / "clip_torchscript.pt"


@pytest.mark.parametrize("kind", ["state_dict", "torchscript"])
def test_load_openai_clip_matches_clip_forward(clip_files, kind):
    sd, plain_path, jit_path = clip_files
    path = plain_path if kind == "state_dict" else jit_path
    if kind == "torchscript":  # the archive is half precision: compare against the rounded weights
        sd = {k: v.half().float() if v.is_floating_point() else v for k, v in sd.items()}
    model = create_model({"pretrained": str(path), "prompts": {"pool_size": 3, "length": 2}})

    # sizes inferred from the checkpoint; heads by CLIP's width // 64 rule
    cfg = model.config
    assert cfg["embed_dim"] == 32 and cfg["text"]["context_length"] == 16
    assert {k: cfg["image"][k] for k in ("img_size", "patch_size", "width", "depth", "heads", "pre_norm")} == \
        {"img_size": 32, "patch_size": 8, "width": 128, "depth": 2, "heads": 2, "pre_norm": True}
    assert (cfg["text"]["width"], cfg["text"]["depth"], cfg["text"]["heads"]) == (64, 2, 1)

    report = model.load_report
    assert report.unexpected == []
    assert all(("prompts" in k) or ("weight_head" in k) for k in report.missing) and report.missing
    trunk = model.visual.trunk
    assert torch.equal(trunk.patch_embed.proj.weight, sd["visual.conv1.weight"])
    assert trunk.patch_embed.proj.bias is None or trunk.patch_embed.proj.bias.eq(0).all()
    assert torch.equal(trunk.cls_token[0, 0], sd["visual.class_embedding"])
    assert torch.equal(trunk.pos_embed[0], sd["visual.positional_embedding"])
    assert torch.equal(trunk.norm_pre.weight, sd["visual.ln_pre.weight"])
    assert torch.equal(trunk.blocks[1].attn.qkv.weight, sd["visual.transformer.resblocks.1.attn.in_proj_weight"])
    assert torch.equal(trunk.blocks[1].mlp.fc2.bias, sd["visual.transformer.resblocks.1.mlp.c_proj.bias"])
    assert torch.equal(trunk.norm.bias, sd["visual.ln_post.bias"])
    assert torch.equal(model.visual.proj.weight, sd["visual.proj"].T)
    assert torch.equal(model.text.blocks[0].attn.proj.weight, sd["transformer.resblocks.0.attn.out_proj.weight"])
    assert torch.equal(model.text.blocks[1].norm2.weight, sd["transformer.resblocks.1.ln_2.weight"])
    assert torch.equal(model.text.proj.weight, sd["text_projection"].T)
    assert torch.equal(model.text.token_embedding.weight, sd["token_embedding.weight"])
    assert model.logit_scale.item() == pytest.approx(sd["logit_scale"].item())

    # outputs equal a hand-written CLIP forward on the same weights (float64 on both sides)
    model = model.double().eval()
    sd64 = {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    ids, mask = model.tokenize(["a photo of a cat", "a diagram of a cooperative game between tokens"])
    with torch.no_grad():
        image = model.encode_image(images)
        text = model.encode_text(ids, mask)
    ref_pooled, ref_tokens = _clip_encode_image(sd64, images, heads=2, layers=2)
    torch.testing.assert_close(image.pooled, F.normalize(ref_pooled, dim=-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(image.tokens, F.normalize(ref_tokens, dim=-1), atol=1e-5, rtol=0)
    ref_text = _clip_encode_text(sd64, ids, heads=1, layers=2)
    torch.testing.assert_close(text.pooled, F.normalize(ref_text, dim=-1), atol=1e-5, rtol=0)


class _WritesAFileWhenLoaded(nn.Module):
    """An archive's code that runs when torch.jit.load unpickles it: __setstate__ creates the file ``marker``."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker
        self.weight = torch.ones(2)

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, torch.Tensor, bool]:
        return self.marker, self.weight, self.training

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, torch.Tensor, bool]) -> None:
        self.marker, self.training = state[0], state[2]
        created = torch.from_file(self.marker, True, 8, dtype=torch.uint8)  # shared=True creates the file
        self.weight = state[1] + created[:2].float() * 0

    def forward(self) -> torch.Tensor:
        return self.weight


class _RootWithCode(_Root):
    def __init__(self, marker: str):
        super().__init__()
        self.payload = _WritesAFileWhenLoaded(marker)

    def forward(self) -> torch.Tensor:
        return self.logit_scale.exp() + self.payload().sum()


def test_torchscript_archive_code_never_runs(clip_files, tmp_path):
    sd = clip_files[0]
    marker = tmp_path / "written_by_the_archive"
    archive = tmp_path / "ViT-tiny-with-code.pt"
    _save_torchscript(sd, archive, root=_RootWithCode(str(marker)))
    with pytest.warns(FutureWarning):
        torch.jit.load(str(archive))  # the crafted archive is live: torch's loader runs its code
    assert marker.exists()
    marker.unlink()

    model = create_model({"pretrained": str(archive), "prompts": {"pool_size": 2, "length": 2}})
    assert not marker.exists()  # nothing ran: the weights were read as data
    assert model.load_report.unexpected == []  # the payload keeps its state in a tuple: no named tensors
    assert torch.equal(model.visual.proj.weight, sd["visual.proj"].half().float().T)

    # an archive whose pickle names anything but tensors is refused, naming it, and nothing runs
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(tmp_path / "evil.pt", "w") as evil:
        for item in source.infolist():
            data = source.read(item)
            if item.filename.endswith("/data.pkl"):
                data = pickle.dumps(_RunsCommand(f"touch {marker}"), protocol=2)
            evil.writestr(item, data)
    with pytest.raises(ValueError, match=r"refers to (posix|os)\.system, which is not part of a tensor"):
        create_model({"pretrained": str(tmp_path / "evil.pt")})
    assert not marker.exists()


class _RunsCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_load_openai_clip_errors_and_report(clip_files, tmp_path):
    sd, plain_path, _ = clip_files
    with pytest.raises(ValueError, match=r"image\.width: config 64, checkpoint 128"):
        create_model({"pretrained": str(plain_path), "image": {"width": 64}})
    with pytest.raises(ValueError, match="disagrees"):
        create_model({"pretrained": str(plain_path), "preset": "tiny"})
    with pytest.raises(ValueError, match="unknown model config keys: pretrianed"):
        create_model({"pretrained": str(plain_path), "pretrianed": 1})
    # explicit heads are honoured (not stored in CLIP checkpoints)
    model = create_model({"pretrained": str(plain_path), "image": {"heads": 4}, "prompts": {"enabled": False}})
    assert model.config["image"]["heads"] == 4 and model.load_report.missing == [
        k for k in model.state_dict() if "weight_head" in k]
    # wrong sizes: every mismatch is listed
    with pytest.raises(ValueError, match="does not fit"):
        load_openai_clip(create_model(TINY), sd)
    # unknown keys are reported, wrapped and DataParallel-prefixed dicts are read
    extra = {"module." + k: v for k, v in {**sd, "visual.attnpool.weight": torch.zeros(1)}.items()}
    torch.save({"state_dict": extra}, tmp_path / "wrapped.pt")
    model = create_model({"pretrained": str(tmp_path / "wrapped.pt")})
    assert model.load_report.unexpected == ["visual.attnpool.weight"]
    resnet = {"visual.layer1.0.conv1.weight": torch.zeros(1)}
    torch.save(resnet, tmp_path / "rn50.pt")
    with pytest.raises(ValueError, match="ResNet"):
        create_model({"pretrained": str(tmp_path / "rn50.pt")})
    assert isinstance(model, DualEncoder)
