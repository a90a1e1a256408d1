"""inpaint.py: the masks and the extra-mask loader, the GaussianMixture's conditioning against the
closed form, the ARM's exact conditional against brute-force enumeration, observed pixels kept by
every family's complete(), and a smoke run."""

import itertools
import os
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


def test_arm_missing_nll_of_an_interior_pixel_estimates_the_enumerated_conditional(tiny_arm):
    """Any other mask: the importance-sampling estimate of -log p(x_m | x_o) against enumeration,
    close with many passes, and low in expectation with few (Jensen), as the docstring says."""
    pixels, _ = common.load_digits_arrays()
    x = torch.from_numpy(pixels[1352:1353])
    interior = torch.zeros(1, 64, dtype=torch.bool)
    interior[0, 56] = True  # few pixels after it: importance weights of little variance, a cheap check
    expected = -_enumerated_conditional(tiny_arm, x[0], [56])[int(x[0, 56])].log().item()
    torch.manual_seed(0)
    with torch.no_grad():
        many = tiny_arm.missing_nll(x, interior, particles=4000).item()
        few = torch.cat([tiny_arm.missing_nll(x.repeat(400, 1), interior.repeat(400, 1), particles=2)]).mean().item()
    assert many == pytest.approx(expected, abs=0.05)
    assert few < expected - 0.02


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
# RePaint against the exact conditional of a Gaussian


def test_repaint_with_the_exact_denoiser_comes_near_the_gaussian_conditional():
    """Data x ~ N(0, s^2 [[1, r], [r, 1]]) and its exact denoiser E[x | z] on the VP path: the draws
    of x_1 given x_0 should have the conditional's mean r x_0 and std s sqrt(1 - r^2). Replacement
    alone (resample 1) misses the mean by far (Lugmayr et al. 2022); RePaint's resampling halves
    that miss at 40 levels (it is not exact: measured 0.21 against 0.27, replacement 0.16) and
    keeps the std within 8%."""
    s, r, observed = 0.3, 0.9, 0.3
    cov = s**2 * torch.tensor([[1.0, r], [r, 1.0]], dtype=torch.float64)
    abar = torch.linspace(0.999, 0.001, 40, dtype=torch.float64).flip(0)  # noisiest first
    alphas, sigmas = abar.sqrt().tolist(), (1 - abar).sqrt().tolist()

    def denoise(z, i):  # E[x | z] = alpha C (alpha^2 C + sigma^2 I)^-1 z
        gain = alphas[i] * cov @ torch.linalg.inv(alphas[i] ** 2 * cov + sigmas[i] ** 2 * torch.eye(2, dtype=torch.float64))
        return z @ gain.T

    known = torch.tensor([[observed, 0.0]], dtype=torch.float64).repeat(20000, 1)
    missing = torch.tensor([[False, True]]).repeat(20000, 1)
    target_mean, target_std = r * observed, s * (1 - r**2) ** 0.5
    torch.manual_seed(0)
    replaced = common.repaint(denoise, known, missing, alphas, sigmas, resample=1)[:, 1]
    torch.manual_seed(0)
    drawn = common.repaint(denoise, known, missing, alphas, sigmas, resample=10)[:, 1]
    assert abs(replaced.mean().item() - target_mean) > 0.08
    assert abs(drawn.mean().item() - target_mean) < 0.6 * abs(replaced.mean().item() - target_mean)
    assert drawn.std().item() == pytest.approx(target_std, rel=0.08)


# -----------------------------------------------------------------------------
# the committed completion


class _Scored:
    """A completer whose likelihood prefers digits with little ink."""

    name = "ink"

    def completion_nll(self, x):
        return x.sum(1)


def test_best_of_picks_each_inputs_most_likely_draw():
    draws = torch.tensor([[[3.0, 3.0], [0.0, 1.0]], [[1.0, 1.0], [5.0, 5.0]], [[2.0, 2.0], [0.0, 0.0]]])  # (K 3, N 2, 2)
    committed = inpaint.best_of(_Scored(), draws, seed=0, device=torch.device("cpu"), batch_size=2)
    assert torch.equal(committed, torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    assert inpaint.best_of(inpaint.IndependentPixelsCompleter(np.zeros((3, 64))), draws, seed=0,
                           device=torch.device("cpu"), batch_size=2) is None


@pytest.mark.parametrize("text, value", [("draw", 1), ("best-of-8", 8), ("best-of-2", 2)])
def test_pick_flag_reads_draw_and_best_of_k(text, value):
    assert inpaint.pick_flag(text) == value


@pytest.mark.parametrize("text", ["best-of-1", "best-of-", "best", "best-of-x", "top-8"])
def test_pick_flag_refuses_other_words(text):
    with pytest.raises(Exception, match="best-of-K"):
        inpaint.pick_flag(text)


# -----------------------------------------------------------------------------
# every family keeps the observed pixels


def tiny(name):
    """An untrained small model of the family `name`, in eval mode (seed 0)."""
    torch.manual_seed(0)
    return registry.model_class(name).build(**TINY.get(name, {})).eval()


@pytest.mark.parametrize("name", NAMES)
def test_every_family_keeps_the_observed_pixels(name):
    model = tiny(name)
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


@pytest.mark.parametrize("name", NAMES)
def test_every_family_ranks_completions_or_says_it_cannot(name):
    """completion_nll: (B,) finite numbers that rank whole digits, or NotImplementedError."""
    model = tiny(name)
    pixels, _ = common.load_digits_arrays()
    with torch.no_grad():
        try:
            scores = model.completion_nll(torch.from_numpy(pixels[1350:1353]))
        except NotImplementedError:
            assert model.nll_kind is None
            return
    assert scores.shape == (3,) and torch.isfinite(scores).all()


# -----------------------------------------------------------------------------
# a smoke run


def test_smoke_run_writes_every_output(tmp_path, capsys):
    mask = np.zeros(64, bool)
    mask[::2] = True
    np.save(tmp_path / "stripes.npy", mask)
    code = run_main(inpaint.main, ["--models", "Independent pixels", "Nearest neighbour", "--masks", "bottom",
                                   "--extra-mask", str(tmp_path / "stripes.npy"), "--no-train",
                                   "--out", str(tmp_path), "--no-progress", "--copied", "10"])
    assert code == 0
    result = json.loads((tmp_path / "inpaint.json").read_text())
    assert list(result["masks"]) == ["bottom", "stripes"]
    assert result["setup"] == dict(split="test", digits=447, draws=8, copied=10)
    assert 1 <= result["threads"] <= 2  # --threads auto by default: the idle cores, at most 2
    completions = np.load(tmp_path / "inpaint_completions.npz")
    assert sorted(completions.files) == sorted(f"{m}/{k}" for m in ("Independent pixels", "Nearest neighbour")
                                               for k in ("bottom", "stripes"))
    array = completions["Nearest neighbour/bottom"]
    assert array.dtype == np.uint8 and array.shape == (447, 64) and array.max() <= 16
    pixels, _ = common.load_digits_arrays()
    assert (array[:, :32] == pixels[1350:, :32]).all()  # observed pixels kept
    assert (tmp_path / "inpaint.png").stat().st_size > 1000
    table = (tmp_path / "inpaint.md").read_text()
    assert table.index("The proper score") < table.index("one draw") < table.index("Committed completion")
    rows = {(r["model"], r["mask"]): r for r in result["rows"]}
    nearest = rows["Nearest neighbour", "bottom"]
    assert nearest["committed_accuracy"] == nearest["draw_accuracy_first"]  # it always commits
    assert rows["Independent pixels", "bottom"]["committed_accuracy"] is None  # no likelihood to rank by
    assert rows["Independent pixels", "bottom"]["missing_nll"] > 0


def test_a_model_left_out_on_a_later_mask_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    """complete() raising NotImplementedError on the second mask: the model is named in one line
    and none of its first mask's draws reach the table, the picture or the completions."""
    original = inpaint.IndependentPixelsCompleter.complete

    def complete(self, x, missing):
        if missing[:, 0].any():  # the left half: column 0 hidden
            raise NotImplementedError("not on this mask")
        return original(self, x, missing)

    monkeypatch.setattr(inpaint.IndependentPixelsCompleter, "complete", complete)
    shown = []
    real_panel = inpaint.panel
    monkeypatch.setattr(inpaint, "panel", lambda title, x, missing, truth, draws, committed, **kw: (
        shown.extend(draws) or shown.extend(committed) or real_panel(title, x, missing, truth, draws, committed, **kw)))
    code = run_main(inpaint.main, ["--models", "Independent pixels", "Nearest neighbour", "--masks", "bottom", "left",
                                   "--no-train", "--out", str(tmp_path), "--no-progress", "--copied", "4"])
    assert code == 0 and "left out Independent pixels: not on this mask" in capsys.readouterr().err
    assert shown and "Independent pixels" not in shown
    assert all(not key.startswith("Independent pixels/") for key in np.load(tmp_path / "inpaint_completions.npz").files)
    assert {r["model"] for r in json.loads((tmp_path / "inpaint.json").read_text())["rows"]} >= {"Nearest neighbour"}
    assert "Independent pixels" not in {r["model"] for r in json.loads((tmp_path / "inpaint.json").read_text())["rows"]}


def test_val_split_completes_the_validation_digits(tmp_path):
    code = run_main(inpaint.main, ["--models", "Nearest neighbour", "--masks", "left", "--split", "val", "--pick",
                                   "draw", "--no-train", "--out", str(tmp_path), "--no-progress", "--copied", "5"])
    assert code == 0
    result = json.loads((tmp_path / "inpaint.json").read_text())
    assert result["setup"] == dict(split="val", digits=350, draws=1, copied=5)
    assert np.load(tmp_path / "inpaint_completions.npz")["Nearest neighbour/left"].shape == (350, 64)
    assert "Committed completion" not in (tmp_path / "inpaint.md").read_text()


# -----------------------------------------------------------------------------
# the user's own digits: --input DIGITS.npy --mask NAME|FILE.npy


def test_input_completes_the_users_digits_into_a_picture(tmp_path):
    pixels, _ = common.load_digits_arrays()
    np.save(tmp_path / "mine.npy", pixels[:3].reshape(3, 8, 8).astype(np.int64))
    out = tmp_path / "out"
    code = run_main(inpaint.main, ["--input", str(tmp_path / "mine.npy"), "--mask", "bottom", "--models",
                                   "Nearest neighbour", "Independent pixels", "--no-train", "--out", str(out)])
    assert code == 0
    arrays = np.load(out / "inpaint_input.npz")
    draws = arrays["Nearest neighbour/draws"]
    assert draws.shape == (8, 3, 64) and (draws[:, :, :32] == pixels[:3, :32]).all()
    assert "Nearest neighbour/committed" in arrays.files and "Independent pixels/committed" not in arrays.files
    from PIL import Image
    image = Image.open(out / "inpaint_input.png")
    assert image.width > 300 and image.height > 100
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["inpaint_input.npz",
                                                                                  "inpaint_input.png"]


@pytest.mark.parametrize("digits, mask, message", [
    (np.zeros((2, 64)), "everything.npy", "hides no pixel or every pixel"),
    (np.zeros((2, 64)), "nothing.npy", "hides no pixel or every pixel"),
    (np.zeros((2, 64)), "three_rows.npy", "for the 2 digits of --input"),
    (np.zeros((2, 63)), "bottom", "has shape (2, 63)"),
    (np.full((2, 64), 17.0), "bottom", "outside the whole numbers 0..16"),
    (np.full((2, 64), np.nan), "bottom", "outside the whole numbers 0..16"),
    (np.zeros((2, 64)), "middle", "expected one of bottom, top, left, right, centre"),
])
def test_input_refusals_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, digits, mask, message):
    np.save(tmp_path / "digits.npy", digits)
    np.save(tmp_path / "everything.npy", np.ones(64, bool))
    np.save(tmp_path / "nothing.npy", np.zeros((8, 8), bool))
    np.save(tmp_path / "three_rows.npy", np.eye(3, 64, dtype=bool))
    out = tmp_path / "out"
    mask_argument = mask if not mask.endswith(".npy") else str(tmp_path / mask)
    code = run_main(inpaint.main, ["--input", str(tmp_path / "digits.npy"), "--mask", mask_argument,
                                   "--models", "Nearest neighbour", "--no-train", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_a_fifo_as_mask_or_input_is_refused_at_once_and_makes_no_folder(tmp_path, capsys):
    fifo = tmp_path / "fifo.npy"
    os.mkfifo(fifo)
    for argv in (["--extra-mask", str(fifo), "--models", "Independent pixels"],
                 ["--input", str(fifo), "--mask", "bottom"], ["--input", str(tmp_path / "none.npy"), "--mask", str(fifo)]):
        np.save(tmp_path / "none.npy", np.zeros((1, 64)))
        code = run_main(inpaint.main, argv + ["--no-train", "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 2 and "is a FIFO, not a file" in err, err
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["0", "many", "-1"])
def test_a_bad_thread_count_is_one_line(tmp_path, capsys, value):
    code = run_main(inpaint.main, ["--threads", value, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "--threads" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_input_without_mask_is_refused(tmp_path, capsys):
    code = run_main(inpaint.main, ["--input", str(tmp_path / "digits.npy"), "--out", str(tmp_path / "out")])
    assert code == 2 and "--input and --mask go together" in capsys.readouterr().err


@pytest.mark.parametrize("truth, best_of", [(True, 8), (False, 1)])
def test_the_picture_says_what_its_colours_columns_and_rows_are(tmp_path, monkeypatch, truth, best_of):
    from PIL import Image, ImageDraw

    texts, text = [], ImageDraw.ImageDraw.text
    monkeypatch.setattr(ImageDraw.ImageDraw, "text", lambda self, xy, t, *a, **k: (
        texts.append(t), text(self, xy, t, *a, **k))[1])
    pixels, _ = common.load_digits_arrays()
    x = torch.from_numpy(pixels[:2]).float()
    missing = torch.from_numpy(inpaint.built_in_masks(2, 0)["bottom"])
    draws = {name: x.expand(8, 2, 64) for name in ("Nearest neighbour", "Independent pixels")}
    committed = {"Nearest neighbour": x, "Independent pixels": None}
    picture = inpaint.panel("mask bottom", x, missing, x if truth else None, draws, committed, best_of=best_of)
    assert {"mask bottom", "input", *draws, "draw 1", "draw 4"} <= set(texts)
    assert any(t.startswith("hidden pixels") for t in texts)
    assert ("true" in texts) == truth and ("best" in texts and "of 8" in texts) == (best_of == 8)
    assert any(t.startswith("grey cell") for t in texts) == (best_of == 8)
    assert texts.count("draw 1") == 2 and texts.count("input") == 2  # over each of the two inputs
    red = np.all(np.asarray(picture) == inpaint.HIDDEN_RED, axis=2)
    assert red.sum() == 2 * 32 * 5 * 5 + 12 * 12  # the hidden half of each input at 5x, and the legend's swatch
    inpaint.save_panels(tmp_path / "p.png", [picture] * 5)
    with Image.open(tmp_path / "p.png") as image:  # four panels to a row, then one
        assert image.width == 4 * (picture.width + 16) and image.height == 2 * (picture.height + 16)
