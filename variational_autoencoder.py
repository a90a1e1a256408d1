"""Variational autoencoder (VAE) of 8x8 Digits (Kingma & Welling 2014, "Auto-Encoding Variational
Bayes"; intro_dgm's VAE), with a categorical decoder over the 17 pixel values, a choice of priors
(standard normal, a mixture of Gaussians, the VampPrior of Tomczak & Welling 2018) and an optional
second stochastic layer, scored by the importance-weighted bound of Burda et al. 2016.

Generative model:  z ~ p(z),  x_i ~ Categorical(softmax(f(z))_i) independently for the 64 pixels,
so p(x | z) is a probability of the discrete pixels: no dequantization. The decoder f is a small
convolutional network (a linear map to a 4x4 grid, a transposed convolution to 8x8, convolutions
to 17 logits per pixel; --decoder mlp gives intro_dgm's MLP, which overfits the 1000 training
digits sooner and has the worse validation bound). The encoder is a diagonal
Gaussian q(z | x) = N(mu(x), diag sigma^2(x)), and training maximises the evidence lower bound

    ELBO(x) = E_q[log p(x | z)] - KL(q(z | x) || p(z)) <= log p(x),

by the reparameterisation z = mu + sigma * eps, with a one-sample Monte Carlo estimate of both
terms (the KL to a mixture or VampPrior has no closed form). Priors (--prior):
  standard   p(z) = N(0, I);
  mog        p(z) = sum_c pi_c N(z; m_c, diag s_c^2), all learned;
  vampprior  p(z) = 1/C sum_c q(z | u_c), the encoder at C learned pseudo-inputs u_c.
The VampPrior is the default for its samples (much nearer the validation split by Frechet
distance); --prior standard has the better validation bound but poorer samples.
With --stochastic-layers 2 (the hierarchical VAE of Tomczak & Welling 2018):
p(x, z1, z2) = p(z2) p(z1 | z2) p(x | z1, z2) and q(z1, z2 | x) = q(z2 | x) q(z1 | x, z2); the
prior above is then p(z2).

Test NLL: the importance-weighted bound with K samples z_k ~ q(z | x),

    -log p(x) <= -log (1/K sum_k p(x, z_k) / q(z_k | x))  (in expectation),

which is -ELBO at K = 1 and decreases to -log p(x) as K grows (Burda et al. 2016): an upper
bound (nll_kind upper_bound) in nats per image on the discrete 0..16 pixels, K = --iwae-samples.
The metrics also give the -ELBO and its reconstruction and KL terms on test and val, each averaged
over 100 draws of z per image.

Samples are true samples of the model: z ~ p(z), then every pixel drawn from its categorical.
The reconstruction grid and the latent interpolations (OUT/VAE_reconstructions.png,
OUT/VAE_interpolations.png) show decoder means E[x | z] at the encoder means.

Conditional model (--conditional): the CVAE of Sohn et al. 2015, with the one-hot class y an input
of the encoder q(z | x, y) and of the decoder p(x | z, y), trained on the ELBO of log p(x | y).
The prior follows the VampPrior's argument (the best prior is the aggregate posterior, here the
aggregate posterior of each class): component k of the mog / VampPrior belongs to class k mod 10,
and p(z | y) is the mixture of class y's components (the VampPrior's pseudo-inputs u_k encoded
with their class, q(z | u_k, k mod 10)); --prior standard is Sohn's N(0, I) for every class. Then
-log p(x | y) is bounded by the importance-weighted bound with y given, and the generative
classifier's log p(x | y = c) by the same bound with fewer draws (CLASSIFY_SAMPLES), the same
noise for every class. With two stochastic layers y enters q(z2 | x, y), p(z2 | y) and the decoder.

Run:  python variational_autoencoder.py            # defaults, writes results/VAE_*
      python variational_autoencoder.py --help
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import common
from plumbing import UsageError, runs

LOG_2PI = math.log(2 * math.pi)
LOGVAR_MIN, LOGVAR_MAX = -8.0, 4.0  # variances of every Gaussian are kept in [3e-4, 55]
IWAE_CHUNK = 4096  # (draw, image) pairs per decoder call of the IWAE bound: memory, and fastest on CPU
CLASSIFY_SAMPLES = 100  # importance samples of each class's bound in class_log_likelihoods (10 bounds per image)


# -----------------------------------------------------------------------------
# Gaussian densities


def log_normal(z, mean, logvar):
    """log N(z; mean, diag exp(logvar)) summed over the last dim (broadcasting)."""
    return -0.5 * (LOG_2PI + logvar + (z - mean) ** 2 * torch.exp(-logvar)).sum(-1)


def log_normal_mixture(z, means, logvars, log_weights):
    """log sum_c w_c N(z; m_c, diag exp(logvar_c)) for z (..., L), means/logvars (C, L),
    log_weights (C,) -> (...). The quadratic form is expanded into matmuls, so no (..., C, L)
    tensor is built: sum_l (z - m)^2 / v = z^2 @ (1/v)^T - 2 z @ (m/v)^T + sum m^2/v."""
    precision = torch.exp(-logvars)  # (C, L)
    quadratic = (z ** 2) @ precision.T - 2 * z @ (means * precision).T + (means ** 2 * precision).sum(1)
    log_comp = -0.5 * (quadratic + logvars.sum(1) + z.shape[-1] * LOG_2PI)  # (..., C)
    return torch.logsumexp(log_comp + log_weights, dim=-1)


def reparameterize(mean, logvar, k):
    """k samples z = mean + sigma * eps: (B, L) -> (k, B, L)."""
    eps = torch.randn(k, *mean.shape, device=mean.device, dtype=mean.dtype)
    return mean + torch.exp(0.5 * logvar) * eps


def mlp(d_in, hidden, d_out, dropout):
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(hidden, d_out))


class GaussianHead(nn.Module):
    """MLP -> (mean, logvar) of a diagonal Gaussian, logvar clamped to [LOGVAR_MIN, LOGVAR_MAX]."""

    def __init__(self, d_in, hidden, latent, dropout):
        super().__init__()
        self.net = mlp(d_in, hidden, 2 * latent, dropout)

    def forward(self, h):
        mean, logvar = self.net(h).chunk(2, dim=-1)
        return mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)


class ConvDecoder(nn.Module):
    """z (..., d_in) -> (..., 64 * 17) logits: a linear map to a (C, 4, 4) grid, a transposed
    convolution to (C, 8, 8), a 3x3 convolution and a 1x1 convolution to the 17 logits per pixel
    (weights shared across pixels, unlike the MLP's last layer)."""

    def __init__(self, d_in, channels, dropout):
        super().__init__()
        self.channels = channels
        self.project = nn.Linear(d_in, channels * 16)
        self.net = nn.Sequential(nn.GELU(), nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1),
                                 nn.GELU(), nn.Dropout(dropout), nn.Conv2d(channels, channels, 3, padding=1),
                                 nn.GELU(), nn.Dropout(dropout), nn.Conv2d(channels, common.NUM_LEVELS, 1))

    def forward(self, z):
        h = self.project(z.reshape(-1, z.shape[-1])).view(-1, self.channels, 4, 4)
        logits = self.net(h)  # (N, 17, 8, 8)
        return logits.permute(0, 2, 3, 1).reshape(*z.shape[:-1], common.NUM_PIXELS * common.NUM_LEVELS)


# -----------------------------------------------------------------------------
# model


@dataclass(frozen=True)
class VAEConfig(common.ModelConfig):
    # the convolutional decoder and the VampPrior are the defaults chosen on the validation split (see
    # the module docstring; the numbers are in docs/choices.md, VAE)
    latent: int = common.option(16, "dimension of z (of z1 and of z2 with two stochastic layers)",
                                type=common.positive_int)
    hidden: int = common.option(256, "width of the two hidden layers of every MLP", type=common.positive_int)
    decoder: str = common.option("conv", "p(x | z): an MLP, or a small convolutional network (--channels)",
                                 choices=("mlp", "conv"))
    channels: int = common.option(32, "channels of the convolutional decoder", type=common.positive_int)
    prior: str = common.option("vampprior", "p(z): standard normal, a learned mixture of Gaussians, or the "
                               "VampPrior (a mixture of the encoder at learned pseudo-inputs)",
                               choices=("standard", "mog", "vampprior"))
    components: int = common.option(50, "components of the mog prior / pseudo-inputs of the VampPrior",
                                    type=common.positive_int)
    stochastic_layers: int = common.option(1, "1: z -> x; 2: the hierarchical VAE z2 -> z1 -> x",
                                           type=int, choices=(1, 2))
    # dropout, because the networks overfit the 1000 training digits; KL warm-up and free bits (both off)
    # did not improve the validation bound
    dropout: float = common.option(0.2, "dropout in every hidden layer", type=common.unit_interval)
    weight_decay: float = common.option(0.0, "AdamW weight decay", type=common.nonnegative_float)
    kl_warmup: int = common.option(0, "KL warm-up: the KL weight grows linearly from 0 to 1 over this many "
                                   "training steps (16 steps per epoch at batch 64); 0 = off",
                                   type=common.nonnegative_int)
    free_bits: float = common.option(0.0, "free bits (Kingma et al. 2016), on the batch's mean KL: the training "
                                     "loss uses max(KL, this many nats), so z is pushed to carry at least "
                                     "that much; 0 = off", type=common.nonnegative_float)


@dataclass(frozen=True)
class VAESampling:
    iwae_samples: int = common.option(1000, "K, importance samples per image of the test NLL bound",
                                      type=common.positive_int, quick=20)


class VAE(common.DigitsModel):
    name = "VAE"
    nll_kind = "upper_bound"
    objective = "-ELBO (nats/image)"
    Config, Sampling = VAEConfig, VAESampling

    def __init__(self, config=None, sampling=None):
        super().__init__(config, sampling)
        c = self.config
        L, H, P, V = c.latent, c.hidden, common.NUM_PIXELS, common.NUM_LEVELS
        hierarchical = c.stochastic_layers == 2
        Y = common.NUM_CLASSES if c.conditional else 0  # the one-hot class, an input of a CVAE
        self.encoder_top = GaussianHead(P + Y, H, L, c.dropout)  # q(z | x), or q(z2 | x) (and y)
        if hierarchical:
            self.encoder_z1 = GaussianHead(P + L, H, L, c.dropout)  # q(z1 | x, z2)
            self.prior_z1 = GaussianHead(L, H, L, c.dropout)  # p(z1 | z2)
        if c.decoder == "mlp":  # p(x | z) or p(x | z1, z2)
            self.decoder = mlp(L * c.stochastic_layers + Y, H, P * V, c.dropout)
        else:
            self.decoder = ConvDecoder(L * c.stochastic_layers + Y, c.channels, c.dropout)
        if c.prior == "mog":
            self.mog_means = nn.Parameter(torch.randn(c.components, L))
            self.mog_logvars = nn.Parameter(torch.zeros(c.components, L))
            self.mog_logits = nn.Parameter(torch.zeros(c.components))
        elif c.prior == "vampprior":
            # pseudo-inputs u_c = 16 sigmoid(w_c) on the pixel scale, starting near mid-grey noise
            self.pseudo_inputs = nn.Parameter(0.5 * torch.randn(c.components, P))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # training steps (KL warm-up)

    # --- Kingma & Welling 2014, Algorithm 1 (AEVB): minimise -ELBO (eq. 3) with one reparameterised
    #     draw z = mu + sigma eps per image; sampling z ~ p(z), then x ~ p(x | z) ---

    def loss(self, x, y):
        """-ELBO, one z per image, mean over the batch (nats/image)."""
        rec, kl = self.terms(x, y=self.given(y))
        return (kl - rec).mean()

    def terms(self, x, k=1, y=None):
        """k draws z ~ q(z | x) per image -> (log p(x | z), log q(z | x) - log p(z)), each (k, B):
        the reconstruction term and the one-sample KL estimate; log w = their difference. A
        conditional model: q(z | x, y), p(z | y), p(x | z, y), y (B,)."""
        mean, logvar = self.encoder_top(self.with_label(self.encoder_input(x), y))  # (B, L) each
        z = reparameterize(mean, logvar, k)  # (k, B, L)
        log_q = log_normal(z, mean, logvar)
        log_p = self.log_prior(z, y)
        if self.config.stochastic_layers == 2:  # z above is z2
            h = torch.cat([self.encoder_input(x).expand(k, -1, -1), z], -1)  # (k, B, 64 + L)
            mean1, logvar1 = self.encoder_z1(h)
            z1 = mean1 + torch.exp(0.5 * logvar1) * torch.randn_like(mean1)
            log_q = log_q + log_normal(z1, mean1, logvar1)
            log_p = log_p + log_normal(z1, *self.prior_z1(z))
            z = torch.cat([z1, z], -1)
        return self.log_likelihood(self.decoder_logits(z, y), x), log_q - log_p

    @torch.no_grad()
    def sample(self, n, y=None):
        """True samples: z ~ p(z) (p(z | y)), then x_i ~ Categorical(softmax(logits_i)) for every
        pixel (of p(x | z, y))."""
        logits = self.decode_latent(self.sample_prior(n, y), y)  # (n, 64, 17)
        return torch.distributions.Categorical(logits=logits).sample().float()

    @torch.no_grad()
    def decode_latent(self, z, y=None):
        """Top-layer z (n, L) -> categorical logits (n, 64, 17); a second layer draws z1 ~ p(z1 | z2)."""
        if self.config.stochastic_layers == 2:
            mean1, logvar1 = self.prior_z1(z)
            z = torch.cat([reparameterize(mean1, logvar1, 1)[0], z], -1)
        return self.decoder_logits(z, y)

    def eval_loss(self, x, y):
        """-ELBO averaged over 10 draws of z per image (a steadier validation objective)."""
        return -self.log_weights(x, 10, self.given(y)).mean()

    # --- the pieces of p and q

    @staticmethod
    def encoder_input(x):
        return x / common.PIXEL_MAX  # 0..16 -> [0, 1]

    def with_label(self, h, y):
        """A CVAE's network input: h (..., B, D) and the one-hot classes y (B,) -> (..., B, D + 10);
        h itself for a model of p(x)."""
        if not self.conditional:
            return h
        return torch.cat([h, F.one_hot(y, common.NUM_CLASSES).to(h).expand(*h.shape[:-1], -1)], -1)

    def component_classes(self):
        """(C,) the class of each mixture component of a conditional prior: k mod 10."""
        return torch.arange(self.config.components, device=self.device) % common.NUM_CLASSES

    def top_prior_params(self, y=None):
        """(means (C, L), logvars (C, L), log weights (C,)) of a mixture prior; for a conditional
        model log weights (B, C) of p(z | y), the components of other classes at weight 0."""
        c = self.config
        if c.prior == "mog":
            means, logvars = self.mog_means, self.mog_logvars.clamp(LOGVAR_MIN, LOGVAR_MAX)
            log_weights = F.log_softmax(self.mog_logits, 0)
        else:
            u = common.PIXEL_MAX * torch.sigmoid(self.pseudo_inputs)  # (C, 64)
            means, logvars = self.encoder_top(self.with_label(self.encoder_input(u), self.component_classes()))
            log_weights = torch.full((c.components,), -math.log(c.components), device=u.device)
        if self.conditional:
            log_weights = log_weights.masked_fill(self.component_classes() != y[:, None], -math.inf)
            log_weights = log_weights - torch.logsumexp(log_weights, -1, keepdim=True)  # (B, C)
        return means, logvars, log_weights

    def log_prior(self, z, y=None):
        """log p(z) (log p(z | y)) of the top layer, z (..., B, L) -> (..., B)."""
        if self.config.prior == "standard":
            return log_normal(z, torch.zeros_like(z), torch.zeros_like(z))
        return log_normal_mixture(z, *self.top_prior_params(y))

    def sample_prior(self, n, y=None):
        """(n, L) draws of the top layer z ~ p(z) (z ~ p(z | y), y (n,))."""
        L = self.config.latent
        if self.config.prior == "standard":
            return torch.randn(n, L, device=self.device)
        means, logvars, log_weights = self.top_prior_params(y)
        if self.conditional:
            component = torch.multinomial(log_weights.exp(), 1)[:, 0]  # (n,), one of y's components
        else:
            component = torch.multinomial(log_weights.exp(), n, replacement=True)  # (n,)
        return reparameterize(means[component], logvars[component], 1)[0]

    def decoder_logits(self, z, y=None):
        """z (..., B, L * layers) (and y (B,)) -> logits (..., B, 64, 17) of the 64 categoricals."""
        return self.decoder(self.with_label(z, y)).unflatten(-1, (common.NUM_PIXELS, common.NUM_LEVELS))

    @staticmethod
    def log_likelihood(logits, x):
        """log p(x | z) = sum_i log softmax(logits_i)[x_i]: logits (k, B, 64, 17), x (B, 64) -> (k, B)."""
        index = x.round().long().expand(*logits.shape[:-1]).unsqueeze(-1)  # (k, B, 64, 1)
        return (logits.gather(-1, index).squeeze(-1) - torch.logsumexp(logits, -1)).sum(-1)

    def chunked_terms(self, x, k, y=None):
        """terms(x, k, y) computed in chunks of at most IWAE_CHUNK (draw, image) pairs: (k, B) each."""
        chunk = max(1, IWAE_CHUNK // len(x))
        rec, kl = zip(*(self.terms(x, min(chunk, k - start), y) for start in range(0, k, chunk)))
        return torch.cat(rec), torch.cat(kl)

    def log_weights(self, x, k, y=None):
        """(k, B) importance log-weights log w_k = log p(x, z_k) - log q(z_k | x), z_k ~ q(z | x)
        (given y: log p(x, z_k | y) - log q(z_k | x, y))."""
        rec, kl = self.chunked_terms(x, k, y)
        return rec - kl

    def given(self, y):
        """The labels a conditional model conditions on; None (ignored) for a model of p(x)."""
        return y if self.conditional else None

    def configure_optimizer(self, lr):
        return torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=self.config.weight_decay, fused=True)

    # --- Beyond the paper: KL warm-up and free bits, the importance-weighted bound (Burda et al. 2016)
    #     as test NLL, the generative classifier, OOD scores, decoder means, inpainting, extra metrics
    #     and images ---

    def kl_weight(self):
        if not self.config.kl_warmup:
            return 1.0
        return min(1.0, float(self.steps) / self.config.kl_warmup)

    def training_objective(self, x, y):
        """The base class's hook: minimise the KL-warmed-up, free-bits objective, log the -ELBO
        and the KL. Counts the training steps of the warm-up (called once per step)."""
        rec, kl = self.terms(x, y=self.given(y))
        rec, kl = rec.mean(), kl.mean()
        # the -ELBO once warm-up is over (and while the KL exceeds the free bits)
        if self.config.free_bits:  # (a one-sample KL estimate may be negative: no clamp when off)
            kl_term = kl.clamp(min=self.config.free_bits)
        else:
            kl_term = kl
        objective = self.kl_weight() * kl_term - rec
        self.steps += 1
        return objective, {"loss": (kl - rec).detach(), "KL": kl.detach()}

    @staticmethod
    def iwae_bound(log_w):
        """(k, B) log-weights -> (B,) -log (1/k sum_k w_k), the importance-weighted bound (nats)."""
        return -(torch.logsumexp(log_w, 0) - math.log(len(log_w)))

    def iwae_nll(self, x, k, y=None):
        return self.iwae_bound(self.log_weights(x, k, y))

    def test_nll(self, x, y=None):
        """(B,) IWAE bound with K = --iwae-samples draws of z per image (of -log p(x | y) given y)."""
        return self.iwae_nll(x, self.sampling.iwae_samples, self.given(y))

    @torch.no_grad()
    def class_log_likelihoods(self, x):
        """(B, 10) the IWAE bound on log p(x | y = c) for each class, with K = CLASSIFY_SAMPLES
        (fewer than the test NLL's, to classify the test split in seconds) and the same noise eps
        of z = mu + sigma * eps for every class (common random numbers)."""
        seed = int(torch.randint(2**31 - 1, ()))  # from the caller's seeded stream
        columns = []
        for c in range(common.NUM_CLASSES):
            with common.seeded(seed, x.device):
                y = torch.full((len(x),), c, dtype=torch.long, device=x.device)
                columns.append(-self.iwae_nll(x, CLASSIFY_SAMPLES, y))
        return torch.stack(columns, 1)

    def ood_score(self, x):
        """(B,) IWAE bound with K = 64: ood.py scores thousands of inputs, and K = 64 already
        orders them as K = 1000 does."""
        return self.iwae_nll(x, 64)

    @torch.no_grad()
    def sample_means(self, n):
        """z ~ p(z), then the decoder means E[x | z] (a picture, not a sample of the model)."""
        return self.pixel_means(self.decode_latent(self.sample_prior(n)))

    @staticmethod
    def pixel_means(logits):
        levels = torch.arange(common.NUM_LEVELS, dtype=logits.dtype, device=logits.device)
        return F.softmax(logits, -1) @ levels  # (..., 64)

    @torch.no_grad()
    def encode_means(self, x):
        """The encoder means (B, L * layers): z2's mean, then z1's mean given it."""
        mean, _ = self.encoder_top(self.encoder_input(x))
        if self.config.stochastic_layers == 2:
            mean1, _ = self.encoder_z1(torch.cat([self.encoder_input(x), mean], -1))
            mean = torch.cat([mean1, mean], -1)
        return mean

    def samplers(self):
        return {"decoder_means": self.sample_means}

    def completion_nll(self, x, k=20):
        """(B,) the IWAE bound with k draws of z: what best-of-K ranks completions by."""
        return self.iwae_nll(x, k)

    @torch.no_grad()
    def complete(self, x, missing, iterations=50):
        """Inpainting by Metropolis-within-Gibbs (Mattei & Frellsen 2018) on (z, x_m), x = (x_o, x_m):
        z' ~ q(z | x) accepted with probability min(1, [p(x | z') p(z') q(z | x)] /
        [p(x | z) p(z) q(z' | x)]) (an independence sampler of p(z | x)), then x_m ~ p(x_m | z),
        exact because the decoder's pixels are independent given z. The missing pixels start at 0.
        With two stochastic layers, pseudo-Gibbs instead (z ~ q(z | x), every proposal accepted)."""
        filled = torch.where(missing, torch.zeros_like(x), x)
        z = None
        for _ in range(iterations):
            mean, logvar = self.encoder_top(self.encoder_input(filled))  # (B, L)
            if self.config.stochastic_layers == 2:
                z = self.decode_latent(reparameterize(mean, logvar, 1)[0])  # pseudo-Gibbs: the logits
                filled = torch.where(missing, torch.distributions.Categorical(logits=z).sample().float(), x)
                continue
            proposal = reparameterize(mean, logvar, 1)[0]

            def log_weight(latent):  # log p(x | z) + log p(z) - log q(z | x) at the current x
                return (self.log_likelihood(self.decoder_logits(latent)[None], filled)[0]
                        + self.log_prior(latent) - log_normal(latent, mean, logvar))

            log_w_new = log_weight(proposal)
            if z is None:
                z, accept = proposal, torch.ones(len(x), dtype=torch.bool, device=x.device)
            else:
                accept = torch.rand(len(x), device=x.device).log() < log_w_new - log_weight(z)
            z = torch.where(accept[:, None], proposal, z)
            drawn = torch.distributions.Categorical(logits=self.decoder_logits(z)).sample().float()
            filled = torch.where(missing, drawn, x)
        return filled

    @torch.no_grad()
    def extra_metrics(self, splits, labels):
        """The -ELBO and its reconstruction and KL terms on test and val, each averaged over 100
        draws of z per image (of p(x | y), given the labels, for a conditional model)."""
        metrics = dict(iwae_samples=self.sampling.iwae_samples)
        if self.conditional:
            metrics.update(classify_iwae_samples=CLASSIFY_SAMPLES)
        for split in ("test", "val"):
            given = labels[split].split(512) if self.conditional else [None] * len(splits[split].split(512))
            rec, kl = (torch.cat(t, 1) for t in zip(*(self.chunked_terms(x, 100, y)
                                                      for x, y in zip(splits[split].split(512), given))))
            metrics.update({f"{split}_neg_elbo_nats": (kl - rec).mean().item(),
                            f"{split}_reconstruction_nats": -rec.mean().item(), f"{split}_kl_nats": kl.mean().item()})
        return metrics

    @torch.no_grad()
    def extra_images(self, splits):
        """Reconstructions: rows of 8 test digits, each above its reconstruction (decoder means at
        the encoder means). Interpolations: 8 pairs of test digits, each row the first digit, 8
        decoder means along the straight line between the two encoder means, the second digit. None
        for a conditional model (its encoder needs the labels, which this hook is not given)."""
        if self.conditional:
            return {}
        test = splits["test"]
        digits = test[:32]
        recon = self.pixel_means(self.decoder_logits(self.encode_means(digits)))
        rows = torch.stack([digits.view(4, 8, 64), recon.view(4, 8, 64)], 1).reshape(64, 64)
        pairs = min(8, len(test) // 2)
        a, b = test[:pairs], test[pairs:2 * pairs]
        za, zb = self.encode_means(a), self.encode_means(b)
        t = torch.linspace(0, 1, 8, device=test.device).view(1, 8, 1)
        path = self.pixel_means(self.decoder_logits(za[:, None] + t * (zb - za)[:, None]))  # (pairs, 8, 64)
        strips = torch.cat([a[:, None], path, b[:, None]], 1).reshape(-1, 64)
        return {"reconstructions": (rows, 8), "interpolations": (strips, 10)}


# -----------------------------------------------------------------------------
# command line


def settle(args, config, sampling):
    """A conditional mixture prior needs a component per class at least (UsageError: exit 2)."""
    if config.conditional and config.prior != "standard" and config.components < common.NUM_CLASSES:
        raise UsageError(f"argument --components: a conditional {config.prior} prior needs at least one component "
                         f"per class ({common.NUM_CLASSES}), got {config.components}")
    return config, sampling


def main(argv=None):
    # validated every 2nd epoch (10 draws of z per image make the objective costly), patience 40 of them
    runs.main(VAE, __doc__, argv, settle=settle, epochs=1000, batch_size=64, lr=1e-3, patience=40, gif_every=10,
              val_every=2)


if __name__ == "__main__":
    main()
