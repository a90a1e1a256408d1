"""FM: the box posterior against quadrature, the exact divergence against autograd's Jacobian, the
ODE likelihood against closed-form densities (Gaussian to Gaussian, and the untrained model's
smoothed uniform), the samplers against a Gaussian, and smoke, resume and sample-only runs."""

import json
import math

import pytest
import torch

import common
import flow_matching as fm_script
from conftest import check_conditional_outputs, check_outputs, guided_samples, run_main
from flow_matching import FM, ode_log_likelihood, sample_ode

TINY = ["--quick", "--no-progress", "--hidden", "16", "--blocks", "1"]


def random_gaussian(d, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mean = 0.5 * torch.randn(d, generator=generator, dtype=torch.float64)
    factor = torch.randn(d, d, generator=generator, dtype=torch.float64) / math.sqrt(d)
    return mean, 0.1 * factor @ factor.T + 0.02 * torch.eye(d, dtype=torch.float64)  # full covariance


def gaussian_velocity(mean, cov):
    """The exact flow-matching velocity E[y - x_0 | x_t] for y ~ N(mean, cov): x_t ~ N(t mean, S_t),
    S_t = t^2 cov + (1 - t)^2 I, v = mean + (1/2) S_t' S_t^-1 (x - t mean), diagonal in cov's eigenbasis."""
    variances, basis = torch.linalg.eigh(cov)

    def velocity(x, t):
        t = t[:, None]
        rate = (t * variances - (1 - t)) / (t**2 * variances + (1 - t) ** 2)  # (B, d)
        return mean + (((x - t * mean) @ basis) * rate) @ basis.T

    return velocity


def gaussian_marginal(mean, cov, t):
    d = len(mean)
    return torch.distributions.MultivariateNormal(t * mean, t**2 * cov + (1 - t) ** 2 * torch.eye(d, dtype=cov.dtype))


def test_log_ndtr_matches_torch_in_both_tails():
    x = torch.linspace(-60, 60, 4001, dtype=torch.float64)
    assert torch.allclose(common.log_ndtr(x), torch.special.log_ndtr(x), rtol=1e-12, atol=1e-14)


def test_box_posterior_matches_quadrature():
    """The head's posterior means, common.box_posterior with x_t = t x_1 + (1 - t) x_0: E[x_1 | x_t] and
    E[x_0 | x_t] when the value has probabilities softmax(logits) and x_1 is uniform in its box, against
    numerical integration over x_1, from t near 0 to t near 1."""
    torch.manual_seed(0)
    logits = torch.randn(17, dtype=torch.float64) * 2
    probs = logits.softmax(0)
    y = torch.linspace(-1 - 1 / 16, 1 + 1 / 16, 400001, dtype=torch.float64)  # quadrature grid
    density = probs[((y + 1 + 1 / 16) * 8).floor().clamp(0, 16).long()]
    x = torch.tensor([-2.0, -1.0, -0.9375, 0.01, 0.5626, 1.06, 1.5], dtype=torch.float64)
    for t in (1e-3, 0.1, 0.5, 0.9, 0.999):
        log_weight = density.log() - 0.5 * ((x[:, None] - t * y) / (1 - t)) ** 2  # (7, grid)
        weight = torch.softmax(log_weight, dim=1)
        expected_y = (weight * y).sum(1)
        time = torch.tensor([t], dtype=torch.float64)
        posterior = common.box_posterior(logits.expand(1, 7, 17), x[None], time, 1 - time)
        mean_y, mean_x0 = posterior.mean_data, posterior.mean_noise
        assert torch.allclose(mean_y[0], expected_y, atol=1e-4), (t, mean_y, expected_y)
        assert torch.allclose(mean_x0[0], (x - t * expected_y) / (1 - t), atol=1e-4 / (1 - t))


@pytest.mark.parametrize("output", ["levels", "velocity"])
def test_exact_divergence_equals_autograd_jacobian_trace(output):
    """common.value_and_divergence on velocity_for_divergence (levels: the head linearised at its input)
    gives velocity's value and the trace of its full Jacobian from reverse-mode autograd, from t = 0 to
    t near 1."""
    torch.manual_seed(0)
    model = FM.build(output=output, hidden=32, blocks=1).double().eval()
    torch.nn.init.normal_(model.net.out.weight, std=0.3)  # not the uniform start: a real dependence on x
    y = model.to_pm1(common.load_splits(torch.device("cpu"), quick=True)["val"][:2].double())
    for time in (0.0, 0.3, 0.6, 1 - 1e-5):
        t = torch.full((2,), time, dtype=torch.float64)
        x = time * y + (1 - time) * torch.randn_like(y)
        with torch.no_grad():
            value, divergence = common.value_and_divergence(model.velocity_for_divergence, x, t, "exact")
        trace = torch.stack([torch.autograd.functional.jacobian(
            lambda row: model.velocity(row[None], t[:1])[0], x[i], vectorize=True).trace() for i in range(2)])
        assert torch.allclose(value, model.velocity(x, t), atol=1e-12)
        assert torch.allclose(divergence, trace, rtol=1e-8, atol=1e-6), (time, divergence, trace)


def test_ode_likelihood_of_gaussian_flow_matches_the_density():
    """With the exact velocity of N(0, I) -> N(mean, cov) (full covariance, d = 64) and its exact
    divergence, the ODE's log-likelihood equals the analytic log-density of the path's marginal at T,
    and doubling the steps moves it by less than 0.1 nats."""
    d, end = 64, 1 - 1e-5
    mean, cov = random_gaussian(d)
    velocity = gaussian_velocity(mean, cov)
    torch.manual_seed(1)
    y = mean + torch.randn(6, d, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    exact = gaussian_marginal(mean, cov, end).log_prob(y)

    def log_p(steps):
        return ode_log_likelihood(lambda x, t: common.value_and_divergence(velocity, x, t, "exact"), y, end, steps)

    assert torch.allclose(log_p(16), exact, atol=0.05)  # measured: 0.013
    assert torch.allclose(log_p(32), log_p(16), atol=0.1)
    assert not torch.allclose(log_p(4), exact, atol=0.1)  # the tolerance can fail (measured: 2.6)


def test_untrained_levels_model_likelihood_is_the_smoothed_uniform_and_samples_are_uniform():
    """The zero output layer gives every value probability 1/17, so the velocity is the exact one of y
    uniform on [-17/16, 17/16]: the ODE log-likelihood at T equals the analytic density of
    T y + (1 - T) x_0, per pixel (Phi((x + T H) / (1 - T)) - Phi((x - T H) / (1 - T))) / (2 H T),
    H = 17/16; the variational bound is near 64 ln 17; samples are uniform over 0..16."""
    torch.manual_seed(0)
    model = FM.build(hidden=16, blocks=1).double().eval()
    x = common.load_splits(torch.device("cpu"), quick=True)["val"][:3].double()
    y = model.to_pm1(x)
    end, half = 1 - 1e-3, 17 / 16
    normal = torch.distributions.Normal(0.0, 1.0)
    exact = ((normal.cdf((y + end * half) / (1 - end)) - normal.cdf((y - end * half) / (1 - end)))
             / (2 * half * end)).log().sum(1)
    with torch.no_grad():
        log_p = ode_log_likelihood(
            lambda z, t: common.value_and_divergence(model.velocity_for_divergence, z, t, "exact"), y, end, 16)
        bound = model.bound(x.repeat(300, 1)).mean()
        samples = model.float().sample_with(1000, "midpoint", 8)
    assert torch.allclose(log_p, exact, atol=0.05), log_p - exact  # measured: 0.012
    assert bound.item() == pytest.approx(64 * math.log(17), abs=3.0)
    assert torch.equal(samples, samples.round()) and samples.min() >= 0 and samples.max() <= 16
    assert samples.mean().item() == pytest.approx(8.0, abs=0.1)
    assert samples.std().item() == pytest.approx(math.sqrt((17**2 - 1) / 12), abs=0.1)


@pytest.mark.parametrize("method,steps", [("euler", 200), ("midpoint", 20)])
def test_samplers_with_exact_gaussian_velocity_recover_the_gaussian(method, steps):
    d = 4
    mean, cov = random_gaussian(d, seed=3)
    torch.manual_seed(4)
    x0 = torch.randn(4000, d, dtype=torch.float64)
    y = sample_ode(gaussian_velocity(mean, cov), x0, steps, method, t_end=1 - 1e-6)
    std = cov.diagonal().sqrt()
    assert torch.allclose(y.mean(0), mean, atol=4 * std.max().item() / math.sqrt(len(y)) + 0.01)
    assert torch.allclose(torch.cov(y.T), cov, atol=0.02)
    coarse = sample_ode(gaussian_velocity(mean, cov), x0, 1, "euler", t_end=1 - 1e-6)
    assert not torch.allclose(torch.cov(coarse.T), cov, atol=0.02)  # one step lands on the mean: can fail


def test_one_euler_step_lands_on_the_posterior_mean():
    """x_1 = x_0 + v(x_0, 0) = E[y | x_0] at t = 0: the prior mean sum_k p_k c_k of each pixel."""
    torch.manual_seed(0)
    model = FM.build(hidden=16, blocks=1).double().eval()
    torch.nn.init.normal_(model.net.out.weight, std=0.5)
    x0 = torch.randn(5, 64, dtype=torch.float64)
    t = torch.zeros(5, dtype=torch.float64)
    with torch.no_grad():
        logits, _ = model.logits_and_time(x0, t)
        centers = common.pixels_to_pm1(torch.arange(17, dtype=torch.float64))
        prior_mean = (logits.softmax(-1) * centers).sum(-1)
        landed = sample_ode(model.velocity, x0, 1, "euler")
    assert torch.allclose(landed, prior_mean, atol=1e-3)


def test_smoke_every_output_and_sample_only_with_another_sampler(tmp_path):
    assert run_main(fm_script.main, TINY + ["--out", str(tmp_path)]) == 0
    metrics = check_outputs(tmp_path, "FM", "upper_bound")
    assert metrics["test_nll_nats"] < 64 * math.log(17) * 1.2
    assert metrics["test_variational_bound_nats"] < 64 * math.log(17) * 1.2
    samples = (tmp_path / "FM_samples.npy").read_bytes()
    assert run_main(fm_script.main, TINY + ["--out", str(tmp_path), "--sample-only"]) == 0
    assert (tmp_path / "FM_samples.npy").read_bytes() == samples  # the same seed, the same samples
    assert run_main(fm_script.main, TINY + ["--out", str(tmp_path), "--sample-only", "--evaluate",
                                            "--sampler", "euler", "--sample-steps", "2"]) == 0
    again = json.loads((tmp_path / "FM_metrics.json").read_text())
    assert again["sampling"]["sampler"] == "euler"
    assert again["test_nll_nats"] == pytest.approx(metrics["test_nll_nats"])  # same weights, same NLL seed
    assert (tmp_path / "FM_samples.npy").read_bytes() != samples


def test_resume_continues_like_an_uninterrupted_run(tmp_path):
    flags = TINY + ["--time-sampling", "uniform", "--output", "velocity"]
    flags += ["--val-every", "1"]  # a run validates its last epoch: the 2-epoch run's 2nd as well
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_main(fm_script.main, flags + ["--out", str(straight), "--epochs", "3"]) == 0
    assert run_main(fm_script.main, flags + ["--out", str(resumed), "--epochs", "2"]) == 0
    assert run_main(fm_script.main, flags + ["--out", str(resumed), "--epochs", "3", "--resume"]) == 0
    a, b = (torch.load(out / "FM.pt", weights_only=True) for out in (straight, resumed))
    assert a["history"] == b["history"] and a["weights_sha256"] == b["weights_sha256"]


def test_bad_ode_end_exits_2(tmp_path, capsys):
    assert run_main(fm_script.main, TINY + ["--out", str(tmp_path), "--ode-end", "1.5"]) == 2
    assert "--ode-end" in capsys.readouterr().err


# --- the conditional model (--conditional)


def tiny_conditional_fm(**sampling):
    torch.manual_seed(0)
    model = FM.build(conditional=True, hidden=16, blocks=1, **sampling).double().eval()
    torch.nn.init.normal_(model.net.out.weight, std=0.3)  # not the uniform start: a real dependence on x and y
    return model


def test_unconditional_model_has_no_class_parameters():
    assert not any("classes" in name for name, _ in FM.build().named_parameters())
    assert any("classes" in name for name, _ in FM.build(conditional=True).named_parameters())


def test_guidance_zero_is_the_plain_conditional_sampler_and_guidance_changes_the_samples():
    model = tiny_conditional_fm().float()
    y = torch.tensor([0, 3, 7, 9])
    torch.manual_seed(5)
    x0 = torch.randn(4, 64)
    with torch.no_grad():
        plain = sample_ode(lambda x, t: model.velocity(x, t, y), x0, model.sampling.sample_steps, "midpoint")
    plain = torch.floor((plain + 1) * 8 + 0.5).clamp(0, 16)
    assert torch.equal(guided_samples(model, y, 0.0), plain)
    assert not torch.equal(guided_samples(model, y, 2.0), plain)


def test_conditional_nll_depends_on_the_class_and_is_row_by_row():
    """test_nll(x, y): the exact divergence vmapped with each row's own class; another class, another NLL."""
    model = tiny_conditional_fm()
    x = common.load_splits(torch.device("cpu"), quick=True)["val"][:2].double()
    y = torch.tensor([1, 2])
    with torch.no_grad():
        x1 = model.to_pm1(x)
        together = model.ode_nll(x1, y, 1, "exact")
        alone = torch.cat([model.ode_nll(x1[i:i + 1], y[i:i + 1], 1, "exact") for i in range(2)])
        other = model.ode_nll(x1, (y + 5) % 10, 1, "exact")
    assert torch.allclose(together, alone, atol=1e-9)
    assert (together - other).abs().min() > 1e-3


def test_class_log_likelihoods_hutchinson_is_unbiased_and_shares_its_noise_across_classes():
    """The classifier's estimate: over many probes its mean is the exact-divergence NLL on the same
    steps; with the class embedding made equal for every class, the ten columns are identical
    (the same dequantization and the same probes for every class)."""
    model = tiny_conditional_fm(classify_steps=1)
    x = common.load_splits(torch.device("cpu"), quick=True)["val"][:2].double()
    y = torch.tensor([3, 8])
    torch.manual_seed(0)
    with torch.no_grad():
        x1 = model.to_pm1(x)
        exact = model.ode_nll(x1, y, 1, "exact")
        probes = model.ode_nll(x1.repeat(200, 1), y.repeat(200), 1, "hutchinson").view(200, 2)
        assert torch.allclose(probes.mean(0), exact, atol=4 * probes.std(0).max().item() / math.sqrt(200))
        assert model.class_log_likelihoods(x).shape == (2, 10)
        model.net.embedding.classes.weight.copy_(model.net.embedding.classes.weight[:1].expand(11, -1))
        same = model.class_log_likelihoods(x)
    assert torch.equal(same, same[:, :1].expand(2, 10))


def test_conditional_smoke_writes_the_conditional_files(tmp_path):
    assert run_main(fm_script.main, TINY + ["--out", str(tmp_path), "--conditional", "--digits", "3,7",
                                            "--guidance", "1"]) == 0
    check_conditional_outputs(tmp_path, "FM", (3, 7), "upper_bound")
