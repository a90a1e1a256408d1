"""Sample quality: the same numbers for every family and baseline, likelihood or not."""

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from common import (
    NUM_CLASSES, NUM_PIXELS, PIXEL_MAX, batched, draw_samples, load_digits_arrays, optimizer_step, sample_labels,
    seeded, split_arrays)
from plumbing.checkpoints import save_checkpoint
from plumbing.registry import ROOT


class DigitClassifier(nn.Module):
    """A small MLP on pixels / 16; its penultimate layer gives the features of the Frechet distance."""

    def __init__(self, hidden=256, features=32):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(NUM_PIXELS, hidden), nn.ReLU(), nn.Linear(hidden, features))
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.2), nn.Linear(features, 10))

    def features(self, x):  # (N, 64) pixels 0..16 -> (N, 32), before the ReLU: no dead dimensions
        return self.body(x / PIXEL_MAX)

    def forward(self, x):
        return self.head(self.features(x))


class DigitCNN(nn.Module):
    """A second, independent feature space: a small convolutional classifier (two 3x3 layers, a
    2x2 pooling), another architecture and seed than DigitClassifier, so that a verdict on sample
    quality does not hinge on one network's features."""

    def __init__(self, features=64):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, features))
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.2), nn.Linear(features, 10))

    def features(self, x):  # (N, 64) pixels 0..16 -> (N, 64)
        return self.body((x / PIXEL_MAX).view(-1, 1, 8, 8))

    def forward(self, x):
        return self.head(self.features(x))


# kind -> class, file name, version (bump when the class or its training changes), seed, lr, steps
CLASSIFIERS = dict(mlp=(DigitClassifier, "_digit_classifier.pt", 2, 0, 1e-2, 200),
                   cnn=(DigitCNN, "_digit_cnn.pt", 1, 1, 3e-3, 300))


SHIPPED_CLASSIFIER = ROOT / "results" / "_digit_classifier.pt"


def digit_classifier(cache_dir, kind="mlp"):
    """The digit classifier `kind` ("mlp": DigitClassifier, whose features every Frechet distance
    uses; "cnn": DigitCNN, the second feature space), trained on the train split only (fixed seed,
    CPU, full batch). Returns (model, test accuracy). The weights ship in results/ (the mlp's as
    SHIPPED_CLASSIFIER, the cnn's beside it), so the same samples get the same numbers on every
    machine; when a file is missing or damaged (unreadable, another version, non-finite), the
    classifier is trained and cached in cache_dir (loaded with weights_only=True)."""
    cls, filename, version, seed, lr, steps = CLASSIFIERS[kind]
    for path in (SHIPPED_CLASSIFIER.with_name(filename), Path(cache_dir) / filename):
        model = cls()
        if path.is_file():
            try:
                cached = torch.load(path, map_location="cpu", weights_only=True)
                if (cached.get("version") == version and math.isfinite(cached["test_accuracy"])
                        and all(torch.isfinite(v).all() for v in cached["model"].values())):
                    model.load_state_dict(cached["model"])
                    return model.eval(), cached["test_accuracy"]
            except Exception:  # a damaged file is retrained, never trusted
                pass
    pixels, labels = load_digits_arrays()
    x, y = (split_arrays(torch.from_numpy(a)) for a in (pixels, labels))
    with seeded(seed, torch.device("cpu")):
        model = cls()
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
        for _ in range(steps):
            optimizer_step(nn.functional.cross_entropy(model(x["train"]), y["train"]), optimizer)
    model.eval()
    with torch.no_grad():
        accuracy = (model(x["test"]).argmax(1) == y["test"]).float().mean().item()
    save_checkpoint(path, dict(version=version, model=model.state_dict(), test_accuracy=accuracy))
    return model, accuracy


def frechet_distance(features_a, features_b):
    """||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a C_b)^(1/2)) between Gaussian fits (float64)."""
    from scipy import linalg

    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b)
    root = root.real if np.iscomplexobj(root) else root
    return float(max(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root), 0.0))


def frechet_to(samples, reference, cache_dir):
    """Frechet distance between (N, 64) pixel sets in the digit classifier's features."""
    classifier, _ = digit_classifier(cache_dir)
    samples = torch.as_tensor(np.asarray(samples, np.float32)).clamp(0, PIXEL_MAX)
    reference = torch.as_tensor(np.asarray(reference, np.float32))
    with torch.no_grad():
        return frechet_distance(classifier.features(samples), classifier.features(reference))


def _nearest_distance(x, reference):
    return torch.cdist(x.double(), reference.double()).min(1).values  # (N,) L2 in pixels


def bootstrap_std(statistic, samples, reference, draws=20, seed=0):
    """Standard deviation of statistic(samples, reference) over `draws` bootstrap resamples of the
    samples (rows drawn with replacement), the reference held fixed: the noise that another draw
    of samples would bring, against the reference that every model shares."""
    rng = np.random.default_rng(seed)
    values = [statistic(samples[rng.integers(0, len(samples), len(samples))], reference) for _ in range(draws)]
    return float(np.std(values, ddof=1))


def precision_recall_density_coverage(real, fake, k=5):
    """Fidelity and diversity read apart, from k-nearest-neighbour balls in a feature space:
    precision (the fraction of samples inside some real digit's ball) and recall (of real digits
    inside some sample's ball), Kynkaanniemi et al. 2019; density (mean count of real balls around
    a sample, / k) and coverage (the fraction of real digits whose ball holds a sample), Naeem et
    al. 2020. real (R, F), fake (N, F) arrays."""
    real, fake = torch.as_tensor(real, dtype=torch.float64), torch.as_tensor(fake, dtype=torch.float64)

    def radii(points):  # distance to the k-th nearest other point
        return torch.cdist(points, points).kthvalue(k + 1, dim=1).values

    real_radii, fake_radii = radii(real), radii(fake)
    distance = torch.cdist(real, fake)  # (R, N)
    inside_real = distance <= real_radii[:, None]  # sample j in real i's ball
    return dict(precision=inside_real.any(0).double().mean().item(),
                recall=(distance <= fake_radii[None, :]).any(1).double().mean().item(),
                density=inside_real.sum(0).double().mean().item() / k,
                coverage=(distance.min(1).values <= real_radii).double().mean().item())


def classifier_two_sample_test(samples, real, seed=0, hidden=128, steps=300):
    """C2ST (Lopez-Paz & Oquab 2017): an MLP on pixels / 16 trained (full batch, Adam, seeded) to
    tell samples from real digits on one half of each (as many samples as real digits), its
    accuracy on the other half (0.5: the two cannot be told apart) and the accuracy's standard
    error. samples (N, 64), real (R, 64) pixel arrays."""
    rng = np.random.default_rng(seed)
    n = min(len(samples), len(real))
    x = np.concatenate([samples[rng.permutation(len(samples))[:n]], real[rng.permutation(len(real))[:n]]])
    x = torch.as_tensor(x / PIXEL_MAX, dtype=torch.float32)
    labels = torch.cat([torch.zeros(n), torch.ones(n)]).long()
    order = torch.as_tensor(rng.permutation(2 * n))
    fit, held = order[:n], order[n:]
    with seeded(seed, torch.device("cpu")), torch.enable_grad():
        classifier = nn.Sequential(nn.Linear(NUM_PIXELS, hidden), nn.ReLU(), nn.Linear(hidden, 2))
        optimizer = torch.optim.Adam(classifier.parameters(), lr=3e-3, weight_decay=1e-3)
        for _ in range(steps):
            optimizer_step(F.cross_entropy(classifier(x[fit]), labels[fit]), optimizer)
    with torch.no_grad():
        accuracy = (classifier(x[held]).argmax(1) == labels[held]).double().mean().item()
    return accuracy, math.sqrt(accuracy * (1 - accuracy) / len(held))


def sample_quality(samples, cache_dir, extended=True, split="test", slow=True):
    """Sample quality against the test split (or split "val", for choosing settings), the same
    for every family and baseline.

    Always: the Frechet distance in the digit classifier's features, the classifier's confidence,
    class coverage (entropy of predicted classes, nats; log 10 = uniform) and copy rate (the
    fraction of samples closer to a training image than 99% of test images are). extended adds
    measures that do not hinge on one network's features: the Frechet distance in a second,
    convolutional classifier's features; precision, recall, density and coverage (k = 5) in the
    first classifier's features; and unless slow=False (averaged_quality's later draws) the slow
    ones, each Frechet distance's bootstrap standard deviation and a classifier two-sample test
    on the pixels (accuracy and standard error)."""
    pixels, _ = load_digits_arrays()
    splits = {k: torch.from_numpy(v) for k, v in split_arrays(pixels).items()}
    samples = torch.as_tensor(np.asarray(samples, np.float32)).clamp(0, PIXEL_MAX)
    classifier, accuracy = digit_classifier(cache_dir)
    enough = len(samples) >= 2  # a covariance needs two samples at least: with fewer, None
    with torch.no_grad():
        probs = classifier(samples).softmax(1)
        features, reference = classifier.features(samples).numpy(), classifier.features(splits[split]).numpy()
    distance = frechet_distance(features, reference) if enough else None
    histogram = torch.bincount(probs.argmax(1), minlength=10).double() / len(samples)
    coverage = -(histogram[histogram > 0] * histogram[histogram > 0].log()).sum().item()
    threshold = torch.quantile(_nearest_distance(splits["test"], splits["train"]), 0.01)
    copy_rate = (_nearest_distance(samples, splits["train"]) < threshold).double().mean().item()
    quality = dict(frechet_distance=distance, classifier_confidence=probs.max(1).values.mean().item(),
                   class_coverage=coverage, copy_rate=copy_rate, classifier_test_accuracy=accuracy)
    if not extended:
        return quality
    quality.update(frechet_distance_cnn=None, precision=None, recall=None, density=None, coverage=None)
    if slow:
        quality.update(frechet_distance_std=None, frechet_distance_cnn_std=None, c2st_accuracy=None, c2st_stderr=None)
    if len(samples) > 10:  # k-nearest-neighbour balls and a two-sample split need a few samples
        cnn, cnn_accuracy = digit_classifier(cache_dir, "cnn")
        with torch.no_grad():
            cnn_features, cnn_reference = cnn.features(samples).numpy(), cnn.features(splits[split]).numpy()
        quality.update(frechet_distance_cnn=frechet_distance(cnn_features, cnn_reference),
                       cnn_test_accuracy=cnn_accuracy, **precision_recall_density_coverage(reference, features))
        if slow:
            c2st, c2st_stderr = classifier_two_sample_test(samples.numpy(), splits[split].numpy())
            quality.update(frechet_distance_std=bootstrap_std(frechet_distance, features, reference),
                           frechet_distance_cnn_std=bootstrap_std(frechet_distance, cnn_features, cnn_reference),
                           c2st_accuracy=c2st, c2st_stderr=c2st_stderr)
    return quality


def conditional_quality(samples, labels, cache_dir, split="test"):
    """How well a conditional model draws the digit asked for, against the test split (or
    split "val", for choosing settings): class
    accuracy (the fraction of samples the digit classifier assigns to the class asked for) and,
    for each class drawn, the Frechet distance of its samples to the test digits of that class
    (their mean, the worst and which class it is), besides sample_quality's measures of all the
    samples together. samples (N, 64) pixels, labels (N,) the classes asked for."""
    pixels, classes = load_digits_arrays()
    test, test_classes = torch.from_numpy(split_arrays(pixels)[split]), split_arrays(classes)[split]
    samples = torch.as_tensor(np.asarray(samples, np.float32)).clamp(0, PIXEL_MAX)
    labels = np.asarray(labels)
    classifier, _ = digit_classifier(cache_dir)
    with torch.no_grad():
        predicted = classifier(samples).argmax(1).numpy()
        features, reference = classifier.features(samples).numpy(), classifier.features(test).numpy()
    per_class = {int(c): frechet_distance(features[labels == c], reference[test_classes == c])
                 for c in np.unique(labels) if (labels == c).sum() >= 2}
    return dict(sample_quality(samples.numpy(), cache_dir, extended=False, split=split),
                class_accuracy=float((predicted == labels).mean()),
                class_accuracy_by_class={int(c): float((predicted[labels == c] == c).mean()) for c in np.unique(labels)},
                **_per_class_summary(per_class))


def _per_class_summary(per_class):
    """class -> Frechet distance: itself, their mean, the worst and which class it is."""
    worst = max(per_class, key=per_class.get) if per_class else None
    return dict(frechet_by_class=per_class,
                frechet_mean_over_classes=float(np.mean(list(per_class.values()))) if per_class else None,
                frechet_worst_class=worst, frechet_worst=per_class.get(worst))


# -----------------------------------------------------------------------------
# several draws of samples: one draw of 1000 moves a Frechet distance by units (issue #40)

QUALITY_DRAWS = 5  # sample sets, each from its own seed, whose mean is a run's sample quality
SEED_STEP = 1000  # draw k's sample seed: the first draw's + 1000 k

# the measures averaged over draws; the others (bootstrap s.d.s, C2ST, classifier accuracies) are the first draw's
AVERAGED = ("frechet_distance", "frechet_distance_cnn", "classifier_confidence", "class_coverage", "copy_rate",
            "precision", "recall", "density", "coverage")
CONDITIONAL_AVERAGED = AVERAGED + ("class_accuracy", "frechet_mean_over_classes")


def draw_seeds(first, count=QUALITY_DRAWS):
    """The sample seeds of `count` draws: `first` (a run's written samples), then first + 1000 k."""
    return [first + SEED_STEP * k for k in range(count)]


def mean_std(values):
    """(mean, sample standard deviation (n - 1)) of floats; (None, None) when any is None; the
    standard deviation of one value is None (unknown, not zero)."""
    if any(v is None for v in values):
        return None, None
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else None


def over_draws(scores, keys):
    """One dict of measures from one dict per draw (scores[0] the first draw's): each of `keys`
    the mean over the draws, beside KEY_seed_std, its standard deviation across the draws (a
    s.d., n - 1: the noise of one draw; the mean's standard error is it / sqrt(quality_draws));
    every other key the first draw's; quality_draws the number of draws; first_draw the first
    draw's own values of `keys` (the single-draw numbers of earlier runs)."""
    first = scores[0]
    merged = dict(first, quality_draws=len(scores), first_draw={k: first[k] for k in keys if k in first})
    for key in merged["first_draw"]:
        merged[key], merged[f"{key}_seed_std"] = mean_std([s[key] for s in scores])
    return merged


def averaged_quality(draws, cache_dir, split="test", extended=True):
    """sample_quality of several draws of samples (a list of (N, 64) arrays, each from its own
    sample seed) against `split`, as over_draws merges them; the slow measures (bootstrap s.d.s,
    C2ST: about 1.4 s of the 1.7 s of an extended draw of 1000, 1 thread) on the first draw only."""
    return over_draws([sample_quality(x, cache_dir, extended, split, slow=k == 0) for k, x in enumerate(draws)],
                      AVERAGED)


def averaged_conditional_quality(draws, labels, cache_dir, split="test"):
    """conditional_quality of several draws (a list of (N, 64) arrays, each from its own sample
    seed, all of the classes `labels`), as over_draws merges them; each class's Frechet distance
    and accuracy the mean over the draws, the worst class the worst of those means."""
    scores = [conditional_quality(x, labels, cache_dir, split) for x in draws]
    merged = over_draws(scores, CONDITIONAL_AVERAGED)
    by_class = {key: {c: float(np.mean([s[key][c] for s in scores])) for c in scores[0][key]}
                for key in ("frechet_by_class", "class_accuracy_by_class")}
    per_class = _per_class_summary(by_class["frechet_by_class"])
    del per_class["frechet_mean_over_classes"]  # the mean over draws already, with its spread
    return {**merged, **by_class, **per_class}


def quality_over_seeds(model, first_seed, device, cache_dir, split="val", draws=QUALITY_DRAWS, num_samples=1000):
    """The validation scorer for choosing settings: `draws` sets of num_samples samples of `model`
    (seeds draw_seeds(first_seed, draws); a conditional model's classes in turn), their averaged
    quality against `split` (averaged_quality, or averaged_conditional_quality)."""
    labels = sample_labels(model, num_samples, device)
    sets = [draw_samples(model, num_samples, seed, device, labels=labels).cpu().numpy()
            for seed in draw_seeds(first_seed, draws)]
    if labels is None:
        return averaged_quality(sets, cache_dir, split)
    return averaged_conditional_quality(sets, labels.cpu().numpy(), cache_dir, split)


def generative_classifier(model, x, train_labels):
    """The conditional model as a classifier, argmax_y log p(x | y) + log p(y), p(y) the class
    frequencies of the training split: (B,) predicted classes, or None for a family that gives
    no class_log_likelihoods."""
    log_prior = torch.bincount(train_labels, minlength=NUM_CLASSES).double().div(len(train_labels)).log()
    try:
        scores = batched(model.class_log_likelihoods, x).double()  # (B, 10)
    except NotImplementedError:
        return None
    return (scores + log_prior.to(scores.device)).argmax(1)


class NonFiniteSamples(Exception):
    """A sampler gave NaN or infinite pixels: found before anything is written (exit 1)."""


def check_samples(samples, what):
    if not torch.isfinite(samples).all():
        bad = int((~torch.isfinite(samples)).any(1).sum())
        raise NonFiniteSamples(f"{bad} of {len(samples)} samples of {what} hold NaN or infinite values "
                               f"(try other sampling settings)")

