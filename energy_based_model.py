"""Energy-based model (EBM) of 8x8 Digits: p(x) = exp(-E(x)) / Z on pixels scaled to [-1, 1],
with Z intractable, so there is no test NLL.

The energy comes from a classifier, as in JEM (Grathwohl et al. 2020, "Your Classifier is Secretly
an Energy Based Model and You Should Treat it Like One"; intro_dgm's EBM example): an MLP f gives
10 logits, p(y | x) = softmax(f(x)) and E(x) = -logsumexp_y f(x)[y]. Training minimises

    E(x_data) - E(x_model)  +  reg * (E(x_data)^2 + E(x_model)^2)  +  CE(f(x_data), y)

(contrastive divergence, the energy-magnitude regulariser of Du & Mordatch 2019, "Implicit
Generation and Generalization in Energy-Based Models", and the classifier's cross-entropy). The
negatives x_model come from stochastic gradient Langevin dynamics (SGLD),
x <- x - step * dE/dx + noise * N(0, I), run for a few steps from a persistent replay buffer in
which a small fraction of the chains restart from uniform noise every step. sample(n) runs
short-run SGLD from uniform noise; the metrics report the energy gap between samples and test
data and the classifier's test accuracy. The validation objective is the classifier's held-out
cross-entropy (see EBM.eval_loss).

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
# SGLD sampler and replay buffer


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


class ReplayBuffer(nn.Module):
    """A persistent set of SGLD chains (Du & Mordatch 2019; JEM): each training step continues
    chains drawn from the buffer, restarting each from uniform noise with probability
    reinit_freq, and writes the results back. The chains are a registered buffer, so they are
    saved in checkpoints and --resume continues them."""

    def __init__(self, size, dim, reinit_freq):
        super().__init__()
        self.reinit_freq = reinit_freq
        self.register_buffer("chains", uniform_noise(size, dim, "cpu"))  # (size, dim) in [-1, 1]

    def __len__(self):
        return len(self.chains)

    def draw(self, n):
        """-> (indices (n,), starting points (n, dim)): buffer entries, a fraction reset to noise."""
        index = torch.randint(0, len(self.chains), (n,), device=self.chains.device)
        start = self.chains[index]
        reset = torch.rand(n, device=start.device) < self.reinit_freq  # (n,) Bernoulli(reinit_freq)
        start[reset] = uniform_noise(int(reset.sum()), start.shape[1], start.device)
        return index, start

    def store(self, index, x):
        """Write chains back; a chain drawn twice in one batch keeps its last copy. (Plain
        chains[index] = x with repeated indices leaves it to the threads which copy lands last,
        so two runs with the same seed differed.)"""
        order = torch.arange(len(index), device=index.device)
        last = torch.full((len(self.chains),), -1, dtype=torch.long, device=index.device)
        last = last.scatter_reduce(0, index, order, reduce="amax")  # (size,) last position drawing each chain
        keep = last[index] == order
        self.chains[index[keep]] = x.detach()[keep]


# -----------------------------------------------------------------------------
# model


@dataclass(frozen=True)
class EBMConfig:
    hidden: int = common.option(256, "width of the MLP's hidden layers", type=common.positive_int)
    layers: int = common.option(3, "number of hidden layers", type=common.positive_int)
    sgld_steps: int = common.option(20, "SGLD steps per training step, from the replay buffer",
                                    type=common.positive_int)
    step_size: float = common.option(1.0, "SGLD gradient step size", type=common.positive_float)
    noise: float = common.option(0.01, "standard deviation of the SGLD noise", type=common.nonnegative_float)
    buffer_size: int = common.option(10000, "number of persistent chains in the replay buffer",
                                     type=common.positive_int)
    reinit_freq: float = common.option(0.05, "probability that a chain restarts from uniform noise",
                                       type=common.unit_interval)
    energy_reg: float = common.option(0.1, "weight of the energy-magnitude regulariser E^2",
                                      type=common.nonnegative_float)
    data_noise: float = common.option(0.03, "std of the Gaussian noise added to training images in [-1, 1]",
                                      type=common.nonnegative_float)


@dataclass(frozen=True)
class EBMSampling:
    sample_steps: int = common.option(100, "SGLD steps from uniform noise when sampling", type=common.positive_int)


class EBM(common.DigitsModel):
    name = "EBM"
    nll_kind = None
    objective = "train: CD + energy reg. + CE; val: CE (nats)"
    Config, Sampling = EBMConfig, EBMSampling

    def __init__(self, config=None, sampling=None):
        super().__init__(config, sampling)
        config = self.config
        widths = [common.NUM_PIXELS] + [config.hidden] * config.layers
        blocks = []
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            blocks += [nn.Linear(w_in, w_out), nn.SiLU()]
        self.net = nn.Sequential(*blocks, nn.Linear(widths[-1], NUM_CLASSES))  # x -> logits f(x)
        self.buffer = ReplayBuffer(config.buffer_size, common.NUM_PIXELS, config.reinit_freq)
        # labels of all 1797 digits, to look up the labels of a batch (the loop passes pixels only)
        pixels, labels = common.load_digits_arrays()
        self.register_buffer("table_x", torch.from_numpy(pixels), persistent=False)  # (1797, 64)
        self.register_buffer("table_y", torch.from_numpy(labels), persistent=False)  # (1797,)

    def logits(self, y):
        """y: (B, 64) in [-1, 1] -> (B, 10) class logits f(y)."""
        return self.net(y)

    def energy(self, y):
        """y: (B, 64) in [-1, 1] -> (B,) E(y) = -logsumexp_c f(y)[c]."""
        return -torch.logsumexp(self.net(y), dim=1)

    def labels_of(self, x):
        """x: (B, 64) Digits images on 0..16 -> (B,) labels, by exact match with the dataset."""
        distance, index = torch.cdist(x, self.table_x).min(dim=1)  # (B,)
        if bool((distance > 0.5).any()):  # distinct images differ by >= 1 in some pixel
            raise ValueError("labels_of: the batch holds images that are not in load_digits()")
        return self.table_y[index]

    def run_sgld(self, start, steps):
        return sgld(self.energy, start, steps, self.config.step_size, self.config.noise, bounds=(-1.0, 1.0))

    def loss(self, x):
        y = common.pixels_to_pm1(x) + self.config.data_noise * torch.randn_like(x)  # (B, 64)
        index, start = self.buffer.draw(len(x))
        negatives = self.run_sgld(start, self.config.sgld_steps)  # (B, 64) persistent chains
        self.buffer.store(index, negatives)
        logits = self.logits(y)  # (B, 10)
        e_data = -torch.logsumexp(logits, dim=1)  # (B,)
        e_model = self.energy(negatives)  # (B,)
        contrastive = e_data.mean() - e_model.mean()  # gradient of -log p(x), up to the sampler
        magnitude = (e_data ** 2).mean() + (e_model ** 2).mean()  # keeps energies near 0
        classification = F.cross_entropy(logits, self.labels_of(x))
        return contrastive + self.config.energy_reg * magnitude + classification

    def eval_loss(self, x):
        """Held-out cross-entropy of p(y | x), in nats per image.

        Deterministic and a proper scoring rule on data the model never trained on; it shares
        every weight with E(x). The contrastive term is no selection criterion: it stays near 0
        by construction (the sampler follows the model), whatever the sample quality.
        """
        return F.cross_entropy(self.logits(common.pixels_to_pm1(x)), self.labels_of(x))

    def sample(self, n):
        """Short-run SGLD from uniform noise: (n, 64) on the 0..16 scale."""
        start = uniform_noise(n, common.NUM_PIXELS, self.device)
        return common.pm1_to_pixels(self.run_sgld(start, self.sampling.sample_steps))

    @torch.no_grad()
    def extra_metrics(self, splits):
        """Classifier accuracy and mean energies; energy gap = mean E(samples) - mean E(test)
        (> 0: samples are less probable under the model than test images)."""
        metrics = {}
        for split in ("val", "test"):
            x = splits[split]
            correct = self.logits(common.pixels_to_pm1(x)).argmax(1) == self.labels_of(x)
            metrics[f"{split}_accuracy"] = float(correct.float().mean())
        e_test = float(self.energy(common.pixels_to_pm1(splits["test"])).mean())
        with common.seeded(0, self.device):
            noise_samples = common.pixels_to_pm1(self.sample(len(splits["test"])))
        e_samples = float(self.energy(noise_samples).mean())
        e_buffer = float(self.energy(self.buffer.chains[:len(splits["test"])]).mean())
        metrics.update(test_energy=e_test, sample_energy=e_samples, buffer_energy=e_buffer,
                       energy_gap=e_samples - e_test, buffer_energy_gap=e_buffer - e_test,
                       sampler=f"{self.sampling.sample_steps} SGLD steps from uniform noise")
        return metrics

    def extra_images(self, splits):
        """EBM_buffer_samples.png: 64 persistent chains of the replay buffer (the training
        negatives); EBM_samples.png shows short-run chains from noise."""
        return dict(buffer_samples=(common.pm1_to_pixels(self.buffer.chains[:64]), 8))


# -----------------------------------------------------------------------------
# command line


def main(argv=None):
    parser = common.make_parser(__file__, __doc__, epochs=150, batch_size=64, lr=1e-3, patience=30,
                                gif_every=5)
    common.add_options(parser, "EBM", EBMConfig)
    common.add_options(parser, "EBM sampling (free to change with --sample-only)", EBMSampling)
    args = common.parse_args(parser, argv)
    common.run(args, EBM, common.options_from(args, EBMConfig), common.options_from(args, EBMSampling))


if __name__ == "__main__":
    main()
