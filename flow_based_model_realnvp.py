"""RealNVP normalizing flow of 8x8 Digits (Dinh, Sohl-Dickstein & Bengio 2017, "Density
estimation using Real NVP"; intro_dgm's RealNVP example), with an honest likelihood.

An invertible map f takes a dequantized image v = x + u, u in [0, 1)^64, to z = f(v) with a
standard normal base density, so by the change of variables

    log p(v) = log N(f(v); 0, I) + log|det df/dv|.

f is the logit transform of RealNVP/Glow, w = logit(alpha + (1 - 2 alpha) v / 17), followed by a
stack of ActNorm layers (Glow's per-pixel affine map), optionally an LU-parametrised invertible
linear mixing (Glow's 1x1 convolution; --mixing), and affine coupling layers: with a binary mask m
(by default the checkerboard on the 8x8 grid, or random halves), h' = m * h + (1 - m) * (h *
exp(s(m * h)) + t(m * h)), whose log|det| is the sum of s over the free pixels; s is a tanh-bounded
log-scale from a residual MLP with LayerNorm and dropout (common.ResidualMLP with one-layer
blocks; 8 couplings, two blocks of 256 hidden units, dropout 0.5 by default). Masks alternate so that every pixel is
transformed. Sampling runs the inverse from z ~ N(0, T^2 I) (T = 1 by default: true samples of the
model) and floors v to the pixel values.

Dequantization (Theis et al. 2016; Ho et al. 2019, Flow++): u ~ q(u | x), uniform or (the
default) a learned conditional flow, u = sigmoid(g(e; x)), e ~ N(0, I). Since each pixel's bin
[x, x + 1) has volume 1, P(x) = E_q[p(x + u) / q(u | x)], so by Jensen

    -log P(x) <= E_q[-log p(x + u) + log q(u | x)],

which training minimises (one fresh draw per image and step, reparametrised) jointly in f and q.
The test NLL is the importance-weighted form of this bound over --nll-draws draws (Burda et al.
2016; --nll-estimate mean gives the plain average), an upper bound on the discrete NLL in nats per
image on the 0..16 pixels, comparable with the exact NLL of the autoregressive model.

Conditional model (--conditional): the class y enters as --class-input says, a class-conditional
base density N(mu_y, diag sigma_y^2) (learned, starting at N(0, I); Glow's class-conditional
prior, Kingma & Dhariwal 2018), the one-hot y as an extra input of every coupling's conditioner
(s, t) = net(h_fixed, y) (a conditional coupling, as in Ardizzone et al. 2019's cINN), or both, so

    log p(v | y) = log N(f(v; y); mu_y, diag sigma_y^2) + log|det df(v; y)/dv|.

The dequantizer stays q(u | x) (any q gives a bound), so -log P(x | y) has the same bound with y
given, and one set of draws u_k serves all ten classes of the generative classifier.

Run:  python flow_based_model_realnvp.py            # defaults, writes results/RealNVP_*
      python flow_based_model_realnvp.py --help
"""

import dataclasses
import math

import torch
from torch import nn

import common
from plumbing import UsageError, runs

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
    """h -> h' with h'_fixed = h_fixed and h'_free = h_free * exp(s) + t, (s, t) = net(h_fixed, c),
    where the binary mask marks the fixed coordinates and c is an optional conditioning input
    (B, cond_dim) (the dequantizer's pixels); log|det dh'/dh| = sum s.

    The log-scale is s = scale * tanh(raw), bounded for stability (RealNVP uses a tanh too); the
    net's head starts at zero, so every coupling starts as the identity."""

    def __init__(self, mask, hidden, blocks, dropout, cond_dim=0):
        super().__init__()
        self.register_buffer("mask", mask)
        self.register_buffer("fixed", mask.nonzero()[:, 0])
        self.register_buffer("free", (mask == 0).nonzero()[:, 0])
        self.net = common.ResidualMLP(len(self.fixed) + cond_dim, 2 * len(self.free), hidden, blocks, dropout,
                                      layers=1)
        self.scale = nn.Parameter(torch.ones(len(self.free)))

    def shift_and_log_scale(self, h, cond):
        """(B, D) input (only its fixed coordinates are read) -> (s, t), each (B, D_free)."""
        inputs = h[:, self.fixed] if cond is None else torch.cat([h[:, self.fixed], cond], 1)
        raw_s, t = self.net(inputs).chunk(2, dim=1)
        return self.scale * torch.tanh(raw_s), t

    def forward(self, h, cond=None):
        """(B, D) -> (h', log|det dh'/dh| (B,))."""
        s, t = self.shift_and_log_scale(h, cond)
        return h.index_copy(1, self.free, h[:, self.free] * torch.exp(s) + t), s.sum(1)

    def inverse(self, h_out, cond=None):
        """(B, D) -> h with forward(h)[0] == h_out (the fixed coordinates pass unchanged)."""
        s, t = self.shift_and_log_scale(h_out, cond)
        return h_out.index_copy(1, self.free, (h_out[:, self.free] - t) * torch.exp(-s))


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


class InvertibleLinear(nn.Module):
    """h -> W h with W = P L (U + diag(sign * exp(d))) (Glow's LU-parametrised invertible 1x1
    convolution; on 64 pixels a full linear mixing): P a fixed permutation, L unit lower and U
    strictly upper triangular, so log|det W| = sum d, exact and cheap. Starts at a random rotation."""

    def __init__(self, dim, generator):
        super().__init__()
        rotation = torch.linalg.qr(torch.randn(dim, dim, generator=generator))[0]
        permutation, lower, upper = torch.linalg.lu(rotation)
        diagonal = torch.diagonal(upper)
        self.register_buffer("permutation", permutation)
        self.register_buffer("sign", torch.sign(diagonal))
        self.lower = nn.Parameter(torch.tril(lower, -1))
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_diagonal = nn.Parameter(torch.log(diagonal.abs()))

    def factors(self):
        """(L, U): unit lower triangular, and upper triangular with diagonal sign * exp(d)."""
        eye = torch.eye(len(self.sign), dtype=self.lower.dtype, device=self.lower.device)
        lower = torch.tril(self.lower, -1) + eye
        upper = torch.triu(self.upper, 1) + torch.diag(self.sign * torch.exp(self.log_diagonal))
        return lower, upper

    def weight(self):
        lower, upper = self.factors()
        return self.permutation @ lower @ upper

    def forward(self, h):
        """(B, D) -> (h W^T, log|det W| (B,))."""
        return h @ self.weight().T, self.log_diagonal.sum().expand(len(h))

    def inverse(self, h_out):
        """h = W^-1 h_out by two triangular solves with the factors themselves (no new
        factorisation of W): U' h = L^-1 P^T h_out."""
        lower, upper = self.factors()
        lower_solved = torch.linalg.solve_triangular(lower, self.permutation.T @ h_out.T, upper=False,
                                                     unitriangular=True)
        return torch.linalg.solve_triangular(upper, lower_solved, upper=True).T


class CouplingStack(nn.Module):
    """Per mask: ActNorm, an invertible linear mixing (mixing=True) and an affine coupling,
    composed, in R^D: the flow proper. cond_dim > 0: every coupling's conditioner also reads a
    conditioning input (B, cond_dim) (a conditional model's one-hot class)."""

    def __init__(self, masks, hidden, blocks, dropout, mixing=True, seed=0, cond_dim=0):
        super().__init__()
        dim = masks.shape[1]
        generator = torch.Generator().manual_seed(seed)
        self.steps = nn.ModuleList()
        for mask in masks:
            self.steps.append(ActNorm(dim))
            if mixing:
                self.steps.append(InvertibleLinear(dim, generator))
            self.steps.append(AffineCoupling(mask, hidden, blocks, dropout, cond_dim=cond_dim))

    @staticmethod
    def conditioned(step, cond):
        """The arguments of a step after its input: the couplings take the conditioning input."""
        return (cond,) if isinstance(step, AffineCoupling) else ()

    def forward(self, h, cond=None):
        """(B, D) -> (z, summed log|det dz/dh| (B,))."""
        log_det = h.new_zeros(len(h))
        for step in self.steps:
            h, step_log_det = step(h, *self.conditioned(step, cond))
            log_det = log_det + step_log_det
        return h, log_det

    def inverse(self, z, cond=None):
        for step in reversed(self.steps):
            z = step.inverse(z, *self.conditioned(step, cond))
        return z

    def log_prob(self, h):
        """(B, D) -> (B,) log density: log N(z; 0, I) + log|det dz/dh|."""
        z, log_det = self(h)
        return common.standard_normal_log_prob(z) + log_det


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


class VariationalDequantizer(nn.Module):
    """q(u | x) on (0, 1)^D (Ho et al. 2019, Flow++): e ~ N(0, I), h = g(e; x) by affine couplings
    whose conditioners also see the pixels x, u = sigmoid(h), so

        log q(u | x) = log N(e; 0, I) - log|det dg/de| - sum_i log sigmoid'(h_i).

    Then -log P(x) <= E_q[-log p(x + u) + log q(u | x)] (Jensen on P(x) = E_q[p(x + u) / q(u | x)]);
    q = uniform is the plain dequantization bound, so a learned q can only tighten it."""

    def __init__(self, dim, num_couplings, hidden, blocks, dropout, masks, seed=1):
        super().__init__()
        self.couplings = nn.ModuleList(AffineCoupling(mask, hidden, blocks, dropout, cond_dim=dim)
                                       for mask in make_masks(masks, num_couplings, dim, seed=seed))

    def forward(self, e, x):
        """(noise e (B, D), pixels x (B, D)) -> (u in (0, 1)^D, log q(u | x) (B,))."""
        c, h, log_det = common.pixels_to_pm1(x), e, e.new_zeros(len(e))
        for coupling in self.couplings:
            h, step_log_det = coupling(h, c)
            log_det = log_det + step_log_det
        log_sigmoid_slope = (nn.functional.logsigmoid(h) + nn.functional.logsigmoid(-h)).sum(1)
        return torch.sigmoid(h), common.standard_normal_log_prob(e) - log_det - log_sigmoid_slope

    def inverse(self, u, x):
        """(u, x) -> e with forward(e, x)[0] == u."""
        c, h = common.pixels_to_pm1(x), torch.log(u) - torch.log1p(-u)
        for coupling in reversed(self.couplings):
            h = coupling.inverse(h, c)
        return h


@dataclasses.dataclass(frozen=True)
class RealNVPConfig(common.ModelConfig):
    num_couplings: int = common.option(8, "number of affine coupling layers", type=common.positive_int)
    hidden: int = common.option(256, "hidden units of each coupling's residual MLP", type=common.positive_int)
    blocks: int = common.option(2, "residual blocks (one layer each) of each coupling's MLP",
                                type=common.nonnegative_int)
    dropout: float = common.option(0.5, "dropout in the coupling MLPs, against overfitting 1000 images",
                                   type=common.unit_interval)
    masks: str = common.option("checkerboard", "coupling masks: the 8x8 checkerboard or random halves, each "
                               "followed by its complement", choices=("checkerboard", "random"))
    mixing: bool = common.option(False, "an invertible linear map (LU-parametrised) before each coupling")
    dequantization: str = common.option("variational", "dequantization noise u: uniform, or a learned "
                                        "flow q(u | x)", choices=("variational", "uniform"))
    dequant_couplings: int = common.option(4, "couplings of the variational dequantizer",
                                           type=common.positive_int)
    dequant_hidden: int = common.option(192, "hidden units of the dequantizer's coupling MLPs",
                                        type=common.positive_int)
    alpha: float = common.option(0.01, "logit squeeze: w = logit(alpha + (1 - 2 alpha) v / 17), alpha in (0, 0.5)",
                                 type=common.positive_float)
    weight_decay: float = common.option(0.0, "AdamW weight decay", type=common.nonnegative_float)
    class_input: str = common.option("both", "with --conditional, where the class enters: a class-conditional "
                                     "base density, the couplings' conditioners, or both",
                                     choices=("base", "couplings", "both"))


@dataclasses.dataclass(frozen=True)
class RealNVPSampling:
    nll_draws: int = common.option(50, "dequantization draws in the test NLL bound",
                                   type=common.positive_int)
    nll_estimate: str = common.option("importance", "test NLL bound from the draws: the importance-weighted "
                                      "bound, or the mean of the one-draw bounds", choices=("importance", "mean"))
    temperature: float = common.option(1.0, "sampling temperature T, z ~ N(0, T^2 I); 1 samples the model "
                                       "itself, < 1 gives cleaner, less diverse digits", type=common.positive_float)


class RealNVP(common.DigitsModel):
    name = "RealNVP"
    nll_kind = "upper_bound"
    objective = "NLL bound (nats/image)"
    Config, Sampling = RealNVPConfig, RealNVPSampling

    def __init__(self, config=None, sampling=None, dim=common.NUM_PIXELS):
        super().__init__(config, sampling)
        c = self.config
        self.dim = dim
        self.logit = LogitTransform(c.alpha)
        self.class_couplings = c.conditional and c.class_input in ("couplings", "both")
        self.flow = CouplingStack(make_masks(c.masks, c.num_couplings, dim), c.hidden, c.blocks, c.dropout,
                                  mixing=c.mixing, cond_dim=common.NUM_CLASSES if self.class_couplings else 0)
        self.dequantizer = (VariationalDequantizer(dim, c.dequant_couplings, c.dequant_hidden, 1, c.dropout,
                                                   "random") if c.dequantization == "variational" else None)
        if c.conditional and c.class_input in ("base", "both"):  # N(mu_y, diag exp(2 log_sigma_y)), from N(0, I)
            self.base_mean = nn.Parameter(torch.zeros(common.NUM_CLASSES, dim))
            self.base_log_std = nn.Parameter(torch.zeros(common.NUM_CLASSES, dim))

    # --- Dinh et al. 2017 (RealNVP), the change of variables (sec. 3.1) through affine couplings,
    #     trained on the dequantization bound E_q[-log p(x + u) + log q(u | x)] (Theis et al. 2016;
    #     Ho et al. 2019, Flow++), sampled by the inverse from the base density ---

    def loss(self, x, y):
        """The bound's mean over the batch, one fresh dequantization draw per image."""
        return self.bound(x, self.given(y)).mean()

    def bound(self, x, y=None):
        """(B,) one-draw estimate of E_q[-log p(x + u) + log q(u | x)] >= -log P(x) (with y given,
        of -log P(x | y)), nats."""
        v, log_q = self.dequantize(x)
        return log_q - self.log_prob(v, y)

    def dequantize(self, x):
        """(B, D) pixels -> (v = x + u, log q(u | x) (B,)): u uniform (log q = 0) or from the dequantizer."""
        if self.dequantizer is None:
            return common.dequantize(x), x.new_zeros(len(x))
        u, log_q = self.dequantizer(torch.randn_like(x), x)
        return x + u, log_q

    def log_prob(self, v, y=None):
        """(B, D) -> (B,) log p(v) (log p(v | y)), a density on the continuous pixel scale (bins of
        volume 1): log N(z; mu_y, diag sigma_y^2) + log|det dz/dv|."""
        z, log_det, base = *self(v, y), self.class_base(y)
        if base is None:
            return common.standard_normal_log_prob(z) + log_det
        mean, log_std = base
        return common.standard_normal_log_prob((z - mean) * torch.exp(-log_std)) - log_std.sum(1) + log_det

    def forward(self, v, y=None):
        """Dequantized pixels (B, D) in [0, 17) -> (z, log|det dz/dv| (B,)): logit, then couplings
        (which read the class y (B,) of a conditional model with class_input couplings or both)."""
        w, log_det_logit = self.logit(v)
        z, log_det_flow = self.flow(w, self.class_code(y, w))
        return z, log_det_logit + log_det_flow

    def sample(self, n, y=None):
        """z ~ N(0, T^2 I) (z = mu_y + T sigma_y e, e ~ N(0, I), given y) -> v = f^-1(z) (f^-1(z; y))
        -> floor(v), the bin v falls in, clamped to 0..16."""
        z = self.sampling.temperature * torch.randn(n, self.dim, device=self.device)
        if (base := self.class_base(y)) is not None:
            mean, log_std = base
            z = mean + torch.exp(log_std) * z
        return self.inverse(z, y).floor().clamp(0, common.PIXEL_MAX)

    def inverse(self, z, y=None):
        return self.logit.inverse(self.flow.inverse(z, self.class_code(y, z)))

    def given(self, y):
        """The labels a conditional model conditions on; None (ignored) for a model of p(x)."""
        return y if self.conditional else None

    def class_code(self, y, like):
        """The couplings' conditioning input: one-hot y (B, 10) of like's dtype, or None."""
        if y is None or not self.class_couplings:
            return None
        return nn.functional.one_hot(y, common.NUM_CLASSES).to(like)

    def class_base(self, y):
        """(mean, log std) (B, D) each of the class-conditional base density of each image, or None
        where the base is N(0, I)."""
        if y is None or not hasattr(self, "base_mean"):
            return None
        return self.base_mean[y], self.base_log_std[y]

    def configure_optimizer(self, lr):
        return torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=self.config.weight_decay, fused=True)

    # --- Beyond the paper: the importance-weighted test bound (Burda et al. 2016), the generative
    #     classifier, inpainting, extra metrics ---

    def combine(self, log_w):
        """(K, ...) log-weights log w_k = log p(x + u_k) - log q(u_k | x) -> (...) the NLL bound."""
        if self.sampling.nll_estimate == "mean":
            return -log_w.mean(0)
        return math.log(len(log_w)) - torch.logsumexp(log_w, 0)

    def test_nll(self, x, y=None):
        """(B,) an upper bound on -log P(x) (-log P(x | y) given y), nats, from K = nll_draws draws
        u_k ~ q(u | x) with weights w_k = p(x + u_k) / q(u_k | x): "mean" is the average of
        -log w_k; "importance" is -log (1/K sum_k w_k) (Burda et al. 2016), which is also
        >= -log P(x) in expectation, since E[(1/K) sum_k w_k] = P(x) and -log is convex, and
        tighter as K grows."""
        y = self.given(y)
        return self.combine(-torch.stack([self.bound(x, y) for _ in range(self.sampling.nll_draws)]))  # (K, B)

    def class_log_likelihoods(self, x):
        """(B, 10) minus the test NLL bound of every class, -test_nll(x, c), from the same K draws
        u_k ~ q(u | x) for all ten (q does not see y): the same numbers as ten calls of test_nll
        with one seed, each draw of the dequantizer made once."""
        classes = torch.arange(common.NUM_CLASSES, device=x.device).repeat_interleave(len(x))  # (10 B,)
        log_w = []
        for _ in range(self.sampling.nll_draws):
            v, log_q = self.dequantize(x)
            log_p = self.log_prob(v.repeat(common.NUM_CLASSES, 1), classes).view(common.NUM_CLASSES, len(x)).T
            log_w.append(log_p - log_q[:, None])  # (B, 10)
        return -self.combine(torch.stack(log_w))

    @torch.no_grad()
    def complete(self, x, missing, steps=30, step_size=0.05, first_width=3.0, last_width=0.5):
        """Inpainting by Langevin dynamics in the flow's latent space, where the prior N(0, I) is
        round and chains mix (posterior sampling with a flow prior; Whang et al. 2021, "Composing
        Normalizing Flows for Inverse Problems", fit a variational posterior there instead):
        z <- z + e / 2 grad log pi(z) + sqrt(e) eps on pi(z) = N(z; 0, I) N(v_o(z); x_o + 1/2,
        w_k^2 I), v = f^-1(z), the observed
        pixels' tie to their box centres tightened geometrically from first_width to last_width
        (pixel units) over `steps` steps of size e = step_size (chosen on the validation split:
        docs/inpainting.md); then the bin floor(v_m) of the missing pixels."""
        centres, observed = x + 0.5, (~missing).to(x.dtype)
        z = torch.randn_like(x)
        for width in torch.logspace(math.log10(first_width), math.log10(last_width), steps).tolist():
            with torch.enable_grad():
                z = z.detach().requires_grad_(True)
                log_pi = (common.standard_normal_log_prob(z)
                          - 0.5 * (((self.inverse(z) - centres) * observed) ** 2).sum(1) / width**2)
                (grad,) = torch.autograd.grad(log_pi.sum(), z)
            z = z.detach() + 0.5 * step_size * grad + math.sqrt(step_size) * torch.randn_like(z)
        return torch.where(missing, self.inverse(z).floor().clamp(0, common.PIXEL_MAX), x)

    def extra_metrics(self, splits, labels):
        """The NLL bound on train and validation with one dequantization draw each (the
        train-validation gap shows the overfitting)."""
        with common.seeded(0, self.device), torch.no_grad():
            bounds = {f"{k}_nll_bound_1draw": float(self.bound(splits[k], self.given(labels[k])).mean())
                      for k in ("train", "val")}
        return bounds


# -----------------------------------------------------------------------------
# command line


def settle(args, config, sampling):
    """The settings that flags alone can't check, checked together (UsageError: exit 2)."""
    if config.alpha >= 0.5:
        raise UsageError(f"argument --alpha: expected a number in (0, 0.5), got {config.alpha!r}")
    return config, sampling


def main(argv=None):
    runs.main(RealNVP, __doc__, argv, settle=settle, epochs=300, batch_size=64, lr=3e-4, patience=20, gif_every=5)


if __name__ == "__main__":
    main()
