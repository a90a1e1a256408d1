"""Inpainting: complete half-hidden digits with every trained family of this collection, the
third use of a learned p(x) after sampling and out-of-distribution detection (ood.py).

Each of the 447 test digits is shown with some pixels hidden (True = missing in a mask) and each
family fills them in by drawing from its own p(x_missing | x_observed); the observed pixels are
kept exactly (checked on every completion). Masks: the bottom, top, left and right halves, the
centre 4 x 4, and 50% and 75% of the pixels at random (32 or 48 of the 64, a different seeded set
for every digit); `--extra-mask FILE.npy` adds a (64,) boolean mask for every digit, or (N, 64)
whose row i mod N hides the pixels of digit i.

How each family completes (its `complete` method, in its own script; settings chosen on the
validation split, `--split val`; a family whose `complete` raises NotImplementedError is named in
one line and left out):
- ARM: exact ancestral sampling where every missing pixel follows every observed one in raster
  order (the bottom half); elsewhere sampling-importance-resampling over 8 ancestral passes,
  weighted by the exact conditionals of the observed pixels (van den Oord et al. 2016; Rubin 1988).
- RealNVP: Langevin dynamics in the flow's latent space on the prior times a tie of the observed
  pixels to their values, tightened step by step (posterior sampling with a flow prior).
- ScM, SBGM, DDPM, FM: RePaint (Lugmayr et al. 2022; common.repaint): the observed pixels noised
  to each level, the missing ones moved by the model's denoiser, each level resampled.
- EBM: its short-run SGLD chain on E(x) from noise on the missing pixels, the observed ones
  clamped (Nijkamp et al. 2019). MDM: its own any-order conditional. VAE: Metropolis-within-Gibbs
  (Mattei & Frellsen 2018). GAN: the latent optimised to match the observed pixels (Yeh et al. 2017).
- Baselines: a GaussianMixture on dequantized pixels with exact Gaussian conditioning (k chosen
  on the validation split), the nearest training digit on the observed pixels (deterministic),
  independent pixels (each missing pixel from its own categorical).

Measures per (model, mask), first the proper score: -log p(x_missing | x_observed) of the true
missing pixels in nats where the model gives it, exactly, as a bound or (the ARM's other masks) as
an importance-sampling estimate; then the classifier accuracy (quality.digit_classifier) and the
squared error of one draw per digit, which is meant to vary; with `--pick best-of-K` (default
best-of-8) the committed completion, the most likely of K draws under the family's own
likelihood, bound or energy (`completion_nll`), on the first `--copied` digits beside one draw's
numbers on them; the diversity, the mean L2 distance between 4 draws for the same input; seconds.

`--input DIGITS.npy --mask NAME|FILE.npy` completes your own digits instead ((N, 64) or (N, 8, 8)
on 0..16): OUT/inpaint_input.png shows each input with its hidden pixels, then each family's 4
draws and its committed completion; OUT/inpaint_input.npz holds them.

Uses the trained weights NAME.pt of every family in --weights (default results/, where they ship),
trains a family into it with its defaults only when its weights are missing (never with
--no-train), and skips a family whose weights do not load, with a one-line note; --out only
receives the tool's own files.

Run:  python inpaint.py                    # writes results/inpaint.md, .json, .png, _completions.npz
      python inpaint.py --models ARM VAE --masks bottom random75 --no-train
      python inpaint.py --input my_digits.npy --mask bottom --out my_folder
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
FIXED_MASKS = ("bottom", "top", "left", "right", "centre")  # the masks --mask names
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


def read_array(file, flag, check=lambda shape, dtype: None):
    """An array from a .npy file a user names, read by files.read_npy (a regular file, no pickles,
    its header checked by check(shape, dtype) -> a problem or None before the data is read); any
    problem a one-line plumbing.UsageError naming the flag."""
    try:
        return files.read_npy(Path(file), check)
    except files.DamagedFile as error:
        raise plumbing.UsageError(f"{flag}: no file {file}" if error.problem == "is missing" else
                                  f"{flag}: {file} is not a readable .npy array ({error.problem})") from None


def load_extra_mask(file, n, taken=()):
    """FILE.npy -> (name, (n, 64) bool): a (64,) boolean array hides the same pixels of every image,
    an (N, 64) one hides row i mod N's pixels of image i. Booleans, or integers 0 and 1. Every row
    must hide a pixel and show one. Any problem is a one-line plumbing.UsageError."""
    path = Path(file)
    name = path.stem if NAME_PATTERN.fullmatch(path.stem) else "extra"
    if name in taken:
        raise plumbing.UsageError(f"--extra-mask {file}: the name {name!r} is taken; rename the file")
    array = as_mask(read_array(file, "--extra-mask", pixel_shape), f"--extra-mask: {file}")
    if array.shape == (common.NUM_PIXELS,):
        array = array[None]
    if array.ndim != 2 or array.shape[1] != common.NUM_PIXELS or len(array) == 0:
        raise plumbing.UsageError(f"--extra-mask: {file} has shape {array.shape}; expected (64,) or (N, 64) "
                                f"with N >= 1")
    check_rows(array, f"--extra-mask: {file}")
    return name, array[np.arange(n) % len(array)]


def pixel_shape(shape, dtype):
    """A read_array check, from the header: (64,), (8, 8), (N, 64) or (N, 8, 8) with N >= 1 (each
    reader then asks for the shapes it takes)."""
    one = ((common.NUM_PIXELS,), (SIDE, SIDE))
    if shape not in one and not (len(shape) in (2, 3) and shape[0] >= 1 and shape[1:] in one):
        return f"has shape {shape}; expected (64,), (8, 8), (N, 64) or (N, 8, 8)"


def as_mask(array, where):
    """Booleans, or integers 0 and 1 made booleans; other values a one-line plumbing.UsageError."""
    if array.dtype == bool:
        return array
    if not np.issubdtype(array.dtype, np.integer) or not np.isin(array, (0, 1)).all():
        raise plumbing.UsageError(f"{where} holds {array.dtype} values other than 0 and 1; expected booleans "
                                  "(True = missing)")
    return array.astype(bool)


def check_rows(masks, where):
    """(N, 64) bool: every row hides a pixel and shows one, else a one-line plumbing.UsageError."""
    if not masks.any(1).all() or masks.all(1).any():
        raise plumbing.UsageError(f"{where} has a row that hides no pixel or every pixel; each must hide at least "
                                  "one and show at least one")


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


class Baseline:
    """What the baselines share: nothing to rank draws by but what a subclass gives."""

    def completion_nll(self, x):
        raise NotImplementedError(f"{self.name} ranks no draws (a baseline)")


class GaussianMixtureCompleter(Baseline):
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


class NearestNeighbourCompleter(Baseline):
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

    def completion_nll(self, x):
        """(B,) zeros: the draws of an input are all the same digit, so any is the committed one."""
        return x.new_zeros(len(x))




class IndependentPixelsCompleter(Baseline):
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


def pick_flag(text):
    """--pick: "draw" -> 1, "best-of-K" (K >= 2) -> K; anything else a one-line error."""
    match = re.fullmatch(r"best-of-([0-9]{1,3})", text)
    if text == "draw":
        return 1
    if match and int(match.group(1)) >= 2:
        return int(match.group(1))
    raise argparse.ArgumentTypeError(f"expected draw or best-of-K with K >= 2 (e.g. best-of-8), got {text!r}")


def draw_completions(completer, x, missing, draws, copied, *, seed, device, batch_size):
    """One completion of every input and `draws` of the first `copied`, all seeded by `seed`:
    ((N, 64) first completions, (draws, copied, 64) draws of the first inputs, whose first is the
    first completion), on the CPU, clamped to 0..16. Raises AssertionError when a completion
    changes an observed pixel or has the wrong shape."""
    n = len(x)
    inputs = torch.cat([x] + [x[:copied]] * (draws - 1))
    masks = torch.cat([missing] + [missing[:copied]] * (draws - 1))
    with common.seeded(seed, device), torch.no_grad():
        completed = common.batched(completer.complete, inputs, masks, batch_size=batch_size)
    assert completed.shape == inputs.shape, f"{completer.name} returned shape {tuple(completed.shape)}"
    assert torch.equal(completed[~masks], inputs[~masks]), f"{completer.name} changed observed pixels"
    completed = completed.float().cpu().clamp(0, common.PIXEL_MAX)
    first = completed[:n]
    return first, torch.cat([first[None, :copied], completed[n:].view(draws - 1, copied, -1)])


def best_of(completer, draws, *, seed, device, batch_size):
    """The committed completion: of the K draws (K, N, 64) of each input, the one of lowest
    completer.completion_nll (its -log p(x), bound or energy; the draws of an input share their
    observed pixels, so this ranks by p(x_missing | x_observed)) -> (N, 64); None when the
    completer has no likelihood."""
    flat = draws.reshape(-1, draws.shape[-1]).to(device)
    try:
        with common.seeded(seed, device), torch.no_grad():
            scores = common.batched(completer.completion_nll, flat, batch_size=batch_size).double().cpu()
    except NotImplementedError:
        return None
    pick = scores.view(draws.shape[:2]).argmin(0)  # (N,)
    return draws[pick, torch.arange(draws.shape[1])]


def evaluate(completer, x, labels, missing, classifier, *, seed, device, copied, draws, batch_size):
    """The metrics of one (model, mask): one completion of every digit; `draws` of the first
    `copied` digits, for the diversity (the first COPIES) and for the committed completion (best
    of all `draws`, when draws > 1); the missing pixels' NLL where given. x (N, 64) and missing
    (N, 64) on `device`, labels (N,). Returns (metrics, first completions (N, 64), the draws
    (draws, copied, 64), the committed completions (copied, 64) or None), on the CPU."""
    copied = min(copied, len(x))
    start = time.perf_counter()
    first, drawn = draw_completions(completer, x, missing, max(draws, COPIES), copied, seed=seed, device=device,
                                    batch_size=batch_size)
    complete_seconds = time.perf_counter() - start
    truth, hidden, labels = x.cpu(), missing.cpu(), torch.as_tensor(labels)

    def accuracy(completed, n):
        with torch.no_grad():
            return (classifier(completed).argmax(1) == labels[:n]).double().mean().item()

    def mse(completed, n):
        return ((completed - truth[:n])[hidden[:n]] ** 2).mean().item()

    metrics = dict(accuracy=accuracy(first, len(x)), mse=mse(first, len(x)), diversity=pairwise_distance(drawn[:COPIES]))
    metrics.update(missing_nll=None, nll_seconds=None, committed_accuracy=None, committed_mse=None)
    try:
        start = time.perf_counter()
        with common.seeded(seed + 1, device), torch.no_grad():
            metrics["missing_nll"] = float(common.batched(completer.missing_nll, x, missing,
                                                          batch_size=batch_size).double().mean())
        metrics["nll_seconds"] = round(time.perf_counter() - start, 2)
    except NotImplementedError:
        pass
    committed, pick_seconds = None, 0.0
    if draws > 1:
        start = time.perf_counter()
        committed = best_of(completer, drawn[:draws], seed=seed + 2, device=device, batch_size=batch_size)
        pick_seconds = time.perf_counter() - start
        metrics.update(draw_accuracy_first=accuracy(first[:copied], copied), draw_mse_first=mse(first[:copied], copied))
        if committed is not None:
            metrics.update(committed_accuracy=accuracy(committed, copied), committed_mse=mse(committed, copied))
    metrics.update(complete_seconds=round(complete_seconds, 2), pick_seconds=round(pick_seconds, 2),
                   seconds=round(complete_seconds + (metrics["nll_seconds"] or 0.0) + pick_seconds, 2))
    return metrics, first, drawn, committed


# -----------------------------------------------------------------------------
# the table and the picture

MARGIN = 0.10  # the accuracy above independent pixels that every family should reach on every mask


def verdict(rows, masks, families):
    """Which family completes best (lowest mean -log p(x_missing | x_observed) among those that
    give it on every mask; highest mean accuracy of one draw), the families whose one-draw
    accuracy is not MARGIN above independent pixels' on a mask, and the masks where the ARM or the
    MDM does not beat the GaussianMixture's bound."""
    by = {(r["model"], r["mask"]): r for r in rows}
    present = [f for f in families if all((f, m) in by for m in masks)]
    scored = [f for f in present if all(by[f, m]["missing_nll"] is not None for m in masks)]
    best_nll = min(scored, key=lambda f: np.mean([by[f, m]["missing_nll"] for m in masks]), default=None)
    best_draw = max(present, key=lambda f: np.mean([by[f, m]["accuracy"] for m in masks]), default=None)
    independent = "Independent pixels"
    short = {}
    if all((independent, m) in by for m in masks):
        short = {f: [m for m in masks if by[f, m]["accuracy"] < by[independent, m]["accuracy"] + MARGIN] for f in present}
    mixture = "GaussianMixture"
    not_below = {}
    if all((mixture, m) in by for m in masks):
        not_below = {f: [m for m in masks if by[f, m]["missing_nll"] is None
                         or by[f, m]["missing_nll"] >= by[mixture, m]["missing_nll"]]
                     for f in ("ARM", "MDM") if f in present}
    return dict(best_nll=best_nll, best_draw=best_draw, margin=MARGIN,
                short_of_independent=({f: ms for f, ms in short.items() if ms} if short else None),
                not_below_mixture=({f: ms for f, ms in not_below.items() if ms} if not_below else None))


def markdown(rows, masks, families, seconds, cpu_seconds, skipped, setup, verdict_):
    """inpaint.md: the proper score first, then one draw's accuracy and squared error, the
    committed completion, the diversity, the verdict."""
    mask_names = list(masks)
    by = {(r["model"], r["mask"]): r for r in rows}
    models = [m for m in dict.fromkeys(r["model"] for r in rows)]
    lines = [f"Completions of the {setup['digits']} {setup['split']} digits (observed pixels kept exactly). Masks:",
             "", "| mask | missing |", "|---|---|"]
    lines += [f"| {name} | {info['description']} |" for name, info in masks.items()]

    def cell(model, mask, metric, digits):
        value = by.get((model, mask), {}).get(metric)
        return "-" if value is None else f"{value:.{digits}f}"

    def table(metric, title, digits, best=None, keep=lambda model: True, timing=False, pair=None):
        out = ["", title, "", "| model | " + " | ".join(mask_names) + (" | seconds (CPU s) |" if timing else " |"),
               "|---|" + "---|" * (len(mask_names) + timing)]
        bests = {}
        for m in mask_names:
            values = [by[f, m][metric] for f in families if (f, m) in by and by[f, m].get(metric) is not None]
            bests[m] = best(values) if best and values else None
        for model in filter(keep, models):
            cells = []
            for m in mask_names:
                text = cell(model, m, metric, digits)
                if pair:
                    text = f"{cell(model, m, pair, digits)} -> {text}"
                value = by.get((model, m), {}).get(metric)
                cells.append(f"**{text}**" if value is not None and value == bests.get(m) and model in families else text)
            extra = (f" | {seconds[model]:.1f} ({cpu_seconds[model]:.1f})" if model in seconds else " | -") if timing else ""
            out.append(f"| {model} | " + " | ".join(cells) + extra + " |")
        return out

    has_nll = lambda model: any(by.get((model, m), {}).get("missing_nll") is not None for m in mask_names)  # noqa: E731
    lines += table("missing_nll", "**The proper score**: -log p(x_missing | x_observed) of the true missing pixels, "
                   "nats per digit (lower is better; best family in bold), for every model that gives it. ARM: exact "
                   "where every missing pixel follows every observed one in raster order (bottom), elsewhere an "
                   "importance-sampling estimate with 32 of its ancestral passes (low in expectation, by a gap that "
                   "shrinks as the passes grow; docs/inpainting.md); MDM: its order-agnostic upper bound; "
                   "GaussianMixture: an upper bound by dequantization; independent pixels: exact. The other families "
                   "give no likelihood of a part of the digit (the flows, diffusions and the VAE would need p(x_observed), "
                   "a marginal they can't compute):", 1, min, has_nll)
    lines += table("accuracy", "Classifier accuracy of **one draw** per digit against the true labels (higher is "
                   "better; best family in bold; a draw from p(x_missing | x_observed) is meant to vary, so a good model "
                   "can sit below a completer that always commits); seconds: the family's wall time over all masks "
                   "(draws, likelihoods and picks), with the process's CPU seconds:", 3, max, timing=True)
    lines += table("mse", "Mean squared error of one draw on the missing pixels (pixel units^2; lower is better):",
                   2, min)
    if setup["draws"] > 1:
        committed = lambda model: any(by.get((model, m), {}).get("committed_accuracy") is not None  # noqa: E731
                                      or model == "Nearest neighbour" for m in mask_names)
        lines += table("committed_accuracy", f"**Committed completion** (--pick best-of-{setup['draws']}): of "
                       f"{setup['draws']} draws the most likely under the family's own likelihood, bound or energy, on "
                       f"the first {setup['copied']} digits; each cell is one draw's accuracy on the same digits -> the "
                       "committed one's (families without a likelihood are left out; the nearest neighbour, which always "
                       "commits, for reference):", 3, max, committed, pair="draw_accuracy_first")
        lines += table("committed_mse", "The same, mean squared error on the missing pixels (one draw -> committed):",
                       2, min, committed, pair="draw_mse_first")
    lines += table("diversity", f"Diversity: mean L2 distance (pixels) between {COPIES} draws for the same input, "
                   f"first {setup['copied']} digits:", 2)
    lines.append("")
    if verdict_["best_nll"]:
        lines.append(f"Lowest -log p(x_missing | x_observed) over the masks: **{verdict_['best_nll']}**. "
                     f"Highest mean accuracy of one draw: **{verdict_['best_draw']}**.")
    short = verdict_["short_of_independent"]
    if short is not None:
        lines.append(f"Families whose one draw is not {MARGIN:.2f} above independent pixels' accuracy: " + (
            "; ".join(f"{f} ({', '.join(ms)})" for f, ms in short.items()) if short else "none") + ".")
    not_below = verdict_["not_below_mixture"]
    if not_below is not None:
        lines.append("ARM and MDM below the GaussianMixture's -log p(x_missing | x_observed): " + (
            "not on " + "; ".join(f"{f} ({', '.join(ms)})" for f, ms in not_below.items()) if not_below
            else "on every mask") + ".")
    if skipped:
        lines += ["", "Left out: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()) + "."]
    return "\n".join(lines) + "\n"


HIDDEN_RED = (150, 30, 30)


def _rgb(grid, mask_grid=None):
    """uint8 (H, W) grey grid -> (H, W, 3); where mask_grid (the grid of a mask, 255 on missing
    pixels, grey padding) is white, a dark red."""
    image = np.repeat(grid[..., None], 3, axis=2)
    if mask_grid is not None:
        image[mask_grid == 255] = HIDDEN_RED
    return image


def panel(title, x, missing, truth, draws, committed, shown=4, scale=5, best_of=8):
    """A PIL image: for each input (column group) the true digit (when known) and the input with
    its hidden pixels dark red, then per model (rows) `shown` draws and the committed completion,
    the most likely of `best_of` draws (a grey cell where there is none); a legend and column
    headings over them. draws: {model: (K, N, 64)}, committed: {model: (N, 64) or None}; x,
    missing: (N, 64)."""
    from PIL import Image, ImageDraw, ImageFont

    font, line, gap = ImageFont.load_default(size=12), 16, 12  # size=: Pillow >= 10.1
    cells = shown + (best_of > 1)  # the committed completion last, where there is one to pick
    blank = torch.full((common.NUM_PIXELS,), common.PIXEL_MAX * 0.35)

    def group(strip, mask=None):  # (cells, 64) -> one strip of cells
        image = files.image_grid(torch.stack(strip), nrow=cells, scale=scale)
        mask_image = None if mask is None else files.image_grid(torch.stack(mask), nrow=cells, scale=scale)
        return _rgb(image, mask_image)

    rows = []
    for i in range(len(x)):
        head = ([truth[i]] if truth is not None else []) + [x[i] * ~missing[i]]
        head_mask = ([torch.zeros(common.NUM_PIXELS)] if truth is not None else []) + [missing[i].float() * common.PIXEL_MAX]
        head += [blank] * (cells - len(head))
        head_mask += [torch.zeros(common.NUM_PIXELS)] * (cells - len(head_mask))
        column = [group(head, head_mask)]
        for model, drawn in draws.items():
            best = committed.get(model)
            column.append(group([drawn[k, i] for k in range(min(shown, len(drawn)))]
                                + [best[i] if best is not None else blank] * (best_of > 1)))
        rows.append(column)
    cell_h, group_w = rows[0][0].shape[0], rows[0][0].shape[1]
    head_names = ["true", "input"] if truth is not None else ["input"]
    draw_names = [f"draw {k + 1}" for k in range(shown)] + ["best", f"of {best_of}"] * (best_of > 1)
    legend = [(HIDDEN_RED, "hidden pixels: the model sees the others")] + [
        ((89, 89, 89), "grey cell: no committed completion (no likelihood to rank draws by)"),
        (None, f"best of {best_of}: the committed completion, the most likely of {best_of} draws "
               "under the model's own likelihood, bound or energy")] * (best_of > 1)
    label_width = int(16 + max(map(font.getlength, draws))) if draws else 60
    top = line * (2 + len(legend))  # title, legend, headings over the inputs
    body = top + cell_h + 2 * line + 4  # the inputs, then headings over the draws
    width = max(label_width + len(rows) * (group_w + gap), 24 + max(font.getlength(t) for _, t in legend))
    canvas = Image.new("RGB", (int(width), body + len(draws) * (cell_h + 2)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 0), title, fill=(0, 0, 0), font=ImageFont.load_default(size=14))
    for k, (color, text) in enumerate(legend):
        y = line * (k + 1) + 2
        if color is not None:
            draw.rectangle((4, y + 1, 15, y + 12), fill=color)
        draw.text((20, y), text, fill=(0, 0, 0), font=font)
    for j, column in enumerate(rows):
        left = label_width + j * (group_w + gap)
        centres = [left + (9 * k + 5) * scale for k in range(cells)]  # a cell: 1 pixel of padding, then 8
        for k, name in enumerate(head_names):
            draw.text((centres[k], top - 2), name, fill=(0, 0, 0), font=font, anchor="md")
        canvas.paste(Image.fromarray(column[0]), (left, top))
        for k, name in enumerate(draw_names):  # "best" over "of K", over the last cell
            draw.text((centres[min(k, shown)], body - 2 - line * (k == shown)), name, fill=(0, 0, 0), font=font,
                      anchor="md")
        for r, image in enumerate(column[1:]):
            canvas.paste(Image.fromarray(image), (left, body + r * (cell_h + 2)))
    for r, name in enumerate(draws):
        draw.text((4, body + r * (cell_h + 2) + cell_h // 2), name, fill=(0, 0, 0), font=font, anchor="lm")
    return canvas


def save_panels(path, panels, per_row=4):
    """Panels into one PNG, `per_row` side by side."""
    from PIL import Image

    rows = [panels[i:i + per_row] for i in range(0, len(panels), per_row)]
    heights = [max(p.height for p in row) + 16 for row in rows]
    whole = Image.new("RGB", (max(sum(p.width + 16 for p in row) for row in rows), sum(heights)), (255, 255, 255))
    for row, top in zip(rows, np.cumsum([0, *heights[:-1]])):
        left = 0
        for image in row:
            whole.paste(image, (left, int(top)))
            left += image.width + 16
    files.save_image(path, np.asarray(whole))


def save_completions(path, completions):
    """A .npz of uint8 arrays on 0..16, one per key ("MODEL/MASK", or "MODEL/draws")."""
    arrays = {key: pixels.round().clamp(0, common.PIXEL_MAX).to(torch.uint8).numpy()
              for key, pixels in completions.items()}

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
                        help=f"families and baselines to run (default all: {', '.join(family_names + list(BASELINES))}; "
                             "with --input, every family)")
    parser.add_argument("--masks", nargs="+", default=list(MASK_NAMES), choices=MASK_NAMES, metavar="MASK",
                        help=f"built-in masks (default all: {', '.join(MASK_NAMES)})")
    parser.add_argument("--extra-mask", action="append", default=[], metavar="FILE.npy",
                        help="add a mask: (64,) booleans (True = missing) for every digit, or (N, 64) whose row "
                             "i mod N is digit i's; named after the file; repeatable")
    parser.add_argument("--input", type=Path, default=None, metavar="DIGITS.npy",
                        help="complete your own digits instead: (N, 64) or (N, 8, 8) pixels on 0..16, hidden by "
                             "--mask; writes OUT/inpaint_input.png and OUT/inpaint_input.npz")
    parser.add_argument("--mask", default=None, metavar="NAME|FILE.npy",
                        help=f"with --input: the pixels to hide, one of {', '.join(FIXED_MASKS)} or a boolean .npy "
                             "((64,), (8, 8), or one row per digit; True = hidden)")
    parser.add_argument("--pick", type=pick_flag, default=8, metavar="draw|best-of-K",
                        help="draw: one draw per digit only; best-of-K: also the committed completion, the most likely "
                             "of K draws under the family's own likelihood (default best-of-8)")
    parser.add_argument("--copied", type=common.positive_int, default=50, metavar="N",
                        help="the first N digits are drawn K times, for the committed completion and (4 draws) the "
                             "diversity (default %(default)s)")
    parser.add_argument("--split", choices=("test", "val"), default="test",
                        help="the digits to complete: test to report, val to choose a method's settings "
                             "(default %(default)s)")
    results.add_folder_flags(parser, "inpaint.md, .json, .png and inpaint_completions.npz (with --input: "
                                     "inpaint_input.png and .npz)")
    parser.add_argument("--seed", type=common.seed_int, default=0,
                        help="seed of the random masks and of every completion (default %(default)s)")
    parser.add_argument("--batch-size", type=common.positive_int, default=512,
                        help="digits per complete() call (default %(default)s)")
    results.add_machine_flags(parser)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in inpaint.json
    if (args.input is None) != (args.mask is None):
        parser.error("--input and --mask go together")
    body = complete_yours if args.input is not None else complete_everything
    processes.tool("inpaint.py", lambda: body(args),
                   "a model run it started was stopped and its files discarded; the files in --out are whole")


def chosen_models(args, names):
    """The --models asked for (default `names`), an unknown one a one-line error."""
    family_names = [f.name for f in registry.FAMILIES]
    models = args.models or names
    unknown = [m for m in models if m not in family_names + list(BASELINES)]
    if unknown:
        raise plumbing.UsageError(f"unknown model {unknown[0]!r}; choose from "
                                  f"{', '.join(family_names + list(BASELINES))}")
    return models


def load_completers(models, args, out, device, splits):
    """The families' trained models and the baselines named in `models`: (completers, {skipped
    name: reason}, {baseline: seconds to fit})."""
    completers, skipped, setup_seconds = [], {}, {}
    for family in registry.FAMILIES:
        if family.name in models:
            model, reason = results.load_family(family, results.out_folder(args.weights), not args.no_train,
                                                  args.threads, device, tool="inpaint")
            if model is None:
                print(f"inpaint: skipped {family.name}: {reason}", file=sys.stderr)
                skipped[family.name] = reason
            else:
                completers.append(model)
    family_names = [f.name for f in registry.FAMILIES]
    if set(models) & set(family_names):  # families were asked for: if none loaded, a table already there stays
        files.keep_table(out / "inpaint.md", [c for c in completers if c.name in family_names])
    for name, make in (("GaussianMixture", lambda: GaussianMixtureCompleter(splits, args.seed)),
                       ("Nearest neighbour", lambda: NearestNeighbourCompleter(splits["train"])),
                       ("Independent pixels", lambda: IndependentPixelsCompleter(splits["train"]))):
        if name in models:
            with common.timed(torch.device("cpu")) as took:  # fitting counts in the baseline's seconds
                completers.append(make())
            setup_seconds[name] = took
    return completers, skipped, setup_seconds


def complete_everything(args):
    """The body of main(): every family and baseline on every mask, then the outputs."""
    start = time.perf_counter()
    models = chosen_models(args, [f.name for f in registry.FAMILIES] + list(BASELINES))
    device = runs.choose_device(args.device)  # before --out is made: a refused device leaves nothing
    out = results.out_folder(args.out)
    pixels, labels = common.load_digits_arrays()
    splits, label_splits = common.split_arrays(pixels), common.split_arrays(labels)
    digits, digit_labels = splits[args.split], label_splits[args.split]
    n = len(digits)
    all_masks = built_in_masks(n, args.seed + (args.split == "val"))  # val's random masks differ from test's
    masks = {name: all_masks[name] for name in dict.fromkeys(args.masks)}
    descriptions = {name: MASK_DESCRIPTIONS[name] for name in masks}
    for file in args.extra_mask:
        name, mask = load_extra_mask(file, n, taken=(*MASK_NAMES, *masks))
        masks[name], descriptions[name] = mask, f"--extra-mask {Path(file).name}"
    processes.claim_out(out, "inpaint.py")  # after the masks are read: a refused one makes no folder
    args.threads = args.threads or runs.auto_threads()
    torch.set_num_threads(args.threads)
    show = not args.no_progress
    classifier, classifier_accuracy = quality.digit_classifier(results.out_folder(args.weights))
    x = torch.from_numpy(digits).to(device)
    missing = {name: torch.from_numpy(mask).to(device) for name, mask in masks.items()}
    completers, skipped, setup_seconds = load_completers(models, args, out, device, splits)

    rows, completions, drawn, committed, seconds, cpu_seconds = [], {}, {}, {}, {}, {}
    for index, completer in enumerate(completers):
        family_start, family_cpu = time.perf_counter(), time.process_time()
        for mask_index, (mask_name, mask) in enumerate(missing.items()):
            with processes.announced(f"inpaint: {completer.name} on {mask_name}", show):
                try:
                    metrics, first, draws, best = evaluate(
                        completer, x, digit_labels, mask, classifier, seed=args.seed + 1000 * index + mask_index,
                        device=device, copied=args.copied, draws=args.pick, batch_size=args.batch_size)
                except NotImplementedError as error:
                    reason = plumbing.first_line(error, "complete() is not implemented")
                    print(f"inpaint: left out {completer.name}: {reason}", file=sys.stderr)
                    skipped[completer.name] = reason
                    break
            rows.append(dict(model=completer.name, mask=mask_name, **metrics))
            completions[completer.name, mask_name], drawn[completer.name, mask_name] = first, draws
            committed[completer.name, mask_name] = best
        else:
            setup = setup_seconds.get(completer.name, dict(wall=0.0, cpu=0.0))
            seconds[completer.name] = round(time.perf_counter() - family_start + setup["wall"], 2)
            cpu_seconds[completer.name] = round(time.process_time() - family_cpu + setup["cpu"], 2)
            continue
        rows = [r for r in rows if r["model"] != completer.name]
        completions, drawn, committed = ({k: v for k, v in kept.items() if k[0] != completer.name}
                                         for kept in (completions, drawn, committed))

    # references: the true digits, and the observed pixels alone (missing = 0)
    with torch.no_grad():
        true_accuracy = (classifier(x.cpu()).argmax(1) == torch.from_numpy(digit_labels)).double().mean().item()
        for mask_name, mask in missing.items():
            blanked = x.cpu() * ~mask.cpu()
            rows.append(dict(model="Observed only (missing = 0)", mask=mask_name,
                             accuracy=(classifier(blanked).argmax(1) == torch.from_numpy(digit_labels))
                             .double().mean().item(),
                             mse=((x.cpu()[mask.cpu()]) ** 2).mean().item(), missing_nll=None, diversity=0.0,
                             seconds=0.0))
    family_names_run = [c.name for c in completers if c.name in seconds and c.name not in BASELINES]
    mask_info = {name: dict(description=descriptions[name], missing_pixels=float(masks[name].sum(1).mean()))
                 for name in masks}
    setup = dict(split=args.split, digits=n, draws=args.pick, copied=min(args.copied, n))
    verdict_ = verdict(rows, list(masks), family_names_run)
    table = markdown(rows, mask_info, family_names_run, seconds, cpu_seconds, skipped, setup, verdict_)
    table += (f"\nThe classifier's accuracy on the whole {args.split} digits is {true_accuracy:.3f}; \"Observed only\" "
              f"classifies the inputs with the missing pixels at 0.\n")
    shown = [int(np.flatnonzero(digit_labels[:setup["copied"]] == digit)[0]) for digit in (2, 5, 8)
             if (digit_labels[:setup["copied"]] == digit).any()][:3] or [0]
    panels = [panel(f"mask {mask_name}: {descriptions[mask_name]}", x.cpu()[shown], missing[mask_name].cpu()[shown],
                    x.cpu()[shown], {m: d[:, shown] for (m, k), d in drawn.items() if k == mask_name},
                    {m: (b[shown] if b is not None else None) for (m, k), b in committed.items() if k == mask_name},
                    best_of=args.pick)
              for mask_name in missing]
    with processes.SIGNALS.held():  # the four files complete, then a signal's exit 130
        files.write_table(out / "inpaint.md", table)
        save_panels(out / "inpaint.png", panels)
        save_completions(out / "inpaint_completions.npz", {f"{model}/{mask}": c for (model, mask), c in completions.items()})
        files.save_json(out / "inpaint.json", dict(
            masks=mask_info, rows=rows, verdict=verdict_, family_seconds=seconds, family_cpu_seconds=cpu_seconds,
            skipped=skipped, setup=setup,
            classifier_accuracy_on_digits=true_accuracy, classifier_reported_accuracy=classifier_accuracy,
            seed=args.seed, copies=COPIES, device=str(device),
            threads=torch.get_num_threads(), seconds=round(time.perf_counter() - start, 2),
            argv=args.argv))
    processes.emit(table)


def read_user_digits(file):
    """--input FILE.npy -> (N, 64) float pixels: (N, 64) or (N, 8, 8) numbers on 0..16 (integers,
    or floats that are whole); anything else a one-line plumbing.UsageError."""
    array = read_array(file, "--input", pixel_shape)
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise plumbing.UsageError(f"--input: {file} holds {array.dtype}; expected numbers on 0..16")
    if array.ndim == 3 and array.shape[1:] == (SIDE, SIDE):
        array = array.reshape(len(array), -1)
    if array.ndim != 2 or array.shape[1] != common.NUM_PIXELS or len(array) == 0:
        raise plumbing.UsageError(f"--input: {file} has shape {array.shape}; expected (N, 64) or (N, 8, 8) with N >= 1")
    values = array.astype(np.float64)
    if not np.isfinite(values).all() or values.min() < 0 or values.max() > common.PIXEL_MAX or (values != np.round(values)).any():
        raise plumbing.UsageError(f"--input: {file} holds values outside the whole numbers 0..16 (NaN, infinite, "
                                  "negative, fractional or above 16); digits are 8x8 pixels on 0..16")
    return values


def read_user_mask(text, n):
    """--mask NAME or FILE.npy -> (n, 64) bool: a named half or the centre, or booleans (True =
    hidden) of shape (64,), (8, 8), (n, 64) or (n, 8, 8); every row must hide a pixel and show one."""
    if text in FIXED_MASKS:
        return np.repeat(built_in_masks(1, 0)[text], n, 0)
    if not text.endswith(".npy"):
        raise plumbing.UsageError(f"--mask: expected one of {', '.join(FIXED_MASKS)} or a .npy file, got {text!r}")
    array = as_mask(read_array(text, "--mask", pixel_shape), f"--mask: {text}")
    if array.shape in ((common.NUM_PIXELS,), (SIDE, SIDE)):
        array = np.repeat(array.reshape(1, -1), n, 0)
    elif array.shape in ((n, common.NUM_PIXELS), (n, SIDE, SIDE)):
        array = array.reshape(n, -1)
    else:
        raise plumbing.UsageError(f"--mask: {text} has shape {array.shape}; expected (64,), (8, 8), ({n}, 64) or "
                                  f"({n}, 8, 8) for the {n} digits of --input")
    check_rows(array, f"--mask: {text}")
    return array


def complete_yours(args):
    """--input: the user's digits completed by every family (4 draws and the committed one) into
    OUT/inpaint_input.png and .npz; nothing written on a bad input."""
    x_np = read_user_digits(args.input)
    missing_np = read_user_mask(args.mask, len(x_np))
    models = chosen_models(args, [f.name for f in registry.FAMILIES])
    device = runs.choose_device(args.device)
    out = results.out_folder(args.out)
    processes.claim_out(out, "inpaint.py")
    args.threads = args.threads or runs.auto_threads()
    torch.set_num_threads(args.threads)
    splits = common.split_arrays(common.load_digits_arrays()[0])
    x, missing = torch.from_numpy(x_np).float().to(device), torch.from_numpy(missing_np).to(device)
    completers, skipped, _ = load_completers(models, args, out, device, splits)
    draws, committed, arrays = {}, {}, {}
    for index, completer in enumerate(completers):
        try:
            _, drawn = draw_completions(completer, x, missing, max(args.pick, COPIES), len(x), seed=args.seed + index,
                                        device=device, batch_size=args.batch_size)
        except NotImplementedError as error:
            skipped[completer.name] = plumbing.first_line(error, "complete() is not implemented")
            continue
        draws[completer.name] = drawn
        committed[completer.name] = (best_of(completer, drawn[:args.pick], seed=args.seed, device=device,
                                             batch_size=args.batch_size) if args.pick > 1 else None)
        arrays[f"{completer.name}/draws"] = drawn
        if committed[completer.name] is not None:
            arrays[f"{completer.name}/committed"] = committed[completer.name]
        print(f"inpaint: {completer.name}: {len(drawn)} draws of {len(x)} digits"
              + (", committed: best of " + str(args.pick) if committed[completer.name] is not None else
                 ", no likelihood to commit by"), file=sys.stderr, flush=True)
    for name, reason in skipped.items():
        print(f"inpaint: left out {name}: {reason}", file=sys.stderr)
    if not draws:
        raise plumbing.UsageError("no family could complete the digits; nothing written")
    shown = list(range(min(len(x), 12)))
    picture = panel(f"{args.input.name}, mask {Path(args.mask).name}", x.cpu()[shown], missing.cpu()[shown], None,
                    {m: d[:, shown] for m, d in draws.items()},
                    {m: (b[shown] if b is not None else None) for m, b in committed.items()}, best_of=args.pick)
    with processes.SIGNALS.held():
        save_panels(out / "inpaint_input.png", [picture])
        save_completions(out / "inpaint_input.npz", dict(arrays, input=x.cpu(), mask=missing.cpu().to(torch.uint8)))
    processes.emit(f"inpaint: wrote {out / 'inpaint_input.png'} and {out / 'inpaint_input.npz'}")


if __name__ == "__main__":
    main()
