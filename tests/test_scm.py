"""ScM: the denoising score matching loss and annealed Langevin dynamics against Gaussians with
known scores, a score network trained on Gaussian data against the analytic score, and a smoke
test of the script."""

import json

import pytest
import torch

import common
import score_matching as scm_script
from conftest import check_conditional_outputs, check_outputs, guided_samples, run_main
from score_matching import ScoreMatching, annealed_langevin, dsm_loss, geometric_sigmas

TINY = ["--quick", "--no-progress", "--hidden", "16", "--blocks", "1"]


def gaussian_score(mu, var, sigmas):
    """Exact score of N(mu, diag(var)) convolved with N(0, sigma_i^2 I): -(x - mu) / (var + sigma_i^2)."""
    def score(x, levels):  # (B, D), (B,) -> (B, D)
        return -(x - mu) / (var + sigmas[levels].unsqueeze(1) ** 2)
    return score


def test_geometric_sigmas():
    sigmas = geometric_sigmas(1.0, 0.01, 10)
    assert sigmas.shape == (10,) and sigmas[0].item() == pytest.approx(1.0) and sigmas[-1].item() == pytest.approx(0.01)
    ratios = sigmas[1:] / sigmas[:-1]
    assert torch.allclose(ratios, torch.full((9,), 0.01 ** (1 / 9)), rtol=1e-5)
    assert geometric_sigmas(1.0, 0.1, 1).tolist() == pytest.approx([0.1])


def test_dsm_loss_of_the_exact_score_is_the_analytic_minimum_and_an_error_costs_sigma2_over_2():
    """Data N(mu, diag(v)): at the exact score of the noisy data the loss is
    1/2 sum_d v_d / (v_d + sigma^2), and (Vincent 2011) adding an error c to the score adds
    sigma^2 |c|^2 / 2 to the loss (here c = shift / sigma, so the excess is |shift|^2 / 2)."""
    torch.manual_seed(0)
    mu = torch.tensor([0.3, -0.5, 0.0], dtype=torch.float64)
    var = torch.tensor([0.2, 0.05, 1.0], dtype=torch.float64)
    sigmas = torch.tensor([1.0, 0.3, 0.05], dtype=torch.float64)
    exact = gaussian_score(mu, var, sigmas)
    shift = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    n = 200_000
    for i, sigma in enumerate(sigmas.tolist()):
        y = mu + var.sqrt() * torch.randn(n, 3, dtype=torch.float64)
        noise = torch.randn(n, 3, dtype=torch.float64)
        levels = torch.full((n,), i)
        loss = dsm_loss(exact, y, sigmas, levels, noise).mean().item()
        assert loss == pytest.approx(0.5 * (var / (var + sigma ** 2)).sum().item(), rel=0.01)
        shifted = dsm_loss(lambda x, lv: exact(x, lv) + shift / sigma, y, sigmas, levels, noise).mean().item()
        assert shifted - loss == pytest.approx(0.5 * (shift ** 2).sum().item(), rel=0.01)


def test_zero_score_network_gives_half_the_dimension():
    """With the network's output layer zeroed, s = 0 and every level's loss is E|z|^2 / 2 = 32."""
    torch.manual_seed(0)
    model = ScoreMatching.build(hidden=16, blocks=1)
    torch.nn.init.zeros_(model.net.out.weight)
    torch.nn.init.zeros_(model.net.out.bias)
    x = torch.randint(0, 17, (2000, 64)).float()
    with torch.no_grad():
        per_level = model.loss_per_level(x)
    levels = ScoreMatching.Config().noise_levels
    assert per_level.shape == (levels,)
    assert torch.allclose(per_level, torch.full((levels,), 32.0), rtol=0.02)


def test_input_scale_is_the_spread_of_the_training_images():
    """The network sees x~ / sqrt(sigma_data^2 + sigma^2), about unit variance at every level:
    DATA_SCALE is the root mean square distance of the training pixels ([-1, 1]) from the mean image."""
    train = common.pixels_to_pm1(common.load_splits("cpu")["train"].double())
    rms = (train - train.mean(0)).pow(2).mean().sqrt().item()
    assert scm_script.DATA_SCALE == pytest.approx(rms, abs=0.005)


def test_largest_noise_level_is_about_the_largest_distance_between_training_images():
    """Song & Ermon 2020, technique 1: sigma_max near the largest pairwise distance of the data."""
    train = common.pixels_to_pm1(common.load_splits("cpu")["train"].double())
    largest = torch.cdist(train, train).max().item()  # 9.6
    assert 0.9 < ScoreMatching.Config().sigma_max / largest < 1.2


def test_learned_score_matches_the_analytic_score_of_gaussian_data():
    """Train the score network on a correlated 2-D Gaussian N(mu, C): at each level its score on
    the noisy data N(mu, C + sigma^2 I) is within 2% (relative mean squared error) of the exact
    score -(C + sigma^2 I)^-1 (x - mu) (measured: under 0.5%; an untrained network is near 100%)."""
    torch.manual_seed(0)
    mu = torch.tensor([0.4, -0.2])
    cov = torch.tensor([[0.30, 0.12], [0.12, 0.10]])
    chol = torch.linalg.cholesky(cov)
    model = ScoreMatching(ScoreMatching.Config(hidden=32, blocks=2, noise_levels=3, sigma_max=1.0, sigma_min=0.1), dim=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 300)
    for _ in range(300):
        y = mu + torch.randn(256, 2) @ chol.T  # (256, 2) ~ N(mu, C)
        loss = model.dsm(y).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    n = 20_000
    with torch.no_grad():
        for i, sigma in enumerate(model.sigmas.tolist()):
            cov_sigma = cov + sigma ** 2 * torch.eye(2)
            x = mu + torch.randn(n, 2) @ torch.linalg.cholesky(cov_sigma).T  # noisy data
            exact = -(x - mu) @ torch.linalg.inv(cov_sigma)  # (n, 2); cov_sigma is symmetric
            learned = model.score(x, torch.full((n,), i))
            error = (learned - exact).pow(2).sum(1).mean() / exact.pow(2).sum(1).mean()
            assert error.item() < 0.02, f"level {i} (sigma {sigma:.3f}): relative error {error.item():.4f}"


def test_langevin_step_schedule_with_a_zero_score():
    """With s = 0 the chains only add noise: the variance grows by T * sum_i alpha_i, with the
    relative step alpha_i = eps * sigma_i^2 (Song & Ermon 2019, Algorithm 1's eps / sigma_L^2
    written as eps); the denoising step adds nothing for s = 0."""
    torch.manual_seed(0)
    sigmas = geometric_sigmas(1.0, 0.1, 3).double()
    steps, step_size = 20, 0.1
    x = torch.zeros(20_000, 4, dtype=torch.float64)
    samples = annealed_langevin(lambda x, levels: torch.zeros_like(x), x, sigmas, steps, step_size)
    expected = steps * step_size * (sigmas ** 2).sum()  # 20 * 0.1 * (1 + 0.1 + 0.01) = 2.22
    assert expected.item() == pytest.approx(2.22)
    assert samples.var(0).mean().item() == pytest.approx(expected.item(), rel=0.02)


@pytest.mark.parametrize("denoise", [False, True])
def test_annealed_langevin_with_the_exact_score_reproduces_the_gaussian(denoise):
    """Data N(mu, diag(v)), exact scores. Each step x <- x + a/2 s(x) + sqrt(a) z is linear, so
    the chains' mean and variance follow m <- m + a/2 (mu - m) / w, V <- (1 - a / (2 w))^2 V + a
    with w = v + sigma_i^2 (the oracle below), which ends near N(mu, v + sigma_L^2); the denoising
    step x + sigma_L^2 s(x) then scales x - mu by v / (v + sigma_L^2): the posterior mean
    E[x | x~], whose variance is v^2 / (v + sigma_L^2)."""
    torch.manual_seed(0)
    mu = torch.tensor([0.5, -1.0, 0.0], dtype=torch.float64)
    var = torch.tensor([0.3, 0.1, 0.5], dtype=torch.float64)
    sigmas = geometric_sigmas(1.0, 0.1, 4).double()
    steps, step_size = 150, 1.0  # alpha_i = sigma_i^2 < w_i: every step contracts
    x = torch.rand(10_000, 3, dtype=torch.float64) * 2 - 1  # uniform on [-1, 1]: mean 0, var 1/3
    samples = annealed_langevin(gaussian_score(mu, var, sigmas), x, sigmas, steps, step_size, denoise)

    mean, variance = torch.zeros(3, dtype=torch.float64), torch.full((3,), 1 / 3, dtype=torch.float64)
    for sigma in sigmas:
        w, a = var + sigma ** 2, step_size * sigma ** 2
        for _ in range(steps):
            mean, variance = mean + a / 2 * (mu - mean) / w, (1 - a / (2 * w)) ** 2 * variance + a
    w_last = var + sigmas[-1] ** 2
    assert torch.allclose(mean, mu, atol=1e-3) and torch.allclose(variance, w_last, rtol=0.03)
    if denoise:
        mean, variance = mu + (mean - mu) * var / w_last, variance * (var / w_last) ** 2
        assert torch.allclose(variance, var ** 2 / w_last, rtol=0.03)  # Var E[x | x~] = v^2 / (v + sigma_L^2)
    assert torch.allclose(samples.mean(0), mean, atol=0.02)
    assert torch.allclose(samples.var(0), variance, rtol=0.05)


@pytest.mark.parametrize("steps, step_size", [(3, 0.18), (2, 1.0)])
def test_consistent_rule_with_the_exact_score_follows_the_gaussian_oracle(steps, step_size):
    """Data N(mu, diag(v)), exact scores, the consistent rule: each step
    x <- x + eta sigma_i^2 s(x) + b z, eta = eps / 2, b^2 = max(0, sigma'^2 - (1 - eta)^2 sigma_i^2),
    is linear, so the chains' mean and variance follow m <- m + eta sigma_i^2 (mu - m) / w,
    V <- (1 - eta sigma_i^2 / w)^2 V + b^2 with w = v + sigma_i^2 (the oracle below). The first
    case has b = 0 at every change of level (eta < 1 - sigma_{i+1} / sigma_i), the second none."""
    torch.manual_seed(0)
    mu = torch.tensor([0.5, -1.0, 0.0], dtype=torch.float64)
    var = torch.tensor([0.3, 0.01, 0.0], dtype=torch.float64)
    sigmas = geometric_sigmas(1.0, 0.1, 5).double()  # ratio 0.56
    x = mu + (1 + var).sqrt() * torch.randn(40_000, 3, dtype=torch.float64)  # N(mu, v + sigma_1^2)
    samples = annealed_langevin(gaussian_score(mu, var, sigmas), x, sigmas, steps, step_size, False, "consistent")
    mean, variance, eta = mu.clone(), 1 + var, step_size / 2
    levels = [i for i in range(len(sigmas)) for _ in range(steps)]
    zero_noise = 0
    for k, i in enumerate(levels):
        after = sigmas[levels[k + 1]] if k + 1 < len(levels) else sigmas[i]
        b2 = max(0.0, (after ** 2 - (1 - eta) ** 2 * sigmas[i] ** 2).item())
        zero_noise += b2 == 0
        gain = 1 - eta * sigmas[i] ** 2 / (var + sigmas[i] ** 2)
        mean, variance = mu + gain * (mean - mu), gain ** 2 * variance + b2
    assert zero_noise == (4 if step_size < 0.5 else 0)
    assert torch.allclose(samples.mean(0), mean, atol=0.01)
    assert torch.allclose(samples.var(0), variance, rtol=0.03)
    if step_size == 1.0:  # a point (v = 0) started at the first level stays at each level's noise: sigma_L^2 at the end
        assert variance[2].item() == pytest.approx(sigmas[-1].item() ** 2)
    # Langevin's noise sqrt(eps) sigma_i leaves these chains wider than the consistent rule's
    langevin = annealed_langevin(gaussian_score(mu, var, sigmas), x, sigmas, steps, step_size, False, "langevin")
    assert (langevin.var(0) > 1.1 * samples.var(0)).all()


def test_unknown_langevin_rule_names_the_valid_ones():
    with pytest.raises(ValueError, match="langevin, consistent"):
        annealed_langevin(lambda x, levels: -x, torch.zeros(2, 3), geometric_sigmas(1.0, 0.1, 2), 1, 0.1, rule="ula")


def test_smoke_every_output(tmp_path):
    assert run_main(scm_script.main, [*TINY, "--out", str(tmp_path)]) == 0
    metrics = check_outputs(tmp_path, "ScM", None)
    config = ScoreMatching.Config()
    levels = config.noise_levels
    assert 0 < metrics["test_dsm_loss"] < 64 and len(metrics["test_dsm_loss_per_level"]) == levels
    assert metrics["test_dsm_loss"] == pytest.approx(sum(metrics["test_dsm_loss_per_level"]) / levels, rel=1e-3)
    assert "nll" not in json.dumps({k: v for k, v in metrics.items() if "dsm" in k}).lower()
    assert metrics["sigmas"][0] == pytest.approx(config.sigma_max)
    assert metrics["sigmas"][-1] == pytest.approx(scm_script.DEFAULTS["sigma_min"])
    assert metrics["sampling"]["langevin_steps"] == min(scm_script.DEFAULTS["langevin_steps"], 5)  # --quick: at most 5


def test_single_level_flag(tmp_path):
    assert run_main(scm_script.main, [*TINY, "--single-level", "--out", str(tmp_path)]) == 0
    metrics = check_outputs(tmp_path, "ScM", None)
    assert metrics["sigmas"] == pytest.approx([0.1]) and metrics["config"]["noise_levels"] == 1
    assert metrics["sampling"]["step_size"] == scm_script.SINGLE_LEVEL["step_size"]


def test_conditional_runs_take_their_own_sampler_defaults_and_flags_still_win():
    """Several levels: DEFAULTS unconditional, CONDITIONAL_DEFAULTS conditional; a field given stays."""
    for conditional, table in ((False, scm_script.DEFAULTS), (True, scm_script.CONDITIONAL_DEFAULTS)):
        s = ScoreMatching.build(conditional=conditional, hidden=8, blocks=1).sampling
        assert (s.langevin_steps, s.step_size, s.rule) == (table["langevin_steps"], table["step_size"], table["rule"])
    assert scm_script.CONDITIONAL_DEFAULTS["rule"] != scm_script.DEFAULTS["rule"]
    given = ScoreMatching.build(conditional=True, hidden=8, blocks=1, rule="langevin").sampling
    assert given.rule == "langevin" and given.langevin_steps == scm_script.CONDITIONAL_DEFAULTS["langevin_steps"]


def test_sigma_range_is_checked(tmp_path):
    assert run_main(scm_script.main, [*TINY, "--sigma-max", "0.01", "--sigma-min", "0.1",
                                      "--out", str(tmp_path)]) == 2


def test_sample_only_takes_other_langevin_settings_on_the_same_weights(tmp_path):
    """Sampler settings are not part of the stored configuration: --sample-only may change them."""
    assert run_main(scm_script.main, [*TINY, "--out", str(tmp_path)]) == 0
    assert run_main(scm_script.main, [*TINY, "--out", str(tmp_path), "--sample-only", "--langevin-steps", "3",
                                      "--step-size", "1e-5", "--no-denoise"]) == 0
    metrics = json.loads((tmp_path / "ScM_metrics.json").read_text())
    assert metrics["sampling"] == dict(langevin_steps=3, step_size=1e-5, rule=scm_script.DEFAULTS["rule"],
                                       denoise=False, guidance=scm_script.ScMSampling.guidance)
    assert "langevin_steps" not in metrics["config"] and metrics["stopped"] == "sample_only"


# --- the conditional model (--conditional)


def test_unconditional_model_has_no_class_inputs():
    assert ScoreMatching.build().net.blocks[0].cond.in_features == 30
    assert ScoreMatching.build(conditional=True).net.blocks[0].cond.in_features == 30 + common.NUM_CLASSES + 1


def test_guidance_zero_is_the_plain_conditional_sampler_and_guidance_changes_the_samples():
    torch.manual_seed(0)
    model = ScoreMatching.build(conditional=True, hidden=16, blocks=1, noise_levels=4, langevin_steps=2).eval()
    y = torch.tensor([0, 3, 7, 9])
    torch.manual_seed(5)
    x = torch.rand(4, 64) * 2 - 1
    s = model.sampling
    with torch.no_grad():
        plain = annealed_langevin(lambda x, levels: model.score(x, levels, y), x, model.sigmas, s.langevin_steps,
                                  s.step_size, s.denoise, s.rule)
    assert torch.equal(guided_samples(model, y, 0.0), common.pm1_to_pixels(plain))
    assert not torch.equal(guided_samples(model, y, 2.0), common.pm1_to_pixels(plain))


def test_conditional_score_depends_on_the_class():
    torch.manual_seed(0)
    model = ScoreMatching.build(conditional=True, hidden=16, blocks=1, noise_levels=4)
    x, levels = torch.randn(3, 64), torch.tensor([0, 2, 3])
    with torch.no_grad():
        assert (model.score(x, levels, torch.tensor([1, 2, 3])) - model.score(x, levels, torch.tensor([4, 5, 10]))
                ).abs().min() > 0


def test_conditional_smoke_writes_the_conditional_files(tmp_path):
    assert run_main(scm_script.main, [*TINY, "--out", str(tmp_path), "--conditional", "--digits", "3,7",
                                      "--guidance", "1"]) == 0
    metrics = check_conditional_outputs(tmp_path, "ScM", (3, 7), None)
    assert metrics["test_nll_nats"] is None and metrics["generative_classifier_accuracy"] is None
    assert metrics["test_dsm_loss"] > 0
