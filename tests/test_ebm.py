"""EBM: the SGLD sampler against a known Gaussian, the joint and marginal energies, the
contrastive loss term by term (short-run chains from noise replayed by hand), balanced
class-conditional sampling, and a smoke test of the script (resume and a repeated run give the
same numbers)."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import energy_based_model as ebm_script
from conftest import check_outputs, run_main
from energy_based_model import EBM, balanced_labels, sgld

TINY = ["--quick", "--no-progress", "--hidden", "16", "--layers", "1", "--sgld-steps", "5", "--sample-steps", "5"]


def tiny_ebm(**overrides):
    torch.manual_seed(0)
    config = dict(hidden=16, layers=2, sgld_steps=3, sample_steps=3)
    return EBM.build(**{**config, **overrides})


# --- SGLD ------------------------------------------------------------------------


def test_sgld_on_a_quadratic_energy_reproduces_the_gaussian():
    """E(x) = (x - mu)^T P (x - mu) / 2 with P = Sigma^-1: Langevin chains with
    noise = sqrt(2 * step) settle at mean mu and covariance (P - step P^2 / 2)^-1, the exact
    stationary covariance of the discretised chain, which tends to Sigma as step -> 0."""
    mu = torch.tensor([0.5, -1.0], dtype=torch.float64)
    sigma = torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=torch.float64)
    precision = torch.linalg.inv(sigma)

    def energy(x):  # (B, 2) -> (B,)
        d = x - mu
        return 0.5 * ((d @ precision) * d).sum(1)

    step = 0.01
    torch.manual_seed(0)
    start = torch.full((4000, 2), 3.0, dtype=torch.float64)  # far from mu
    x = sgld(energy, start, steps=1500, step_size=step, noise=math.sqrt(2 * step))
    mean, cov = x.mean(0), torch.cov(x.T)
    stationary = torch.linalg.inv(precision - step * precision @ precision / 2)
    assert torch.allclose(mean, mu, atol=0.05), mean
    assert torch.allclose(cov, stationary, atol=0.05), cov
    assert torch.allclose(cov, sigma, atol=0.1), cov  # and close to the continuous-time answer


def test_sgld_without_noise_descends_respects_bounds_and_leaves_weights_alone():
    model = tiny_ebm()
    torch.manual_seed(1)
    start = torch.rand(32, 64) * 2 - 1
    before = model.energy(start).detach()
    after = sgld(model.energy, start, steps=5, step_size=1.0, noise=0.0)
    assert (model.energy(after) < before).all()  # gradient steps without noise lower every energy
    far = sgld(model.energy, start, steps=5, step_size=100.0, noise=1.0, bounds=(-1.0, 1.0))
    assert far.min() >= -1 and far.max() <= 1
    assert all(p.grad is None for p in model.parameters())
    assert not after.requires_grad


# --- energy, labels, loss -----------------------------------------------------------


def test_energies_joint_and_marginal():
    """E(x, y) = -f(x)[y] and the marginal E(x) = -log sum_y exp(-E(x, y)), checked one class
    at a time against the logits."""
    model = tiny_ebm()
    y = torch.rand(6, 64) * 2 - 1
    logits = model.logits(y)
    assert torch.allclose(model.energy(y), -torch.logsumexp(logits, 1))
    joint = torch.stack([model.joint_energy(y, torch.full((6,), c)) for c in range(10)], 1)  # (6, 10)
    assert torch.allclose(joint, -logits)
    assert torch.allclose(model.energy(y), -torch.log(torch.exp(-joint).sum(1)), atol=1e-6)
    assert torch.equal(model.ood_score(common.pm1_to_pixels(y)), model.energy(common.pixels_to_pm1(common.pm1_to_pixels(y))))


def test_the_model_holds_no_copy_of_the_data_and_uses_the_labels_it_is_given():
    """The labels come with the batch: no table of the dataset (test split included) inside the
    model, and other labels for the same images give another loss."""
    model = tiny_ebm(data_noise=0.0, noise=0.0)
    assert all(t.numel() < 1797 * 64 for t in [*model.parameters(), *model.buffers()])
    assert not list(model.buffers())
    pixels, labels = common.load_digits_arrays()
    x, y = torch.from_numpy(pixels[:8]), torch.from_numpy(labels[:8])
    torch.manual_seed(0)
    loss = model.loss(x, y)
    torch.manual_seed(0)
    assert model.loss(x, (y + 1) % 10).item() != pytest.approx(loss.item())
    assert model.eval_loss(x + 1, y).shape == ()  # images outside the dataset are fine


def test_loss_is_contrastive_divergence_plus_regulariser_plus_cross_entropy():
    """One noiseless SGLD step from uniform noise, replayed by hand with the same random stream:
    the loss is E(x, y) - E(x~, y) + reg (E(x, y)^2 + E(x~, y)^2) + CE, term by term."""
    model = tiny_ebm(data_noise=0.0, sgld_steps=1, noise=0.0, step_size=0.5, energy_reg=0.3)
    pixels, labels = common.load_digits_arrays()
    x, labels = torch.from_numpy(pixels[:8]), torch.from_numpy(labels[:8])
    torch.manual_seed(5)
    loss = model.loss(x, labels)
    torch.manual_seed(5)
    torch.randn(8, 64)  # the data noise (times 0)
    start = (torch.rand(8, 64) * 2 - 1).requires_grad_(True)
    grad = torch.autograd.grad(-model.logits(start)[torch.arange(8), labels].sum(), start)[0]
    negative = (start - 0.5 * grad).clamp(-1, 1).detach()
    e_data = -model.logits(common.pixels_to_pm1(x))[torch.arange(8), labels]
    e_neg = -model.logits(negative)[torch.arange(8), labels]
    expected = (e_data.mean() - e_neg.mean() + 0.3 * ((e_data ** 2).mean() + (e_neg ** 2).mean())
                + F.cross_entropy(model.logits(common.pixels_to_pm1(x)), labels))
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert model.eval_loss(x, labels).item() == pytest.approx(
        F.cross_entropy(model.logits(common.pixels_to_pm1(x)), labels).item(), abs=1e-6)


def test_noiseless_chains_descend_the_joint_energy_of_their_class():
    model = tiny_ebm(noise=0.0, step_size=0.1)
    labels = balanced_labels(30, "cpu")
    torch.manual_seed(3)
    start = torch.rand(30, 64) * 2 - 1
    torch.manual_seed(3)
    end = model.chains(labels, 4)
    assert (model.joint_energy(end, labels) < model.joint_energy(start, labels)).all()


def test_samples_are_balanced_start_from_noise_and_lie_on_the_pixel_scale():
    assert torch.equal(torch.bincount(balanced_labels(1000, "cpu")), torch.full((10,), 100))
    assert torch.equal(balanced_labels(12, "cpu"), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]))
    model = tiny_ebm(sample_steps=2)
    torch.manual_seed(0)
    samples = model.sample(10)
    assert samples.shape == (10, 64) and samples.min() >= 0 and samples.max() <= 16
    assert samples.std() > 1  # not collapsed to a constant
    torch.manual_seed(0)
    assert torch.equal(model.sample(10), samples)  # the seed fixes the chains
    marginal = model.sample_marginal(7)
    assert marginal.shape == (7, 64) and marginal.min() >= 0 and marginal.max() <= 16
    assert tiny_ebm().steps() == 3 and tiny_ebm(sample_steps=0, sgld_steps=4).steps() == 4


# --- the script ---------------------------------------------------------------------


def test_smoke_every_output_resume_and_a_repeated_run_agree(tmp_path):
    straight, again, resumed = tmp_path / "straight", tmp_path / "again", tmp_path / "resumed"
    assert run_main(ebm_script.main, TINY + ["--epochs", "3", "--out", str(straight)]) == 0
    metrics = check_outputs(straight, "EBM", None)
    for key in ("test_accuracy", "val_accuracy"):
        assert 0 <= metrics[key] <= 1
    for key in ("energy_gap", "test_energy", "sample_energy"):
        assert math.isfinite(metrics[key])
    assert metrics["energy_gap"] == pytest.approx(metrics["sample_energy"] - metrics["test_energy"])
    assert math.isfinite(metrics["other_samplers"]["marginal"]["frechet_distance"])
    from PIL import Image
    with Image.open(straight / "EBM_chains.png") as image:
        assert image.size[0] > 64

    assert run_main(ebm_script.main, TINY + ["--epochs", "3", "--out", str(again)]) == 0
    assert (straight / "EBM_samples.npy").read_bytes() == (again / "EBM_samples.npy").read_bytes()
    timing = ("seconds", "time", "memory", "cpu")
    same = [json.loads((out / "EBM_metrics.json").read_text()) for out in (straight, again)]
    same = [{k: v for k, v in m.items() if not any(t in k for t in timing) and k != "argv"} for m in same]
    assert same[0].pop("other_samplers")["marginal"]["frechet_distance"] == \
        same[1].pop("other_samplers")["marginal"]["frechet_distance"]
    assert same[0] == same[1]

    assert run_main(ebm_script.main, TINY + ["--epochs", "2", "--out", str(resumed)]) == 0
    assert run_main(ebm_script.main, TINY + ["--epochs", "3", "--resume", "--out", str(resumed)]) == 0
    history = [torch.load(out / "EBM.pt", weights_only=True)["history"] for out in (straight, resumed)]
    assert history[0] == history[1]
    assert np.array_equal(np.load(straight / "EBM_samples.npy"), np.load(resumed / "EBM_samples.npy"))
    assert json.loads((resumed / "EBM_metrics.json").read_text())["test_nll_nats"] is None
