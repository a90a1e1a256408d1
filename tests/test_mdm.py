"""MDM: the order-agnostic bound against exact NLLs by enumeration on a toy of 3 pixels and 3
levels (above the NLL of an arbitrary conditional model, equal to it for the true conditionals of a
joint), the sampler's distribution on the toy (one pixel at a time, all at once, and completion
given observed pixels), masking and loss shapes, the two training estimates against the bound,
complete() keeping observed pixels, and smoke, resume and sample-only runs of the script; the
class-conditional model's labels, its cheap bound per class, and its smoke run."""

import itertools
import json
import math

import pytest
import torch

import common
import masked_diffusion as mdm_script
from conftest import check_conditional_outputs, check_outputs, run_main
from masked_diffusion import (MASK, MDM, order_agnostic_terms, random_subset, revealed_after, stratified_counts,
                              unmask)

D, L = 3, 3  # the toy: 3 pixels, 3 levels
MASK_TOY = L  # its mask token
STATES = torch.tensor(list(itertools.product(range(L), repeat=D)))  # (27, 3)
TINY = ["--quick", "--no-progress", "--hidden", "16", "--blocks", "1"]


def table_model(seed=0):
    """An arbitrary conditional model: a free table of logits for every masked input (4^3 of them)."""
    table = 2 * torch.randn(4**D, D, L, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    powers = torch.tensor([4**j for j in range(D)])
    return lambda z: table[(z * powers).sum(1)]


def true_conditionals(joint):
    """The conditionals of a joint (27,) over STATES: logits (B, D, L) of P(x_i | observed part of z)."""
    def logits_fn(z):
        consistent = ((STATES[None] == z[:, None]) | (z[:, None] == MASK_TOY)).all(2)  # (B, 27)
        weight = joint[None] * consistent  # (B, 27)
        marginal = torch.stack([torch.stack([(weight * (STATES[:, i] == v)).sum(1) for v in range(L)], 1)
                                for i in range(D)], 1)  # (B, D, L)
        return marginal.clamp_min(1e-300).log()
    return logits_fn


def order_mixture(logits_fn):
    """(27,) p(x) of the model the one-at-a-time sampler draws from: the mean over the 3! pixel orders
    of prod_k p(x_order(k) | x_order(<k)), by enumeration."""
    probs = torch.zeros(len(STATES), dtype=torch.float64)
    for order in itertools.permutations(range(D)):
        z = torch.full_like(STATES, MASK_TOY)
        p = torch.ones(len(STATES), dtype=torch.float64)
        for i in order:
            p = p * torch.softmax(logits_fn(z)[:, i], -1).gather(1, STATES[:, i:i + 1]).squeeze(1)
            z[:, i] = STATES[:, i]
        probs += p / math.factorial(D)
    return probs


def exact_bound(logits_fn, x, missing=tuple(range(D))):
    """sum_m (1/m) E_{|M| = m} sum_{i in M} -log p(x_i | x outside M) over the subsets M of the
    `missing` pixels, every subset enumerated: the bound on -log p(x_missing | x_observed)."""
    total = torch.zeros(len(x), dtype=torch.float64)
    for m in range(1, len(missing) + 1):
        subsets = list(itertools.combinations(missing, m))
        for subset in subsets:
            hidden = torch.zeros(D, dtype=torch.bool)
            hidden[list(subset)] = True
            log_probs = torch.log_softmax(logits_fn(x.masked_fill(hidden, MASK_TOY)), -1)
            nll = -log_probs.gather(2, x.unsqueeze(2)).squeeze(2)[:, hidden].sum(1)
            total += nll / m / len(subsets)
    return total


def estimate_and_stderr(logits_fn, missing, masks_per_level):
    """order_agnostic_terms' estimate on every toy state, and its Monte-Carlo standard error."""
    terms = order_agnostic_terms(logits_fn, STATES, missing, masks_per_level, MASK_TOY)
    return terms.mean(2).sum(1), (terms.var(2) / masks_per_level).sum(1).sqrt(), terms


def chi_square(samples, probs):
    codes = (samples * torch.tensor([L**(D - 1 - j) for j in range(D)])).sum(1)  # index into STATES
    counts = torch.bincount(codes, minlength=len(STATES)).double()
    expected = probs * len(samples)
    return float(((counts - expected) ** 2 / expected).sum())


CHI2_26_999 = 54.05  # the 99.9% quantile of chi-square with 26 degrees of freedom


# --- the bound ----------------------------------------------------------------------


def test_bound_is_above_the_exact_nll_of_an_arbitrary_conditional_model():
    logits_fn = table_model()
    probs = order_mixture(logits_fn)
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-12)
    bound = exact_bound(logits_fn, STATES)
    nll = -probs.log()
    assert (bound >= nll - 1e-12).all()
    assert (bound - nll).max() > 0.05  # strictly above: the conditionals disagree across orders
    # the stratified estimator is unbiased for it: many masks per level, within 4 standard errors
    torch.manual_seed(0)
    estimate, stderr, _ = estimate_and_stderr(logits_fn, torch.ones_like(STATES, dtype=torch.bool), 4000)
    assert ((estimate - bound).abs() <= 4 * stderr).all()


def test_bound_equals_the_nll_for_the_true_conditionals_of_a_joint():
    """Every pixel order is then the chain rule of the joint, so the bound is -log P(x), and with
    pixel 0 observed, -log P(x_1, x_2 | x_0); the estimator is unbiased for both."""
    joint = torch.softmax(torch.randn(len(STATES), generator=torch.Generator().manual_seed(1),
                                      dtype=torch.float64) * 1.5, 0)
    logits_fn = true_conditionals(joint)
    assert torch.allclose(order_mixture(logits_fn), joint, atol=1e-12)
    assert torch.allclose(exact_bound(logits_fn, STATES), -joint.log(), atol=1e-9)
    marginal0 = torch.stack([joint[STATES[:, 0] == v].sum() for v in range(L)])[STATES[:, 0]]
    conditional_nll = -(joint / marginal0).log()
    assert torch.allclose(exact_bound(logits_fn, STATES, missing=(1, 2)), conditional_nll, atol=1e-9)
    missing = torch.ones_like(STATES, dtype=torch.bool)
    missing[:, 0] = False
    torch.manual_seed(0)
    estimate, stderr, terms = estimate_and_stderr(logits_fn, missing, 2000)
    assert ((estimate - conditional_nll).abs() <= 4 * stderr + 1e-9).all()
    assert terms.shape == (27, D, 2000) and (terms[:, 2] == 0).all()  # no level m = 3 with 2 missing


# --- the sampler --------------------------------------------------------------------


def test_one_pixel_at_a_time_draws_from_the_mixture_over_orders_and_one_round_from_the_marginals():
    logits_fn = table_model(2)
    start = torch.full((30000, D), MASK_TOY)
    torch.manual_seed(3)
    exact = unmask(logits_fn, start, D, MASK_TOY)
    assert chi_square(exact, order_mixture(logits_fn)) < CHI2_26_999
    # one round: every pixel drawn at once from its conditional given nothing
    marginals = torch.softmax(logits_fn(start[:1])[0], -1)  # (D, L)
    product = marginals[torch.arange(D), STATES].prod(1)
    once = unmask(logits_fn, start, 1, MASK_TOY)
    assert chi_square(once, product) < CHI2_26_999
    assert chi_square(exact, product) > 10 * CHI2_26_999  # the test can tell the two apart


def test_completion_draws_from_the_conditional_and_keeps_observed_pixels():
    joint = torch.softmax(torch.randn(len(STATES), generator=torch.Generator().manual_seed(4),
                                      dtype=torch.float64) * 1.5, 0)
    z = torch.full((30000, D), MASK_TOY)
    z[:, 1] = 2  # observed x_1 = 2
    torch.manual_seed(5)
    filled = unmask(true_conditionals(joint), z, D, MASK_TOY)
    assert (filled[:, 1] == 2).all()
    conditional = joint * (STATES[:, 1] == 2)
    keep = STATES[:, 1] == 2
    codes = (filled * torch.tensor([9, 3, 1])).sum(1)
    counts = torch.bincount(codes, minlength=27).double()[keep]
    expected = (conditional / conditional.sum())[keep] * len(filled)
    assert float(((counts - expected) ** 2 / expected).sum()) < 27.88  # chi-square, 8 dof, 99.9%


def test_rounds_unmask_as_many_pixels_as_scheduled():
    calls = []

    def logits_fn(z):
        calls.append(int((z == MASK).sum(1).max()))
        return torch.zeros(*z.shape, common.NUM_LEVELS)

    z = torch.full((5, 64), MASK)
    out = unmask(logits_fn, z, 16, MASK)
    assert (out != MASK).all() and out.max() <= 16
    assert calls == list(range(64, 0, -4))  # 4 pixels a round, every round
    calls.clear()
    unmask(logits_fn, z, 8, MASK, power=3.0)
    # round(64 (k / 8)^3) = 0, 1, 3, 8, 16, 27, 43, 64 revealed: round 1 reveals none (no call)
    assert calls == [64, 63, 61, 56, 48, 37, 21]
    # with power 1 and at least as many rounds as missing pixels, never two pixels in one round
    total = torch.arange(0, 65)
    for steps in (64, 70, 100):
        revealed = torch.stack([revealed_after(total, k, steps) for k in range(steps + 1)])  # (steps + 1, 65)
        assert torch.equal(revealed[0], torch.zeros(65, dtype=torch.long)) and torch.equal(revealed[-1], total)
        assert (revealed.diff(dim=0) >= 0).all() and (revealed.diff(dim=0) <= 1).all()
    for power in (1.0, 2.0, 3.0):
        ends = revealed_after(total, 16, 16, power)
        assert torch.equal(ends, total) and (revealed_after(total, 0, 16, power) == 0).all()


def test_rows_alike_computes_the_fully_masked_round_once_and_draws_the_same_samples():
    table = table_model(6)
    sizes = []

    def logits_fn(z):
        sizes.append(len(z))
        return table(z)

    start = torch.full((500, D), MASK_TOY)
    for steps, power in ((D, 1.0), (2, 1.0), (3, 2.0)):
        torch.manual_seed(7)
        plain = unmask(logits_fn, start, steps, MASK_TOY, power=power)
        plain_sizes, sizes[:] = sizes[:], []
        torch.manual_seed(7)
        alike = unmask(logits_fn, start, steps, MASK_TOY, power=power, rows_alike=True)
        assert torch.equal(plain, alike)  # the same random draws, the same conditionals
        assert sizes[0] == 1 and sizes[1:] == plain_sizes[1:] and all(n == 500 for n in plain_sizes)
        sizes.clear()
    # with pixels already observed nothing is shared
    observed = start.clone()
    observed[:, 1] = torch.randint(L, (500,))
    unmask(logits_fn, observed, D, MASK_TOY, rows_alike=True)
    assert sizes and all(n == 500 for n in sizes)


# --- masking, shapes, losses ---------------------------------------------------------


def test_stratified_counts_and_random_subsets():
    torch.manual_seed(0)
    assert sorted(stratified_counts(64, 64, torch.device("cpu")).tolist()) == list(range(1, 65))
    counts = stratified_counts(10, 64, torch.device("cpu"))
    assert counts.min() >= 1 and counts.max() <= 64
    candidates = torch.rand(10, 64) < 0.5
    subset = random_subset(candidates, counts)
    assert not (subset & ~candidates).any()
    assert torch.equal(subset.sum(1), torch.minimum(counts, candidates.sum(1)))


@pytest.mark.parametrize("network", ["mlp", "conv", "transformer"])
def test_shapes_and_that_the_loss_estimates_the_bound(network):
    torch.manual_seed(0)
    model = MDM.build(network=network, hidden=16, blocks=1, heads=2, dropout=0.0, masks_per_level=2).eval()
    x = common.load_splits(torch.device("cpu"), quick=True)["train"][:6]
    z = x.long().masked_fill(torch.rand(6, 64) < 0.5, MASK)
    assert model.logits(z).shape == (6, 64, 17)
    with torch.no_grad():
        bound = model.test_nll(x)
        assert bound.shape == (6,) and bound.mean().item() == pytest.approx(64 * math.log(17), rel=0.2)
        assert model.bound_terms(x).shape == (6, 64, 2)
        for form in ("discrete", "continuous"):
            other = MDM.build(network=network, hidden=16, blocks=1, heads=2, dropout=0.0, loss_form=form).eval()
            other.load_state_dict(model.state_dict())
            estimates = torch.stack([other.loss(x, None) for _ in range(200)])
            assert estimates.shape == (200,) and torch.isfinite(estimates).all()
            stderr = estimates.std() / math.sqrt(len(estimates))
            assert abs(estimates.mean() - bound.mean()) < 5 * stderr + 0.5
        assert model.eval_loss(x, None).item() == pytest.approx(bound.mean().item(), rel=0.03)


def test_complete_keeps_observed_pixels_and_fills_the_rest():
    torch.manual_seed(0)
    model = MDM.build(hidden=16, blocks=1).eval()
    x = common.load_splits(torch.device("cpu"), quick=True)["test"][:8]
    missing = torch.rand(8, 64) < 0.4
    for steps in (None, 1, 5):
        filled = model.complete(x, missing, steps)
        assert filled.shape == x.shape and torch.equal(filled[~missing], x[~missing])
        assert torch.equal(filled, filled.round()) and filled.min() >= 0 and filled.max() <= 16
    bound = model.missing_nll(x, missing)
    assert bound.shape == (8,) and (bound > 0).all() and (bound < model.test_nll(x)).all()


def test_missing_nll_of_one_missing_pixel_is_its_exact_conditional():
    """With a single pixel missing the order-agnostic bound has one term and no slack:
    -log p(x_i | every other pixel), read off the network's logits."""
    torch.manual_seed(0)
    model = MDM.build(hidden=16, blocks=1).eval()
    x = common.load_splits(torch.device("cpu"), quick=True)["test"][:6]
    missing = torch.zeros(6, 64, dtype=torch.bool)
    pixel = torch.tensor([0, 9, 27, 36, 50, 63])
    missing[torch.arange(6), pixel] = True
    target = x.round().long()
    with torch.no_grad():
        log_probs = torch.log_softmax(model.logits(target.masked_fill(missing, MASK)), -1)
        expected = -log_probs[torch.arange(6), pixel, target[torch.arange(6), pixel]]
        bound = model.missing_nll(x, missing)
    torch.testing.assert_close(bound, expected)


def test_labels_are_ignored_by_the_unconditional_model():
    torch.manual_seed(0)
    model = MDM.build(hidden=16, blocks=1)
    x = common.load_splits(torch.device("cpu"), quick=True)["train"][:8]
    torch.manual_seed(1)
    a = model.loss(x, torch.zeros(8, dtype=torch.long))
    torch.manual_seed(1)
    assert torch.equal(a, model.loss(x, torch.arange(8)))


@pytest.mark.parametrize("network", ["mlp", "conv", "transformer"])
def test_conditional_model_uses_its_labels(network):
    assert not any("classes" in name for name, _ in MDM.build(network=network, hidden=16).named_parameters())
    torch.manual_seed(0)
    model = MDM.build(network=network, hidden=16, blocks=1, heads=2, dropout=0.0, conditional=True,
                      masks_per_level=2).eval()
    x = common.load_splits(torch.device("cpu"), quick=True)["test"][:6]
    zeros, ones = torch.zeros(6, dtype=torch.long), torch.ones(6, dtype=torch.long)
    with torch.no_grad():
        torch.manual_seed(1)
        a = model.test_nll(x, zeros)
        torch.manual_seed(1)
        assert a.shape == (6,) and not torch.allclose(a, model.test_nll(x, ones))
        torch.manual_seed(1)
        assert torch.equal(a, model.test_nll(x, zeros))  # the same masks, the same bound
    with pytest.raises(ValueError, match="class labels"):
        model.test_nll(x)
    torch.manual_seed(2)
    assert model.sample(4, torch.tensor([3, 7, 3, 7])).shape == (4, 64)


def test_class_log_likelihoods_share_their_masks_and_estimate_the_bound():
    torch.manual_seed(0)
    model = MDM.build(hidden=16, blocks=1, dropout=0.0, conditional=True, classify_strata=4).eval()
    x = common.load_splits(torch.device("cpu"), quick=True)["test"][:3]
    with torch.no_grad():
        torch.manual_seed(1)
        scores = model.class_log_likelihoods(x)
        assert scores.shape == (3, 10)
        # column c is the stratified estimate with class c, the masks drawn once for all classes
        torch.manual_seed(1)
        target, expected = x.long(), torch.zeros(3, 10)
        for low in range(0, 64, 16):
            m = 1 + low + torch.randint(16, (3,))
            hidden = random_subset(torch.ones_like(target, dtype=torch.bool), m)
            for c in range(10):
                expected[:, c] -= 16 * mdm_script.masked_cross_entropy(
                    lambda z: model.logits(z, torch.full((3,), c)), target, hidden, MASK) / m
        assert torch.allclose(scores, expected, rtol=1e-5)
        # unbiased for the bound: many draws against the test NLL's estimate with many masks
        draws = torch.stack([model.class_log_likelihoods(x) for _ in range(100)])  # (100, 3, 10)
        bound = torch.stack([model.test_nll(x, torch.full((3,), c)) for c in (0, 5)], 1)  # (3, 2)
        mean, stderr = -draws.mean(0)[:, [0, 5]], draws.std(0)[:, [0, 5]] / 10
        assert ((mean - bound).abs() < 5 * stderr + 1.0).all()


# --- the script ---------------------------------------------------------------------


def test_conditional_smoke_writes_the_conditional_files(tmp_path):
    assert run_main(mdm_script.main, TINY + ["--out", str(tmp_path), "--conditional", "--digits", "3,7"]) == 0
    metrics = check_conditional_outputs(tmp_path, "MDM", (3, 7), "upper_bound")
    assert metrics["test_nll_stderr_nats"] > 0



def test_smoke_every_output_and_sample_only_with_other_steps(tmp_path):
    assert run_main(mdm_script.main, TINY + ["--out", str(tmp_path)]) == 0
    metrics = check_outputs(tmp_path, "MDM", "upper_bound")
    assert metrics["test_nll_nats"] < 64 * math.log(17) * 1.2
    assert metrics["test_nll_stderr_nats"] > 0 and metrics["test_nll_replicate_nats"] > 0
    samples = (tmp_path / "MDM_samples.npy").read_bytes()
    assert run_main(mdm_script.main, TINY + ["--out", str(tmp_path), "--sample-only"]) == 0
    assert (tmp_path / "MDM_samples.npy").read_bytes() == samples  # the same seed, the same samples
    assert run_main(mdm_script.main, TINY + ["--out", str(tmp_path), "--sample-only", "--evaluate",
                                             "--sample-steps", "64", "--masks-per-level", "2"]) == 0
    again = json.loads((tmp_path / "MDM_metrics.json").read_text())
    assert again["sampling"]["sample_steps"] == 64
    assert again["test_nll_mc_stderr_nats"] > 0
    assert (tmp_path / "MDM_samples.npy").read_bytes() != samples


def test_other_samplers_are_the_other_round_counts_and_the_exact_one():
    model = MDM.build(hidden=8, blocks=1, masks_per_level=1)
    default = model.sampling.sample_steps
    assert set(model.samplers()) == {f"steps_{k}" for k in (8, 16, 32) if k != default} | {"exact_64"}


def test_resume_continues_like_an_uninterrupted_run(tmp_path):
    flags = TINY + ["--val-every", "1"]  # a run validates its last epoch: the 2-epoch run's 2nd as well
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_main(mdm_script.main, flags + ["--out", str(straight), "--epochs", "3"]) == 0
    assert run_main(mdm_script.main, flags + ["--out", str(resumed), "--epochs", "2"]) == 0
    assert run_main(mdm_script.main, flags + ["--out", str(resumed), "--epochs", "3", "--resume"]) == 0
    a, b = (torch.load(out / "MDM.pt", weights_only=True) for out in (straight, resumed))
    assert a["history"] == b["history"] and a["weights_sha256"] == b["weights_sha256"]
