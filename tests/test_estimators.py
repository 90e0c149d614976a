"""Statistics of the Monte Carlo estimators against exact enumeration (DESIGN §4.1) on small games."""
import math

import pytest
import torch
from conftest import random_game

import cbd_fast

BACKEND = "cpu" if cbd_fast.has_extension() else "torch"
GAMES = [dict(shape=(4, 4, 5), seed=0), dict(shape=(3, 5, 3), seed=1), dict(shape=(2, 3, 6), seed=2)]


def _game(spec):
    return random_game(*spec["shape"], seed=spec["seed"])  # padding masks and non-uniform weights


def _stack(game, estimator, num_samples, seeds):
    """Estimates for many seeds: tuple of [len(seeds), ...] tensors (interaction, text value, image value)."""
    runs = [cbd_fast.banzhaf_interaction(*game, num_samples=num_samples, seed=s, estimator=estimator,
                                         backend=BACKEND) for s in seeds]
    return tuple(torch.stack([r[k] for r in runs]) for k in range(3))


def _rmse(estimates, exact):
    return math.sqrt(sum(((e - x) ** 2).sum().item() for e, x in zip(estimates, exact))
                     / sum(e.numel() for e in estimates))


@pytest.mark.parametrize("spec", GAMES)
@pytest.mark.parametrize("estimator,num_samples", [("paired", 8), ("msr", 96)])
def test_estimator_is_unbiased(spec, estimator, num_samples):
    """The mean over many seeds sits within a few standard errors of the exact value, entry by entry.

    msr is unbiased only up to empty strata (counted as 0); at 96 draws an empty stratum has probability ~1e-12.
    """
    game = _game(spec)
    exact = cbd_fast.banzhaf_interaction(*game, estimator="exact", backend=BACKEND)
    runs = 300
    estimates = _stack(game, estimator, num_samples, range(runs))
    for est, ex in zip(estimates, exact):
        mean, std = est.mean(0), est.std(0)
        stochastic = std > 1e-12
        z = (mean - ex)[stochastic] / (std[stochastic] / math.sqrt(runs))
        assert z.abs().max() < 5.0, f"max |z| = {z.abs().max():.2f}"
        if z.numel() >= 20:  # about 5% of entries exceed |z| = 2 by chance
            assert (z.abs() > 2).float().mean() < 0.15
        torch.testing.assert_close(mean[~stochastic], ex[~stochastic], rtol=0, atol=1e-12)


@pytest.mark.parametrize("spec", GAMES)
@pytest.mark.parametrize("estimator", ["paired", "msr"])
def test_error_falls_like_inverse_sqrt_k(spec, estimator):
    game = _game(spec)
    exact = cbd_fast.banzhaf_interaction(*game, estimator="exact", backend=BACKEND)
    seeds = range(1000, 1040)
    low = _rmse(_stack(game, estimator, 64, seeds), exact)
    high = _rmse(_stack(game, estimator, 1024, seeds), exact)
    assert 2.8 < low / high < 5.7, f"RMSE ratio for 16x the draws: {low / high:.2f} (expected ~4)"


@pytest.mark.parametrize("spec", GAMES)
def test_paired_beats_msr_at_equal_draws(spec):
    game = _game(spec)
    exact = cbd_fast.banzhaf_interaction(*game, estimator="exact", backend=BACKEND)
    seeds = range(2000, 2030)
    paired = _rmse(_stack(game, "paired", 256, seeds)[:1], exact[:1])
    msr = _rmse(_stack(game, "msr", 256, seeds)[:1], exact[:1])
    assert paired < 0.5 * msr, f"interaction RMSE paired {paired:.4g} vs msr {msr:.4g}"
