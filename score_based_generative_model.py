"""Score-based generative model (SBGM) of 8x8 Digits through stochastic differential equations
(Song et al. 2021, "Score-Based Generative Modeling through Stochastic Differential Equations"),
trained by likelihood-weighted denoising score matching (Song, Durkan, Murray & Ermon 2021,
"Maximum Likelihood Training of Score-Based Diffusion Models"), with a test NLL bound from the
probability-flow ODE.

Data: x0 = pixels_to_pm1(x + u - 0.5) in [-1 - 1/16, 1 + 1/16]^64, u ~ U[0, 1)^64 (uniform
dequantization; x the pixels 0..16 of the model contract): each pixel value k lies in a box of
half-width 1/16 around c_k = k / 8 - 1.
Forward SDE dz = f(t) z dt + g(t) dW, t in [0, 1] (Song et al. eq. 5), with perturbation kernel
z_t | x0 ~ N(alpha_t x0, sigma_t^2 I):
  vp: dz = -beta(t)/2 z dt + sqrt(beta(t)) dW (eq. 11), beta linear 0.1..20, alpha_t = exp(-int_0^t beta/2),
      sigma_t^2 = 1 - alpha_t^2, prior N(0, I);
  ve: dz = sqrt(d sigma_t^2 / dt) dW (eq. 9), sigma_t^2 = s_min^2 ((s_max / s_min)^(2t) - 1), alpha_t = 1,
      prior N(0, (1 + sigma_1^2) I).
The network predicts the noise, eps(z, t) = -sigma_t * score(z, t). By default (--output levels) it
predicts, for every pixel, logits over the 17 values, and eps is the exact posterior mean of a
prior in which the pixel value has those probabilities and sits uniformly in its box
(common.box_posterior): the likelihood of z given each box is a difference of normal CDFs, so the
sharp 1/8 grid at low noise is resolved analytically and the network only has to say which value
(the "score interpolation" of Dieleman et al. 2022, "Continuous diffusion for categorical data",
here with boxes).
--output eps is a plain noise-predicting MLP.

Training minimises the continuous-time variational bound (Kingma et al. 2021, "Variational
Diffusion Models"; = Song et al.'s likelihood weighting lambda(t) = g(t)^2), in nats per image
on the discrete pixels:
  -log P(x) <= E[ KL(q(z_1 | x0) || prior) + 1/2 int_{lam_min}^{lam_max} ||eps - eps(z_lam)||^2 dlam
                  - log N(x0; z_e / alpha_e, (sigma_e / alpha_e)^2 I) ] - PM1_LOGDET,
with lam = log(alpha^2 / sigma^2) the log-SNR and t_e = --t-eps. Sampling lam uniformly is the
importance sampling of t in proportion to g^2 / sigma^2 (Song et al. 2021b); a batch takes evenly
spaced lam with one random shift. The validation objective is the same bound.

Test NLL: the probability-flow ODE dz/dt = f z - g^2 / 2 score (Song et al. eq. 13), written in
z~ = z / alpha and s = log(sigma / alpha) as dz~/ds = exp(s) eps(alpha z~, t(s)), integrated by RK4
on equal steps of s from t_e to 1 (common.rk4_with_divergence) with the change of variables
d log p / ds = -div, div exact (64 forward-mode derivatives) or Hutchinson's estimate;
log p(x0) = log N(z_1; 0, prior) + int div ds + 64 log(alpha_1 / alpha_e), and the bound is
E_u[-log p(x0)] - PM1_LOGDET (upper bound on the discrete NLL).
Samplers: the probability-flow ODE by DPM-Solver++(2M) (Lu et al. 2022; the default), the
multistep exponential integrator of dz~/ds = z~ - E[x0 | z] with one network call per step, on
equal steps of s that stop at the noise level sigma~ = --denoise-at; or the same ODE by Heun's
method on equal steps of s to t_eps; or the reverse-time SDE by Euler-Maruyama on a uniform t
grid to t_eps, with optional Langevin corrector steps (predictor-corrector, Song et al. 2021).
Each ends with the denoiser's E[x0 | z] (Tweedie) at its last time and returns the pixel value
whose box holds it. Stopping the ODE at a noise level comparable to the box width and denoising
there spends no steps on the long stretch of small noise levels down to t_eps.

Conditional model (--conditional): p(x | y) for the ten digit classes, trained with label dropout
for classifier-free guidance (Ho & Salimans 2022): a class embedding (NUM_CLASSES + 1 rows, the
last "no label") is added to the time embedding and every training label is replaced by "no
label" with probability --label-dropout, so one network learns eps(z, t, y) and eps(z, t). The
samplers use eps = (1 + w) eps(z, t, y) - w eps(z, t), w = --guidance (w = 0: the plain
conditional sampler). The test NLL is the ODE bound above with y given, -log p(x | y), unguided.
class_log_likelihoods (the generative classifier) uses the cheaper continuous-time variational
bound instead, on stratified log-SNRs with the same dequantization and noise for every class.

Run:  python score_based_generative_model.py                    # defaults, writes results/SBGM_*
      python score_based_generative_model.py --sampler sde      # reverse-time SDE samples
      python score_based_generative_model.py --sample-only --sampler heun   # the ODE by Heun's method
      python score_based_generative_model.py --sde vp           # the variance preserving SDE
"""

import dataclasses
import functools
import math

import torch
import torch.nn.functional as F

import common
from plumbing import UsageError, runs

# -----------------------------------------------------------------------------
# forward SDEs: kernel z_t | x0 ~ N(alpha_t x0, sigma_t^2 I), dz = f(t) z dt + g(t) dW


class VPSDE:
    """Variance preserving: beta(t) = beta_min + t (beta_max - beta_min), f = -beta / 2, g^2 = beta."""

    def __init__(self, beta_min=0.1, beta_max=20.0):
        self.beta_min, self.beta_max = beta_min, beta_max

    def log_alpha(self, t):  # -int_0^t beta / 2
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def marginal(self, t):
        """alpha_t, sigma_t of the perturbation kernel (same shape as t)."""
        log_alpha = self.log_alpha(t)
        return log_alpha.exp(), (-torch.expm1(2 * log_alpha)).sqrt()  # sigma^2 = 1 - alpha^2

    def coefficients(self, t):
        """f(t), g(t)^2 of dz = f z dt + g dW."""
        beta = self.beta_min + t * (self.beta_max - self.beta_min)
        return -0.5 * beta, beta

    def log_snr(self, t):  # log(alpha^2 / sigma^2)
        log_alpha2 = 2 * self.log_alpha(t)
        return log_alpha2 - torch.log(-torch.expm1(log_alpha2))

    def time_of_log_snr(self, lam):
        """Inverse of log_snr: alpha^2 = sigmoid(lam), solve the quadratic log_alpha(t) = log sigmoid(lam) / 2."""
        d = self.beta_max - self.beta_min
        return (-self.beta_min + (self.beta_min**2 - 2 * d * F.logsigmoid(lam)).sqrt()) / d

    def prior_var(self):
        return 1.0


class VESDE:
    """Variance exploding: f = 0, g^2 = d sigma_t^2 / dt, sigma_t^2 = s_min^2 ((s_max / s_min)^(2t) - 1)."""

    def __init__(self, sigma_min=0.01, sigma_max=10.0):
        self.sigma_min, self.log_ratio = sigma_min, math.log(sigma_max / sigma_min)

    def marginal(self, t):
        return torch.ones_like(t), self.sigma_min * torch.expm1(2 * t * self.log_ratio).sqrt()

    def coefficients(self, t):
        return torch.zeros_like(t), 2 * self.log_ratio * self.sigma_min**2 * torch.exp(2 * t * self.log_ratio)

    def log_snr(self, t):
        return -2 * math.log(self.sigma_min) - torch.log(torch.expm1(2 * t * self.log_ratio))

    def time_of_log_snr(self, lam):
        return torch.log1p(torch.exp(-lam) / self.sigma_min**2) / (2 * self.log_ratio)

    def prior_var(self):  # alpha_1^2 + sigma_1^2: the kernel's variance for data of unit variance
        return 1.0 + self.sigma_min**2 * math.expm1(2 * self.log_ratio)


SDES = dict(vp=VPSDE, ve=VESDE)


# -----------------------------------------------------------------------------
# the probability-flow ODE (likelihood and sampler) and the reverse-time SDE sampler
# eps_fn(z, t) -> (B, 64) is the noise predictor; t is a (B,) tensor


def at_time(fn, t):
    """fn (of a time tensor) at the float time t, evaluated in float64, as a float."""
    return float(fn(torch.tensor(t, dtype=torch.float64)))


def time_and_alpha(sde, x, s):
    """t (B,) where s = log(sigma / alpha) = -log-SNR / 2, and alpha_t (B,), batched like x (B, 64)."""
    t = sde.time_of_log_snr(torch.full(x.shape[:1], -2 * s, dtype=x.dtype, device=x.device))
    return t, sde.marginal(t)[0]


def ode_log_likelihood(eps_div_fn, sde, x0, t_eps, steps):
    """log p(x0) in nats (B,) under the probability-flow ODE's density at t_eps.

    eps_div_fn(z, t) -> (eps, tr(d eps / d z)). In z~ = z / alpha and s = log(sigma / alpha) the
    ODE reads dz~/ds = v = exp(s) eps(alpha z~, t(s)), div_z~ v = exp(s) alpha tr(d eps / d z);
    RK4 on `steps` equal steps of s from t_eps to t = 1 integrates z~ and int div ds, and
    log p(z~_e) = log p(z~_1) + int div ds."""
    def field(x, s):
        t, alpha = time_and_alpha(sde, x, s)
        eps, div = eps_div_fn(alpha[:, None] * x, t)
        return math.exp(s) * eps, math.exp(s) * alpha * div

    s0, s1 = -0.5 * at_time(sde.log_snr, t_eps), -0.5 * at_time(sde.log_snr, 1.0)
    alpha_e, alpha_1 = (at_time(lambda t: sde.marginal(t)[0], time) for time in (t_eps, 1.0))
    nodes = torch.linspace(s0, s1, steps + 1, dtype=torch.float64).tolist()
    x, integral = common.rk4_with_divergence(field, x0 / alpha_e, nodes)  # z~ from t_eps to 1
    d, var = x0.shape[1], sde.prior_var()
    z1 = alpha_1 * x
    log_prior = -0.5 * (z1**2).sum(1) / var - 0.5 * d * math.log(2 * math.pi * var)  # log N(z_1; 0, var I)
    # log p_z(z) = log p_z~(z / alpha) - d log alpha, at both ends
    return log_prior + d * math.log(alpha_1) + integral - d * math.log(alpha_e)


def ode_velocity(eps_fn, sde, x_tilde, s):
    """dz~/ds = exp(s) eps(alpha z~, t(s)) at s = log(sigma / alpha); x_tilde (B, 64)."""
    t, alpha = time_and_alpha(sde, x_tilde, s)
    return math.exp(s) * eps_fn(alpha[:, None] * x_tilde, t)


def ode_start(sde, z1):
    """Where both ODE solvers start: s_1 = log(sigma_1 / alpha_1) and z~_1 = z_1 / alpha_1 (n, 64)."""
    return -0.5 * at_time(sde.log_snr, 1.0), z1 / at_time(lambda t: sde.marginal(t)[0], 1.0)


def sample_probability_flow(eps_fn, sde, z1, t_eps, steps):
    """Integrate the probability-flow ODE from z_1 (n, 64) to t_eps by Heun's method on equal steps of
    s = log(sigma / alpha); returns (z at t_eps, t_eps as a (n,) tensor)."""
    s1, x = ode_start(sde, z1)
    grid = torch.linspace(s1, -0.5 * at_time(sde.log_snr, t_eps), steps + 1, dtype=torch.float64).tolist()
    for s, s_next in zip(grid[:-1], grid[1:]):
        k1 = ode_velocity(eps_fn, sde, x, s)
        k2 = ode_velocity(eps_fn, sde, x + (s_next - s) * k1, s_next)
        x = x + (s_next - s) * 0.5 * (k1 + k2)
    t = torch.full((len(z1),), t_eps, dtype=z1.dtype, device=z1.device)
    return sde.marginal(t)[0][:, None] * x, t


def sample_dpm_solver(eps_fn, sde, z1, s_end, steps, order=2):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2), the multistep exponential
    integrator of the probability-flow ODE in its data prediction, one network call per step: in
    z~ = z / alpha and s = log(sigma / alpha) the ODE reads dz~/ds = z~ - D(z~, s), D = E[x0 | z] =
    z~ - exp(s) eps, so over a step h = s' - s < 0 with D held fixed z~' = e^h z~ + (1 - e^h) D exactly
    (DDIM). The 2M step replaces D by the extrapolation (1 + 1 / 2r) D_i - 1 / 2r D_i-1 through the
    previous step's D, r = h_i-1 / h_i (the first step is DDIM's; order=1: DDIM throughout). Equal
    steps of s from t = 1 to s_end = log(sigma~) of the last step; returns z~ at s_end (n, 64)."""
    if order not in (1, 2):
        raise ValueError(f"DPM-Solver++ order {order!r}; valid: 1, 2")
    s1, x = ode_start(sde, z1)
    grid = torch.linspace(s1, s_end, steps + 1, dtype=torch.float64).tolist()
    previous = None  # (D_i-1, h_i-1)
    for s, s_next in zip(grid[:-1], grid[1:]):
        t, alpha = time_and_alpha(sde, x, s)
        data = x - math.exp(s) * eps_fn(alpha[:, None] * x, t)  # D_i = E[x0 | z], (n, 64)
        h = s_next - s
        extrapolated = data
        if order == 2 and previous is not None:
            r = previous[1] / h
            extrapolated = (1 + 0.5 / r) * data - (0.5 / r) * previous[0]
        x = math.exp(h) * x - math.expm1(h) * extrapolated
        previous = (data, h)
    return x


def sample_reverse_sde(eps_fn, sde, z1, t_eps, steps, corrector_steps=0, snr=0.16):
    """Euler-Maruyama on the reverse-time SDE dz = [f z - g^2 score] dt + g dW-bar from t = 1 to t_eps
    on `steps` equal steps of t, with `corrector_steps` Langevin steps of signal-to-noise ratio `snr`
    before each predictor step (Song et al. 2021, Algorithms 2-4). The last step adds no noise."""
    n = len(z1)
    times = torch.linspace(1.0, t_eps, steps + 1, dtype=z1.dtype, device=z1.device)
    z = z1
    for i in range(steps):
        t = times[i].expand(n)
        _, sigma = sde.marginal(t)
        for _ in range(corrector_steps):  # Langevin: z += e score + sqrt(2 e) noise
            score = -eps_fn(z, t) / sigma[:, None]
            noise = torch.randn_like(z)
            step = 2 * (snr * noise.norm(dim=1).mean() / score.norm(dim=1).mean()) ** 2  # norms averaged over the batch, as Song et al.'s code
            z = z + step * score + (2 * step).sqrt() * noise
        dt = float(times[i] - times[i + 1])  # > 0, going back in time
        f, g2 = sde.coefficients(t)
        score = -eps_fn(z, t) / sigma[:, None]
        z = z + (-f[:, None] * z + g2[:, None] * score) * dt
        if i < steps - 1:
            z = z + (g2[:, None] * dt).sqrt() * torch.randn_like(z)
    return z, times[-1].expand(n)


# -----------------------------------------------------------------------------
# model


@dataclasses.dataclass(frozen=True)
class SBGMConfig(common.ModelConfig):
    sde: str = common.option("ve", "forward SDE, variance exploding or preserving (ve: the better validation "
                             "bound)", choices=sorted(SDES))
    output: str = common.option("levels", "network output: logits over the 17 values with the exact box "
                                "posterior, or eps directly", choices=("levels", "eps"))
    hidden: int = common.option(256, "width of the residual MLP", type=common.positive_int)
    blocks: int = common.option(3, "residual blocks of the MLP", type=common.positive_int)
    dropout: float = common.option(0.0, "dropout in each residual block and before the output layer",
                                   type=common.unit_interval)
    t_eps: float = common.option(1e-5, "smallest time of the bound, the likelihood and the samplers, in (0, 1)",
                                 type=common.positive_float)
    label_dropout: float = common.option(0.15, "conditional runs only: probability that a training label is "
                                         "replaced by 'no label' (classifier-free guidance)",
                                         type=common.unit_interval)


# default sampler steps (QUICK_SAMPLE_STEPS with --quick); the default sampler's steps and end chosen on validation
SAMPLE_STEPS = dict(dpm=8, heun=20, sde=250)
# conditional runs: 6 DPM-Solver++ steps, better than 8 beyond the spread of sample seeds on validation
# with guidance, and cheaper (docs/choices.md, SBGM)
CONDITIONAL_SAMPLE_STEPS = dict(SAMPLE_STEPS, dpm=6)
QUICK_SAMPLE_STEPS = dict(dpm=4, heun=10, sde=20)
# beside the default in benchmark.py --samplers: fewer and more steps, and Heun's method
OTHER_SAMPLERS = (("dpm", 4), ("dpm", 16), ("heun", 20))


@dataclasses.dataclass(frozen=True)
class SBGMSampling:
    ode_steps: int = common.option(32, "RK4 steps of the likelihood ODE", type=common.positive_int, quick=4)
    divergence: str = common.option("hutchinson", "divergence in the likelihood ODE: Hutchinson's unbiased "
                                    "estimate, or exact (64 forward-mode derivatives per evaluation: slower)",
                                    choices=("hutchinson", "exact"))
    sampler: str = common.option("dpm", "probability-flow ODE by DPM-Solver++(2M) (one network call per step) "
                                 "or by Heun's method (two), or the reverse-time SDE (Euler-Maruyama)",
                                 choices=tuple(SAMPLE_STEPS))
    sample_steps: int = common.option(None, "sampler steps (default " + ", ".join(
                                      f"{SAMPLE_STEPS[k]} for {k}" for k in SAMPLE_STEPS) + "; conditional runs "
                                      f"{CONDITIONAL_SAMPLE_STEPS['dpm']} for dpm; with --quick " +
                                      ", ".join(f"{QUICK_SAMPLE_STEPS[k]} for {k}" for k in QUICK_SAMPLE_STEPS) + ")",
                                      type=common.positive_int)
    denoise_at: float = common.option(0.2, "dpm only: the noise level sigma / alpha (on the [-1, 1] scale, "
                                      "boxes 1/8 wide) where the ODE stops and Tweedie's E[x0 | z] is taken; "
                                      "heun and sde run to --t-eps", type=common.positive_float)
    corrector_steps: int = common.option(0, "Langevin corrector steps per reverse-SDE step",
                                         type=common.nonnegative_int)
    snr: float = common.option(0.16, "signal-to-noise ratio of the Langevin corrector", type=common.positive_float)
    # w = 0.5: chosen on validation with the dpm sampler, by per-class Frechet distance and class
    # accuracy (docs/choices.md, SBGM)
    guidance: float = common.option(0.5, "conditional runs only: classifier-free guidance weight w, "
                                    "eps = (1 + w) eps(z, t, y) - w eps(z, t); 0: the plain conditional sampler",
                                    type=common.nonnegative_float)


class SBGM(common.DigitsModel):
    name = "SBGM"
    nll_kind = "upper_bound"
    objective = "variational bound (nats/image)"
    Config, Sampling = SBGMConfig, SBGMSampling

    def __init__(self, config=None, sampling=None):
        super().__init__(config, sampling)
        if self.sampling.sample_steps is None:
            steps = CONDITIONAL_SAMPLE_STEPS if self.config.conditional else SAMPLE_STEPS
            self.sampling = dataclasses.replace(self.sampling, sample_steps=steps[self.sampling.sampler])
        config = self.config
        self.sde = SDES[config.sde]()
        # (z scaled to unit variance, normalized log-SNR in [0, 1]) -> 64 x (17 logits or eps); starts
        # at eps = 0 (eps) or a uniform prior over the values (levels)
        per_pixel = common.NUM_LEVELS if config.output == "levels" else 1
        embedding = common.FourierTimeEmbedding()
        if self.conditional:
            embedding = common.WithClass(embedding, 128)
        self.net = common.ResidualMLP(common.NUM_PIXELS, common.NUM_PIXELS * per_pixel, config.hidden, config.blocks,
                                      config.dropout, embedding, 128)
        ends = self.sde.log_snr(torch.tensor([config.t_eps, 1.0], dtype=torch.float64))
        self.lam_max, self.lam_min = float(ends[0]), float(ends[1])  # log-SNR range of the bound

    # --- Song et al. 2021: denoising score matching with the likelihood weighting lambda(t) = g(t)^2
    #     (Song, Durkan et al. 2021), as the continuous-time bound of Kingma et al. 2021 (VDM); sampling
    #     by the reverse-time SDE (eq. 6, sample_reverse_sde) or the probability-flow ODE (eq. 13),
    #     whose change of variables gives the test NLL ---

    def loss(self, x, y):
        """The bound; a conditional model's labels dropped to NULL_CLASS with probability
        --label-dropout (classifier-free guidance)."""
        return self.bound(x, common.drop_labels(y, self.config.label_dropout) if self.conditional else None).mean()

    def bound(self, x, y=None):
        """(B,) continuous-time variational bound on -log P(x) (-log P(x | y) given classes y),
        nats on the discrete pixels."""
        x0 = self.to_pm1(x)
        n = len(x0)
        shift = torch.rand(1, device=x0.device)
        u = ((shift + torch.arange(n, device=x0.device) / n) % 1)[torch.randperm(n, device=x0.device)]
        lam = self.lam_min + (self.lam_max - self.lam_min) * u  # evenly spaced log-SNR, shuffled
        return self.bound_at(x0, lam, torch.randn_like(x0), y)

    def bound_at(self, x0, lam, noise, y=None):
        """(B,) the bound from one draw: x0 (B, 64) dequantized, log-SNR lam (B,), noise (B, 64)."""
        d = x0.shape[1]
        t = self.sde.time_of_log_snr(lam)
        alpha, sigma = self.sde.marginal(t)
        z = alpha[:, None] * x0 + sigma[:, None] * noise  # (B, 64)
        diffusion = 0.5 * (self.lam_max - self.lam_min) * ((noise - self.eps(z, t, y)) ** 2).sum(1)
        # prior term KL(N(alpha_1 x0, sigma_1^2) || N(0, var)) per pixel, summed
        alpha1, sigma1 = (float(v) for v in self.sde.marginal(torch.tensor(1.0, dtype=torch.float64)))
        var = self.sde.prior_var()
        prior = 0.5 * (((alpha1 * x0) ** 2 + sigma1**2) / var - 1 - math.log(sigma1**2 / var)).sum(1)
        # decoder term E[-log N(x0; z_e / alpha_e, sigma~_e^2 I)] = d/2 log(2 pi e sigma~_e^2), sigma~_e^2 = exp(-lam_max)
        decoder = 0.5 * d * (math.log(2 * math.pi) + 1 - self.lam_max)
        return diffusion + prior + decoder - common.PM1_LOGDET

    def eps(self, z, t, y=None):
        """Noise prediction eps(z, t) = -sigma_t score(z, t); z (B, 64), t (B,) -> (B, 64); y (B,)
        the classes (NULL_CLASS: no label) of a conditional model, None otherwise."""
        alpha, sigma = self.sde.marginal(t)
        u = (self.sde.log_snr(t) - self.lam_min) / (self.lam_max - self.lam_min)  # in [0, 1]
        out = self.net(z * (alpha**2 + sigma**2).rsqrt()[:, None], u if y is None else (u, y))  # input of unit scale
        if self.config.output == "eps":
            return out
        logits = out.view(len(z), common.NUM_PIXELS, common.NUM_LEVELS)
        return common.box_posterior(logits, z, alpha, sigma).mean_noise  # E[eps | z]

    def to_pm1(self, x):
        """Dequantize and scale: x0 = pixels_to_pm1(x + u - 0.5), in the boxes c_k +- 1/16."""
        return common.pixels_to_pm1(common.dequantize(x) - 0.5)

    def eval_loss(self, x, y, repeats=4):
        y = y if self.conditional else None  # p(x | y) with every label kept
        return torch.stack([self.bound(x, y).mean() for _ in range(repeats)]).mean()

    @torch.no_grad()
    def sample(self, n, y=None, sampling=None):
        s, t_eps = sampling or self.sampling, self.config.t_eps
        eps_fn = self.guided_eps(y, s.guidance)
        z1 = torch.randn(n, common.NUM_PIXELS, device=self.device) * math.sqrt(self.sde.prior_var())
        if s.sampler == "dpm":
            s_end = math.log(s.denoise_at)
            x_tilde = sample_dpm_solver(eps_fn, self.sde, z1, s_end, s.sample_steps)
            t, alpha = time_and_alpha(self.sde, x_tilde, s_end)
            z = alpha[:, None] * x_tilde
        elif s.sampler == "heun":
            z, t = sample_probability_flow(eps_fn, self.sde, z1, t_eps, s.sample_steps)
        elif s.sampler == "sde":
            z, t = sample_reverse_sde(eps_fn, self.sde, z1, t_eps, s.sample_steps, s.corrector_steps, s.snr)
        else:
            raise ValueError(f"unknown sampler {s.sampler!r}; choose from {', '.join(SAMPLE_STEPS)}")
        alpha, sigma = self.sde.marginal(t)
        x0 = (z - sigma[:, None] * eps_fn(z, t)) / alpha[:, None]  # E[x0 | z] at the end (Tweedie)
        return torch.floor((x0 + 1) * 8 + 0.5).clamp(0, common.PIXEL_MAX)  # the value whose box holds x0

    def test_nll(self, x, y=None, chunk=64):
        """(B,) -log p(x0) - PM1_LOGDET (-log p(x0 | y) given classes y (B,)) by the
        probability-flow ODE, one dequantization per image."""
        x0 = self.to_pm1(x)

        def log_p(x0_chunk, *y_chunk):
            def eps_div(z, t):
                if not y_chunk:
                    return common.value_and_divergence(self.eps, z, t, self.sampling.divergence)
                ty = torch.stack([t, y_chunk[0].to(t.dtype)], 1)  # (B, 2): the class rides with the time
                return common.value_and_divergence(lambda z_, ty_: self.eps(z_, ty_[:, 0], ty_[:, 1].long()),
                                                   z, ty, self.sampling.divergence)
            return ode_log_likelihood(eps_div, self.sde, x0_chunk, self.config.t_eps, self.sampling.ode_steps)

        return -common.batched(log_p, x0, *([] if y is None else [y]), batch_size=chunk) - common.PM1_LOGDET

    # --- Beyond the paper: classifier-free guidance, other samplers, the generative classifier's
    #     stratified bound, inpainting, extra metrics ---

    def guided_eps(self, y, guidance):
        """The samplers' eps_fn(z, t): eps(z, t) for y None, else the classifier-free guided
        (1 + w) eps(z, t, y) - w eps(z, t) (common.guided; w = 0: one call, eps(z, t, y))."""
        if y is None:
            return self.eps
        return lambda z, t: common.guided(lambda labels: self.eps(z, t, labels), y, guidance)

    def samplers(self):
        """OTHER_SAMPLERS but the chosen one, as "sampler_steps": DPM-Solver++ with fewer and more
        steps than the default, and Heun's method of the same ODE (two calls a step, to t_eps):
        quality against seconds."""
        chosen = (self.sampling.sampler, self.sampling.sample_steps)
        return {f"{sampler}_{steps}": functools.partial(self.sample, sampling=dataclasses.replace(
                    self.sampling, sampler=sampler, sample_steps=steps))
                for sampler, steps in OTHER_SAMPLERS if (sampler, steps) != chosen}

    @torch.no_grad()
    def class_log_likelihoods(self, x, draws=16):
        """(B, 10) minus the continuous-time variational bound (of training, not test_nll's ODE: ten
        ODE solves would take minutes) given each class, its log-SNR integral estimated on `draws`
        strata of [lam_min, lam_max], one lam each, with the same dequantization, lam and noise for
        every class, so that the estimate's noise hardly moves the differences between classes."""
        x0 = self.to_pm1(x)
        n, k = len(x0), common.NUM_CLASSES
        classes = torch.arange(k, device=x0.device).repeat_interleave(n)  # (10 B,) class-major
        total = 0
        for i in range(draws):
            lam = self.lam_min + (self.lam_max - self.lam_min) * (i + torch.rand(n, device=x0.device)) / draws
            noise = torch.randn_like(x0)
            total = total + self.bound_at(x0.repeat(k, 1), lam.repeat(k), noise.repeat(k, 1), classes) / draws
        return -total.view(k, n).T

    @torch.no_grad()
    def complete(self, x, missing, steps=10, resample=10):
        """Inpainting as RePaint (Lugmayr et al. 2022, common.repaint) on `steps` equal steps of
        time from t = 1 to t_eps: the observed pixels set to the data noised to that time,
        alpha_t x_0 + sigma_t eps, x0^ = (z - sigma_t eps(z, t)) / alpha_t, the ancestral step to
        the next time, `resample` times per step (chosen on the validation split:
        docs/inpainting.md); then the value whose box holds the last x0^."""
        times = torch.linspace(1.0, self.config.t_eps, steps, dtype=x.dtype, device=x.device)
        alphas, sigmas = self.sde.marginal(times)

        def denoise(z, i):
            return (z - sigmas[i] * self.eps(z, times[i].expand(len(z)))) / alphas[i]

        x0 = common.repaint(denoise, common.pixels_to_pm1(x), missing, alphas.tolist(), sigmas.tolist(), resample)
        return torch.where(missing, torch.floor((x0 + 1) * 8 + 0.5).clamp(0, common.PIXEL_MAX), x)

    def completion_nll(self, x, draws=4):
        """(B,) the SDE's variational bound (the training objective), `draws` noise draws per image:
        what best-of-K ranks completions by (cheaper than the ODE likelihood)."""
        return torch.stack([self.bound(x) for _ in range(draws)]).mean(0)

    def extra_metrics(self, splits, labels):
        """The SDE's variational bound on the test split (the training objective; given the
        classes for a conditional model), 10 draws of the noise per image."""
        y = labels["test"] if self.conditional else None
        with common.seeded(0, self.device), torch.no_grad():
            bound = torch.stack([self.bound(splits["test"], y) for _ in range(10)]).mean()
        return dict(test_variational_bound_nats=float(bound))


# -----------------------------------------------------------------------------
# command line


def settle(args, config, sampling):
    """t_eps and the DPM solver's last noise level checked against the SDE (UsageError: exit 2);
    fewer sampler steps with --quick."""
    if config.t_eps >= 1:
        raise UsageError(f"argument --t-eps: expected a number in (0, 1), got {config.t_eps}")
    sde = SDES[config.sde]()
    lowest, highest = (math.exp(-0.5 * at_time(sde.log_snr, t)) for t in (config.t_eps, 1.0))  # sigma / alpha
    if sampling.sampler == "dpm" and not lowest <= sampling.denoise_at < highest:
        raise UsageError(f"argument --denoise-at: expected a noise level in [{lowest:.3g}, {highest:.3g}) "
                         f"(t_eps to t = 1), got {sampling.denoise_at}")
    if sampling.sample_steps is None and args.quick:  # otherwise SBGM fills in SAMPLE_STEPS
        sampling = dataclasses.replace(sampling, sample_steps=QUICK_SAMPLE_STEPS[sampling.sampler])
    return config, sampling


def main(argv=None):
    # batches of 128 at sqrt(2) x the learning rate of 64 and the EMA's decay squared (the same horizon in
    # epochs): as good on validation in about half the time; validated every 5th epoch (docs/choices.md)
    runs.main(SBGM, __doc__, argv, settle=settle,
              epochs=300, batch_size=128, lr=1.4e-3, patience=25, ema=0.996, gif_every=10, val_every=5)


if __name__ == "__main__":
    main()
