"""SBGM: the SDEs' perturbation kernels against simulation, the probability-flow ODE likelihood
against analytic densities, the box posterior against quadrature, the samplers against a
Gaussian, and smoke tests of the script."""

import dataclasses
import math

import pytest
import torch

import common
import score_based_generative_model as sbgm_script
from conftest import check_conditional_outputs, check_outputs, guided_samples, run_main
from score_based_generative_model import (SBGM, VESDE, VPSDE, at_time, ode_log_likelihood, sample_dpm_solver,
                                          sample_probability_flow, sample_reverse_sde)

SDES = dict(vp=VPSDE(), ve=VESDE())
EXACT_PRIOR_SDES = dict(vp=VPSDE(), ve=VESDE(sigma_max=1000.0))  # N(0, prior_var) ~ the marginal at t = 1


def gaussian_eps(sde, mean, cov):
    """Exact noise prediction for data y ~ N(mean, cov): z_t ~ N(alpha mean, alpha^2 cov + sigma^2 I),
    eps = -sigma score = sigma (alpha^2 cov + sigma^2 I)^-1 (z - alpha mean)."""
    variances, basis = torch.linalg.eigh(cov)  # cov = basis diag(variances) basis^T

    def eps_fn(z, t):
        alpha, sigma = sde.marginal(t)
        inverse = 1 / (alpha[:, None] ** 2 * variances + sigma[:, None] ** 2)  # (B, d) in the eigenbasis
        return sigma[:, None] * (((z - alpha[:, None] * mean) @ basis) * inverse) @ basis.T

    return eps_fn


def random_gaussian(d, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mean = 0.5 * torch.randn(d, generator=generator, dtype=torch.float64)
    factor = torch.randn(d, d, generator=generator, dtype=torch.float64) / math.sqrt(d)
    return mean, 0.1 * factor @ factor.T + 0.02 * torch.eye(d, dtype=torch.float64)  # full covariance


@pytest.mark.parametrize("name", sorted(SDES))
def test_perturbation_kernel_matches_simulated_forward_sde(name):
    """Euler-Maruyama of dz = f z dt + g dW from fixed y: the particles' mean and std at several
    times match alpha_t y and sigma_t."""
    sde = SDES[name]
    torch.manual_seed(0)
    y = torch.tensor([-1.0, 0.2, 0.9], dtype=torch.float64)
    z = y.repeat(10000, 1)  # (particles, 3)
    steps, checks = 1000, {200: None, 500: None, 1000: None}
    dt = 1.0 / steps
    for i in range(steps):
        t = torch.tensor(i * dt, dtype=torch.float64)
        f, g2 = sde.coefficients(t)
        z = z + f * z * dt + (g2 * dt).sqrt() * torch.randn_like(z)
        if i + 1 in checks:
            checks[i + 1] = z.clone()
    for step, particles in checks.items():
        alpha, sigma = sde.marginal(torch.tensor(step * dt, dtype=torch.float64))
        standard_error = sigma / math.sqrt(len(particles))
        assert torch.allclose(particles.mean(0), alpha * y, atol=5 * standard_error)
        assert torch.allclose(particles.std(0), sigma.expand(3), rtol=0.03)


@pytest.mark.parametrize("name", sorted(SDES))
def test_kernel_closed_forms_are_consistent_with_the_coefficients(name):
    """d log alpha / dt = f and d sigma^2 / dt = 2 f sigma^2 + g^2; time_of_log_snr inverts log_snr."""
    sde = SDES[name]
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    h = 1e-6
    alpha_plus, sigma_plus = sde.marginal(t + h)
    alpha_minus, sigma_minus = sde.marginal(t - h)
    _, sigma = sde.marginal(t)
    f, g2 = sde.coefficients(t)
    assert torch.allclose((alpha_plus.log() - alpha_minus.log()) / (2 * h), f, rtol=1e-5, atol=1e-7)
    assert torch.allclose((sigma_plus**2 - sigma_minus**2) / (2 * h), 2 * f * sigma**2 + g2, rtol=1e-5)
    assert torch.allclose(sde.time_of_log_snr(sde.log_snr(t)), t, rtol=1e-9)
    alpha, sigma = sde.marginal(t)
    assert torch.allclose(sde.log_snr(t), (alpha**2 / sigma**2).log(), rtol=1e-9)


def gaussian_divergence(sde, cov):
    """tr(d eps / d z) of gaussian_eps: sigma * sum_i 1 / (alpha^2 lambda_i + sigma^2)."""
    variances = torch.linalg.eigvalsh(cov)

    def divergence(t):
        alpha, sigma = sde.marginal(t)
        return sigma * (1 / (alpha[:, None] ** 2 * variances + sigma[:, None] ** 2)).sum(1)

    return divergence


@pytest.mark.parametrize("name", sorted(SDES))
def test_exact_and_hutchinson_divergence_match_the_analytic_trace(name):
    sde, d = SDES[name], 64
    mean, cov = random_gaussian(d)
    eps_fn, divergence = gaussian_eps(sde, mean, cov), gaussian_divergence(sde, cov)
    torch.manual_seed(0)
    z = torch.randn(3, d, dtype=torch.float64)
    t = torch.tensor([1e-3, 0.2, 0.7], dtype=torch.float64)
    eps, exact = common.value_and_divergence(eps_fn, z, t, "exact")
    assert torch.allclose(eps, eps_fn(z, t)) and torch.allclose(exact, divergence(t), rtol=1e-10)
    probes = 4000  # Hutchinson: unbiased, its mean over probes converges to the trace
    _, estimate = common.value_and_divergence(eps_fn, z.repeat_interleave(probes, 0), t.repeat_interleave(probes), "hutchinson")
    estimate = estimate.view(3, probes)
    standard_error = estimate.std(1) / math.sqrt(probes)
    assert ((estimate.mean(1) - divergence(t)).abs() < 4 * standard_error + 1e-9).all()


@pytest.mark.parametrize("output", ["levels", "eps"])
def test_exact_divergence_of_the_model_is_the_autograd_trace_and_hutchinson_its_mean(output):
    """The exact path of the likelihood (jacfwd under vmap through the network and the box posterior,
    common.value_and_divergence) runs batched (no vmap fallback for a missing batching rule) and equals
    the trace of reverse-mode autograd's Jacobian of eps; Hutchinson's estimate averages to it."""
    import warnings

    torch.manual_seed(0)
    model = SBGM.build(output=output, hidden=32, blocks=1).double().eval()
    torch.nn.init.normal_(model.net.out.weight, std=0.3)  # not the uniform start: a real dependence on z
    x0 = model.to_pm1(common.load_splits(torch.device("cpu"), quick=True)["val"][:2].double())
    t = torch.tensor([1e-3, 0.4], dtype=torch.float64)
    alpha, sigma = model.sde.marginal(t)
    z = alpha[:, None] * x0 + sigma[:, None] * torch.randn_like(x0)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*batching rule.*")
        with torch.no_grad():
            value, exact = common.value_and_divergence(model.eps, z, t, "exact")
    trace = torch.stack([torch.autograd.functional.jacobian(
        lambda row: model.eps(row[None], t[i:i + 1])[0], z[i], vectorize=True).trace() for i in range(2)])
    assert torch.allclose(value, model.eps(z, t), atol=1e-12)
    assert torch.allclose(exact, trace, rtol=1e-8, atol=1e-8), (exact, trace)
    probes = 2000
    _, estimate = common.value_and_divergence(model.eps, z.repeat_interleave(probes, 0),
                                              t.repeat_interleave(probes), "hutchinson")
    estimate = estimate.view(2, probes)
    standard_error = estimate.std(1) / math.sqrt(probes)
    assert ((estimate.mean(1) - trace).abs() < 4 * standard_error + 1e-9).all()


@pytest.mark.parametrize("name", sorted(SDES))
def test_ode_log_likelihood_with_exact_gaussian_score_matches_the_density(name):
    """With the exact score of N(mean, cov) (full covariance) and its exact divergence, the
    probability-flow ODE's log-likelihood equals the analytic log-density of the perturbed data at
    t_eps. (With the default sigma_max = 10 the VE prior N(0, 101 I) differs from the marginal at
    t = 1 by ~0.4 nats here, so the VE case takes sigma_max = 1000.)"""
    sde, d, t_eps = EXACT_PRIOR_SDES[name], 64, 1e-5
    mean, cov = random_gaussian(d)
    eps_fn, divergence = gaussian_eps(sde, mean, cov), gaussian_divergence(sde, cov)
    torch.manual_seed(1)
    y = mean + torch.randn(6, d, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    alpha, sigma = sde.marginal(torch.tensor(t_eps, dtype=torch.float64))
    exact = torch.distributions.MultivariateNormal(alpha * mean, alpha**2 * cov + sigma**2 * torch.eye(d,
                                                   dtype=torch.float64)).log_prob(y)
    log_p = ode_log_likelihood(lambda z, t: (eps_fn(z, t), divergence(t)), sde, y, t_eps, steps=48)
    assert torch.allclose(log_p, exact, atol=0.1), (log_p - exact)
    coarse = ode_log_likelihood(lambda z, t: (eps_fn(z, t), divergence(t)), sde, y, t_eps, steps=8)
    assert not torch.allclose(coarse, exact, atol=0.1)  # the tolerance can fail


def test_box_posterior_matches_quadrature():
    """E[eps | x~] (common.box_posterior with alpha = 1, sigma = sigma~) for a pixel whose value has
    probabilities softmax(logits) and is uniform in its box, against numerical integration over y, at
    noise levels from far below to far above the box width."""
    torch.manual_seed(0)
    logits = torch.randn(17, dtype=torch.float64) * 2
    probs = logits.softmax(0)
    y = torch.linspace(-1 - 1 / 16, 1 + 1 / 16, 200001, dtype=torch.float64)  # quadrature grid
    density = probs[((y + 1 + 1 / 16) * 8).floor().clamp(0, 16).long()]  # piecewise constant prior
    for sigma in (1e-3, 0.02, 0.3, 5.0):
        x_tilde = torch.tensor([-1.5, -1.0, -0.9375, 0.01, 0.5626, 1.06, 2.0], dtype=torch.float64)
        log_weight = density.log() - 0.5 * ((x_tilde[:, None] - y) / sigma) ** 2  # (7, grid)
        weight = torch.softmax(log_weight, dim=1)  # normalised in log space: no 0 / 0 far from the boxes
        expected = (weight * (x_tilde[:, None] - y) / sigma).sum(1)
        got = common.box_posterior(logits.expand(1, 7, 17), x_tilde[None], torch.ones(1, dtype=torch.float64),
                                   torch.tensor([sigma], dtype=torch.float64)).mean_noise[0]
        assert torch.allclose(got, expected, atol=2e-3, rtol=1e-3), (sigma, got, expected)


@pytest.mark.parametrize("name", sorted(SDES))
def test_untrained_levels_model_is_uniform_over_the_17_values(name):
    """The zero-initialised output layer gives every value probability 1/17, and the box posterior
    makes that the exact score of y uniform on [-17/16, 17/16] (the union of the 17 boxes). So the
    ODE log-likelihood at t_eps equals the analytic log-density of that uniform smoothed by the
    kernel (per pixel (Phi((y~ + 17/16) / sigma~) - Phi((y~ - 17/16) / sigma~)) / (alpha 17/8),
    y~ = y / alpha, sigma~ = sigma / alpha; 8/17 away from the edges), the variational bound is near
    64 ln 17 on any digits, and the samples are uniform over 0..16. The ODE needs the prior to be
    the marginal at t = 1, hence EXACT_PRIOR_SDES (measured with the default VE prior: 0.3 nats
    off). Each pixel's eps depends on that pixel only, so the Jacobian is diagonal and Hutchinson's
    r^T J r = sum_i J_ii r_i^2 is the exact divergence (and far cheaper than the exact path here)."""
    torch.manual_seed(0)
    model = SBGM.build(sde=name, hidden=16, blocks=1, ode_steps=64, sampler="heun", sample_steps=200).double().eval()
    x = common.load_splits(torch.device("cpu"), quick=True)["val"][:8].double()
    with torch.no_grad():
        bound = torch.stack([model.bound(x.repeat(250, 1)).mean() for _ in range(4)]).mean()
        samples = model.float().sample(400)
        model.double().sde = sde = EXACT_PRIOR_SDES[name]  # the output is 0: the net ignores the log-SNR range
        y = model.to_pm1(x)
        log_p = ode_log_likelihood(lambda z, t: common.value_and_divergence(model.eps, z, t, "hutchinson"), sde, y,
                                   model.config.t_eps, model.sampling.ode_steps)
    alpha, sigma = sde.marginal(torch.tensor(model.config.t_eps, dtype=torch.float64))
    half, normal = 17 / 16, torch.distributions.Normal(0.0, 1.0)
    per_pixel = (normal.cdf((y / alpha + half) * alpha / sigma) - normal.cdf((y / alpha - half) * alpha / sigma))
    exact = (per_pixel / (2 * half * alpha)).log().sum(1)  # (8,)
    assert torch.allclose(log_p, exact, atol=0.05), log_p - exact  # measured: under 0.03 with 64 RK4 steps
    assert (-exact - common.PM1_LOGDET - 64 * math.log(17)).abs().max() < 1.0  # ~64 ln 17 as a bound
    assert bound.item() == pytest.approx(64 * math.log(17), abs=3.0)
    assert torch.equal(samples, samples.round()) and samples.min() >= 0 and samples.max() <= 16
    assert samples.mean().item() == pytest.approx(8.0, abs=0.1)
    # 200 Heun steps to t_eps: with 50, Heun's steps overshoot the edges of [-17/16, 17/16] and
    # the values 0 and 16 are drawn ~20% too often (std 5.04)
    assert samples.std().item() == pytest.approx(math.sqrt((17**2 - 1) / 12), abs=0.05)


@pytest.mark.parametrize("name", sorted(SDES))
@pytest.mark.parametrize("sampler", ["sde", "heun", "sde+corrector"])
def test_samplers_with_exact_gaussian_score_recover_the_gaussian(name, sampler):
    sde, d, t_eps = SDES[name], 4, 1e-3
    mean, cov = random_gaussian(d, seed=3)
    eps_fn = gaussian_eps(sde, mean, cov)
    torch.manual_seed(4)
    z1 = torch.randn(4000, d, dtype=torch.float64) * math.sqrt(sde.prior_var())
    if sampler == "heun":
        z, t = sample_probability_flow(eps_fn, sde, z1, t_eps, steps=60)
    else:
        z, t = sample_reverse_sde(eps_fn, sde, z1, t_eps, steps=500,
                                  corrector_steps=1 if sampler == "sde+corrector" else 0)
    alpha, sigma = sde.marginal(t[0])
    y = z / alpha
    std = cov.diagonal().sqrt()
    assert torch.allclose(y.mean(0), mean, atol=4 * std.max().item() / math.sqrt(len(y)) + 0.01)
    assert torch.allclose(torch.cov(y.T), cov, atol=0.02)


@pytest.mark.parametrize("name", sorted(SDES))
def test_dpm_solver_follows_the_closed_form_probability_flow_of_a_gaussian(name):
    """For data N(mean, cov), cov = B diag(v) B^T, the probability-flow ODE in z~ = z / alpha and
    s = log(sigma / alpha) is dz~/ds = z~ - E[x0 | z] = e^2s (cov + e^2s I)^-1 (z~ - mean), solved by
    z~(s) = mean + B diag(sqrt((v + e^2s) / (v + e^2s1))) B^T (z~(s1) - mean). DPM-Solver++(2M) with
    the exact eps lands on it, and its error falls as the square of the step (x4 per halving; its
    first-order DDIM step alone gives x2)."""
    sde, d = SDES[name], 6
    mean, cov = random_gaussian(d, seed=5)
    variances, basis = torch.linalg.eigh(cov)
    torch.manual_seed(6)
    z1 = torch.randn(50, d, dtype=torch.float64) * math.sqrt(sde.prior_var())
    s1, s_end = -0.5 * at_time(sde.log_snr, 1.0), math.log(0.05)
    x1 = z1 / at_time(lambda t: sde.marginal(t)[0], 1.0)
    ratio = ((variances + math.exp(2 * s_end)) / (variances + math.exp(2 * s1))).sqrt()
    exact = mean + (((x1 - mean) @ basis) * ratio) @ basis.T
    errors = []
    for steps in (16, 32, 64, 128):
        x = sample_dpm_solver(gaussian_eps(sde, mean, cov), sde, z1, s_end, steps)
        errors.append((x - exact).abs().max().item())
    assert errors[-1] < 1e-3, errors
    assert all(3.0 < coarse / fine < 5.0 for coarse, fine in zip(errors[1:], errors[2:])), errors
    ddim = [(sample_dpm_solver(gaussian_eps(sde, mean, cov), sde, z1, s_end, steps, order=1) - exact).abs().max()
            for steps in (64, 128)]
    assert 1.5 < ddim[0] / ddim[1] < 2.5 and ddim[1] > 3 * errors[-1]  # the test can tell the orders apart


def test_smoke_every_output(tmp_path):
    assert run_main(sbgm_script.main, ["--quick", "--no-progress", "--out", str(tmp_path),
                                       "--hidden", "16", "--blocks", "1"]) == 0
    metrics = check_outputs(tmp_path, "SBGM", "upper_bound")
    assert metrics["test_nll_nats"] < 64 * math.log(17) * 1.2
    assert metrics["test_variational_bound_nats"] < 64 * math.log(17) * 1.2
    # another sampler on the same checkpoint: settings are not part of the configuration
    assert run_main(sbgm_script.main, ["--quick", "--no-progress", "--out", str(tmp_path), "--hidden", "16",
                                       "--blocks", "1", "--sample-only", "--sampler", "sde"]) == 0


def test_smoke_ve_eps_exact_divergence_sde_sampler_with_corrector(tmp_path):
    assert run_main(sbgm_script.main, ["--quick", "--no-progress", "--out", str(tmp_path), "--hidden", "16",
                                       "--blocks", "1", "--sde", "ve", "--output", "eps", "--divergence", "exact",
                                       "--sampler", "sde", "--corrector-steps", "1"]) == 0
    check_outputs(tmp_path, "SBGM", "upper_bound")


def test_bad_t_eps_exits_2(tmp_path):
    assert run_main(sbgm_script.main, ["--quick", "--out", str(tmp_path), "--t-eps", "1.5"]) == 2


@pytest.mark.parametrize("level", ["1e-6", "20"])
def test_denoise_at_outside_the_sde_exits_2(tmp_path, capsys, level):
    """--denoise-at below sigma~ at t_eps or above it at t = 1 (VE: about 1.2e-4 and 10), named in
    one line; the other samplers never stop early, so the flag does not bind them."""
    assert run_main(sbgm_script.main, ["--quick", "--out", str(tmp_path), "--denoise-at", level]) == 2
    assert "argument --denoise-at: expected a noise level in" in capsys.readouterr().err


def test_denoise_at_binds_only_the_dpm_sampler(tmp_path, capsys):
    """A --t-eps whose noise level lies above the default --denoise-at is legal for the samplers
    that run to t_eps (VP at t_eps = 0.1: sigma / alpha about 0.34 > 0.2)."""
    flags = ["--quick", "--no-progress", "--out", str(tmp_path), "--sde", "vp", "--t-eps", "0.1", "--epochs", "1",
             "--hidden", "16", "--blocks", "1"]
    assert run_main(sbgm_script.main, flags + ["--sampler", "dpm"]) == 2
    assert "--denoise-at" in capsys.readouterr().err
    assert run_main(sbgm_script.main, flags + ["--sampler", "heun"]) == 0


def test_an_unknown_sampler_or_order_is_refused():
    model = SBGM.build(hidden=16, blocks=1).eval()
    with pytest.raises(ValueError, match="unknown sampler 'ode'; choose from dpm, heun, sde"):
        model.sample(2, sampling=dataclasses.replace(model.sampling, sampler="ode"))
    with pytest.raises(ValueError, match="order 3"):
        sample_dpm_solver(model.eps, model.sde, torch.zeros(2, 64), math.log(0.2), 2, order=3)


def test_dpm_sampler_denoises_at_its_stopping_level():
    """The dpm sampler's network calls run down the grid of sigma / alpha from t = 1 to --denoise-at,
    and the last call, Tweedie's E[x0 | z], is made at that level (not at t_eps)."""
    model = SBGM.build(hidden=16, blocks=1).eval()
    levels = []

    def recording_eps(z, t, y=None):
        alpha, sigma = model.sde.marginal(t)
        levels.append((sigma / alpha)[0].item())
        return torch.zeros_like(z)

    model.eps = recording_eps
    for denoise_at, steps in ((0.2, 8), (0.05, 3)):
        levels.clear()
        model.sample(4, sampling=dataclasses.replace(model.sampling, denoise_at=denoise_at, sample_steps=steps))
        assert len(levels) == steps + 1
        assert levels[-1] == pytest.approx(denoise_at, rel=1e-4)
        assert all(a > b for a, b in zip(levels, levels[1:]))  # down the grid, one call a step


def test_other_samplers_are_the_odes_at_other_step_counts():
    """samplers() gives DPM-Solver++ with 4 and 16 steps and Heun with 20 (not the default
    itself), each the same draw as sample() with that sampler and count."""
    model = SBGM.build(hidden=16, blocks=1).eval()
    assert set(model.samplers()) == {"dpm_4", "dpm_16", "heun_20"}
    for name, sampler, steps in (("dpm_4", "dpm", 4), ("heun_20", "heun", 20)):
        other = SBGM(model.config, dataclasses.replace(model.sampling, sampler=sampler, sample_steps=steps))
        other.load_state_dict(model.state_dict())
        assert name not in other.samplers() and len(other.samplers()) == 2
        torch.manual_seed(3)
        expected = other.sample(16)
        torch.manual_seed(3)
        assert torch.equal(model.samplers()[name](16), expected)


# --- conditional model (--conditional) --------------------------------------------------


def conditional_sbgm(**overrides):
    """A tiny conditional SBGM with a random output layer, so that the class changes eps (the
    zero output layer of an untrained one would ignore it)."""
    torch.manual_seed(0)
    model = SBGM.build(conditional=True, hidden=16, blocks=1, **overrides).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.net.out.weight, std=0.3)
    return model


def test_unconditional_model_has_no_class_parameters():
    """The default model is p(x): no class embedding (its weights and random draws are those of
    the code before --conditional)."""
    assert not any("classes" in name for name in SBGM.build(hidden=16, blocks=1).state_dict())
    assert conditional_sbgm().net.embedding.classes.weight.shape == (11, 128)


@pytest.mark.parametrize("sampler", ["dpm", "heun", "sde"])
def test_guidance_zero_is_the_plain_conditional_sampler(sampler):
    """w = 0 draws exactly what the sampler with eps(z, t, y) alone draws; w > 0 differs, and
    the samples have the asked labels' count and shape."""
    model = conditional_sbgm(sampler=sampler, sample_steps=5)
    y = torch.tensor([3, 7, 3, 7, 0])
    guided_zero = guided_samples(model, y, 0.0)
    plain = conditional_sbgm(sampler=sampler, sample_steps=5)
    plain.guided_eps = lambda labels, weight: (lambda z, t: plain.eps(z, t, labels))
    torch.manual_seed(5)
    assert torch.equal(plain.sample(5, y), guided_zero)
    assert guided_zero.shape == (5, 64) and set(guided_zero.unique().tolist()) <= set(range(17))
    assert not torch.equal(guided_samples(model, y, 1.0), guided_zero)


@pytest.mark.parametrize("divergence", ["hutchinson", "exact"])
def test_conditional_nll_depends_on_the_class_of_each_row(divergence):
    """test_nll(x, y) (the ODE, with either divergence) changes with y; with the exact divergence
    (random only in the dequantization) changing row 1's class changes row 1's NLL alone, across
    chunks: each class travels with its image."""
    model = conditional_sbgm(ode_steps=1, divergence=divergence, output="eps")  # eps: a quick exact divergence
    x = torch.randint(0, 17, (3, 64)).float()
    torch.manual_seed(1)
    nll = model.test_nll(x, torch.tensor([3, 5, 3]), chunk=2)
    torch.manual_seed(1)
    other = model.test_nll(x, torch.tensor([3, 8, 3]), chunk=2)
    assert not torch.allclose(other[1], nll[1])
    if divergence == "exact":
        assert torch.equal(other[[0, 2]], nll[[0, 2]])


def test_class_log_likelihoods_is_minus_the_variational_bound_given_each_class():
    """(B, 10), column c an unbiased estimate of -E[bound(x, c)] (Monte Carlo, 5 standard errors)."""
    model = conditional_sbgm()
    x = torch.randint(0, 17, (2, 64)).float()
    torch.manual_seed(2)
    scores = model.class_log_likelihoods(x.repeat(100, 1), draws=4).view(100, 2, 10)
    assert scores.shape == (100, 2, 10)
    for c in (0, 4):
        with torch.no_grad():
            bounds = torch.stack([model.bound(x.repeat(200, 1), torch.full((400,), c)) for _ in range(2)])
        bounds = bounds.view(-1, 2)
        estimate = -scores[..., c].mean(0)
        standard_error = (scores[..., c].var(0) / 100 + bounds.var(0) / len(bounds)).sqrt()
        assert ((estimate - bounds.mean(0)).abs() < 5 * standard_error).all()


def test_smoke_conditional_run_writes_the_conditional_files(tmp_path):
    assert run_main(sbgm_script.main, ["--quick", "--no-progress", "--out", str(tmp_path), "--hidden", "16",
                                       "--blocks", "1", "--conditional", "--digits", "3,7"]) == 0
    check_conditional_outputs(tmp_path, "SBGM", (3, 7), "upper_bound")


def test_conditional_runs_default_to_their_own_dpm_steps_and_a_given_count_stays():
    assert SBGM.build().sampling.sample_steps == sbgm_script.SAMPLE_STEPS["dpm"] == 8
    assert SBGM.build(conditional=True).sampling.sample_steps == sbgm_script.CONDITIONAL_SAMPLE_STEPS["dpm"] == 6
    assert SBGM.build(conditional=True, sampler="heun").sampling.sample_steps == sbgm_script.SAMPLE_STEPS["heun"]
    assert SBGM.build(conditional=True, sample_steps=3).sampling.sample_steps == 3
