"""inpaint.py: the masks and the extra-mask loader, the GaussianMixture's conditioning against the
closed form, the ARM's exact conditional against brute-force enumeration, observed pixels kept by
every family's complete(), and a smoke run."""

import itertools
import json

import numpy as np
import pytest
import torch

import common
import inpaint
from conftest import run_main
from test_contract import NAMES, TINY
from plumbing import registry
import plumbing

# -----------------------------------------------------------------------------
# masks


def test_built_in_masks_hide_the_stated_pixels():
    masks = inpaint.built_in_masks(5, seed=0)
    assert list(masks) == list(inpaint.MASK_NAMES)
    grid = {name: mask.reshape(5, 8, 8) for name, mask in masks.items()}
    assert grid["bottom"][:, 4:].all() and not grid["bottom"][:, :4].any()
    assert grid["top"][:, :4].all() and not grid["top"][:, 4:].any()
    assert grid["left"][:, :, :4].all() and not grid["left"][:, :, 4:].any()
    assert grid["right"][:, :, 4:].all() and not grid["right"][:, :, :4].any()
    assert grid["centre"][:, 2:6, 2:6].all() and grid["centre"].sum() == 5 * 16
    assert (masks["random50"].sum(1) == 32).all() and (masks["random75"].sum(1) == 48).all()
    assert not (masks["random50"][0] == masks["random50"][1]).all()  # a set of its own per digit
    again = inpaint.built_in_masks(5, seed=0)
    assert all(np.array_equal(masks[k], again[k]) for k in masks)  # seeded
    assert not np.array_equal(inpaint.built_in_masks(5, seed=1)["random50"], masks["random50"])


def test_extra_mask_loader_takes_one_mask_or_rows_cycled(tmp_path):
    one = np.zeros(64, bool)
    one[:10] = True
    np.save(tmp_path / "corner.npy", one)
    name, masks = inpaint.load_extra_mask(tmp_path / "corner.npy", 7)
    assert name == "corner" and masks.shape == (7, 64) and (masks == one).all()
    rows = np.zeros((3, 64), np.int64)
    rows[np.arange(3), [0, 5, 9]] = 1  # 0/1 integers are booleans too
    np.save(tmp_path / "rows.npy", rows)
    _, masks = inpaint.load_extra_mask(tmp_path / "rows.npy", 7)
    assert masks.dtype == bool and (masks == rows.astype(bool)[np.arange(7) % 3]).all()


@pytest.mark.parametrize("array, message", [
    (np.zeros((2, 63), bool), "shape"),
    (np.zeros((2, 8, 8), bool), "shape"),
    (np.full(64, 0.5), "other than 0 and 1"),
    (np.full(64, 2), "other than 0 and 1"),
    (np.zeros(64, bool), "hides no pixel"),
    (np.ones((2, 64), bool), "every pixel"),
])
def test_extra_mask_loader_refuses_bad_arrays(tmp_path, array, message):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(plumbing.UsageError, match=message):
        inpaint.load_extra_mask(tmp_path / "bad.npy", 4)


def test_extra_mask_loader_refuses_missing_unreadable_and_taken_files(tmp_path):
    with pytest.raises(plumbing.UsageError, match="no file"):
        inpaint.load_extra_mask(tmp_path / "absent.npy", 4)
    (tmp_path / "text.npy").write_text("not an array")
    with pytest.raises(plumbing.UsageError, match="not a readable"):
        inpaint.load_extra_mask(tmp_path / "text.npy", 4)
    np.save(tmp_path / "bottom.npy", np.arange(64) < 10)
    with pytest.raises(plumbing.UsageError, match="taken"):
        inpaint.load_extra_mask(tmp_path / "bottom.npy", 4, taken=inpaint.MASK_NAMES)


def test_a_bad_extra_mask_is_one_line_and_exit_2(tmp_path, capsys):
    np.save(tmp_path / "bad.npy", np.zeros((3, 10), bool))
    code = run_main(inpaint.main, ["--extra-mask", str(tmp_path / "bad.npy"), "--out", str(tmp_path),
                                   "--no-train", "--models", "Independent pixels"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1 and "shape (3, 10)" in error
    assert run_main(inpaint.main, ["--models", "XYZ", "--out", str(tmp_path)]) == 2


# -----------------------------------------------------------------------------
# the GaussianMixture's conditioning


def test_mixture_conditioning_is_the_joint_over_the_marginal():
    """log p(v_m | v_o) from condition_mixture + mixture_log_density equals log p(v) - log p(v_o),
    both computed directly with scipy from the joint mixture; and the conditional mean of one
    Gaussian is the textbook formula."""
    from scipy.stats import multivariate_normal

    rng = np.random.default_rng(0)
    k, d = 3, 5
    weights = np.array([0.2, 0.5, 0.3])
    means = rng.normal(size=(k, d)) * 2
    factors = rng.normal(size=(k, d, d))
    covariances = factors @ factors.transpose(0, 2, 1) + 0.5 * np.eye(d)
    observed = np.array([True, False, True, True, False])
    v = rng.normal(size=(4, d)) * 2

    log_weights, cond_means, cond_covs = inpaint.condition_mixture(weights, means, covariances, v[:, observed],
                                                                   observed)
    ours = inpaint.mixture_log_density(log_weights, cond_means, cond_covs, v[:, ~observed])

    def log_mixture(points, index):
        return np.logaddexp.reduce([np.log(w) + multivariate_normal(mu[index], c[np.ix_(index, index)]).logpdf(points)
                                    for w, mu, c in zip(weights, means, covariances)], axis=0)

    every = np.arange(d)
    expected = log_mixture(v, every) - log_mixture(v[:, observed], every[observed])
    np.testing.assert_allclose(ours, expected, rtol=1e-9, atol=1e-9)
    assert np.allclose(np.exp(log_weights).sum(1), 1)
    o, m = observed, ~observed
    textbook = means[0, m] + covariances[0][np.ix_(m, o)] @ np.linalg.solve(covariances[0][np.ix_(o, o)],
                                                                           v[0, o] - means[0, o])
    np.testing.assert_allclose(cond_means[0, 0], textbook)


def test_gaussian_mixture_completer_keeps_observed_pixels_and_fills_the_grid():
    pixels, _ = common.load_digits_arrays()
    splits = common.split_arrays(pixels)
    completer = inpaint.GaussianMixtureCompleter(splits, seed=0, ks=(2,), draws=1)
    x = torch.from_numpy(splits["test"][:20])
    missing = torch.from_numpy(inpaint.built_in_masks(20, 0)["random50"])
    torch.manual_seed(0)
    out = completer.complete(x, missing)
    assert torch.equal(out[~missing], x[~missing])
    assert torch.equal(out, out.round()) and out.min() >= 0 and out.max() <= 16
    nll = completer.missing_nll(x, missing)
    assert nll.shape == (20,) and torch.isfinite(nll).all()


def test_nearest_neighbour_copies_the_digit_nearest_on_the_observed_pixels():
    train = np.zeros((2, 64))
    train[1, :32], train[1, 32:] = 1, 16  # the second: observed half 1, hidden half 16
    completer = inpaint.NearestNeighbourCompleter(train)
    missing = torch.zeros(2, 64, dtype=torch.bool)
    missing[:, 32:] = True
    x = torch.zeros(2, 64)
    x[0, 32:] = 16  # hidden pixels like the second digit's: they must not count
    x[1, :32] = 1
    out = completer.complete(x, missing)
    assert torch.equal(out[0], torch.zeros(64))
    assert torch.equal(out[1], torch.from_numpy(train[1]).float())


def test_independent_pixels_nll_sums_the_missing_pixels_log_probabilities():
    pixels, _ = common.load_digits_arrays()
    train = pixels[:1000]
    completer = inpaint.IndependentPixelsCompleter(train)
    x = torch.from_numpy(pixels[1350:1353])
    missing = torch.zeros(3, 64, dtype=torch.bool)
    missing[:, :5] = True
    log_probs = common.independent_pixel_log_probs(train)
    expected = [-sum(log_probs[i, int(x[b, i])] for i in range(5)) for b in range(3)]
    np.testing.assert_allclose(completer.missing_nll(x, missing).numpy(), expected, rtol=1e-6)


# -----------------------------------------------------------------------------
# the ARM against brute force


@pytest.fixture(scope="module")
def tiny_arm():
    arm_class = registry.model_class("ARM")
    torch.manual_seed(0)
    model = arm_class.build(channels=8, layers=2, members=2).eval()
    with torch.no_grad():  # away from the uniform start, so that the conditionals differ
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return model


def _enumerated_conditional(model, x, hidden):
    """p(x_hidden | x_other) of one image by enumerating the 17^|hidden| completions through
    model.nll: (17,) * |hidden| probabilities."""
    completions = torch.tensor(list(itertools.product(range(common.NUM_LEVELS), repeat=len(hidden))))
    images = x.repeat(len(completions), 1)
    images[:, hidden] = completions.float()
    with torch.no_grad():
        log_joint = -model.nll(images)
    return torch.softmax(log_joint.double(), 0).view(*[common.NUM_LEVELS] * len(hidden))


def test_arm_missing_nll_of_a_suffix_mask_is_the_enumerated_conditional(tiny_arm):
    pixels, _ = common.load_digits_arrays()
    x = torch.from_numpy(pixels[1350:1351])
    missing = torch.zeros(1, 64, dtype=torch.bool)
    missing[0, 62:] = True  # the last two pixels: a suffix
    probs = _enumerated_conditional(tiny_arm, x[0], [62, 63])
    expected = -probs[int(x[0, 62]), int(x[0, 63])].log()
    with torch.no_grad():
        assert tiny_arm.missing_nll(x, missing).item() == pytest.approx(expected.item(), abs=1e-4)
    interior = torch.zeros(1, 64, dtype=torch.bool)
    interior[0, 10] = True
    with pytest.raises(NotImplementedError):
        tiny_arm.missing_nll(x, interior)


def test_arm_ancestral_completions_of_a_suffix_mask_follow_the_enumerated_conditional(tiny_arm):
    """Exact ancestral sampling of the last two pixels: the frequencies of 3000 completions against
    enumeration, total-variation distance below what sampling noise allows."""
    pixels, _ = common.load_digits_arrays()
    x = torch.from_numpy(pixels[1352:1353]).repeat(3000, 1)
    missing = torch.zeros_like(x, dtype=torch.bool)
    missing[:, 62:] = True
    probs = _enumerated_conditional(tiny_arm, x[0], [62, 63]).reshape(-1)
    torch.manual_seed(0)
    out = tiny_arm.complete(x, missing)
    assert torch.equal(out[~missing], x[~missing])
    frequencies = torch.bincount((out[:, 62] * common.NUM_LEVELS + out[:, 63]).long(),
                                 minlength=len(probs)).double() / len(x)
    assert 0.5 * (frequencies - probs).abs().sum() < 0.08


def test_arm_importance_weights_give_the_enumerated_conditional_of_an_interior_pixel(tiny_arm):
    """A pixel in the middle: the particles' self-normalised importance weights estimate the
    conditional p(x_20 | every other pixel) within sampling noise."""
    pixels, _ = common.load_digits_arrays()
    x = torch.from_numpy(pixels[1352:1353])
    missing = torch.zeros_like(x, dtype=torch.bool)
    missing[0, 20] = True
    probs = _enumerated_conditional(tiny_arm, x[0], [20])
    torch.manual_seed(0)
    completions, log_w = tiny_arm.ancestral_with_observed(x, missing, particles=6000)
    weights = torch.softmax(log_w[0].double(), 0)
    estimate = torch.zeros(common.NUM_LEVELS, dtype=torch.float64).index_add_(0, completions[0, :, 20].long(), weights)
    assert 0.5 * (estimate - probs).abs().sum() < 0.07


# -----------------------------------------------------------------------------
# every family keeps the observed pixels


@pytest.mark.parametrize("name", NAMES)
def test_every_family_keeps_the_observed_pixels(name):
    cls = registry.model_class(name)
    torch.manual_seed(0)
    model = cls.build(**TINY.get(name, {})).eval()
    pixels, _ = common.load_digits_arrays()
    x = torch.from_numpy(pixels[1350:1356])
    masks = inpaint.built_in_masks(6, seed=0)
    missing = torch.from_numpy(np.stack([masks[k][i] for i, k in enumerate(
        ("bottom", "top", "left", "centre", "random50", "random75"))]))
    torch.manual_seed(1)
    with torch.no_grad():
        out = model.complete(x, missing)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert torch.equal(out[~missing], x[~missing]), f"{name} changed observed pixels"
    assert out.min() >= 0 and out.max() <= common.PIXEL_MAX
    try:
        nll = model.missing_nll(x[:1], missing[:1])
    except NotImplementedError:
        return
    assert nll.shape == (1,) and torch.isfinite(nll).all() and nll.item() >= 0


# -----------------------------------------------------------------------------
# a smoke run


def test_smoke_run_writes_every_output(tmp_path, capsys):
    mask = np.zeros(64, bool)
    mask[::2] = True
    np.save(tmp_path / "stripes.npy", mask)
    code = run_main(inpaint.main, ["--models", "Independent pixels", "Nearest neighbour", "--masks", "bottom",
                                   "--extra-mask", str(tmp_path / "stripes.npy"), "--no-train",
                                   "--out", str(tmp_path), "--no-progress", "--diversity-digits", "10"])
    assert code == 0
    result = json.loads((tmp_path / "inpaint.json").read_text())
    assert list(result["masks"]) == ["bottom", "stripes"]
    completions = np.load(tmp_path / "inpaint_completions.npz")
    assert sorted(completions.files) == sorted(f"{m}/{k}" for m in ("Independent pixels", "Nearest neighbour")
                                               for k in ("bottom", "stripes"))
    array = completions["Nearest neighbour/bottom"]
    assert array.dtype == np.uint8 and array.shape == (447, 64) and array.max() <= 16
    pixels, _ = common.load_digits_arrays()
    assert (array[:, :32] == pixels[1350:, :32]).all()  # observed pixels kept
    assert (tmp_path / "inpaint.png").stat().st_size > 1000
    table = (tmp_path / "inpaint.md").read_text()
    assert "| Nearest neighbour |" in table and "stripes" in table
