"""The sample-quality measures that do not hinge on one network's features (quality.sample_quality):
precision, recall, density and coverage against oracles, the classifier two-sample test, the
bootstrap noise of a distance, and the second (convolutional) feature space; the measures averaged
over several draws of samples (their mean and spread across sample seeds), as a run records them."""

import math

import numpy as np
import pytest
import torch

import common
from plumbing import quality


@pytest.fixture(scope="module")
def splits():
    pixels, _ = common.load_digits_arrays()
    return common.split_arrays(pixels)


def test_precision_recall_density_coverage_against_oracles():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(200, 4))
    same = quality.precision_recall_density_coverage(real, real, k=3)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    assert same["density"] > 1.0  # about 1 for one distribution; each point also lies in its own ball
    far = quality.precision_recall_density_coverage(real, real + 100.0, k=3)
    assert far == dict(precision=0.0, recall=0.0, density=0.0, coverage=0.0)
    # samples collapsed on one real point: precise, but neither diverse nor covering
    collapsed = quality.precision_recall_density_coverage(real, np.repeat(real[:1], 50, 0), k=3)
    assert collapsed["precision"] == 1.0 and collapsed["coverage"] <= 4 / 200 and collapsed["recall"] <= 4 / 200


def test_two_sample_test_cannot_tell_a_set_from_itself_and_tells_noise_at_once(splits):
    # shuffled: the digits are stored writer by writer, and two writers' halves can be told apart
    train = splits["train"][np.random.default_rng(0).permutation(1000)]
    accuracy, stderr = quality.classifier_two_sample_test(train[:500], train[500:])
    assert abs(accuracy - 0.5) < 3 * 0.03 and 0 < stderr < 0.05
    noise = np.random.default_rng(0).integers(0, 17, (500, 64)).astype(np.float32)
    assert quality.classifier_two_sample_test(noise, train[:500])[0] > 0.95
    assert quality.classifier_two_sample_test(noise, train[:500]) == quality.classifier_two_sample_test(noise, train[:500])


def test_bootstrap_noise_is_seeded_and_zero_for_a_constant_statistic():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 3)), rng.normal(size=(200, 3))
    assert quality.bootstrap_std(lambda x, y: 1.0, a, b) == 0.0
    mean_gap = lambda x, y: float(np.abs(x.mean(0) - y.mean(0)).sum())  # noqa: E731
    assert quality.bootstrap_std(mean_gap, a, b) == quality.bootstrap_std(mean_gap, a, b) > 0


def test_the_second_feature_space_is_a_shipped_convolutional_classifier(tmp_path):
    model, accuracy = quality.digit_classifier(tmp_path, "cnn")
    assert isinstance(model, quality.DigitCNN) and accuracy > 0.9
    assert quality.SHIPPED_CLASSIFIER.with_name("_digit_cnn.pt").is_file()
    assert not (tmp_path / "_digit_cnn.pt").exists()  # loaded from results/, not retrained
    with torch.no_grad():
        assert model.features(torch.zeros(3, 64)).shape == (3, 64)


def test_extended_quality_of_real_digits_beats_noise_on_every_measure(splits, tmp_path):
    real = quality.sample_quality(splits["train"], tmp_path)
    noise = quality.sample_quality(np.random.default_rng(0).integers(0, 17, (1000, 64)), tmp_path)
    for key in ("frechet_distance", "frechet_distance_cnn", "c2st_accuracy"):
        assert real[key] < noise[key], key
    for key in ("precision", "recall", "density", "coverage"):
        assert real[key] > noise[key], key
    assert real["frechet_distance_std"] > 0 and real["c2st_stderr"] > 0
    assert quality.sample_quality(splits["train"][:5], tmp_path)["c2st_accuracy"] is None  # too few to split


def test_mean_and_spread_of_known_values():
    assert quality.mean_std([1.0, 2.0, 3.0, 4.0]) == (2.5, pytest.approx(math.sqrt(5 / 3)))  # s.d. with n - 1
    assert quality.mean_std([3.0]) == (3.0, None)  # one draw: no spread, not a zero one
    assert quality.mean_std([1.0, None]) == (None, None)
    merged = quality.over_draws([dict(a=1.0, b=5.0, c="first"), dict(a=3.0, b=None, c="second")], ("a", "b", "z"))
    assert merged == dict(a=2.0, a_seed_std=pytest.approx(math.sqrt(2)), b=None, b_seed_std=None, c="first",
                          quality_draws=2, first_draw=dict(a=1.0, b=5.0))
    assert quality.draw_seeds(4, 3) == [4, 1004, 2004] and len(quality.draw_seeds(0)) == quality.QUALITY_DRAWS


def test_identical_draws_average_to_the_single_draw_with_zero_spread(splits, tmp_path):
    x = splits["val"][:100]
    single = quality.sample_quality(x, tmp_path)
    averaged = quality.averaged_quality([x, x, x], tmp_path)
    assert averaged["quality_draws"] == 3
    for key in quality.AVERAGED:
        assert averaged[key] == pytest.approx(single[key], rel=1e-12), key
        assert averaged[f"{key}_seed_std"] == pytest.approx(0.0, abs=1e-9), key  # zero but for rounding
        assert averaged["first_draw"][key] == single[key]
    for key in ("frechet_distance_std", "c2st_accuracy", "c2st_stderr"):  # the slow ones: the first draw's
        assert averaged[key] == single[key], key


def test_the_mean_is_over_draws_and_the_slow_measures_are_the_first_draws(splits, tmp_path):
    a, b = splits["val"][:100], splits["train"][:100]
    one, other = quality.sample_quality(a, tmp_path), quality.sample_quality(b, tmp_path, slow=False)
    assert "c2st_accuracy" not in other and "frechet_distance_std" not in other  # slow=False skips them
    both = quality.averaged_quality([a, b], tmp_path)
    for key in ("frechet_distance", "frechet_distance_cnn", "precision", "copy_rate"):
        assert both[key] == pytest.approx((one[key] + other[key]) / 2), key
        assert both[f"{key}_seed_std"] == pytest.approx(abs(one[key] - other[key]) / math.sqrt(2)), key
    assert other["copy_rate"] == 1.0  # the train digits are copies of themselves: a known value in the mean
    assert both["c2st_accuracy"] == one["c2st_accuracy"] and both["first_draw"]["frechet_distance"] == one["frechet_distance"]


def test_the_validation_scorer_averages_seeded_draws_against_val(splits, tmp_path):
    """quality_over_seeds: draws of a model from draw_seeds, scored against the val split."""
    digits = torch.from_numpy(splits["train"])

    class Resampler(torch.nn.Module):  # samples: training digits picked at random by the torch seed
        conditional = False

        def sample(self, n):
            return digits[torch.randint(0, len(digits), (n,))]

    model, cpu = Resampler(), torch.device("cpu")
    scores = quality.quality_over_seeds(model, 7, cpu, tmp_path, draws=2, num_samples=100)
    draws = [common.draw_samples(model, 100, seed, cpu).numpy() for seed in (7, 1007)]
    assert not np.array_equal(*draws) and scores["quality_draws"] == 2
    to_val = [quality.frechet_to(x, splits["val"], tmp_path) for x in draws]
    assert scores["frechet_distance"] == pytest.approx(np.mean(to_val))
    assert scores["frechet_distance_seed_std"] == pytest.approx(np.std(to_val, ddof=1))


def test_a_run_scores_several_draws_and_writes_the_first(tmp_path):
    """A tiny --quick run: the quality is the mean over QUALITY_DRAWS draws, the written samples
    are the first draw (seed + 4, as before) and its own numbers stay under first_draw."""
    import json

    import autoregressive_model
    from conftest import run_main

    tiny = ["--quick", "--out", str(tmp_path), "--channels", "8", "--layers", "2", "--members", "1", "--no-progress"]
    assert run_main(autoregressive_model.main, tiny) == 0
    metrics = json.loads((tmp_path / "ARM_metrics.json").read_text())
    samples = np.load(tmp_path / "ARM_samples.npy")
    first = quality.sample_quality(samples, tmp_path)
    assert metrics["quality_draws"] == quality.QUALITY_DRAWS and len(samples) == metrics["num_samples"]
    assert metrics["first_draw"] == {k: first[k] for k in quality.AVERAGED}
    assert metrics["c2st_accuracy"] == first["c2st_accuracy"]
    assert metrics["frechet_distance_seed_std"] > 0 and metrics["frechet_distance"] != first["frechet_distance"]
    assert metrics["quality_draws_seconds"] > 0 and metrics["quality_seconds"] > 0
