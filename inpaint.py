"""Inpainting: complete half-hidden test digits with every trained family of this collection, the
third use of a learned p(x) after sampling and out-of-distribution detection (ood.py).

Each of the 447 test digits is shown with some pixels hidden (True = missing in a mask) and each
family fills them in by drawing from its own p(x_missing | x_observed); the observed pixels are
kept exactly (checked on every completion). Masks: the bottom, top, left and right halves, the
centre 4 x 4, and 50% and 75% of the pixels at random (32 or 48 of the 64, a different seeded set
for every digit); `--extra-mask FILE.npy` adds a (64,) boolean mask for every digit, or (N, 64)
whose row i mod N hides the pixels of test digit i.

How each family completes (its `complete` method, in its own script; a family whose `complete`
raises NotImplementedError is named in one line and left out):
- ARM: exact ancestral sampling where every missing pixel follows every observed one in raster
  order (the bottom half), the observed pixels fed in as they come, and the exact NLL of the
  missing pixels; for other masks sampling-importance-resampling over 8 such passes, weighted by
  the exact conditionals of the observed pixels (van den Oord et al. 2016; Rubin 1988).
- RealNVP: Langevin dynamics on the flow's exact log-density over the missing pixels (Dinh et al.
  2017). ScM: annealed Langevin with the observed pixels clamped to the data noised to each level
  (Song & Ermon 2019). SBGM, FM: the reverse SDE / the ODE with the observed pixels replaced, at
  every step, by the data noised to that time (Song et al. 2021); DDPM: the same, with RePaint's
  resampling (Lugmayr et al. 2022).
- EBM: its short-run SGLD chain on the energy E(x) from noise on the missing pixels, the observed
  ones clamped (Nijkamp et al. 2019).
- MDM: its own any-order conditional (masked_diffusion.py).
- VAE: Metropolis-within-Gibbs over (z, x_missing) (Mattei & Frellsen 2018).
- GAN: the latent z optimised so that G(z) matches the observed pixels, then G(z)'s pixels
  (Yeh et al. 2017).
- Baselines: a GaussianMixture on dequantized pixels with exact Gaussian conditioning (k chosen
  on the validation split, as in leaderboard.py), the nearest training digit on the observed
  pixels (deterministic), independent pixels (each missing pixel from its own categorical).

Metrics per (model, mask), one completion per test digit: accuracy of the project's digit
classifier (quality.digit_classifier) on the completed digits against their true labels; mean
squared error on the missing pixels (pixel units^2); -log p(x_missing | x_observed) of the true
missing pixels in nats where the model gives it (or an upper bound); diversity, the mean pairwise
L2 distance (pixels) between 4 completions of the same input (over the first `--diversity-digits`
test digits); seconds of wall time.

Uses the trained weights OUT/NAME.pt of every family (shipped in results/), trains a family with
its defaults only when its weights are missing (never with --no-train), and skips a family whose
weights do not load, with a one-line note.

Run:  python inpaint.py                    # writes results/inpaint.md, .json, .png, _completions.npz
      python inpaint.py --models ARM VAE --masks bottom random75 --no-train
      python inpaint.py --extra-mask my_mask.npy
      python inpaint.py --help
"""

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

import common
import plumbing
from plumbing import baselines, files, processes, quality, registry, results, runs

SIDE = 8
COPIES = 4  # completions of the same input for the diversity
MASK_DESCRIPTIONS = dict(
    bottom="rows 4-7 missing", top="rows 0-3 missing", left="columns 0-3 missing", right="columns 4-7 missing",
    centre="the central 4 x 4 missing", random50="32 of 64 pixels missing, seeded per digit",
    random75="48 of 64 pixels missing, seeded per digit")
MASK_NAMES = tuple(MASK_DESCRIPTIONS)
BASELINES = ("GaussianMixture", "Nearest neighbour", "Independent pixels")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,39}")

# -----------------------------------------------------------------------------
# masks: (N, 64) bool, True = missing


def block_mask(rows, columns):
    """(64,) bool, True on the pixels (r, c) with r in rows and c in columns."""
    mask = np.zeros((SIDE, SIDE), bool)
    mask[np.ix_(list(rows), list(columns))] = True
    return mask.reshape(-1)


def random_masks(n, missing_count, seed, name):
    """(n, 64) bool: for each image its own seeded set of `missing_count` missing pixels."""
    rng = np.random.default_rng([seed, sum(ord(c) * 31**i for i, c in enumerate(name)) % 2**31])
    order = np.argsort(rng.random((n, common.NUM_PIXELS)), axis=1)  # a random permutation per image
    masks = np.zeros((n, common.NUM_PIXELS), bool)
    np.put_along_axis(masks, order[:, :missing_count], True, axis=1)
    return masks


def built_in_masks(n, seed):
    """name -> (n, 64) bool masks, True = missing, in the order of the table."""
    halves, other = range(0, 4), range(4, 8)
    every, centre = range(SIDE), range(2, 6)
    fixed = dict(bottom=block_mask(other, every), top=block_mask(halves, every), left=block_mask(every, halves),
                 right=block_mask(every, other), centre=block_mask(centre, centre))
    masks = {name: np.repeat(mask[None], n, 0) for name, mask in fixed.items()}
    masks["random50"] = random_masks(n, 32, seed, "random50")
    masks["random75"] = random_masks(n, 48, seed, "random75")
    return masks


def load_extra_mask(file, n, taken=()):
    """FILE.npy -> (name, (n, 64) bool): a (64,) boolean array hides the same pixels of every image,
    an (N, 64) one hides row i mod N's pixels of image i. Booleans, or integers 0 and 1. Every row
    must hide a pixel and show one. Any problem is a one-line plumbing.UsageError."""
    path = Path(file)
    name = path.stem if NAME_PATTERN.fullmatch(path.stem) else "extra"
    if name in taken:
        raise plumbing.UsageError(f"--extra-mask {file}: the name {name!r} is taken; rename the file")
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise plumbing.UsageError(f"--extra-mask: no file {file}") from None
    except (OSError, ValueError) as error:
        raise plumbing.UsageError(f"--extra-mask: {file} is not a readable .npy array "
                                f"({plumbing.first_line(error)})") from None
    if not isinstance(array, np.ndarray):
        raise plumbing.UsageError(f"--extra-mask: {file} holds {type(array).__name__}, not an array")
    if array.dtype != bool:
        if not np.issubdtype(array.dtype, np.integer) or not np.isin(array, (0, 1)).all():
            raise plumbing.UsageError(f"--extra-mask: {file} holds {array.dtype} values other than 0 and 1; "
                                    f"expected booleans (True = missing)")
        array = array.astype(bool)
    if array.shape == (common.NUM_PIXELS,):
        array = array[None]
    if array.ndim != 2 or array.shape[1] != common.NUM_PIXELS or len(array) == 0:
        raise plumbing.UsageError(f"--extra-mask: {file} has shape {array.shape}; expected (64,) or (N, 64) "
                                f"with N >= 1")
    if not array.any(1).all() or array.all(1).any():
        raise plumbing.UsageError(f"--extra-mask: {file} has a row that hides no pixel or every pixel; "
                                f"each must hide at least one and show at least one")
    return name, array[np.arange(n) % len(array)]


# -----------------------------------------------------------------------------
# classical baselines, with the contract's complete(x, missing) and missing_nll(x, missing)


def condition_mixture(weights, means, covariances, observed_values, observed):
    """Exact conditioning of a full-covariance Gaussian mixture on some coordinates.

    weights (K,), means (K, D), covariances (K, D, D); observed (D,) bool; observed_values (N, O)
    the values of the O observed coordinates of N points. Returns the conditional mixture of the
    M = D - O others: log weights (N, K), means (N, K, M), covariances (K, M, M):
    w_k(v_o) ~ w_k N(v_o; mu_k,o, S_k,oo), mean mu_k,m + S_k,mo S_k,oo^-1 (v_o - mu_k,o),
    covariance S_k,mm - S_k,mo S_k,oo^-1 S_k,om."""
    o, m = observed, ~observed
    s_oo = covariances[:, o][:, :, o]  # (K, O, O)
    s_mo = covariances[:, m][:, :, o]  # (K, M, O)
    s_mm = covariances[:, m][:, :, m]  # (K, M, M)
    cholesky = np.linalg.cholesky(s_oo)  # (K, O, O)
    difference = observed_values[None] - means[:, None, o]  # (K, N, O)
    whitened = np.linalg.solve(cholesky, difference.transpose(0, 2, 1))  # (K, O, N) = L^-1 (v_o - mu_o)
    log_marginal = (-0.5 * (whitened**2).sum(1) - np.log(np.diagonal(cholesky, axis1=1, axis2=2)).sum(1)[:, None]
                    - 0.5 * o.sum() * np.log(2 * np.pi))  # (K, N) log N(v_o; mu_o, S_oo)
    log_posterior = np.log(weights)[:, None] + log_marginal
    log_posterior -= np.logaddexp.reduce(log_posterior, axis=0)
    gain = np.linalg.solve(s_oo, s_mo.transpose(0, 2, 1)).transpose(0, 2, 1)  # (K, M, O) = S_mo S_oo^-1
    conditional_means = means[:, None, m] + difference @ gain.transpose(0, 2, 1)  # (K, N, M)
    conditional_covariances = s_mm - gain @ s_mo.transpose(0, 2, 1)
    return log_posterior.T, conditional_means.transpose(1, 0, 2), conditional_covariances


def mixture_log_density(log_weights, means, covariances, v):
    """log sum_k w_k N(v; mean_k, cov_k): log_weights (N, K), means (N, K, M), covariances (K, M, M),
    v (N, M) -> (N,)."""
    cholesky = np.linalg.cholesky(covariances)  # (K, M, M)
    difference = (v[:, None] - means).transpose(1, 2, 0)  # (K, M, N)
    whitened = np.linalg.solve(cholesky, difference)
    log_normal = (-0.5 * (whitened**2).sum(1) - np.log(np.diagonal(cholesky, axis1=1, axis2=2)).sum(1)[:, None]
                  - 0.5 * v.shape[1] * np.log(2 * np.pi))  # (K, N)
    return np.logaddexp.reduce(log_weights + log_normal.T, axis=1)


def _by_pattern(missing):
    """Group the rows of a (N, 64) bool array by their mask: yields (pattern (64,), row indices)."""
    patterns, inverse = np.unique(missing, axis=0, return_inverse=True)
    for index, pattern in enumerate(patterns):
        yield pattern, np.flatnonzero(inverse.reshape(-1) == index)


class GaussianMixtureCompleter:
    """A full-covariance GaussianMixture of the dequantized pixels v = x + u (fitted as
    leaderboard.gaussian_mixture: k chosen on val), conditioned exactly on the observed pixels at
    the centres of their dequantization boxes, v_o = x_o + 1/2; a drawn v_m gives the pixels
    floor(v_m) clipped to 0..16. missing_nll: E_u[-log p(x_m + u | v_o)] over `draws` draws of u,
    an upper bound (Jensen) on the NLL of the discretised conditional."""

    name = "GaussianMixture"

    def __init__(self, splits, seed, ks=(5, 10, 20, 40), draws=5):
        from sklearn.mixture import GaussianMixture

        _, self.k, mixture = baselines.fit_on_val(
            lambda k: GaussianMixture(k, covariance_type="full", reg_covar=1e-3, random_state=seed),
            splits, ks, seed, draws)
        self.weights, self.means, self.covariances = mixture.weights_, mixture.means_, mixture.covariances_
        self.draws, self.seed = draws, seed

    def _conditionals(self, x, missing):
        for pattern, rows in _by_pattern(missing):
            observed_values = x[rows][:, ~pattern] + 0.5
            yield pattern, rows, condition_mixture(self.weights, self.means, self.covariances, observed_values, ~pattern)

    def complete(self, x, missing):
        x_np, missing_np = x.cpu().double().numpy(), missing.cpu().numpy()
        out = x_np.copy()
        generator = np.random.default_rng(int(torch.randint(2**31, ())))  # from the caller's torch seed
        for pattern, rows, (log_weights, means, covariances) in self._conditionals(x_np, missing_np):
            cumulative = np.exp(log_weights).cumsum(1)
            component = (generator.random((len(rows), 1)) > cumulative).sum(1).clip(max=len(self.weights) - 1)
            cholesky = np.linalg.cholesky(covariances)  # (K, M, M)
            noise = generator.standard_normal((len(rows), pattern.sum()))
            v = means[np.arange(len(rows)), component] + np.einsum("nij,nj->ni", cholesky[component], noise)
            filled = out[rows]
            filled[:, pattern] = np.floor(v).clip(0, common.PIXEL_MAX)
            out[rows] = filled
        return torch.from_numpy(out).to(x)

    def missing_nll(self, x, missing):
        x_np, missing_np = x.cpu().double().numpy(), missing.cpu().numpy()
        nll = np.zeros(len(x_np))
        generator = np.random.default_rng(self.seed + 3)
        for pattern, rows, conditional in self._conditionals(x_np, missing_np):
            truth = x_np[rows][:, pattern]
            nll[rows] = -np.mean([mixture_log_density(*conditional, truth + generator.random(truth.shape))
                                  for _ in range(self.draws)], axis=0)
        return torch.from_numpy(nll).to(x)


class NearestNeighbourCompleter:
    """The training digit nearest (L2) on the observed pixels lends its missing pixels: one
    deterministic completion (diversity 0), no likelihood."""

    name = "Nearest neighbour"

    def __init__(self, train):
        self.train = torch.as_tensor(train, dtype=torch.float64)  # (T, 64)

    def complete(self, x, missing):
        observed = (~missing).double()  # (B, 64)
        x64 = x.cpu().double()
        # sum over observed pixels of (x - t)^2 = o.x^2 - 2 (o x).t + o.t^2, for every training digit t
        distances = ((observed * x64**2).sum(1, keepdim=True) - 2 * (observed * x64) @ self.train.T
                     + observed @ (self.train**2).T)  # (B, T)
        nearest = self.train[distances.argmin(1)]
        return torch.where(missing.cpu(), nearest, x64).to(x)

    def missing_nll(self, x, missing):
        raise NotImplementedError("the nearest neighbour gives no likelihood")


class IndependentPixelsCompleter:
    """Every missing pixel from its own categorical over 0..16 (common.independent_pixel_log_probs,
    add-0.5 smoothing on train), whatever is observed; missing_nll exact under that model."""

    name = "Independent pixels"

    def __init__(self, train):
        self.log_probs = torch.from_numpy(common.independent_pixel_log_probs(train))  # (64, 17)

    def complete(self, x, missing):
        draws = torch.distributions.Categorical(logits=self.log_probs).sample((len(x),)).to(x)  # (B, 64)
        return torch.where(missing, draws, x)

    def missing_nll(self, x, missing):
        levels = x.cpu().round().long().clamp(0, common.PIXEL_MAX)
        log_p = self.log_probs.gather(1, levels.T).T  # (B, 64)
        return -(log_p * missing.cpu()).sum(1).to(x)


# -----------------------------------------------------------------------------
# the metrics of one (model, mask)


def pairwise_distance(completions):
    """(C, N, 64) completions of the same N inputs -> the mean L2 distance over the C (C - 1) / 2
    pairs and the N inputs."""
    pairs = [(a, b) for a in range(len(completions)) for b in range(a + 1, len(completions))]
    return float(np.mean([(completions[a] - completions[b]).norm(dim=1).mean().item() for a, b in pairs]))


def evaluate(completer, x, labels, missing, classifier, *, seed, device, diversity_digits, batch_size):
    """One completion of every digit, COPIES of the first `diversity_digits` (for the diversity),
    the missing pixels' NLL where given. x (N, 64) and missing (N, 64) on `device`, labels (N,).
    Returns (metrics dict, first completions (N, 64) on 0..16 on the CPU). Raises AssertionError
    when a completion changes an observed pixel or has the wrong shape."""
    n, d = len(x), min(diversity_digits, len(x))
    inputs = torch.cat([x] + [x[:d]] * (COPIES - 1))
    masks = torch.cat([missing] + [missing[:d]] * (COPIES - 1))
    start = time.perf_counter()
    with common.seeded(seed, device), torch.no_grad():
        completed = torch.cat([completer.complete(inputs[i:i + batch_size], masks[i:i + batch_size])
                               for i in range(0, len(inputs), batch_size)])
    complete_seconds = time.perf_counter() - start
    assert completed.shape == inputs.shape, f"{completer.name} returned shape {tuple(completed.shape)}"
    assert torch.equal(completed[~masks], inputs[~masks]), f"{completer.name} changed observed pixels"
    completed = completed.float().cpu().clamp(0, common.PIXEL_MAX)
    first, truth, hidden = completed[:n], x.cpu(), missing.cpu()
    with torch.no_grad():
        accuracy = (classifier(first).argmax(1) == torch.as_tensor(labels)).double().mean().item()
    mse = ((first - truth)[hidden] ** 2).mean().item()
    copies = torch.stack([first[:d]] + list(completed[n:].view(COPIES - 1, d, -1)))
    nll, nll_seconds = None, None
    try:
        start = time.perf_counter()
        with common.seeded(seed + 1, device), torch.no_grad():
            nll = float(torch.cat([completer.missing_nll(x[i:i + batch_size], missing[i:i + batch_size])
                                   for i in range(0, n, batch_size)]).double().mean())
        nll_seconds = time.perf_counter() - start
    except NotImplementedError:
        pass
    seconds = complete_seconds + (nll_seconds or 0.0)
    return dict(accuracy=accuracy, mse=mse, missing_nll=nll, diversity=pairwise_distance(copies),
                seconds=round(seconds, 2), complete_seconds=round(complete_seconds, 2),
                nll_seconds=nll_seconds and round(nll_seconds, 2)), first


# -----------------------------------------------------------------------------
# the table and the picture


def verdict(rows, masks, families):
    """Which family is best (highest mean accuracy over the masks), whether it beats the nearest
    neighbour and the GaussianMixture on every mask, and which families fall below either."""
    accuracy = {(r["model"], r["mask"]): r["accuracy"] for r in rows}
    present = [f for f in families if all((f, m) in accuracy for m in masks)]
    if not present:
        return dict(best=None, beats_baselines_everywhere=None, below={})
    best = max(present, key=lambda f: np.mean([accuracy[f, m] for m in masks]))
    references = [b for b in ("Nearest neighbour", "GaussianMixture") if all((b, m) in accuracy for m in masks)]

    def floor(m):
        return max([accuracy[b, m] for b in references], default=-1.0)

    below = {f: [m for m in masks if accuracy[f, m] < floor(m)] for f in present}
    return dict(best=best, beats_baselines_everywhere=not below[best] if references else None,
                below={f: ms for f, ms in below.items() if ms})


def markdown(rows, masks, families, seconds, cpu_seconds, skipped, diversity_digits, verdict_):
    mask_names = list(masks)
    by = {(r["model"], r["mask"]): r for r in rows}
    models = [m for m in dict.fromkeys(r["model"] for r in rows)]
    lines = ["Completions of the 447 test digits (one per digit; observed pixels kept exactly). Masks:", "",
             "| mask | missing |", "|---|---|"]
    lines += [f"| {name} | {info['description']} |" for name, info in masks.items()]

    def table(metric, title, digits, bold_max=None):
        out = ["", title, "", "| model | " + " | ".join(mask_names) + (" | seconds (CPU s) |" if metric == "accuracy" else " |"),
               "|---|" + "---|" * (len(mask_names) + (metric == "accuracy"))]
        best = {}
        if bold_max is not None:
            for m in mask_names:
                values = [by[f, m][metric] for f in families if (f, m) in by and by[f, m][metric] is not None]
                best[m] = (max if bold_max else min)(values) if values else None
        for model in models:
            cells = []
            for m in mask_names:
                value = by.get((model, m), {}).get(metric)
                text = "-" if value is None else f"{value:.{digits}f}"
                cells.append(f"**{text}**" if value is not None and value == best.get(m) and model in families else text)
            extra = f" | {seconds[model]:.1f} ({cpu_seconds[model]:.1f})" if metric == "accuracy" and model in seconds else (
                " | -" if metric == "accuracy" else "")
            out.append(f"| {model} | " + " | ".join(cells) + extra + " |")
        return out

    lines += table("accuracy", "Classifier accuracy of the completed digits against their true labels (higher is "
                   "better; best family in bold); seconds: the family's wall time over all masks, with the "
                   "process's CPU seconds:", 3, True)
    lines += table("mse", "Mean squared error on the missing pixels (pixel units^2; lower is better):", 2, False)
    lines += table("missing_nll", "-log p(x_missing | x_observed) of the true missing pixels, nats per digit, where the "
                   "model gives it (ARM: exact, for masks whose missing pixels follow every observed one; "
                   "MDM: its order-agnostic upper bound; GaussianMixture: upper bound by dequantization; independent "
                   "pixels: exact):", 1, False)
    lines += table("diversity", f"Diversity: mean L2 distance (pixels) between {COPIES} completions of the same "
                   f"input, first {diversity_digits} test digits:", 2, None)
    if verdict_["best"]:
        below = verdict_["below"]
        lines += ["", f"Best family by mean accuracy: **{verdict_['best']}**; "
                  + ("above both the nearest neighbour and the GaussianMixture on every mask."
                     if verdict_["beats_baselines_everywhere"] else
                     f"below a baseline on {', '.join(below.get(verdict_['best'], []))}.")]
        lines += ["Families below the nearest neighbour or the GaussianMixture: " + (
            "; ".join(f"{f} ({', '.join(ms)})" for f, ms in below.items()) if below else "none") + "."]
    if skipped:
        lines += ["", "Left out: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()) + "."]
    return "\n".join(lines) + "\n"


def _rgb(grid, mask_grid=None):
    """uint8 (H, W) grey grid -> (H, W, 3); where mask_grid (the grid of a mask, 255 on missing
    pixels, grey padding) is white, a dark red."""
    image = np.repeat(grid[..., None], 3, axis=2)
    if mask_grid is not None:
        image[mask_grid == 255] = (150, 30, 30)
    return image


def picture(path, x, missing_by_mask, completions, columns):
    """For each mask a panel of the digits `columns`: the true digit, the masked input (missing
    pixels red), then every model's first completion, one row each, the model named on the left."""
    from PIL import Image, ImageDraw

    label_width, strip = 120, 18
    panels = []
    models = list(dict.fromkeys(model for model, _ in completions))
    for mask_name, missing in missing_by_mask.items():
        rows = [("true digit", _rgb(files.image_grid(x[columns], nrow=len(columns)))),
                ("input", _rgb(files.image_grid(x[columns] * ~missing[columns], nrow=len(columns)),
                               files.image_grid(missing[columns].float() * common.PIXEL_MAX, nrow=len(columns))))]
        rows += [(model, _rgb(files.image_grid(completions[model, mask_name][columns], nrow=len(columns))))
                 for model in models if (model, mask_name) in completions]
        width = rows[0][1].shape[1]
        canvas = Image.new("RGB", (width, strip + sum(r.shape[0] for _, r in rows)), (255, 255, 255))
        ImageDraw.Draw(canvas).text((4, 3), mask_name, fill=(0, 0, 0))
        top = strip
        for _, row in rows:
            canvas.paste(Image.fromarray(row), (0, top))
            top += row.shape[0]
        panels.append((canvas, [(name, row.shape[0]) for name, row in rows]))
    labels = Image.new("RGB", (label_width, panels[0][0].height), (255, 255, 255))
    draw, top = ImageDraw.Draw(labels), strip
    for name, height in panels[0][1]:
        draw.text((4, top + height // 2 - 5), name, fill=(0, 0, 0))
        top += height
    images = [labels] + [p for p, _ in panels]
    whole = Image.new("RGB", (sum(i.width + 6 for i in images), max(i.height for i in images)), (255, 255, 255))
    left = 0
    for image in images:
        whole.paste(image, (left, 0))
        left += image.width + 6
    files.save_image(path, np.asarray(whole))


def save_completions(path, completions):
    """OUT/inpaint_completions.npz: one uint8 (N, 64) array on 0..16 per key "MODEL/MASK"."""
    arrays = {f"{model}/{mask}": pixels.round().clamp(0, common.PIXEL_MAX).to(torch.uint8).numpy()
              for (model, mask), pixels in completions.items()}

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    files.atomic_write(path, write)


# -----------------------------------------------------------------------------
# command line


def main(argv=None):
    family_names = [f.name for f in registry.FAMILIES]
    parser = runs.Parser(prog="inpaint.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None, metavar="NAME",
                        help=f"families and baselines to run (default all: {', '.join(family_names + list(BASELINES))})")
    parser.add_argument("--masks", nargs="+", default=list(MASK_NAMES), choices=MASK_NAMES, metavar="MASK",
                        help=f"built-in masks (default all: {', '.join(MASK_NAMES)})")
    parser.add_argument("--extra-mask", action="append", default=[], metavar="FILE.npy",
                        help="add a mask: (64,) booleans (True = missing) for every digit, or (N, 64) whose row "
                             "i mod N is test digit i's; named after the file; repeatable")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder of the trained weights and of inpaint.md, .json, .png and "
                             "inpaint_completions.npz (default: the project's results/; a relative path is "
                             "taken from the current directory)")
    parser.add_argument("--no-train", action="store_true",
                        help="never train: skip a family whose weights OUT/NAME.pt are missing")
    parser.add_argument("--seed", type=common.seed_int, default=0,
                        help="seed of the random masks and of every completion (default %(default)s)")
    parser.add_argument("--diversity-digits", type=common.positive_int, default=50,
                        help=f"test digits completed {COPIES} times for the diversity (default %(default)s)")
    parser.add_argument("--batch-size", type=common.positive_int, default=512,
                        help="digits per complete() call (default %(default)s)")
    results.add_machine_flags(parser)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in inpaint.json
    processes.tool("inpaint.py", lambda: complete_everything(args),
                     "a model run it started was stopped and its files discarded; the files in --out are whole")


def complete_everything(args):
    """The body of main(): every family and baseline on every mask, then the outputs."""
    family_names = [f.name for f in registry.FAMILIES]
    start = time.perf_counter()
    models = args.models or family_names + list(BASELINES)
    unknown = [m for m in models if m not in family_names + list(BASELINES)]
    if unknown:
        raise plumbing.UsageError(f"unknown model {unknown[0]!r}; choose from "
                                f"{', '.join(family_names + list(BASELINES))}")
    device = runs.choose_device(args.device)  # before --out is made: a refused device leaves nothing
    out = results.out_folder(args.out)
    files.check_out(out)
    pixels, labels = common.load_digits_arrays()
    splits, label_splits = common.split_arrays(pixels), common.split_arrays(labels)
    n = len(splits["test"])
    all_masks = built_in_masks(n, args.seed)
    masks = {name: all_masks[name] for name in dict.fromkeys(args.masks)}
    descriptions = {name: MASK_DESCRIPTIONS[name] for name in masks}
    for file in args.extra_mask:
        name, mask = load_extra_mask(file, n, taken=(*MASK_NAMES, *masks))
        masks[name], descriptions[name] = mask, f"--extra-mask {Path(file).name}"
    torch.set_num_threads(args.threads)
    show = not args.no_progress and sys.stderr.isatty()
    classifier, classifier_accuracy = quality.digit_classifier(out)
    x = torch.from_numpy(splits["test"]).to(device)
    missing = {name: torch.from_numpy(mask).to(device) for name, mask in masks.items()}

    completers, skipped, setup_seconds = [], {}, {}
    for family in registry.FAMILIES:
        if family.name in models:
            model, reason = results.load_family(family, out, not args.no_train, args.threads, device, tool="inpaint")
            if model is None:
                print(f"inpaint: skipped {family.name}: {reason}", file=sys.stderr)
                skipped[family.name] = reason
            else:
                completers.append(model)
    for name, make in (("GaussianMixture", lambda: GaussianMixtureCompleter(splits, args.seed)),
                       ("Nearest neighbour", lambda: NearestNeighbourCompleter(splits["train"])),
                       ("Independent pixels", lambda: IndependentPixelsCompleter(splits["train"]))):
        if name in models:
            with common.timed(torch.device("cpu")) as took:  # fitting counts in the baseline's seconds
                completers.append(make())
            setup_seconds[name] = took

    rows, completions, seconds, cpu_seconds = [], {}, {}, {}
    for index, completer in enumerate(completers):
        family_start, family_cpu = time.perf_counter(), time.process_time()
        for mask_index, (mask_name, mask) in enumerate(missing.items()):
            with quality.announced(f"inpaint: {completer.name} on {mask_name}", show):
                try:
                    metrics, first = evaluate(completer, x, label_splits["test"], mask, classifier,
                                              seed=args.seed + 1000 * index + mask_index, device=device,
                                              diversity_digits=args.diversity_digits, batch_size=args.batch_size)
                except NotImplementedError as error:
                    reason = plumbing.first_line(error, "complete() is not implemented")
                    print(f"inpaint: left out {completer.name}: {reason}", file=sys.stderr)
                    skipped[completer.name] = reason
                    break
            rows.append(dict(model=completer.name, mask=mask_name, **metrics))
            completions[completer.name, mask_name] = first
        else:
            setup = setup_seconds.get(completer.name, dict(wall=0.0, cpu=0.0))
            seconds[completer.name] = round(time.perf_counter() - family_start + setup["wall"], 2)
            cpu_seconds[completer.name] = round(time.process_time() - family_cpu + setup["cpu"], 2)
            continue
        rows = [r for r in rows if r["model"] != completer.name]
        completions = {k: v for k, v in completions.items() if k[0] != completer.name}

    # references: the true digits, and the observed pixels alone (missing = 0)
    with torch.no_grad():
        true_accuracy = (classifier(x.cpu()).argmax(1) == torch.from_numpy(label_splits["test"])).double().mean().item()
        for mask_name, mask in missing.items():
            blanked = x.cpu() * ~mask.cpu()
            rows.append(dict(model="Observed only (missing = 0)", mask=mask_name,
                             accuracy=(classifier(blanked).argmax(1) == torch.from_numpy(label_splits["test"]))
                             .double().mean().item(),
                             mse=((x.cpu()[mask.cpu()]) ** 2).mean().item(), missing_nll=None, diversity=0.0,
                             seconds=0.0))
    family_names_run = [c.name for c in completers if c.name in family_names and c.name in seconds]
    mask_info = {name: dict(description=descriptions[name], missing_pixels=float(masks[name].sum(1).mean()))
                 for name in masks}
    verdict_ = verdict(rows, list(masks), family_names_run)
    table = markdown(rows, mask_info, family_names_run, seconds, cpu_seconds, skipped, args.diversity_digits, verdict_)
    table += (f"\nThe classifier's accuracy on the whole test digits is {true_accuracy:.3f}; \"Observed only\" "
              f"classifies the inputs with the missing pixels at 0.\n")
    files.publish_table(out / "inpaint.md", table, registry.ROOT)
    columns = [int(np.flatnonzero(label_splits["test"] == digit)[0]) for digit in range(10)]
    picture(out / "inpaint.png", x.cpu(), {k: v.cpu() for k, v in missing.items()}, completions, columns)
    save_completions(out / "inpaint_completions.npz", completions)
    files.save_json(out / "inpaint.json", dict(
        masks=mask_info, rows=rows, verdict=verdict_, family_seconds=seconds, family_cpu_seconds=cpu_seconds,
        skipped=skipped,
        classifier_accuracy_on_test_digits=true_accuracy, classifier_reported_accuracy=classifier_accuracy,
        seed=args.seed, diversity_digits=args.diversity_digits, copies=COPIES, device=str(device),
        threads=torch.get_num_threads(), seconds=round(time.perf_counter() - start, 2),
        argv=args.argv))
    print(table)


if __name__ == "__main__":
    main()
