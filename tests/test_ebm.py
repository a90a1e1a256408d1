"""EBM: the SGLD sampler against a known Gaussian, the replay buffer's size and restart rate,
the JEM energy and loss, and a smoke test of the script (with resume of the persistent chains)."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import energy_based_model as ebm_script
from conftest import check_outputs, run_main
from energy_based_model import EBM, ReplayBuffer, sgld

TINY = ["--quick", "--no-progress", "--hidden", "16", "--layers", "1", "--buffer-size", "200",
        "--sgld-steps", "5", "--sample-steps", "5"]


def tiny_ebm(**overrides):
    torch.manual_seed(0)
    config = dict(hidden=16, layers=2, sgld_steps=3, sample_steps=3, buffer_size=50)
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


# --- replay buffer ----------------------------------------------------------------


def test_replay_buffer_keeps_its_size_and_restarts_at_its_rate():
    torch.manual_seed(0)
    buffer = ReplayBuffer(size=300, dim=64, reinit_freq=0.2)
    initial = buffer.chains.clone()
    assert initial.shape == (300, 64) and initial.min() >= -1 and initial.max() <= 1
    buffer.chains.fill_(5.0)  # stored chains are 5.0; restarts are uniform on [-1, 1]
    restarted, draws = [], 0
    for _ in range(40):
        index, start = buffer.draw(500)
        assert index.shape == (500,) and start.shape == (500, 64)
        fresh = (start.abs() <= 1).all(1)
        assert torch.equal(fresh, (start != 5.0).all(1))  # a row is restarted whole or not at all
        restarted.append(start[fresh])
        draws += 500
        buffer.store(index, torch.full_like(start, 5.0))
        assert len(buffer) == 300 and buffer.chains.shape == (300, 64)
    restarted = torch.cat(restarted)
    rate = len(restarted) / draws  # Binomial(20000, 0.2) / 20000: std 0.003
    assert rate == pytest.approx(0.2, abs=0.015)
    assert restarted.mean().item() == pytest.approx(0.0, abs=0.02)
    assert restarted.var().item() == pytest.approx(1 / 3, abs=0.02)  # Var U[-1, 1]

    index = torch.tensor([3, 7])
    buffer.store(index, torch.zeros(2, 64))
    assert (buffer.chains[index] == 0).all() and (buffer.chains[[0, 1, 2]] == 5.0).all()
    repeated = torch.tensor([4, 9, 4, 4, 9])  # a chain drawn several times keeps the last copy
    buffer.store(repeated, torch.arange(5.0)[:, None].expand(5, 64))
    assert (buffer.chains[4] == 3.0).all() and (buffer.chains[9] == 4.0).all()
    buffer.reinit_freq = 0.0
    assert (buffer.draw(200)[1].abs() == 5.0).sum() >= 190 * 64  # no restarts at rate 0


# --- energy, labels, loss -----------------------------------------------------------


def test_energy_is_minus_logsumexp_of_the_logits_and_labels_are_looked_up():
    model = tiny_ebm()
    y = torch.rand(6, 64) * 2 - 1
    assert torch.allclose(model.energy(y), -torch.logsumexp(model.logits(y), 1))
    pixels, labels = common.load_digits_arrays()
    order = torch.randperm(len(pixels))[:100]
    assert torch.equal(model.labels_of(torch.from_numpy(pixels)[order]), torch.from_numpy(labels)[order])
    with pytest.raises(ValueError, match="not in load_digits"):
        model.labels_of(torch.from_numpy(pixels[:3]) + 1)


def test_loss_is_contrastive_divergence_plus_regulariser_plus_cross_entropy():
    """With data noise 0, no restarts and a buffer of identical chains (one SGLD step from a known
    point), the loss is E(data) - E(neg) + reg (E(data)^2 + E(neg)^2) + CE, term by term."""
    model = tiny_ebm(data_noise=0.0, reinit_freq=0.0, sgld_steps=1, noise=0.0, energy_reg=0.3)
    point = torch.linspace(-0.5, 0.5, 64)
    model.buffer.chains.copy_(point.expand(50, 64))
    pixels, labels = common.load_digits_arrays()
    x, labels = torch.from_numpy(pixels[:8]), torch.from_numpy(labels[:8])
    negative = sgld(model.energy, point[None], 1, model.config.step_size, 0.0, bounds=(-1.0, 1.0))
    e_data, e_neg = model.energy(common.pixels_to_pm1(x)), model.energy(negative)
    expected = (e_data.mean() - e_neg.mean() + 0.3 * ((e_data ** 2).mean() + (e_neg ** 2).mean())
                + F.cross_entropy(model.logits(common.pixels_to_pm1(x)), labels))
    assert model.loss(x).item() == pytest.approx(expected.item(), abs=1e-5)
    written = torch.isclose(model.buffer.chains, negative, atol=1e-6).all(1)  # (50,): the drawn chains were written back
    assert 1 <= written.sum() <= 8 and (model.buffer.chains[~written] == point).all()
    assert model.eval_loss(x).item() == pytest.approx(
        F.cross_entropy(model.logits(common.pixels_to_pm1(x)), labels).item(), abs=1e-6)


def test_samples_start_from_noise_and_lie_on_the_pixel_scale():
    torch.manual_seed(0)
    samples = tiny_ebm(sample_steps=2).sample(10)
    assert samples.shape == (10, 64) and samples.min() >= 0 and samples.max() <= 16
    assert samples.std() > 1  # not collapsed to a constant


# --- the script ---------------------------------------------------------------------


def test_smoke_every_output_and_resume_continues_the_chains(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_main(ebm_script.main, TINY + ["--epochs", "3", "--out", str(straight)]) == 0
    metrics = check_outputs(straight, "EBM", None)
    for key in ("test_accuracy", "val_accuracy"):
        assert 0 <= metrics[key] <= 1
    for key in ("energy_gap", "buffer_energy_gap", "test_energy", "sample_energy"):
        assert math.isfinite(metrics[key])
    assert metrics["energy_gap"] == pytest.approx(metrics["sample_energy"] - metrics["test_energy"])
    from PIL import Image
    with Image.open(straight / "EBM_buffer_samples.png") as image:
        assert image.size[0] > 64

    assert run_main(ebm_script.main, TINY + ["--epochs", "2", "--out", str(resumed)]) == 0
    assert run_main(ebm_script.main, TINY + ["--epochs", "3", "--resume", "--out", str(resumed)]) == 0
    history = [torch.load(out / "EBM.pt", weights_only=True)["history"] for out in (straight, resumed)]
    assert history[0] == history[1]  # same losses: the replay buffer was checkpointed and restored
    assert np.array_equal(np.load(straight / "EBM_samples.npy"), np.load(resumed / "EBM_samples.npy"))
    assert json.loads((resumed / "EBM_metrics.json").read_text())["test_nll_nats"] is None
