"""EBM: the SGLD sampler against a known Gaussian, the energies of both modes (unconditional
scalar E(x) = -f(x), conditional JEM E(x, y) = -f(x)[y]), the contrastive loss term by term
(short-run chains from noise replayed by hand), labels ignored by the unconditional model and
honoured by the conditional one, and a smoke test of the script (resume and a repeated run give
the same numbers)."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import energy_based_model as ebm_script
from conftest import check_conditional_outputs, check_outputs, run_main
from energy_based_model import EBM, sgld

TINY = ["--quick", "--no-progress", "--hidden", "16", "--layers", "1", "--sgld-steps", "5", "--sample-steps", "5"]


def tiny_ebm(**overrides):
    torch.manual_seed(0)
    config = dict(hidden=16, layers=2, sgld_steps=3, sample_steps=3)
    return EBM.build(**{**config, **overrides})


def replayed_negatives(model, x, labels, step_size):
    """One noiseless SGLD step from uniform noise on E(., labels) (or E(.) for labels None), with
    the random stream the loss uses after its data noise."""
    torch.randn(len(x), 64)  # the data noise (times 0)
    start = (torch.rand(len(x), 64) * 2 - 1).requires_grad_(True)
    out = model.net(start)
    energy = -out[:, 0] if labels is None else -out[torch.arange(len(x)), labels]
    grad = torch.autograd.grad(energy.sum(), start)[0]
    return (start - step_size * grad).clamp(-1, 1).detach()


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


def test_unconditional_energy_is_minus_the_scalar_output():
    model = tiny_ebm()
    assert not model.conditional and model.net[-1].out_features == 1
    v = torch.rand(6, 64) * 2 - 1
    assert torch.equal(model.energy(v), -model.net(v)[:, 0])
    assert torch.equal(model.ood_score(common.pm1_to_pixels(v)), model.energy(common.pixels_to_pm1(common.pm1_to_pixels(v))))


def test_energies_joint_and_marginal():
    """E(x, y) = -f(x)[y] and the marginal E(x) = -log sum_y exp(-E(x, y)), checked one class
    at a time against the logits; the logits are the generative classifier's scores."""
    model = tiny_ebm(conditional=True)
    y = torch.rand(6, 64) * 2 - 1
    logits = model.net(y)
    assert torch.equal(model.class_log_likelihoods(common.pm1_to_pixels(y)), model.net(common.pixels_to_pm1(common.pm1_to_pixels(y))))
    assert torch.allclose(model.energy(y), -torch.logsumexp(logits, 1))
    joint = torch.stack([model.joint_energy(y, torch.full((6,), c)) for c in range(10)], 1)  # (6, 10)
    assert torch.allclose(joint, -logits)
    assert torch.allclose(model.energy(y), -torch.log(torch.exp(-joint).sum(1)), atol=1e-6)
    assert torch.equal(model.ood_score(common.pm1_to_pixels(y)), model.energy(common.pixels_to_pm1(common.pm1_to_pixels(y))))


@pytest.mark.parametrize("conditional", [False, True])
def test_the_model_holds_no_copy_of_the_data_and_uses_labels_only_when_conditional(conditional):
    """The labels come with the batch: no table of the dataset (test split included) inside the
    model; other labels for the same images give another loss when conditional, the same one
    when not."""
    model = tiny_ebm(data_noise=0.0, noise=0.0, conditional=conditional)
    assert all(t.numel() < 1797 * 64 for t in [*model.parameters(), *model.buffers()])
    assert not list(model.buffers())
    pixels, labels = common.load_digits_arrays()
    x, y = torch.from_numpy(pixels[:8]), torch.from_numpy(labels[:8])
    torch.manual_seed(0)
    loss = model.loss(x, y)
    torch.manual_seed(0)
    other = model.loss(x, (y + 1) % 10).item()
    assert (other != pytest.approx(loss.item())) if conditional else (other == loss.item())
    assert model.eval_loss(x + 1, y).shape == ()  # images outside the dataset are fine


def test_unconditional_loss_is_contrastive_divergence_plus_regulariser():
    """One noiseless SGLD step from uniform noise on E(x), replayed by hand with the same random
    stream: the loss is E(x) - E(x~) + reg (E(x)^2 + E(x~)^2), term by term."""
    model = tiny_ebm(data_noise=0.0, sgld_steps=1, noise=0.0, step_size=0.5, energy_reg=0.3)
    pixels, labels = common.load_digits_arrays()
    x, labels = torch.from_numpy(pixels[:8]), torch.from_numpy(labels[:8])
    torch.manual_seed(5)
    loss = model.loss(x, labels)
    torch.manual_seed(5)
    negative = replayed_negatives(model, x, None, 0.5)
    e_data, e_neg = -model.net(common.pixels_to_pm1(x))[:, 0], -model.net(negative)[:, 0]
    expected = e_data.mean() - e_neg.mean() + 0.3 * ((e_data ** 2).mean() + (e_neg ** 2).mean())
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)


def test_conditional_loss_is_contrastive_divergence_plus_regulariser_plus_cross_entropy():
    """The same replay on E(x, y): E(x, y) - E(x~, y) + reg (E(x, y)^2 + E(x~, y)^2) + CE."""
    model = tiny_ebm(data_noise=0.0, sgld_steps=1, noise=0.0, step_size=0.5, energy_reg=0.3, conditional=True)
    pixels, labels = common.load_digits_arrays()
    x, labels = torch.from_numpy(pixels[:8]), torch.from_numpy(labels[:8])
    torch.manual_seed(5)
    loss = model.loss(x, labels)
    torch.manual_seed(5)
    negative = replayed_negatives(model, x, labels, 0.5)
    logits = model.net(common.pixels_to_pm1(x))
    e_data = -logits[torch.arange(8), labels]
    e_neg = -model.net(negative)[torch.arange(8), labels]
    expected = (e_data.mean() - e_neg.mean() + 0.3 * ((e_data ** 2).mean() + (e_neg ** 2).mean())
                + F.cross_entropy(logits, labels))
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert model.eval_loss(x, labels).item() == pytest.approx(F.cross_entropy(logits, labels).item(), abs=1e-6)


def test_noiseless_chains_descend_their_energy():
    """Unconditional chains descend E(x); conditional ones the joint energy of their class."""
    labels = torch.arange(30) % 10
    for conditional, chain_labels in ((False, None), (True, labels)):
        model = tiny_ebm(noise=0.0, step_size=0.1, conditional=conditional)
        energy = model.chain_energy(chain_labels)
        torch.manual_seed(3)
        start = torch.rand(30, 64) * 2 - 1
        torch.manual_seed(3)
        end = model.chains(30, chain_labels, 4)
        assert (energy(end) < energy(start)).all()


@pytest.mark.parametrize("conditional", [False, True])
def test_samples_start_from_noise_and_lie_on_the_pixel_scale(conditional):
    model = tiny_ebm(sample_steps=2, conditional=conditional)
    torch.manual_seed(0)
    samples = model.sample(10)
    assert samples.shape == (10, 64) and samples.min() >= 0 and samples.max() <= 16
    assert samples.std() > 1  # not collapsed to a constant
    torch.manual_seed(0)
    assert torch.equal(model.sample(10), samples)  # the seed fixes the chains
    assert tiny_ebm().steps() == 3 and tiny_ebm(sample_steps=0, sgld_steps=4).steps() == 4
    completed = model.complete(torch.full((3, 64), 8.0), torch.arange(64).repeat(3, 1) >= 32)
    assert torch.equal(completed[:, :32], torch.full((3, 32), 8.0))  # observed pixels kept exactly
    assert completed.min() >= 0 and completed.max() <= 16


def test_conditional_samples_follow_the_labels_given():
    """Sample i is drawn by a chain on E(., y[i]): replayed with the same stream, class by class;
    without labels the classes are balanced."""
    model = tiny_ebm(sample_steps=2, conditional=True)
    y = torch.tensor([3, 3, 7, 0])
    torch.manual_seed(0)
    samples = model.sample(4, y)
    torch.manual_seed(0)
    assert torch.equal(samples, common.pm1_to_pixels(model.chains(4, y, 2)))
    torch.manual_seed(0)
    unlabelled = model.sample(4)
    torch.manual_seed(0)
    assert torch.equal(unlabelled, common.pm1_to_pixels(model.chains(4, torch.tensor([0, 1, 2, 3]), 2)))


# --- the script ---------------------------------------------------------------------


def test_smoke_every_output_resume_and_a_repeated_run_agree(tmp_path):
    straight, again, resumed = tmp_path / "straight", tmp_path / "again", tmp_path / "resumed"
    assert run_main(ebm_script.main, TINY + ["--epochs", "3", "--out", str(straight)]) == 0
    metrics = check_outputs(straight, "EBM", None)
    assert "test_accuracy" not in metrics  # unconditional: no labels
    for key in ("energy_gap", "test_energy", "sample_energy"):
        assert math.isfinite(metrics[key])
    assert metrics["energy_gap"] == pytest.approx(metrics["sample_energy"] - metrics["test_energy"])
    from PIL import Image
    with Image.open(straight / "EBM_chains.png") as image:
        assert image.size[0] > 64

    assert run_main(ebm_script.main, TINY + ["--epochs", "3", "--out", str(again)]) == 0
    assert (straight / "EBM_samples.npy").read_bytes() == (again / "EBM_samples.npy").read_bytes()
    timing = ("seconds", "time", "memory", "cpu")
    same = [json.loads((out / "EBM_metrics.json").read_text()) for out in (straight, again)]
    same = [{k: v for k, v in m.items() if not any(t in k for t in timing) and k != "argv"} for m in same]
    assert same[0] == same[1]

    assert run_main(ebm_script.main, TINY + ["--epochs", "2", "--out", str(resumed)]) == 0
    assert run_main(ebm_script.main, TINY + ["--epochs", "3", "--resume", "--out", str(resumed)]) == 0
    history = [torch.load(out / "EBM.pt", weights_only=True)["history"] for out in (straight, resumed)]
    assert history[0] == history[1]
    assert np.array_equal(np.load(straight / "EBM_samples.npy"), np.load(resumed / "EBM_samples.npy"))
    assert json.loads((resumed / "EBM_metrics.json").read_text())["test_nll_nats"] is None


def test_conditional_smoke_writes_the_conditional_files_only(tmp_path):
    """--quick --conditional --digits 3,7: JEM trained, samples of the two classes asked for, the
    classifier's accuracy and the generative classifier in the metrics, the default run's files absent."""
    assert run_main(ebm_script.main, TINY + ["--out", str(tmp_path), "--conditional", "--digits", "3,7"]) == 0
    metrics = check_conditional_outputs(tmp_path, "EBM", (3, 7), None)
    assert 0 <= metrics["generative_classifier_accuracy"] <= 1 and "test_accuracy" in metrics
