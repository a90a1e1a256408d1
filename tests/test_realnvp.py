"""RealNVP: invertibility, log-determinants against autograd Jacobians (flow, linear mixing,
dequantizer), a density that integrates to one, the dequantization bound (uniform and variational,
plain and importance-weighted), the conditional model's density, classifier scores and samples, and
smoke tests of the script (with --sample-only, and --conditional)."""

import dataclasses
import json
import math

import pytest
import torch

import common
import flow_based_model_realnvp as realnvp_script
from conftest import check_conditional_outputs, check_outputs, run_main
from flow_based_model_realnvp import (ActNorm, AffineCoupling, CouplingStack, InvertibleLinear, LogitTransform,
                                      RealNVP, VariationalDequantizer, make_masks)

TINY = ["--quick", "--no-progress", "--num-couplings", "4", "--hidden", "16", "--dequant-couplings", "2",
        "--dequant-hidden", "16"]


def randomised(model, seed=0, std=0.3):
    """Give every weight a random value (the last layers start at zero, i.e. the identity)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn_like(parameter) * std)
    return model.eval()


def tiny_flow(dim=common.NUM_PIXELS, masks="random", seed=0, nll_draws=10, nll_estimate="mean", std=0.3,
              **overrides):
    """A small randomised flow in float64: linear mixing and the variational dequantizer on unless
    overridden."""
    fields = dict(num_couplings=4, hidden=16, blocks=1, dropout=0.0, masks=masks, mixing=True,
                  dequant_couplings=2, dequant_hidden=16)
    config = RealNVP.Config(**{**fields, **overrides})
    sampling = RealNVP.Sampling(nll_draws=nll_draws, nll_estimate=nll_estimate)
    return randomised(RealNVP(config, sampling, dim=dim).double(), seed, std)


def pixels_in_range(n, seed=0):
    """Dequantized pixels v in [0, 17)^64."""
    torch.manual_seed(seed)
    return torch.rand(n, common.NUM_PIXELS, dtype=torch.float64) * common.NUM_LEVELS


# --- masks -----------------------------------------------------------------------


def test_masks_alternate_so_that_every_pixel_is_transformed():
    for kind in ("random", "checkerboard"):
        masks = make_masks(kind, 6)
        assert masks.shape == (6, 64) and set(masks.unique().tolist()) == {0.0, 1.0}
        assert (masks.sum(1) == 32).all()
        assert torch.equal(masks[0::2] + masks[1::2], torch.ones(3, 64))  # pairs are complements
    board = make_masks("checkerboard", 2)[0].view(8, 8)
    assert board[0, 0] != board[0, 1] and board[0, 0] != board[1, 0] and board[0, 0] == board[1, 1]
    random_masks = make_masks("random", 4)
    assert not torch.equal(random_masks[0], random_masks[2])  # a new split for each pair
    assert torch.equal(random_masks, make_masks("random", 4))  # deterministic


# --- invertibility and log-determinants ------------------------------------------


@pytest.mark.parametrize("masks,mixing,dtype,atol", [("random", False, torch.float32, 1e-5),
                                                      ("checkerboard", False, torch.float32, 1e-5),
                                                      ("random", True, torch.float64, 1e-8)])
def test_inverse_of_forward_is_the_identity(masks, mixing, dtype, atol):
    """float64 with the linear mixing: its randomised LU factors (entries of std 0.15, unlike the
    rotation it starts from) make six badly conditioned 64x64 maps (condition numbers 30-60 each,
    |z| up to ~400), whose composition amplifies rounding by ~1e5-1e6, i.e. ~3e-2 in float32 (and
    ~5e-11 in float64): conditioning, not an error in the inverse."""
    model = randomised(RealNVP.build(num_couplings=6, hidden=32, dropout=0.0, masks=masks, mixing=mixing),
                       std=0.15).to(dtype)
    torch.manual_seed(1)
    h = torch.randn(64, 64, dtype=dtype) * 3  # random inputs to the couplings
    z, _ = model.flow(h)
    assert not torch.allclose(z, h, atol=1e-2)  # the randomised flow is not the identity
    assert torch.allclose(model.flow.inverse(z), h, atol=atol)
    assert torch.allclose(model.flow(model.flow.inverse(h))[0], h, atol=atol)
    v = torch.rand(64, 64, dtype=dtype) * common.NUM_LEVELS  # and through the logit transform
    assert torch.allclose(model.inverse(model(v)[0]), v, atol=10 * atol * common.NUM_LEVELS)


def test_linear_mixing_inverts_in_float32_near_its_rotation_start():
    """In float32 (training and sampling) the mixing inverts to 1e-5 in the regime that training
    starts from: a rotation, slightly perturbed."""
    mixing = InvertibleLinear(64, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in mixing.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    h = torch.randn(64, 64) * 3
    out, _ = mixing(h)
    assert torch.allclose(mixing.inverse(out), h, atol=1e-5)


def test_actnorm_initialises_from_the_first_training_batch_and_inverts():
    norm = ActNorm(64)
    torch.manual_seed(0)
    h = torch.randn(100, 64) * torch.rand(64) * 5 + torch.randn(64) * 3
    out, log_det = norm(h)  # training mode: data-dependent initialisation
    assert torch.allclose(out.mean(0), torch.zeros(64), atol=1e-5)
    assert torch.allclose(out.std(0), torch.ones(64), atol=1e-4)
    assert torch.allclose(log_det, -torch.log(h.std(0)).sum().expand(100), atol=1e-3)
    again, _ = norm(h * 2)  # initialised once only
    assert torch.allclose(again, (h * 2 + norm.bias) * norm.log_scale.exp())
    assert torch.allclose(norm.inverse(out), h, atol=1e-5)
    assert bool(norm.state_dict()["initialized"])


def test_coupling_leaves_the_fixed_half_unchanged_and_starts_as_the_identity():
    mask = make_masks("random", 1)[0]
    coupling = AffineCoupling(mask, hidden=8, blocks=1, dropout=0.0)
    h = torch.randn(5, 64)
    out, log_det = coupling(h)
    assert torch.equal(out, h) and torch.equal(log_det, torch.zeros(5))  # zero-initialised last layer
    randomised(coupling)
    out, _ = coupling(h)
    fixed = mask.bool()
    assert torch.equal(out[:, fixed], h[:, fixed]) and not torch.allclose(out[:, ~fixed], h[:, ~fixed])


@pytest.mark.parametrize("mixing", [False, True])
def test_summed_log_det_equals_log_abs_det_of_the_autograd_jacobian(mixing):
    model = tiny_flow(mixing=mixing)
    for v in pixels_in_range(3, seed=2):
        _, log_det = model(v[None])
        jacobian = torch.autograd.functional.jacobian(lambda u: model(u[None])[0][0], v)  # (64, 64)
        sign, expected = torch.linalg.slogdet(jacobian)
        assert sign != 0
        # with the randomised mixing (each W's condition number ~1e4) the composed Jacobian has a
        # condition number ~1e12, and its slogdet in float64 is only good to ~1e-5: so the oracle
        # there is also the chain rule, the sum of each step's autograd slogdet, good to ~1e-12
        assert log_det.item() == pytest.approx(expected.item(), abs=1e-4 if mixing else 1e-8)
        w = model.logit(v[None])[0]
        per_step = torch.linalg.slogdet(torch.autograd.functional.jacobian(
            lambda u: model.logit(u[None])[0][0], v))[1]
        for step in model.flow.steps:
            per_step = per_step + torch.linalg.slogdet(torch.autograd.functional.jacobian(
                lambda u: step(u[None])[0][0], w[0]))[1]
            w = step(w)[0]
        assert log_det.item() == pytest.approx(per_step.item(), abs=1e-10)
    # each part on its own too: the logit transform alone, the couplings alone
    v = pixels_in_range(1, seed=3)[0]
    jacobian = torch.autograd.functional.jacobian(lambda u: model.logit(u[None])[0][0], v)
    assert model.logit(v[None])[1].item() == pytest.approx(torch.linalg.slogdet(jacobian)[1].item(), abs=1e-8)
    h = torch.randn(64, dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(lambda u: model.flow(u[None])[0][0], h)
    assert model.flow(h[None])[1].item() == pytest.approx(torch.linalg.slogdet(jacobian)[1].item(),
                                                          abs=1e-4 if mixing else 1e-8)


def test_logit_transform_is_the_squeezed_logit():
    alpha = 0.05
    logit = LogitTransform(alpha)
    v = torch.tensor([[0.0, 8.5, 17.0]], dtype=torch.float64)
    w, log_det = logit(v)
    assert torch.allclose(w, torch.tensor([[math.log(alpha / (1 - alpha)), 0.0, math.log((1 - alpha) / alpha)]],
                                          dtype=torch.float64))
    # dw/dv = (1 - 2 alpha) / 17 / (s (1 - s)); at v = 8.5, s = 1/2
    slope = [(1 - 2 * alpha) / 17 / (s * (1 - s)) for s in (alpha, 0.5, 1 - alpha)]
    assert log_det.item() == pytest.approx(sum(math.log(d) for d in slope))


def test_linear_mixing_log_det_and_inverse():
    torch.manual_seed(0)
    mixing = randomised(InvertibleLinear(64, torch.Generator().manual_seed(0)).double(), std=0.1)
    weight = mixing.weight()
    assert not torch.allclose(weight, torch.eye(64, dtype=torch.float64), atol=0.1)
    h = torch.randn(5, 64, dtype=torch.float64)
    out, log_det = mixing(h)
    assert torch.allclose(out, h @ weight.T)
    assert log_det[0].item() == pytest.approx(torch.linalg.slogdet(weight)[1].item(), abs=1e-9)
    assert torch.allclose(mixing.inverse(out), h, atol=1e-9)
    fresh = InvertibleLinear(64, torch.Generator().manual_seed(0))  # starts as a rotation: |det| = 1
    assert torch.allclose(fresh.weight() @ fresh.weight().T, torch.eye(64), atol=1e-5)
    assert abs(fresh(h.float())[1][0].item()) < 1e-4


def test_dequantizer_log_density_against_the_autograd_jacobian_and_its_inverse():
    """log q(u | x) = log N(e) - log|det du/de|, with the Jacobian of e -> u (conditioned on x)."""
    dequantizer = randomised(VariationalDequantizer(64, 2, 16, 1, 0.0, "random").double(), std=0.2)
    torch.manual_seed(1)
    x = torch.randint(0, 17, (1, 64)).double()
    e = torch.randn(1, 64, dtype=torch.float64)
    u, log_q = dequantizer(e, x)
    assert (u > 0).all() and (u < 1).all()
    jacobian = torch.autograd.functional.jacobian(lambda a: dequantizer(a[None], x)[0][0], e[0])
    expected = standard_normal(e) - torch.linalg.slogdet(jacobian)[1]
    assert log_q.item() == pytest.approx(expected.item(), abs=1e-8)
    assert torch.allclose(dequantizer.inverse(u, x), e, atol=1e-8)
    other, _ = dequantizer(e, (x + 1) % 17)  # q depends on the pixels
    assert not torch.allclose(other, u, atol=1e-3)


def standard_normal(e):
    return torch.distributions.Normal(0.0, 1.0).log_prob(e).sum(1)


# --- normalisation and the bound -------------------------------------------------


def test_density_of_a_2d_flow_integrates_to_one():
    """The couplings alone in R^2: the sum of p over a fine grid times the cell area is 1."""
    torch.manual_seed(0)
    flow = randomised(CouplingStack(make_masks("random", 4, dim=2), hidden=16, blocks=1, dropout=0.0,
                                    mixing=True).double(), std=0.3)
    side = torch.linspace(-20, 20, 801, dtype=torch.float64)
    grid = torch.cartesian_prod(side, side)  # (801^2, 2)
    cell = (side[1] - side[0]) ** 2
    with torch.no_grad():
        mass = (flow.log_prob(grid).exp() * cell).sum().item()
    assert mass == pytest.approx(1.0, abs=2e-3)


def test_density_on_the_pixel_scale_integrates_to_one_in_2d():
    """Logit transform and couplings, 2 pixels: p(v) integrates to 1 over the range that the
    squeezed logit maps onto R, v in (-17 alpha, 17 (1 - alpha)) / (1 - 2 alpha)."""
    alpha = 0.05
    model = randomised(tiny_flow(dim=2, alpha=alpha), std=0.2)  # 17% of the mass at v < 0
    low, high = -17 * alpha / (1 - 2 * alpha), 17 * (1 - alpha) / (1 - 2 * alpha)
    n = 1600  # the density is steep near the ends of the range: 800 cells gave 0.9976
    side = low + (torch.arange(n, dtype=torch.float64) + 0.5) * (high - low) / n  # midpoints
    grid = torch.cartesian_prod(side, side)
    with torch.no_grad():
        mass = (model.log_prob(grid).exp() * ((high - low) / n) ** 2).sum().item()
    assert mass == pytest.approx(1.0, abs=2e-3)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # 1D: a coupling's fixed half is empty
@pytest.mark.parametrize("dequantization", ["uniform", "variational"])
def test_test_nll_is_the_dequantization_bound_and_bounds_the_discrete_nll_in_1d(dequantization):
    """1 pixel: P(x) = integral of p over [x, x + 1) (by quadrature) sums to at most 1 over the 17
    values, and -log P(x) <= E_q[-log p(x + u) + log q(u | x)] (Jensen), which test_nll estimates
    ("mean"); the importance-weighted estimate lies between the two."""
    model = tiny_flow(dim=1, alpha=0.05, nll_draws=20, std=0.2, dequantization=dequantization)
    x = torch.arange(17, dtype=torch.float64)[:, None]  # (17, 1)
    m = 4000
    u = (torch.arange(m, dtype=torch.float64) + 0.5) / m  # midpoints of [0, 1)
    xs, us = x.repeat_interleave(m, 0), u.repeat(17)[:, None]  # (17 m, 1)
    with torch.no_grad():
        density = model.log_prob(xs + us).exp().view(17, m)
        if dequantization == "uniform":
            log_q = torch.zeros(17, m, dtype=torch.float64)
        else:
            log_q = model.dequantizer(model.dequantizer.inverse(us, xs), xs)[1].view(17, m)
        probability = density.mean(1)  # (17,) P(x)
        exact_bound = (log_q.exp() * (log_q - density.log())).mean(1)  # E_q[-log p + log q] by quadrature
        torch.manual_seed(0)
        estimate = model.test_nll(x.repeat(200, 1)).view(200, 17).mean(0)  # 4000 draws per value
        model.sampling = dataclasses.replace(model.sampling, nll_estimate="importance")
        runs = model.test_nll(x.repeat(200, 1)).view(200, 17)  # 200 estimates of 20 draws each
        weighted, error = runs.mean(0), 4 * runs.std(0) / math.sqrt(200)  # 4 Monte Carlo standard errors
    assert log_q.exp().mean(1).sub(1).abs().max() < 1e-3  # q is a density on [0, 1)
    assert 0.5 < probability.sum().item() <= 1.0
    assert (exact_bound >= -probability.log() - 1e-6).all()
    assert (exact_bound > -probability.log() + 1e-4).any()  # Jensen's gap: not an equality here
    assert torch.allclose(estimate, exact_bound, rtol=0.01)
    # the importance-weighted estimate is >= -log P(x) in expectation (not every average of 200 is)
    assert (weighted >= -probability.log() - error).all() and (weighted <= exact_bound + error).all()
    assert (weighted < exact_bound - 1e-4).any()  # tighter with 20 draws


def test_loss_is_the_one_draw_bound():
    x = torch.randint(0, 17, (8, 64)).double()
    model = tiny_flow(dequantization="uniform")  # -log p(x + u), u uniform
    torch.manual_seed(5)
    loss = model.loss(x, None)
    torch.manual_seed(5)
    expected = -model.log_prob(x + torch.rand_like(x)).mean()
    assert loss.item() == pytest.approx(expected.item())
    model = tiny_flow()  # -log p(x + u) + log q(u | x), u = sigmoid(g(e; x))
    torch.manual_seed(5)
    loss = model.loss(x, None)
    torch.manual_seed(5)
    u, log_q = model.dequantizer(torch.randn_like(x), x)
    assert loss.item() == pytest.approx((log_q - model.log_prob(x + u)).mean().item())


def test_samples_are_pixel_values_and_temperature_zero_limit_is_the_mode_path():
    model = tiny_flow().float()
    torch.manual_seed(0)
    samples = model.sample(50)
    assert samples.shape == (50, 64)
    assert torch.equal(samples, samples.round()) and samples.min() >= 0 and samples.max() <= 16
    model.sampling = dataclasses.replace(model.sampling, temperature=1e-6)
    cold = model.sample(3)
    assert torch.equal(cold, model.inverse(torch.zeros(3, 64)).floor().clamp(0, 16))


# --- the script ------------------------------------------------------------------


def test_smoke_every_output_and_sample_only_at_another_temperature(tmp_path):
    assert run_main(realnvp_script.main, TINY + ["--out", str(tmp_path)]) == 0
    metrics = check_outputs(tmp_path, "RealNVP", "upper_bound")
    assert metrics["test_nll_nats"] < 64 * math.log(17) * 1.5
    assert metrics["sampling"] == dict(nll_draws=50, nll_estimate="importance", temperature=1.0)
    assert run_main(realnvp_script.main, TINY + ["--out", str(tmp_path), "--sample-only",
                                                 "--temperature", "0.7", "--nll-draws", "2"]) == 0
    again = json.loads((tmp_path / "RealNVP_metrics.json").read_text())
    assert again["sampling"] == dict(nll_draws=2, nll_estimate="importance", temperature=0.7)
    assert again["epochs_run"] == metrics["epochs_run"]


def test_bad_alpha_is_a_usage_error(capsys):
    assert run_main(realnvp_script.main, TINY + ["--alpha", "0.5"]) == 2
    assert "--alpha" in capsys.readouterr().err


# --- the conditional model -------------------------------------------------------


@pytest.mark.parametrize("class_input", ["base", "couplings", "both"])
def test_conditional_density_class_log_likelihoods_and_samples(class_input):
    """log p(v | y) = log N(f(v; y); mu_y, sigma_y^2) + log|det|; the bound depends on y;
    class_log_likelihoods equals -test_nll(x, c) for every c with the same seed; samples of the
    asked classes, which depend on the class."""
    model = tiny_flow(conditional=True, class_input=class_input, nll_draws=3)
    torch.manual_seed(0)
    v, y = pixels_in_range(4), torch.tensor([0, 3, 7, 9])
    with torch.no_grad():
        z, log_det = model(v, y)
        mean, std = (model.base_mean[y], model.base_log_std[y].exp()) if class_input != "couplings" else (0.0, 1.0)
        expected = torch.distributions.Normal(mean, std).log_prob(z).sum(1) + log_det
        assert torch.allclose(model.log_prob(v, y), expected)
        assert not torch.allclose(model.log_prob(v, y), model.log_prob(v, (y + 1) % 10))
        x = v.floor()
        torch.manual_seed(1)
        scores = model.class_log_likelihoods(x)
        assert scores.shape == (4, 10)
        for c in range(10):
            torch.manual_seed(1)
            assert torch.allclose(scores[:, c], -model.test_nll(x, torch.full((4,), c)))
        model.float()  # the sampler draws float32 noise
        torch.manual_seed(2)
        samples = model.sample(4, y)
        torch.manual_seed(2)
        others = model.sample(4, (y + 1) % 10)
    assert samples.shape == (4, 64) and torch.equal(samples, samples.round()) and not torch.equal(samples, others)


def test_conditional_smoke_run_draws_the_asked_digits(tmp_path):
    assert run_main(realnvp_script.main, TINY + ["--conditional", "--digits", "3,7", "--out", str(tmp_path)]) == 0
    check_conditional_outputs(tmp_path, "RealNVP", (3, 7), "upper_bound")
