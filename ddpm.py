"""Denoising diffusion probabilistic model (DDPM) of 8x8 Digits on pixels scaled to [-1, 1]
(Ho et al. 2020, "Denoising Diffusion Probabilistic Models"), with learned reverse variances and
the hybrid loss of Nichol & Dhariwal 2021 ("Improved Denoising Diffusion Probabilistic Models"),
and the deterministic DDIM sampler of Song et al. 2021 ("Denoising Diffusion Implicit Models").

Forward process: q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I), t = 1..T, so that
q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) with abar_t = prod_s (1 - beta_s).
Reverse process: p(x_{t-1} | x_t) = N(mu(x_t, t), sigma_t^2 I) with
mu = (x_t - beta_t / sqrt(1 - abar_t) eps(x_t, t)) / sqrt(1 - beta_t) and
log sigma_t^2 = v log beta_t + (1 - v) log beta~_t, v in [0, 1] per pixel from the network
(beta~_t is the variance of the posterior q(x_{t-1} | x_t, x_0)); p(x_0 | x_1) is a Gaussian
discretized over the 17 pixel bins (width 1/8, the outer bins reach +-infinity); p(x_T) = N(0, I).

The noise predictor eps(x_t, t) is a residual MLP (common.ResidualMLP) with a sinusoidal time
embedding, added to the prediction of an exact Bayes denoiser: E[eps | x_t] under a prior in which
the 64 pixels are independent categoricals over the 17 levels (learned logits; common.box_posterior
with boxes of half-width 0). This "grid skip" resolves the 1/8 pixel grid at low noise, where a
plain MLP can't predict eps precisely enough and the bound explodes (--no-grid-skip to see it).
Training minimises the hybrid loss L_simple + lambda * L_vlb (Nichol & Dhariwal sec. 3.1; the mean
enters L_vlb with its gradient stopped, so L_vlb trains the variances only), with the steps t
drawn half uniformly and half log-uniformly (more low-noise steps, where the bound's terms are
large; L_vlb importance-weighted, so unbiased). The validation objective is the same loss on the
validation split.

The test NLL is the variational bound, in nats per image on the discrete 0..16 pixels:
  -log p(x_0) <= KL(q(x_T | x_0) || p(x_T)) + sum_{t=2..T} KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))
                 - log p(x_0 | x_1),
every term exact (Gaussian KLs in closed form), with one draw of x_t ~ q(x_t | x_0) per term.
Samplers: ancestral (all T steps, the model whose bound is reported; the last step draws a
pixel bin from the discretized decoder) and deterministic DDIM on a subsequence of
--ddim-steps steps (the default, --sampler); `python benchmark.py --samplers` compares the two
over several sample seeds.

Conditional model (--conditional): p(x | y) for the ten digit classes, trained with label dropout
for classifier-free guidance (Ho & Salimans 2022): a class embedding (NUM_CLASSES + 1 rows, the
last "no label") is added to the step embedding, the grid skip's per-pixel prior becomes one prior
per class (and one for "no label"), and every label is replaced by "no label" with probability
--label-dropout, so one network learns eps(x_t, t, y) and eps(x_t, t). The samplers use
eps = (1 + w) eps(x_t, t, y) - w eps(x_t, t) with w = --guidance (the reverse variances from the
conditional output, as in GLIDE); w = 0 is the plain conditional sampler. The test NLL is the bound
above with y given, -log p(x | y) (no guidance: w only shapes samples); class_log_likelihoods gives
the ten classes' bounds from a stratified estimate with the same steps and noise for every class.

Run:  python ddpm.py                        # defaults, writes results/DDPM_*
      python ddpm.py --sampler ancestral    # all T steps for the samples
      python ddpm.py --help
"""

import dataclasses
import math

import numpy as np
import torch
from torch import nn

import common
from plumbing import runs

# -----------------------------------------------------------------------------
# noise schedules and the discretized decoder


def make_betas(schedule, num_steps):
    """beta_1..beta_T as float64 (T,).

    linear: Ho et al.'s 1e-4..0.02 for T = 1000, scaled by 1000 / T for other T (as in Nichol &
    Dhariwal), so that abar_T stays near 0. cosine: Nichol & Dhariwal's
    abar_t = f(t) / f(0), f(t) = cos^2((t / T + s) / (1 + s) * pi / 2), s = 0.008, beta <= 0.999.
    """
    if schedule == "linear":
        scale = 1000 / num_steps
        return torch.linspace(scale * 1e-4, min(scale * 0.02, 0.999), num_steps, dtype=torch.float64)
    if schedule == "cosine":
        s = 0.008
        steps = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        abar = f / f[0]  # (T + 1,) abar_0 = 1 .. abar_T
        return (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown schedule {schedule!r}")


def discretized_gaussian_log_prob(x0, mean, log_var):
    """log p(x0 | x1): N(mean, exp(log_var)) integrated over the pixel bin of x0.

    x0: on the grid -1 + k / 8, k = 0..16; the bins are [x0 - 1/16, x0 + 1/16], except that the
    bin of -1 starts at -inf and the bin of 1 ends at +inf, so the 17 probabilities sum to 1.
    """
    inv_std = torch.exp(-0.5 * log_var)
    lower = (x0 - common.PM1_BIN_HALF_WIDTH - mean) * inv_std
    upper = (x0 + common.PM1_BIN_HALF_WIDTH - mean) * inv_std
    lower = torch.where(x0 < -1 + common.PM1_BIN_HALF_WIDTH, torch.full_like(lower, -math.inf), lower)
    upper = torch.where(x0 > 1 - common.PM1_BIN_HALF_WIDTH, torch.full_like(upper, math.inf), upper)
    return common.log_normal_mass(lower, upper)


def gaussian_kl(mean_q, log_var_q, mean_p, log_var_p):
    """KL(N(mean_q, var_q) || N(mean_p, var_p)) elementwise, in nats."""
    return 0.5 * (log_var_p - log_var_q + torch.exp(log_var_q - log_var_p)
                  + (mean_q - mean_p) ** 2 * torch.exp(-log_var_p) - 1)


# -----------------------------------------------------------------------------
# noise-prediction network


def timestep_embedding(t, dim):
    """Sinusoidal embedding (Vaswani et al. 2017) of integer steps t (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)  # (half,)
    angles = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class StepEmbedding(nn.Module):
    """Integer steps t (B,) -> (B, embed): the sinusoidal embedding of t on a 0..1000 scale, whatever T
    (Ho et al. 2020's, for T = 1000), then Linear, SiLU, Linear."""

    def __init__(self, num_steps, embed=128):
        super().__init__()
        self.embed, self.time_scale = embed, 1000 / num_steps
        self.mlp = nn.Sequential(nn.Linear(embed, embed), nn.SiLU(), nn.Linear(embed, embed))

    def forward(self, t):
        return self.mlp(timestep_embedding(t * self.time_scale, self.embed))


# -----------------------------------------------------------------------------
# model

@dataclasses.dataclass(frozen=True)
class DDPMConfig(common.ModelConfig):
    num_steps: int = common.option(1000, "diffusion steps T", type=common.positive_int, flag=("--num-steps", "-T"))
    schedule: str = common.option("linear", "noise schedule beta_t (linear: the better bound on validation)",
                                  choices=("linear", "cosine"))
    hidden: int = common.option(384, "width of the noise predictor's residual MLP", type=common.positive_int)
    blocks: int = common.option(3, "residual blocks of the noise predictor", type=common.positive_int)
    variance: str = common.option("learned", "reverse variances: learned interpolation between beta~_t and "
                                  "beta_t (hybrid loss), or fixed beta~_t (simple loss only)",
                                  choices=("learned", "fixed"))
    grid_skip: bool = common.option(True, "predict eps with the MLP alone, without the exact per-pixel grid denoiser")
    vlb_weight: float = common.option(1e-3, "lambda of the hybrid loss L_simple + lambda L_vlb",
                                      type=common.nonnegative_float)
    log_t_frac: float = common.option(0.5, "fraction of training steps t drawn log-uniformly on 1..T, the rest "
                                      "uniformly: more training where the bound's terms are large",
                                      type=common.unit_interval)
    label_dropout: float = common.option(0.15, "conditional runs only: probability that a training label is "
                                         "replaced by 'no label' (classifier-free guidance)",
                                         type=common.unit_interval)


DDIM_STEPS = {False: 50, True: 25}  # the default --ddim-steps of unconditional and conditional runs


@dataclasses.dataclass(frozen=True)
class DDPMSampling:
    sampler: str = common.option("ddim", "sampler for the samples, grid and GIF", choices=("ddim", "ancestral"))
    # 25 for conditional runs: as good on validation (means over 10 sample seeds) in half the time, which
    # keeps the five test draws within a tenth of a run (docs/choices.md, DDPM)
    ddim_steps: int = common.option(None, f"DDIM steps (default {DDIM_STEPS[False]}; {DDIM_STEPS[True]} for "
                                    "conditional runs; 10 with --quick)", type=common.positive_int, quick=10)
    # w = 0.125: chosen on validation (docs/conditional.md, the methods table)
    guidance: float = common.option(0.125, "conditional runs only: classifier-free guidance weight w, "
                                    "eps = (1 + w) eps(x, y) - w eps(x); 0: the plain conditional sampler",
                                    type=common.nonnegative_float)


class DDPM(common.DigitsModel):
    name = "DDPM"
    nll_kind = "upper_bound"
    objective = "hybrid loss L_simple + lambda L_vlb"
    Config, Sampling = DDPMConfig, DDPMSampling

    def __init__(self, config=None, sampling=None):
        config, sampling = config or DDPMConfig(), sampling or DDPMSampling()
        if sampling.ddim_steps is None:
            sampling = dataclasses.replace(sampling, ddim_steps=DDIM_STEPS[config.conditional])
        super().__init__(config, sampling)
        c = self.config
        num_steps, schedule, log_t_frac = c.num_steps, c.schedule, c.log_t_frac
        self.num_steps, self.learned_variance, self.grid_skip = num_steps, c.variance == "learned", c.grid_skip
        self.vlb_weight = c.vlb_weight
        # schedules in float64, stored as float32 buffers indexed by t - 1 (index 0 is t = 1)
        betas = make_betas(schedule, num_steps)  # (T,)
        alphas = 1 - betas
        abar = torch.cumprod(alphas, 0)  # abar_t
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])  # abar_{t-1}, abar_0 = 1
        post_var = betas * (1 - abar_prev) / (1 - abar)  # beta~_t (0 at t = 1)
        # log beta~_t with beta~_1 = 0 replaced by beta~_2 (Nichol & Dhariwal), so v interpolates
        # between finite values at t = 1; there the decoder uses it, no KL to beta~_1
        post_log_var = torch.log(torch.cat([post_var[1:2], post_var[1:]]) if num_steps > 1 else betas)
        # training steps: a fraction log_t_frac log-uniform, P(t) = ln((t + 1) / t) / ln(T + 1),
        # the rest uniform: more of the low-noise steps, which dominate the bound
        steps = torch.arange(1, num_steps + 1, dtype=torch.float64)
        log_uniform = torch.log1p(1 / steps) / math.log(num_steps + 1)  # sums to 1 over t = 1..T
        time_probs = log_t_frac * log_uniform + (1 - log_t_frac) / num_steps
        for key, value in dict(
                time_probs=time_probs, betas=betas, abar=abar, post_var=post_var,
                post_log_var=post_log_var, log_betas=torch.log(betas),
                sqrt_abar=abar.sqrt(), sqrt_one_minus_abar=(1 - abar).sqrt(),  # float64 before the cast:
                eps_coef=betas / (1 - abar).sqrt(), recip_sqrt_alpha=alphas.rsqrt(),  # 1 - abar_1 = 1e-4
                post_coef_x0=betas * abar_prev.sqrt() / (1 - abar),  # mean of q(x_{t-1} | x_t, x_0) =
                post_coef_xt=(1 - abar_prev) * alphas.sqrt() / (1 - abar),  # c0 x_0 + ct x_t
                grid=common.pixels_to_pm1(torch.arange(common.NUM_LEVELS, dtype=torch.float64))).items():
            self.register_buffer(key, value.float())
        out_dim = 2 * common.NUM_PIXELS if self.learned_variance else common.NUM_PIXELS  # eps (and v)
        embedding = StepEmbedding(num_steps)
        if self.conditional:
            embedding = common.WithClass(embedding, 128)
        self.net = common.ResidualMLP(common.NUM_PIXELS, out_dim, c.hidden, c.blocks, embedding=embedding, embed=128)
        # logits of the per-pixel categorical prior of the grid skip (zero: uniform over 17 levels),
        # conditional: one prior per class and one for "no label"
        classes = (common.NUM_CLASSES + 1,) if self.conditional else ()
        self.prior_logits = nn.Parameter(torch.zeros(*classes, common.NUM_PIXELS, common.NUM_LEVELS))

    # --- Ho et al. 2020, Algorithm 1 (training) and 2 (sampling), with the learned variances and
    #     the hybrid loss of Nichol & Dhariwal 2021 (eq. 15, sec. 3.1); the bound (Ho et al. eq. 5)
    #     as test NLL ---

    def loss(self, x, y):
        """The hybrid loss; a conditional model's labels dropped to NULL_CLASS with probability
        --label-dropout (classifier-free guidance)."""
        return self.hybrid_loss(x, common.drop_labels(y, self.config.label_dropout) if self.conditional else None)

    def eval_loss(self, x, y):
        """The hybrid loss of the model being evaluated: p(x), or p(x | y) with every label kept."""
        return self.hybrid_loss(x, y if self.conditional else None)

    def hybrid_loss(self, x, y=None):
        """Hybrid loss: mean ||eps - eps(x_t, t)||^2 / 64 + lambda * L_{t-1} / (p(t) 64), t ~ p(t)
        (time_probs); the importance weight 1 / p(t) makes the second term an unbiased estimate of
        lambda * L_vlb / 64, L_vlb = sum_t L_{t-1} (nats per image). y: classes, or None."""
        x0 = common.pixels_to_pm1(x)
        t = torch.multinomial(self.time_probs, len(x0), replacement=True)  # (B,) 0-based
        noise = torch.randn_like(x0)
        xt = self.q_sample(x0, t, noise)
        eps, v = self.network(xt, t, y)
        simple = ((eps - noise) ** 2).mean(1)  # (B,)
        if v is None or self.vlb_weight == 0:
            return simple.mean()
        mean, log_var = self.p_mean_log_var(xt, t, eps.detach(), v)  # L_vlb trains v only
        vlb = self.bound_terms(x0, xt, t, mean, log_var) / (self.time_probs[t] * common.NUM_PIXELS)
        return (simple + self.vlb_weight * vlb).mean()

    def sample(self, n, y=None):
        return self.sample_ancestral(n, y) if self.sampling.sampler == "ancestral" else self.sample_ddim(n, y=y)

    def sample_ancestral(self, n, y=None):
        """x_T ~ N(0, I), x_{t-1} ~ p(x_{t-1} | x_t) for t = T..2, then a pixel bin ~ p(x_0 | x_1);
        y: the (n,) classes of a conditional model (guided_network)."""
        device = self.device
        x = torch.randn(n, common.NUM_PIXELS, device=device)
        for step in reversed(range(1, self.num_steps)):
            t = torch.full((n,), step, dtype=torch.long, device=device)
            mean, log_var = self.p_mean_log_var(x, t, *self.guided_network(x, t, y))
            x = mean + torch.exp(0.5 * log_var) * torch.randn_like(x)
        t = torch.zeros(n, dtype=torch.long, device=device)
        mean, log_var = self.p_mean_log_var(x, t, *self.guided_network(x, t, y))
        grid = self.grid.view(1, 1, -1).expand(n, common.NUM_PIXELS, -1)  # (n, 64, 17)
        logits = discretized_gaussian_log_prob(grid, mean[..., None], log_var[..., None])
        levels = torch.distributions.Categorical(logits=logits).sample()  # (n, 64) in 0..16
        return levels.float()

    def test_nll(self, x, y=None):
        """(B,) variational bound on -log P(x) (-log P(x | y) given classes y (B,)) in nats: prior
        KL + all T terms, one x_t draw each."""
        x0 = common.pixels_to_pm1(x)
        total = self.prior_kl(x0)
        for step in range(self.num_steps):
            t = torch.full((len(x0),), step, dtype=torch.long, device=x0.device)
            total = total + self.sampled_term(x0, t, torch.randn_like(x0), y)
        return total

    def sampled_term(self, x0, t, noise, y=None):
        """(B,) L_{t-1} of test_nll at the steps t (B,), from the draw x_t = q_sample(x_0, t, noise)."""
        xt = self.q_sample(x0, t, noise)
        mean, log_var = self.p_mean_log_var(xt, t, *self.network(xt, t, y))
        return self.bound_terms(x0, xt, t, mean, log_var)

    # --- the forward process q(x_t | x_0) and its posterior q(x_{t-1} | x_t, x_0)

    def _at(self, buffer, t):  # (T,) buffer at steps t (B,) 0-based -> (B, 1)
        return buffer[t][:, None]

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise ~ q(x_t | x_0); t (B,) 0-based (t - 1)."""
        return self._at(self.sqrt_abar, t) * x0 + self._at(self.sqrt_one_minus_abar, t) * noise

    def q_posterior(self, x0, xt, t):
        """Mean and log-variance of q(x_{t-1} | x_t, x_0) (t >= 2; 0-based t >= 1)."""
        mean = self._at(self.post_coef_x0, t) * x0 + self._at(self.post_coef_xt, t) * xt
        # beta~_1 = 0: clamped so that the unused KL at t = 1 stays finite (the decoder replaces it)
        return mean, torch.log(self._at(self.post_var, t).clamp(min=1e-20)).expand_as(xt)

    # --- the reverse process p(x_{t-1} | x_t) and the terms of the bound

    def network(self, xt, t, y=None):
        """eps(x_t, t) (B, 64) and the raw variance output (B, 64) in about [-1, 1] (or None);
        y (B,): the classes (NULL_CLASS: no label) of a conditional model, None otherwise."""
        out = self.net(xt, t if y is None else (t, y))  # (B, 64) or (B, 128)
        eps = out[:, :common.NUM_PIXELS]
        if self.grid_skip:  # + E[eps | x_t] when x_0's pixels are independent categoricals over the grid
            logits = self.prior_logits if y is None else self.prior_logits[y]  # (64, 17) or (B, 64, 17)
            grid = common.box_posterior(logits, xt, self.sqrt_abar[t], self.sqrt_one_minus_abar[t], half_width=0)
            eps = eps + grid.mean_noise
        return eps, out[:, common.NUM_PIXELS:] if self.learned_variance else None

    def p_mean_log_var(self, xt, t, eps, v):
        """Mean and log-variance of p(x_{t-1} | x_t) from eps and v (Nichol & Dhariwal eq. 15)."""
        mean = (xt - self._at(self.eps_coef, t) * eps) * self._at(self.recip_sqrt_alpha, t)
        if v is None:  # fixed: sigma_t^2 = beta~_t (beta~_2 at t = 1)
            return mean, self._at(self.post_log_var, t).expand_as(xt)
        frac = (v + 1) / 2
        return mean, frac * self._at(self.log_betas, t) + (1 - frac) * self._at(self.post_log_var, t)

    def bound_terms(self, x0, xt, t, mean, log_var):
        """(B,) L_{t-1}: the KL to q(x_{t-1} | x_t, x_0) for t >= 2, -log p(x_0 | x_1) for t = 1."""
        true_mean, true_log_var = self.q_posterior(x0, xt, t)
        terms = gaussian_kl(true_mean, true_log_var, mean, log_var).sum(1)  # (B,)
        first = (t == 0).nonzero().squeeze(1)  # rows at t = 1 get the decoder instead
        if len(first):
            decoder_nll = -discretized_gaussian_log_prob(x0[first], mean[first], log_var[first]).sum(1)
            terms = terms.index_put((first,), decoder_nll)
        return terms

    def prior_kl(self, x0):
        """(B,) KL(q(x_T | x_0) || N(0, I))."""
        mean, var = self.sqrt_abar[-1] * x0, self.sqrt_one_minus_abar[-1] ** 2
        return (0.5 * (var + mean ** 2 - 1 - torch.log(var))).sum(1)

    # --- Beyond the paper: the DDIM sampler, classifier-free guidance, stratified bounds (the
    #     generative classifier, OOD scores), inpainting ---

    def guided_network(self, xt, t, y=None):
        """network() for the samplers: with classes y, eps guided by --guidance (common.guided; one
        call when w = 0), the variance output the conditional one's."""
        if y is None:
            return self.network(xt, t)
        outputs = []

        def predict(labels):
            outputs.append(self.network(xt, t, labels))
            return outputs[-1][0]
        return common.guided(predict, y, self.sampling.guidance), outputs[0][1]

    def ddim(self, x, steps, y=None):
        """Deterministic DDIM (eta = 0) from x = x_T (n, 64) on `steps` evenly spaced steps
        T = tau_S > .. > tau_1 = 1, each x0^ = (x - sqrt(1 - abar) eps) / sqrt(abar) clipped to
        [-1, 1], x <- sqrt(abar_next) x0^ + sqrt(1 - abar_next) eps^; returns the last x0^."""
        taus = torch.linspace(self.num_steps - 1, 0, steps, dtype=torch.float64).round().long().tolist()
        for i, step in enumerate(taus):
            eps, _ = self.guided_network(x, torch.full((len(x),), step, dtype=torch.long, device=x.device), y)
            a, b = self.sqrt_abar[step], self.sqrt_one_minus_abar[step]
            x0 = ((x - b * eps) / a).clamp(-1, 1)
            eps = (x - a * x0) / b  # consistent with the clipped x0^
            if i + 1 < len(taus):
                x = self.sqrt_abar[taus[i + 1]] * x0 + self.sqrt_one_minus_abar[taus[i + 1]] * eps
        return x0

    def sample_ddim(self, n, steps=None, y=None):
        """DDIM from x_T ~ N(0, I) with --ddim-steps steps, rounded to the nearest pixel level."""
        x = torch.randn(n, common.NUM_PIXELS, device=self.device)
        steps = min(steps or self.sampling.ddim_steps, self.num_steps)
        return common.pm1_to_pixels(self.ddim(x, steps, y)).round()

    def samplers(self):
        """The sampler that --sampler did not choose: ancestral (all T steps) or DDIM (--ddim-steps)."""
        others = dict(ancestral=self.sample_ancestral, ddim=self.sample_ddim)
        del others[self.sampling.sampler]
        return others

    def stratified_steps(self, n, exact, strata, device):
        """[(t (n,), weight)]: the first `exact` steps, then one random step per image in each of
        `strata` geometrically growing intervals of [exact, T), weighted by the interval's length
        (the terms fall by orders of magnitude from t = 10 to 1000, so uniform strata would spend
        their draws where the bound does not change)."""
        terms = [(torch.full((n,), step, dtype=torch.long, device=device), 1.0) for step in range(exact)]
        edges = np.geomspace(exact, self.num_steps, strata + 1)
        for low, high in zip(edges[:-1], edges[1:]):
            t = (low + (high - low) * torch.rand(n, device=device)).long().clamp(exact, self.num_steps - 1)
            terms.append((t, float(high - low)))
        return terms

    def class_log_likelihoods(self, x, exact=6, strata=18):
        """(B, 10) minus the bound of test_nll given each class, its sum over the T steps
        estimated as ood_score's (`exact` steps exactly, one in each of `strata` strata): 24
        network calls per class instead of T = 1000, the steps and x_t draws the same for every
        class, so that the estimate's noise hardly moves the differences between classes."""
        x0 = common.pixels_to_pm1(x)
        n, k = len(x0), common.NUM_CLASSES
        classes = torch.arange(k, device=x0.device).repeat_interleave(n)  # (10 B,) class-major
        total = self.prior_kl(x0).repeat(k)
        for t, weight in self.stratified_steps(n, exact, strata, x0.device):
            noise = torch.randn_like(x0)
            total = total + weight * self.sampled_term(x0.repeat(k, 1), t.repeat(k), noise.repeat(k, 1), classes)
        return -total.view(k, n).T

    def ood_score(self, x, exact=8, strata=24):
        """(B,) the bound of test_nll with its sum over the T steps estimated per image, for
        ood.py's thousands of inputs: the first `exact` steps (the decoder at t = 1 and the large,
        varied terms of little noise) computed exactly, the rest from one random step in each of
        `strata` strata (stratified_steps); the prior term exact. Unbiased, and
        T / (exact + strata) times cheaper than the full bound."""
        x0 = common.pixels_to_pm1(x)
        total = self.prior_kl(x0)
        for t, weight in self.stratified_steps(len(x0), exact, strata, x0.device):
            total = total + weight * self.sampled_term(x0, t, torch.randn_like(x0))
        return total

    @torch.no_grad()
    def complete(self, x, missing, steps=20, resample=2):
        """Inpainting as RePaint (Lugmayr et al. 2022, common.repaint) on `steps` evenly spaced steps
        of the T: the observed pixels set to the data noised to the step, sqrt(abar_t) x_0 +
        sqrt(1 - abar_t) eps, x0^ from the network's eps, the ancestral step (DDIM with eta = 1)
        to the next, `resample` times per step; then the pixel values of the last x0^."""
        taus = torch.linspace(self.num_steps - 1, 0, min(steps, self.num_steps), dtype=torch.float64).round().long()
        abar = self.abar[taus.to(self.abar.device)]
        alphas, sigmas = abar.sqrt(), (1 - abar).sqrt()

        def denoise(z, i):
            eps, _ = self.network(z, torch.full((len(z),), int(taus[i]), dtype=torch.long, device=z.device))
            return (z - sigmas[i] * eps) / alphas[i]

        x0 = common.repaint(denoise, common.pixels_to_pm1(x), missing, alphas.tolist(), sigmas.tolist(), resample)
        return torch.where(missing, common.pm1_to_pixels(x0).round(), x)

    def completion_nll(self, x):
        """(B,) the stratified estimate of the bound (ood_score): what best-of-K ranks by."""
        return self.ood_score(x)


# -----------------------------------------------------------------------------
# command line


def main(argv=None):
    # batches of 128 at twice the learning rate of 64 and the EMA's decay squared (the same horizon in
    # epochs): as good on validation in about half the time; validated every 5th epoch (docs/choices.md)
    runs.main(DDPM, __doc__, argv, epochs=550, batch_size=128, lr=2e-3, patience=25, ema=0.998, gif_every=20,
              val_every=5)


if __name__ == "__main__":
    main()
