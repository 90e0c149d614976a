"""Independent brute-force Banzhaf quantities: plain Python loops over subsets, straight from DESIGN §3-§4."""
from __future__ import annotations

import itertools
import math


def game_value(sim, text_w, image_w, text_members, image_members) -> float:
    """v(A, C) for nested lists sim[T][V], weights exp(logit) per token, member index tuples."""
    if not text_members or not image_members:
        return 0.0
    text_part = sum(text_w[t] * max(sim[t][u] for u in image_members) for t in text_members)
    text_part /= sum(text_w[t] for t in text_members)
    image_part = sum(image_w[u] * max(sim[t][u] for t in text_members) for u in image_members)
    image_part /= sum(image_w[u] for u in image_members)
    return 0.5 * (text_part + image_part)


def subsets(items):
    for size in range(len(items) + 1):
        yield from itertools.combinations(items, size)


def exact_banzhaf(sim, text_valid, image_valid, text_logit, image_logit):
    """(interaction[T][V], text_value[T], image_value[V]) of one pair by enumeration; invalid entries are 0."""
    text_len, image_len = len(sim), len(sim[0])
    text_w = [math.exp(x) for x in text_logit]
    image_w = [math.exp(x) for x in image_logit]
    texts = [t for t in range(text_len) if text_valid[t]]
    images = [u for u in range(image_len) if image_valid[u]]
    n = len(texts) + len(images)

    def v(a, c):
        return game_value(sim, text_w, image_w, tuple(a), tuple(c))

    interaction = [[0.0] * image_len for _ in range(text_len)]
    for i in texts:
        for j in images:
            rest_t = [t for t in texts if t != i]
            rest_v = [u for u in images if u != j]
            total = 0.0
            for a in subsets(rest_t):
                for c in subsets(rest_v):
                    total += v(a + (i,), c + (j,)) - v(a + (i,), c) - v(a, c + (j,)) + v(a, c)
            interaction[i][j] = total / 2 ** (n - 2)
    text_value = [0.0] * text_len
    for i in texts:
        rest_t = [t for t in texts if t != i]
        total = sum(v(a + (i,), c) - v(a, c) for a in subsets(rest_t) for c in subsets(images))
        text_value[i] = total / 2 ** (n - 1)
    image_value = [0.0] * image_len
    for j in images:
        rest_v = [u for u in images if u != j]
        total = sum(v(a, c + (j,)) - v(a, c) for a in subsets(texts) for c in subsets(rest_v))
        image_value[j] = total / 2 ** (n - 1)
    return interaction, text_value, image_value
