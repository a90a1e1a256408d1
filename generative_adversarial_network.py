"""Generative adversarial network (GAN) of 8x8 Digits: a generator G maps noise z ~ N(0, I) to an
image on [-1, 1], and a discriminator D scores images; the two are trained against each other
(Goodfellow et al. 2014). There is no likelihood, so no test NLL: the best epoch is the one whose
1000 seeded samples are nearest the validation split by the project's Frechet distance.

Losses (--loss), with x real and x~ = G(z) fake, both pixel-scaled to [-1, 1]:
    hinge (default; Lim & Ye 2017, Miyato et al. 2018, with spectral norm on D's layers):
        L_D = E[relu(1 - D(x))] + E[relu(1 + D(x~))]        L_G = -E[D(x~)]
    wgan-gp (Gulrajani et al. 2017): the critic's Wasserstein estimate plus a gradient penalty
        L_D = E[D(x~)] - E[D(x)] + lambda E[(||grad D(x^)|| - 1)^2],  x^ = x + u (x~ - x), u ~ U[0, 1]
        L_G = -E[D(x~)]
    nonsaturating (Goodfellow et al. 2014):
        L_D = E[softplus(-D(x))] + E[softplus(D(x~))]       L_G = E[softplus(-D(x~))]
Each training step updates D once on a fresh batch of fakes, then G once on another (--d-steps
changes the ratio). Both networks are MLPs over the 64 pixels. An exponential moving average of
the weights (--ema, Yazici et al. 2019) is what is evaluated and sampled. With 1000 training
images a GAN can memorise or collapse onto a few digits: the metrics report the copy rate and the
class coverage of the samples. --augment translation shifts real and fake images alike by up to
one pixel before D sees them (DiffAugment, Zhao et al. 2020).

The defaults, each chosen on the validation split (the numbers: docs/choices.md, GAN): the hinge
loss with spectral norm on D; D's learning rate 4x G's (the two time-scale update rule, Heusel et
al. 2017) with Adam betas (0, 0.9), without which training collapses onto a few digits; one D step
per G step; two hidden layers of 512; an EMA of the weights with decay 0.99; no augmentation;
continuous samples (--round rounds them).

Conditional model (--conditional): G(z, y) and D(x, y) for the ten classes. The generator takes the
class as a one-hot vector beside the noise, G([z, onehot(y)]) (Mirza & Osindero 2014); the
discriminator is the projection discriminator (Miyato & Koyama 2018),
    D(x, y) = psi(phi(x)) + <e_y, phi(x)>,
phi the MLP up to its last hidden layer, psi its final linear layer, e_y a learned class vector
(spectrally normalised like D's layers). The optimal D is the log ratio of data to generator,
log q(y | x) / p_G(y | x) + log q(x) / p_G(x); when both class posteriors are softmaxes of phi(x)
the first term is <e_y, phi(x)> up to a function of x alone, which psi absorbs. The fakes of a
real batch are drawn for that batch's labels, in D's steps and G's alike; the losses are the same
functions of the scores, and the best epoch is picked by the Frechet distance of class-balanced
samples to the val split.

The training curve shows D's loss (the "train" series) and G's loss (dashed, "generator") per
epoch, and the validation Frechet distance that picks the best epoch on its own axis.

Run:  python generative_adversarial_network.py            # defaults, writes results/GAN_*
      python generative_adversarial_network.py --help
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

import common
from plumbing import UsageError, runs

LOSSES = ("hinge", "wgan-gp", "nonsaturating")
AUGMENTS = ("none", "translation")

# -----------------------------------------------------------------------------
# networks


def mlp(sizes, activation, norm_layer=lambda layer: layer):
    """Linear layers of the given sizes with `activation` between them (none after the last);
    norm_layer wraps each Linear (spectral_norm for the discriminator)."""
    layers = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(norm_layer(nn.Linear(fan_in, fan_out)))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


# -----------------------------------------------------------------------------
# the adversarial losses: functions of D's scores, (B,) each


def discriminator_loss(kind, real_scores, fake_scores):
    """L_D without any gradient penalty (wgan-gp adds it)."""
    if kind == "hinge":
        return F.relu(1 - real_scores).mean() + F.relu(1 + fake_scores).mean()
    if kind == "nonsaturating":
        return F.softplus(-real_scores).mean() + F.softplus(fake_scores).mean()
    return fake_scores.mean() - real_scores.mean()  # wgan-gp: minus the Wasserstein estimate


def generator_loss(kind, fake_scores):
    if kind == "nonsaturating":
        return F.softplus(-fake_scores).mean()  # -log sigmoid(D(x~))
    return -fake_scores.mean()  # hinge and wgan-gp


def gradient_penalty(critic, real, fake):
    """E[(||grad_x D(x^)||_2 - 1)^2] at x^ = real + u (fake - real), u ~ U[0, 1] per image."""
    u = torch.rand(len(real), 1, device=real.device)
    between = (real + u * (fake - real)).detach().requires_grad_(True)  # (B, 64)
    (grad,) = torch.autograd.grad(critic(between).sum(), between, create_graph=True)
    return ((grad.norm(dim=1) - 1) ** 2).mean()


def translate(v, max_shift=1):
    """DiffAugment's translation (Zhao et al. 2020) on [-1, 1] images v (B, 64): each image moves
    by its own random (row, column) shift in [-max_shift, max_shift]^2, the background (-1) filling
    what comes in. Differentiable in v, so G learns through it."""
    side, batch = 8, len(v)
    padded = F.pad(v.view(batch, side, side), (max_shift,) * 4, value=-1.0)  # (B, 8 + 2s, 8 + 2s)
    offset = torch.randint(0, 2 * max_shift + 1, (2, batch, 1), device=v.device)
    rows = torch.arange(side, device=v.device) + offset[0]  # (B, 8): padded rows of the crop
    cols = torch.arange(side, device=v.device) + offset[1]
    index = torch.arange(batch, device=v.device)[:, None, None]
    return padded[index, rows[:, :, None], cols[:, None, :]].reshape(batch, side * side)


# -----------------------------------------------------------------------------
# model


@dataclass(frozen=True)
class GANConfig(common.ModelConfig):
    latent: int = common.option(32, "dimension of the generator's noise z", type=common.positive_int)
    hidden: int = common.option(512, "width of both MLPs' hidden layers", type=common.positive_int)
    layers: int = common.option(2, "hidden layers of each MLP", type=common.positive_int)
    loss: str = common.option("hinge", "adversarial loss", choices=LOSSES)
    spectral_norm: bool = common.option(True, "no spectral normalisation of D's linear layers (required "
                                              "by --loss wgan-gp, whose gradient penalty constrains D instead)")
    gp_weight: float = common.option(10.0, "lambda of the wgan-gp gradient penalty",
                                     type=common.nonnegative_float)
    d_lr_scale: float = common.option(4.0, "D's learning rate is --lr times this (two time-scale rule)",
                                      type=common.positive_float)
    d_steps: int = common.option(1, "discriminator updates per generator update", type=common.positive_int)
    beta1: float = common.option(0.0, "Adam's beta1 for both networks (beta2 is 0.9)", type=common.unit_interval)
    augment: str = common.option("none", "differentiable augmentation of every image D sees", choices=AUGMENTS)


@dataclass(frozen=True)
class GANSampling:
    round: bool = common.option(False, "round samples to the integer pixel levels 0..16 (without it they "
                                       "stay continuous, which scored nearer the val split by Frechet "
                                       "distance)")


class GAN(common.DigitsModel):
    name = "GAN"
    nll_kind = None
    ood_kind = None  # no likelihood, energy or score to flag inputs by
    objective = "loss: discriminator (train), generator (dashed)"
    val_objective = common.VAL_FRECHET
    Config = GANConfig
    Sampling = GANSampling

    def __init__(self, config=None, sampling=None):
        super().__init__(config, sampling)
        c = self.config
        hidden = [c.hidden] * c.layers
        classes = common.NUM_CLASSES if c.conditional else 0  # the one-hot class beside z
        self.generator = mlp([c.latent + classes, *hidden, common.NUM_PIXELS], nn.ReLU)  # z -> pre-tanh pixels
        norm = spectral_norm if c.spectral_norm else (lambda layer: layer)
        self.discriminator = mlp([common.NUM_PIXELS, *hidden, 1], lambda: nn.LeakyReLU(0.2), norm)
        if c.conditional:  # the projection's class vectors e_y (10, hidden)
            self.class_embedding = norm(nn.Embedding(common.NUM_CLASSES, c.hidden))

    # --- Goodfellow et al. 2014, Algorithm 1: alternate --d-steps updates of D and one of G, with the
    #     losses of --loss (discriminator_loss, generator_loss); sampling x = G(z), z ~ N(0, I) ---

    def train_step(self, x, y, optimizer):
        """Overrides the base class's single step: d_steps updates of D, then one of G. Returns
        {"loss": L_D (the curve's "train" series), "generator": L_G}, both averaged over the step."""
        real, y = common.pixels_to_pm1(x), self.labels(y)  # y None for a model of p(x)
        d_values = [self.discriminator_step(real, self.noise(len(x)), optimizer, y)
                    for _ in range(self.config.d_steps)]
        g_value = self.generator_step(self.noise(len(x)), optimizer, y)
        return {"loss": sum(d_values) / len(d_values), "generator": g_value}

    def discriminator_step(self, real, z, optimizer, y=None):
        """One update of D on real [-1, 1] images and G(z) (of classes y, for a conditional model);
        G's weights do not move (the fake is detached, so G's grads stay None and Adam skips them)."""
        value = self.d_loss(real, self.generate(z, y), y)
        checked = common.check_finite({"discriminator": value.item()})
        common.optimizer_step(value, optimizer)
        return checked["discriminator"]

    def generator_step(self, z, optimizer, y=None):
        """One update of G to raise D's score of G(z) (or of G(z, y) as class y); D's weights do
        not move."""
        value = self.g_loss(z, y)
        checked = common.check_finite({"generator": value.item()})
        common.optimizer_step(value, optimizer, frozen=self.discriminator_parameters())
        return checked["generator"]

    def d_loss(self, real, fake, y=None):
        """L_D on [-1, 1] batches (both of classes y, a conditional model's); fake is detached, so
        only D gets gradients."""
        fake = fake.detach()
        critic = lambda v: self.critic(v, y)  # noqa: E731
        value = discriminator_loss(self.config.loss, critic(real), critic(fake))
        if self.config.loss == "wgan-gp":
            value = value + self.config.gp_weight * gradient_penalty(critic, real, fake)
        return value

    def g_loss(self, z, y=None):
        return generator_loss(self.config.loss, self.critic(self.generate(z, y), y))

    def loss(self, x, y):
        """The discriminator's loss on a batch of pixels 0..16 against as many fresh fakes (of the
        batch's classes, for a conditional model)."""
        y = self.labels(y)
        return self.d_loss(common.pixels_to_pm1(x), self.generate(self.noise(len(x)), y), y)

    @torch.no_grad()
    def sample(self, n, y=None):
        """x = G(z), z ~ N(0, I) (x = G(z, y) of the classes y (n,) for a conditional model), mapped
        to the 0..16 pixels (rounded to levels with --round)."""
        pixels = common.pm1_to_pixels(self.generate(self.noise(n), self.labels(y)))
        return pixels.round() if self.sampling.round else pixels

    # --- the two networks

    def labels(self, y):
        """The classes the networks take: y (B,) for a conditional model, None for a model of p(x)."""
        if not self.conditional:
            return None
        if y is None or y.dtype != torch.long or y.dim() != 1 or not ((0 <= y) & (y < common.NUM_CLASSES)).all():
            raise ValueError("a conditional GAN needs (B,) int64 class labels 0..9")
        return y

    def generate(self, z, y=None):
        """z (B, latent) [and classes y (B,) of a conditional model] -> images on [-1, 1] (B, 64)."""
        if y is not None:
            z = torch.cat([z, F.one_hot(y, common.NUM_CLASSES).to(z.dtype)], 1)  # (B, latent + 10)
        return torch.tanh(self.generator(z))

    def critic(self, v, y=None):
        """[-1, 1] images v (B, 64) -> scores D(v) (B,), or D(v, y) = psi(phi(v)) + <e_y, phi(v)>
        given classes y (B,); augmented first when --augment asks."""
        if self.config.augment == "translation":
            v = translate(v)
        if y is None:
            return self.discriminator(v).squeeze(1)
        features = self.discriminator[:-1](v)  # phi(v) (B, hidden)
        return self.discriminator[-1](features).squeeze(1) + (self.class_embedding(y) * features).sum(1)

    def discriminator_parameters(self):
        """D's weights: its MLP's and, for a conditional model, the projection's class vectors."""
        return [*self.discriminator.parameters(), *(self.class_embedding.parameters() if self.conditional else ())]

    def noise(self, n):
        return torch.randn(n, self.config.latent, device=self.device)

    def configure_optimizer(self, lr):
        """One Adam with a parameter group per network (so one state_dict is checkpointed); the
        projection's class vectors are D's."""
        betas = (self.config.beta1, 0.9)
        return torch.optim.Adam([
            dict(params=self.generator.parameters(), lr=lr, name="generator"),
            dict(params=self.discriminator_parameters(), lr=lr * self.config.d_lr_scale, name="discriminator"),
        ], betas=betas, fused=True)

    # --- Beyond the paper: inpainting ---

    def complete(self, x, missing, steps=150, lr=0.05, pixel_noise=0.1):
        """Inpainting (Yeh et al. 2017): the latent z, from z ~ N(0, I), optimised by Adam to
        minimise ||observed * (G(z) - v)||^2 / (2 pixel_noise^2) + ||z||^2 / 2, the MAP z under the
        prior of an image that matches the observed pixels v (on [-1, 1]) up to Gaussian noise;
        the missing pixels are then G(z)'s. Each start gives its own completion. The weights get no
        gradient."""
        v, observed = common.pixels_to_pm1(x), (~missing).to(x.dtype)
        z = self.noise(len(x)).requires_grad_(True)
        optimizer = torch.optim.Adam([z], lr=lr)
        with torch.enable_grad():
            for _ in range(steps):
                mismatch = ((observed * (self.generate(z) - v)) ** 2).sum(1) / (2 * pixel_noise**2)
                (z.grad,) = torch.autograd.grad((mismatch + 0.5 * (z**2).sum(1)).sum(), z)
                optimizer.step()
        pixels = common.pm1_to_pixels(self.generate(z.detach()))
        return torch.where(missing, pixels.round() if self.sampling.round else pixels, x)


# -----------------------------------------------------------------------------
# command line


def settle(args, config, sampling):
    """The gradient penalty goes without spectral norm (UsageError: exit 2)."""
    if config.loss == "wgan-gp" and config.spectral_norm:
        raise UsageError("--loss wgan-gp goes with --no-spectral-norm (the gradient penalty constrains D)")
    return config, sampling


def main(argv=None):
    runs.main(GAN, __doc__, argv, settle=settle,
              epochs=300, batch_size=64, lr=8e-4, patience=40, ema=0.99, gif_every=10)


if __name__ == "__main__":
    main()
