"""DDPM: the forward process against its chain, the posterior against Gaussian conditioning, the
discretized decoder's normalisation, the bound against known entropies, both samplers on a known
distribution, the hybrid loss, and a smoke test of the script."""

import json
import math

import pytest
import torch

import common
import ddpm as ddpm_script
from conftest import check_conditional_outputs, check_outputs, guided_samples, run_main
from ddpm import DDPM, discretized_gaussian_log_prob, gaussian_kl, make_betas


TINY = ["--quick", "--no-progress", "-T", "20", "--hidden", "16", "--blocks", "1"]


def tiny_ddpm(**overrides):
    torch.manual_seed(0)
    config = dict(num_steps=50, schedule="linear", hidden=16, blocks=1)
    return DDPM.build(**{**config, **overrides}).eval()


def delta_prior(model, image):
    """Make the grid denoiser's prior a point mass on `image` (64 pixels 0..16); the MLP's last
    layer starts at zero, so the model's eps is then the exact eps of that one-image distribution."""
    with torch.no_grad():
        model.prior_logits.fill_(-60.0)
        model.prior_logits.scatter_(1, image.long().view(-1, 1), 60.0)
    return model


# --- forward process and posterior --------------------------------------------------


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_q_xt_given_x0_matches_t_steps_of_the_forward_chain(schedule):
    """x_s = sqrt(1 - beta_s) x_{s-1} + sqrt(beta_s) eps_s for s = 1..t has mean sqrt(abar_t) x_0
    and variance 1 - abar_t: the closed form q_sample uses (Monte Carlo, 4 standard errors)."""
    model = tiny_ddpm(schedule=schedule)
    betas = make_betas(schedule, 50)
    torch.manual_seed(1)
    x0 = torch.tensor([-1.0, -0.5, 0.25, 1.0]).repeat(20000, 1)  # (N, 4)
    x, n = x0.double(), len(x0)
    for step in range(50):
        x = (1 - betas[step]).sqrt() * x + betas[step].sqrt() * torch.randn_like(x)
        if step in (0, 9, 49):
            t = torch.full((n,), step)
            closed = model.q_sample(x0, t, torch.randn_like(x0)).double()
            for sample in (x, closed):
                mean, var = sample.mean(0), sample.var(0)
                expected_var = 1 - model.abar[step].double()
                se_mean = (expected_var / n).sqrt()
                se_var = expected_var * math.sqrt(2 / (n - 1))
                assert ((mean - model.abar[step].double().sqrt() * x0[0]).abs() < 4 * se_mean).all()
                assert ((var - expected_var).abs() < 4 * se_var).all()


def test_schedules_end_near_pure_noise_and_increase():
    for schedule in ("linear", "cosine"):
        for steps in (10, 1000):
            betas = make_betas(schedule, steps)
            abar = torch.cumprod(1 - betas, 0)
            assert betas.min() > 0 and betas.max() <= 0.999 and (betas[1:] >= betas[:-1]).all()
            assert abar[-1] < 1e-3
    ends = torch.tensor([1e-4, 0.02], dtype=torch.float64)
    assert torch.allclose(make_betas("linear", 1000)[[0, -1]], ends)


def test_posterior_matches_gaussian_conditioning_and_monte_carlo():
    """q(x_{t-1} | x_t, x_0): (x_{t-1}, x_t) given x_0 is jointly Gaussian with
    Var x_{t-1} = 1 - abar_{t-1}, Var x_t = 1 - abar_t, Cov = sqrt(alpha_t) (1 - abar_{t-1}), so
    the conditional mean is sqrt(abar_{t-1}) x_0 + Cov / Var x_t (x_t - sqrt(abar_t) x_0) and the
    variance Var x_{t-1} - Cov^2 / Var x_t. Also by sampling: the residual x_{t-1} - mean has
    mean 0, the closed-form variance, and no correlation with x_t."""
    model = tiny_ddpm(schedule="cosine")
    abar = torch.cumprod(1 - make_betas("cosine", 50), 0)  # float64 oracle
    torch.manual_seed(2)
    n = 50000
    x0 = torch.tensor([-1.0, 0.0, 0.625, 1.0]).repeat(n, 1)
    for step in (1, 5, 25, 49):
        a_prev, a_t = abar[step - 1], abar[step]
        alpha = a_t / a_prev
        cov, var_t, var_prev = alpha.sqrt() * (1 - a_prev), 1 - a_t, 1 - a_prev
        xt = torch.randn(n, 4, dtype=torch.float64) * var_t.sqrt() + a_t.sqrt() * x0.double()
        oracle_mean = a_prev.sqrt() * x0.double() + cov / var_t * (xt - a_t.sqrt() * x0.double())
        oracle_var = var_prev - cov ** 2 / var_t
        t = torch.full((n,), step)
        mean, log_var = model.q_posterior(x0, xt.float(), t)
        assert torch.allclose(mean.double(), oracle_mean, atol=1e-5)
        assert torch.allclose(log_var.double(), oracle_var.log().expand(n, 4), atol=1e-4)
        # Monte Carlo: x_{t-1} ~ q(x_{t-1} | x_0), x_t ~ q(x_t | x_{t-1})
        prev = model.q_sample(x0, t - 1, torch.randn_like(x0))
        xt = alpha.sqrt().float() * prev + (1 - alpha).sqrt().float() * torch.randn_like(prev)
        mean, log_var = model.q_posterior(x0, xt, t)
        residual = (prev - mean).double()
        var = log_var[0].exp().double()
        se = (var / n).sqrt()
        assert (residual.mean(0).abs() < 4 * se).all()
        assert ((residual.var(0) / var - 1).abs() < 4 * math.sqrt(2 / n)).all()
        corr = ((residual - residual.mean(0)) * (xt - xt.mean(0))).mean(0) / (residual.std(0) * xt.std(0))
        assert corr.abs().max() < 4 / math.sqrt(n)


def test_gaussian_kl_and_prior_kl_match_torch_distributions():
    torch.manual_seed(3)
    m1, m2, lv1, lv2 = torch.randn(4, 10).double()
    Normal = torch.distributions.Normal
    expected = torch.distributions.kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    assert torch.allclose(gaussian_kl(m1, lv1, m2, lv2), expected)
    model = tiny_ddpm()
    x0 = torch.rand(3, 64) * 2 - 1
    abar = model.abar[-1]
    q = Normal(abar.sqrt() * x0, (1 - abar).sqrt())
    expected = torch.distributions.kl_divergence(q, Normal(0.0, 1.0)).sum(1)
    assert torch.allclose(model.prior_kl(x0), expected, atol=1e-6)


# --- discretized decoder -------------------------------------------------------------


def test_decoder_bin_probabilities_sum_to_one_and_match_the_cdf():
    torch.manual_seed(4)
    grid = torch.arange(17.0) / 8 - 1  # (17,) bin centres
    mean = torch.cat([torch.rand(200) * 3 - 1.5, torch.tensor([-1.0, 1.0, 0.0, 5.0, -5.0])])  # (205,)
    log_var = torch.cat([torch.rand(200) * 14 - 12, torch.tensor([-20.0, -20.0, 4.0, -10.0, -3.0])])
    log_p = discretized_gaussian_log_prob(grid, mean[:, None], log_var[:, None])  # (205, 17)
    assert torch.isfinite(log_p).all() and (log_p <= 0).all()
    assert torch.allclose(log_p.exp().sum(1), torch.ones(205), atol=1e-5)
    # float64 CDF differences: the edge bins reach +-infinity
    std = (0.5 * log_var.double()).exp()[:, None]
    edges = torch.cat([torch.tensor([-math.inf]), grid[:-1].double() + 1 / 16, torch.tensor([math.inf])])
    cdf = torch.special.ndtr((edges - mean.double()[:, None]) / std)  # (205, 18)
    probs = cdf[:, 1:] - cdf[:, :-1]
    assert torch.allclose(log_p.exp().double(), probs, atol=1e-6)
    # far tails stay finite and accurate: 1 - Phi(z) ~ phi(z) / z
    far = discretized_gaussian_log_prob(torch.tensor([1.0]), torch.tensor([0.0]),
                                        torch.tensor([math.log(0.01 ** 2)]))  # bin [15/16, inf), std 0.01
    z = (1 - 1 / 16) / 0.01
    assert far.item() == pytest.approx(-z ** 2 / 2 - math.log(z * math.sqrt(2 * math.pi)), rel=1e-3)


# --- the bound -------------------------------------------------------------------------


def test_bound_is_near_zero_for_a_point_mass_and_large_elsewhere():
    """With eps exact for a one-image distribution and the fixed variances beta~_t, every KL
    vanishes and p(x_0 | x_1) (std sqrt(beta~_2) = 0.011 for T = 500, bins +-1/16) puts almost all
    mass on the right bins: bound ~ 0 for that image, large for any other."""
    image = torch.randint(0, 17, (64,)).float()
    model = delta_prior(tiny_ddpm(num_steps=500, variance="fixed"), image)
    with torch.no_grad():
        assert model.test_nll(image.expand(8, -1)).max() < 0.01
        other = image.clone()
        other[:5] = (other[:5] + 8) % 17
        assert model.test_nll(other[None]).item() > 100


def test_bound_of_the_exact_uniform_denoiser_converges_to_the_entropy_from_above():
    """Untrained model = the exact Bayes denoiser of i.i.d. uniform pixels over the 17 levels.
    On images drawn from that distribution the mean bound is >= its entropy 64 ln 17
    (cross-entropy >= entropy), and the gap, from discretising time with fixed variances, shrinks
    about as 1 / T (measured: 25 nats at T = 500, 11 at T = 1000, 0.7-1.3 standard error)."""
    entropy = 64 * math.log(17)
    torch.manual_seed(5)
    x = torch.randint(0, 17, (100, 64)).float()
    gaps = {}
    for steps in (500, 1000):
        model = tiny_ddpm(num_steps=steps, variance="fixed")
        with torch.no_grad():
            gaps[steps] = model.test_nll(x).mean().item() - entropy
    assert 0 < gaps[1000] < 0.6 * gaps[500] and gaps[1000] < 15

# --- samplers --------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
def test_both_samplers_reproduce_a_point_mass(sampler):
    image = torch.randint(0, 17, (64,)).float()
    # T = 500: the decoder's std sqrt(beta~_2) = 0.011 is far below the bin half-width 1/16
    model = delta_prior(tiny_ddpm(num_steps=500, variance="fixed", sampler=sampler, ddim_steps=10), image)
    torch.manual_seed(6)
    with torch.no_grad():
        samples = model.sample(16)
    assert samples.shape == (16, 64) and torch.equal(samples, image.expand(16, -1))


def test_ddim_follows_the_exact_trajectory_of_a_point_mass():
    """For one image x0*, eps is exact and DDIM keeps eps^ = (x_T - sqrt(abar_T) x0*) / sqrt(1 - abar_T)
    fixed: its continuous output is x0* itself for any number of steps (T = 50: abar_1 = 0.998,
    so a missing 1 / sqrt(abar) would show)."""
    image = torch.randint(0, 17, (64,)).float()
    model = delta_prior(tiny_ddpm(variance="fixed"), image)
    torch.manual_seed(10)
    with torch.no_grad():
        for steps in (1, 7, 50):
            x0 = model.ddim(torch.randn(8, 64), steps)
            # atol: float32 error divided by sqrt(abar_T) in the one-step case
            assert torch.allclose(x0, common.pixels_to_pm1(image).expand(8, -1), atol=1e-4)


def test_samples_are_pixel_levels_from_an_untrained_model():
    for sampler in ("ancestral", "ddim"):
        model = tiny_ddpm(sampler=sampler)
        with torch.no_grad():
            samples = model.sample(32)
        assert samples.shape == (32, 64) and torch.equal(samples, samples.round())
        assert samples.min() >= 0 and samples.max() <= 16


def test_ddim_uses_the_requested_number_of_network_calls():
    model = tiny_ddpm(ddim_steps=7)
    calls = []
    model.net.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        model.sample(4)
    assert len(calls) == 7


def test_ddim_steps_default_depends_on_conditional_and_a_given_value_stays():
    assert DDPM.build().sampling.ddim_steps == ddpm_script.DDIM_STEPS[False] == 50
    assert DDPM.build(conditional=True).sampling.ddim_steps == ddpm_script.DDIM_STEPS[True] == 25
    assert DDPM.build(conditional=True, ddim_steps=7).sampling.ddim_steps == 7


# --- hybrid loss -----------------------------------------------------------------------


def test_hybrid_loss_trains_the_mean_by_l_simple_only():
    """The L_vlb term reaches the variance output only: gradients on the eps half of the last
    layer are those of L_simple alone."""
    x = torch.randint(0, 17, (32, 64)).float()
    grads = {}
    for weight in (0.0, 10.0):
        model = tiny_ddpm(vlb_weight=weight).train()
        torch.nn.init.normal_(model.net.out.weight, std=0.1)
        torch.manual_seed(7)
        model.loss(x, None).backward()
        grads[weight] = model.net.out.weight.grad.clone()
    assert torch.allclose(grads[0.0][:64], grads[10.0][:64], atol=1e-6)
    assert grads[0.0][64:].abs().max() == 0 and grads[10.0][64:].abs().max() > 0


def test_training_steps_follow_the_uniform_log_uniform_mixture():
    """p(t) = f ln((t + 1) / t) / ln(T + 1) + (1 - f) / T: normalised, uniform for f = 0, and the
    loss draws its steps from it (frequencies over 20000 draws, 5 standard errors)."""
    assert torch.allclose(tiny_ddpm(log_t_frac=0.0).time_probs, torch.full((50,), 1 / 50))
    model = tiny_ddpm(log_t_frac=0.5)
    probs = model.time_probs.double()
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert probs[0].item() == pytest.approx(0.5 * math.log(2) / math.log(51) + 0.5 / 50, rel=1e-6)
    drawn = []
    model.net.register_forward_hook(lambda module, inputs, output: drawn.append(inputs[1]))
    torch.manual_seed(9)
    with torch.no_grad():
        for _ in range(10):
            model.loss(torch.zeros(2000, 64), None)
    counts = torch.bincount(torch.cat(drawn), minlength=50).double()
    n = counts.sum()
    assert ((counts / n - probs).abs() < 5 * (probs * (1 - probs) / n).sqrt()).all()


def test_fixed_variance_loss_is_the_simple_mse():
    model = tiny_ddpm(variance="fixed").train()
    x = torch.randint(0, 17, (16, 64)).float()
    torch.manual_seed(8)
    loss = model.loss(x, None)
    torch.manual_seed(8)
    t = torch.multinomial(model.time_probs, 16, replacement=True)
    noise = torch.randn(16, 64)
    eps, _ = model.network(model.q_sample(common.pixels_to_pm1(x), t, noise), t)
    assert loss.item() == pytest.approx(((eps - noise) ** 2).mean().item(), rel=1e-6)


# --- script ----------------------------------------------------------------------------


def test_smoke_every_output_and_sample_only_with_the_other_sampler(tmp_path):
    assert run_main(ddpm_script.main, TINY + ["--out", str(tmp_path)]) == 0
    metrics = check_outputs(tmp_path, "DDPM", "upper_bound")
    assert metrics["test_nll_nats"] < 64 * math.log(17) * 1.5
    assert metrics["sampling"] == dict(sampler="ddim", ddim_steps=10, guidance=ddpm_script.DDPMSampling().guidance)
    small = dict(num_steps=20, hidden=16, blocks=1)  # benchmark.py --samplers: the sampler --sampler did not choose
    assert list(ddpm_script.DDPM.build(**small).samplers()) == ["ancestral"]
    assert list(ddpm_script.DDPM.build(**small, sampler="ancestral").samplers()) == ["ddim"]
    assert metrics["num_samples"] == 64
    assert run_main(ddpm_script.main, TINY + ["--out", str(tmp_path), "--sample-only", "--evaluate",
                                              "--sampler", "ancestral"]) == 0
    again = json.loads((tmp_path / "DDPM_metrics.json").read_text())
    assert again["sampling"]["sampler"] == "ancestral"
    assert again["test_nll_nats"] == pytest.approx(metrics["test_nll_nats"])  # same weights, same seed


# --- conditional model (--conditional) --------------------------------------------------


def conditional_ddpm(**overrides):
    """A tiny conditional DDPM whose output layer and per-class grid priors are random, so that
    the class changes eps (untrained, the zero output layer and zero priors would ignore it)."""
    model = tiny_ddpm(conditional=True, **overrides)
    with torch.no_grad():
        torch.nn.init.normal_(model.net.out.weight, std=0.3)
        torch.nn.init.normal_(model.prior_logits, std=1.0)
    return model


def test_unconditional_model_has_no_class_parameters():
    """The default model is p(x): no class embedding and one grid prior (its weights and random
    draws are those of the code before --conditional)."""
    names = set(tiny_ddpm().state_dict())
    assert not any("classes" in name for name in names) and tiny_ddpm().prior_logits.shape == (64, 17)
    conditional = tiny_ddpm(conditional=True)
    assert conditional.prior_logits.shape == (11, 64, 17)
    assert conditional.net.embedding.classes.weight.shape == (11, 128)


@pytest.mark.parametrize("sampler", ["ddim", "ancestral"])
def test_guidance_zero_is_the_plain_conditional_sampler(sampler):
    """w = 0 draws exactly what the sampler with eps(x_t, t, y) alone draws; w > 0 differs, and
    the samples have the asked labels' count and shape."""
    model = conditional_ddpm(sampler=sampler)
    y = torch.tensor([3, 7, 3, 7, 0])
    guided_zero = guided_samples(model, y, 0.0)
    plain = conditional_ddpm(sampler=sampler)
    plain.guided_network = lambda xt, t, labels: plain.network(xt, t, labels)
    torch.manual_seed(5)
    assert torch.equal(plain.sample(5, y), guided_zero)
    assert guided_zero.shape == (5, 64) and set(guided_zero.unique().tolist()) <= set(range(17))
    assert not torch.equal(guided_samples(model, y, 1.0), guided_zero)


def test_conditional_nll_depends_on_the_class_and_class_log_likelihoods_match_it():
    """test_nll(x, y) changes with y; class_log_likelihoods with every step taken exactly (no
    strata) is -test_nll(x, c) for each c with the same draws, and by default gives (B, 10)."""
    model = conditional_ddpm(num_steps=20)
    x = torch.randint(0, 17, (4, 64)).float()
    three, five = (torch.full((4,), c) for c in (3, 5))
    torch.manual_seed(1)
    nll_three = model.test_nll(x, three)
    torch.manual_seed(1)
    assert not torch.allclose(model.test_nll(x, five), nll_three)
    torch.manual_seed(2)
    scores = model.class_log_likelihoods(x, exact=20, strata=0)
    assert scores.shape == (4, 10)
    for c in range(10):
        torch.manual_seed(2)
        assert torch.allclose(scores[:, c], -model.test_nll(x, torch.full((4,), c)), rtol=1e-5)
    assert model.class_log_likelihoods(x).shape == (4, 10)


def test_smoke_conditional_run_writes_the_conditional_files(tmp_path):
    assert run_main(ddpm_script.main, TINY + ["--out", str(tmp_path), "--conditional", "--digits", "3,7"]) == 0
    check_conditional_outputs(tmp_path, "DDPM", (3, 7), "upper_bound")
