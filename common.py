"""Shared core of the model scripts: data split, flags, device, seeding, the model contract, the
training loop with early stopping, checkpoints and shipped weights, and every output (curve, GIF,
sample grid, samples, metrics, timings, sample quality).

Every model script subclasses ``DigitsModel`` (below), so the loop never branches on the family
and never probes with hasattr: a model gives its training loss for a batch, a sampler, and where
it exists a test NLL in nats; the optional parts have defaults in the base class. Each script's
settings are two dataclasses, ``Config`` (shapes the trained weights: stored with them) and
``Sampling`` (evaluation and sampler settings: never stored, free to change with --sample-only),
whose fields make its flags (``option``, ``add_options``), so every default is written once.

x is always a float tensor (B, 64) of pixels on the 0..16 scale of ``load_digits().data``; each
model maps it to its own space with the transforms here. Models do math; this file measures.
"""

import argparse
import contextlib
import dataclasses
import io
import itertools
import json
import math
import os
import pickle
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

NUM_PIXELS = 64  # 8 x 8 images
PIXEL_MAX = 16  # pixels are integers 0..16
NUM_LEVELS = PIXEL_MAX + 1
NUM_CLASSES = 10  # the digits 0..9
NULL_CLASS = NUM_CLASSES  # "no label": the extra row of a class embedding that classifier-free guidance drops to
TRAIN_END, VAL_END = 1000, 1350  # train = [:1000], val = [1000:1350], test = [1350:] (447)
PM1_LOGDET = NUM_PIXELS * math.log(1 / 8)  # log|det d pixels_to_pm1 / dx| per image
PM1_BIN_HALF_WIDTH = 1 / 16  # on the [-1, 1] scale, level k owns the box -1 + k / 8 +- 1/16
QUICK_SIZES = dict(train=200, val=100, test=100)  # --quick trains and evaluates on subsets
# 2 torch threads trained eight of nine families 1.1-1.6x faster than 1 on an idle 2-core machine
# (README "Speed", `python benchmark.py`: a training step on 1 and on 2 threads); beside a busy core, two
# spinning threads stall each other, so the default takes only the cores that are idle
MAX_AUTO_THREADS = 2
DEFAULT_THREADS = min(MAX_AUTO_THREADS, os.cpu_count() or 1)
EXIT_USAGE, EXIT_NONFINITE, EXIT_INTERRUPTED = 2, 1, 130
# the resume checkpoint is rewritten at most this often while training, and when training ends:
# written after every epoch it took DDPM's ~450 short epochs 27 ms each on the idle machine (a
# 20 MB file), about 12 s beside its ~50 s of training
CHECKPOINT_SECONDS = 30.0


# -----------------------------------------------------------------------------
# data and the transforms between pixel spaces


def load_digits_arrays():
    """All 1797 digits: pixels (1797, 64) float32 on 0..16 and labels (1797,) int64."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.data.astype(np.float32), digits.target.astype(np.int64)


def split_arrays(array, quick=False):
    """Split any per-image array the same way: train [:1000], val [1000:1350], test [1350:]."""
    splits = dict(train=array[:TRAIN_END], val=array[TRAIN_END:VAL_END], test=array[VAL_END:])
    if quick:
        splits = {key: value[: QUICK_SIZES[key]] for key, value in splits.items()}
    return splits


def load_splits(device, quick=False):
    """dict(train, val, test) of float32 tensors (N, 64) on 0..16, moved to the device once."""
    pixels, _ = load_digits_arrays()
    return {k: torch.from_numpy(v.copy()).to(device) for k, v in split_arrays(pixels, quick).items()}


def load_label_splits(device, quick=False):
    """dict(train, val, test) of int64 label tensors (N,), aligned with load_splits."""
    _, labels = load_digits_arrays()
    return {k: torch.from_numpy(v.copy()).to(device) for k, v in split_arrays(labels, quick).items()}


def pixels_to_pm1(x):
    """0..16 -> [-1, 1]: y = x / 8 - 1 (log|det| per image is PM1_LOGDET)."""
    return x / 8 - 1


def pm1_to_pixels(y):
    """[-1, 1] -> 0..16, clamped."""
    return ((y + 1) * 8).clamp(0, PIXEL_MAX)


def log_ndtr(x):
    """log Phi(x), elementwise, accurate in both tails, from erfc and erfcx. Unlike
    torch.special.log_ndtr it has a vmap batching rule (so jacfwd under vmap stays batched) and is
    faster on CPU; the two agree to 1e-12 (tests/test_fm.py)."""
    negative, positive = x.clamp(max=0), x.clamp(min=0)  # each branch sees only its own half: no inf
    left = torch.log(0.5 * torch.special.erfcx(-negative / math.sqrt(2))) - 0.5 * negative**2
    right = torch.log1p(-0.5 * torch.special.erfc(positive / math.sqrt(2)))
    return torch.where(x < 0, left, right)


def log_normal_mass(lower, upper, log_cdf=torch.special.log_ndtr):
    """log(Phi(upper) - Phi(lower)) for lower < upper (either may be infinite), elementwise and
    accurate in both tails: an interval above 0 is reflected, Phi(u) - Phi(l) = Phi(-l) - Phi(-u),
    so the difference is never that of two numbers near 1. The mass of a normal in a pixel's box
    (DDPM's decoder, box_posterior). log_cdf: log Phi (log_ndtr under vmap)."""
    flip = (lower + upper) > 0  # nan-free: inf + finite; -inf + inf only for the full line
    a = torch.where(flip, -upper, lower)
    b = torch.where(flip, -lower, upper)
    log_a, log_b = log_cdf(a), log_cdf(b)  # log_a <= log_b
    # log Phi(b) + log(1 - Phi(a) / Phi(b))
    return log_b + torch.log(-torch.expm1((log_a - log_b).clamp(max=-1e-30)))


def value_and_divergence(fn, z, t, method="exact"):
    """fn(z, t) (B, D) and its divergence tr(d fn / d z) (B,), for (B,) times t: exact (the
    Jacobian by D forward-mode derivatives per row, jacfwd under vmap) or Hutchinson's unbiased
    estimate r^T J r with one Rademacher vector r. The change of variables of an ODE's density
    (SBGM's probability-flow ODE, flow matching)."""
    if method == "exact":
        def single(z_i, t_i):  # one row: (D,) -> (D,)
            out = fn(z_i[None], t_i[None])[0]
            return out, out

        jacobian, value = torch.func.vmap(torch.func.jacfwd(single, has_aux=True))(z, t)  # (B, D, D)
        return value, jacobian.diagonal(dim1=1, dim2=2).sum(1)
    if method != "hutchinson":
        raise ValueError(f"unknown divergence method {method!r}; choose exact or hutchinson")
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        value = fn(z, t)
        probe = torch.randint_like(z, 2) * 2 - 1
        (vjp,) = torch.autograd.grad((value * probe).sum(), z)
    return value.detach(), (vjp * probe).sum(1)


class BoxPosterior:
    """What box_posterior returns: probs p(k | z) over the 17 levels (B, 64, 17), mean_noise
    E[eps | z] (B, 64), and mean_data E[x | z] (B, 64), x the clean pixel on the [-1, 1] scale,
    computed when asked for (SBGM and DDPM need only E[eps | z])."""

    def __init__(self, probs, mean_noise, centers, sigma_tilde, offset):
        self.probs, self.mean_noise = probs, mean_noise
        self._centers, self._sigma_tilde, self._offset = centers, sigma_tilde, offset  # c_k, sigma~, mu - m

    @property
    def mean_data(self):  # sum_k p(k | z) (c_k + sigma~ (mu - m))
        return (self.probs * (self._centers + self._sigma_tilde * self._offset)).sum(-1)


def box_posterior(logits, z, alpha, sigma, half_width=PM1_BIN_HALF_WIDTH):
    """The exact posterior of a pixel x observed through z = alpha x + sigma eps, eps ~ N(0, 1),
    when its level k in 0..16 has prior probabilities softmax(logits) and, given k, x is uniform in
    the box c_k +- h, c_k = k / 8 - 1 (h = PM1_BIN_HALF_WIDTH: uniformly dequantized pixels, SBGM
    and FM; h = 0: point masses at the levels, DDPM). The same as x~ = z / alpha = x + sigma~ eps,
    sigma~ = sigma / alpha. The "score interpolation" of Dieleman et al. 2022, with boxes.

    logits (B, 64, 17) or (64, 17), z (B, 64), alpha and sigma (B,) -> BoxPosterior.
    Given k, u = -eps = (alpha x - z) / sigma is a standard normal truncated to [m - w, m + w],
    m = (alpha c_k - z) / sigma, w = alpha h / sigma, so p(z | k) is proportional to
    Phi(m + w) - Phi(m - w) (to exp(-m^2 / 2) when h = 0), and the truncated mean is
    mu = (phi(m - w) - phi(m + w)) / mass = 2 phi(m) exp(-w^2 / 2) sinh(m w) / mass, computed as
    sign(m) phi(|m| - w) (1 - exp(-2 |m| w)) / mass, no difference of near-equal numbers for a narrow
    box (w -> 0: large sigma~), and clamped to [m - w, m + w] so that far boxes (posterior 0) stay
    finite. Then E[eps | z, k] = -mu and E[x | z, k] = c_k + sigma~ (mu - m), free of cancellation
    (|mu - m| <= w). The vmap-safe log_ndtr lets jacfwd under vmap differentiate it
    (value_and_divergence, exact). Precision: float64 matches quadrature to 1e-7 (tests); in float32
    the mass of a box narrower than ~1e-3 in units of sigma~ loses digits, so for sigma~ >= 100
    E[x | z] may be off by up to ~h (E[eps | z] by ~1e-3), and for boxes thousands of sigma~ away
    the clamp may pick the wrong edge of the box."""
    centers = pixels_to_pm1(torch.arange(NUM_LEVELS, device=z.device, dtype=z.dtype))  # c_k, (17,)
    alpha, sigma = alpha[:, None, None], sigma[:, None, None]
    m = (alpha * centers - z[..., None]) / sigma  # (B, 64, 17): the box's midpoint in units of -eps
    if half_width == 0:
        log_likelihood, mu = -0.5 * m**2, m
    else:
        w = alpha * half_width / sigma  # the box's half-width in those units, the same for every k
        log_likelihood = log_normal_mass(m - w, m + w, log_cdf=log_ndtr)  # log p(z | k) + const
        # mean of N(0, 1) on [m - w, m + w]: sign(m) phi(|m| - w) (1 - e^(-2 |m| w)) / mass
        log_ratio = (-0.5 * (m.abs() - w) ** 2 - 0.5 * math.log(2 * math.pi)
                     + torch.log(-torch.expm1(-2 * (m.abs() * w).clamp_min(1e-20))) - log_likelihood)
        mu = torch.minimum(torch.maximum(torch.sign(m) * torch.exp(log_ratio), m - w), m + w)
    probs = torch.softmax(logits + log_likelihood, dim=-1)  # p(k | z)
    return BoxPosterior(probs, -(probs * mu).sum(-1), centers, sigma / alpha, mu - m)


def rk4_with_divergence(field, x, nodes):
    """Classical RK4 for dx/ds = f(x, s) along the nodes s_0, s_1, ..., s_n (floats, increasing or
    decreasing; each step from s_i to s_i+1 with its midpoint), integrating with the same stages
    I = int_{s_0}^{s_n} div f ds. field(x (B, D), s) -> (f (B, D), div f (B,)); returns (x(s_n), I (B,)).
    For a density carried by the flow, d log p(x(s)) / ds = -div f, so
    log p(x(s_0)) = log p(x(s_n)) + I: the likelihood of FM's ODE and SBGM's probability-flow ODE,
    each in its own variable s and grid of nodes."""
    integral = x.new_zeros(len(x))
    for s, s_next in zip(nodes[:-1], nodes[1:]):
        h, middle = s_next - s, 0.5 * (s + s_next)
        k1, d1 = field(x, s)
        k2, d2 = field(x + 0.5 * h * k1, middle)
        k3, d3 = field(x + 0.5 * h * k2, middle)
        k4, d4 = field(x + h * k3, s_next)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        integral = integral + h / 6 * (d1 + 2 * d2 + 2 * d3 + d4)
    return x, integral


def standard_normal_log_prob(z):
    """(B, D) -> (B,) sum_i log N(z_i; 0, 1)."""
    return -0.5 * (z**2).sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi)


def dequantize(x):
    """Uniform dequantization: x + u, u ~ U[0, 1)^64, so x + u lies in [x, x + 1).

    A density p on the continuous v = x + u bounds the discrete likelihood:
    -log P(x) <= E_u[-log p(x + u)] (Jensen), in nats per image on the 0..16 pixels.
    """
    return x + torch.rand_like(x)


def independent_pixel_log_probs(train):
    """(64, 17) log p_i(v): the per-pixel independent categorical over 0..16 fitted on `train`
    ((N, 64) pixels) with add-0.5 smoothing, the classical baseline of leaderboard.py and ood.py."""
    train = np.asarray(train).round().astype(int)
    counts = np.stack([np.bincount(train[:, i], minlength=NUM_LEVELS) for i in range(NUM_PIXELS)])
    return np.log((counts + 0.5) / (len(train) + 0.5 * NUM_LEVELS))


def nats_to_bpd(nats):
    """Nats per image -> bits per dimension on the 64 pixels."""
    return nats / (NUM_PIXELS * math.log(2))


# -----------------------------------------------------------------------------
# flags


class UsageError(Exception):
    """Bad input from the user: reported in one line, exit status 2."""


def _number(kind, test, allowed):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}") from None
        if not (math.isfinite(value) and test(value)):
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}")
        return value

    return parse


positive_int = _number(int, lambda v: v > 0, "an integer >= 1")
nonnegative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0, "a number > 0")
nonnegative_float = _number(float, lambda v: v >= 0, "a number >= 0")
unit_interval = _number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
seed_int = _number(int, lambda v: 0 <= v < 2**31, "an integer in [0, 2^31)")  # seed + k stays in range
thread_count = _number(int, lambda v: 1 <= v <= 256, "an integer from 1 to 256")


def digit_list(text):
    """--digits: "3,7" -> (3, 7), each a class 0..9, none twice."""
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() and int(part) < NUM_CLASSES for part in parts) or len(set(parts)) < len(parts):
        raise argparse.ArgumentTypeError(f"expected distinct digits 0-9 separated by commas (e.g. 3,7), got {text!r}")
    return tuple(int(part) for part in parts)


def threads_flag(value):
    """--threads: "auto" (None: chosen at start from the idle cores) or a count 1..256."""
    return None if value == "auto" else thread_count(value)


class Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line and exit 2 (used by every script)."""

    def error(self, message):  # one line, exit 2 (argparse's default prints the whole usage)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def make_parser(script, doc, *, epochs, batch_size, lr, patience, ema=0.0, gif_every=1, num_samples=1000):
    """The flags every script shares; defaults are the script's own. script: its __file__."""
    parser = Parser(prog=Path(script).name, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=positive_int, default=None,
                       help=f"maximum number of epochs (default {epochs}; 2 with --quick)")
    train.add_argument("--batch-size", type=positive_int, default=batch_size,
                       help="minibatch size (default %(default)s)")
    train.add_argument("--lr", type=positive_float, default=lr, help="learning rate (default %(default)s)")
    train.add_argument("--patience", type=positive_int, default=patience,
                       help="early stopping: epochs without a better validation objective (default %(default)s)")
    train.add_argument("--ema", type=unit_interval, default=ema,
                       help="decay of an exponential moving average of the weights used for "
                            "evaluation and sampling; 0 turns it off (default %(default)s)")
    train.add_argument("--seed", type=seed_int, default=0, help="random seed (default %(default)s)")
    train.add_argument("--resume", action="store_true",
                       help="continue training from OUT/NAME_resume.pt (model, optimizer, EMA, epoch, "
                            "RNG states); the flags of training must be the same")
    run_group = parser.add_argument_group("machine and outputs")
    run_group.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"),
                           help="auto picks cuda, then mps, then cpu (default %(default)s)")
    run_group.add_argument("--threads", type=threads_flag, default=None, metavar="N|auto",
                           help=f"CPU threads for torch (default auto: the cores idle at the start, measured "
                                f"over 0.2 s, at most {MAX_AUTO_THREADS}; results repeat exactly for the same "
                                f"seed and thread count)")
    run_group.add_argument("--out", type=Path, default=Path("results"),
                           help="folder for every output (default %(default)s)")
    run_group.add_argument("--num-samples", type=positive_int, default=None,
                           help=f"samples written to NAME_samples.npy (default {num_samples}; 64 with --quick)")
    run_group.add_argument("--gif-every", type=positive_int, default=gif_every,
                           help="add a frame to the training GIF every K epochs (default %(default)s)")
    run_group.add_argument("--checkpoint-seconds", type=nonnegative_float, default=CHECKPOINT_SECONDS,
                           help="rewrite the resume checkpoint OUT/NAME_resume.pt at most this often while "
                                "training (0: after every epoch); it is always written when training ends "
                                "(default %(default)s)")
    run_group.add_argument("--digits", type=digit_list, default=None, metavar="D,D,...",
                           help="with --conditional: the classes to draw, e.g. 3,7 (default all ten); "
                                "--num-samples are shared equally among them")
    run_group.add_argument("--sample-only", action="store_true",
                           help="load the weights OUT/NAME.pt (shipped in results/) and write samples and "
                                "metrics without training")
    run_group.add_argument("--quick", action="store_true",
                           help="a tiny run for smoke tests: 2 epochs, small data subsets, 64 samples")
    run_group.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(_full_epochs=epochs, _full_samples=num_samples)
    return parser


def parse_args(parser, argv=None):
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = 2 if args.quick else args._full_epochs
    if args.num_samples is None:
        args.num_samples = 64 if args.quick else args._full_samples
    if args.quick:
        args.gif_every = 1  # several frames even in a 2-epoch run
    if args.resume and args.sample_only:
        parser.error("--resume and --sample-only exclude each other")
    if args.digits is not None and not args.conditional:
        parser.error("--digits picks the classes of a conditional model; add --conditional")
    if args.conditional and args.num_samples < len(args.digits or range(NUM_CLASSES)):
        parser.error(f"--num-samples {args.num_samples} is fewer than the {len(args.digits or range(NUM_CLASSES))} "
                     f"classes to draw")
    if args.num_samples > MAX_SAMPLES:  # refused up front: the quality measures compare every pair
        parser.error(f"--num-samples {args.num_samples} is too many "
                     f"(at most {MAX_SAMPLES}: the sample-quality measures compare every pair of samples)")
    defaults = vars(parser.parse_args([]))
    defaults.update(epochs=args._full_epochs, num_samples=args._full_samples)
    del args._full_epochs, args._full_samples
    args.prog = parser.prog
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in the metrics
    # what makes this run other than the script's default run: the leaderboard judges a run by
    # its settings, not its argv (a resumed default run is a default run)
    args.changed_settings = {key: value for key, value in vars(args).items()
                             if key in defaults and not key.startswith("_") and key not in RESULT_NEUTRAL
                             and value != defaults[key]}
    return args


MAX_SAMPLES = 10_000  # --num-samples at most: the sample-quality measures hold an N x N distance matrix
RESULT_NEUTRAL = ("out", "threads", "no_progress", "checkpoint_seconds", "resume", "device")  # not settings


def option(default, help, *, type=None, choices=None, quick=None, flag=None):
    """A dataclass field that is also a flag: --name-with-dashes (or `flag`, a string or a tuple
    of aliases), with help text and a parser for the value (`type`, or `choices`). A bool that
    defaults to True becomes --no-NAME, one that defaults to False --NAME. quick: the value
    --quick uses when the flag is not given. A default of None means the script resolves it
    from other flags (the help says how)."""
    return dataclasses.field(default=default, metadata=dict(
        help=help, type=type, choices=choices, quick=quick, flag=flag))


def add_options(parser, title, settings):
    """Add one flag per field of the dataclass `settings` to an argument group `title`."""
    group = parser.add_argument_group(title)
    for field in dataclasses.fields(settings):
        meta, dashed = field.metadata, field.name.replace("_", "-")
        if isinstance(field.default, bool):
            flag = meta["flag"] or (f"--no-{dashed}" if field.default else f"--{dashed}")
            group.add_argument(flag, dest=field.name, action="store_false" if field.default else "store_true",
                               help=meta["help"])
            continue
        default = "" if field.default is None else f" (default {field.default}" + (
            f"; {meta['quick']} with --quick)" if meta["quick"] is not None else ")")
        flags = meta["flag"] or f"--{dashed}"
        group.add_argument(*([flags] if isinstance(flags, str) else flags), dest=field.name, default=None,
                           type=meta["type"], choices=meta["choices"], help=meta["help"] + default)


def options_from(args, settings):
    """The dataclass `settings` filled from parsed flags: a flag not given takes the field's
    default, or its quick value under --quick."""
    values = {}
    for field in dataclasses.fields(settings):
        value = getattr(args, field.name)
        if value is None and args.quick and field.metadata.get("quick") is not None:
            value = field.metadata["quick"]
        values[field.name] = field.default if value is None else value
    return settings(**values)


# -----------------------------------------------------------------------------
# the model contract


class NonFiniteLoss(Exception):
    pass


def check_finite(values):
    """values: dict of floats from a training step; raises NonFiniteLoss before any weight moves."""
    for key, value in values.items():
        if not math.isfinite(value):
            raise NonFiniteLoss(f"non-finite training {key} ({value})")
    return values


VAL_FRECHET = "Frechet distance of samples to the validation split"  # a val_objective common measures


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The field every family's Config has (each subclasses this): whether it models p(x) or p(x | y)."""
    conditional: bool = option(False, "train p(x | y) for the ten digit classes instead of p(x); the files are "
                                      "named NAME_conditional_* (the default run's files are untouched)")


class DigitsModel(nn.Module):
    """What the training loop needs of a family of models.

    A subclass sets name, nll_kind and objective, the dataclasses Config and Sampling, and defines
    loss and sample; every other method has a working default. The constructor takes the two
    dataclasses (``Model(Config(...), Sampling(...))``; ``Model.build(**fields)`` for short).
    """

    name = None  # short name of every output file, e.g. "ARM"
    nll_kind = None  # "exact" | "upper_bound" | None (no likelihood: test_nll is never called)
    objective = "loss"  # what loss() returns: the curve's y axis
    val_objective = None  # None: eval_loss, in the units of `objective`; or VAL_FRECHET

    Config = ModelConfig  # settings that shape the trained weights (stored with them); subclasses add fields

    @dataclasses.dataclass(frozen=True)
    class Sampling:  # settings of evaluation and sampling only (never stored)
        pass

    def __init__(self, config=None, sampling=None):
        super().__init__()
        self.config = config if config is not None else self.Config()
        self.sampling = sampling if sampling is not None else self.Sampling()

    @classmethod
    def build(cls, **fields):
        """Model from keyword fields of Config and Sampling, the rest at their defaults."""
        names = {f.name for f in dataclasses.fields(cls.Config)}
        unknown = set(fields) - names - {f.name for f in dataclasses.fields(cls.Sampling)}
        if unknown:
            raise TypeError(f"{cls.__name__}.build: unknown fields {sorted(unknown)}")
        config = cls.Config(**{k: v for k, v in fields.items() if k in names})
        return cls(config, cls.Sampling(**{k: v for k, v in fields.items() if k not in names}))

    @property
    def conditional(self):
        """True for a model of p(x | y): sample and test_nll then take class labels y."""
        return self.config.conditional

    @property
    def output_name(self):
        """The stem of every output file: NAME, or NAME_conditional for a model of p(x | y)."""
        return f"{self.name}_conditional" if self.conditional else self.name

    @property
    def device(self):
        for tensor in itertools.chain(self.parameters(), self.buffers()):
            return tensor.device
        return torch.device("cpu")

    # --- required

    def loss(self, x, y):
        """(B, 64) pixels and (B,) class labels -> scalar training objective, mean over the batch.
        Families that model p(x) alone ignore y."""
        raise NotImplementedError

    def sample(self, n, y=None):
        """-> (n, 64) samples on the 0..16 pixel scale (torch's global RNG; the caller seeds it).
        y: None for a model of p(x); for a conditional one the (n,) classes to draw, sample i of y[i]."""
        raise NotImplementedError

    # --- optional, with defaults

    ood_kind = "nll"  # what ood_score gives: "nll" (nats), "energy" (-log p(x) + const), "score-norm"

    def test_nll(self, x, y=None):
        """(B, 64) -> (B,) -log P(x) (or an upper bound) in nats on the discrete pixels; for a
        conditional model -log P(x | y) with y (B,) the classes."""
        raise NotImplementedError(f"{self.name} has no likelihood (nll_kind None)")

    def class_log_likelihoods(self, x):
        """(B, 64) -> (B, 10) log p(x | y = c) for every class c (or a bound, or up to a constant
        per image), which makes the conditional model a generative classifier. By default
        -test_nll(x, c) for each c, every class's estimate drawn with the same noise (common
        random numbers), so that a stochastic bound's noise does not decide between classes."""
        seed = int(torch.randint(2**31 - 1, ()))  # from the caller's seeded stream
        columns = []
        for c in range(NUM_CLASSES):
            with seeded(seed, x.device):
                columns.append(-self.test_nll(x, torch.full((len(x),), c, dtype=torch.long, device=x.device)))
        return torch.stack(columns, 1)

    def ood_score(self, x):
        """(B, 64) -> (B,) a statistic that is higher for inputs less like the data (ood.py), of
        the kind ood_kind names; by default the test NLL."""
        return self.test_nll(x)

    def complete(self, x, missing):
        """Inpainting: x (B, 64) pixels, missing (B, 64) bool (True = missing) -> (B, 64) with
        the observed pixels of x kept exactly and the missing ones drawn from the family's own
        p(x_missing | x_observed), by the method that suits the family (inpaint.py)."""
        raise NotImplementedError(f"{self.name} does not complete digits yet")

    def missing_nll(self, x, missing):
        """(B,) -log p(x_missing | x_observed) in nats (or an upper bound), where the family gives
        it for this mask; NotImplementedError where it does not."""
        raise NotImplementedError(f"{self.name} gives no likelihood of the missing pixels")

    def eval_loss(self, x, y):
        """Validation objective (mean over the batch); lower is better."""
        return self.loss(x, y)

    def training_objective(self, x, y):
        """The hook of train_step: (what the step minimises, {name: value} to log), the logged
        "loss" being the curve's "train" series. By default both are loss(x, y); a family whose
        optimised objective differs from the one it reports (a KL warm-up) overrides this."""
        loss = self.loss(x, y)
        return loss, {"loss": loss.detach()}

    def train_step(self, x, y, optimizer):
        """One optimisation step on a batch; returns {"loss": value, other named terms...}, the
        terms drawn on the curve beside the training loss."""
        objective, logged = self.training_objective(x, y)
        values = check_finite({key: float(value) for key, value in logged.items()})
        optimizer_step(objective, optimizer)
        return values

    def configure_optimizer(self, lr):
        return torch.optim.Adam(self.parameters(), lr=lr)

    def extra_metrics(self, splits, labels):
        """Family-specific numbers for the metrics JSON (splits: dict of (N, 64) pixel tensors,
        labels: dict of (N,) class labels, both keyed train, val, test)."""
        return {}

    def samplers(self):
        """Other samplers, name -> fn(n) -> (n, 64): common times each and scores its samples."""
        return {}

    def extra_images(self, splits):
        """name -> ((N, 64) pixels, images per row): written as OUT/NAME_name.png."""
        return {}


def optimizer_step(objective, optimizer, frozen=(), clip=None):
    """zero_grad, backward, step: the one optimisation step of every family. frozen: parameters
    whose gradients are dropped (Adam skips a parameter whose grad is None), e.g. the
    discriminator in a generator update; clip: a maximum gradient norm, or None."""
    optimizer.zero_grad(set_to_none=True)
    objective.backward()
    for parameter in frozen:
        parameter.grad = None
    if clip is not None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()


def drop_labels(y, probability):
    """Label dropout for classifier-free guidance (Ho & Salimans 2022): (B,) classes with each
    replaced by NULL_CLASS with the given probability, so one network learns p(x | y) and p(x)."""
    return torch.where(torch.rand(y.shape, device=y.device) < probability, torch.full_like(y, NULL_CLASS), y)


def guided(predict, y, weight):
    """Classifier-free guidance: (1 + w) predict(y) - w predict(no label), predict(labels) -> a
    tensor (a noise, score or velocity prediction); weight 0 is the conditional prediction alone
    (one network call, the plain conditional sampler)."""
    if weight == 0:
        return predict(y)
    return (1 + weight) * predict(y) - weight * predict(torch.full_like(y, NULL_CLASS))


# -----------------------------------------------------------------------------
# the registry: every family once, in the order of the tables; every tool reads it


@dataclasses.dataclass(frozen=True)
class Family:
    name: str  # the model's name: OUT/NAME.pt, NAME_metrics.json, ...
    script: str  # the script that defines it, beside this file
    model_class: str  # its DigitsModel subclass in that script


FAMILIES = (
    Family("ARM", "autoregressive_model.py", "ARM"),
    Family("RealNVP", "flow_based_model_realnvp.py", "RealNVP"),
    Family("EBM", "energy_based_model.py", "EBM"),
    Family("ScM", "score_matching.py", "ScoreMatching"),
    Family("SBGM", "score_based_generative_model.py", "SBGM"),
    Family("DDPM", "ddpm.py", "DDPM"),
    Family("VAE", "variational_autoencoder.py", "VAE"),
    Family("GAN", "generative_adversarial_network.py", "GAN"),
    Family("FM", "flow_matching.py", "FM"),
    Family("MDM", "masked_diffusion.py", "MDM"),
)
ROOT = Path(__file__).resolve().parent


def family(name):
    """The registered Family called `name`; an unknown name is a UsageError naming the valid ones."""
    for entry in FAMILIES:
        if entry.name == name:
            return entry
    raise UsageError(f"unknown family {name!r}; choose from {', '.join(f.name for f in FAMILIES)}")


def model_class(name):
    """The DigitsModel subclass of the family `name`, imported from its script."""
    import importlib

    entry = family(name)
    module = importlib.import_module(Path(entry.script).stem)
    cls = getattr(module, entry.model_class)
    assert issubclass(cls, DigitsModel) and cls.name == name, f"{entry.script} registers {name} wrongly"
    return cls


# -----------------------------------------------------------------------------
# a network more than one family uses


class ResidualBlock(nn.Module):
    """A pre-activation residual block (He et al. 2016) on vectors, with options:
    layers = 2: h <- h + W2 dropout(silu(W1 act(LayerNorm(h)) + W_e e)), act = silu, or the
    identity when activate_input is False; e (B, embed) conditions it (a time or noise-level
    embedding, added between the two layers), embed = 0: no conditioning;
    layers = 1: h <- h + W1 dropout(silu(LayerNorm(h))), unconditioned."""

    def __init__(self, hidden, embed=0, dropout=0.0, layers=2, activate_input=True):
        super().__init__()
        if layers not in (1, 2) or (layers == 1 and embed):
            raise ValueError("a ResidualBlock has 1 (unconditioned) or 2 layers")
        self.layers, self.activate_input = layers, activate_input
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.cond = nn.Linear(embed, hidden) if embed else None
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, hidden) if layers == 2 else None

    def forward(self, h, e=None):  # h (B, H), e (B, E) or None
        a = self.norm(h)
        if self.layers == 1:
            return h + self.fc1(self.dropout(F.silu(a)))
        a = self.fc1(F.silu(a) if self.activate_input else a)
        if self.cond is not None:
            a = a + self.cond(e)
        return h + self.fc2(self.dropout(F.silu(a)))


class ResidualMLP(nn.Module):
    """(x (B, inputs), c) -> (B, outputs): h = W_in x, `blocks` ResidualBlocks (layers,
    activate_input: their options) conditioned on e = embedding(c), then W_out
    dropout(silu(LayerNorm(h))). With zero_output, W_out starts at zero, so the network starts at
    output 0: a uniform prior over the levels (FM, SBGM), eps = 0 beside DDPM's grid denoiser, a
    coupling at the identity (RealNVP). embedding: a module mapping c to (B, embed)
    (FourierTimeEmbedding, DDPM's step embedding, ScM's one-hot level), or None for an
    unconditional MLP (then c is not given)."""

    def __init__(self, inputs, outputs, hidden, blocks, dropout=0.0, embedding=None, embed=0, layers=2,
                 activate_input=True, zero_output=True):
        super().__init__()
        self.embedding = embedding
        self.inp = nn.Linear(inputs, hidden)
        self.blocks = nn.ModuleList(ResidualBlock(hidden, embed if embedding is not None else 0, dropout, layers,
                                                  activate_input) for _ in range(blocks))
        self.norm = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, outputs)
        if zero_output:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, x, c=None):
        e = self.embedding(c) if self.embedding is not None else None
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, e)
        return self.out(self.dropout(F.silu(self.norm(h))))


class WithClass(nn.Module):
    """(t (B,), y (B,)) -> (B, embed): an embedding of t (a time, step or noise level) plus a learned
    vector of the class y (rows 0..9 the digits, row NULL_CLASS "no label", which classifier-free
    guidance drops to): how a conditional network takes its class beside its time."""

    def __init__(self, embedding, embed):
        super().__init__()
        self.base, self.classes = embedding, nn.Embedding(NUM_CLASSES + 1, embed)

    def forward(self, pair):
        t, y = pair
        return self.base(t) + self.classes(y)


class FourierTimeEmbedding(nn.Module):
    """u (B,) a time in [0, 1] -> (B, embed): Gaussian Fourier features [sin, cos](2 pi u f) with
    fixed f ~ N(0, scale^2) (Tancik et al. 2020, the time embedding of Song et al. 2021), then two
    SiLU layers. The time input of SBGM's noise predictor and FM's velocity network."""

    def __init__(self, embed=128, scale=16.0):
        super().__init__()
        self.register_buffer("frequencies", torch.randn(embed // 2) * scale)
        self.mlp = nn.Sequential(nn.Linear(embed, embed), nn.SiLU(), nn.Linear(embed, embed), nn.SiLU())

    def forward(self, u):
        angles = 2 * math.pi * u[:, None] * self.frequencies  # (B, embed / 2)
        return self.mlp(torch.cat([angles.sin(), angles.cos()], 1))


# -----------------------------------------------------------------------------
# device, threads, seeding


def _cpu_times():
    """(idle, total) jiffies of all cores from /proc/stat's first line (Linux)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return values[3] + values[4], sum(values)  # idle + iowait; user .. steal


def idle_cores(interval=0.2):
    """How many cores other processes leave idle, measured over `interval` seconds; None where
    /proc/stat is unreadable (not Linux)."""
    try:
        idle0, total0 = _cpu_times()
        time.sleep(interval)
        idle1, total1 = _cpu_times()
    except (OSError, ValueError, IndexError):
        return None
    return (os.cpu_count() or 1) * (idle1 - idle0) / max(total1 - total0, 1)


def auto_threads(max_threads=MAX_AUTO_THREADS):
    """Torch threads for this run: the idle cores (rounded), at least 1 and at most max_threads
    and the cores this process may use. Beside one CPU-bound job on 2 cores this gives 1: two
    spinning threads on shared cores trained the ARM 3.0x slower than on the idle machine, one
    thread 1.4x (README "Speed")."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    idle = idle_cores()
    free = usable if idle is None else int(idle + 0.5)
    return max(1, min(max_threads, usable, free))


def choose_device(name):
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": has_mps}
    if name not in available:
        raise UsageError(f"unknown device {name!r}; choose one of auto, cpu, cuda, mps")
    if not available[name]:
        have = ", ".join(k for k, ok in available.items() if ok)
        raise UsageError(f"--device {name} was asked for but is not available here (available: {have})")
    return torch.device(name)


def set_seed(seed):
    """Seed python, numpy and torch (all CUDA devices too)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def seeded(seed, device):
    """Run a block with its own RNG stream, leaving the training stream untouched."""
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


def rng_state():
    numpy_state = np.random.get_state()
    state = dict(python=random.getstate(), torch=torch.get_rng_state(),
                 numpy=[numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]])
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def peak_memory_mb():
    """Peak resident memory of this process so far, in MiB (Linux reports KiB, macOS bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


@contextlib.contextmanager
def timed(device):
    """Wall and process-CPU seconds of a block, the device synchronised at both ends:
    ``with timed(device) as seconds: ...`` then seconds["wall"], seconds["cpu"]."""
    seconds = dict(wall=None, cpu=None)
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    yield seconds
    synchronize(device)
    seconds.update(wall=time.perf_counter() - wall, cpu=time.process_time() - cpu)


# -----------------------------------------------------------------------------
# outputs, each written atomically: a temporary file in the same folder, then a rename


def atomic_write(path, write):
    """Call write(tmp_path), then rename over path: a killed run never leaves a truncated file."""
    path = Path(path)
    tmp = path.with_name(temporary_name(path.name))
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as error:  # name the file the user knows, not the temporary one (or none)
        raise OSError(error.errno, error.strerror, str(path)) from None
    finally:
        if tmp.exists():
            tmp.unlink()


TEMP_MARKER = ".tmp-digits-"  # in every temporary name: .TARGET.tmp-digits-PID.SUFFIX, a name no user writes


def temporary_name(target, pid=None):
    """The hidden name atomic_write gives the file that becomes `target` (a file name)."""
    return f".{target}{TEMP_MARKER}{os.getpid() if pid is None else pid}{Path(target).suffix}"


def _temporary_pid(name):
    """The pid in `name` when it is a temporary of this project: the new form (TEMP_MARKER, any
    target), or the older .STEM.tmpPID.SUFFIX whose target is a family's own output
    (NAME.pt, NAME_*.png ...); None for any other name."""
    import re

    match = re.fullmatch(r"\.(.+)" + re.escape(TEMP_MARKER) + r"(\d{1,9})(\.[^.]*)?", name)
    if match and Path(match.group(1)).suffix == (match.group(3) or ""):
        return int(match.group(2))
    match = re.fullmatch(r"\.(.+)\.tmp(\d{1,9})(\.[a-z]+)", name)
    names = "|".join(re.escape(f.name) for f in FAMILIES)
    if match and re.fullmatch(rf"(?:{names})(?:_[a-z_]+)?", match.group(1)) and match.group(3) in (
            ".pt", ".png", ".gif", ".npy", ".json"):
        return int(match.group(2))
    return None


def remove_stale_temporaries(folder):
    """Delete the temporary files atomic_write left behind in `folder` when a process was killed
    (SIGKILL) mid-write: plain files named by temporary_name (or the older form, for a family's
    own outputs) whose process no longer runs. Nothing else in `folder` is touched: not a user's
    .notes.tmp1.md, not a folder or a link with such a name."""
    import stat

    for path in Path(folder).glob(".*tmp*"):
        pid = _temporary_pid(path.name)
        if pid is None or pid == os.getpid():
            continue
        try:
            if not stat.S_ISREG(path.lstat().st_mode):
                continue
            os.kill(pid, 0)  # raises if no such process
        except ProcessLookupError:
            try:
                path.unlink()
            except OSError:  # gone already, or not ours to remove: leave it
                pass
        except (OSError, OverflowError):  # another user's process is alive; a bogus pid is not
            pass


def code_fingerprint(script):
    """sha256 of the parsed code of a script and of common.py, docstrings and comments left out:
    tells whether results come from the current code, and mending a comment does not change it."""
    import ast
    import hashlib

    digest = hashlib.sha256()
    for path in (Path(script), Path(__file__)):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                    and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)):
                node.body = body[1:] or [ast.Pass()]
        digest.update(ast.dump(tree).encode())
    return digest.hexdigest()


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def save_json(path, data):
    text = json.dumps(_finite_or_none(data), indent=2, allow_nan=False) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))


def readme_block(name):
    """The markers around README's copy of results/NAME (e.g. "leaderboard.md")."""
    return f"<!-- results/{name}: written by the script that writes the file -->\n", f"<!-- end results/{name} -->\n"


def publish_table(path, text):
    """Write the markdown table `text` to path; when path is in this repository's results/, also
    replace README's copy of it between the readme_block markers, so README never drifts from
    results/ (tests/test_leaderboard.py checks every block against its file)."""
    path = Path(path)
    atomic_write(path, lambda tmp: tmp.write_text(text))
    readme = ROOT / "README.md"
    if path.resolve().parent != ROOT / "results" or not readme.is_file():
        return
    begin, end = readme_block(path.name)
    current = readme.read_text()
    if begin in current and end in current:
        head, rest = current.split(begin, 1)
        updated = head + begin + text.rstrip("\n") + "\n" + end + rest.split(end, 1)[1]
        atomic_write(readme, lambda tmp: tmp.write_text(updated))


def save_npy(path, array):
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, array)

    atomic_write(path, write)


def save_npz(path, **arrays):
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, write)


def save_image(path, image):
    """image: uint8 array (H, W) or (H, W, 3)."""
    from PIL import Image

    atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))


def image_grid(samples, nrow=8, scale=4):
    """(N, 64) pixels on 0..16 -> uint8 (H, W) grid, white strokes on black, upscaled `scale` times."""
    from torchvision.utils import make_grid

    images = (samples.detach().float().cpu().clamp(0, PIXEL_MAX) / PIXEL_MAX).view(-1, 1, 8, 8)
    grid = make_grid(images, nrow=nrow, padding=1, pad_value=0.35)[0]  # (H, W) in [0, 1]
    grid = (grid * 255).round().to(torch.uint8).numpy()
    return np.kron(grid, np.ones((scale, scale), dtype=np.uint8))  # nearest-neighbour upscaling


def labelled(image, text):
    """Add a strip with `text` above a uint8 (H, W) image."""
    from PIL import Image, ImageDraw

    strip = 18
    canvas = Image.new("L", (image.shape[1], image.shape[0] + strip), color=255)
    canvas.paste(Image.fromarray(image), (0, strip))
    ImageDraw.Draw(canvas).text((4, 3), text, fill=0)
    return np.asarray(canvas)


def save_gif(path, frames, last_frame_seconds=2.0, frame_seconds=0.2):
    """frames: list of uint8 (H, W), in training order; the last one is held longer."""
    import imageio.v3 as iio

    durations = [frame_seconds * 1000] * (len(frames) - 1) + [last_frame_seconds * 1000]  # ms
    if len(frames) == 1:
        durations = durations[0]  # Pillow wants a number, not a list, for a single frame
    atomic_write(path, lambda tmp: iio.imwrite(tmp, np.stack(frames), extension=".gif",
                                              duration=durations, loop=0))


def save_curve(path, history, best_epoch, name, objective, val_objective=None):
    """history: "train" and "val" per epoch, and any other training terms (dashed). A
    val_objective in other units than `objective` gets an axis of its own on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    epochs = np.arange(1, len(history["train"]) + 1)
    ax.plot(epochs, history["train"], label="train")
    for key, values in history.items():
        if key not in ("train", "val"):
            ax.plot(epochs, values, linestyle="--", linewidth=1, label=f"train: {key}")
    val_ax = ax.twinx() if val_objective else ax
    val_ax.plot(epochs, history["val"], color="tab:orange", label="validation")
    if best_epoch:
        val_ax.axvline(best_epoch, color="gray", linestyle="--", linewidth=1,
                       label=f"best epoch {best_epoch} (val {history['val'][best_epoch - 1]:.2f})")
    ax.set_xlabel("epoch")
    ax.set_ylabel(objective)
    if val_objective:  # e.g. a Frechet distance that falls from hundreds to tens: log scale
        val_ax.set_ylabel(f"validation: {val_objective}", fontsize=7)
        val_ax.set_yscale("log")
    ax.set_title(f"{name}: training and validation objective")
    handles = [h for a in {ax, val_ax} for h in a.get_legend_handles_labels()[0]]
    ax.legend(handles=handles, fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


# -----------------------------------------------------------------------------
# the loop's state, checkpoints and shipped weights
#
# Two files per family, both plain dicts of tensors and containers, loaded with weights_only=True:
#   OUT/NAME.pt         the best weights, their checksum, the config that rebuilds the model and
#                       the run's summary: small, committed, enough for --sample-only;
#   OUT/NAME_resume.pt  the whole TrainState, current weights, optimizer and EMA for --resume:
#                       written every epoch, kept out of git.

CHECKPOINT_FORMAT = 2  # bump when the layout below changes; older files are refused in one line


@dataclasses.dataclass
class TrainState:
    """Everything the loop carries from epoch to epoch."""

    epoch: int = 0
    best_epoch: int = 0
    best_val: float = math.inf
    best_weights: dict = dataclasses.field(default_factory=dict)  # CPU state_dict of the best epoch
    history: dict = dataclasses.field(default_factory=lambda: dict(train=[], val=[]))  # series -> per epoch
    train_seconds: float = 0.0
    train_cpu_seconds: float = 0.0
    epoch_seconds: list = dataclasses.field(default_factory=list)  # wall seconds of each epoch
    frames: list = dataclasses.field(default_factory=list)  # (64, 64) samples drawn during training
    frame_epochs: list = dataclasses.field(default_factory=list)
    rng: dict = None  # RNG states at the end of the last epoch

    SUMMARY = ("epoch", "best_epoch", "best_val", "history", "train_seconds", "train_cpu_seconds", "epoch_seconds")

    def record_epoch(self, epoch, means, val, best_weights, frame, seconds):
        """Add a finished epoch: its mean training terms, validation objective, the weights when
        they are the best so far (else None), a GIF frame (or None) and its timed seconds."""
        if best_weights is not None:
            self.best_val, self.best_epoch, self.best_weights = val, epoch, best_weights
        if frame is not None:
            self.frames.append(frame)
            self.frame_epochs.append(epoch)
        for key, value in {**means, "val": val}.items():
            self.history.setdefault(key, []).append(value)
        self.train_seconds += seconds["wall"]
        self.epoch_seconds.append(seconds["wall"])
        self.train_cpu_seconds += seconds["cpu"]
        self.epoch = epoch
        self.rng = rng_state()

    def to_dict(self):
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data, path):
        """The inverse of to_dict (or, from a weights file, of its summary); a missing key or a
        value of the wrong type is a one-line UsageError."""
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in data and f.name in cls.SUMMARY]
        if missing:
            raise UsageError(f"{path} has an older or foreign layout (missing {', '.join(missing)})")
        state = cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})
        expected = dict(epoch=int, best_epoch=int, best_val=(int, float), history=dict, train_seconds=(int, float),
                        train_cpu_seconds=(int, float), epoch_seconds=list, best_weights=dict, frames=list,
                        frame_epochs=list)
        for key, kind in expected.items():
            value = getattr(state, key)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise UsageError(f"{path} is damaged: {key} is a {type(value).__name__}")
        if not all(isinstance(v, list) for v in state.history.values()) or "train" not in state.history:
            raise UsageError(f"{path} is damaged: history is not a dict of lists with a train series")
        return state


def weights_checksum(weights):
    """sha256 over a state_dict's names, dtypes, shapes and bytes, in key order."""
    import hashlib

    digest = hashlib.sha256()
    for key in sorted(weights):
        tensor = weights[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def save_checkpoint(path, checkpoint):
    """torch.save through memory: torch's own file writer reports a full disk as a RuntimeError,
    a plain write as the OSError that run() turns into one line."""
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))


def save_weights(path, name, config, state, stopped=None):
    """OUT/NAME.pt: the best weights with their checksum, config and the run's summary; stopped:
    why training ended ("interrupted" marks weights that are not a finished run)."""
    save_checkpoint(path, dict(
        format=CHECKPOINT_FORMAT, kind="weights", model_name=name, config=config, stopped=stopped,
        weights=state.best_weights, weights_sha256=weights_checksum(state.best_weights),
        torch_version=str(torch.__version__), **{key: getattr(state, key) for key in TrainState.SUMMARY}))


def save_resume(path, name, config, train_flags, state, model, optimizer, ema):
    """OUT/NAME_resume.pt: all that --resume needs to continue as if never stopped."""
    save_checkpoint(path, dict(
        format=CHECKPOINT_FORMAT, kind="resume", model_name=name, config=config, train_flags=train_flags,
        state=state.to_dict(), model=_cpu_state(model), optimizer=optimizer.state_dict(),
        ema=ema.shadow if ema else None, torch_version=str(torch.__version__)))


def load_checkpoint(path, name, config, kind, missing_hint, conditional=None):
    """Load and check a weights or resume file of model `name` made with `config` (None: any), of
    a model of p(x | y) or of p(x) as `conditional` says (None: as config says, or either);
    every problem is a one-line UsageError."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no {'weights' if kind == 'weights' else 'training checkpoint'} at {path}; {missing_hint}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "GLOBAL" in str(error).upper().replace("GLOBALS", ""):  # it names a class or function to import
            raise UsageError(f"refused to load {path}: it holds pickled objects or code that "
                             f"weights-only loading does not allow, so it is not a checkpoint of "
                             f"this project") from None
        raise UsageError(f"{path} is truncated or corrupted ({str(error).splitlines()[0]})") from None
    except Exception as error:  # zip, EOF, and storage errors of a damaged file
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UsageError(f"{path} is truncated or corrupted ({first_line})") from None
    if not isinstance(checkpoint, dict) or not {"format", "kind", "model_name", "config"} <= checkpoint.keys():
        raise UsageError(f"{path} is not a checkpoint of these scripts (missing keys)")
    if checkpoint["model_name"] != name:
        raise UsageError(f"{path} is a checkpoint of {checkpoint['model_name']}, not {name}")
    if checkpoint["format"] != CHECKPOINT_FORMAT or checkpoint["kind"] != kind:
        raise UsageError(f"{path} is a {checkpoint['kind']} file of layout {checkpoint['format']}; "
                         f"this code reads {kind} files of layout {CHECKPOINT_FORMAT}")
    saved = checkpoint["config"]
    if not isinstance(saved, dict):
        raise UsageError(f"{path} has a damaged config ({type(saved).__name__}, not a dict)")
    saved = {"conditional": False, **saved}  # weights made before conditional models existed are of p(x)
    if conditional is None and config is not None:
        conditional = config.get("conditional", False)
    if conditional is not None and saved.get("conditional", False) != conditional:
        raise UsageError(f"{path} holds a model of p(x | y) (trained with --conditional); load it with --conditional"
                         if saved.get("conditional") else
                         f"{path} holds a model of p(x) (trained without --conditional); it can't be loaded as "
                         f"a conditional model")
    if config is not None and saved != config:
        diffs = ", ".join(f"{k}={saved.get(k)!r} (checkpoint) vs {config.get(k)!r} (now)"
                          for k in sorted(set(config) | set(saved)) if saved.get(k) != config.get(k))
        raise UsageError(f"{path} was made with another configuration: {diffs}")
    if kind == "weights":
        weights = checkpoint.get("weights")
        if not isinstance(weights, dict) or weights_checksum(weights) != checkpoint.get("weights_sha256"):
            raise UsageError(f"{path} is damaged: its weights do not match their sha256 checksum")
    return checkpoint


def load_weights_into(model, weights, path):
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as error:
        raise UsageError(f"{path} does not fit this model ({str(error).splitlines()[0]})") from None


def load_trained(model_class, out=Path("results"), sampling=None, device="cpu", conditional=False):
    """A trained model rebuilt from OUT/NAME.pt (OUT/NAME_conditional.pt with conditional: the
    shipped weights and their config), in eval mode: how another script (ood.py, a notebook)
    uses a family, ``load_trained(ARM)``."""
    script = Path(sys.modules[model_class.__module__].__file__).name
    stem = f"{model_class.name}_conditional" if conditional else model_class.name
    path = Path(out) / f"{stem}.pt"
    checkpoint = load_checkpoint(path, model_class.name, None, "weights",
                                 f"make it with: python {script} --out {out}" + " --conditional" * conditional,
                                 conditional=conditional)
    try:
        config = model_class.Config(**checkpoint["config"])
    except TypeError as error:
        raise UsageError(f"{path} has a config this code does not know ({error})") from None
    check_config_types(config, path)
    check_model_size(model_class, config, sampling, f"the config in {path}")
    try:
        model = model_class(config, sampling)
    except (TypeError, ValueError, RuntimeError, OverflowError) as error:
        raise UsageError(f"{path} has a config this code can't build ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''})") from None
    load_weights_into(model, checkpoint["weights"], path)
    return model.to(device).eval()


def check_config_types(config, path):
    """Each field of a stored config has the type of its default (an int is not 12.0, a flag is a
    bool): a one-line UsageError otherwise."""
    for field in dataclasses.fields(config):
        value, default = getattr(config, field.name), field.default
        if default is None or default is dataclasses.MISSING or value is None:
            continue
        kind = type(default)
        ok = (isinstance(value, bool) if kind is bool else
              isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
              isinstance(value, int) and not isinstance(value, bool) if kind is int else
              isinstance(value, kind))
        if not ok:
            raise UsageError(f"{path} is damaged: its config has {field.name}={value!r}, "
                             f"not {'an' if kind is int else 'a'} {kind.__name__}")


# -----------------------------------------------------------------------------
# exponential moving average of the weights


class EMA:
    """Shadow weights w_ema <- decay * w_ema + (1 - decay) * w; buffers are copied, not averaged."""

    def __init__(self, model, decay):
        self.decay = decay
        self.parameter_names = {name for name, _ in model.named_parameters()}
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model):
        for key, value in model.state_dict().items():
            if key in self.parameter_names:
                self.shadow[key].lerp_(value, 1 - self.decay)
            else:
                self.shadow[key].copy_(value)

    @contextlib.contextmanager
    def applied(self, model):
        backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.shadow)
        try:
            yield
        finally:
            model.load_state_dict(backup)


# -----------------------------------------------------------------------------
# sample quality: the same numbers for every family, likelihood or not


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
SHIPPED_CLASSIFIER = Path(__file__).resolve().parent / "results" / "_digit_classifier.pt"


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


def sample_quality(samples, cache_dir, extended=True):
    """Sample quality against the test split, the same for every family and baseline.

    Always: the Frechet distance in the digit classifier's features, the classifier's confidence,
    class coverage (entropy of predicted classes, nats; log 10 = uniform) and copy rate (the
    fraction of samples closer to a training image than 99% of test images are). extended adds
    measures that do not hinge on one network's features: the Frechet distance's bootstrap
    standard deviation; the Frechet distance in a second, convolutional classifier's features,
    with its own; a classifier two-sample test on the pixels (accuracy and standard error); and
    precision, recall, density and coverage (k = 5) in the first classifier's features."""
    pixels, _ = load_digits_arrays()
    split = {k: torch.from_numpy(v) for k, v in split_arrays(pixels).items()}
    samples = torch.as_tensor(np.asarray(samples, np.float32)).clamp(0, PIXEL_MAX)
    classifier, accuracy = digit_classifier(cache_dir)
    enough = len(samples) >= 2  # a covariance needs two samples at least: with fewer, None
    with torch.no_grad():
        probs = classifier(samples).softmax(1)
        features, reference = classifier.features(samples).numpy(), classifier.features(split["test"]).numpy()
    distance = frechet_distance(features, reference) if enough else None
    histogram = torch.bincount(probs.argmax(1), minlength=10).double() / len(samples)
    coverage = -(histogram[histogram > 0] * histogram[histogram > 0].log()).sum().item()
    threshold = torch.quantile(_nearest_distance(split["test"], split["train"]), 0.01)
    copy_rate = (_nearest_distance(samples, split["train"]) < threshold).double().mean().item()
    quality = dict(frechet_distance=distance, classifier_confidence=probs.max(1).values.mean().item(),
                   class_coverage=coverage, copy_rate=copy_rate, classifier_test_accuracy=accuracy)
    if not extended:
        return quality
    quality.update(frechet_distance_std=None, frechet_distance_cnn=None, frechet_distance_cnn_std=None,
                   c2st_accuracy=None, c2st_stderr=None, precision=None, recall=None, density=None, coverage=None)
    if len(samples) > 10:  # k-nearest-neighbour balls and a two-sample split need a few samples
        cnn, cnn_accuracy = digit_classifier(cache_dir, "cnn")
        with torch.no_grad():
            cnn_features, cnn_reference = cnn.features(samples).numpy(), cnn.features(split["test"]).numpy()
        c2st, c2st_stderr = classifier_two_sample_test(samples.numpy(), split["test"].numpy())
        quality.update(frechet_distance_std=bootstrap_std(frechet_distance, features, reference),
                       frechet_distance_cnn=frechet_distance(cnn_features, cnn_reference),
                       frechet_distance_cnn_std=bootstrap_std(frechet_distance, cnn_features, cnn_reference),
                       cnn_test_accuracy=cnn_accuracy, c2st_accuracy=c2st, c2st_stderr=c2st_stderr,
                       **precision_recall_density_coverage(reference, features))
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
    worst = max(per_class, key=per_class.get) if per_class else None
    quality = sample_quality(samples.numpy(), cache_dir, extended=False) if split == "test" else {}
    return dict(quality,
                class_accuracy=float((predicted == labels).mean()),
                class_accuracy_by_class={int(c): float((predicted[labels == c] == c).mean()) for c in np.unique(labels)},
                frechet_by_class=per_class, frechet_mean_over_classes=float(np.mean(list(per_class.values())))
                if per_class else None, frechet_worst_class=worst, frechet_worst=per_class.get(worst))


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


# -----------------------------------------------------------------------------
# the training loop


def _cpu_state(model):
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def batched(fn, x, *aligned, batch_size=512):
    """Apply fn(x_chunk, *aligned_chunks) to x in chunks along dim 0; concatenate the tensor
    results. aligned: tensors indexed like x (e.g. its labels)."""
    return torch.cat([fn(x[i:i + batch_size], *(a[i:i + batch_size] for a in aligned))
                      for i in range(0, len(x), batch_size)])


def batched_mean(fn, x, *aligned, batch_size=512):
    """Mean over x of a batch-mean fn(x_chunk, *aligned_chunks) (a scalar per chunk), weighted by
    chunk size, as a float; aligned: tensors indexed like x (e.g. its labels)."""
    return sum(float(fn(x[i:i + batch_size], *(a[i:i + batch_size] for a in aligned))) * len(x[i:i + batch_size])
               for i in range(0, len(x), batch_size)) / len(x)


def sample_labels(model, n, device, digits=None):
    """The classes to draw n samples of: None for a model of p(x); for a conditional one (n,)
    labels, the `digits` (default 0..9) in turn, 0, 1, ..., 9, 0, 1, ..."""
    if not model.conditional:
        return None
    digits = torch.tensor(digits or range(NUM_CLASSES), device=device)
    return digits[torch.arange(n, device=device) % len(digits)]


def draw_samples(model, n, seed, device, batch_size=1000, sampler=None, labels=None):
    """n samples (n, 64) on 0..16 from model.sample (or `sampler`), in chunks, with their own seed;
    labels: the (n,) classes of a conditional model's samples (None: as sample_labels draws them)."""
    sampler = sampler or model.sample
    if labels is None:
        labels = sample_labels(model, n, device)
    with seeded(seed, device), torch.no_grad():
        chunks = [sampler(min(batch_size, n - i)) if labels is None else
                  sampler(min(batch_size, n - i), labels[i:i + batch_size]) for i in range(0, n, batch_size)]
    return torch.cat(chunks).float().clamp(0, PIXEL_MAX)


def validate(model, data, seed, device, cache_dir):
    """The validation objective: mean eval_loss over val with a fixed noise stream every epoch, or
    (val_objective VAL_FRECHET) the Frechet distance of 1000 seeded samples to the val split."""
    x, y = data["val"]
    if model.val_objective == VAL_FRECHET:
        samples = draw_samples(model, 1000, seed, device).cpu()
        if not torch.isfinite(samples).all():  # a NaN sample has no distance: training stops on it
            return math.nan
        return frechet_to(samples, x.cpu(), cache_dir)
    with seeded(seed, device), torch.no_grad():
        return batched_mean(model.eval_loss, x, y)


class StopNow(BaseException):
    """A second SIGINT/SIGTERM: leave at once, writing nothing more (no `except Exception` stops it)."""


class _Signals:
    """SIGINT/SIGTERM raise KeyboardInterrupt while training; while outputs are written they are
    only recorded, so that every output is completed before the process exits with 130."""

    def __init__(self):
        self.received = False
        self.previous = {}

    def _raise(self, signum, frame):
        self.received = True
        raise KeyboardInterrupt

    def _record(self, signum, frame):
        if self.received:  # a second signal: stop at once; every file on disk is whole
            raise StopNow
        self.received = True

    def _install(self, handler):
        if threading_is_main():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous.setdefault(sig, signal.getsignal(sig))
                signal.signal(sig, handler)

    def raising(self):
        self._install(self._raise)

    @contextlib.contextmanager
    def held(self):
        """Signals that arrive inside the block take effect at its end."""
        received, self.received = self.received, False
        self.deferred()
        try:
            yield
        finally:
            arrived, self.received = self.received, received or self.received
            self.raising()
        if arrived:
            raise KeyboardInterrupt

    def deferred(self):
        self._install(self._record)

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def threading_is_main():
    import threading

    return threading.current_thread() is threading.main_thread()


def train(model, data, optimizer, ema, state, *, epochs, batch_size, patience, gif_every, seed,
          signals, checkpoint, cache_dir, progress=True, checkpoint_seconds=CHECKPOINT_SECONDS):
    """Train in place until `epochs`, early stopping, a non-finite loss or an interrupt.

    data: dict train/val -> (pixels (N, 64), labels (N,)). `state` (a TrainState) is updated
    after every epoch; checkpoint() is called when `checkpoint_seconds` have passed since the last
    call and when training ends, however it ends, so an interrupted or failed run keeps its best
    state, and a killed one loses at most `checkpoint_seconds` of training. Returns the reason
    training stopped: "max_epochs", "early_stopping", "interrupted" or "non_finite".
    """
    from tqdm import tqdm

    device = model.device
    bar = tqdm(total=epochs, initial=state.epoch, disable=not progress, desc=model.name, unit="epoch")
    saver = _Throttled(checkpoint, checkpoint_seconds, state.epoch)
    reason = "max_epochs"
    try:
        signals.raising()
        while state.epoch < epochs:
            if state.best_epoch > 0 and state.epoch - state.best_epoch >= patience:
                reason = "early_stopping"
                break
            epoch = state.epoch + 1
            with timed(device) as seconds:
                means = train_epoch(model, data["train"], optimizer, ema, batch_size, epoch)
                model.eval()
                with ema.applied(model) if ema else contextlib.nullcontext():
                    val = validate(model, data, seed + 1, device, cache_dir)
                    if not math.isfinite(val):
                        raise NonFiniteLoss(f"non-finite validation objective ({val}) at epoch {epoch}")
                    best = _cpu_state(model) if val < state.best_val else None
                    frame = (draw_samples(model, 64, seed + 2, device).cpu()
                             if epoch % gif_every == 0 or epoch == epochs else None)
            with signals.held():  # commit the whole epoch or none of it
                state.record_epoch(epoch, means, val, best, frame, seconds)
                saver.maybe(epoch)
            bar.set_postfix(train=f"{means['train']:.3f}", val=f"{val:.3f}",
                            best=f"{state.best_val:.3f}@{state.best_epoch}")
            bar.update(1)
    except KeyboardInterrupt:
        reason = "interrupted"
    except NonFiniteLoss as error:
        print(f"{model.name}: error: {error}; " + (
            f"keeping the best state (epoch {state.best_epoch}) and writing the outputs" if state.history["train"]
            else "no epoch completed, so nothing is written"), file=sys.stderr)
        reason = "non_finite"
    finally:
        signals.deferred()
        bar.close()
    saver.finish(state.epoch)
    return reason


def train_epoch(model, train_data, optimizer, ema, batch_size, epoch):
    """One pass over the shuffled training set; the batch-size-weighted mean of each logged term,
    the training loss as "train"."""
    x, y = train_data
    model.train()
    permutation = torch.randperm(len(x), device=x.device)
    sums, count = {}, 0
    for step, i in enumerate(range(0, len(x), batch_size), start=1):
        index = permutation[i:i + batch_size]
        try:
            values = model.train_step(x[index], y[index], optimizer)
        except NonFiniteLoss as error:
            raise NonFiniteLoss(f"{error} at epoch {epoch}, step {step}") from None
        if ema:
            ema.update(model)
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + value * len(index)
        count += len(index)
    return {"train" if key == "loss" else key: total / count for key, total in sums.items()}


class _Throttled:
    """checkpoint() at most every `seconds` while training (maybe), and once more at the end if
    an epoch came after the last call (finish)."""

    def __init__(self, checkpoint, seconds, epoch):
        self.checkpoint, self.seconds = checkpoint, seconds
        self.epoch, self.at = epoch, time.perf_counter()

    def maybe(self, epoch):
        if time.perf_counter() - self.at >= self.seconds:
            self.checkpoint()
            self.epoch, self.at = epoch, time.perf_counter()

    def finish(self, epoch):
        if epoch > self.epoch:
            self.checkpoint()


# -----------------------------------------------------------------------------
# a whole run: what every script's main() does after parsing its flags


def run(args, model_class, config, sampling=None):
    """Train (or with --sample-only load) model_class(config, sampling) and write every output;
    exits 2 on bad input, 1 on a non-finite loss, 130 when interrupted, returns normally otherwise."""
    signals = _Signals()
    try:
        signals.raising()  # the first signal stops training, or any other phase, at once
        code = _run(args, model_class, config, sampling, signals)
    except UsageError as error:
        print(f"{args.prog}: error: {error}", file=sys.stderr)
        code = EXIT_USAGE
    except OSError as error:  # a failed write: the files written before it, and the old ones, are whole
        print(f"{args.prog}: error: could not write {error.filename or args.out} "
              f"({error.strerror or error}); files already written are whole", file=sys.stderr)
        code = EXIT_USAGE
    except NonFiniteSamples as error:
        print(f"{args.prog}: error: {error}; no output written, the files already in {args.out} are untouched",
              file=sys.stderr)
        code = EXIT_NONFINITE
    except (KeyboardInterrupt, StopNow):
        print(f"{args.prog}: interrupted; files already written are whole", file=sys.stderr)
        code = EXIT_INTERRUPTED
    finally:
        signals.restore()
    if code:
        raise SystemExit(code)


def check_out(out):
    """--out must be a folder this process can write: UsageError (one line) otherwise."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UsageError(f"--out {out} can't be written ({error.strerror or error})") from None


LOCK_SUFFIX = ".lock-digits"  # OUT/.NAME.lock-digits: held (flock) while a run writes NAME's outputs


@contextlib.contextmanager
def family_lock(out, name):
    """Hold the lock of family `name`'s outputs in `out` for the block: a second run (or tool)
    into the same folder is refused in one line (UsageError) instead of mixing its files with
    this run's. The lock file is removed on the way out; one a SIGKILL left is taken over."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): unlocked
        yield
        return
    path = Path(out) / f".{name}{LOCK_SUFFIX}"
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise UsageError(f"--out {out}: can't make the lock file {path.name} ({error.strerror or error})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise UsageError(f"another run{f' (pid {holder})' if holder.isdigit() else ''} is writing {name}'s "
                             f"outputs in {out}; wait for it to end, or choose another --out") from None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:  # not a file its last holder removed meanwhile
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        try:
            path.unlink()  # while still holding it: a waiting process then retries on a new file
        except OSError:
            pass
        os.close(fd)


class NonFiniteSamples(Exception):
    """A sampler gave NaN or infinite pixels: found before anything is written (exit 1)."""


def check_samples(samples, what):
    if not torch.isfinite(samples).all():
        bad = int((~torch.isfinite(samples)).any(1).sum())
        raise NonFiniteSamples(f"{bad} of {len(samples)} samples of {what} hold NaN or infinite values "
                               f"(try other sampling settings)")


MAX_PARAMETERS = 100_000_000  # a model larger than this (400 MB of fp32 weights, more to train) is refused


def check_model_size(model_class, config, sampling, source):
    """Refuse (UsageError) a configuration whose model has more than MAX_PARAMETERS parameters,
    counted on the meta device (no memory), before anything is allocated."""
    try:
        with torch.device("meta"):
            count = sum(p.numel() for p in model_class(config, sampling).parameters())
    except Exception:  # a model that can't be built on the meta device is checked when it is built
        return
    if count > MAX_PARAMETERS:
        raise UsageError(f"{source} would build a {model_class.name} of {count:,} parameters; "
                         f"at most {MAX_PARAMETERS:,} fit here")


def shows_progress(args):
    """Progress bars and phase lines go to stderr when it is a terminal, unless --no-progress."""
    return not args.no_progress and sys.stderr.isatty()


@contextlib.contextmanager
def announced(text, enabled):
    """A status line on stderr around a slow phase: "ARM: test NLL ... 4.2 s" (when enabled)."""
    if enabled:
        print(f"{text} ...", end="", file=sys.stderr, flush=True)
    start = time.perf_counter()
    yield
    if enabled:
        print(f" {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def summary(metrics, paths, out):
    """The few lines a person reads at the end of a run: headline numbers, where the files went."""
    m, nll = metrics, metrics["test_nll_nats"]
    likelihood = (f"test NLL {nll:.2f} nats/image ({m['test_bpd']:.3f} bits/dim, {m['nll_kind'].replace('_', ' ')})"
                  if nll is not None else "no likelihood")
    frechet = "n/a" if m["frechet_distance"] is None else f"{m['frechet_distance']:.2f}"
    state = "interrupted, " if m["interrupted"] else ""
    stem = paths["weights"].stem
    extra = sorted(p.name for p in out.glob(f"{stem}_*.png") if p not in paths.values()
                   and (m["conditional"] or not p.name.startswith(f"{stem}_conditional_")))
    quality = f"Frechet distance {frechet}"
    if m["conditional"]:
        classifier = m.get("generative_classifier_accuracy")
        per_class = m["frechet_mean_over_classes"]
        quality = (f"p(x | y): class accuracy {m['class_accuracy']:.3f}, per-class Frechet distance mean "
                   + ("n/a" if per_class is None else f"{per_class:.2f}") + ", generative classifier accuracy "
                   + ("n/a" if classifier is None else f"{classifier:.3f}") + f"; {quality}")
    return "\n".join([
        f"{m['model']}: {likelihood}; {quality}, copy rate {m['copy_rate']:.3f}, "
        f"coverage {m['class_coverage']:.3f}; {state}{m['epochs_run']} epochs (best {m['best_epoch']}), "
        f"trained {m['train_seconds']:.0f} s on {m['threads']} thread(s), {m['num_samples']} samples in "
        f"{m['sample_seconds']:.2f} s",
        f"  weights {paths['weights']} (training state for --resume: {paths['resume']})",
        f"  samples {paths['npy']}, {paths['grid']}; curve {paths['curve']}; GIF {paths['gif']}",
        f"  metrics {paths['metrics']}" + (f"; also {', '.join(str(out / e) for e in extra)}" if extra else "")])


def output_paths(out, stem, conditional=False):
    """Every output file of a run, stem NAME or NAME_conditional; a conditional run's samples go to
    an .npz with their labels."""
    return {kind: out / f"{stem}{suffix}" for kind, suffix in dict(
        weights=".pt", resume="_resume.pt", curve="_loss_val_curve.png", gif="_training.gif",
        grid="_samples.png", npy="_samples.npz" if conditional else "_samples.npy",
        metrics="_metrics.json").items()}


def _run(args, model_class, config, sampling, signals):
    out = Path(args.out)
    device = choose_device(args.device)  # before --out is made: a refused device leaves nothing behind
    check_model_size(model_class, config, sampling, "the flags")
    check_out(out)
    stem = model_class.name + ("_conditional" if config.conditional else "")
    with family_lock(out, stem):  # a second run into the same folder is refused
        return _run_locked(args, model_class, config, sampling, signals, out, device)


def _run_locked(args, model_class, config, sampling, signals, out, device):
    remove_stale_temporaries(out)
    torch.set_num_threads(args.threads or auto_threads())
    set_seed(args.seed)
    model = model_class(config, sampling).to(device)
    name, config = model.name, dataclasses.asdict(model.config)
    paths = output_paths(out, model.output_name, model.conditional)
    make_command = (f"python {args.prog} --out {out}" + (" --quick" if args.quick else "")
                    + (" --conditional" if model.conditional else ""))

    splits, labels = load_splits(device, args.quick), load_label_splits(device, args.quick)
    optimizer = model.configure_optimizer(args.lr)
    ema = EMA(model, args.ema) if args.ema > 0 else None
    state = TrainState(best_weights=_cpu_state(model))
    train_flags = dict(batch_size=args.batch_size, lr=args.lr, ema=args.ema, seed=args.seed, quick=args.quick)

    if args.sample_only:
        shipped = load_checkpoint(paths["weights"], name, config, "weights", f"make it with: {make_command}")
        state = TrainState.from_dict(dict(shipped, best_weights=shipped["weights"]), paths["weights"])
    elif args.resume:
        saved = load_checkpoint(paths["resume"], name, config, "resume",
                                f"--resume continues a run made on this machine (the repository ships "
                                f"weights only); start one with: {make_command}")
        differ = {k: (v, train_flags[k]) for k, v in saved.get("train_flags", {}).items() if train_flags.get(k) != v}
        if differ:
            raise UsageError(f"{paths['resume']} was trained with other flags; resume with the same ones ("
                             + ", ".join(f"--{k.replace('_', '-')} {old} (checkpoint) vs {new} (now)"
                                         for k, (old, new) in differ.items()) + ")")
        try:
            state = TrainState.from_dict(saved["state"], paths["resume"])
            load_weights_into(model, saved["model"], paths["resume"])
            optimizer.load_state_dict(saved["optimizer"])
            if ema and saved["ema"] is not None:
                ema.shadow = {k: v.to(device) for k, v in saved["ema"].items()}
            set_rng_state(state.rng)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise UsageError(f"{paths['resume']} has a damaged or older layout ({type(error).__name__}: "
                             f"{str(error).splitlines()[0] if str(error) else ''})") from None

    reason = "sample_only"
    if not args.sample_only:
        data = {split: (splits[split], labels[split]) for split in ("train", "val")}
        reason = train(model, data, optimizer, ema, state, epochs=args.epochs, batch_size=args.batch_size,
                       patience=args.patience, gif_every=args.gif_every, seed=args.seed, signals=signals,
                       cache_dir=out, progress=shows_progress(args), checkpoint_seconds=args.checkpoint_seconds,
                       checkpoint=lambda: save_resume(paths["resume"], name, config, train_flags, state,
                                                      model, optimizer, ema))
        if not state.history["train"]:
            if reason == "interrupted":  # (a non-finite first epoch has said so already)
                print(f"{name}: no epoch completed; nothing to write", file=sys.stderr)
            return EXIT_INTERRUPTED if reason == "interrupted" else EXIT_NONFINITE

    def write_training():  # called once the samples are known to be finite, before any other output
        if args.sample_only:
            return
        save_weights(paths["weights"], name, config, state, stopped=reason)
        save_curve(paths["curve"], state.history, state.best_epoch, name, model.objective, model.val_objective)
        if state.frames:
            save_gif(paths["gif"], [labelled(image_grid(s), f"{name}  epoch {e}")
                                    for s, e in zip(state.frames, state.frame_epochs)])
        else:  # no frame drawn in this run: the previous run's GIF must not stand beside its weights
            paths["gif"].unlink(missing_ok=True)

    load_weights_into(model, state.best_weights, paths["weights"])
    model.eval()
    signals.deferred()
    metrics = _final_outputs(model, splits, labels, args, device, paths, state, reason, signals, write_training)
    print(json.dumps(_finite_or_none({k: metrics[k] for k in (
        "model", "test_nll_nats", "test_bpd", "nll_kind", "epochs_run", "best_epoch",
        "train_seconds", "sample_seconds")})))
    print(summary(metrics, paths, out), file=sys.stderr)
    if metrics["interrupted"]:  # exit status and metrics agree; a signal after this point changes neither
        return EXIT_INTERRUPTED
    return EXIT_NONFINITE if reason == "non_finite" else 0


def _final_outputs(model, splits, labels, args, device, paths, state, reason, signals, write_training=lambda: None):
    """Evaluate the best state on the test split and write samples, images and metrics; the
    samples are checked before anything is written (write_training first: weights, curve, GIF)."""
    out, name, show = Path(args.out), model.output_name, shows_progress(args)
    conditional = model.conditional
    given = [labels["test"]] if conditional else []  # a conditional model's NLL is -log p(x | y)
    test_nll, nll_seconds = None, dict(wall=None, cpu=None)
    if model.nll_kind:
        with announced(f"{name}: test NLL of {len(splits['test'])} images", show), timed(device) as nll_seconds, \
                seeded(args.seed + 3, device), torch.no_grad():
            test_nll = float(batched(model.test_nll, splits["test"], *given).mean())
    with announced(f"{name}: other metrics", show), seeded(args.seed + 5, device):
        extra = model.extra_metrics(splits, labels)
        images = model.extra_images(splits)
    if conditional:
        with announced(f"{name}: generative classifier on {len(splits['test'])} images", show), \
                timed(device) as classify_seconds, seeded(args.seed + 6, device), torch.no_grad():
            predicted = generative_classifier(model, splits["test"], labels["train"])
        extra.update(generative_classifier_accuracy=None if predicted is None else
                     float((predicted == labels["test"]).double().mean()),
                     generative_classifier_seconds=None if predicted is None else round(classify_seconds["wall"], 2))

    # a conditional model draws num_samples // k of each of the k classes asked for, class by class
    digits = torch.tensor(args.digits or range(NUM_CLASSES), device=device)
    drawn = digits.repeat_interleave(args.num_samples // len(digits)) if conditional else None
    with announced(f"{name}: {args.num_samples} samples", show), timed(device) as sample_seconds:
        samples = draw_samples(model, args.num_samples if drawn is None else len(drawn), args.seed + 4, device,
                               labels=drawn).cpu()
    check_samples(samples, "the sampler")
    other_samplers = {}
    # each other sampler timed and scored like the main one; skipped after an interrupt, to be quick;
    # they draw from p(x) (a conditional run has only its sampler of p(x | y))
    for sampler_name, sampler in ({} if reason == "interrupted" or conditional else model.samplers()).items():
        with announced(f"{name}: {args.num_samples} samples, sampler {sampler_name}", show), \
                timed(device) as seconds:
            other = draw_samples(model, args.num_samples, args.seed + 5, device, sampler=sampler).cpu()
        check_samples(other, f"sampler {sampler_name}")
        other_samplers[sampler_name] = dict(seconds=round(seconds["wall"], 3), cpu_seconds=round(seconds["cpu"], 3),
                                            frechet_distance=sample_quality(other.numpy(), out, extended=False)["frechet_distance"])

    write_training()
    save_image(out / "_Digit_real_image.png", image_grid(splits["test"][:64]))
    if conditional:  # row k: samples of the k-th class asked for
        per_class = len(drawn) // len(digits)
        rows = samples.view(len(digits), per_class, NUM_PIXELS)[:, :10]
        save_image(paths["grid"], image_grid(rows.reshape(-1, NUM_PIXELS), nrow=rows.shape[1]))
        save_npz(paths["npy"], x=samples.numpy().astype(np.float32), y=drawn.cpu().numpy().astype(np.int64))
    else:
        save_image(paths["grid"], image_grid(samples[:64]))
        save_npy(paths["npy"], samples.numpy().astype(np.float32))
    for suffix, (pixels, nrow) in images.items():
        save_image(out / f"{name}_{suffix}.png", image_grid(pixels, nrow=nrow))
    metrics = dict(
        model=model.name, conditional=conditional, digits=None if drawn is None else digits.tolist(),
        test_nll_nats=test_nll,
        test_bpd=nats_to_bpd(test_nll) if test_nll is not None else None,
        nll_kind=model.nll_kind, epochs_run=state.epoch, best_epoch=state.best_epoch,
        best_val_objective=state.best_val if math.isfinite(state.best_val) else None,
        objective=model.objective, val_objective=model.val_objective or model.objective,
        stopped=reason, interrupted=reason == "interrupted" or signals.received,
        train_seconds=round(state.train_seconds, 2), sample_seconds=round(sample_seconds["wall"], 3),
        train_seconds_to_best=round(sum(state.epoch_seconds[:state.best_epoch]), 2),
        peak_memory_mb=round(peak_memory_mb(), 1),
        # CPU seconds of this process: on a shared machine, wall time overstates the cost
        train_cpu_seconds=round(state.train_cpu_seconds, 2), sample_cpu_seconds=round(sample_seconds["cpu"], 3),
        test_nll_seconds=nll_seconds["wall"] and round(nll_seconds["wall"], 2),
        test_nll_cpu_seconds=nll_seconds["cpu"] and round(nll_seconds["cpu"], 2),
        num_samples=len(samples), device=str(device), threads=torch.get_num_threads(),
        seed=args.seed, num_params=sum(p.numel() for p in model.parameters()),
        torch_version=str(torch.__version__), quick=args.quick, config=dataclasses.asdict(model.config),
        sampling=dataclasses.asdict(model.sampling), argv=args.argv,
        changed_settings=getattr(args, "changed_settings", None),
        code_sha256=code_fingerprint(sys.modules[type(model).__module__].__file__),
        train_flags=dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         patience=args.patience, ema=args.ema),
        other_samplers=other_samplers, **extra)
    metrics.update(conditional_quality(samples.numpy(), drawn.cpu().numpy(), out) if conditional
                   else sample_quality(samples.numpy(), out))
    metrics["interrupted"] = metrics["interrupted"] or signals.received
    save_json(paths["metrics"], metrics)
    return metrics
