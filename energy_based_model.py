"""Energy-based model (EBM) of 8x8 Digits, as in JEM (Grathwohl et al. 2020, "Your Classifier is
Secretly an Energy Based Model and You Should Treat it Like One"; intro_dgm's EBM example), on
pixels scaled to [-1, 1]. The normalisers are intractable, so there is no test NLL.

An MLP f gives 10 logits; it defines the joint energy E(x, y) = -f(x)[y], i.e.
p(x, y) = exp(f(x)[y]) / Z, whose marginal energy is E(x) = -logsumexp_y f(x)[y] and whose
classifier is p(y | x) = softmax(f(x)). Training minimises, for a batch of images x with their
class labels y (the training loop passes both),

    E(x, y) - E(x~, y)  +  reg * (E(x, y)^2 + E(x~, y)^2)  +  CE(f(x), y)

(contrastive divergence for log p(x | y), the energy-magnitude regulariser of Du & Mordatch 2019,
and the classifier's cross-entropy). The negatives x~ are short-run, non-persistent Langevin
chains (SGLD) on E(., y) started from uniform noise, as in Nijkamp et al. 2019 ("Learning
Non-Convergent Non-Persistent Short-Run MCMC Toward Energy-Based Model"): no replay buffer, so
the chain that makes training negatives is the very sampler that makes the samples.

sample(n) runs the same chains from uniform noise for balanced labels y = 0, 1, ..., 9, 0, ...
(JEM's class-conditional sampling, p(x | y) with y uniform like the data's labels), on the
energy's gradient only. Chains on the marginal E(x) drifted to unbalanced classes in an earlier,
marginally trained version, and on this jointly trained model they do not make digits at all
(training shapes E(x, y) for every y, not their logsumexp). The metrics add the classifier's
accuracy, the energy gap between samples and test images, and (other_samplers "marginal") chains
on the marginal E(x) from noise for comparison; ood.py scores inputs by the marginal energy.
Early stopping picks the epoch by the Frechet distance of 1000 samples to the validation split
(the contrastive term stays near 0 whatever the samples look like); the weights are averaged
(EMA) for sampling.

Run:  python energy_based_model.py            # defaults, writes results/EBM_*
      python energy_based_model.py --help
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import common

NUM_CLASSES = 10

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


def balanced_labels(n, device):
    """(n,) labels 0, 1, ..., 9, 0, 1, ...: every class n // 10 or n // 10 + 1 times."""
    return torch.arange(n, device=device) % NUM_CLASSES


# -----------------------------------------------------------------------------
# model


@dataclass(frozen=True)
class EBMConfig:
    hidden: int = common.option(256, "width of the MLP's hidden layers", type=common.positive_int)
    layers: int = common.option(3, "number of hidden layers", type=common.positive_int)
    # one short-run chain (Nijkamp et al. 2019) trains the energy and makes the samples
    sgld_steps: int = common.option(40, "SGLD steps from uniform noise per training step",
                                    type=common.positive_int)
    # JEM's SGLD: step size 1 and noise 0.01, a nearly noiseless chain that samples exp(-E / T) at
    # T = 5e-5 (see sgld)
    step_size: float = common.option(1.0, "SGLD gradient step size", type=common.positive_float)
    noise: float = common.option(0.01, "standard deviation of the SGLD noise", type=common.nonnegative_float)
    # Du & Mordatch 2019's regulariser keeps the energies of data and negatives near 0
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
    objective = "train: CD of E(x, y) + energy reg. + CE"
    Config, Sampling = EBMConfig, EBMSampling
    val_objective = common.VAL_FRECHET  # the contrastive term stays near 0 whatever the samples look like

    def __init__(self, config=None, sampling=None):
        super().__init__(config, sampling)
        config = self.config
        widths = [common.NUM_PIXELS] + [config.hidden] * config.layers
        blocks = []
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            blocks += [nn.Linear(w_in, w_out), nn.SiLU()]
        self.net = nn.Sequential(*blocks, nn.Linear(widths[-1], NUM_CLASSES))  # x -> logits f(x)

    def logits(self, v):
        """v: (B, 64) images in [-1, 1] -> (B, 10) class logits f(v)."""
        return self.net(v)

    ood_kind = "energy"

    def ood_score(self, x):
        """(B, 64) pixels -> (B,) the marginal energy E(x) = -log p(x) + log Z."""
        return self.energy(common.pixels_to_pm1(x))

    def energy(self, v):
        """v: (B, 64) in [-1, 1] -> (B,) marginal energy E(v) = -logsumexp_c f(v)[c]."""
        return -torch.logsumexp(self.net(v), dim=1)

    def joint_energy(self, v, labels):
        """v: (B, 64) in [-1, 1], labels: (B,) -> (B,) E(v, label) = -f(v)[label]."""
        return -self.net(v).gather(1, labels[:, None])[:, 0]

    def langevin(self, energy, v, steps):
        """`steps` SGLD steps of the configured size and noise on `energy` from v (B, 64) in [-1, 1],
        staying inside [-1, 1]."""
        return sgld(energy, v, steps, self.config.step_size, self.config.noise, bounds=(-1.0, 1.0))

    def chains(self, labels, steps):
        """(B,) labels -> (B, 64) in [-1, 1]: SGLD on E(., label) from uniform noise."""
        start = uniform_noise(len(labels), common.NUM_PIXELS, labels.device)
        return self.langevin(lambda v: self.joint_energy(v, labels), start, steps)

    def loss(self, x, y):
        """x (B, 64) pixels with their (B,) class labels y."""
        v = common.pixels_to_pm1(x) + self.config.data_noise * torch.randn_like(x)  # (B, 64)
        negatives = self.chains(y, self.config.sgld_steps)  # (B, 64) short-run chains from noise
        logits = self.logits(v)  # (B, 10)
        e_data = -logits.gather(1, y[:, None])[:, 0]  # (B,) E(x, y)
        e_model = self.joint_energy(negatives, y)  # (B,) E(x~, y)
        contrastive = e_data.mean() - e_model.mean()  # gradient of -log p(x | y), up to the sampler
        magnitude = (e_data ** 2).mean() + (e_model ** 2).mean()  # keeps energies near 0
        classification = F.cross_entropy(logits, y)
        return contrastive + self.config.energy_reg * magnitude + classification

    def eval_loss(self, x, y):
        """Held-out cross-entropy of p(y | x), in nats per image (not the selection criterion,
        which is the val Frechet distance of samples; see val_objective)."""
        return F.cross_entropy(self.logits(common.pixels_to_pm1(x)), y)

    def steps(self):
        return self.sampling.sample_steps or self.config.sgld_steps

    def sample(self, n):
        """Short-run SGLD on E(x, y) from uniform noise, y balanced: (n, 64) on the 0..16 scale."""
        return common.pm1_to_pixels(self.chains(balanced_labels(n, self.device), self.steps()))

    def sample_marginal(self, n):
        """Short-run SGLD on the marginal E(x) from uniform noise: (n, 64) on the 0..16 scale."""
        start = uniform_noise(n, common.NUM_PIXELS, self.device)
        return common.pm1_to_pixels(self.langevin(self.energy, start, self.steps()))

    def samplers(self):
        return {"marginal": self.sample_marginal}

    @torch.no_grad()
    def complete(self, x, missing, steps=None):
        """Inpainting: for every input one short-run SGLD chain per class on E(v, y), from uniform
        noise on the missing pixels, the observed ones clamped (the energy always sees them exact);
        then one of the 10 completions v_y drawn with probability softmax_y(-E(v_y, y) / T), the
        joint model's p(x, y) of each at the chain's own temperature T = noise^2 / (2 step_size)
        (5e-5 at the defaults: in effect the class of lowest energy; at T = 1 the choice is nearly
        uniform, the classifier's accuracy on bottom halves 0.19 against 0.69). A mixture over
        classes, not the marginal E(x): the model is trained as p(x | y), and chains on the
        marginal make no digits (see the module docstring).
        steps: SGLD steps (default: those of sampling). x (B, 64) pixels, missing (B, 64) bool."""
        v = common.pixels_to_pm1(x).repeat_interleave(NUM_CLASSES, 0)  # (B 10, 64)
        hidden = missing.repeat_interleave(NUM_CLASSES, 0)
        labels = balanced_labels(len(v), x.device)  # 0..9 for every input
        start = torch.where(hidden, uniform_noise(len(v), common.NUM_PIXELS, x.device), v)
        chains = self.langevin(lambda u: self.joint_energy(torch.where(hidden, u, v), labels), start,
                               steps or self.steps())
        chains = torch.where(hidden, chains, v)
        energies = self.joint_energy(chains, labels).view(len(x), NUM_CLASSES)
        temperature = max(self.config.noise**2 / (2 * self.config.step_size), 1e-12)
        pick = torch.distributions.Categorical(logits=-energies / temperature).sample()  # (B,)
        completed = common.pm1_to_pixels(chains.view(len(x), NUM_CLASSES, -1)[torch.arange(len(x)), pick])
        return torch.where(missing, completed, x)

    @torch.no_grad()
    def extra_metrics(self, splits, labels):
        """Classifier accuracy and mean marginal energies; energy gap = mean E(samples) - mean
        E(test) (> 0: samples are less probable under the model than test images)."""
        metrics = {}
        for split in ("val", "test"):
            x = splits[split]
            correct = self.logits(common.pixels_to_pm1(x)).argmax(1) == labels[split]
            metrics[f"{split}_accuracy"] = float(correct.float().mean())
        e_test = float(self.energy(common.pixels_to_pm1(splits["test"])).mean())
        with common.seeded(0, self.device):
            samples = common.pixels_to_pm1(self.sample(len(splits["test"])))
        e_samples = float(self.energy(samples).mean())
        metrics.update(test_energy=e_test, sample_energy=e_samples, energy_gap=e_samples - e_test,
                       sampler=f"{self.steps()} SGLD steps on E(x, y) from uniform noise, y balanced")
        return metrics

    def extra_images(self, splits):
        """EBM_chains.png: one chain per class (columns), rows at SGLD steps 0, K/7, ..., K."""
        labels = balanced_labels(NUM_CLASSES, self.device)
        v = uniform_noise(NUM_CLASSES, common.NUM_PIXELS, self.device)
        total, rows = self.steps(), [v]
        marks = [round(total * i / 7) for i in range(8)]
        for a, b in zip(marks[:-1], marks[1:]):
            v = self.langevin(lambda u: self.joint_energy(u, labels), v, b - a)
            rows.append(v)
        return dict(chains=(common.pm1_to_pixels(torch.cat(rows)), NUM_CLASSES))


# -----------------------------------------------------------------------------
# command line


def main(argv=None):
    # EMA 0.99 smooths the val Frechet from epoch to epoch, which picks the best epoch; 80 epochs
    # with patience 20 leave room past the best epoch within the time budget (README, the EBM's choices)
    parser = common.make_parser(__file__, __doc__, epochs=80, batch_size=64, lr=1e-3, patience=20,
                                ema=0.99, gif_every=5)
    common.add_options(parser, "EBM", EBMConfig)
    common.add_options(parser, "EBM sampling (free to change with --sample-only)", EBMSampling)
    args = common.parse_args(parser, argv)
    common.run(args, EBM, common.options_from(args, EBMConfig), common.options_from(args, EBMSampling))


if __name__ == "__main__":
    main()
