"""VAE: the mixture density, the ELBO and the importance-weighted bound against quadrature on a
1-D latent (and a 2-D one for the hierarchical VAE), true samples against the model's marginal,
KL warm-up, the pictures, the conditional model (CVAE), and smoke, resume and sample-only runs of
the script."""

import json
import math

import numpy as np
import pytest
import torch

import variational_autoencoder as vae_script
from conftest import check_conditional_outputs, check_outputs, run_main
from variational_autoencoder import VAE, log_normal, log_normal_mixture

TINY = ["--quick", "--no-progress", "--hidden", "16", "--channels", "4", "--latent", "2", "--components", "5"]
PRIORS = ("standard", "mog", "vampprior")


def test_log_normal_mixture_matches_torch_distributions():
    torch.manual_seed(0)
    means, logvars, logits = torch.randn(5, 3), torch.randn(5, 3), torch.randn(5)
    z = 2 * torch.randn(7, 4, 3)
    mixture = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=logits),
        torch.distributions.Independent(torch.distributions.Normal(means, torch.exp(0.5 * logvars)), 1))
    expected = mixture.log_prob(z)
    assert torch.allclose(log_normal_mixture(z, means, logvars, torch.log_softmax(logits, 0)), expected, atol=1e-4)
    single = torch.distributions.Normal(means[0], torch.exp(0.5 * logvars[0])).log_prob(z).sum(-1)
    assert torch.allclose(log_normal(z, means[0], logvars[0]), single, atol=1e-5)


# --- a tiny model whose likelihood can be integrated ----------------------------------------


def two_pixel_model(prior, layers=1, seed=0):
    """A VAE with a 1-D latent (z1 and z2 1-D with two layers) and random weights, in which only
    pixels 0 and 1 depend on z: the last decoder layer's rows of the other 62 pixels are zero, so
    their logits are constants (their probability is a constant factor of p(x | z))."""
    torch.manual_seed(seed)
    model = VAE.build(latent=1, hidden=16, prior=prior, components=3, stochastic_layers=layers, decoder="mlp",
                      dropout=0.0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.startswith(("encoder", "prior_z1", "decoder")) and parameter.dim() == 2:
                parameter.normal_(0, 1.2 / math.sqrt(parameter.shape[1]))
        last = model.decoder[-1]
        last.weight.view(64, 17, -1)[2:] = 0
        last.weight.view(64, 17, -1)[:2] *= 3  # a posterior that is far from flat
        if prior == "mog":
            model.mog_means.copy_(torch.tensor([[-2.0], [0.5], [2.5]]))
            model.mog_logvars.copy_(torch.tensor([[-1.0], [0.0], [-2.0]]))
            model.mog_logits.copy_(torch.tensor([0.0, 1.0, -0.5]))
    return model.eval()


GRID = torch.linspace(-10, 10, 2001)  # quadrature nodes of a 1-D latent


def quadrature(model, x):
    """By quadrature on GRID (GRID x GRID with two layers): log p(x) and the ELBO of each image,
    the ELBO as the integral of q(z | x) [log p(x, z) - log q(z | x)]."""
    dz = float(GRID[1] - GRID[0])
    log_p, elbo = [], []
    with torch.no_grad():
        for image in x:
            if model.config.stochastic_layers == 1:
                z = GRID[:, None]  # (G, 1)
                log_joint = model.log_prior(z) + model.log_likelihood(model.decoder_logits(z)[None], image[None])[0]
                mean, logvar = model.encoder_top(model.encoder_input(image[None]))
                log_q = log_normal(z, mean, logvar)
                area = dz
            else:
                coarse = GRID[::16]  # z2, z1 on a 251 x 251 grid
                z2 = coarse[:, None, None].expand(-1, len(coarse), 1)  # (G, G, 1)
                z1 = coarse[None, :, None].expand(len(coarse), -1, 1)
                log_joint = (model.log_prior(z2) + log_normal(z1, *model.prior_z1(z2))
                             + model.log_likelihood(model.decoder_logits(torch.cat([z1, z2], -1)), image[None]))
                mean2, logvar2 = model.encoder_top(model.encoder_input(image[None]))
                mean1, logvar1 = model.encoder_z1(torch.cat([model.encoder_input(image[None]).expand(
                    len(coarse), len(coarse), -1), z2], -1))
                log_q = log_normal(z2, mean2, logvar2) + log_normal(z1, mean1, logvar1)
                log_joint, log_q, area = log_joint.flatten(), log_q.flatten(), float(coarse[1] - coarse[0]) ** 2
            log_p.append(torch.logsumexp(log_joint, 0) + math.log(area))
            q = torch.exp(log_q) * area
            assert q.sum().item() == pytest.approx(1.0, abs=2e-3)  # the grid holds q's mass
            elbo.append((q * (log_joint - log_q)).sum() / q.sum())
    return torch.stack(log_p), torch.stack(elbo)


def images(seed=0, n=3):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 17, (n, 64), generator=generator).float()


@pytest.mark.parametrize("prior,layers", [(p, 1) for p in PRIORS] + [("vampprior", 2)])
def test_elbo_and_iwae_bound_against_the_quadrature_likelihood(prior, layers):
    """The Monte Carlo ELBO matches its integral; log p(x) >= ELBO; the IWAE bound equals -ELBO at
    K = 1, decreases in K on average, stays above the true NLL and reaches it at large K."""
    model, x = two_pixel_model(prior, layers), images()
    log_p, elbo = quadrature(model, x)
    assert (log_p > elbo + 0.05).all()  # q is not the posterior: a real gap
    torch.manual_seed(1)
    with torch.no_grad():
        log_w = model.log_weights(x, 5000)  # (5000, 3)
        standard_error = log_w.std(0) / math.sqrt(len(log_w))
        assert (log_w.mean(0) - elbo).abs().max() < 4 * standard_error.max() + 1e-3
        repeats = {k: model.iwae_nll(x.repeat(1000, 1), k).view(1000, len(x)) for k in (1, 3, 10, 30)}
        big = model.iwae_nll(x, 20000)
    true_nll = -log_p
    bounds = {k: r.mean(0) for k, r in repeats.items()}  # the expected bound, over 1000 repeats
    errors = {k: r.std(0) / math.sqrt(len(r)) for k, r in repeats.items()}
    assert torch.allclose(bounds[1], -elbo, atol=4 * errors[1].max().item())
    for small, large in ((1, 3), (3, 10), (10, 30)):
        assert bounds[small].mean() > bounds[large].mean(), (small, large)  # decreases in K on average
    for k in bounds:
        assert (bounds[k] >= true_nll - 4 * errors[k]).all(), k
    assert torch.allclose(big, true_nll, atol=0.06)  # one draw of the K = 20000 bound
    assert (model.iwae_bound(log_w[:1]) == -log_w[0]).all()  # K = 1 is exactly -log w


def test_iwae_bound_in_chunks_is_the_bound_of_all_draws(monkeypatch):
    """log_weights splits the K draws into chunks (memory): the same shape and, within Monte Carlo
    error, the same mean as one call."""
    model, x = two_pixel_model("standard"), images(n=4)
    with torch.no_grad():
        torch.manual_seed(0)
        whole = model.log_weights(x, 64)
        monkeypatch.setattr(vae_script, "IWAE_CHUNK", 8)  # 2 draws of the 4 images per chunk
        torch.manual_seed(0)
        chunked = model.log_weights(x, 64)
        assert chunked.shape == whole.shape == (64, 4)
        assert torch.allclose(chunked.mean(0), whole.mean(0), atol=4 * (whole.std(0) / 8).max().item())
        assert (model.iwae_bound(chunked) <= -chunked.mean(0) + 1e-5).all()  # IWAE <= -ELBO, same draws


@pytest.mark.parametrize("prior,layers", [(p, 1) for p in PRIORS] + [("mog", 2)])
def test_samples_follow_the_model_marginal_of_a_pixel(prior, layers):
    """True samples: the frequencies of pixel 0 over many samples match the model's marginal
    p(x_0) = integral of p(z) p(x_0 | z) dz, by quadrature."""
    model = two_pixel_model(prior, layers, seed=3)
    with torch.no_grad():
        if layers == 1:
            z = GRID[:, None]
            log_prior = model.log_prior(z)
        else:
            coarse = GRID[::16]
            z2 = coarse[:, None, None].expand(-1, len(coarse), 1)
            z1 = coarse[None, :, None].expand(len(coarse), -1, 1)
            z = torch.cat([z1, z2], -1).reshape(-1, 2)
            log_prior = (model.log_prior(z2) + log_normal(z1, *model.prior_z1(z2))).flatten()
        weights = torch.softmax(log_prior, 0)  # quadrature weights of p(z)
        marginal = weights @ torch.softmax(model.decoder_logits(z)[:, 0], -1)  # (17,)
        torch.manual_seed(0)
        samples = model.sample(20000)
    assert samples.shape == (20000, 64) and torch.equal(samples, samples.round())
    frequencies = torch.bincount(samples[:, 0].long(), minlength=17).float() / len(samples)
    assert (frequencies - marginal).abs().sum() / 2 < 0.02  # total variation
    # pixels that do not depend on z follow their constant categorical
    constant = torch.softmax(model.decoder[-1].bias.view(64, 17)[5], 0)
    assert (torch.bincount(samples[:, 5].long(), minlength=17) / len(samples) - constant).abs().sum() / 2 < 0.02


def test_kl_warmup_leaves_the_prior_untouched_at_step_zero_and_reaches_weight_one():
    torch.manual_seed(0)
    model = VAE.build(latent=2, hidden=16, prior="mog", components=3, kl_warmup=4, dropout=0.0)
    optimizer = model.configure_optimizer(1e-2)
    x = images(n=8)
    before = model.mog_means.detach().clone()
    values = model.train_step(x, None, optimizer)  # KL weight 0: the prior gets no gradient
    assert torch.equal(model.mog_means, before) and model.kl_weight() == 0.25
    rec, kl = model.terms(x)
    assert values["KL"] > 0 and math.isfinite(values["loss"])
    model.train_step(x, None, optimizer)
    assert not torch.equal(model.mog_means, before)
    for _ in range(3):
        model.train_step(x, None, optimizer)
    assert model.kl_weight() == 1.0 and int(model.steps) == 5


def test_reconstruction_and_interpolation_pictures():
    model = two_pixel_model("vampprior")
    splits = dict(test=images(n=40))
    pictures = model.extra_images(splits)
    rows, nrow = pictures["reconstructions"]
    assert rows.shape == (64, 64) and nrow == 8
    assert torch.equal(rows[:8], splits["test"][:8]) and torch.equal(rows[16:24], splits["test"][8:16])
    means = model.pixel_means(model.decoder_logits(model.encode_means(splits["test"][:8])))
    assert torch.allclose(rows[8:16], means)
    strips, nrow = pictures["interpolations"]
    assert strips.shape == (80, 64) and nrow == 10
    strips = strips.view(8, 10, 64)
    assert torch.equal(strips[:, 0], splits["test"][:8]) and torch.equal(strips[:, -1], splits["test"][8:16])
    assert torch.allclose(strips[:, 1], model.pixel_means(model.decoder_logits(model.encode_means(splits["test"][:8]))))
    assert torch.allclose(strips[:, 8], model.pixel_means(model.decoder_logits(model.encode_means(splits["test"][8:16]))), atol=1e-5)
    assert rows.min() >= 0 and rows.max() <= 16


# --- the script ------------------------------------------------------------------------------


def test_smoke_every_output_and_sample_only_with_more_importance_samples(tmp_path):
    from PIL import Image

    assert run_main(vae_script.main, TINY + ["--out", str(tmp_path)]) == 0
    metrics = check_outputs(tmp_path, "VAE", "upper_bound")
    assert metrics["test_nll_nats"] < 64 * math.log(17) * 1.2 and metrics["iwae_samples"] == 20
    assert metrics["test_neg_elbo_nats"] > metrics["test_nll_nats"]  # IWAE (K = 20) below the -ELBO
    assert metrics["test_neg_elbo_nats"] == pytest.approx(metrics["test_reconstruction_nats"] + metrics["test_kl_nats"])
    for picture in ("reconstructions", "interpolations"):
        with Image.open(tmp_path / f"VAE_{picture}.png") as image:
            assert image.size[0] > 64
    samples = np.load(tmp_path / "VAE_samples.npy")
    assert np.array_equal(samples, samples.round())  # pixels drawn from the categoricals
    assert run_main(vae_script.main, TINY + ["--out", str(tmp_path), "--sample-only", "--evaluate",
                                             "--iwae-samples", "7"]) == 0
    again = json.loads((tmp_path / "VAE_metrics.json").read_text())
    assert again["iwae_samples"] == 7 and again["epochs_run"] == metrics["epochs_run"]
    assert np.array_equal(np.load(tmp_path / "VAE_samples.npy"), samples)


def test_resumed_run_ends_with_the_same_history_as_a_straight_one(tmp_path):
    flags = TINY + ["--prior", "mog", "--stochastic-layers", "2", "--kl-warmup", "20", "--dropout", "0.1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_main(vae_script.main, flags + ["--epochs", "3", "--out", str(straight)]) == 0
    assert run_main(vae_script.main, flags + ["--epochs", "2", "--out", str(resumed)]) == 0
    assert run_main(vae_script.main, flags + ["--epochs", "3", "--resume", "--out", str(resumed)]) == 0
    history = [torch.load(d / "VAE_resume.pt", weights_only=True)["state"]["history"] for d in (straight, resumed)]
    assert history[0] == history[1] and len(history[0]["train"]) == 3 and "KL" in history[0]


def test_bad_prior_is_a_usage_error(capsys):
    assert run_main(vae_script.main, TINY + ["--prior", "flat"]) == 2
    assert "vampprior" in capsys.readouterr().err


def test_conv_decoder_puts_each_pixels_logits_at_its_raster_position():
    torch.manual_seed(0)
    model = VAE.build(latent=3, decoder="conv", channels=4).eval()
    z = torch.randn(2, 5, 3)
    logits = model.decoder_logits(z)  # (2, 5, 64, 17)
    grid = model.decoder.net(model.decoder.project(z.reshape(-1, 3)).view(-1, 4, 4, 4))  # (10, 17, 8, 8)
    for row, col in ((0, 0), (0, 7), (3, 5), (7, 1)):
        assert torch.allclose(logits.reshape(10, 64, 17)[:, row * 8 + col], grid[:, :, row, col])
    assert model.log_weights(images(n=2), 3).shape == (3, 2)


# --- the conditional model (CVAE) ------------------------------------------------------------


@pytest.mark.parametrize("prior,layers", [("standard", 1), ("vampprior", 1), ("mog", 2)])
def test_conditional_prior_samples_and_class_log_likelihoods(prior, layers):
    """p(z | y) is a distribution over class y's components only; samples have the asked count and
    shape; the bound depends on y; class_log_likelihoods is the IWAE bound of each class with the
    same noise (CLASSIFY_SAMPLES draws)."""
    torch.manual_seed(0)
    model = VAE.build(conditional=True, latent=2, hidden=16, channels=4, prior=prior, components=20,
                      stochastic_layers=layers).eval()
    x, y = images(n=4), torch.tensor([0, 3, 7, 9])
    if prior != "standard":
        weights = model.top_prior_params(y)[2].exp()  # (4, 20)
        assert torch.allclose(weights.sum(1), torch.ones(4))
        assert (weights[model.component_classes()[None] != y[:, None]] == 0).all()
    with torch.no_grad():
        samples = model.sample(6, torch.tensor([3, 3, 7, 7, 1, 0]))
        assert samples.shape == (6, 64) and torch.equal(samples, samples.round())
        torch.manual_seed(1)
        nll = model.test_nll(x, y)
        torch.manual_seed(1)
        assert not torch.allclose(nll, model.test_nll(x, (y + 1) % 10))
        torch.manual_seed(2)
        scores = model.class_log_likelihoods(x)
        assert scores.shape == (4, 10)
        for c in (0, 5):
            torch.manual_seed(2)
            seed = int(torch.randint(2**31 - 1, ()))
            torch.manual_seed(seed)
            expected = -model.iwae_nll(x, vae_script.CLASSIFY_SAMPLES, torch.full((4,), c))
            assert torch.allclose(scores[:, c], expected)


def test_conditional_smoke_run_draws_the_asked_digits(tmp_path):
    flags = TINY + ["--components", "10", "--conditional", "--digits", "3,7", "--out", str(tmp_path)]
    assert run_main(vae_script.main, flags) == 0
    check_conditional_outputs(tmp_path, "VAE", (3, 7), "upper_bound")


def test_conditional_prior_needs_a_component_per_class(capsys):
    assert run_main(vae_script.main, TINY + ["--conditional"]) == 2  # TINY has 5 components
    assert "--components" in capsys.readouterr().err
