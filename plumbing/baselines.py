"""The classical baselines' shared step: a setting chosen on the validation split by a
dequantized likelihood bound, as the leaderboard and inpaint.py fit them."""

import numpy as np


def dequantized_bound(score_samples, x, seed, draws):
    """E_u[-log p(x + u)] over `draws` dequantization draws, nats per image."""
    rng = np.random.default_rng(seed)
    return float(np.mean([-score_samples(x + rng.random(x.shape)).mean() for _ in range(draws)]))


def fit_on_val(make, splits, grid, seed, draws):
    """Fit make(h) on dequantized train for each h in grid; keep the best on val."""
    rng = np.random.default_rng(seed)
    train = splits["train"] + rng.random(splits["train"].shape)
    best = None
    for h in grid:
        model = make(h).fit(train)
        val = dequantized_bound(model.score_samples, splits["val"], seed + 1, draws)
        if best is None or val < best[0]:
            best = (val, h, model)
    return best
