"""Class-conditional models, what common.py and leaderboard.py do for every family: the generative
classifier against the Bayes rule, the classes a conditional run draws, the measures of its
samples, the refusal of a checkpoint of the other kind, and the flags that pick the classes."""

import json
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import common
import leaderboard
from conftest import run_main
from plumbing import checkpoints, quality, registry, results, runs
import plumbing


@dataclass(frozen=True)
class ToyConfig(common.ModelConfig):
    pass


class TwoGaussians(common.DigitsModel):
    """p(x | y) = N(x; mu_y, s^2 I) for the classes 0 and 1 (every other class: mean 100, far
    away), in 64 dimensions; noise: a stochastic estimate of -log p(x | y), as an upper bound of
    a family's with its own noise, to check that every class sees the same draws."""

    name, nll_kind = "Toy", "exact"
    Config = ToyConfig

    def __init__(self, means, scale, noise=0.0):
        super().__init__(ToyConfig(conditional=True))
        self.means, self.scale, self.noise = means, scale, noise

    def test_nll(self, x, y=None):
        d = (x - self.means[y]) / self.scale
        exact = 0.5 * (d**2).sum(1) + x.shape[1] * math.log(self.scale * math.sqrt(2 * math.pi))
        return exact + self.noise * torch.randn(len(x)).abs()  # one draw per image, the same for each class


def test_the_generative_classifier_is_the_bayes_rule_on_two_gaussians():
    torch.manual_seed(0)
    means = torch.full((10, 64), 100.0)
    means[0], means[1] = 0.0, 0.25
    model = TwoGaussians(means, scale=1.0)
    train_labels = torch.tensor([0] * 300 + [1] * 100)  # p(y = 0) = 0.75
    x = torch.cat([means[0] + torch.randn(500, 64), means[1] + torch.randn(500, 64)])
    predicted = quality.generative_classifier(model, x, train_labels)
    # Bayes: class 1 when log N(x; mu_1) + log 1/4 > log N(x; mu_0) + log 3/4, i.e. along mu_1 - mu_0
    # (every coordinate 0.25): 0.25 sum(x) - 64 * 0.25^2 / 2 > log 3
    bayes = (0.25 * x.sum(1) - 64 * 0.25**2 / 2 > math.log(3)).long()
    assert torch.equal(predicted, bayes)
    assert 0 < int(predicted.sum()) < 1000  # both classes predicted: the test can fail either way


def test_every_class_likelihood_is_drawn_with_the_same_noise():
    torch.manual_seed(0)
    means = torch.zeros(10, 64)
    means[1] = 0.01  # nearly the same class: noise alone would decide if it differed between classes
    model = TwoGaussians(means, scale=1.0, noise=50.0)
    x = torch.randn(64, 64)
    scores = model.class_log_likelihoods(x)
    exact = TwoGaussians(means, scale=1.0).class_log_likelihoods(x)
    assert scores.shape == (64, 10)
    assert torch.allclose(scores - scores[:, :1], exact - exact[:, :1], atol=1e-4)  # the noise cancels
    assert not torch.allclose(scores, exact)


def test_a_model_without_likelihood_is_no_classifier():
    class NoLikelihood(TwoGaussians):
        nll_kind = None

        def test_nll(self, x, y=None):
            raise NotImplementedError

    model = NoLikelihood(torch.zeros(10, 64), 1.0)
    assert quality.generative_classifier(model, torch.zeros(3, 64), torch.tensor([0, 1])) is None


def test_sample_labels_cycle_through_the_asked_digits():
    model = TwoGaussians(torch.zeros(10, 64), 1.0)
    assert common.sample_labels(model, 12, torch.device("cpu")).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert common.sample_labels(model, 5, torch.device("cpu"), (3, 7)).tolist() == [3, 7, 3, 7, 3]
    model.config = ToyConfig(conditional=False)
    assert common.sample_labels(model, 5, torch.device("cpu")) is None


def test_draw_samples_hands_each_chunk_its_labels():
    model = TwoGaussians(torch.zeros(10, 64), 1.0)
    model.sample = lambda n, y: y[:, None].float().expand(n, 64)  # the class as every pixel
    labels = torch.arange(2500) % 7
    samples = common.draw_samples(model, 2500, 0, torch.device("cpu"), batch_size=1000, labels=labels)
    assert samples.shape == (2500, 64) and torch.equal(samples[:, 0], labels.float())


def test_conditional_quality_of_real_digits_and_of_wrong_labels(tmp_path):
    pixels, classes = common.load_digits_arrays()
    val, val_classes = common.split_arrays(pixels)["val"], common.split_arrays(classes)["val"]
    right = quality.conditional_quality(val, val_classes, "results")
    wrong = quality.conditional_quality(val, (val_classes + 1) % 10, "results")
    classifier, _ = quality.digit_classifier("results")
    with torch.no_grad():
        accuracy = (classifier(torch.from_numpy(val)).argmax(1).numpy() == val_classes).mean()
    assert right["class_accuracy"] == pytest.approx(accuracy) and right["class_accuracy"] > 0.9
    assert wrong["class_accuracy"] < 0.1
    assert set(right["frechet_by_class"]) == set(range(10))
    assert right["frechet_mean_over_classes"] < wrong["frechet_mean_over_classes"]
    assert right["frechet_worst"] == max(right["frechet_by_class"].values())


def test_conditional_quality_over_draws_is_the_mean_of_each_draws(tmp_path):
    pixels, classes = common.load_digits_arrays()
    val, val_classes = common.split_arrays(pixels)["val"], common.split_arrays(classes)["val"]
    noisy = np.clip(val + np.random.default_rng(0).integers(0, 3, val.shape), 0, 16).astype(np.float32)
    one, other = (quality.conditional_quality(x, val_classes, tmp_path) for x in (val, noisy))
    both = quality.averaged_conditional_quality([val, noisy], val_classes, tmp_path)
    for key in ("class_accuracy", "frechet_mean_over_classes", "frechet_distance"):
        assert both[key] == pytest.approx((one[key] + other[key]) / 2), key
        assert both[f"{key}_seed_std"] == pytest.approx(abs(one[key] - other[key]) / math.sqrt(2)), key
    means = {c: (one["frechet_by_class"][c] + other["frechet_by_class"][c]) / 2 for c in range(10)}
    assert both["frechet_by_class"] == pytest.approx(means) and both["frechet_worst"] == max(means.values())
    assert both["frechet_worst_class"] == max(means, key=means.get) and both["quality_draws"] == 2
    assert both["first_draw"]["class_accuracy"] == one["class_accuracy"]
    same = quality.averaged_conditional_quality([val, val], val_classes, tmp_path)
    assert same["class_accuracy"] == one["class_accuracy"] and same["class_accuracy_seed_std"] == 0.0


@pytest.mark.parametrize("text, ok", [("3,7", (3, 7)), ("0", (0,)), ("9, 1", (9, 1)), ("3,3", None),
                                      ("10", None), ("3,x", None), ("", None), ("-1", None)])
def test_digits_flag(text, ok):
    import argparse

    if ok is None:
        with pytest.raises(argparse.ArgumentTypeError, match="distinct digits 0-9"):
            runs.digit_list(text)
    else:
        assert runs.digit_list(text) == ok


def test_digits_without_conditional_and_too_few_samples_are_refused(tmp_path, capsys):
    import autoregressive_model

    code = run_main(autoregressive_model.main, ["--quick", "--out", str(tmp_path), "--digits", "3,7"])
    assert code == 2 and "add --conditional" in capsys.readouterr().err
    code = run_main(autoregressive_model.main, ["--quick", "--out", str(tmp_path), "--conditional",
                                                "--num-samples", "3"])
    err = capsys.readouterr().err
    assert code == 2 and "fewer than the 10 classes" in err and len(err.strip().splitlines()) == 1
    code = run_main(autoregressive_model.main, ["--quick", "--out", str(tmp_path), "--conditional", "--digits", "3,11"])
    assert code == 2 and "distinct digits 0-9" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def _weights(path, conditional):
    state = common.TrainState(epoch=1, best_epoch=1, best_val=1.0, best_weights={"w": torch.zeros(1)},
                              history=dict(train=[1.0], val=[1.0]))
    checkpoints.save_weights(path, "Toy", dict(conditional=conditional), state)


def test_a_checkpoint_of_the_other_kind_is_refused_in_one_line(tmp_path):
    _weights(tmp_path / "Toy.pt", conditional=False)
    _weights(tmp_path / "Toy_conditional.pt", conditional=True)
    with pytest.raises(plumbing.UsageError, match=r"holds a model of p\(x\) \(trained without --conditional\)"):
        checkpoints.load_checkpoint(tmp_path / "Toy.pt", "Toy", dict(conditional=True), "weights", "")
    with pytest.raises(plumbing.UsageError, match=r"holds a model of p\(x \| y\).*load it with --conditional"):
        checkpoints.load_checkpoint(tmp_path / "Toy_conditional.pt", "Toy", dict(conditional=False), "weights", "")
    with pytest.raises(plumbing.UsageError, match="load it with --conditional"):
        checkpoints.load_checkpoint(tmp_path / "Toy_conditional.pt", "Toy", None, "weights", "", conditional=False)
    assert checkpoints.load_checkpoint(tmp_path / "Toy.pt", "Toy", dict(conditional=False), "weights", "")
    older = tmp_path / "older.pt"  # weights made before conditional models: a model of p(x)
    checkpoints.save_weights(older, "Toy", {}, common.TrainState(best_weights={"w": torch.zeros(1)}))
    assert checkpoints.load_checkpoint(older, "Toy", dict(conditional=False), "weights", "")


def test_sample_only_of_a_conditional_run_refuses_unconditional_weights(tmp_path, capsys):
    import autoregressive_model

    tiny = ["--quick", "--out", str(tmp_path), "--channels", "8", "--layers", "2", "--members", "1"]
    assert run_main(autoregressive_model.main, tiny) == 0
    (tmp_path / "ARM.pt").rename(tmp_path / "ARM_conditional.pt")  # a p(x) file under the conditional name
    capsys.readouterr()
    code = run_main(autoregressive_model.main, tiny + ["--conditional", "--sample-only"])
    err = capsys.readouterr().err
    assert code == 2 and "holds a model of p(x)" in err and len(err.strip().splitlines()) == 1


def test_the_grid_of_a_few_classes_has_100_cells_and_row_labels(tmp_path, capsys):
    """--digits 7 draws a 10 x 10 grid of sevens (not a strip of 10), two classes 5 rows each; a
    white margin left of the grid carries each row's class; the summary explains the Frechet
    distance to all ten classes."""
    from PIL import Image

    import autoregressive_model

    tiny = ["--quick", "--out", str(tmp_path), "--channels", "8", "--layers", "2", "--members", "1", "--conditional"]
    assert run_main(autoregressive_model.main, tiny) == 0
    sizes = {}
    for digits, count in (("7", 100), ("3,7", 100), ("0,1,2,3,4,5,6,7,8,9", 100)):
        capsys.readouterr()
        assert run_main(autoregressive_model.main, tiny + ["--sample-only", "--digits", digits,
                                                           "--num-samples", str(count)]) == 0
        err = capsys.readouterr().err
        assert ("can't match" in err) == (digits != "0,1,2,3,4,5,6,7,8,9")
        with Image.open(tmp_path / "ARM_conditional_samples.png") as image:
            grid = np.asarray(image.convert("L"))
        sizes[digits] = grid.shape
        assert (grid[:, :16] == 255).mean() > 0.8 and (grid[:, :16] < 128).any()  # a white margin with labels
    cell = 4 * 9  # 8 pixels and a 1-pixel border, upscaled 4 times
    assert sizes["7"] == sizes["3,7"] == sizes["0,1,2,3,4,5,6,7,8,9"] == (10 * cell + 4, 16 + 10 * cell + 4)
    # the conditional measures are means over draws; the written samples are the first draw
    metrics = json.loads((tmp_path / "ARM_conditional_metrics.json").read_text())
    with np.load(tmp_path / "ARM_conditional_samples.npz") as written:
        first = quality.conditional_quality(written["x"], written["y"], tmp_path)
    assert metrics["quality_draws"] == quality.QUALITY_DRAWS and metrics["class_accuracy_seed_std"] is not None
    assert {k: metrics["first_draw"][k] for k in ("class_accuracy", "frechet_mean_over_classes", "copy_rate")} == {
        k: first[k] for k in ("class_accuracy", "frechet_mean_over_classes", "copy_rate")}


def test_run_settings_and_stems_of_conditional_runs():
    assert results._settings(("--seed", "1", "--conditional")) == {"seed": "1", "conditional": "True"}
    assert results._settings(("--conditional", "--seed", "2")) == {"conditional": "True", "seed": "2"}
    assert registry.stem("ARM", True) == "ARM_conditional" and registry.stem("ARM", False) == "ARM"
    metrics = dict(**checkpoints.fingerprints(registry.ROOT / "ddpm.py", registry.ROOT), quick=False, interrupted=False,
                   stopped="max_epochs", changed_settings=dict(conditional=True))
    assert results.is_current(metrics, "ddpm.py", ("--conditional",))
    assert not results.is_current(metrics, "ddpm.py")


def test_labelled_samples_are_checked(tmp_path):
    good = tmp_path / "good.npz"
    np.savez(good, x=np.full((20, 64), 3, np.float32), y=np.arange(20) % 10)
    (x, y), problem = results.read_labelled_samples(good)
    assert problem is None and x.shape == (20, 64) and y.dtype == np.int64
    for name, arrays, message in [
            ("nolabels.npz", dict(x=np.zeros((4, 64), np.float32)), "not x and y"),
            ("shape.npz", dict(x=np.zeros((4, 63), np.float32), y=np.zeros(4, np.int64)), "expected (N, 64)"),
            ("range.npz", dict(x=np.full((4, 64), 17, np.float32), y=np.zeros(4, np.int64)), "not pixels"),
            ("class.npz", dict(x=np.zeros((4, 64), np.float32), y=np.full(4, 12)), "classes 0..9")]:
        np.savez(tmp_path / name, **arrays)
        found, problem = results.read_labelled_samples(tmp_path / name)
        assert found is None and message in problem
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    assert "unreadable" in results.read_labelled_samples(tmp_path / "junk.npz")[1]


def test_the_per_class_gaussian_mixture_is_a_conditional_model():
    pixels, classes = common.load_digits_arrays()
    splits = common.split_arrays(pixels.astype(np.float64))
    labels = common.split_arrays(classes)
    nll, predicted, draws, y, _, _ = leaderboard.conditional_gaussian_mixture(splits, labels, 20, 0, ks=(1,), regs=(0.1,))
    x = draws[0]
    assert len(draws) == quality.QUALITY_DRAWS and not np.array_equal(x, draws[1]) and x.shape == (200, 64) and y.tolist() == sorted(y.tolist()) and np.bincount(y).tolist() == [20] * 10
    assert 0 <= x.min() and x.max() <= 16 and nll < 181.3
    assert (predicted == labels["test"]).mean() > 0.85  # a Gaussian per class is a decent classifier


def test_conditional_table_reports_the_families_below_the_target():
    row = dict(model="ARM", current=True, class_accuracy=0.9, frechet_mean_over_classes=30.0, frechet_worst=50.0,
               frechet_worst_class=8, frechet_distance=10.0, copy_rate=0.0, test_nll_nats=70.0, nll_kind="exact",
               generative_classifier_accuracy=0.95, train_seconds=60.0, sample_seconds=1.0)
    table = leaderboard.conditional_markdown([row], 0.919)
    assert "| ARM | 0.900 | 30.00 | 50.00 (8) |" in table and "Class accuracy below 0.95: ARM." in table
    assert "at least 0.95" in leaderboard.conditional_markdown([dict(row, class_accuracy=0.97)], 0.919)
    json.dumps(row)


def test_conditional_table_shows_spreads_and_judges_against_the_mixture_with_them():
    row = dict(model="ARM", current=True, class_accuracy=0.97, class_accuracy_seed_std=0.004,
               frechet_mean_over_classes=30.0, frechet_mean_over_classes_seed_std=1.0, frechet_worst=50.0,
               frechet_worst_class=8, frechet_distance=10.0, frechet_distance_seed_std=0.5, copy_rate=0.0,
               test_nll_nats=70.0, nll_kind="exact", generative_classifier_accuracy=0.95, train_seconds=60.0,
               sample_seconds=1.0, quality_draws=5)
    gmm = dict(row, model="GaussianMixture per class", class_accuracy=0.96, frechet_mean_over_classes=33.0,
               test_nll_nats=120.0)
    table = leaderboard.conditional_markdown([row, gmm], 0.919)
    assert "| ARM | 0.970 +- 0.004 | 30.00 +- 1.00 | 50.00 (8) | 10.00 +- 0.50 |" in table
    # class accuracy: gap 0.01 against 2 sqrt(2 * 0.004^2 / 5) = 0.0036; per-class Frechet: 3 against 1.26
    assert "- ARM: better on NLL, class accuracy, per-class Frechet; within noise on Frechet (MLP)" in table
    wide = leaderboard.conditional_markdown([dict(row, class_accuracy_seed_std=0.02), gmm], 0.919)
    assert "within noise on Frechet (MLP), class accuracy" in wide
