"""RealNVP normalizing flow of 8x8 Digits (Dinh, Sohl-Dickstein & Bengio 2017, "Density
estimation using Real NVP"; intro_dgm's RealNVP example), with an honest likelihood.

An invertible map f takes a dequantized image v = x + u, u ~ U[0, 1)^64, to z = f(v) with a
standard normal base density, so by the change of variables

    log p(v) = log N(f(v); 0, I) + log|det df/dv|.

f is the logit transform of RealNVP/Glow, w = logit(alpha + (1 - 2 alpha) v / 17), followed by a
stack of ActNorm layers (Glow's per-pixel affine map) and affine coupling layers: with a binary
mask m (checkerboard on the 8x8 grid, or random halves), h' = m * h + (1 - m) * (h * exp(s(m * h))
+ t(m * h)), whose log|det| is the sum of s over the free pixels; s is a tanh-bounded log-scale
from an MLP with dropout. Masks alternate so that every pixel is transformed. Sampling runs the inverse from z ~ N(0, T^2 I) and floors v to the pixel values.

Training maximises log p(x + u) with a fresh u every step. Since each pixel's bin [x, x + 1) has
volume 1, -log P(x) <= E_u[-log p(x + u)] (Jensen), so the test NLL, averaged over --nll-draws
dequantization draws, is an upper bound on the discrete NLL in nats per image on the 0..16 pixels,
comparable with the exact NLL of the autoregressive model.

Run:  python flow_based_model_realnvp.py            # defaults, writes results/RealNVP_*
      python flow_based_model_realnvp.py --help
"""

import dataclasses
import math

import torch
from torch import nn

import common

# -----------------------------------------------------------------------------
# masks


def checkerboard_mask(parity):
    """(64,) 1 on the squares of the 8x8 grid with (row + col) % 2 == parity, 0 elsewhere."""
    rows, cols = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    return (((rows + cols) % 2) == parity).float().reshape(common.NUM_PIXELS)


def random_half_mask(dim, generator):
    """(dim,) 1 on a random half of the coordinates, 0 on the other half."""
    mask = torch.zeros(dim)
    mask[torch.randperm(dim, generator=generator)[: dim // 2]] = 1
    return mask


def make_masks(kind, num_couplings, dim=common.NUM_PIXELS, seed=0):
    """One mask per coupling; each even/odd pair is complementary, so every pixel gets transformed
    in every pair. kind: "checkerboard" (8x8 only) or "random" (a new random half per pair)."""
    generator = torch.Generator().manual_seed(seed)
    masks = []
    for k in range(num_couplings):
        if k % 2 == 1:
            masks.append(1 - masks[-1])
        elif kind == "checkerboard":
            masks.append(checkerboard_mask(0))
        else:
            masks.append(random_half_mask(dim, generator))
    return torch.stack(masks)  # (num_couplings, dim)


# -----------------------------------------------------------------------------
# model


class AffineCoupling(nn.Module):
    """h -> m * h + (1 - m) * (h * exp(s) + t), (s, t) = net(m * h); log|det| = sum (1 - m) * s.

    The log-scale is s = scale * tanh(raw), bounded for stability (RealNVP uses a tanh too); the
    last layer starts at zero, so every coupling starts as the identity."""

    def __init__(self, mask, hidden, layers, dropout):
        super().__init__()
        dim = len(mask)
        self.register_buffer("mask", mask)
        blocks = [nn.Linear(dim, hidden), nn.LeakyReLU()]
        for _ in range(layers - 1):
            blocks += [nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.LeakyReLU()]
        blocks += [nn.Dropout(dropout), nn.Linear(hidden, 2 * dim)]
        self.net = nn.Sequential(*blocks)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        self.scale = nn.Parameter(torch.ones(dim))

    def shift_and_log_scale(self, h_fixed):
        """(B, D) masked input -> (s, t), each (B, D), zero on the fixed coordinates."""
        raw_s, t = self.net(h_fixed).chunk(2, dim=1)
        free = 1 - self.mask
        return free * self.scale * torch.tanh(raw_s), free * t

    def forward(self, h):
        """(B, D) -> (h', log|det dh'/dh| (B,))."""
        s, t = self.shift_and_log_scale(self.mask * h)
        return h * torch.exp(s) + t, s.sum(1)  # fixed coordinates: s = t = 0, h' = h

    def inverse(self, h_out):
        """(B, D) -> h with forward(h)[0] == h_out (the fixed coordinates pass unchanged)."""
        s, t = self.shift_and_log_scale(self.mask * h_out)
        return (h_out - t) * torch.exp(-s)


class ActNorm(nn.Module):
    """h -> (h + b) * exp(c), per coordinate (Glow, Kingma & Dhariwal 2018; RealNVP used batch
    normalization here); log|det| = sum c. Data-dependent initialisation: on the first training
    batch, b and c are set so that the output has zero mean and unit variance per coordinate."""

    def __init__(self, dim):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(dim))
        self.log_scale = nn.Parameter(torch.zeros(dim))
        self.register_buffer("initialized", torch.tensor(False))  # saved, so --resume keeps it

    def forward(self, h):
        """(B, D) -> (h', log|det| (B,))."""
        if self.training and not self.initialized:
            with torch.no_grad():
                self.bias.copy_(-h.mean(0))
                self.log_scale.copy_(-torch.log(h.std(0) + 1e-6))
                self.initialized.fill_(True)
        return (h + self.bias) * torch.exp(self.log_scale), self.log_scale.sum().expand(len(h))

    def inverse(self, h_out):
        return h_out * torch.exp(-self.log_scale) - self.bias


class CouplingStack(nn.Module):
    """ActNorm and an affine coupling per mask, composed, in R^D: the flow proper."""

    def __init__(self, masks, hidden, layers, dropout):
        super().__init__()
        dim = masks.shape[1]
        self.steps = nn.ModuleList()
        for mask in masks:
            self.steps.extend([ActNorm(dim), AffineCoupling(mask, hidden, layers, dropout)])

    def forward(self, h):
        """(B, D) -> (z, summed log|det dz/dh| (B,))."""
        log_det = h.new_zeros(len(h))
        for step in self.steps:
            h, step_log_det = step(h)
            log_det = log_det + step_log_det
        return h, log_det

    def inverse(self, z):
        for step in reversed(self.steps):
            z = step.inverse(z)
        return z

    def log_prob(self, h):
        """(B, D) -> (B,) log density: log N(z; 0, I) + log|det dz/dh|."""
        z, log_det = self(h)
        return standard_normal_log_prob(z) + log_det


def standard_normal_log_prob(z):
    """(B, D) -> (B,) sum_i log N(z_i; 0, 1)."""
    return -0.5 * (z ** 2).sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi)


class LogitTransform(nn.Module):
    """v in [0, 17)^D (dequantized pixels) -> w = logit(alpha + (1 - 2 alpha) v / 17), as in
    RealNVP and Glow; alpha keeps w finite at the edges of the pixel range.

    log|dw/dv| per coordinate = log((1 - 2 alpha) / 17) - log(s) - log(1 - s), s = the squeezed
    value in (alpha, 1 - alpha)."""

    def __init__(self, alpha):
        super().__init__()
        self.alpha = alpha

    def forward(self, v):
        """(B, D) -> (w, log|det dw/dv| (B,))."""
        s = self.alpha + (1 - 2 * self.alpha) * v / common.NUM_LEVELS
        w = torch.log(s) - torch.log1p(-s)
        log_det = math.log((1 - 2 * self.alpha) / common.NUM_LEVELS) - torch.log(s) - torch.log1p(-s)
        return w, log_det.sum(1)

    def inverse(self, w):
        return (torch.sigmoid(w) - self.alpha) / (1 - 2 * self.alpha) * common.NUM_LEVELS


@dataclasses.dataclass(frozen=True)
class RealNVPConfig:
    num_couplings: int = common.option(8, "number of affine coupling layers", type=common.positive_int)
    hidden: int = common.option(256, "hidden units of each coupling's MLP", type=common.positive_int)
    layers: int = common.option(2, "hidden layers of each coupling's MLP", type=common.positive_int)
    dropout: float = common.option(0.5, "dropout in the coupling MLPs, against overfitting 1000 images",
                                   type=common.unit_interval)
    masks: str = common.option("random", "coupling masks: random halves or the 8x8 checkerboard, each "
                               "followed by its complement", choices=("random", "checkerboard"))
    alpha: float = common.option(0.01, "logit squeeze: w = logit(alpha + (1 - 2 alpha) v / 17), alpha in (0, 0.5)",
                                 type=common.positive_float)
    weight_decay: float = common.option(0.0, "AdamW weight decay", type=common.nonnegative_float)


@dataclasses.dataclass(frozen=True)
class RealNVPSampling:
    nll_draws: int = common.option(10, "dequantization draws averaged in the test NLL bound",
                                   type=common.positive_int)
    temperature: float = common.option(1.0, "sampling temperature T, z ~ N(0, T^2 I); 1 samples the model "
                                       "itself, < 1 gives cleaner, less diverse digits", type=common.positive_float)


class RealNVP(common.DigitsModel):
    name = "RealNVP"
    nll_kind = "upper_bound"
    objective = "NLL bound (nats/image)"
    Config, Sampling = RealNVPConfig, RealNVPSampling

    def __init__(self, config=None, sampling=None, dim=common.NUM_PIXELS):
        super().__init__(config, sampling)
        self.dim = dim
        self.logit = LogitTransform(self.config.alpha)
        self.flow = CouplingStack(make_masks(self.config.masks, self.config.num_couplings, dim),
                                  self.config.hidden, self.config.layers, self.config.dropout)

    def forward(self, v):
        """Dequantized pixels (B, D) in [0, 17) -> (z, log|det dz/dv| (B,)): logit, then couplings."""
        w, log_det_logit = self.logit(v)
        z, log_det_flow = self.flow(w)
        return z, log_det_logit + log_det_flow

    def inverse(self, z):
        return self.logit.inverse(self.flow.inverse(z))

    def log_prob(self, v):
        """(B, D) -> (B,) log p(v), a density on the continuous pixel scale (bins of volume 1)."""
        z, log_det = self(v)
        return standard_normal_log_prob(z) + log_det

    def loss(self, x):
        """Mean of -log p(x + u) over the batch, one fresh dequantization u per image."""
        return -self.log_prob(common.dequantize(x)).mean()

    def test_nll(self, x):
        """(B,) E_u[-log p(x + u)] over nll_draws draws: an upper bound on -log P(x), nats."""
        return torch.stack([-self.log_prob(common.dequantize(x)) for _ in range(self.sampling.nll_draws)]).mean(0)

    def sample(self, n):
        """z ~ N(0, T^2 I) -> v = f^-1(z) -> floor(v), the bin v falls in, clamped to 0..16."""
        z = self.sampling.temperature * torch.randn(n, self.dim, device=self.device)
        return self.inverse(z).floor().clamp(0, common.PIXEL_MAX)

    def extra_metrics(self, splits):
        """The NLL bound on train and validation with one dequantization draw each (the
        train-validation gap shows the overfitting)."""
        with common.seeded(0, self.device), torch.no_grad():
            bounds = {f"{k}_nll_bound_1draw": float(-self.log_prob(common.dequantize(splits[k])).mean())
                      for k in ("train", "val")}
        return bounds

    def configure_optimizer(self, lr):
        return torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=self.config.weight_decay)


# -----------------------------------------------------------------------------
# command line


def main(argv=None):
    parser = common.make_parser(__file__, __doc__, epochs=300, batch_size=64, lr=1e-3, patience=20, gif_every=5)
    common.add_options(parser, "RealNVP", RealNVPConfig)
    common.add_options(parser, "RealNVP evaluation and sampling (free to change with --sample-only)",
                       RealNVPSampling)
    args = common.parse_args(parser, argv)
    config = common.options_from(args, RealNVPConfig)
    if config.alpha >= 0.5:
        parser.error(f"argument --alpha: expected a number in (0, 0.5), got {config.alpha!r}")
    common.run(args, RealNVP, config, common.options_from(args, RealNVPSampling))


if __name__ == "__main__":
    main()
