"""Out-of-distribution (OOD) detection by likelihood: the test digits against inputs that do not
look like digits, scored by every trained family of this collection.

Learning p(x) promises, beyond sampling, to flag inputs that are not like the data. Nalisnick et
al. 2019 ("Do deep generative models know what they don't know?") found that it often fails:
simpler inputs get a *higher* likelihood than the model's own test data. Here the same happens
(blank images are more likely under the ARM than any digit), and remedies from the literature
are measured beside each family's raw score (NLL, bound, energy or score norm):
- typicality (Nalisnick et al. 2019b): |NLL(x) - m|, the distance of the NLL from its typical
  value m, the mean NLL of the validation digits: too likely is as suspicious as too unlikely;
- likelihood ratios (Ren et al. 2019): NLL(x) - NLL_bg(x) against a background that explains
  what the family should not be credited for: "pixel Markov", a pixel given its left and upper
  neighbours (local stroke statistics, fitted on train and its mirror images), and "mirror", the
  same model made blind to which way an image faces (built for the flipped sets: say so when
  quoting it);
- combined: the largest validation z-score of |NLL - m| and of each ratio, so that an input is
  flagged when any of the statistics is atypical.
These remedies were designed after seeing the ARM's AUROCs on these sets (docs/ood.md says so).

Sets (made without downloads, seeded, integers on the 0..16 pixel grid): uniform noise, blank
images, constant images, inverted test digits (16 - x), horizontally and vertically flipped test
digits of the classes whose mirror image is not a digit, test digits with 10-20% of the pixels
replaced by noise, and grey 8x8 patches of scikit-learn's bundled sample photographs
(`load_sample_images`), reduced by 4x4 block averages like the digits. `--extra-ood NAME=FILE.npy`
adds your own set. Scores are "higher = more out of distribution"; typical values and every other
calibration use the validation split only. Metrics per (model, score, set): AUROC, and the
false-positive rate at 95% true-positive rate (FPR95: the fraction of the set accepted as digits
by the threshold that accepts 95% of the test digits), both with sklearn.metrics.

Uses the trained weights NAME.pt of every family in --weights (default results/, where they ship),
trains a family into it with its defaults only when its weights are missing or come from an
interrupted run (not with --no-train; the run trains in a scratch folder and replaces the family's
files only when it finishes), and skips a family whose script or weights are absent or damaged, with a one-line note.
Ctrl-C or SIGTERM reaches a run it started, which finishes; then ood.py exits 130 in one line.

Run:  python ood.py                      # writes results/ood.md, ood.json, ood.png
      python ood.py --extra-ood letters=my_letters.npy --no-train
      python ood.py --help
"""

import argparse
import dataclasses
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

import common
import plumbing
from plumbing import files, processes, registry, results, runs

ROOT = Path(__file__).resolve().parent
SET_SIZE = 300  # images per random set
MIRROR_DIGITS = dict(hflip=(0, 1, 8), vflip=(0, 1, 3, 8))  # classes whose mirror image is a digit

# -----------------------------------------------------------------------------
# the out-of-distribution sets: (N, 64) float32 integers on 0..16


def _rng(seed, name):
    """A generator of its own per set, so that each set depends only on the seed and its name."""
    return np.random.default_rng([seed, sum(ord(c) * 31**i for i, c in enumerate(name)) % 2**31])


def noise_set(seed, n=SET_SIZE):
    """Every pixel uniform on 0..16."""
    return _rng(seed, "noise").integers(0, common.NUM_LEVELS, (n, common.NUM_PIXELS)).astype(np.float32)


def blank_set(n=SET_SIZE):
    """All pixels 0: the background of every digit, and nothing else."""
    return np.zeros((n, common.NUM_PIXELS), np.float32)


def constant_set(seed, n=SET_SIZE):
    """Each image one level drawn from 1..16 everywhere."""
    levels = _rng(seed, "constant").integers(1, common.NUM_LEVELS, (n, 1))
    return np.repeat(levels, common.NUM_PIXELS, 1).astype(np.float32)


def inverted_set(test):
    """16 - x: black strokes on white."""
    return (common.PIXEL_MAX - test).astype(np.float32)


def flipped_set(test, labels, axis):
    """Test digits mirrored left-right (axis "hflip") or top-bottom ("vflip"), without the classes
    whose mirror image is itself a digit (MIRROR_DIGITS)."""
    keep = ~np.isin(labels, MIRROR_DIGITS[axis])
    images = test[keep].reshape(-1, 8, 8)
    images = images[:, :, ::-1] if axis == "hflip" else images[:, ::-1, :]
    return np.ascontiguousarray(images.reshape(-1, common.NUM_PIXELS), np.float32)


def corrupted_set(seed, test):
    """Each test digit with 7 to 12 of its 64 pixels (11-19%) replaced by uniform noise."""
    rng = _rng(seed, "corrupted")
    out = test.astype(np.float32).copy()
    for image in out:
        count = rng.integers(7, 13)  # 7..12 of 64 pixels: 11% to 19%
        where = rng.choice(common.NUM_PIXELS, count, replace=False)
        image[where] = rng.integers(0, common.NUM_LEVELS, count)
    return out


def natural_patches_set(seed, n=SET_SIZE):
    """Grey 32x32 crops of scikit-learn's two sample photographs, 4x4 block averages -> 8x8 on the
    0..16 grid (the digits were made by counting pixels in 4x4 blocks of 32x32 bitmaps)."""
    from sklearn.datasets import load_sample_images

    photos = [image.astype(np.float64) @ np.array([0.299, 0.587, 0.114]) for image in load_sample_images().images]
    rng = _rng(seed, "natural")
    patches = []
    for _ in range(n):
        grey = photos[rng.integers(len(photos))]  # (427, 640) on 0..255
        top, left = rng.integers(0, grey.shape[0] - 32), rng.integers(0, grey.shape[1] - 32)
        crop = grey[top:top + 32, left:left + 32]
        blocks = crop.reshape(8, 4, 8, 4).mean((1, 3))  # (8, 8)
        patches.append(np.round(blocks * common.PIXEL_MAX / 255).reshape(-1))
    return np.stack(patches).astype(np.float32)


def built_in_sets(test, labels, seed):
    """name -> (N, 64) float32 pixels, in the order of the table. test: (447, 64) test digits."""
    return dict(
        noise=noise_set(seed), blank=blank_set(), constant=constant_set(seed),
        inverted=inverted_set(test), hflip=flipped_set(test, labels, "hflip"),
        vflip=flipped_set(test, labels, "vflip"), corrupted=corrupted_set(seed, test),
        natural=natural_patches_set(seed))


SET_DESCRIPTIONS = dict(
    noise="uniform noise on 0..16", blank="all pixels 0", constant="one level 1..16 everywhere",
    inverted="16 - x of the test digits", hflip="test digits mirrored left-right (no 0, 1, 8)",
    vflip="test digits mirrored top-bottom (no 0, 1, 3, 8)",
    corrupted="test digits, 10-20% of pixels replaced by noise",
    natural="grey 8x8 patches of sklearn's sample photos")

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,39}")


def load_extra_set(spec, taken=()):
    """NAME=FILE.npy -> (name, (N, 64) float32 pixels): an (N, 64) or (N, 8, 8) array of finite
    numbers on 0..16, rounded to the integer grid. Any problem is a one-line plumbing.UsageError."""
    name, sep, file = spec.partition("=")
    if not sep or not file:
        raise plumbing.UsageError(f"--extra-ood expects NAME=FILE.npy, got {spec!r}")
    if not NAME_PATTERN.fullmatch(name):
        raise plumbing.UsageError(f"--extra-ood name {name!r}: use up to 40 letters, digits, '_', '.', '-'")
    if name in taken:
        raise plumbing.UsageError(f"--extra-ood name {name!r} is taken; choose another")
    def images(shape, dtype):
        if len(shape) not in (2, 3) or tuple(shape[1:]) not in ((64,), (8, 8)) or shape[0] == 0:
            return f"has shape {shape}; expected (N, 64) or (N, 8, 8) with N >= 1"
        if shape[0] > MAX_EXTRA_IMAGES:
            return f"holds {shape[0]:,} images; at most {MAX_EXTRA_IMAGES:,} are scored (take a subset)"

    try:
        array = files.read_npy(file, images)
    except files.DamagedFile as error:
        raise plumbing.UsageError(f"--extra-ood {name}: no file {file}" if error.problem == "is missing" else
                                  f"--extra-ood {name}: {file} is not a readable .npy array of images "
                                  f"({error.problem})") from None
    array = array.reshape(len(array), common.NUM_PIXELS).astype(np.float64)
    if not np.isfinite(array).all():
        raise plumbing.UsageError(f"--extra-ood {name}: {file} holds NaN or infinite values")
    if array.min() < 0 or array.max() > common.PIXEL_MAX:
        raise plumbing.UsageError(f"--extra-ood {name}: {file} has values in [{array.min():g}, {array.max():g}]; "
                                f"pixels must lie on 0..16 (the scale of load_digits().data)")
    if array.max() <= 1 and not np.array_equal(array, np.round(array)):  # rounding would leave only 0 and 1
        raise plumbing.UsageError(f"--extra-ood {name}: {file} has fractional values in [0, 1], pixels scaled to "
                                  f"0..1, it seems; multiply them by 16 (pixels lie on 0..16, rounded to integers)")
    return name, np.round(array).astype(np.float32)


MAX_EXTRA_IMAGES = 100_000  # an --extra-ood set larger than this is refused before it is read


# -----------------------------------------------------------------------------
# classical models of the pixels: the independent-pixel baseline and the pixel-Markov background


def independent_pixel_nll(train):
    """fn(x (N, 64) pixels) -> (N,) -log p(x) in nats under the per-pixel independent
    categoricals fitted on `train` (common.independent_pixel_log_probs)."""
    log_probs = common.independent_pixel_log_probs(train)  # (64, 17)

    def nll(x):
        x = np.asarray(x).round().astype(int).clip(0, common.PIXEL_MAX)
        return -log_probs[np.arange(common.NUM_PIXELS), x].sum(1)

    return nll


def pixel_markov_nll(train, smoothing=0.5):
    """The background of the likelihood ratio: fn(x (N, 64) pixels) -> (N,) -log p(x) in nats under
    p(x) = prod_ij p(x_ij | x_i(j-1), x_(i-1)j), one categorical table over 0..16 for every pixel
    given its left and upper neighbours (0 outside the image), shared by all positions, fitted with
    add-`smoothing` on `train` and its three mirror images. It knows stroke statistics (smoothness,
    thickness, how much ink) but not where strokes go, nor which way a digit faces."""
    train = np.asarray(train).round().astype(int).reshape(-1, 8, 8)
    train = np.concatenate([train, train[:, :, ::-1], train[:, ::-1, :], train[:, ::-1, ::-1]])

    def neighbours(images):  # (N, 8, 8) -> left, up, pixel, each (N, 8, 8)
        padded = np.zeros((len(images), 9, 9), int)
        padded[:, 1:, 1:] = images
        return padded[:, 1:, :-1], padded[:, :-1, 1:], padded[:, 1:, 1:]

    counts = np.zeros((common.NUM_LEVELS,) * 3)  # (left, up, pixel)
    np.add.at(counts, tuple(a.ravel() for a in neighbours(train)), 1)
    log_probs = np.log((counts + smoothing) / (counts.sum(2, keepdims=True) + smoothing * common.NUM_LEVELS))

    def nll(x):
        x = np.asarray(x).round().astype(int).clip(0, common.PIXEL_MAX).reshape(-1, 8, 8)
        return -log_probs[neighbours(x)].sum((1, 2))

    return nll


# -----------------------------------------------------------------------------
# how each family is scored: its model's ood_score (an NLL or bound, an energy, a score norm)


@dataclasses.dataclass(frozen=True)
class Scoring:
    """ood.py's settings for one family; the defaults score every image and its mirror images."""
    batch_size: int = 512
    mirrors: bool = True  # also score the mirror images (the mirror ratio): 4x the cost
    max_images: int = None  # score only the first max_images of each set (an ODE likelihood is slow)
    sampling: tuple = ()  # (field, value) pairs of the family's Sampling settings


SCORING = {  # family name -> its settings where they are not the defaults
    "VAE": Scoring(batch_size=64),
    # SBGM and FM: their variational bound is useless per image (one draw's sd is ~300 nats for
    # SBGM: 16 draws still left noise at AUROC 0.97), so the ODE likelihood on a subset, 16 RK4 steps
    "SBGM": Scoring(mirrors=False, max_images=150, sampling=(("ode_steps", 16),)),
    # FM's exact divergence costs 64 forward-mode derivatives per evaluation: fewer images and steps
    "FM": Scoring(mirrors=False, max_images=100, sampling=(("ode_steps", 8),)),
    # MDM's bound costs 64 network evaluations per mask and level: one mask per level, no mirrors
    "MDM": Scoring(mirrors=False, sampling=(("masks_per_level", 1),)),
}
GROUP = ("identity", "hflip", "vflip", "rot180")  # the mirror images of the mirror ratio


def mirror_images(x):
    """(N, 64) -> (4, N, 64): x and its left-right, top-bottom and 180-degree mirror images."""
    images = x.reshape(-1, 8, 8)
    return np.stack([images, images[:, :, ::-1], images[:, ::-1, :], images[:, ::-1, ::-1]]).reshape(4, -1, 64)


# -----------------------------------------------------------------------------
# scores from a statistic, all "higher = more out of distribution", calibrated on val only


def typicality(statistic, reference):
    """|s(x) - m|, m the mean of the statistic over the reference (validation) images: the
    per-image typicality test of Nalisnick et al. 2019b."""
    return np.abs(statistic - np.mean(reference))


def mirror_ratio(statistic, mirrored):
    """s(x) - s_bg(x), s_bg(x) = -log (1/4) sum_g exp(-s(g x)) over the mirror images g x: the
    likelihood ratio against the same model made blind to which way an image faces."""
    return statistic + _logmeanexp(-np.asarray(mirrored), 0)


def _logmeanexp(a, axis):
    top = a.max(axis)
    return top + np.log(np.mean(np.exp(a - np.expand_dims(top, axis)), axis))


def standardized(score, reference):
    return (score - reference.mean()) / max(reference.std(), 1e-12)


def derived_scores(kind, stat, mirrored, background):
    """dict score name -> dict input name -> (N,) scores; stat, background: dict input -> (N,)
    (input "val" is the calibration set); mirrored: dict input -> (4, N) or None."""
    if kind == "score-norm":
        return {"score-norm": stat}
    raw = "NLL" if kind == "nll" else "energy"
    scores = {raw: stat, "typicality": {k: typicality(v, stat["val"]) for k, v in stat.items()}}
    if background is not None and kind == "nll":  # both in nats (an energy has its own scale)
        scores["ratio (pixel Markov)"] = {k: stat[k] - background[k][:len(stat[k])] for k in stat}
    if mirrored is not None:
        scores["ratio (mirror)"] = {k: mirror_ratio(stat[k], mirrored[k]) for k in stat}
    tests = [{k: np.abs(standardized(v, stat["val"])) for k, v in stat.items()}]  # two-sided
    tests += [{k: standardized(v, ratio["val"]) for k, v in ratio.items()}  # one-sided
              for name, ratio in scores.items() if name.startswith("ratio")]
    if len(tests) > 1:
        scores["combined"] = {k: np.max([t[k] for t in tests], 0) for k in stat}
    return scores


COMBINED_HELP = ("max of the z-scores (on val) of |NLL - m| and of each ratio: flagged when any "
                 "of the statistics is atypical")

# -----------------------------------------------------------------------------
# metrics


def auroc(in_scores, out_scores):
    """Area under the ROC curve of telling the OOD set (positives) from in-distribution images by
    a score that is higher out of distribution: 1 perfect, 0.5 chance, 0 inverted."""
    from sklearn.metrics import roc_auc_score

    labels = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))]
    return float(roc_auc_score(labels, np.r_[in_scores, out_scores]))


def fpr_at_95_tpr(in_scores, out_scores):
    """Fraction of the OOD set accepted as in-distribution by the threshold that accepts 95% of
    the in-distribution images (in-distribution = positives, as in Liang et al. 2018)."""
    from sklearn.metrics import roc_curve

    labels = np.r_[np.ones(len(in_scores)), np.zeros(len(out_scores))]
    fpr, tpr, _ = roc_curve(labels, -np.r_[in_scores, out_scores], drop_intermediate=False)
    return float(fpr[np.searchsorted(tpr, 0.95 - 1e-12)])


# -----------------------------------------------------------------------------
# running the families


def evaluate(model, images, seed, device, batch_size):
    """model.ood_score over (N, 64) numpy pixels in batches, with its own seeded noise stream ->
    (N,) float64."""
    x = torch.from_numpy(np.ascontiguousarray(images, np.float32)).to(device)
    with common.seeded(seed, device), torch.no_grad():
        return common.batched(lambda b: model.ood_score(b).double(), x, batch_size=batch_size).cpu().numpy()


def family_statistics(model, scoring, inputs, seed, device):
    """dict input -> (N,) statistic, and dict input -> (4, N) statistic of the mirror images
    (None for a score-norm)."""
    stat, mirrored = {}, {}
    with_mirrors = scoring.mirrors and model.ood_kind != "score-norm"
    for index, (name, images) in enumerate(inputs.items()):
        images = images[:scoring.max_images]
        group = mirror_images(images) if with_mirrors else images[None]
        values = np.stack([evaluate(model, g, seed + 1000 * index + j, device, scoring.batch_size)
                           for j, g in enumerate(group)])
        stat[name], mirrored[name] = values[0], values
    return stat, (mirrored if with_mirrors else None)


def score_rows(model_name, scores, sets):
    rows = []
    for score_name, values in scores.items():
        rows.append(dict(model=model_name, score=score_name,
                         auroc={s: auroc(values["test"], values[s]) for s in sets},
                         fpr95={s: fpr_at_95_tpr(values["test"], values[s]) for s in sets}))
    return rows


# -----------------------------------------------------------------------------
# the tables and the picture


def recommend(rows, built_in):
    """The (model, score) with the highest mean AUROC over the built-in sets."""
    best = max(rows, key=lambda r: np.mean([r["auroc"][s] for s in built_in]))
    return dict(model=best["model"], score=best["score"],
                mean_auroc=float(np.mean([best["auroc"][s] for s in built_in])))


def markdown(rows, sets, built_in, recommended, skipped, in_size):
    names = list(sets)

    def table(metric, digits):
        lines = ["| model | score | " + " | ".join(names) + " | mean over built-in |",
                 "|---|---|" + "---|" * (len(names) + 1)]
        for r in rows:
            mark = "**" if (r["model"], r["score"]) == (recommended["model"], recommended["score"]) else ""
            cells = [f"{mark}{r[metric][s]:.{digits}f}{mark}" for s in names]
            mean = np.mean([r[metric][s] for s in built_in])
            lines.append(f"| {mark}{r['model']}{mark} | {r['score']} | " + " | ".join(cells) + f" | {mean:.{digits}f} |")
        return lines

    lines = [f"In-distribution: the {in_size} test digits; typical values and z-scores from the 350 validation "
             f"digits. Scores are higher out of distribution.", "",
             "| set | images | what |", "|---|---|---|"]
    lines += [f"| {s} | {sets[s]['size']} | {sets[s]['description']} |" for s in names]
    lines += ["", "AUROC (1 = perfect, 0.5 = chance, below 0.5 = the OOD images look *more* like digits):", ""]
    lines += table("auroc", 3)
    lines += ["", "FPR at 95% TPR (fraction of the set accepted by the threshold that accepts 95% of the test "
              "digits; lower is better):", ""]
    lines += table("fpr95", 2)
    rec = next(r for r in rows if (r["model"], r["score"]) == (recommended["model"], recommended["score"]))
    lines += ["", f"Recommended (highest mean AUROC over the built-in sets): **{recommended['model']}, "
              f"{recommended['score']}**, mean AUROC {recommended['mean_auroc']:.3f}, lowest "
              f"{min(rec['auroc'][s] for s in built_in):.3f} ({min(built_in, key=lambda s: rec['auroc'][s])})."]
    lines += ["", "Scores: NLL = the family's -log p(x) or its bound (nats); typicality = |NLL - m|, m its mean "
              "on val (Nalisnick et al. 2019b); ratio (pixel Markov) = NLL - NLL of a pixel-given-left-and-"
              "upper-neighbour model fitted on the mirrored train digits (Ren et al. 2019's background "
              "likelihood ratio); ratio (mirror) = NLL(x) + log mean_g exp(-NLL(g x)) over the 4 mirror "
              "images g x (background: the same model blind to orientation); combined = " + COMBINED_HELP + "."]
    failures = []
    for r in rows:
        if r["score"] in ("NLL", "energy"):
            bad = [s for s in built_in if r["auroc"][s] < 0.9]
            if bad:
                fixes = []
                for s in bad:
                    best = max((q for q in rows if q["model"] == r["model"]), key=lambda q: q["auroc"][s])
                    fixes.append(f"{s} {r['auroc'][s]:.2f} (" + ("no remedy does better" if best is r else
                                                                 f"best: {best['score']} {best['auroc'][s]:.2f}") + ")")
                failures.append(f"- {r['model']} {r['score']}: " + ", ".join(fixes))
    if failures:
        lines += ["", "Where a raw likelihood (or energy) fails (AUROC < 0.9), and the best remedy of the same "
                  "model:", *failures]
    subsets = sorted({(r["model"], r["images_per_set"]) for r in rows if r.get("images_per_set")})
    if subsets:
        lines += ["", "Scored on the first images of each set only (an ODE likelihood is slow): "
                  + ", ".join(f"{m} ({n} per set, the test digits included)" for m, n in subsets) + "."]
    if skipped:
        lines += ["", "Not scored: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()) + "."]
    return "\n".join(lines) + "\n"


def picture(path, panels, sets, rows, examples, recommended=None):
    """ood_figure saved as a PNG."""
    import matplotlib.pyplot as plt

    fig = ood_figure(panels, sets, rows, examples, recommended)
    files.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))
    plt.close(fig)


def ood_figure(panels, sets, rows, examples, recommended=None):
    """One example image of each set (examples: name -> ((64,) pixels, what it is)), the AUROC of
    every (model, score) row on every set (`recommended`, a (model, score), in bold), and for each
    of `panels` (title, dict input -> scores) the ROC curves and the histograms of the scores, the
    test digits against each set. No text under 9 pt."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig = plt.figure(figsize=(7 + 4.6 * len(panels), 14), dpi=90)
    outer = fig.add_gridspec(1, 2, width_ratios=(5, 4.6 * len(panels)), wspace=0.12)
    right = outer[1].subgridspec(3, len(panels), height_ratios=(1, 2.2, 2.2), hspace=0.45, wspace=0.3)
    shown = right[0, :].subgridspec(1, len(examples), wspace=0.15)
    for k, (name, (image, what)) in enumerate(examples.items()):
        ax = fig.add_subplot(shown[0, k])
        ax.imshow(np.reshape(image, (8, 8)), cmap="gray", vmin=0, vmax=common.PIXEL_MAX)
        ax.set(xticks=[], yticks=[])
        ax.set_title(name, fontsize=10, fontweight="bold")
        ax.set_xlabel(textwrap.fill(what, 20), fontsize=9)

    heat = fig.add_subplot(outer[0])
    values = np.array([[r["auroc"][s] for s in sets] for r in rows])
    image = heat.imshow(values, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    for (i, j), v in np.ndenumerate(values):
        heat.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=9)
    heat.set_xticks(range(len(sets)), sets, rotation=45, ha="left")
    heat.xaxis.tick_top()
    heat.set_yticks(range(len(rows)), [f"{r['model']}: {r['score']}" for r in rows], fontsize=9)
    for i, r in enumerate(rows):
        if (r["model"], r["score"]) == recommended:
            heat.get_yticklabels()[i].set_fontweight("bold")
        if i and r["model"] != rows[i - 1]["model"]:
            heat.axhline(i - 0.5, color="black", linewidth=1.5)
    heat.set_title("AUROC of every model and score (rows) on every set (columns):\n1 perfect, 0.5 chance, below 0.5 "
                   "the set looks more like digits" + ("; bold: recommended" if recommended else ""), pad=35)
    fig.colorbar(image, ax=heat, orientation="horizontal", fraction=0.025, pad=0.01).set_label("AUROC")

    colors = plt.cm.tab10(np.arange(len(sets)) % 10)
    for column, (title, scores) in enumerate(panels):
        roc, hist = fig.add_subplot(right[1, column]), fig.add_subplot(right[2, column])
        for color, name in zip(colors, sets):
            labels = np.r_[np.zeros(len(scores["test"])), np.ones(len(scores[name]))]
            fpr, tpr, _ = roc_curve(labels, np.r_[scores["test"], scores[name]])
            roc.plot(fpr, tpr, color=color, label=f"{name} ({auroc(scores['test'], scores[name]):.2f})")
        roc.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=1)
        roc.set(title=f"ROC: {title}", xlabel="false-positive rate (test digits flagged)",
                ylabel="true-positive rate (OOD flagged)")
        roc.legend(title="set (AUROC)", loc="lower right")
        everything = np.concatenate([scores[k] for k in ("test", *sets)])
        low, high = np.percentile(everything, [0.5, 99.5])
        high = high if high > low else low + 1
        logarithmic = low > 0 and high / low > 20  # scores spanning decades: log-spaced bins
        bins = np.geomspace(low, high, 60) if logarithmic else np.linspace(low, high, 60)
        if logarithmic:
            hist.set_xscale("log")
        hist.hist(np.clip(scores["test"], low, high), bins=bins, density=True, color="black", alpha=0.35,
                  label="test digits")
        for color, name in zip(colors, sets):
            hist.hist(np.clip(scores[name], low, high), bins=bins, density=True, histtype="step", color=color,
                      label=name)
        hist.set(title=f"histogram: {title}", xlabel="score (clipped to the 0.5-99.5% range)", ylabel="density")
        hist.legend()
    return fig


# -----------------------------------------------------------------------------
# command line


def main(argv=None):
    parser = runs.Parser(prog="ood.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    results.add_folder_flags(parser, "ood.md, .json and .png")
    parser.add_argument("--extra-ood", action="append", default=[], metavar="NAME=FILE.npy",
                        help="add your own set: an (N, 64) or (N, 8, 8) .npy array on 0..16 (rounded to the "
                             "integer grid); repeatable")
    parser.add_argument("--seed", type=common.nonnegative_int, default=0,
                        help="seed of the random sets and of the stochastic bounds (default %(default)s)")
    results.add_machine_flags(parser)
    args = parser.parse_args(argv)
    processes.tool("ood.py", lambda: score_everything(args),
                     "a model run it started was stopped and its files discarded; the files in --out are whole")


def score_everything(args):
    start, cpu_start = time.perf_counter(), time.process_time()
    device = runs.choose_device(args.device)  # before --out is made: a refused device leaves nothing
    out, weights = results.out_folder(args.out), results.out_folder(args.weights)
    pixels, labels = common.load_digits_arrays()
    splits, label_splits = common.split_arrays(pixels), common.split_arrays(labels)
    sets = built_in_sets(splits["test"], label_splits["test"], args.seed)
    built_in = list(sets)
    for spec in args.extra_ood:
        name, images = load_extra_set(spec, taken=(*sets, "test", "val"))
        sets[name] = images
    processes.claim_out(out, "ood.py")
    args.threads = args.threads or runs.auto_threads()
    torch.set_num_threads(args.threads)
    inputs = dict(val=splits["val"], test=splits["test"], **sets)  # val: calibration only

    markov = pixel_markov_nll(splits["train"])
    background = {k: markov(v) for k, v in inputs.items()}
    independent = independent_pixel_nll(splits["train"])
    baselines = {"Independent pixels": independent, "Pixel Markov": markov}

    rows, all_scores, skipped, seconds = [], {}, {}, {}
    families = [f for f in registry.FAMILIES if registry.model_class(f.name).ood_kind is not None]
    for number, family in enumerate(families, 1):
        scoring = SCORING.get(family.name, Scoring())
        model, reason = results.load_family(family, weights, not args.no_train, args.threads, device,
                                            scoring.sampling)
        if model is None:
            print(f"ood: skipped {family.name}: {reason}", file=sys.stderr)
            skipped[family.name] = reason
            continue
        with processes.announced(f"ood: {family.name} ({number} of {len(families)} families)",
                                 not args.no_progress), common.timed(device) as took:
            stat, mirrored = family_statistics(model, scoring, inputs, args.seed, device)
        seconds[family.name] = dict(wall=round(took["wall"], 2), cpu=round(took["cpu"], 2))
        scores = derived_scores(model.ood_kind, stat, mirrored, background)
        all_scores[family.name] = scores
        family_rows = score_rows(family.name, scores, sets)
        if scoring.max_images:
            for row in family_rows:
                row["images_per_set"] = scoring.max_images
        rows += family_rows
    files.keep_table(out / "ood.md", all_scores)
    for name, nll in baselines.items():
        stat = {k: nll(v) for k, v in inputs.items()}
        mirrored = None if nll is markov else {k: np.stack([nll(g) for g in mirror_images(v)])
                                               for k, v in inputs.items()}  # Markov: mirror-blind already
        scores = derived_scores("nll", stat, mirrored, background if nll is not markov else None)
        all_scores[name] = scores
        rows += score_rows(name, scores, sets)

    recommended = recommend(rows, built_in)
    set_info = {s: dict(size=len(v), description=SET_DESCRIPTIONS.get(s, "--extra-ood file"),
                        built_in=s in built_in) for s, v in sets.items()}
    table = markdown(rows, set_info, built_in, recommended, skipped, len(splits["test"]))
    with processes.SIGNALS.held():  # every file complete, then a signal's exit 130
        write_outputs(out, table, all_scores, recommended, sets, dict(
            sets=set_info, in_distribution=f"test split ({len(splits['test'])} digits)", calibration="val split",
            rows=rows, recommended=recommended, skipped=skipped, seed=args.seed, device=str(device),
            threads=torch.get_num_threads(), family_seconds=seconds,
            seconds=round(time.perf_counter() - start, 2), cpu_seconds=round(time.process_time() - cpu_start, 2)),
            splits["test"])
    processes.emit(table)


def write_outputs(out, table, all_scores, recommended, sets, data, test):
    files.write_table(out / "ood.md", table)
    best = all_scores[recommended["model"]]
    raw = next(k for k in best if k in ("NLL", "energy", "score-norm"))
    panels = [(f"{recommended['model']} {recommended['score']} (recommended)", best[recommended["score"]]),
              (f"{recommended['model']} {raw}", best[raw])]
    if recommended["model"] != "ARM" and "ARM" in all_scores:  # the exact likelihood and its failure
        panels.append(("ARM NLL", all_scores["ARM"]["NLL"]))
    examples = {"test digits": (test[0], "in distribution: the test split"),
                **{s: (images[0], SET_DESCRIPTIONS.get(s, "--extra-ood file")) for s, images in sets.items()}}
    picture(out / "ood.png", panels, list(sets), data["rows"], examples, (recommended["model"], recommended["score"]))
    files.save_json(out / "ood.json", data)


if __name__ == "__main__":
    main()
