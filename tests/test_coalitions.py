"""The coalition stream (DESIGN §4.2): Philox4x32-10 bits, identical on every path."""
import pytest
import torch

import cbd_fast
from cbd_fast.coalitions import exact_coalitions, num_exact_draws, philox_coalitions

MASK32 = 0xFFFFFFFF


def philox_python(counter, key):
    """Philox4x32-10 in plain Python integers, written independently of the package."""
    c = list(counter)
    k0, k1 = key
    for _ in range(10):
        p0 = 0xD2511F53 * c[0]
        p1 = 0xCD9E8D57 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k0) & MASK32, p1 & MASK32, ((p0 >> 32) ^ c[3] ^ k1) & MASK32, p0 & MASK32]
        k0, k1 = (k0 + 0x9E3779B9) & MASK32, (k1 + 0xBB67AE85) & MASK32
    return c


def bit_python(seed, draw, pair, side, token):
    words = philox_python((draw, pair, side, token // 128), (seed & MASK32, seed >> 32))
    return (words[(token % 128) // 32] >> (token % 32)) & 1


@pytest.mark.parametrize("counter,key,expected", [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((MASK32,) * 4, (MASK32, MASK32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_python_philox_matches_published_answers(counter, key, expected):
    assert tuple(philox_python(counter, key)) == expected


@pytest.mark.parametrize("seed", [0, 7, 2**40 + 3, 2**64 - 1])
def test_coalitions_match_python_philox(seed):
    batch, text_len, image_len, draws = 3, 5, 300, 4  # image_len > 256: three 128-bit chunks
    text_in, image_in = cbd_fast.coalitions(batch, text_len, image_len, draws, seed)
    assert text_in.shape == (draws, batch, text_len) and image_in.shape == (draws, batch, image_len)
    assert text_in.dtype == torch.bool
    for k in range(draws):
        for b in range(batch):
            assert [int(x) for x in text_in[k, b]] == [bit_python(seed, k, b, 0, t) for t in range(text_len)]
            assert [int(x) for x in image_in[k, b]] == [bit_python(seed, k, b, 1, t) for t in range(image_len)]


def test_compiled_and_torch_streams_agree():
    compiled = cbd_fast.coalitions(5, 200, 130, 9, seed=12345)
    plain = philox_coalitions(0, 9, 5, 200, 130, 12345)
    assert torch.equal(compiled[0], plain[0]) and torch.equal(compiled[1], plain[1])
    # a slice of draws is the same as the slice of the full stream
    part = philox_coalitions(3, 7, 5, 200, 130, 12345)
    assert torch.equal(part[0], compiled[0][3:7])


def test_coalition_bits_are_fair_and_seed_dependent():
    a_text, a_image = cbd_fast.coalitions(8, 64, 64, 256, seed=1)
    b_text, _ = cbd_fast.coalitions(8, 64, 64, 256, seed=2)
    assert abs(a_text.float().mean().item() - 0.5) < 0.01
    assert abs(a_image.float().mean().item() - 0.5) < 0.01
    assert not torch.equal(a_text, b_text)


@pytest.mark.parametrize("kwargs,match", [
    (dict(batch=0, text_len=2, image_len=2, num_samples=1), "batch"),
    (dict(batch=1, text_len=2, image_len=2, num_samples=0), "num_samples"),
    (dict(batch=1, text_len=2, image_len=2, num_samples=1, seed=-1), "seed"),
    (dict(batch=1, text_len=2.0, image_len=2, num_samples=1), "text_len"),
    (dict(batch=1, text_len=2, image_len=2, num_samples=2**32), "num_samples and batch must be < 2\\*\\*32"),
    (dict(batch=2**20, text_len=2**20, image_len=1, num_samples=2**20), r"needs 1\.074e\+09 GiB, more than the"),
    (dict(batch=1, text_len=2, image_len=2, num_samples=1, device="gpu0"), "device must be a torch.device"),
    pytest.param(dict(batch=1, text_len=2, image_len=2, num_samples=1, device="cuda"), "no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is available")),
])
def test_coalitions_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cbd_fast.coalitions(**kwargs)


def test_exact_enumeration_covers_every_coalition_equally():
    text_mask = torch.tensor([[True, True, False], [True, False, False]])
    image_mask = torch.tensor([[True, False], [True, True]])
    draws = num_exact_draws(text_mask, image_mask)
    assert draws == 2**3
    text_in, image_in = exact_coalitions(0, draws, text_mask, image_mask)
    for b in range(2):
        seen = {}
        for k in range(draws):
            key = (tuple(text_in[k, b].tolist()), tuple(image_in[k, b].tolist()))
            seen[key] = seen.get(key, 0) + 1
        players = int(text_mask[b].sum() + image_mask[b].sum())
        assert len(seen) == 2**players and set(seen.values()) == {draws // 2**players}
        assert not (text_in[:, b] & ~text_mask[b]).any()


def test_exact_refuses_too_many_players():
    with pytest.raises(ValueError, match="n=21"):
        num_exact_draws(torch.ones(1, 11, dtype=torch.bool), torch.ones(1, 10, dtype=torch.bool))
