"""GAN: the losses against their closed forms, the generator's shape and range, one adversarial
step moving each network the right way (and only that network), a discriminator separating two
shifted Gaussians, the translation augmentation, the conditional model (projection discriminator,
class-conditional samples), and smoke, resume and sample-only runs."""

import json

import numpy as np
import pytest
import torch

import generative_adversarial_network as gan_script
from conftest import check_conditional_outputs, check_outputs, run_main
from generative_adversarial_network import GAN, discriminator_loss, generator_loss, gradient_penalty, translate

TINY = ["--quick", "--no-progress", "--hidden", "16", "--latent", "4"]


def tiny_gan(**fields):
    torch.manual_seed(0)
    return GAN.build(**{**dict(hidden=16, latent=4), **fields})


def history(out):
    return json.loads((out / "GAN_metrics.json").read_text()), torch.load(
        out / "GAN_resume.pt", weights_only=True)["state"]["history"]


def flat(module):
    return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


# --- losses ----------------------------------------------------------------------


def test_losses_match_their_closed_forms():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-3.0, 0.0, 1.0])
    # hinge: mean relu(1 - real) = (0 + 0.5 + 2) / 3, mean relu(1 + fake) = (0 + 1 + 2) / 3
    assert discriminator_loss("hinge", real, fake).item() == pytest.approx(2.5 / 3 + 3 / 3)
    assert generator_loss("hinge", fake).item() == pytest.approx(2 / 3)
    # non-saturating: -log sigmoid(real) - log(1 - sigmoid(fake)); G: -log sigmoid(fake)
    sig = torch.sigmoid
    expected = -(sig(real).log().mean() + (1 - sig(fake)).log().mean())
    assert discriminator_loss("nonsaturating", real, fake).item() == pytest.approx(expected.item(), rel=1e-6)
    assert generator_loss("nonsaturating", fake).item() == pytest.approx(-sig(fake).log().mean().item(), rel=1e-6)
    # wgan: minus the Wasserstein estimate E[D(real)] - E[D(fake)]
    assert discriminator_loss("wgan-gp", real, fake).item() == pytest.approx(fake.mean() - real.mean())
    assert generator_loss("wgan-gp", fake).item() == pytest.approx(-fake.mean().item())


@pytest.mark.parametrize("scale", [0.5, 1.0, 3.0])
def test_gradient_penalty_of_a_linear_critic_is_its_norm_minus_one_squared(scale):
    torch.manual_seed(0)
    w = torch.randn(64)
    w = w / w.norm() * scale  # D(y) = w . y + 0.7: gradient w everywhere
    critic = lambda y: y @ w + 0.7  # noqa: E731
    penalty = gradient_penalty(critic, torch.randn(8, 64), torch.randn(8, 64))
    assert penalty.item() == pytest.approx((scale - 1) ** 2, abs=1e-5)


def test_wgan_gp_discriminator_loss_adds_the_weighted_penalty():
    model = tiny_gan(loss="wgan-gp", spectral_norm=False, gp_weight=10.0)
    real, fake = torch.rand(16, 64) * 2 - 1, torch.rand(16, 64) * 2 - 1
    torch.manual_seed(3)
    total = model.d_loss(real, fake)
    torch.manual_seed(3)
    penalty = gradient_penalty(model.critic, real, fake)
    plain = discriminator_loss("wgan-gp", model.critic(real), model.critic(fake))
    assert total.item() == pytest.approx((plain + 10.0 * penalty).item(), rel=1e-5)
    assert penalty.item() > 0


# --- generator ---------------------------------------------------------------------


def test_generator_output_shape_and_range_even_with_huge_weights():
    model = tiny_gan()
    with torch.no_grad():
        model.generator[-1].weight.mul_(1000)  # pre-tanh values far outside [-1, 1]
    y = model.generate(model.noise(50))
    assert y.shape == (50, 64) and y.min() >= -1 and y.max() <= 1
    assert (y.abs() > 0.999).float().mean() > 0.5  # saturated, still in range
    samples = model.sample(50)
    assert samples.shape == (50, 64) and samples.min() >= 0 and samples.max() <= 16


def test_samples_are_the_generator_output_on_the_pixel_scale():
    model = tiny_gan(round=False)
    torch.manual_seed(5)
    samples = model.sample(20)
    torch.manual_seed(5)
    y = model.generate(torch.randn(20, 4))
    assert torch.allclose(samples, (y + 1) * 8, atol=1e-5)
    assert not torch.equal(samples, samples.round())  # continuous without rounding
    rounded = tiny_gan(round=True)
    torch.manual_seed(5)
    assert torch.equal(rounded.sample(20), samples.round())


# --- one adversarial step ---------------------------------------------------------------


@pytest.mark.parametrize("loss", ["hinge", "nonsaturating", "wgan-gp"])
def test_one_step_moves_each_network_the_expected_way_and_only_that_one(loss):
    # wgan-gp without its penalty here, so that the step descends the objective measured
    model = tiny_gan(loss=loss, spectral_norm=loss != "wgan-gp", gp_weight=0.0)
    optimizer = model.configure_optimizer(1e-3)
    torch.manual_seed(1)
    real = torch.rand(64, 64) * 2 - 1
    z_d, z_g = model.noise(64), model.noise(64)
    g_before, d_before = flat(model.generator), flat(model.discriminator)

    def d_objective():  # the discriminator's loss without the (random) penalty, in eval mode
        model.eval()  # (spectral norm's power iteration does not move)
        fake = model.generate(z_d).detach()
        value = discriminator_loss(loss, model.critic(real), model.critic(fake)).item()
        model.train()
        return value

    with torch.no_grad():
        before = d_objective()
    model.discriminator_step(real, z_d, optimizer)
    assert torch.equal(flat(model.generator), g_before), "the discriminator step moved G"
    assert not torch.equal(flat(model.discriminator), d_before)
    with torch.no_grad():
        assert d_objective() < before  # D separates this real batch from these fakes better

    d_after = flat(model.discriminator)
    def g_score():  # D's mean score of G(z_g), in eval mode
        model.eval()
        value = model.critic(model.generate(z_g)).mean().item()
        model.train()
        return value

    with torch.no_grad():
        score = g_score()
    model.generator_step(z_g, optimizer)
    assert not torch.equal(flat(model.generator), g_before)
    assert torch.equal(flat(model.discriminator), d_after), "the generator step moved D"
    with torch.no_grad():
        assert g_score() > score  # D rates G's fakes higher


def test_train_step_returns_both_losses_and_checks_finiteness():
    model = tiny_gan(d_steps=2)
    optimizer = model.configure_optimizer(1e-3)
    values = model.train_step(torch.randint(0, 17, (32, 64)).float(), None, optimizer)
    assert set(values) == {"loss", "generator"} and all(np.isfinite(v) for v in values.values())
    assert values["loss"] > 0  # a hinge loss of an untrained D is near 2
    with torch.no_grad():
        model.generator[0].weight.fill_(float("nan"))
    before = flat(model.discriminator)
    with pytest.raises(gan_script.common.NonFiniteLoss):
        model.train_step(torch.randint(0, 17, (32, 64)).float(), None, optimizer)
    assert torch.equal(flat(model.discriminator), before)  # nothing moved


def test_optimizer_has_a_group_per_network_and_round_trips():
    model = tiny_gan(d_lr_scale=4.0, beta1=0.0)
    optimizer = model.configure_optimizer(1e-3)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert groups["generator"]["lr"] == 1e-3 and groups["discriminator"]["lr"] == pytest.approx(4e-3)
    assert groups["generator"]["betas"] == (0.0, 0.9)
    assert sum(p.numel() for g in groups.values() for p in g["params"]) == sum(p.numel() for p in model.parameters())
    model.train_step(torch.randint(0, 17, (8, 64)).float(), None, optimizer)
    other = model.configure_optimizer(1e-3)
    other.load_state_dict(optimizer.state_dict())
    assert other.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()


@pytest.mark.parametrize("loss", ["hinge", "nonsaturating", "wgan-gp"])
def test_discriminator_learns_to_separate_two_shifted_gaussians(loss):
    model = tiny_gan(loss=loss, spectral_norm=loss != "wgan-gp")
    optimizer = torch.optim.Adam(model.discriminator.parameters(), lr=3e-3, betas=(0.0, 0.9))
    torch.manual_seed(2)

    def batch(n):  # real ~ N(0.1, 0.3^2), fake ~ N(-0.1, 0.3^2), per pixel
        return 0.1 + 0.3 * torch.randn(n, 64), -0.1 + 0.3 * torch.randn(n, 64)

    for _ in range(60):
        real, fake = batch(64)
        optimizer.zero_grad()
        model.d_loss(real, fake).backward()
        optimizer.step()
    real, fake = batch(500)
    with torch.no_grad():
        real_scores, fake_scores = model.critic(real), model.critic(fake)
    # the Bayes classifier (threshold the pixel sum at 0) is 99.6% accurate, a random projection
    # ~70%: D ranks a real image above a fake one nearly always
    assert (real_scores[:, None] > fake_scores[None, :]).float().mean() > 0.95
    if loss != "wgan-gp":  # and puts the threshold near 0
        accuracy = ((real_scores > 0).float().mean() + (fake_scores < 0).float().mean()) / 2
        assert accuracy > 0.9


# --- augmentation --------------------------------------------------------------------


def test_translation_moves_each_image_by_at_most_one_pixel_and_fills_with_background():
    image = -torch.ones(1, 8, 8)
    image[0, 3, 4] = 1.0
    torch.manual_seed(0)
    moved = translate(image.reshape(1, 64).expand(400, 64)).view(400, 8, 8)
    assert ((moved == 1).sum((1, 2)) == 1).all() and ((moved == -1).sum((1, 2)) == 63).all()
    where = (moved == 1).nonzero()[:, 1:] - torch.tensor([3, 4])  # (400, 2) shifts
    assert where.abs().max() == 1
    assert len({tuple(s) for s in where.tolist()}) == 9  # all nine shifts occur
    corner = -torch.ones(1, 64)
    corner[0, 0] = 1.0  # a pixel shifted off the edge is lost, the background fills in
    torch.manual_seed(1)
    counts = (translate(corner.expand(400, 64)) == 1).sum(1)
    assert set(counts.tolist()) == {0, 1}


def test_translation_is_differentiable():
    y = torch.rand(4, 64, requires_grad=True)
    translate(y).sum().backward()
    assert y.grad is not None and y.grad.max() == 1 and y.grad.min() >= 0


# --- the conditional model ---------------------------------------------------------------


def test_unconditional_model_has_no_class_parameters():
    model = tiny_gan()
    assert not hasattr(model, "class_embedding") and model.generator[0].in_features == 4
    conditional = tiny_gan(conditional=True)
    assert conditional.generator[0].in_features == 4 + 10
    assert conditional.class_embedding.weight.shape == (10, 16)


def test_conditional_samples_have_the_asked_count_shape_and_need_labels():
    model = tiny_gan(conditional=True)
    y = torch.tensor([3, 7, 7, 0, 9])
    torch.manual_seed(4)
    samples = model.sample(5, y)
    assert samples.shape == (5, 64) and samples.min() >= 0 and samples.max() <= 16
    torch.manual_seed(4)  # the same noise, other classes: other images
    assert not torch.allclose(model.sample(5, torch.tensor([1, 2, 3, 4, 5])), samples)
    torch.manual_seed(4)  # G([z, onehot(y)]) on the pixel scale
    z = model.noise(5)
    assert torch.allclose((model.generate(z, y) + 1) * 8, samples, atol=1e-5)
    for bad in (None, torch.tensor([3.0, 7.0]), torch.tensor([10, 1]), torch.tensor([-1, 1])):
        with pytest.raises(ValueError, match="class labels"):
            model.sample(2, bad)


def test_projection_discriminator_is_psi_of_phi_plus_the_class_vector_projection():
    model = tiny_gan(conditional=True).eval()  # eval: spectral norm's power iteration stands still
    v, a, b = torch.rand(6, 64) * 2 - 1, torch.tensor([0, 1, 2, 3, 4, 5]), torch.tensor([9, 8, 7, 6, 5, 4])
    with torch.no_grad():
        phi = model.discriminator[:-1](v)  # (6, 16)
        e = model.class_embedding.weight  # (10, 16), spectrally normalised
        psi = model.discriminator[-1](phi).squeeze(1)
        assert torch.allclose(model.critic(v, a), psi + (e[a] * phi).sum(1), atol=1e-6)
        assert torch.allclose(model.critic(v, a) - model.critic(v, b), ((e[a] - e[b]) * phi).sum(1), atol=1e-6)


def test_conditional_steps_move_the_class_vectors_with_d_only():
    model = tiny_gan(conditional=True)
    optimizer = model.configure_optimizer(1e-3)
    x, y = torch.randint(0, 17, (32, 64)).float(), torch.randint(0, 10, (32,))
    real, e_before = gan_script.common.pixels_to_pm1(x), flat(model.class_embedding)
    model.discriminator_step(real, model.noise(32), optimizer, y)
    e_after, g_before = flat(model.class_embedding), flat(model.generator)
    assert not torch.equal(e_after, e_before)
    model.generator_step(model.noise(32), optimizer, y)
    assert torch.equal(flat(model.class_embedding), e_after) and not torch.equal(flat(model.generator), g_before)
    values = model.train_step(x, y, optimizer)
    assert set(values) == {"loss", "generator"} and all(np.isfinite(v) for v in values.values())
    with pytest.raises(ValueError, match="class labels"):
        model.train_step(x, None, optimizer)


def test_conditional_smoke_run_writes_the_conditional_files(tmp_path):
    assert run_main(gan_script.main, TINY + ["--conditional", "--digits", "3,7", "--num-samples", "100",
                                             "--out", str(tmp_path)]) == 0
    for suffix in (".pt", "_metrics.json", "_samples.npz", "_samples.png", "_loss_val_curve.png", "_training.gif"):
        assert (tmp_path / f"GAN_conditional{suffix}").is_file(), suffix
    metrics = check_conditional_outputs(tmp_path, "GAN", (3, 7), None, num_samples=100)
    assert metrics["test_nll_nats"] is None and np.isfinite(metrics["frechet_mean_over_classes"])
    with np.load(tmp_path / "GAN_conditional_samples.npz") as samples:
        assert samples["x"].min() >= 0 and samples["x"].max() <= 16


# --- the script -------------------------------------------------------------------------


def test_smoke_every_output(tmp_path):
    assert run_main(gan_script.main, TINY + ["--out", str(tmp_path)]) == 0
    metrics = check_outputs(tmp_path, "GAN", None)
    assert metrics["val_objective"].startswith("Frechet") and metrics["best_val_objective"] > 0
    for key in ("frechet_distance", "copy_rate", "class_coverage"):
        assert np.isfinite(metrics[key])
    _, curves = history(tmp_path)
    assert set(curves) == {"train", "generator", "val"} and len(curves["generator"]) == 2
    assert metrics["sampling"] == {"round": False}


def test_resume_ends_with_the_same_history_as_a_straight_run(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    flags = TINY + ["--augment", "translation", "--d-steps", "2"]  # every random draw of a step
    assert run_main(gan_script.main, flags + ["--epochs", "3", "--out", str(straight)]) == 0
    assert run_main(gan_script.main, flags + ["--epochs", "2", "--out", str(resumed)]) == 0
    assert run_main(gan_script.main, flags + ["--epochs", "3", "--resume", "--out", str(resumed)]) == 0
    (a_metrics, a), (b_metrics, b) = history(straight), history(resumed)
    assert a == b and len(a["train"]) == 3
    assert a_metrics["frechet_distance"] == pytest.approx(b_metrics["frechet_distance"])
    assert np.array_equal(np.load(straight / "GAN_samples.npy"), np.load(resumed / "GAN_samples.npy"))


def test_sample_only_reproduces_the_samples_and_may_change_rounding(tmp_path):
    assert run_main(gan_script.main, TINY + ["--out", str(tmp_path)]) == 0
    before = np.load(tmp_path / "GAN_samples.npy")
    assert not np.array_equal(before, before.round())  # continuous by default
    metrics_before = json.loads((tmp_path / "GAN_metrics.json").read_text())
    (tmp_path / "GAN_samples.npy").unlink()
    assert run_main(gan_script.main, TINY + ["--out", str(tmp_path), "--sample-only"]) == 0
    assert np.array_equal(np.load(tmp_path / "GAN_samples.npy"), before)
    metrics = json.loads((tmp_path / "GAN_metrics.json").read_text())
    assert metrics["frechet_distance"] == pytest.approx(metrics_before["frechet_distance"])
    assert run_main(gan_script.main, TINY + ["--out", str(tmp_path), "--sample-only", "--round"]) == 0
    assert np.array_equal(np.load(tmp_path / "GAN_samples.npy"), np.round(before))  # the same draws, rounded
    assert json.loads((tmp_path / "GAN_metrics.json").read_text())["sampling"] == {"round": True}


@pytest.mark.parametrize("argv, words", [
    (["--loss", "wgan-gp"], "--no-spectral-norm"),
    (["--loss", "lsgan"], "invalid choice"),
    (["--augment", "flip"], "invalid choice"),
    (["--d-steps", "0"], "integer >= 1"),
])
def test_bad_flags_exit_2_with_one_line(argv, words, tmp_path, capsys):
    assert run_main(gan_script.main, TINY + argv + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1
    assert not list(tmp_path.iterdir())
