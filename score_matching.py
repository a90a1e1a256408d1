"""Score matching (ScM) on 8x8 Digits: a noise-conditional score network s(x, sigma) trained by
denoising score matching at several noise levels, sampled by annealed Langevin dynamics (NCSN).

Pixels are scaled to [-1, 1]. For noise levels sigma_1 > ... > sigma_L (geometric: 30 levels from
10, about the largest distance between two training images, down to 0.05), denoising
score matching (Vincent 2011, "A Connection Between Score Matching and Denoising Autoencoders")
fits s(x~, sigma) to the score of the noisy data x~ = x + sigma z, z ~ N(0, I), with the
sigma^2-weighted loss of Song & Ermon 2019 ("Generative Modeling by Estimating Gradients of the
Data Distribution"), per image:

    l(x, sigma) = 1/2 || sigma * s(x + sigma z, sigma) + z ||^2        (summed over the 64 pixels)

averaged over the levels. It is 0 for a perfect denoiser and 32 (= 64 / 2) for s = 0, and its
minimum over s is reached at the score of the noisy data, grad log p_sigma(x~). The network
outputs sigma * s (Song & Ermon 2020, "Improved Techniques for Training Score-Based Generative
Models"), a residual MLP (common.ResidualMLP) in which a learned embedding of the noise level enters
every block; its input is x~ / sqrt(sigma_data^2 + sigma^2), about unit variance at every level
(sigma_data = 0.54).

Sampling is annealed Langevin dynamics: from uniform noise on [-1, 1]^64, for each level i run T
steps with the relative step alpha_i = eps * sigma_i^2 (Algorithm 1's eps / sigma_L^2 written as
eps), then one denoising step x <- x + sigma_L^2 s(x, sigma_L) (Tweedie's formula for E[x | x~]).
The step (--rule) is Song & Ermon's x <- x + alpha_i / 2 * s(x, sigma_i) + sqrt(alpha_i) z
(the default: T = 3, eps = 0.2333), or the consistent one of Jolicoeur-Martineau et al. 2021
("Adversarial Score Matching and Improved Sampling for Image Generation"): the same drift, with the
noise that leaves chains at the next step's level, sqrt(max(0, sigma'^2 - (1 - eps / 2)^2 sigma_i^2)) z,
where Langevin's leaves more (the default of conditional runs: T = 3, eps = 0.18, whose guided
samples were better beyond the spread of sample seeds on validation). Sample quality depends
mostly on the total relative time L * T * eps.
--single-level (= --noise-levels 1) is the one-level model of intro_dgm: plain Langevin dynamics
at a single sigma (0.1 unless --sigma-min says otherwise); it gives poorer digits, because chains
started far from the data follow a score that was only learned near it.

There is no tractable likelihood (test_nll_nats is null): the metrics report the test denoising
loss above (test_dsm_loss, every test image at every level, fixed noise), and the validation
objective for early stopping is the same loss on the validation split.

Class-conditional (--conditional): s(x, sigma | y), each residual block adding its own learned vector
of the class (a one-hot of NUM_CLASSES + 1 classes, the last "no label", beside the one-hot level),
trained on the same loss with each label dropped to "no label" with probability --label-dropout, so
that one network also gives s(x, sigma) and Langevin dynamics can follow the classifier-free guided
score (Ho & Salimans 2022) (1 + w) s(x, sigma | y) - w s(x, sigma), w = --guidance (0.75, chosen on
validation; 0 is the plain conditional sampler).

Run:  python score_matching.py            # defaults, writes results/ScM_*
      python score_matching.py --conditional   # p(x | y), writes results/ScM_conditional_*
      python score_matching.py --help
"""

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

import common
from plumbing import UsageError, runs

# -----------------------------------------------------------------------------
# noise levels, the denoising score matching loss, and annealed Langevin dynamics


def geometric_sigmas(sigma_max, sigma_min, num_levels):
    """(L,) noise levels from sigma_max down to sigma_min, equal ratios; one level is sigma_min."""
    if num_levels == 1:
        return torch.tensor([float(sigma_min)])
    exponents = torch.linspace(0, 1, num_levels, dtype=torch.float64)
    return (sigma_max * (sigma_min / sigma_max) ** exponents).float()  # sigma_max^(1-t) sigma_min^t


def dsm_loss(score, v, sigmas, levels, noise):
    """Per-example denoising score matching loss, sigma^2-weighted (Song & Ermon 2019, eq. 5-6).

    score: (x (B, D), levels (B,)) -> (B, D); v: (B, D) clean data; levels: (B,) indices into
    sigmas; noise: (B, D) standard normal z. Returns (B,): 1/2 || sigma s(v + sigma z) + z ||^2.
    """
    sigma = sigmas[levels].unsqueeze(1)  # (B, 1)
    noisy = v + sigma * noise  # x~ = v + sigma z
    return 0.5 * (sigma * score(noisy, levels) + noise).pow(2).sum(1)  # target score: -z / sigma


RULES = ("langevin", "consistent")  # the Langevin step of annealed_langevin


def annealed_langevin(score, x, sigmas, steps, step_size, denoise=True, rule="langevin", clamp=None):
    """Annealed Langevin dynamics over the levels, `steps` steps at each, then a Tweedie denoising step.

    score: (x (B, D), levels (B,)) -> (B, D); x: (B, D) starting points; sigmas: (L,) decreasing.
    A step at level i with alpha_i = step_size * sigma_i^2, z ~ N(0, I) (torch's global RNG), is
      langevin   (Song & Ermon 2019, Algorithm 1): x <- x + alpha_i / 2 * s(x, sigma_i) + sqrt(alpha_i) z
      consistent (Jolicoeur-Martineau et al. 2021, "Adversarial Score Matching and Improved Sampling
                 for Image Generation", consistent annealed sampling, here with `steps` steps per level):
                 x <- x + eta sigma_i^2 s(x, sigma_i) + sqrt(max(0, sigma'^2 - (1 - eta)^2 sigma_i^2)) z,
                 eta = step_size / 2 (the same drift) and sigma' the level of the next step (sigma_L after
                 the last): the noise that takes data at one point, noised to sigma_i, to exactly sigma',
                 where Langevin's noise leaves more (for that data its chains settle at
                 sigma_i^2 / (1 - step_size / 4)); none when the drift already leaves more than sigma'.
    clamp: (x, sigma_i) -> x, applied before every step (inpainting's observed pixels).
    With denoise, the result is x + sigma_L^2 s(x, sigma_L) = E[x_clean | x] for the exact score.
    """
    if rule not in RULES:
        raise ValueError(f"unknown Langevin rule {rule!r}; valid: {', '.join(RULES)}")
    levels = [i for i in range(len(sigmas)) for _ in range(steps)]  # the level of every step
    for k, i in enumerate(levels):
        level = torch.full((len(x),), i, dtype=torch.long, device=x.device)
        if clamp is not None:
            x = clamp(x, sigmas[i])
        if rule == "langevin":
            alpha = step_size * sigmas[i] ** 2
            x = x + 0.5 * alpha * score(x, level) + alpha.sqrt() * torch.randn_like(x)
        else:
            eta, after = step_size / 2, sigmas[levels[k + 1] if k + 1 < len(levels) else i]
            noise = (after ** 2 - (1 - eta) ** 2 * sigmas[i] ** 2).clamp(min=0).sqrt()
            x = x + eta * sigmas[i] ** 2 * score(x, level) + noise * torch.randn_like(x)
    if denoise:
        last = torch.full((len(x),), len(sigmas) - 1, dtype=torch.long, device=x.device)
        x = x + sigmas[-1] ** 2 * score(x, last)
    return x


# -----------------------------------------------------------------------------
# model


DATA_SCALE = 0.54  # root mean square distance of a training image's pixels ([-1, 1]) from the mean image

# defaults that depend on the number of levels, chosen by sample quality on the validation split
# (means over 10 sample seeds, docs/choices.md). Several levels (NCSN): the total relative Langevin
# time L * T * eps counts most (too little leaves the chains short of the data, too much lets them
# drift where the learned score is poor), so few steps per level do as well as many; 3 steps keep the
# five test draws within a tenth of a run. Conditional runs: the consistent rule, whose chains keep
# each level's noise rather than more, gives better guided samples.
# One level: intro_dgm's sigma = 0.1 with as many Langevin steps in all (500) and the same relative step.
DEFAULTS = dict(sigma_min=0.05, langevin_steps=3, step_size=0.2333, rule="langevin")
CONDITIONAL_DEFAULTS = dict(DEFAULTS, step_size=0.18, rule="consistent")
SINGLE_LEVEL = dict(sigma_min=0.1, langevin_steps=500, step_size=0.1, rule="langevin")


@dataclasses.dataclass(frozen=True)
class ScMConfig(common.ModelConfig):
    hidden: int = common.option(256, "width of the score network", type=common.positive_int)
    blocks: int = common.option(2, "residual blocks of the score network", type=common.positive_int)
    # sigma_max = 10, about the largest distance between two training images (9.6 on the [-1, 1]
    # scale; Song & Ermon 2020, technique 1), so that the first level's noisy data covers the
    # uniform starting points
    noise_levels: int = common.option(30, "number L of noise levels, geometric from --sigma-max to --sigma-min",
                                      type=common.positive_int)
    sigma_max: float = common.option(10.0, "largest noise level on the [-1, 1] pixel scale", type=common.positive_float)
    sigma_min: float = common.option(
        None, "smallest noise level, the one sampling ends at; the only one with a single level "
        f"(default {DEFAULTS['sigma_min']}; {SINGLE_LEVEL['sigma_min']} with one level)", type=common.positive_float)
    label_dropout: float = common.option(0.1, "conditional runs only: the probability that a training label "
                                         "is replaced by 'no label' (classifier-free guidance)",
                                         type=common.unit_interval)


@dataclasses.dataclass(frozen=True)
class ScMSampling:
    langevin_steps: int = common.option(
        None, f"Langevin steps T per noise level (default {DEFAULTS['langevin_steps']}; "
        f"{SINGLE_LEVEL['langevin_steps']} with one level; at most 5 with --quick)", type=common.positive_int)
    step_size: float = common.option(
        None, "eps: the Langevin step at level i is eps * sigma_i^2 "
        f"(default {DEFAULTS['step_size']}; {CONDITIONAL_DEFAULTS['step_size']} for conditional runs; "
        f"{SINGLE_LEVEL['step_size']} with one level)", type=common.positive_float)
    rule: str = common.option(
        None, "the step: langevin (Song & Ermon 2019: noise sqrt(eps) sigma_i) or consistent (Jolicoeur-Martineau "
        "et al. 2021: the noise that leaves each step's chains at the next step's level) "
        f"(default {DEFAULTS['rule']}; {CONDITIONAL_DEFAULTS['rule']} for conditional runs; "
        f"{SINGLE_LEVEL['rule']} with one level)", choices=RULES)
    denoise: bool = common.option(True, "skip the final denoising step x + sigma_L^2 s(x, sigma_L)")
    # w = 0.75: chosen on validation by per-class Frechet distance and class accuracy (w = 0 draws the
    # asked class too rarely; docs/choices.md, ScM)
    guidance: float = common.option(0.75, "conditional runs only: classifier-free guidance weight w, "
                                    "s = (1 + w) s(x, sigma | y) - w s(x, sigma) (0: the plain conditional sampler)",
                                    type=common.nonnegative_float)


def with_level_defaults(config, sampling):
    """config and sampling with the fields left None filled from DEFAULTS, CONDITIONAL_DEFAULTS or SINGLE_LEVEL."""
    table = SINGLE_LEVEL if config.noise_levels == 1 else CONDITIONAL_DEFAULTS if config.conditional else DEFAULTS
    fill = lambda settings: dataclasses.replace(settings, **{  # noqa: E731
        f.name: table[f.name] for f in dataclasses.fields(settings) if getattr(settings, f.name) is None})
    return fill(config), fill(sampling)


class OneHot(nn.Module):
    """(B,) level indices -> (B, L) one-hot vectors."""

    def __init__(self, num_levels):
        super().__init__()
        self.num_levels = num_levels

    def forward(self, levels):
        return F.one_hot(levels, self.num_levels).float()


class LevelAndClass(nn.Module):
    """((levels (B,), y (B,))) -> (B, L + 11): the one-hot level beside the one-hot class (0..9 the
    digits, common.NULL_CLASS "no label"), so each block's Linear adds its own vector of the level and
    its own vector of the class."""

    def __init__(self, num_levels):
        super().__init__()
        self.num_levels = num_levels

    def forward(self, c):
        levels, y = c
        return torch.cat([F.one_hot(levels, self.num_levels), F.one_hot(y, common.NUM_CLASSES + 1)], 1).float()


class ScoreMatching(common.DigitsModel):
    name = "ScM"
    nll_kind = None
    objective = "DSM loss (sigma^2-weighted, per image)"
    Config, Sampling = ScMConfig, ScMSampling

    def __init__(self, config=None, sampling=None, dim=common.NUM_PIXELS):
        config, sampling = with_level_defaults(config or ScMConfig(), sampling or ScMSampling())
        super().__init__(config, sampling)
        self.dim = dim
        self.register_buffer("sigmas", geometric_sigmas(config.sigma_max, config.sigma_min, config.noise_levels))
        # (x~ scaled to unit variance, level i) -> sigma_i s(x~, sigma_i): blocks
        # h <- h + W2 silu(W1 LayerNorm(h) + e_i), e_i each block's own learned vector of level i
        # (a Linear of the one-hot level), as NCSN's conditional normalisations give each level its own
        # p(x | y): besides, each block's own learned vector c_y of the class, h <- ... + e_i + c_y
        levels = config.noise_levels
        embedding, embed = ((LevelAndClass(levels), levels + common.NUM_CLASSES + 1) if self.conditional
                            else (OneHot(levels), levels))
        self.net = common.ResidualMLP(dim, dim, config.hidden, config.blocks, embedding=embedding,
                                      embed=embed, activate_input=False, zero_output=False)
        for block in self.net.blocks:  # e_i (and c_y) start as N(0, I), as an nn.Embedding table would
            nn.init.normal_(block.cond.weight)
            nn.init.zeros_(block.cond.bias)

    # --- Song & Ermon 2019: the sigma^2-weighted denoising score matching loss (eqs. 5-6, dsm_loss)
    #     and annealed Langevin dynamics (Algorithm 1, annealed_langevin) ---

    def loss(self, x, y):
        """Training objective: one random level per image (an unbiased estimate of the mean); for p(x | y)
        the labels, each dropped to NULL_CLASS with probability label_dropout (CFG)."""
        y = common.drop_labels(y, self.config.label_dropout) if self.conditional else None
        return self.dsm(common.pixels_to_pm1(x), y=y).mean()

    def dsm(self, v, levels=None, noise=None, y=None):
        """(B,) DSM loss of v on the [-1, 1] scale (of the score given classes y, if given); levels
        uniform and noise N(0, I) if not given."""
        if levels is None:
            levels = torch.randint(0, len(self.sigmas), (len(v),), device=v.device)
        if noise is None:
            noise = torch.randn_like(v)
        score = self.score if y is None else lambda x, levels: self.score(x, levels, y)
        return dsm_loss(score, v, self.sigmas, levels, noise)

    def score(self, x, levels, y=None):
        """s(x, sigma_i) ~ grad_x log p_sigma_i(x): (B, D), (B,) level indices -> (B, D); s(x, sigma_i | y)
        with classes y (B,) (NULL_CLASS: no label). The input is scaled to about unit variance at
        every level: x~ / sqrt(sigma_data^2 + sigma_i^2)."""
        sigma = self.sigmas[levels].unsqueeze(1)  # (B, 1)
        return self.net(x * torch.rsqrt(sigma ** 2 + DATA_SCALE ** 2), levels if y is None else (levels, y)) / sigma

    @torch.no_grad()
    def sample(self, n, y=None):
        x = torch.rand(n, self.dim, device=self.device) * 2 - 1  # uniform on [-1, 1]^D
        s = self.sampling
        score = self.score if y is None else lambda x, levels: common.guided(  # classifier-free guidance
            lambda labels: self.score(x, levels, labels), y, s.guidance)
        v = annealed_langevin(score, x, self.sigmas, s.langevin_steps, s.step_size, s.denoise, s.rule)
        return common.pm1_to_pixels(v)

    def eval_loss(self, x, y):
        """Validation objective: every image at every level (lower variance than loss); given the
        labels for p(x | y)."""
        return self.loss_per_level(x, y=y if self.conditional else None).mean()

    def loss_per_level(self, x, generator=None, y=None):
        """(L,) DSM loss of every image at every level, averaged over the images (given classes y)."""
        v = common.pixels_to_pm1(x)
        losses = []
        for i in range(len(self.sigmas)):
            levels = torch.full((len(v),), i, dtype=torch.long, device=v.device)
            noise = torch.randn(v.shape, generator=generator, device=v.device)
            losses.append(self.dsm(v, levels, noise, y).mean())
        return torch.stack(losses)

    # --- Beyond the paper: OOD scores, inpainting, extra metrics ---

    ood_kind = "score-norm"

    def ood_score(self, x):
        """(B,) ||sigma s(v, sigma)|| at the smallest noise level, v = pixels_to_pm1(x): the
        predicted noise of the sharpest denoiser, large where the data density changes fast (off
        the data)."""
        v = common.pixels_to_pm1(x)
        level = torch.full((len(v),), len(self.sigmas) - 1, dtype=torch.long, device=v.device)
        return (self.score(v, level) * self.sigmas[-1]).norm(dim=1)

    @torch.no_grad()
    def complete(self, x, missing, every=2, resample=10):
        """Inpainting as RePaint (Lugmayr et al. 2022, common.repaint) on every `every`-th noise
        level (and the last), the variance-exploding path z = x + sigma_i eps: the observed
        pixels set to the data noised to the level, x0^ = z + sigma_i^2 s(z, sigma_i) (Tweedie),
        the ancestral step to the next level, `resample` times per level (chosen on the validation
        split: docs/inpainting.md); then the pixel values of the last x0^."""
        levels = list(range(0, len(self.sigmas), every))
        levels += [len(self.sigmas) - 1] if levels[-1] != len(self.sigmas) - 1 else []
        sigmas = self.sigmas[levels].tolist()

        def denoise(z, i):
            level = torch.full((len(z),), levels[i], dtype=torch.long, device=z.device)
            return z + sigmas[i] ** 2 * self.score(z, level)

        x0 = common.repaint(denoise, common.pixels_to_pm1(x), missing, [1.0] * len(levels), sigmas, resample)
        return torch.where(missing, common.pm1_to_pixels(x0).round(), x)

    @torch.no_grad()
    def extra_metrics(self, splits, labels):
        generator = torch.Generator(device=self.device).manual_seed(0)  # fixed noise
        test, given = splits["test"], [labels["test"]] if self.conditional else []
        per_level = common.batched(lambda x, *y: self.loss_per_level(x, generator, *y)[None] * len(x),
                                   test, *given).sum(0) / len(test)
        return dict(
            test_dsm_loss=per_level.mean().item(),
            test_dsm_loss_per_level=[round(v, 4) for v in per_level.tolist()],
            dsm_loss_definition="1/2 ||sigma * s(x + sigma z, sigma) + z||^2, summed over the 64 pixels "
                                "on the [-1, 1] scale, mean over test images and over the noise levels "
                                "(dimensionless, per image; 0 = perfect denoiser, 32 = zero score); "
                                "not a likelihood",
            sigmas=[round(v, 6) for v in self.sigmas.tolist()],
        )


# -----------------------------------------------------------------------------
# command line


def single_level_flag(parser):
    parser.add_argument_group("ScM").add_argument(
        "--single-level", action="store_true",
        help="one noise level and plain Langevin dynamics (intro_dgm's model); the same as --noise-levels 1")


def settle(args, config, sampling):
    """--single-level, the per-level defaults, the noise range checked (UsageError: exit 2), and
    a short sampler with --quick."""
    if args.single_level:
        config = dataclasses.replace(config, noise_levels=1)
    config, sampling = with_level_defaults(config, sampling)
    if config.noise_levels > 1 and config.sigma_max <= config.sigma_min:
        raise UsageError(f"--sigma-max ({config.sigma_max}) must be larger than --sigma-min ({config.sigma_min})")
    if args.quick:
        sampling = dataclasses.replace(sampling, langevin_steps=min(sampling.langevin_steps, 5))
    return config, sampling


def main(argv=None):
    # batches of 128 at sqrt(2) x the learning rate of 64 and the EMA's decay squared (the same horizon in
    # epochs): as good on validation in about half the time; validated every 5th epoch (docs/choices.md)
    runs.main(ScoreMatching, __doc__, argv, settle=settle, extra_flags=single_level_flag,
              epochs=700, batch_size=128, lr=1.4e-3, patience=25, ema=0.998, gif_every=50, val_every=5)


if __name__ == "__main__":
    main()
