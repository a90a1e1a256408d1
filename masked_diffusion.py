"""Masked diffusion model (MDM) of 8x8 Digits: absorbing-state discrete diffusion on the 64 pixels,
each a categorical over the 17 values 0..16, with one extra "mask" token (index 17).

Papers: D3PM with the absorbing state (Austin et al. 2021, "Structured Denoising Diffusion Models in
Discrete State-Spaces"), MDLM (Sahoo et al. 2024, "Simple and Effective Masked Diffusion Language
Models"), MD4 (Shi et al. 2024, "Simplified and Generalized Masked Diffusion for Discrete Data"),
and the order-agnostic autoregressive model it equals (ARDM, Hoogeboom et al. 2022,
"Autoregressive Diffusion Models").

Forward process: at time t in [0, 1] each pixel is independently replaced by the mask token with
probability t (the linear schedule alpha_t = 1 - t); at t = 1 every pixel is masked. The network
sees z_t (some pixels masked) and gives 17 logits for every pixel, p(x_i | z_t); only the masked
pixels' logits are used. The continuous-time bound (MD4) is
  -log p(x) <= E_{t ~ U(0, 1)} [ (1/t) sum_{i masked in z_t} -log p(x_i | z_t) ],
and, summing over the number m of masked pixels instead of t, the discrete order-agnostic form
(ARDM): with D = 64 pixels,
  -log p(x) <= sum_{m=1}^{D} (1/m) E_{M: |M| = m} [ sum_{i in M} -log p(x_i | x outside M) ]
            =  E_{order} [ sum_{k=1}^{D} -log p(x_{order(k)} | x_{order(<k)}) ],
the expected NLL of an autoregressive model in a uniformly random pixel order: a bound on the NLL of
the mixture over orders, the distribution the one-pixel-at-a-time sampler draws from. Training
minimises one of the two unbiased estimates (--loss-form), with m (or t) stratified across the
batch (MD4's antithetic sampling). The validation objective is the discrete form with one m in
each of 4 strata of 16 levels for every image, its masks seeded the same every epoch. The test NLL
is the discrete form estimated stratified over all 64 values of m, with --masks-per-level random
masks each. A second, independent estimate of it gives the standard errors in the metrics:
test_nll_stderr_nats, of the mean over the test images (the spread of the per-image estimates,
mask noise included, over sqrt(N)), and test_nll_mc_stderr_nats, the part due to the random masks
alone (the variance of each level's masks, summed over levels; given these images); and the
second estimate itself, test_nll_replicate_nats.

Network: a residual convolutional network on the 8 x 8 grid (--network conv: 18-token embedding
plus a learned position embedding, 3x3 convolutions with dilations 1, 2, 4 so that every pixel
sees the whole digit), a residual MLP over the one-hot (pixel, value-or-mask) inputs (--network
mlp), or a small bidirectional transformer over the 64 positions with a learned position
embedding (--network transformer). On validation the MLP memorises the 1000 training digits
however it is regularised, and the transformer is too slow on a CPU to train or sample in the time
these scripts take; the convolutions share their weights across the grid, as the ARM's do.

Conditional model (--conditional): p(x | y) with the class y as one more learned embedding added to
the network's input (at every grid position, to the MLP's first layer, or to every token), so that
p(x_i | z, y), and with it the bound, the training estimates and the sampler, are the unconditional
model's given y. The generative classifier argmax_y log p(x | y) + log p(y) uses a cheaper estimate
of the ten bounds than the test NLL's (class_log_likelihoods): the 64 levels m in
--classify-strata strata, one random m and one random mask in each, the same masks for every class.

Sampling: start fully masked and unmask in --sample-steps K rounds, round(64 (k / K)^power)
pixels unmasked after round k, chosen uniformly among the masked ones, each drawn from its own
conditional given the pixels unmasked so far. K = 64 with --power 1 is exact ancestral sampling in
a random order, the model's own distribution; fewer rounds draw several pixels at once
(independently, given the rest): faster, less exact, and better with power > 1, which draws few
pixels while little is known and many once the context nearly decides them. While every pixel of
every sample is masked, an unconditional model's conditionals are the same for all of them: that
first round is one network call for one sample. `python benchmark.py --samplers` times and scores
the other round counts (8, 16, 32) and the exact sampler beside the default.
`MDM.complete(x, missing)` fills the missing pixels of digits and keeps the observed ones exactly
(inpainting; one pixel at a time, its default, it draws from the model's own conditional), and
`MDM.missing_nll(x, missing)` bounds -log p(x_missing | x_observed) the same way (inpaint.py
reports it).

Run:  python masked_diffusion.py                       # defaults, writes results/MDM_*
      python masked_diffusion.py --sample-only --sample-steps 64 --power 1   # the exact sampler
      python masked_diffusion.py --help
"""

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

import common
from plumbing import runs

MASK = common.NUM_LEVELS  # the absorbing state: token 17, after the pixel values 0..16
SIDE = 8  # the digits are SIDE x SIDE pixels
VAL_STRATA = 4  # the validation objective: one m in each of 4 strata of 16 levels, per image

# -----------------------------------------------------------------------------
# the family's maths, generic over (num_pixels, num_levels) so that tests run it on toys; a
# `logits_fn` maps z (B, D) long, values 0..L-1 or the mask L, to logits (B, D, L)


def stratified_counts(n, num_pixels, device):
    """(n,) numbers of masked pixels m in 1..D, stratified: one draw in each of n equal slices of
    the uniform distribution on 1..D, in random order."""
    u = (torch.rand(1, device=device) + torch.arange(n, device=device)) / n  # (n,) in [0, 1)
    m = 1 + (u * num_pixels).long().clamp(max=num_pixels - 1)
    return m[torch.randperm(n, device=device)]


def random_subset(candidates, counts):
    """(B, D) bool: for each row, `counts[b]` positions chosen uniformly among its True
    `candidates` (all of them when counts >= their number). torch's global RNG."""
    keys = torch.rand(candidates.shape, device=candidates.device).masked_fill(~candidates, 2.0)
    ranks = keys.argsort(1).argsort(1)  # (B, D): 0.. over the candidates first
    return (ranks < counts[:, None]) & candidates


def masked_cross_entropy(logits_fn, x, hidden, mask_index):
    """(B,) sum over the hidden pixels of -log p(x_i | x with `hidden` masked). x (B, D) long."""
    z = x.masked_fill(hidden, mask_index)
    log_probs = F.log_softmax(logits_fn(z), -1)  # (B, D, L)
    nll = -log_probs.gather(2, x.unsqueeze(2)).squeeze(2)  # (B, D)
    return (nll * hidden).sum(1)


def order_agnostic_terms(logits_fn, x, missing, masks_per_level, mask_index):
    """The terms of the order-agnostic bound on -log p(x_missing | x_observed), stratified over
    every level m: (B, D, R) with [b, m - 1, r] = (1/m) sum_{i in M} -log p(x_i | x outside M) for
    the r-th random subset M of m of row b's missing pixels (0 where m exceeds their number).
    terms.mean(2).sum(1) is the bound's estimate; with every pixel missing, the bound on -log p(x)."""
    num_rows, num_pixels = x.shape
    available = missing.sum(1)  # (B,) n_b
    repeated_x = x.repeat(masks_per_level, 1)  # (R B, D)
    repeated_missing = missing.repeat(masks_per_level, 1)
    levels = []
    for m in range(1, num_pixels + 1):
        if m > available.max():  # no row has m missing pixels: the rest of the terms are 0
            levels.append(torch.zeros_like(levels[0]))
            continue
        hidden = random_subset(repeated_missing, torch.full((len(repeated_x),), m, device=x.device))
        nll = masked_cross_entropy(logits_fn, repeated_x, hidden, mask_index) / m  # (R B,)
        valid = available >= m  # rows with fewer missing pixels have no level m
        levels.append(nll.view(masks_per_level, num_rows).T * valid[:, None])  # (B, R)
    return torch.stack(levels, 1)  # (B, D, R)


def revealed_after(total, k, steps, power=1.0):
    """(B,) pixels unmasked after round k of `steps` when `total` (B,) were masked:
    round(n (k / steps)^power); power 1 gives equal rounds, power > 1 fewer pixels early, when
    they are drawn with little context, and more late, when the context nearly decides them."""
    if power == 1:  # in integers: with steps >= n never two pixels in one round
        return torch.div(2 * total * k + steps, 2 * steps, rounding_mode="floor")
    return (total * (k / steps) ** power + 0.5).floor().long().clamp(max=total)


def unmask(logits_fn, z, steps, mask_index, temperature=1.0, power=1.0, rows_alike=False):
    """Fill the masked entries of z (B, D) long in `steps` rounds: in round k, row b unmasks
    revealed_after(k) - revealed_after(k - 1) of its n_b masked pixels, chosen uniformly among
    those still masked, each drawn from its own conditional (logits / temperature) given the
    unmasked ones. With power 1, temperature 1 and steps >= n_b (at most one pixel a round) this
    is exact ancestral sampling in a random order. Unmasked entries are never changed.
    rows_alike: logits_fn treats every row the same way and deterministically (an unconditional
    model in eval mode), so while every entry of z is masked all rows have the same conditionals:
    computed once, for one row."""
    z = z.clone()
    total = (z == mask_index).sum(1)  # (B,)
    for k in range(1, steps + 1):
        still = z == mask_index  # (B, D)
        count = revealed_after(total, k, steps, power) - (total - still.sum(1))  # (B,) to unmask now
        if not (count > 0).any():
            continue
        chosen = random_subset(still, count)
        if rows_alike and still.all():  # nothing revealed yet: one row stands for all
            logits = logits_fn(z[:1]).expand(len(z), -1, -1)  # (B, D, L)
        else:
            logits = logits_fn(z)
        probs = F.softmax(logits[chosen] / temperature, -1)  # (number chosen, L)
        z[chosen] = torch.multinomial(probs, 1).squeeze(1)
    return z


# -----------------------------------------------------------------------------
# networks: z (B, 64) long, values 0..16 or MASK, and a conditional model's class embedding
# (B, width) added to the input (None: unconditional) -> logits (B, 64, 17)


class MaskedMLP(nn.Module):
    """A residual MLP on the one-hot code of every (pixel, token) pair, 64 x 18 inputs: the first
    layer is a sum of one learned vector per pixel and token (an embedding bag), then blocks
    h <- h + W2 dropout(silu(W1 silu(LayerNorm(h)))) (common.ResidualBlock)."""

    def __init__(self, hidden, blocks, dropout):
        super().__init__()
        tokens = common.NUM_LEVELS + 1
        self.register_buffer("offsets", torch.arange(common.NUM_PIXELS) * tokens, persistent=False)
        self.embed = nn.EmbeddingBag(common.NUM_PIXELS * tokens, hidden, mode="sum")
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.blocks = nn.Sequential(*(common.ResidualBlock(hidden, dropout=dropout) for _ in range(blocks)))
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, common.NUM_PIXELS * common.NUM_LEVELS)
        nn.init.normal_(self.embed.weight, std=1 / math.sqrt(common.NUM_PIXELS))

    def forward(self, z, label=None):
        h = self.embed(z + self.offsets) + self.bias  # (B, H)
        if label is not None:
            h = h + label
        h = self.out(F.silu(self.norm(self.blocks(h))))  # (B, 64 * 17)
        return h.view(len(z), common.NUM_PIXELS, common.NUM_LEVELS)


class ConvBlock(nn.Module):
    """h <- h + conv2(dropout(silu(conv1(silu(h))))), 3x3 convolutions, the second dilated."""

    def __init__(self, channels, dilation, dropout):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h):
        return h + self.conv2(self.dropout(F.silu(self.conv1(F.silu(h)))))


class MaskedConvNet(nn.Module):
    """A residual convolutional network on the 8 x 8 grid: token + learned position embedding,
    3x3 convolutions whose dilations 1, 2, 4 let every pixel see the whole digit in a few blocks."""

    def __init__(self, channels, blocks, dropout):
        super().__init__()
        self.embed = nn.Embedding(common.NUM_LEVELS + 1, channels)
        self.position = nn.Parameter(0.02 * torch.randn(channels, SIDE, SIDE))
        self.blocks = nn.Sequential(*(ConvBlock(channels, 2 ** (b % 3), dropout) for b in range(blocks)))
        self.out = nn.Conv2d(channels, common.NUM_LEVELS, 1)

    def forward(self, z, label=None):
        h = self.embed(z).transpose(1, 2).reshape(len(z), -1, SIDE, SIDE) + self.position  # (B, C, 8, 8)
        if label is not None:
            h = h + label[:, :, None, None]
        h = self.out(F.silu(self.blocks(h)))  # (B, 17, 8, 8)
        return h.flatten(2).transpose(1, 2)  # (B, 64, 17)


class MaskedTransformer(nn.Module):
    """A bidirectional pre-norm transformer over the 64 positions: token + learned position
    embedding, full attention, 17 logits per position."""

    def __init__(self, width, layers, heads, dropout):
        super().__init__()
        self.embed = nn.Embedding(common.NUM_LEVELS + 1, width)
        self.position = nn.Parameter(0.02 * torch.randn(common.NUM_PIXELS, width))
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, common.NUM_LEVELS)

    def forward(self, z, label=None):
        h = self.embed(z) + self.position  # (B, 64, W)
        h = self.encoder(h if label is None else h + label[:, None])
        return self.out(self.norm(h))  # (B, 64, 17)


# -----------------------------------------------------------------------------
# model


@dataclasses.dataclass(frozen=True)
class MDMConfig(common.ModelConfig):
    # residual convolutions: the best validation bound of the three networks (docs/choices.md, MDM)
    network: str = common.option("conv", "the network that gives p(x_i | z): residual convolutions, a residual "
                                 "MLP on one-hot inputs, or a bidirectional transformer",
                                 choices=("conv", "mlp", "transformer"))
    hidden: int = common.option(32, "channels of the convolutions, MLP width, or the transformer's width",
                                type=common.positive_int)
    blocks: int = common.option(4, "residual blocks (two convolutions each, or two MLP layers), or transformer "
                                "layers", type=common.positive_int)
    heads: int = common.option(4, "attention heads of the transformer", type=common.positive_int)
    dropout: float = common.option(0.1, "dropout in each block", type=common.unit_interval)
    weight_decay: float = common.option(0.0, "AdamW weight decay", type=common.nonnegative_float)
    loss_form: str = common.option("discrete", "training estimate of the bound: the number of masked pixels "
                                   "m stratified on 1..64, weight 64 / m (discrete, ARDM), or t stratified on "
                                   "(0, 1), each pixel masked with probability t, weight 1 / t (continuous, MD4)",
                                   choices=("discrete", "continuous"))


@dataclasses.dataclass(frozen=True)
class MDMSampling:
    # the cost is linear in the rounds: the fewest rounds that fit the time budget with samples on validation
    # close to more rounds' (more rounds and the exact sampler: benchmark.py --samplers)
    sample_steps: int = common.option(16, "unmasking rounds of the sampler (64 with --power 1: one pixel at a "
                                      "time, exact)", type=common.positive_int)
    power: float = common.option(2.0, "the sampler has unmasked a fraction (k / rounds)^power after round k: "
                                 "1 equal rounds, > 1 fewer pixels early", type=common.positive_float)
    temperature: float = common.option(1.0, "sampler temperature: logits / temperature (1: the model)",
                                       type=common.positive_float)
    masks_per_level: int = common.option(4, "random masks for each of the 64 levels m of the test bound",
                                         type=common.positive_int, quick=1)
    # more strata classify better on validation, at a cost linear in them: 32 cost about 1.25 test
    # bounds (docs/choices.md, MDM)
    classify_strata: int = common.option(32, "conditional runs only: strata of the 64 levels m for the generative "
                                         "classifier's bound, one random m and mask in each",
                                         type=common.positive_int)


class MDM(common.DigitsModel):
    name = "MDM"
    nll_kind = "upper_bound"
    objective = "bound on the NLL (nats/image)"
    Config, Sampling = MDMConfig, MDMSampling

    def __init__(self, config=None, sampling=None):
        super().__init__(config, sampling)
        c = self.config
        if c.network == "mlp":
            self.net = MaskedMLP(c.hidden, c.blocks, c.dropout)
        elif c.network == "conv":
            self.net = MaskedConvNet(c.hidden, c.blocks, c.dropout)
        else:
            self.net = MaskedTransformer(c.hidden, c.blocks, c.heads, c.dropout)
        if c.conditional:
            self.classes = nn.Embedding(common.NUM_CLASSES, c.hidden)

    # --- Shi et al. 2024 (MD4), the continuous-time bound, and Hoogeboom et al. 2022 (ARDM), its
    #     discrete order-agnostic form (module docstring): training on an unbiased estimate of either
    #     (--loss-form), sampling by unmasking from the all-masked state ---

    def loss(self, x, y):
        """An unbiased estimate of the bound, mean over the batch (of p(x | y) if conditional)."""
        target = x.round().long()
        n, d = target.shape
        if self.config.loss_form == "discrete":
            m = stratified_counts(n, d, target.device)  # (B,)
            hidden = random_subset(torch.ones_like(target, dtype=torch.bool), m)
            weight = d / m
        else:
            t = (torch.rand(1, device=target.device) + torch.arange(n, device=target.device)) / n  # (B,)
            t = t[torch.randperm(n, device=target.device)]
            hidden = torch.rand(n, d, device=target.device) < t[:, None]
            weight = 1 / t
        return (weight * masked_cross_entropy(self.given(y), target, hidden, MASK)).mean()

    def eval_loss(self, x, y):
        """The discrete bound with one m in each of VAL_STRATA strata of levels per image (common
        seeds it the same every epoch): the sum over strata of (levels per stratum) times that level's
        term."""
        target = x.round().long()
        n, d = target.shape
        width = d // VAL_STRATA
        all_pixels = torch.ones_like(target, dtype=torch.bool)
        total = 0.0
        for stratum in range(VAL_STRATA):
            m = stratum * width + 1 + torch.randint(width, (n,), device=target.device)  # (B,)
            total = total + width * masked_cross_entropy(self.given(y), target, random_subset(all_pixels, m),
                                                         MASK) / m
        return total.mean()

    def logits(self, z, y=None):
        """z (B, 64) long, 0..16 or MASK (and y (B,) the classes of a conditional model) -> logits
        (B, 64, 17) of p(x_i | z) or p(x_i | z, y) (used where z is masked)."""
        if self.conditional and y is None:
            raise ValueError("a conditional MDM needs the class labels y")
        return self.net(z, self.classes(y) if self.conditional else None)

    def given(self, y):  # logits_fn of z alone: the model given y if conditional
        return (lambda z: self.logits(z, y)) if self.conditional else self.logits

    @torch.no_grad()
    def sample(self, n, y=None):
        return self.sample_with(n, self.sampling.sample_steps, y=y)

    def sample_with(self, n, steps, power=None, temperature=None, y=None):
        z = torch.full((n, common.NUM_PIXELS), MASK, dtype=torch.long, device=self.device)
        s = self.sampling
        return unmask(self.given(y), z, steps, MASK, temperature or s.temperature, power or s.power,
                      rows_alike=not self.conditional and not self.training).float()  # eval: no dropout

    def test_nll(self, x, y=None):
        return self.bound_terms(x, y).mean(2).sum(1)

    def bound_terms(self, x, y=None, missing=None, masks_per_level=None):
        """order_agnostic_terms (B, 64, R) of x (B, 64) pixels (given y (B,) if conditional), every
        pixel missing by default."""
        target = x.round().long()
        missing = torch.ones_like(target, dtype=torch.bool) if missing is None else missing
        masks_per_level = masks_per_level or self.sampling.masks_per_level
        given = self.given(None if y is None else y.repeat(masks_per_level))  # as the rows are repeated
        return order_agnostic_terms(given, target, missing, masks_per_level, MASK)

    def configure_optimizer(self, lr):
        return torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=self.config.weight_decay, fused=True)

    # --- Beyond the paper: other samplers, the generative classifier, inpainting (complete,
    #     missing_nll), the test bound's standard errors ---

    def samplers(self):
        """Other round counts at the same schedule, and the exact sampler: 64 equal rounds of one
        pixel, temperature 1, the model's own distribution."""
        chosen = self.sampling.sample_steps
        others = {f"steps_{k}": torch.no_grad()(lambda n, k=k: self.sample_with(n, k))
                  for k in (8, 16, 32) if k != chosen}
        if (chosen, self.sampling.power, self.sampling.temperature) != (common.NUM_PIXELS, 1.0, 1.0):
            others["exact_64"] = torch.no_grad()(lambda n: self.sample_with(n, common.NUM_PIXELS, 1.0, 1.0))
        return others

    def class_log_likelihoods(self, x):
        """(B, 64) -> (B, 10) minus a bound on -log p(x | y = c) for each class c: the discrete bound
        with the levels m in classify_strata strata of equal width w, one random m and one random
        mask M in each, sum over strata of w (1/m) sum_{i in M} -log p(x_i | x outside M, c)
        (unbiased for the bound, cheaper and noisier than the test NLL's estimate). Every class is
        scored with the same masks, so the noise of the masks is shared and cancels between them."""
        target = x.round().long()
        n, d = target.shape
        strata = min(self.sampling.classify_strata, d)
        edges = [round(k * d / strata) for k in range(strata + 1)]  # stratum k: levels edges[k] + 1..edges[k + 1]
        classes = torch.arange(common.NUM_CLASSES, device=x.device).repeat_interleave(n)  # (10 B,)
        repeated = target.repeat(common.NUM_CLASSES, 1)  # (10 B, 64), class by class
        total = 0.0
        for low, high in zip(edges, edges[1:]):
            m = 1 + low + torch.randint(high - low, (n,), device=x.device)  # (B,)
            hidden = random_subset(torch.ones_like(target, dtype=torch.bool), m).repeat(common.NUM_CLASSES, 1)
            nll = masked_cross_entropy(self.given(classes), repeated, hidden, MASK)  # (10 B,)
            total = total + (high - low) * nll / m.repeat(common.NUM_CLASSES)
        return -total.view(common.NUM_CLASSES, n).T

    def completion_nll(self, x, strata=8):
        """(B,) the discrete bound of test_nll estimated with one level m in each of `strata` strata
        of equal width w per image, sum over strata of w (1/m) sum_{i in M} -log p(x_i | x outside
        M) (unbiased for the bound, as eval_loss): what best-of-K ranks completions by, 32 times
        cheaper than test_nll."""
        target = x.round().long()
        n, d = target.shape
        width, every_pixel = d // strata, torch.ones_like(target, dtype=torch.bool)
        total = 0.0
        for stratum in range(strata):
            m = stratum * width + 1 + torch.randint(width, (n,), device=target.device)  # (B,)
            total = total + width * masked_cross_entropy(self.given(None), target, random_subset(every_pixel, m),
                                                         MASK) / m
        return total

    def missing_nll(self, x, missing, masks_per_level=1):
        """(B,) upper bound on -log p(x_missing | x_observed), nats; missing (B, 64) bool. One
        random mask per level by default (the test NLL draws --masks-per-level): an unbiased estimate
        of the bound, whose noise averages out over the digits of a mask."""
        return self.bound_terms(x, missing=missing, masks_per_level=masks_per_level).mean(2).sum(1)

    @torch.no_grad()
    def complete(self, x, missing, steps=None):
        """Fill the missing pixels ((B, 64) bool, True = missing) of x (B, 64) in `steps` rounds
        (default 64: one pixel at a time, an exact draw from the model's conditional); the
        observed pixels are kept exactly. -> (B, 64) float pixels 0..16."""
        z = x.round().long().masked_fill(missing, MASK)
        return unmask(self.logits, z, steps or common.NUM_PIXELS, MASK).float()

    def extra_metrics(self, splits, labels):
        """Standard errors of the test bound, from a second, independent estimate (module docstring)."""
        with torch.no_grad():
            given = [labels["test"]] if self.conditional else []  # -log p(x | y) for a conditional model
            terms = common.batched(self.bound_terms, splits["test"], *given)  # (N, 64, R)
        per_image = terms.mean(2).sum(1).double()  # (N,)
        n, r = len(per_image), terms.shape[2]
        result = dict(test_nll_replicate_nats=float(per_image.mean()),
                      test_nll_stderr_nats=float(per_image.std() / math.sqrt(n)),
                      test_nll_masks_per_level=r)
        # the R masks of a level are independent: Var(mean of R) = s^2 / R, summed over the levels
        mc_variance = (terms.double().var(2) / r).sum(1) if r > 1 else None  # (N,)
        result["test_nll_mc_stderr_nats"] = float(mc_variance.sum().sqrt() / n) if r > 1 else None
        return result


# -----------------------------------------------------------------------------
# command line


def main(argv=None):
    # at most 80 epochs, the time budget (the validation bound still falls slowly there: docs/choices.md, MDM)
    runs.main(MDM, __doc__, argv, epochs=80, batch_size=64, lr=3e-3, patience=15, ema=0.99, gif_every=10,
              val_every=5)


if __name__ == "__main__":
    main()
