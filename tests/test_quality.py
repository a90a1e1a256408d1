"""The sample-quality measures that do not hinge on one network's features (quality.sample_quality):
precision, recall, density and coverage against oracles, the classifier two-sample test, the
bootstrap noise of a distance, and the second (convolutional) feature space."""

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
