"""Leaderboard: every family of this collection and three classical baselines, scored the same
way on the same held-out test split of 8x8 Digits.

Columns: test NLL (nats per image on the discrete 0..16 pixels, and bits/dim) where a likelihood
or a bound exists, and for everyone the sample-quality numbers of common.sample_quality: the
Frechet distance to the test split in a small digit classifier's features, the classifier's
confidence, class coverage (entropy of the predicted classes; log 10 = 2.303 is uniform) and the
copy rate (fraction of samples closer to a training image than 99% of test images are).

Each model script runs with its default flags, unless OUT/NAME_metrics.json already comes from a
default run of the current code (same sha256 of the script and common.py), which is reused.
The baselines are fitted on the train split with scikit-learn, their hyper-parameters chosen on
the validation split:
- per-pixel independent categorical (add-0.5 smoothing): exact NLL;
- GaussianMixture (full covariance) and KernelDensity (gaussian) on uniformly dequantized
  pixels x + u: NLL upper bounds E_u[-log p(x + u)].

Run:  python leaderboard.py                 # trains what is missing, then writes the table
      python leaderboard.py --no-train      # only what is already in results/
      python leaderboard.py --seeds 0 1 2   # every family with three seeds: results/seeds.md
Writes OUT/leaderboard.md, OUT/leaderboard.json and OUT/leaderboard.png. Run it on an otherwise
idle machine; the speed of every family is benchmark.py's.
"""

import argparse
import json
import shutil
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import common

SCRIPTS = {  # family -> script, in the order of the table
    "ARM": "autoregressive_model.py",
    "RealNVP": "flow_based_model_realnvp.py",
    "EBM": "energy_based_model.py",
    "ScM": "score_matching.py",
    "SBGM": "score_based_generative_model.py",
    "DDPM": "ddpm.py",
    "VAE": "variational_autoencoder.py",
    "GAN": "generative_adversarial_network.py",
    "FM": "flow_matching.py",
}
ROOT = Path(__file__).resolve().parent
UNIFORM_NLL = common.NUM_PIXELS * math.log(common.NUM_LEVELS)  # 181.3 nats

# -----------------------------------------------------------------------------
# classical baselines, each returning (test NLL, NLL kind, samples (N, 64) on 0..16, seconds)


def independent_categorical(splits, num_samples, seed):
    """p(x) = prod_i p_i(x_i), each p_i a categorical over 0..16 with add-0.5 smoothing."""
    start = time.perf_counter()
    log_probs = common.independent_pixel_log_probs(splits["train"])  # (64, 17)
    test = splits["test"].astype(int)
    nll = -log_probs[np.arange(64), test].sum(1).mean()
    probs = np.exp(log_probs)
    fit_seconds = time.perf_counter() - start
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    cdf = probs.cumsum(1)
    samples = (rng.random((num_samples, 64, 1)) > cdf[None]).sum(2).clip(0, common.PIXEL_MAX)
    return float(nll), "exact", samples.astype(np.float32), fit_seconds, time.perf_counter() - start


def _dequantized_bound(score_samples, x, seed, draws):
    """E_u[-log p(x + u)] over `draws` dequantization draws, nats per image."""
    rng = np.random.default_rng(seed)
    return float(np.mean([-score_samples(x + rng.random(x.shape)).mean() for _ in range(draws)]))


def _fit_on_val(make, splits, grid, seed, draws):
    """Fit make(h) on dequantized train for each h in grid; keep the best on val."""
    rng = np.random.default_rng(seed)
    train = splits["train"] + rng.random(splits["train"].shape)
    best = None
    for h in grid:
        model = make(h).fit(train)
        val = _dequantized_bound(model.score_samples, splits["val"], seed + 1, draws)
        if best is None or val < best[0]:
            best = (val, h, model)
    return best


def _continuous_samples_to_pixels(v):
    """A sample of v = x + u in [0, 17)^64 gives the pixel x = floor(v) (clipped to 0..16)."""
    return np.floor(v).clip(0, common.PIXEL_MAX).astype(np.float32)


def gaussian_mixture(splits, num_samples, seed, ks=(5, 10, 20, 40), draws=5):
    from sklearn.mixture import GaussianMixture

    start = time.perf_counter()
    _, k, model = _fit_on_val(lambda k: GaussianMixture(k, covariance_type="full", reg_covar=1e-3,
                                                        random_state=seed), splits, ks, seed, draws)
    nll = _dequantized_bound(model.score_samples, splits["test"], seed + 2, draws)
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    model.random_state = seed
    samples = _continuous_samples_to_pixels(model.sample(num_samples)[0])
    samples = samples[np.random.default_rng(seed).permutation(num_samples)]  # sklearn sorts them by component
    return nll, "upper_bound", samples, fit_seconds, time.perf_counter() - start, dict(k=k)


def kernel_density(splits, num_samples, seed, bandwidths=(1.0, 1.5, 2.0, 2.5, 3.0), draws=5):
    from sklearn.neighbors import KernelDensity

    start = time.perf_counter()
    _, bandwidth, model = _fit_on_val(lambda h: KernelDensity(bandwidth=h), splits, bandwidths, seed, draws)
    nll = _dequantized_bound(model.score_samples, splits["test"], seed + 2, draws)
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    samples = _continuous_samples_to_pixels(model.sample(num_samples, random_state=seed))
    return nll, "upper_bound", samples, fit_seconds, time.perf_counter() - start, dict(bandwidth=bandwidth)


# -----------------------------------------------------------------------------
# model runs


def is_current(metrics, script, flags=()):
    """A metrics file counts when it comes from a finished default run of the current code (with
    `flags`, e.g. ("--seed", "1"), and nothing else that changes results)."""
    return (metrics.get("code_sha256") == common.code_fingerprint(ROOT / script)
            and not metrics.get("quick") and not metrics.get("interrupted")
            and metrics.get("stopped") != "non_finite"
            and _result_flags(metrics.get("argv", ["?"])) == list(flags))


def _result_flags(argv):
    """argv without the flags that don't change results (--no-progress, --out DIR, --threads N,
    --checkpoint-seconds S)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--out", "--threads", "--checkpoint-seconds"):
            skip = True
        elif arg != "--no-progress" and not arg.startswith(("--out=", "--threads=", "--checkpoint-seconds=")):
            kept.append(arg)
    return kept


def current_metrics(name, script, out, train, threads, flags=()):
    """OUT/NAME_metrics.json of the default run (plus `flags`), made first when it is missing or
    stale and train is set; None when there is none."""
    path = out / f"{name}_metrics.json"
    metrics = json.loads(path.read_text()) if path.is_file() else None
    if (metrics is None or not is_current(metrics, script, flags)) and train and (ROOT / script).is_file():
        print(f"leaderboard: training {name} with its defaults {' '.join(flags)} ({script})", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, str(ROOT / script), "--no-progress", "--threads", str(threads),
                   "--out", str(out), *flags]
        if subprocess.run(command, cwd=ROOT).returncode == 0:
            metrics = json.loads(path.read_text())
    return metrics


def model_row(name, script, out, train, threads):
    metrics = current_metrics(name, script, out, train, threads)
    if metrics is None:
        return None
    samples = np.load(out / f"{name}_samples.npy")
    return dict(model=name, test_nll_nats=metrics["test_nll_nats"], nll_kind=metrics["nll_kind"],
                train_seconds=metrics["train_seconds"], sample_seconds=metrics["sample_seconds"],
                train_cpu_seconds=metrics.get("train_cpu_seconds"),
                device=metrics["device"], current=is_current(metrics, script),
                **{k: metrics[k] for k in QUALITY_KEYS}), samples


QUALITY_KEYS = ("frechet_distance", "classifier_confidence", "class_coverage", "copy_rate")

# -----------------------------------------------------------------------------
# the table and the picture


def fmt(value, digits=2):
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(rows, accuracy):
    lines = ["| model | test NLL (nats/image) | bits/dim | NLL kind | Frechet distance | confidence "
             "| coverage | copy rate | train s (CPU s) | s / 1000 samples | device |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        nll, cpu = r["test_nll_nats"], r.get("train_cpu_seconds")
        train = fmt(r["train_seconds"], 0) + ("" if cpu is None else f" ({cpu:.0f})")
        lines.append(
            f"| {r['model']}{'' if r.get('current', True) else ' (stale)'} | {fmt(nll, 1)} "
            f"| {fmt(common.nats_to_bpd(nll) if nll is not None else None, 3)} | {r['nll_kind'] or '-'} "
            f"| {fmt(r['frechet_distance'])} | {fmt(r['classifier_confidence'], 3)} "
            f"| {fmt(r['class_coverage'], 3)} | {fmt(r['copy_rate'], 3)} | {train} "
            f"| {fmt(r['sample_seconds'], 2)} | {r['device']} |")
    by_name = {r["model"]: r for r in rows}
    gmm, indep = by_name["GaussianMixture"], by_name["Independent pixels"]
    deep = [r for r in rows if r["model"] in SCRIPTS]
    notes = [
        "",
        f"Frechet distance: to the 447 test digits, in the 32 features of a small MLP classifier trained "
        f"on the train split only (test accuracy {accuracy:.3f}). Confidence: mean max class probability. "
        f"Coverage: entropy of the predicted-class histogram (log 10 = 2.303 is uniform). Copy rate: "
        f"fraction of samples closer (L2) to a training digit than 99% of test digits are (test digits "
        f"score ~0.01 by construction). NLL kinds: exact, or an upper bound on the discrete NLL; "
        f"a uniform distribution over the 17 values scores {UNIFORM_NLL:.1f}.",
        "",
    ]
    worse_fd = [r["model"] for r in deep if r["frechet_distance"] >= indep["frechet_distance"]]
    notes.append("Every deep family has a lower Frechet distance than the independent-pixel baseline."
                 if deep and not worse_fd else
                 f"Not better than the independent-pixel baseline in Frechet distance: {', '.join(worse_fd)}.")
    no_beat = []
    for r in deep:
        fd_worse = r["frechet_distance"] >= gmm["frechet_distance"]
        nll_worse = r["test_nll_nats"] is not None and r["test_nll_nats"] >= gmm["test_nll_nats"]
        if fd_worse or nll_worse:
            what = " and ".join(w for w, bad in (("Frechet distance", fd_worse), ("test NLL", nll_worse)) if bad)
            no_beat.append(f"{r['model']} ({what})")
    notes.append("Families that do not beat the GaussianMixture baseline: "
                 + (", ".join(no_beat) if no_beat else "none") + ".")
    return "\n".join(lines + notes) + "\n"


def picture(panels, path):
    """One 8x8 grid of 64 samples per family, side by side, each labelled."""
    images = [common.labelled(common.image_grid(torch.from_numpy(s[:64]), scale=3), name)
              for name, s in panels]
    height = max(i.shape[0] for i in images)
    gap = np.full((height, 8), 255, np.uint8)
    columns = []
    for image in images:
        padded = np.full((height, image.shape[1]), 255, np.uint8)
        padded[: image.shape[0]] = image
        columns += [padded, gap]
    per_row = 5
    rows = [np.concatenate(columns[2 * i: 2 * (i + per_row)], 1) for i in range(0, len(images), per_row)]
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 8), (0, width - r.shape[1])), constant_values=255) for r in rows]
    common.save_image(path, np.concatenate(rows, 0))


# -----------------------------------------------------------------------------
# seeds: does a result rest on one lucky seed?


def seed_table(out, seeds, train, threads):
    """Every family's default run with each seed (seed 0 is the leaderboard's run in OUT, the
    others in OUT/seeds/seedN, scored with OUT's digit classifier): test NLL and Frechet distance
    per seed, their mean and standard deviation. Writes OUT/seeds.md and OUT/seeds.json."""
    rows = []
    for name, script in SCRIPTS.items():
        runs = []
        for seed in seeds:
            folder = out if seed == 0 else out / "seeds" / f"seed{seed}"
            if seed and (out / "_digit_classifier.pt").is_file() and not (folder / "_digit_classifier.pt").is_file():
                folder.mkdir(parents=True, exist_ok=True)
                shutil.copy(out / "_digit_classifier.pt", folder)
            flags = ("--seed", str(seed)) if seed else ()
            metrics = current_metrics(name, script, folder, train, threads, flags)
            if metrics is None:
                print(f"leaderboard: no seed {seed} run of {name}; skipped", file=sys.stderr)
                continue
            runs.append(dict(seed=seed, test_nll_nats=metrics["test_nll_nats"], current=is_current(metrics, script, flags),
                             frechet_distance=metrics["frechet_distance"], train_seconds=metrics["train_seconds"],
                             epochs=metrics["epochs_run"]))
        if runs:
            rows.append(dict(model=name, nll_kind=metrics["nll_kind"], runs=runs,
                             **{f"{key}_{stat}": value for key in ("test_nll_nats", "frechet_distance")
                                for stat, value in zip(("mean", "std"), mean_std([r[key] for r in runs]))}))
    lines = [f"| model | NLL kind | test NLL, seeds {', '.join(map(str, seeds))} | mean +- std "
             f"| Frechet distance, seeds {', '.join(map(str, seeds))} | mean +- std | train s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        stale = "" if all(run["current"] for run in r["runs"]) else " (stale)"
        nlls = ", ".join(fmt(run["test_nll_nats"]) for run in r["runs"])
        fds = ", ".join(fmt(run["frechet_distance"]) for run in r["runs"])
        seconds = ", ".join(f"{run['train_seconds']:.0f}" for run in r["runs"])
        nll_stat = ("-" if r["test_nll_nats_mean"] is None
                    else f"{r['test_nll_nats_mean']:.2f} +- {r['test_nll_nats_std']:.2f}")
        lines.append(f"| {r['model']}{stale} | {r['nll_kind'] or '-'} | {nlls} | {nll_stat} | {fds} "
                     f"| {r['frechet_distance_mean']:.2f} +- {r['frechet_distance_std']:.2f} | {seconds} |")
    lines += ["", "Standard deviation over the seeds (n - 1 in the denominator). Each run trains with its "
              "seed and draws its samples with it; the Frechet distance uses the same classifier for all."]
    table = "\n".join(lines) + "\n"
    common.atomic_write(out / "seeds.md", lambda tmp: tmp.write_text(table))
    common.save_json(out / "seeds.json", dict(seeds=list(seeds), rows=rows))
    print(table)


def mean_std(values):
    """(mean, sample standard deviation) of floats; (None, None) when any is None."""
    if any(v is None for v in values):
        return None, None
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def main(argv=None):
    parser = common.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("results"),
                        help="folder of the model runs and of the leaderboard (default %(default)s)")
    parser.add_argument("--no-train", action="store_true",
                        help="do not run model scripts; use only the metrics already in --out")
    parser.add_argument("--threads", type=common.positive_int, default=common.DEFAULT_THREADS,
                        help="CPU threads for the model runs (default %(default)s)")
    parser.add_argument("--seed", type=common.nonnegative_int, default=0, help="baselines' seed (default 0)")
    parser.add_argument("--seeds", type=common.seed_int, nargs="+", default=None, metavar="SEED",
                        help="only the seed table: every family's default run with each seed (e.g. 0 1 2), "
                             "written to OUT/seeds.md; seeds other than 0 run in OUT/seeds/seedN")
    args = parser.parse_args(argv)
    out = args.out if args.out.is_absolute() else ROOT / args.out
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    if args.seeds is not None:
        seed_table(out, list(dict.fromkeys(args.seeds)), not args.no_train, args.threads)
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
    baselines = (("Independent pixels", independent_categorical),
                 ("GaussianMixture", gaussian_mixture), ("KernelDensity", kernel_density))
    for name, fit in baselines:
        nll, kind, samples, fit_seconds, sample_seconds, *chosen = fit(splits, 1000, args.seed)
        quality = common.sample_quality(samples, out)
        rows.append(dict(model=name, test_nll_nats=nll, nll_kind=kind, train_seconds=fit_seconds,
                         sample_seconds=sample_seconds, device="cpu", chosen=(chosen or [{}])[0],
                         **{k: quality[k] for k in QUALITY_KEYS}))
        panels.append((name, samples))
    real = common.sample_quality(splits["val"], out)
    rows.append(dict(model="Real digits (val split)", test_nll_nats=None, nll_kind=None,
                     train_seconds=None, sample_seconds=None, device="-",
                     **{k: real[k] for k in QUALITY_KEYS}))
    panels.append(("Real (val)", splits["val"].astype(np.float32)))

    table = markdown(rows, real["classifier_test_accuracy"])
    common.atomic_write(out / "leaderboard.md", lambda tmp: tmp.write_text(table))
    common.save_json(out / "leaderboard.json", rows)
    picture(panels, out / "leaderboard.png")
    print(table)


if __name__ == "__main__":
    main()
