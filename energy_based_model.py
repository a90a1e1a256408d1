"""Energy-based model (EBM) of 8x8 Digits on pixels scaled to [-1, 1]: an MLP energy trained by
contrastive divergence with short-run Langevin chains from noise (Nijkamp et al. 2019, "Learning
Non-Convergent Non-Persistent Short-Run MCMC Toward Energy-Based Model"; Du & Mordatch 2019). The
normaliser Z is intractable, so there is no test NLL.

By default the model is unconditional: an MLP f with one output gives the energy E(x) = -f(x),
p(x) = exp(-E(x)) / Z, and no label is used in training or sampling. Training minimises, for a
batch of images x,

    E(x) - E(x~)  +  reg * (E(x)^2 + E(x~)^2)

(contrastive divergence for -log p(x), whose gradient is that of the NLL up to the sampler, and
the energy-magnitude regulariser of Du & Mordatch 2019). The negatives x~ are short-run,
non-persistent Langevin chains (SGLD) on E started from uniform noise: no replay buffer, so the
chain that makes the training negatives is the very sampler that makes the samples, and it is
that K-step chain, not the energy's equilibrium, that the training shapes into a generator
(Nijkamp et al.): sample(n) runs the same K steps from noise (more or fewer steps make worse
digits). Images get small Gaussian noise (sigma 0.03) as in JEM.

With conditional (a config field) the model is JEM (Grathwohl et al. 2020, "Your Classifier is
Secretly an Energy Based Model and You Should Treat it Like One"): f gives 10 logits, the joint
energy E(x, y) = -f(x)[y], p(x, y) = exp(f(x)[y]) / Z, marginal energy
E(x) = -logsumexp_y f(x)[y] and classifier p(y | x) = softmax(f(x)); the loss becomes
E(x, y) - E(x~, y) + reg * (E(x, y)^2 + E(x~, y)^2) + CE(f(x), y), with chains on E(., y), and
sample(n, y) draws class y[i] for sample i. Its logits f(x) = log p(x | y) + const (uniform
class prior) are its generative classifier (class_log_likelihoods).

Early stopping picks the epoch by the Frechet distance of 1000 samples to the validation split
(the contrastive term stays near 0 whatever the samples look like); the weights are averaged
(EMA) for sampling. ood.py scores inputs by the marginal energy; complete() inpaints by the same
chains with the observed pixels clamped. The metrics add the energy gap between samples and test
images (and, conditional, the classifier's accuracy).

Run:  python energy_based_model.py            # defaults, writes results/EBM_*
      python energy_based_model.py --help
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import common
from plumbing import runs

# -----------------------------------------------------------------------------
# SGLD sampler


def sgld(energy, x, steps, step_size, noise, bounds=None):
    """Langevin chains x_{k+1} = x_k - step_size * dE/dx(x_k) + noise * eps_k, eps_k ~ N(0, I).

    energy: (B, D) -> (B,). With noise = sqrt(2 * step_size) this is the unadjusted Langevin
    algorithm for p(x) ~ exp(-E(x)); JEM's step_size = 1, noise = 0.01 samples a colder
    exp(-E(x) / T), T = noise^2 / (2 * step_size). bounds: (low, high) clamp after each step.
    Gradients flow to x only; the weights of `energy` get no .grad.
    """
    x = x.detach()
    with torch.enable_grad():
        for _ in range(steps):
            x.requires_grad_(True)
            grad = torch.autograd.grad(energy(x).sum(), x)[0]  # (B, D) dE/dx
            x = x.detach() - step_size * grad + noise * torch.randn_like(x)
            if bounds is not None:
                x = x.clamp(*bounds)
    return x.detach()


def uniform_noise(n, dim, device):
    """n points uniform on [-1, 1]^dim: where chains start."""
    return torch.rand(n, dim, device=device) * 2 - 1


# -----------------------------------------------------------------------------
# model


@dataclass(frozen=True)
class EBMConfig(common.ModelConfig):
    hidden: int = common.option(256, "width of the MLP's hidden layers", type=common.positive_int)
    layers: int = common.option(3, "number of hidden layers", type=common.positive_int)
    # one short-run chain (Nijkamp et al. 2019) trains the energy and makes the samples
    sgld_steps: int = common.option(40, "SGLD steps from uniform noise per training step",
                                    type=common.positive_int)
    # JEM's SGLD: step size 1 and noise 0.01, a nearly noiseless chain that samples exp(-E / T) at
    # T = 5e-5 (see sgld)
    step_size: float = common.option(1.0, "SGLD gradient step size", type=common.positive_float)
    noise: float = common.option(0.01, "standard deviation of the SGLD noise", type=common.nonnegative_float)
    # Du & Mordatch 2019's regulariser keeps the energies of data and negatives near 0; a heavy
    # one (1.0) flattens the energy that the short-run chains descend, and they make poor digits
    energy_reg: float = common.option(0.1, "weight of the energy-magnitude regulariser E^2",
                                      type=common.nonnegative_float)
    # JEM's small Gaussian noise on the data (sigma 0.03), which JEM reports stabilises training
    data_noise: float = common.option(0.03, "std of the Gaussian noise added to training images in [-1, 1]",
                                      type=common.nonnegative_float)


@dataclass(frozen=True)
class EBMSampling:
    sample_steps: int = common.option(0, "SGLD steps from uniform noise when sampling (0: sgld_steps, "
                                         "the chain the energy was trained with)", type=common.nonnegative_int)


class EBM(common.DigitsModel):
    name = "EBM"
    nll_kind = None
    Config, Sampling = EBMConfig, EBMSampling
    val_objective = common.VAL_FRECHET  # the contrastive term stays near 0 whatever the samples look like
    ood_kind = "energy"

    def __init__(self, config=None, sampling=None):
        super().__init__(config, sampling)
        config = self.config
        widths = [common.NUM_PIXELS] + [config.hidden] * config.layers
        blocks = []
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            blocks += [nn.Linear(w_in, w_out), nn.SiLU()]
        # x -> f(x): 10 logits (conditional) or one scalar, -E(x) (unconditional)
        self.net = nn.Sequential(*blocks, nn.Linear(widths[-1], common.NUM_CLASSES if self.conditional else 1))
        self.objective = ("train: CD of E(x, y) + energy reg. + CE" if self.conditional
                          else "train: CD of E(x) + energy reg.")

    # --- Nijkamp et al. 2019, Algorithm 1: contrastive divergence against short-run, non-persistent
    #     Langevin chains from uniform noise (with Du & Mordatch 2019's energy regulariser and, given
    #     y, JEM's joint energy and cross-entropy); the same K-step chain samples ---

    def loss(self, x, y):
        """x (B, 64) pixels with their (B,) class labels y (used by the conditional model only)."""
        labels = y if self.conditional else None
        v = common.pixels_to_pm1(x) + self.config.data_noise * torch.randn_like(x)  # (B, 64)
        negatives = self.chains(len(x), labels, self.config.sgld_steps)  # (B, 64) short-run chains from noise
        energy = self.chain_energy(labels)
        e_data, e_model = energy(v), energy(negatives)  # (B,) each
        contrastive = e_data.mean() - e_model.mean()  # gradient of -log p(x) (or p(x | y)), up to the sampler
        magnitude = (e_data ** 2).mean() + (e_model ** 2).mean()  # keeps energies near 0
        loss = contrastive + self.config.energy_reg * magnitude
        if self.conditional:
            loss = loss + F.cross_entropy(self.net(v), y)
        return loss

    def eval_loss(self, x, y):
        """Held-out cross-entropy of p(y | x) (conditional), or the loss (not the selection
        criterion, which is the val Frechet distance of samples; see val_objective)."""
        if self.conditional:
            return F.cross_entropy(self.net(common.pixels_to_pm1(x)), y)
        return self.loss(x, y)

    def sample(self, n, y=None):
        """Short-run SGLD from uniform noise: (n, 64) on the 0..16 scale. Conditional models draw
        sample i from E(x, y[i]) (y (n,) int64; balanced labels 0, 1, ..., 9, 0, ... when None);
        unconditional ones from E(x) and take no labels."""
        if not self.conditional:
            y = None
        elif y is None:
            y = common.sample_labels(self, n, self.device)
        return common.pm1_to_pixels(self.chains(n, y, self.steps()))

    def steps(self):
        return self.sampling.sample_steps or self.config.sgld_steps

    def chains(self, n, labels, steps):
        """(n, 64) in [-1, 1]: short-run SGLD from uniform noise on chain_energy(labels)."""
        return self.langevin(self.chain_energy(labels), uniform_noise(n, common.NUM_PIXELS, self.device), steps)

    def langevin(self, energy, v, steps):
        """`steps` SGLD steps of the configured size and noise on `energy` from v (B, 64) in [-1, 1],
        staying inside [-1, 1]."""
        return sgld(energy, v, steps, self.config.step_size, self.config.noise, bounds=(-1.0, 1.0))

    def energy(self, v):
        """v: (B, 64) in [-1, 1] -> (B,) the marginal energy E(v) = -log p(v) + log Z:
        -logsumexp_y f(v)[y] (conditional) or -f(v) (unconditional)."""
        out = self.net(v)
        return -torch.logsumexp(out, dim=1) if self.conditional else -out[:, 0]

    def joint_energy(self, v, labels):
        """Conditional only. v: (B, 64) in [-1, 1], labels: (B,) -> (B,) E(v, label) = -f(v)[label]."""
        return -self.net(v).gather(1, labels[:, None])[:, 0]

    def chain_energy(self, labels):
        """The energy that chains and the contrastive term use: E(., labels) when conditional
        (labels (B,)), else the marginal E(.) (labels None)."""
        return self.energy if labels is None else lambda v: self.joint_energy(v, labels)

    # --- Beyond the paper: the generative classifier, OOD scores, inpainting, extra metrics and images ---

    def class_log_likelihoods(self, x):
        """Conditional only. (B, 64) pixels -> (B, 10) logits f(x) = log p(x, y) + log Z, i.e.
        log p(x | y) + const with the model's class prior taken as uniform (a generative classifier)."""
        return self.net(common.pixels_to_pm1(x))

    def ood_score(self, x):
        """(B, 64) pixels -> (B,) the marginal energy E(x) = -log p(x) + log Z."""
        return self.energy(common.pixels_to_pm1(x))

    def completion_nll(self, x):
        """(B, 64) pixels -> (B,) the marginal energy E(x) = -log p(x) + log Z: best-of-K ranks
        the completions of one input by it (log Z is the same for all)."""
        return self.energy(common.pixels_to_pm1(x))

    @torch.no_grad()
    def complete(self, x, missing, steps=None):
        """Inpainting, x (B, 64) pixels, missing (B, 64) bool; steps: SGLD steps (default: those
        of sampling; longer chains gained no more than the noise: docs/inpainting.md). Short-run SGLD from uniform noise on the missing pixels, the observed ones
        clamped (the energy always sees them exact). Unconditional: one chain per input on E(x).
        Conditional: one chain per class on E(v, y), then one of the 10 completions v_y drawn with
        probability softmax_y(-E(v_y, y) / T), p(x, y) at the chain's own temperature
        T = noise^2 / (2 step_size) (in effect the class of lowest energy at the defaults)."""
        classes = common.NUM_CLASSES if self.conditional else 1
        v = common.pixels_to_pm1(x).repeat_interleave(classes, 0)  # (B classes, 64)
        hidden = missing.repeat_interleave(classes, 0)
        labels = common.sample_labels(self, len(v), x.device)  # conditional: 0..9 for every input
        energy = self.chain_energy(labels)
        start = torch.where(hidden, uniform_noise(len(v), common.NUM_PIXELS, x.device), v)
        chains = self.langevin(lambda u: energy(torch.where(hidden, u, v)), start, steps or self.steps())
        chains = torch.where(hidden, chains, v)
        if self.conditional:
            energies = energy(chains).view(len(x), classes)
            temperature = max(self.config.noise**2 / (2 * self.config.step_size), 1e-12)
            pick = torch.distributions.Categorical(logits=-energies / temperature).sample()  # (B,)
            chains = chains.view(len(x), classes, -1)[torch.arange(len(x)), pick]
        return torch.where(missing, common.pm1_to_pixels(chains), x)

    @torch.no_grad()
    def extra_metrics(self, splits, labels):
        """Mean marginal energies, energy gap = mean E(samples) - mean E(test) (> 0: samples are
        less probable under the model than test images); conditional: the classifier's accuracy."""
        metrics = {}
        if self.conditional:
            for split in ("val", "test"):
                correct = self.class_log_likelihoods(splits[split]).argmax(1) == labels[split]
                metrics[f"{split}_accuracy"] = float(correct.float().mean())
        e_test = float(self.energy(common.pixels_to_pm1(splits["test"])).mean())
        with common.seeded(0, self.device):
            samples = common.pixels_to_pm1(self.sample(len(splits["test"])))
        e_samples = float(self.energy(samples).mean())
        on = "E(x, y) from uniform noise, y balanced" if self.conditional else "E(x) from uniform noise"
        metrics.update(test_energy=e_test, sample_energy=e_samples, energy_gap=e_samples - e_test,
                       sampler=f"{self.steps()} SGLD steps on {on}")
        return metrics

    def extra_images(self, splits):
        """EBM_chains.png: ten chains (columns; conditional: one per class), rows at SGLD steps
        0, K/7, ..., K."""
        labels = common.sample_labels(self, common.NUM_CLASSES, self.device)
        energy = self.chain_energy(labels)
        v = uniform_noise(common.NUM_CLASSES, common.NUM_PIXELS, self.device)
        total, rows = self.steps(), [v]
        marks = [round(total * i / 7) for i in range(8)]
        for a, b in zip(marks[:-1], marks[1:]):
            v = self.langevin(energy, v, b - a)
            rows.append(v)
        return dict(chains=(common.pm1_to_pixels(torch.cat(rows)), common.NUM_CLASSES))


# -----------------------------------------------------------------------------
# command line


def main(argv=None):
    # batches of 128 at sqrt(2) x the learning rate of 64, and the EMA's decay squared (the same horizon
    # in epochs): as good on validation in less time; the EMA smooths the val Frechet distance, which
    # picks the best epoch, measured every 2nd epoch (docs/choices.md, EBM)
    runs.main(EBM, __doc__, argv, epochs=80, batch_size=128, lr=1.4e-3, patience=10, ema=0.98, gif_every=5,
              val_every=2)


if __name__ == "__main__":
    main()
