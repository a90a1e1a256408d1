"""What a reader of a model needs, in reading order: the data and its split, the settings and
their flags, the model contract, the shared maths and networks, seeding, and the training loop.

Every model script subclasses ``DigitsModel`` (below), so the loop never branches on the family
and never probes with hasattr: a model gives its training loss for a batch, a sampler, and where
it exists a test NLL in nats; the optional parts have defaults in the base class. Each script's
settings are two dataclasses, ``Config`` (shapes the trained weights: stored with them) and
``Sampling`` (evaluation and sampler settings: never stored, free to change with --sample-only),
whose fields make its flags (``option``, ``add_options``), so every default is written once.

x is always a float tensor (B, 64) of pixels on the 0..16 scale of ``load_digits().data``; each
model maps it to its own space with the transforms here. Models do math; the machinery that
turns the loop into a run (flags of the machine, checkpoints, sample quality, files, signals) is
one folder down, in plumbing/.
"""

import argparse
import contextlib
import dataclasses
import itertools
import math
import random
import sys
import time

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
# settings: each a dataclass field that is also a flag


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


VAL_FRECHET = "Frechet distance of samples to the validation split"  # a val_objective the run measures (Hooks.sample_distance)


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

    def completion_nll(self, x):
        """(B,) what a committed completion ranks its draws by (inpaint.py --pick best-of-K): -log
        p(x) of whole digits, or a bound, or an energy (equal up to a constant per image; the
        draws of one input share their observed pixels, so ranking by it ranks by p(x_missing |
        x_observed)). By default the test NLL; NotImplementedError where there is none."""
        return self.test_nll(x)

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
        # fused: one kernel updates each tensor; torch's default on a CPU is a loop of small
        # operations per tensor, which cost up to half of a small network's step (docs/speed.md)
        return torch.optim.Adam(self.parameters(), lr=lr, fused=True)

    def extra_metrics(self, splits, labels):
        """Family-specific numbers for the metrics JSON (splits: dict of (N, 64) pixel tensors,
        labels: dict of (N,) class labels, both keyed train, val, test)."""
        return {}

    def samplers(self):
        """Other samplers of p(x), name -> fn(n) -> (n, 64): benchmark.py --samplers times each and
        scores several draws of its samples beside the default sampler's."""
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



def repaint(denoise, known, missing, alphas, sigmas, resample):
    """Inpainting with a denoiser of a Gaussian path z = alpha x + sigma eps (DDPM, SBGM, ScM, FM)
    as RePaint (Lugmayr et al. 2022): on the levels (alphas[i], sigmas[i]), noisiest first, the
    observed pixels are set to the data noised to the level, alpha_i known + sigma_i eps, before
    every call denoise(z, i) -> x0^ (B, D), which is clipped to [-1, 1]; the state then steps to
    the next level by the Gaussian posterior q(z_i+1 | z_i, x0^), and, `resample` times per level
    (but the last), is noised back to level i by q(z_i | z_i+1), so that the missing pixels come to
    agree with the observed ones. known (B, D) on [-1, 1], missing (B, D) bool; returns the last
    x0^ (B, D). With alpha_i = 0 at the first level, the start is pure noise."""
    z = sigmas[0] * torch.randn_like(known)
    for i, (alpha, sigma) in enumerate(zip(alphas, sigmas)):
        last = i + 1 == len(alphas)
        for repeat in range(1 if last else resample):
            z = torch.where(missing, z, alpha * known + sigma * torch.randn_like(known))
            x0 = denoise(z, i).clamp(-1, 1)
            if last:
                break
            alpha_next, sigma_next = alphas[i + 1], sigmas[i + 1]
            jump = alpha / alpha_next  # z_i = jump z_i+1 + jump_sigma eps
            jump_var = max(sigma**2 - jump**2 * sigma_next**2, 0.0)
            mean = (jump * sigma_next**2 * z + alpha_next * jump_var * x0) / sigma**2
            z = mean + math.sqrt(jump_var * sigma_next**2 / sigma**2) * torch.randn_like(z)  # z_i+1
            if repeat + 1 < resample:
                z = jump * z + math.sqrt(jump_var) * torch.randn_like(z)  # back to level i
    return x0

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
# seeding and timing


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
# the loop's state


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
        state = model.state_dict()
        averaged = [key for key in self.shadow if key in self.parameter_names]
        # one call for all the weights (a loop of per-tensor calls costs more than the arithmetic)
        torch._foreach_lerp_([self.shadow[k] for k in averaged], [state[k] for k in averaged], 1 - self.decay)
        for key in self.shadow.keys() - self.parameter_names:
            self.shadow[key].copy_(state[key])

    @contextlib.contextmanager
    def applied(self, model):
        backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.shadow)
        try:
            yield
        finally:
            model.load_state_dict(backup)


# -----------------------------------------------------------------------------
# the training loop


def cpu_state(model):
    """A copy of the model's state_dict on the CPU."""
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


def validate(model, data, seed, device, sample_distance=None):
    """The validation objective: mean eval_loss over val with a fixed noise stream every epoch, or
    (val_objective VAL_FRECHET) sample_distance(samples, val pixels) of 1000 seeded samples."""
    x, y = data["val"]
    if model.val_objective == VAL_FRECHET:
        samples = draw_samples(model, 1000, seed, device).cpu()
        if not torch.isfinite(samples).all():  # a NaN sample has no distance: training stops on it
            return math.nan
        return sample_distance(samples, x.cpu())
    with seeded(seed, device), torch.no_grad():
        return batched_mean(model.eval_loss, x, y)


class Hooks:
    """What a run adds around the loop; the defaults do nothing, so train() alone is the algorithm,
    except that a VAL_FRECHET family (the GAN) needs sample_distance. plumbing/runs.py fills them:
    signals, the resume checkpoint, a progress bar, the Frechet distance of a VAL_FRECHET objective."""

    sample_distance = None  # (samples, reference) -> float: the val objective of a VAL_FRECHET family

    def interruptible(self):
        """The context the epochs run in: a signal inside it raises KeyboardInterrupt."""
        return contextlib.nullcontext()

    def recording(self):
        """The context an epoch is recorded in: all of it or none."""
        return contextlib.nullcontext()

    def after_epoch(self, state, means, val):
        """Called after each recorded epoch (state.epoch is its number)."""

    def after_training(self, state):
        """Called once when training ends, however it ends."""


def train(model, data, optimizer, ema, state, *, epochs, batch_size, patience, gif_every, seed, val_every=1,
          hooks=Hooks()):
    """Train in place until `epochs`, early stopping, a non-finite loss or an interrupt.

    data: dict train/val -> (pixels (N, 64), labels (N,)). The validation objective is computed
    every `val_every` epochs and at the last (None in the history between), so the best weights are
    those of a validated epoch; patience counts epochs. `state` (a TrainState) is updated after
    every epoch, so an interrupted or failed run keeps its best state. Returns the reason training
    stopped: "max_epochs", "early_stopping", "interrupted" or "non_finite".
    """
    device = model.device
    reason = "max_epochs"
    try:
        with hooks.interruptible():
            while state.epoch < epochs:
                if state.best_epoch > 0 and state.epoch - state.best_epoch >= patience:
                    reason = "early_stopping"
                    break
                epoch = state.epoch + 1
                with timed(device) as seconds:
                    means = train_epoch(model, data["train"], optimizer, ema, batch_size, epoch)
                    model.eval()
                    with ema.applied(model) if ema else contextlib.nullcontext():
                        val, best = None, None  # None: an epoch without validation
                        if epoch % val_every == 0 or epoch == epochs:
                            val = validate(model, data, seed + 1, device, hooks.sample_distance)
                            if not math.isfinite(val):
                                raise NonFiniteLoss(f"non-finite validation objective ({val}) at epoch {epoch}")
                            best = cpu_state(model) if val < state.best_val else None
                        frame = (draw_samples(model, 64, seed + 2, device).cpu()
                                 if epoch % gif_every == 0 or epoch == epochs else None)
                with hooks.recording():  # commit the whole epoch or none of it
                    state.record_epoch(epoch, means, val, best, frame, seconds)
                    hooks.after_epoch(state, means, val)
    except KeyboardInterrupt:
        reason = "interrupted"
    except NonFiniteLoss as error:
        print(f"{model.name}: error: {error}; " + (
            f"keeping the best state (epoch {state.best_epoch}) and writing the outputs" if state.history["train"]
            else "no epoch completed, so nothing is written"), file=sys.stderr)
        reason = "non_finite"
    hooks.after_training(state)
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


