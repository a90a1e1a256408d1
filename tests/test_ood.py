"""ood.py: the metrics against closed forms, the sets, the scores, the extra-set loader, and a
smoke run on a tiny ARM."""

import json
import math

import numpy as np
import pytest
import torch

import autoregressive_model as arm_script
import common
import leaderboard
import ood
from conftest import run_main
import plumbing


@pytest.fixture(scope="module")
def digits():
    pixels, labels = common.load_digits_arrays()
    return common.split_arrays(pixels), common.split_arrays(labels)


@pytest.fixture(scope="module")
def sets(digits):
    splits, labels = digits
    return ood.built_in_sets(splits["test"], labels["test"], seed=0)


# -----------------------------------------------------------------------------
# metrics


def test_auroc_of_a_perfect_an_inverted_and_a_random_score():
    inside, outside = np.arange(100.0), np.arange(100.0) + 1000
    assert ood.auroc(inside, outside) == 1.0
    assert ood.auroc(outside, inside) == 0.0
    rng = np.random.default_rng(0)
    random = ood.auroc(rng.normal(size=20000), rng.normal(size=20000))
    assert random == pytest.approx(0.5, abs=0.01)  # sd of the estimate ~0.003
    # closed form for two unit Gaussians a mean d apart: Phi(d / sqrt 2)
    shifted = ood.auroc(rng.normal(size=20000), rng.normal(1.0, size=20000))
    assert shifted == pytest.approx(0.5 * (1 + math.erf(0.5)), abs=0.01)


def test_fpr_at_95_tpr_counts_the_set_accepted_by_the_95_percent_threshold():
    inside = np.arange(100.0)  # the threshold that accepts 95% of these accepts scores <= 94
    assert ood.fpr_at_95_tpr(inside, inside + 50) == pytest.approx(0.45)  # 50..94 of 50..149
    assert ood.fpr_at_95_tpr(inside, inside + 1000) == 0.0
    assert ood.fpr_at_95_tpr(inside, inside - 1000) == 1.0


# -----------------------------------------------------------------------------
# the sets


def test_every_built_in_set_has_its_shape_range_and_grid(sets):
    assert list(sets) == ["noise", "blank", "constant", "inverted", "hflip", "vflip", "corrupted", "natural"]
    for name, images in sets.items():
        assert images.dtype == np.float32 and images.ndim == 2 and images.shape[1] == 64, name
        assert 200 <= len(images) <= 500, name  # a few hundred
        assert images.min() >= 0 and images.max() <= 16, name
        assert np.array_equal(images, np.round(images)), name  # on the integer grid
    assert not sets["blank"].any()
    assert (sets["constant"] == sets["constant"][:, :1]).all() and sets["constant"].min() >= 1
    assert len(np.unique(sets["constant"][:, 0])) == 16  # every level 1..16 occurs
    noise = sets["noise"]
    assert noise.mean() == pytest.approx(8, abs=0.1) and len(np.unique(noise)) == 17
    assert sets["natural"].std(1).mean() > 0.5  # patches, not flat images
    assert np.abs(np.diff(sets["natural"].reshape(-1, 8, 8), axis=2)).mean() < np.abs(
        np.diff(noise.reshape(-1, 8, 8), axis=2)).mean() / 2  # and smoother than noise


def test_derived_sets_are_the_stated_transforms_of_the_test_digits(digits, sets):
    splits, labels = digits
    test, classes = splits["test"], labels["test"]
    assert np.array_equal(sets["inverted"], 16 - test)
    for axis, dropped in (("hflip", (0, 1, 8)), ("vflip", (0, 1, 3, 8))):
        kept = test[~np.isin(classes, dropped)].reshape(-1, 8, 8)
        mirrored = kept[:, :, ::-1] if axis == "hflip" else kept[:, ::-1]
        assert np.array_equal(sets[axis], mirrored.reshape(-1, 64)), axis
    changed = (sets["corrupted"] != test).mean(1)
    assert changed.max() <= 0.2  # 10-20% replaced (a replacement may draw the same value)
    assert 0.1 < changed.mean() < 0.15


def test_sets_are_seed_stable(digits, sets):
    splits, labels = digits
    again = ood.built_in_sets(splits["test"], labels["test"], seed=0)
    other = ood.built_in_sets(splits["test"], labels["test"], seed=1)
    for name in sets:
        assert np.array_equal(sets[name], again[name]), name
    for name in ("noise", "constant", "corrupted", "natural"):  # the random ones change with the seed
        assert not np.array_equal(sets[name], other[name]), name


# -----------------------------------------------------------------------------
# scores and background models


def test_typicality_is_symmetric_around_the_validation_typical_value():
    reference = np.array([80.0, 84.0, 88.0, 92.0])  # mean 86
    deltas = np.array([0.0, 1.5, 10.0, 50.0])
    above, below = ood.typicality(86 + deltas, reference), ood.typicality(86 - deltas, reference)
    assert np.allclose(above, below) and np.allclose(above, deltas)


def test_mirror_ratio_is_zero_for_a_mirror_blind_model_and_log4_at_most_below():
    stat = np.array([10.0, 50.0])
    assert np.allclose(ood.mirror_ratio(stat, np.stack([stat] * 4)), 0.0)
    # x far less likely than its mirror images: the ratio is ~ NLL(x) - NLL(g x) - log 4
    mirrored = np.stack([stat, stat - 30, stat + 100, stat + 100])
    assert np.allclose(ood.mirror_ratio(stat, mirrored), 30 - math.log(4), atol=1e-6)
    # x far more likely than its mirror images: the ratio tends to -log 4
    mirrored = np.stack([stat, stat + 100, stat + 100, stat + 100])
    assert np.allclose(ood.mirror_ratio(stat, mirrored), -math.log(4), atol=1e-6)


def test_combined_is_the_largest_validation_z_score():
    rng = np.random.default_rng(0)
    stat = {k: rng.normal(100, 10, 50) for k in ("val", "test", "x")}
    background = {k: rng.normal(100, 10, 50) for k in stat}
    scores = ood.derived_scores("nll", stat, None, background)
    assert set(scores) == {"NLL", "typicality", "ratio (pixel Markov)", "combined"}
    ratio = stat["x"] - background["x"]
    ratio_val = stat["val"] - background["val"]
    expected = np.maximum(np.abs(stat["x"] - stat["val"].mean()) / stat["val"].std(),
                          (ratio - ratio_val.mean()) / ratio_val.std())
    assert np.allclose(scores["combined"]["x"], expected)
    assert list(ood.derived_scores("score-norm", stat, None, None)) == ["score-norm"]


def test_independent_pixel_nll_is_the_leaderboard_baseline(digits):
    splits, _ = digits
    nll = ood.independent_pixel_nll(splits["train"])(splits["test"])
    expected, *_ = leaderboard.independent_categorical(
        {k: v.astype(np.float64) for k, v in splits.items()}, 10, 0)
    assert nll.shape == (len(splits["test"]),) and nll.mean() == pytest.approx(expected, rel=1e-9)


def test_pixel_markov_nll_against_hand_counts():
    """Fitted on one blank image (and its 3 mirror images: 4 x 64 pixels, all 0 after two 0
    neighbours): p(0 | 0, 0) = (256 + 0.5) / (256 + 17 * 0.5), and any unseen context is uniform."""
    markov = ood.pixel_markov_nll(np.zeros((1, 64)))
    seen = math.log(256.5 / 264.5)
    assert markov(np.zeros((1, 64)))[0] == pytest.approx(-64 * seen)
    fives = np.full((1, 64), 5.0)  # first pixel: 5 after (0, 0); the other 63: unseen contexts
    assert markov(fives)[0] == pytest.approx(-math.log(0.5 / 264.5) + 63 * math.log(17))
    # its neighbours are the left and upper pixels, with 0 outside the image
    x = np.zeros((1, 64))
    x[0, 9] = 7  # row 1, column 1: the context of (1, 2) and (2, 1) changes, nothing else
    expected = -61 * seen - math.log(0.5 / 264.5) + 2 * math.log(17)
    assert markov(x)[0] == pytest.approx(expected)


# -----------------------------------------------------------------------------
# the extra-set loader


def test_extra_set_loader_accepts_both_layouts_and_rounds_to_the_grid(tmp_path):
    flat, square = tmp_path / "flat.npy", tmp_path / "square.npy"
    np.save(flat, np.full((5, 64), 3.2))
    np.save(square, np.arange(2 * 64).reshape(2, 8, 8) % 17)
    name, images = ood.load_extra_set(f"mine={flat}")
    assert name == "mine" and images.shape == (5, 64) and images.dtype == np.float32 and (images == 3).all()
    _, images = ood.load_extra_set(f"sq={square}")
    assert images.shape == (2, 64) and np.array_equal(images.reshape(-1), np.arange(128) % 17)


@pytest.mark.parametrize("array, message", [
    (np.zeros((5, 63)), "shape"), (np.zeros((8, 8)), "shape"), (np.zeros((2, 8, 8, 1)), "shape"),
    (np.zeros((0, 64)), "shape"), (np.full((3, 64), 17.0), "values"), (np.full((3, 64), -1), "values"),
    (np.full((3, 64), np.nan), "NaN"), (np.array([["a"] * 64]), "not numbers"),
])
def test_extra_set_loader_refuses_bad_shapes_and_values(tmp_path, array, message):
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(plumbing.UsageError, match=message):
        ood.load_extra_set(f"bad={path}")


def test_extra_set_loader_refuses_bad_specs_and_files(tmp_path):
    good = tmp_path / "good.npy"
    np.save(good, np.zeros((2, 64)))
    (tmp_path / "text.npy").write_text("not an array")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    for spec, message in ((str(good), "NAME=FILE"), (f"a b={good}", "name"), (f"noise={good}", "taken"),
                          (f"x={tmp_path / 'missing.npy'}", "no file"), (f"x={tmp_path / 'text.npy'}", "readable"),
                          (f"x={tmp_path / 'objects.npy'}", "readable")):
        with pytest.raises(plumbing.UsageError, match=message):
            ood.load_extra_set(spec, taken=("noise",))


def test_stochastic_statistics_are_seeded_per_input():
    class Noisy:
        def ood_score(self, x):
            return x.sum(1) + torch.randn(len(x))

    images = np.zeros((5, 64), np.float32)
    first = ood.evaluate(Noisy(), images, 3, torch.device("cpu"), 2)
    assert np.array_equal(first, ood.evaluate(Noisy(), images, 3, torch.device("cpu"), 2))
    assert not np.array_equal(first, ood.evaluate(Noisy(), images, 4, torch.device("cpu"), 2))


def test_a_bad_extra_file_is_one_line_and_exit_2(tmp_path, capsys):
    path = tmp_path / "bad.npy"
    np.save(path, np.zeros((3, 10)))
    code = run_main(ood.main, ["--out", str(tmp_path), "--no-train", "--extra-ood", f"bad={path}"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "bad.npy" in err and "shape" in err
    assert not (tmp_path / "ood.json").exists()


# -----------------------------------------------------------------------------
# a whole run on a tiny ARM


def test_smoke_run_on_a_tiny_arm_writes_every_output(tmp_path, capsys):
    assert run_main(arm_script.main, ["--quick", "--no-progress", "--out", str(tmp_path),
                                      "--channels", "8", "--layers", "2"]) == 0
    extra = tmp_path / "extra.npy"
    np.save(extra, np.random.default_rng(0).integers(0, 17, (20, 8, 8)))
    weights_before = sorted(p.name for p in tmp_path.iterdir())
    # the weights read from --weights, the tool's files written into another --out
    assert run_main(ood.main, ["--weights", str(tmp_path), "--out", str(tmp_path / "mine"), "--no-train",
                               "--no-progress", "--extra-ood", f"mine={extra}"]) == 0
    assert "skipped EBM" in capsys.readouterr().err  # absent weights: a note, not a failure
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "mine") == weights_before
    result = json.loads((tmp_path / "mine" / "ood.json").read_text())
    names = ["noise", "blank", "constant", "inverted", "hflip", "vflip", "corrupted", "natural", "mine"]
    assert list(result["sets"]) == names and result["sets"]["mine"]["size"] == 20
    assert not result["sets"]["mine"]["built_in"]
    arm_rows = {r["score"]: r for r in result["rows"] if r["model"] == "ARM"}
    assert set(arm_rows) == {"NLL", "typicality", "ratio (pixel Markov)", "ratio (mirror)", "combined"}
    for row in result["rows"]:
        assert list(row["auroc"]) == names and list(row["fpr95"]) == names
        assert all(0 <= v <= 1 for v in (*row["auroc"].values(), *row["fpr95"].values()))
    # even an ARM trained for 2 epochs tells uniform noise from digits
    assert arm_rows["NLL"]["auroc"]["noise"] > 0.95
    recommended = result["recommended"]
    best = max(np.mean([r["auroc"][s] for s in names[:-1]]) for r in result["rows"])
    assert recommended["mean_auroc"] == pytest.approx(best)
    assert {"EBM", "ScM"} <= set(result["skipped"])
    assert "| ARM | combined |" in (tmp_path / "mine" / "ood.md").read_text().replace("**", "")
    from PIL import Image

    with Image.open(tmp_path / "mine" / "ood.png") as image:
        assert image.size[0] > 400 and image.size[1] > 400


def test_the_picture_names_every_score_and_set_and_shows_each_set_legibly(tmp_path, sets, digits):
    import matplotlib.pyplot as plt
    import matplotlib.text
    from PIL import Image

    names = list(sets)
    rng = np.random.default_rng(0)
    scores = {"test": rng.normal(size=50), **{s: rng.normal(2, size=30) for s in names}}
    rows = [dict(model=m, score=k, auroc={s: rng.random() for s in names}) for m in ("ARM", "VAE")
            for k in ("NLL", "typicality", "combined")]
    examples = {"test digits": (digits[0]["test"][0], "in distribution"),
                **{s: (v[0], ood.SET_DESCRIPTIONS[s]) for s, v in sets.items()}}
    panels = [("ARM combined (recommended)", scores), ("ARM NLL", scores)]
    fig = ood.ood_figure(panels, names, rows, examples, ("ARM", "combined"))
    texts = [t for t in fig.findobj(matplotlib.text.Text) if t.get_text()]
    labels = {t.get_text() for t in texts}
    assert {f"{r['model']}: {r['score']}" for r in rows} <= labels  # every row of the heatmap named
    assert {*names, "test digits"} <= labels and {f"{r['auroc']['blank']:.2f}" for r in rows} <= labels
    assert {"ROC: ARM NLL", "histogram: ARM NLL"} <= labels
    assert len([a for a in fig.axes if a.images and a.images[0].get_array().shape == (8, 8)]) == len(names) + 1
    assert min(t.get_fontsize() for t in texts) >= 9
    plt.close(fig)
    ood.picture(tmp_path / "ood.png", panels, names, rows, examples)
    with Image.open(tmp_path / "ood.png") as image:
        assert 1200 <= image.width <= 2000 and 800 <= image.height <= 1500
