"""Leaderboard: every family of this collection and three classical baselines, scored the same
way on the same held-out test split of 8x8 Digits.

Columns: test NLL (nats per image on the discrete 0..16 pixels, and bits/dim) where a likelihood
or a bound exists, and for everyone the sample-quality numbers of plumbing/quality.py's sample_quality: the
Frechet distance to the test split in a small digit classifier's features, the classifier's
confidence, class coverage (entropy of the predicted classes; log 10 = 2.303 is uniform) and the
copy rate (fraction of samples closer to a training image than 99% of test images are); each the
mean over quality.QUALITY_DRAWS draws of 1000 samples with their own sample seeds, +- the standard
deviation across the draws, and the verdicts against the GaussianMixture judge the means with it.

Each model script runs with its default flags, unless OUT/NAME_metrics.json already comes from a
default run of the current code (same sha256 of the script and common.py, and no setting changed:
a resumed default run counts), which is reused. A run trains in a scratch folder in OUT and
replaces the family's files only when it finishes; a damaged metrics or samples file is one line
naming it and counts as missing. Ctrl-C or SIGTERM reaches the running model script, which
finishes its outputs (discarded); then leaderboard.py exits 130 in one line.
The baselines are fitted on the train split with scikit-learn, their hyper-parameters chosen on
the validation split:
- per-pixel independent categorical (add-0.5 smoothing): exact NLL;
- GaussianMixture (full covariance) and KernelDensity (gaussian) on uniformly dequantized
  pixels x + u: NLL upper bounds E_u[-log p(x + u)].

Run:  python leaderboard.py                 # trains what is missing, then writes the table
      python leaderboard.py --no-train      # only what is already in results/
      python leaderboard.py --seeds 0 1 2   # every family with three seeds: results/seeds.md
      python leaderboard.py --conditional   # every family's model of p(x | y): results/conditional.md
Writes OUT/leaderboard.md, OUT/leaderboard.json and OUT/leaderboard.png. Run it on an otherwise
idle machine; the speed of every family is benchmark.py's.

--conditional compares the families' `--conditional` runs (NAME_conditional_*, trained when
missing or stale) with a class-conditional GaussianMixture (one mixture per class, its size
chosen on val): class accuracy of the samples (the digit classifier's verdict against the class
asked for), the Frechet distance of each class's samples to that class's test digits (mean over
classes, and the worst), copy rate, the conditional test NLL -log p(x | y), and each density
used as a generative classifier, argmax_y log p(x | y) + log p(y), beside the discriminative
digit classifier. Writes OUT/conditional.md, .json and .png (row c of each grid: class c).
"""

import argparse
import math
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import torch

import common
from plumbing import baselines, files, processes, quality, registry, results, runs

SCRIPTS = registry.SCRIPTS  # name -> script, in the order of the table (tests narrow it)
ROOT = registry.ROOT
UNIFORM_NLL = common.NUM_PIXELS * math.log(common.NUM_LEVELS)  # 181.3 nats

# -----------------------------------------------------------------------------
# classical baselines, each returning (test NLL, NLL kind, draws of samples, fit seconds, sample seconds):
# draws are quality.QUALITY_DRAWS sample sets (N, 64) on 0..16, one for each seed of quality.draw_seeds(seed)


def sample_draws(sample, seed):
    """[sample(s) for s in quality.draw_seeds(seed)], and the seconds of the first draw."""
    start = time.perf_counter()
    first = sample(seed)
    seconds = time.perf_counter() - start
    return [first] + [sample(s) for s in quality.draw_seeds(seed)[1:]], seconds


def independent_categorical(splits, num_samples, seed):
    """p(x) = prod_i p_i(x_i), each p_i a categorical over 0..16 with add-0.5 smoothing."""
    start = time.perf_counter()
    log_probs = common.independent_pixel_log_probs(splits["train"])  # (64, 17)
    test = splits["test"].astype(int)
    nll = -log_probs[np.arange(64), test].sum(1).mean()
    cdf = np.exp(log_probs).cumsum(1)
    fit_seconds = time.perf_counter() - start

    def sample(s):
        pixels = (np.random.default_rng(s).random((num_samples, 64, 1)) > cdf[None]).sum(2)
        return pixels.clip(0, common.PIXEL_MAX).astype(np.float32)

    draws, sample_seconds = sample_draws(sample, seed)
    return float(nll), "exact", draws, fit_seconds, sample_seconds


def _continuous_samples_to_pixels(v):
    """A sample of v = x + u in [0, 17)^64 gives the pixel x = floor(v) (clipped to 0..16)."""
    return np.floor(v).clip(0, common.PIXEL_MAX).astype(np.float32)


def gaussian_mixture(splits, num_samples, seed, ks=(5, 10, 20, 40), draws=5):
    from sklearn.mixture import GaussianMixture

    start = time.perf_counter()
    _, k, model = baselines.fit_on_val(lambda k: GaussianMixture(k, covariance_type="full", reg_covar=1e-3,
                                                        random_state=seed), splits, ks, seed, draws)
    nll = baselines.dequantized_bound(model.score_samples, splits["test"], seed + 2, draws)
    fit_seconds = time.perf_counter() - start

    def sample(s):
        model.random_state = s
        samples = _continuous_samples_to_pixels(model.sample(num_samples)[0])
        return samples[np.random.default_rng(s).permutation(num_samples)]  # sklearn sorts them by component

    draws, sample_seconds = sample_draws(sample, seed)
    return nll, "upper_bound", draws, fit_seconds, sample_seconds, dict(k=k)


def kernel_density(splits, num_samples, seed, bandwidths=(1.0, 1.5, 2.0, 2.5, 3.0), draws=5):
    from sklearn.neighbors import KernelDensity

    start = time.perf_counter()
    _, bandwidth, model = baselines.fit_on_val(lambda h: KernelDensity(bandwidth=h), splits, bandwidths, seed, draws)
    nll = baselines.dequantized_bound(model.score_samples, splits["test"], seed + 2, draws)
    fit_seconds = time.perf_counter() - start
    draws, sample_seconds = sample_draws(
        lambda s: _continuous_samples_to_pixels(model.sample(num_samples, random_state=s)), seed)
    return nll, "upper_bound", draws, fit_seconds, sample_seconds, dict(bandwidth=bandwidth)


def conditional_gaussian_mixture(splits, labels, per_class, seed, ks=(1, 2, 3, 5), regs=(0.01, 0.1, 1.0), draws=5):
    """p(x | y) a GaussianMixture per class on dequantized pixels (its size and covariance
    regulariser chosen on that class's val digits: ~100 training digits a class in 64 dimensions
    need more than the pooled mixture's): (mean test -log p(x | y) bound, the generative
    classifier's test predictions, draws of samples (each (10 per_class, 64), class by class, as
    sample_draws), their labels, fit seconds, sample seconds)."""
    from sklearn.mixture import GaussianMixture

    start = time.perf_counter()
    mixtures = []
    for c in range(common.NUM_CLASSES):
        of_class = {split: splits[split][labels[split] == c] for split in ("train", "val")}
        mixtures.append(baselines.fit_on_val(lambda kr: GaussianMixture(kr[0], covariance_type="full", reg_covar=kr[1],
                                                               random_state=seed),
                                    of_class, [(k, r) for k in ks for r in regs], seed, draws)[2])
    rng = np.random.default_rng(seed + 2)
    test = [splits["test"] + rng.random(splits["test"].shape) for _ in range(draws)]  # one set for every class
    log_lik = np.stack([np.mean([m.score_samples(t) for t in test], 0) for m in mixtures], 1)  # (N, 10)
    nll = float(-log_lik[np.arange(len(log_lik)), labels["test"]].mean())
    log_prior = np.log(np.bincount(labels["train"], minlength=common.NUM_CLASSES) / len(labels["train"]))
    predicted = (log_lik + log_prior).argmax(1)
    fit_seconds = time.perf_counter() - start

    def sample(s):
        for m in mixtures:
            m.random_state = s
        return np.concatenate([_continuous_samples_to_pixels(m.sample(per_class)[0]) for m in mixtures])

    draws, sample_seconds = sample_draws(sample, seed)
    return nll, predicted, draws, np.repeat(np.arange(common.NUM_CLASSES), per_class), fit_seconds, sample_seconds


# -----------------------------------------------------------------------------
# model runs


def model_row(name, script, out, train, threads):
    found = results.current_run(name, script, out, train, threads)
    if found is None:
        return None
    metrics, samples = found
    return dict(model=name, test_nll_nats=metrics["test_nll_nats"], nll_kind=metrics["nll_kind"],
                train_seconds=metrics["train_seconds"], sample_seconds=metrics["sample_seconds"],
                train_cpu_seconds=metrics.get("train_cpu_seconds"), epochs=metrics["epochs_run"],
                best_epoch=metrics["best_epoch"], device=metrics["device"], current=results.is_current(metrics, script),
                **{k: metrics[k] for k in QUALITY_KEYS}, **{k: metrics.get(k) for k in EXTENDED_KEYS},
                sampler=metrics.get("sampling", {})), samples


QUALITY_KEYS = ("frechet_distance", "classifier_confidence", "class_coverage", "copy_rate")
# the spread over sample seeds of each averaged measure, and the number of draws (absent from earlier runs' metrics)
SPREAD_KEYS = tuple(f"{k}_seed_std" for k in quality.AVERAGED) + ("quality_draws", "first_draw")
EXTENDED_KEYS = ("frechet_distance_std", "frechet_distance_cnn", "frechet_distance_cnn_std", "c2st_accuracy",
                 "c2st_stderr", "precision", "recall", "density", "coverage") + SPREAD_KEYS


# -----------------------------------------------------------------------------
# the table and the picture


def fmt(value, digits=2):
    return "-" if value is None else f"{value:.{digits}f}"


def pm(value, spread, digits=2):
    """"9.66 +- 0.80", or the value alone when it has no spread."""
    return "-" if value is None else fmt(value, digits) + ("" if spread is None else f" +- {spread:.{digits}f}")


def seed_pm(row, key, digits=2):
    """A measure's mean over the draws of samples +- its standard deviation across their seeds."""
    return pm(row.get(key), row.get(f"{key}_seed_std"), digits)


def measures(row, num_real=447, num_samples=1000):
    """name -> (value, standard error, +1 if higher is better else -1) of every measure a row
    has: its test NLL and the sample-quality measures with their sampling noise. A mean over
    draws of samples has the standard error s.d. / sqrt(draws), the s.d. across the draws' seeds;
    a row without that spread (one draw) has the noise of one draw: the bootstrap s.d. of a
    Frechet distance, binomial errors of the fractions. The C2ST (first draw) has its own."""
    def binomial(p, n):
        return None if p is None else math.sqrt(p * (1 - p) / n)

    def noise(key, one_draw):
        spread, draws = row.get(f"{key}_seed_std"), row.get("quality_draws") or 1
        return spread / math.sqrt(draws) if spread is not None and draws > 1 else one_draw

    get = row.get
    averaged = {  # key: name, the noise of one draw, +1 if higher is better else -1
        "frechet_distance": ("Frechet (MLP)", get("frechet_distance_std"), -1),
        "frechet_distance_cnn": ("Frechet (CNN)", get("frechet_distance_cnn_std"), -1),
        "precision": ("precision", binomial(get("precision"), num_samples), +1),
        "recall": ("recall", binomial(get("recall"), num_real), +1),
        "coverage": ("coverage", binomial(get("coverage"), num_real), +1),
        "class_accuracy": ("class accuracy", binomial(get("class_accuracy"), num_samples), +1),
        "frechet_mean_over_classes": ("per-class Frechet", None, -1),
    }
    found = {"NLL": (get("test_nll_nats"), 0.0, -1), "C2ST": (get("c2st_accuracy"), get("c2st_stderr"), -1)}
    found.update({name: (get(key), noise(key, one_draw), sign) for key, (name, one_draw, sign) in averaged.items()})
    return {k: v for k, v in found.items() if v[0] is not None and v[1] is not None}


def verdict(row, baseline):
    """measure -> "better", "worse" or "within noise" than the baseline: a difference counts when
    it exceeds twice the standard error of the difference."""
    mine, theirs = measures(row), measures(baseline)
    result = {}
    for name in mine.keys() & theirs.keys():
        (a, sa, sign), (b, sb, _) = mine[name], theirs[name]
        gain = sign * (a - b)
        noise = 2 * math.sqrt(sa**2 + sb**2)
        result[name] = "better" if gain > noise else "worse" if gain < -noise else "within noise"
    return result


def headline(rows):
    """README's short table: each row's likelihood and sample quality, from the full leaderboard,
    sorted by the test NLL (lower is better; rows without one after, in the leaderboard's order)."""
    lines = ["| model | test NLL (nats/image, lower is better) | bits/dim | Frechet distance (mean of "
             f"{quality.QUALITY_DRAWS} draws +- s.d.) | precision | recall | train s |", "|---|---|---|---|---|---|---|"]
    ranked = sorted(rows, key=lambda r: (r["test_nll_nats"] is None, r["test_nll_nats"] or 0.0))
    for r in ranked:
        nll = r["test_nll_nats"]
        lines.append(f"| {r['model']}{'' if r.get('current', True) else ' (stale)'} | {fmt(nll, 2)} "
                     f"| {fmt(common.nats_to_bpd(nll) if nll is not None else None, 3)} "
                     f"| {seed_pm(r, 'frechet_distance')} | {fmt(r.get('precision'), 3)} | {fmt(r.get('recall'), 3)} "
                     f"| {fmt(r['train_seconds'], 0)} |")
    return "\n".join(lines) + "\n"


def markdown(rows, accuracy):
    lines = ["| model | test NLL (nats/image) | bits/dim | NLL kind | Frechet distance | copy rate "
             "| class coverage | confidence | epochs (best) | train s (CPU s) | s / 1000 samples | device |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        nll, cpu = r["test_nll_nats"], r.get("train_cpu_seconds")
        train = fmt(r["train_seconds"], 0) + ("" if cpu is None else f" ({cpu:.0f})")
        epochs = f"{r['epochs']} ({r['best_epoch']})" if r.get("epochs") else "-"
        lines.append(
            f"| {r['model']}{'' if r.get('current', True) else ' (stale)'} | {fmt(nll, 2)} "
            f"| {fmt(common.nats_to_bpd(nll) if nll is not None else None, 3)} | {r['nll_kind'] or '-'} "
            f"| {seed_pm(r, 'frechet_distance')} | {fmt(r['copy_rate'], 3)} | {fmt(r['class_coverage'], 3)} "
            f"| {fmt(r['classifier_confidence'], 3)} | {epochs} | {train} "
            f"| {fmt(r['sample_seconds'], 2)} | {r['device']} |")

    lines += ["", "| model | Frechet (MLP) | Frechet (CNN) | C2ST accuracy | precision | recall | density | coverage |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {seed_pm(r, 'frechet_distance')} | {seed_pm(r, 'frechet_distance_cnn')} "
            f"| {pm(r.get('c2st_accuracy'), r.get('c2st_stderr'), 3)} | {fmt(r.get('precision'), 3)} "
            f"| {fmt(r.get('recall'), 3)} | {fmt(r.get('density'), 3)} | {fmt(r.get('coverage'), 3)} |")
    by_name = {r["model"]: r for r in rows}
    gmm, indep = by_name["GaussianMixture"], by_name["Independent pixels"]
    deep = [r for r in rows if r["model"] in SCRIPTS]
    notes = [
        "",
        f"Frechet distance: to the 447 test digits, in the 32 features of a small MLP classifier trained "
        f"on the train split only (test accuracy {accuracy:.3f}); Frechet (CNN): the same in the 64 "
        f"features of a small convolutional classifier (another architecture and seed). {DRAWS_NOTE} "
        f"C2ST (the first draw): accuracy of an MLP trained "
        f"to tell 447 samples from the 447 test digits on one half, measured on the other (0.5: "
        f"indistinguishable; +- its standard error; the digits are stored writer by writer, so real val "
        f"digits score above 0.5 too). Precision, recall (Kynkaanniemi et al. 2019), density, coverage "
        f"(Naeem et al. 2020): k = 5 nearest-neighbour balls in the MLP's features; precision and density "
        f"read fidelity, recall and coverage diversity. Class coverage: entropy of the predicted-class "
        f"histogram (log 10 = 2.303 is uniform). Confidence: mean max class probability. Copy rate: "
        f"fraction of samples closer (L2) to a training digit than 99% of test digits are (test digits "
        f"score ~0.01 by construction). NLL kinds: exact, or an upper bound on the discrete NLL; "
        f"a uniform distribution over the 17 values scores {UNIFORM_NLL:.1f}.",
        "",
    ]
    worse_fd = [r["model"] for r in deep if r["frechet_distance"] >= indep["frechet_distance"]]
    notes.append("Every deep family has a lower Frechet distance than the independent-pixel baseline."
                 if deep and not worse_fd else
                 f"Not better than the independent-pixel baseline in Frechet distance: {', '.join(worse_fd)}.")
    return "\n".join(lines + notes + verdict_lines(deep, gmm, "GaussianMixture")) + "\n"


DRAWS_NOTE = (f"Every sample-quality measure but the C2ST is the mean over {quality.QUALITY_DRAWS} draws of 1000 "
              f"samples, each from its own sample seed (the first draw is the samples shown and written); +- the "
              f"standard deviation across the draws (the noise of one draw; the mean's standard error is it / "
              f"sqrt({quality.QUALITY_DRAWS})). The real val digits are one set: no spread.")


def verdict_lines(rows, baseline, name):
    """The measure-by-measure comparison of each row with the baseline row, and who does not beat it."""
    lines = ["", f"Against the {name}, measure by measure (better or worse: a difference beyond twice its "
                 f"standard error; a mean over draws of samples has the standard error s.d. / sqrt(draws)):", ""]
    no_beat = []
    for r in rows:
        judged = verdict(r, baseline)
        groups = {word: sorted(m for m, v in judged.items() if v == word) for word in ("better", "within noise", "worse")}
        lines.append(f"- {r['model']}: " + "; ".join(f"{word} on {', '.join(ms)}" for word, ms in groups.items() if ms))
        if groups["worse"] or groups["within noise"]:
            no_beat.append(f"{r['model']} ({', '.join(groups['worse'] + groups['within noise'])})")
    return lines + ["", f"Families that do not beat the {name} baseline on every measure: "
                    + (", ".join(no_beat) if no_beat else "none") + "."]


def caption(row):
    """The numbers printed over a leaderboard panel, from its row of the table."""
    nll, kind = row["test_nll_nats"], row["nll_kind"]
    first = ("real digits, no model" if row["model"].startswith("Real") else "no likelihood" if nll is None
             else f"NLL {nll:.2f} nats" + (" (bound)" if kind == "upper_bound" else f" ({kind})"))
    return [first, f"Frechet {fmt(row['frechet_distance'])}"]


CAPTION_NOTE = ("NLL: test negative log-likelihood in nats per image (lower is better; a bound is an upper bound). "
                "Frechet: distance of the samples to the test digits in a digit classifier's features "
                "(lower is better).")


def conditional_caption(row):
    """The numbers printed over a conditional panel, from its row of the table."""
    per_class = row.get("frechet_mean_over_classes")
    return [f"class accuracy {fmt(row['class_accuracy'], 3)}"] + (
        [] if per_class is None else [f"per-class Frechet {per_class:.2f}"])


CONDITIONAL_NOTE = ("Row c of each grid: samples asked for class c. Class accuracy: the fraction a digit classifier "
                    "assigns to the class asked for (higher is better). Per-class Frechet: mean over the classes "
                    "of the distance to that class's test digits (lower is better).")


def picture(panels, path, nrow=8, count=64, row_labels=(), note=""):
    """Each panel's first `count` samples in a grid of rows of `nrow`, five panels to a row; over
    a grid its name and its numbers, at its left `row_labels` (one per grid row), under the whole
    picture `note`. panels: (name, samples (N, 64), lines of numbers)."""
    from PIL import Image, ImageDraw, ImageFont

    font, line, scale, gap, per_row = ImageFont.load_default(size=13), 16, 3, 14, 5  # size=: Pillow >= 10.1
    margin = 14 if row_labels else 0
    tiles = []
    for name, samples, lines in panels:
        grid = files.image_grid(torch.from_numpy(samples[:count]), nrow=nrow, scale=scale)
        top = line * (1 + len(lines)) + 3
        tile = Image.new("L", (margin + grid.shape[1], top + grid.shape[0]), 255)
        tile.paste(Image.fromarray(grid), (margin, top))
        draw = ImageDraw.Draw(tile)
        for k, text in enumerate([name, *lines]):
            draw.text((margin, k * line), text, fill=0 if k == 0 else 60, font=font)
        for r, label in enumerate(row_labels):  # the grid's row r: 1 pixel of padding, then 8 pixels
            draw.text((margin // 2, top + (9 * r + 5) * scale), label, fill=0, font=font, anchor="mm")
        tiles.append(tile)
    rows = [tiles[i:i + per_row] for i in range(0, len(tiles), per_row)]
    width = max(sum(t.width + gap for t in row) for row in rows)
    heights = [max(t.height for t in row) + gap for row in rows]
    notes = textwrap.wrap(note, width // 7) if note else []  # ~7 pixels a character at size 13
    canvas = Image.new("L", (width, sum(heights) + line * len(notes) + 4), 255)
    draw = ImageDraw.Draw(canvas)
    for row, top in zip(rows, np.cumsum([0, *heights])):
        left = 0
        for tile in row:
            canvas.paste(tile, (left, int(top)))
            left += tile.width + gap
    for k, text in enumerate(notes):
        draw.text((0, sum(heights) + k * line), text, fill=0, font=font)
    files.save_image(path, np.asarray(canvas))


def conditional_board(out, train, threads, seed):
    """Every family's --conditional run beside a per-class GaussianMixture and the real val digits:
    OUT/conditional.md, .json and .png."""
    pixels, classes = common.load_digits_arrays()
    splits, labels = common.split_arrays(pixels.astype(np.float64)), common.split_arrays(classes)
    rows, panels = [], []
    for name, script in SCRIPTS.items():
        found = results.current_run(name, script, out, train, threads, ("--conditional",), keys=CONDITIONAL_KEYS)
        if found is None:
            print(f"leaderboard: no conditional run of {name}; skipped", file=sys.stderr)
            continue
        metrics, (x, y) = found
        rows.append(dict(model=name, current=results.is_current(metrics, script, ("--conditional",)),
                         **{k: metrics.get(k) for k in (*CONDITIONAL_KEYS, *CONDITIONAL_SPREAD)},
                         generative_classifier_accuracy=metrics.get("generative_classifier_accuracy"),
                         train_cpu_seconds=metrics.get("train_cpu_seconds"), sampling=metrics.get("sampling")))
        panels.append((name, x, y))
    files.keep_table(out / "conditional.md", rows)
    nll, predicted, draws, y, fit_seconds, sample_seconds = conditional_gaussian_mixture(splits, labels, 100, seed)
    scores = quality.averaged_conditional_quality(draws, y, out)
    rows.append(dict(model="GaussianMixture per class", current=True, test_nll_nats=nll, nll_kind="upper_bound",
                     train_seconds=fit_seconds, sample_seconds=sample_seconds, epochs_run=None,
                     generative_classifier_accuracy=float((predicted == labels["test"]).mean()),
                     **{k: scores[k] for k in (*CONDITIONAL_QUALITY, *CONDITIONAL_SPREAD)}))
    panels.append(("GMM per class", draws[0], y))
    real_x, real_y = splits["val"].astype(np.float32), labels["val"]
    real = quality.averaged_conditional_quality([real_x], real_y, out)
    rows.append(dict(model="Real digits (val split)", current=True, test_nll_nats=None, nll_kind=None,
                     train_seconds=None, sample_seconds=None, epochs_run=None, generative_classifier_accuracy=None,
                     **{k: real[k] for k in (*CONDITIONAL_QUALITY, *CONDITIONAL_SPREAD)}))
    order = np.argsort(real_y, kind="stable")
    panels.append(("Real (val)", real_x[order], real_y[order]))
    table = conditional_markdown(rows, real["classifier_test_accuracy"])
    with processes.SIGNALS.held():
        files.write_table(out / "conditional.md", table)
        files.save_json(out / "conditional.json", rows)
        picture([(name, _class_rows(x, y), conditional_caption(row)) for (name, x, y), row in zip(panels, rows)],
                out / "conditional.png", nrow=10, count=100, row_labels=[str(c) for c in range(common.NUM_CLASSES)],
                note=CONDITIONAL_NOTE)
    processes.emit(table)


CONDITIONAL_QUALITY = ("class_accuracy", "frechet_mean_over_classes", "frechet_worst", "frechet_worst_class",
                       "copy_rate", "frechet_distance")
CONDITIONAL_KEYS = dict(test_nll_nats="number?", nll_kind="str?", train_seconds="number", sample_seconds="number",
                        epochs_run="int", class_accuracy="number", frechet_mean_over_classes="number",
                        frechet_worst="number", frechet_worst_class="int", copy_rate="number",
                        frechet_distance="number")
# the spread over sample seeds of the conditional table's means (absent from earlier runs' metrics)
CONDITIONAL_SPREAD = tuple(f"{k}_seed_std" for k in ("class_accuracy", "frechet_mean_over_classes", "frechet_distance",
                                                     "copy_rate")) + ("quality_draws",)


def _class_rows(x, y, per_class=10):
    """The first `per_class` samples of each class, class by class: row c of a 10-wide grid is class c."""
    return np.concatenate([x[y == c][:per_class] for c in np.unique(y)])


def conditional_markdown(rows, accuracy):
    lines = ["| model | class accuracy | per-class Frechet, mean | worst (class) | Frechet, all | copy rate "
             "| test NLL -log p(x \\| y) | NLL kind | generative classifier accuracy | train s | s / 1000 samples |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        worst = "-" if r["frechet_worst"] is None else f"{r['frechet_worst']:.2f} ({r['frechet_worst_class']})"
        lines.append(
            f"| {r['model']}{'' if r['current'] else ' (stale)'} | {seed_pm(r, 'class_accuracy', 3)} "
            f"| {seed_pm(r, 'frechet_mean_over_classes')} | {worst} | {seed_pm(r, 'frechet_distance')} "
            f"| {fmt(r['copy_rate'], 3)} | {fmt(r['test_nll_nats'])} | {r['nll_kind'] or '-'} "
            f"| {fmt(r['generative_classifier_accuracy'], 3)} | {fmt(r['train_seconds'], 0)} "
            f"| {fmt(r['sample_seconds'], 2)} |")
    deep = [r for r in rows if r["model"] in SCRIPTS]
    short = [r["model"] for r in deep if r["class_accuracy"] < 0.95]
    lines += [
        "",
        f"Class accuracy: the fraction of 1000 samples (100 per class) that the digit classifier (an MLP "
        f"trained on the train split, test accuracy {accuracy:.3f}) assigns to the class asked for; for the "
        f"real val digits, its accuracy on them. Per-class Frechet: each class's samples against that class's "
        f"~45 test digits in the classifier's 32 features (for the last row the val digits of each class), the mean over the ten "
        f"classes and the worst class; small reference sets make these larger than the pooled Frechet "
        f"distance (all samples against all 447 test digits). Copy rate as on the leaderboard. Test NLL: "
        f"-log p(x | y) in nats per image with the true class. Generative classifier: argmax_y log p(x | y) "
        f"+ log p(y), p(y) the train split's class frequencies, on the 447 test digits (a bound where the "
        f"family has one: see each family's class_log_likelihoods); the discriminative MLP scores "
        f"{accuracy:.3f}. Class accuracy, the Frechet distances and copy rate are means over "
        f"{quality.QUALITY_DRAWS} draws of 1000 samples, each from its own sample seed (the grid shows the "
        f"first); +- the standard deviation across the draws; the real val digits are one set.",
        "",
        "Every family's class accuracy is at least 0.95." if deep and not short else
        f"Class accuracy below 0.95: {', '.join(short)}." if deep else "No conditional runs found.",
    ]
    baseline = next((r for r in rows if r["model"] == "GaussianMixture per class"), None)
    if deep and baseline:
        lines += verdict_lines(deep, baseline, "GaussianMixture per class")
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# seeds: does a result rest on one lucky seed?


def seed_table(out, seeds, train, threads):
    """Every family's default run with each seed (seed 0 is the leaderboard's run in OUT, the
    others in OUT/seeds/seedN, scored with OUT's digit classifier): test NLL and Frechet distance
    per seed, their mean and standard deviation. Writes OUT/seeds.md and OUT/seeds.json."""
    rows = []
    for name, script in SCRIPTS.items():
        per_seed = []
        for seed in seeds:
            folder = out if seed == 0 else out / "seeds" / f"seed{seed}"
            if seed and (out / "_digit_classifier.pt").is_file() and not (folder / "_digit_classifier.pt").is_file():
                folder.mkdir(parents=True, exist_ok=True)
                files.copy_file(out / "_digit_classifier.pt", folder / "_digit_classifier.pt")
            flags = ("--seed", str(seed)) if seed else ()
            metrics = results.current_metrics(name, script, folder, train, threads, flags)
            if metrics is None:
                print(f"leaderboard: no seed {seed} run of {name}; skipped", file=sys.stderr)
                continue
            per_seed.append(dict(seed=seed, test_nll_nats=metrics["test_nll_nats"], nll_kind=metrics["nll_kind"],
                                 current=results.is_current(metrics, script, flags),
                                 frechet_distance=metrics["frechet_distance"], train_seconds=metrics["train_seconds"],
                                 epochs=metrics["epochs_run"]))
        if per_seed:
            rows.append(dict(model=name, nll_kind=per_seed[-1]["nll_kind"], runs=per_seed,
                             **{f"{key}_{stat}": value for key in ("test_nll_nats", "frechet_distance")
                                for stat, value in zip(("mean", "std"),
                                                       quality.mean_std([r[key] for r in per_seed]))}))
    files.keep_table(out / "seeds.md", rows)
    lines = [f"| model | NLL kind | test NLL, seeds {', '.join(map(str, seeds))} | mean +- std "
             f"| Frechet distance, seeds {', '.join(map(str, seeds))} | mean +- std | train s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        stale = "" if all(run["current"] for run in r["runs"]) else " (stale)"
        nlls = ", ".join(fmt(run["test_nll_nats"]) for run in r["runs"])
        fds = ", ".join(fmt(run["frechet_distance"]) for run in r["runs"])
        seconds = ", ".join(f"{run['train_seconds']:.0f}" for run in r["runs"])
        lines.append(f"| {r['model']}{stale} | {r['nll_kind'] or '-'} | {nlls} "
                     f"| {pm(r['test_nll_nats_mean'], r['test_nll_nats_std'])} | {fds} "
                     f"| {pm(r['frechet_distance_mean'], r['frechet_distance_std'])} | {seconds} |")
    lines += ["", "Standard deviation over the seeds (n - 1 in the denominator). Each run trains with its "
              "seed and draws its samples with it; the Frechet distance uses the same classifier for all."]
    table = "\n".join(lines) + "\n"
    with processes.SIGNALS.held():
        files.write_table(out / "seeds.md", table)
        files.save_json(out / "seeds.json", dict(seeds=list(seeds), rows=rows))
    processes.emit(table)



def main(argv=None):
    parser = runs.Parser(prog="leaderboard.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None,
                        help="folder of the model runs and of the leaderboard (default: the project's "
                             "results/; a relative path is taken from the current directory)")
    parser.add_argument("--no-train", action="store_true",
                        help="do not run model scripts; use only the metrics already in --out")
    parser.add_argument("--threads", type=runs.threads_flag, default=None, metavar="N|auto", help=results.THREADS_HELP)
    parser.add_argument("--seed", type=common.nonnegative_int, default=0, help="baselines' seed (default 0)")
    parser.add_argument("--conditional", action="store_true",
                        help="only the conditional table: every family's --conditional run (trained when "
                             "missing), written to OUT/conditional.md")
    parser.add_argument("--seeds", type=common.seed_int, nargs="+", default=None, metavar="SEED",
                        help="only the seed table: every family's default run with each seed (e.g. 0 1 2), "
                             "written to OUT/seeds.md; seeds other than 0 run in OUT/seeds/seedN")
    args = parser.parse_args(argv)
    out = results.out_folder(args.out)
    processes.tool("leaderboard.py", lambda: leaderboard(args, out),
         "a model run it started was stopped and its files discarded; the files in --out are whole")


def leaderboard(args, out):
    processes.claim_out(out, "leaderboard.py")
    args.threads = args.threads or runs.auto_threads()
    torch.set_num_threads(args.threads)
    if args.seeds is not None:
        seed_table(out, list(dict.fromkeys(args.seeds)), not args.no_train, args.threads)
        return
    if args.conditional:
        conditional_board(out, not args.no_train, args.threads, args.seed)
        return

    pixels, _ = common.load_digits_arrays()
    splits = common.split_arrays(pixels.astype(np.float64))
    rows, panels = [], []
    for name, script in SCRIPTS.items():
        result = model_row(name, script, out, not args.no_train, args.threads)
        if result is None:
            print(f"leaderboard: no results for {name}; skipped", file=sys.stderr)
            continue
        rows.append(result[0])
        panels.append((name, result[1]))
    files.keep_table(out / "leaderboard.md", rows)
    baselines = (("Independent pixels", independent_categorical),
                 ("GaussianMixture", gaussian_mixture), ("KernelDensity", kernel_density))
    for name, fit in baselines:
        nll, kind, draws, fit_seconds, sample_seconds, *chosen = fit(splits, 1000, args.seed)
        scores = quality.averaged_quality(draws, out)
        rows.append(dict(model=name, test_nll_nats=nll, nll_kind=kind, train_seconds=fit_seconds,
                         sample_seconds=sample_seconds, device="cpu", chosen=(chosen or [{}])[0],
                         **{k: scores.get(k) for k in QUALITY_KEYS + EXTENDED_KEYS}))
        panels.append((name, draws[0]))
    real = quality.averaged_quality([splits["val"]], out)
    rows.append(dict(model="Real digits (val split)", test_nll_nats=None, nll_kind=None,
                     train_seconds=None, sample_seconds=None, device="-",
                     **{k: real.get(k) for k in QUALITY_KEYS + EXTENDED_KEYS}))
    panels.append(("Real (val)", splits["val"].astype(np.float32)))

    table = markdown(rows, real["classifier_test_accuracy"])
    with processes.SIGNALS.held():  # the four files and the pages' copies complete, then a signal's exit 130
        files.write_table(out / "leaderboard.md", table)
        files.write_table(out / "headline.md", headline(rows))
        files.save_json(out / "leaderboard.json", rows)
        picture([(name, samples, caption(row)) for (name, samples), row in zip(panels, rows)],
                out / "leaderboard.png", note=CAPTION_NOTE)
    processes.emit(table)


if __name__ == "__main__":
    main()
