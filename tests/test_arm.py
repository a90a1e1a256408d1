"""ARM: causality of the conditionals, exact normalisation, and a smoke test of the script; the
class-conditional model's biases in the full pass and the cached sampler, its NLLs per class, and
its smoke test."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import autoregressive_model as arm_script
from autoregressive_model import ARM
from conftest import check_conditional_outputs, check_outputs, run_main


def tiny_arm():
    torch.manual_seed(0)
    return ARM.build(channels=8, layers=3, width=2, dropout=0.0).eval()


def test_conditional_of_pixel_i_ignores_pixels_at_and_after_i():
    model = tiny_arm()
    torch.manual_seed(1)
    x = torch.randint(0, 17, (4, 64))
    base = torch.log_softmax(model.logits(x), -1)  # (4, 64, 17)
    for i in (0, 1, 8, 9, 31, 63):
        changed = x.clone()
        changed[:, i:] = torch.randint(0, 17, changed[:, i:].shape)
        logp = torch.log_softmax(model.logits(changed), -1)
        assert torch.allclose(logp[:, :i], base[:, :i], atol=1e-6), f"pixel >= {i} leaks"
        if i > 0:  # and the model does use the past: changing pixel i - 1 changes pixel i
            past = x.clone()
            past[:, i - 1] = (past[:, i - 1] + 5) % 17
            assert not torch.allclose(torch.log_softmax(model.logits(past), -1)[:, i], base[:, i])


def test_every_pixel_sees_every_earlier_pixel_at_the_defaults():
    """No blind spot: with the default layers and widths, the conditional of pixel i depends on
    each of the pixels 0..i-1 (a non-zero gradient through its embedding), none after."""
    torch.manual_seed(0)
    model = ARM.build().eval()
    x = torch.randint(0, 17, (1, 64))
    net = model.nets[0]
    embedded = net.embed(x).detach().requires_grad_()
    net.embed.register_forward_hook(lambda module, inputs, output: embedded)  # a leaf to differentiate by
    logits = net.logits(x)  # (1, 64, 17)
    for i in (1, 8, 15, 16, 40, 56, 63):
        (grad,) = torch.autograd.grad(logits[0, i].sum(), embedded, retain_graph=True)
        seen = grad[0].abs().sum(1) > 0  # (64,)
        assert seen[:i].all(), f"pixel {i} misses {(~seen[:i]).nonzero().flatten().tolist()}"
        assert not seen[i:].any()


def test_context_dropout_only_acts_while_training():
    torch.manual_seed(0)
    model = ARM.build(channels=8, layers=2, dropout=0.0, context_dropout=0.5)
    x = torch.randint(0, 17, (4, 64))
    model.eval()
    assert torch.equal(model.logits(x), model.logits(x))
    model.train()
    assert not torch.allclose(model.logits(x), model.logits(x))


def test_probabilities_of_all_sequences_sum_to_one_on_a_short_prefix():
    """Summing p(x_0, x_1) over all 17 x 17 values of the first two pixels gives 1."""
    model = tiny_arm()
    pairs = torch.tensor(list(itertools.product(range(17), repeat=2)))  # (289, 2)
    x = torch.zeros(len(pairs), 64, dtype=torch.long)
    x[:, :2] = pairs
    logp = torch.log_softmax(model.logits(x), -1)
    joint = logp[:, 0].gather(1, pairs[:, :1]) + logp[:, 1].gather(1, pairs[:, 1:])
    assert torch.logsumexp(joint.flatten(), 0).item() == pytest.approx(0.0, abs=1e-5)


def test_nll_is_the_summed_cross_entropy_and_untrained_model_is_near_uniform():
    model = tiny_arm()
    x = torch.randint(0, 17, (5, 64)).float()
    logp = torch.log_softmax(model.logits(x.long()), -1)
    expected = -logp.gather(2, x.long().unsqueeze(2)).squeeze(2).sum(1)
    assert torch.allclose(model.nll(x), expected, atol=1e-4)
    assert model.nll(x).mean().item() == pytest.approx(64 * math.log(17), rel=0.1)


def test_samples_are_integers_in_range():
    torch.manual_seed(0)
    samples = tiny_arm().sample(10)
    assert samples.shape == (10, 64)
    assert torch.equal(samples, samples.round()) and samples.min() >= 0 and samples.max() <= 16


def test_smoke_every_output(tmp_path):
    assert run_main(arm_script.main, ["--quick", "--no-progress", "--out", str(tmp_path),
                                      "--channels", "16", "--layers", "2"]) == 0
    metrics = check_outputs(tmp_path, "ARM", "exact")
    assert metrics["test_nll_nats"] < 64 * math.log(17) * 1.2


@pytest.mark.parametrize("members, position", [(1, False), (2, True)])
def test_cached_logits_equal_the_full_pass_at_every_step(members, position):
    """The incremental sampler's conditionals are the full network's, position by position."""
    model = ARM.build(channels=8, layers=3, width=2, dropout=0.0, members=members, position=position)
    torch.manual_seed(2)
    with torch.no_grad():
        for parameter in model.parameters():  # no zero-initialised parts: every path matters
            parameter.add_(0.3 * torch.randn_like(parameter))
    model.eval()
    x = torch.randint(0, 17, (6, 64))
    with torch.no_grad():
        full = model.logits(x)  # (6, 64, 17)
        caches, previous = model.empty_caches(6), None
        for i in range(64):
            cached = model.next_logits(previous, i, caches)
            assert torch.allclose(cached, full[:, i], atol=1e-5), f"position {i}"
            previous = x[:, i]


def test_cached_sampler_draws_the_same_pixels_as_full_passes():
    """With the same random stream, 64 full passes and the cached sampler give the same digits."""
    model = tiny_arm()
    torch.manual_seed(3)
    with torch.no_grad():
        x = torch.zeros(20, 64, dtype=torch.long)
        for i in range(64):
            x[:, i] = torch.multinomial(F.softmax(model.logits(x)[:, i], dim=-1), 1).squeeze(1)
    torch.manual_seed(3)
    assert torch.equal(model.sample(20), x.float())


def test_members_conditionals_are_the_mean_of_their_probabilities():
    torch.manual_seed(0)
    model = ARM.build(channels=8, layers=2, members=3, position=True).eval()
    x = torch.randint(0, 17, (4, 64))
    mean = torch.stack([F.softmax(net.logits(x), -1) for net in model.nets]).mean(0)
    assert torch.allclose(model.logits(x).exp(), mean, atol=1e-6)
    assert torch.allclose(model.logits(x).exp().sum(-1), torch.ones(4, 64), atol=1e-5)
    # training: each member on its own NLL
    own = torch.stack([-F.log_softmax(net.logits(x), -1).gather(2, x.unsqueeze(2)).sum((1, 2)) for net in model.nets])
    assert model.loss(x.float(), None).item() == pytest.approx(own.mean().item(), rel=1e-5)


# --- the conditional model (--conditional)


def tiny_conditional_arm(members=1):
    torch.manual_seed(0)
    model = ARM.build(channels=8, layers=3, width=2, dropout=0.0, members=members, conditional=True)
    with torch.no_grad():
        for parameter in model.parameters():  # the class biases start at zero: make them matter
            parameter.add_(0.3 * torch.randn_like(parameter))
    return model.eval()


def test_unconditional_model_has_no_class_parameters():
    assert not any("classes" in name for name, _ in ARM.build().named_parameters())
    assert any("classes" in name for name, _ in ARM.build(conditional=True).named_parameters())


def test_conditional_cached_logits_equal_the_full_pass_and_stay_causal():
    model = tiny_conditional_arm(members=2)
    torch.manual_seed(1)
    x, y = torch.randint(0, 17, (6, 64)), torch.randint(0, 10, (6,))
    with torch.no_grad():
        full = model.logits(x, y)
        caches, previous = model.empty_caches(6, y), None
        for i in range(64):
            assert torch.allclose(model.next_logits(previous, i, caches), full[:, i], atol=1e-5), f"position {i}"
            previous = x[:, i]
        changed = x.clone()
        changed[:, 20:] = torch.randint(0, 17, changed[:, 20:].shape)
        assert torch.allclose(model.logits(changed, y)[:, :20], full[:, :20], atol=1e-6)
        assert not torch.allclose(model.logits(x, (y + 1) % 10)[:, 0], full[:, 0])  # the class reaches pixel 0


def test_conditional_nll_depends_on_the_class_and_class_log_likelihoods_are_the_ten_nlls():
    model = tiny_conditional_arm()
    x = torch.randint(0, 17, (5, 64)).float()
    with torch.no_grad():
        scores = model.class_log_likelihoods(x)  # (5, 10)
        assert scores.shape == (5, 10)
        for c in range(10):
            assert torch.allclose(scores[:, c], -model.test_nll(x, torch.full((5,), c)), atol=1e-4)
    assert not torch.allclose(model.test_nll(x, torch.zeros(5, dtype=torch.long)),
                              model.test_nll(x, torch.ones(5, dtype=torch.long)))
    with pytest.raises(ValueError, match="class labels"):
        model.test_nll(x)


def test_conditional_samples_follow_the_full_passes_given_the_class():
    model = tiny_conditional_arm()
    y = torch.tensor([3, 7, 3, 7, 0])
    torch.manual_seed(3)
    with torch.no_grad():
        x = torch.zeros(5, 64, dtype=torch.long)
        for i in range(64):
            x[:, i] = torch.multinomial(F.softmax(model.logits(x, y)[:, i], dim=-1), 1).squeeze(1)
    torch.manual_seed(3)
    samples = model.sample(5, y)
    assert samples.shape == (5, 64) and torch.equal(samples, x.float())


def test_conditional_smoke_writes_the_conditional_files(tmp_path):
    assert run_main(arm_script.main, ["--quick", "--no-progress", "--out", str(tmp_path), "--channels", "8",
                                      "--layers", "2", "--members", "1", "--conditional", "--digits", "3,7"]) == 0
    metrics = check_conditional_outputs(tmp_path, "ARM", (3, 7), "exact")
    assert metrics["test_nll_nats"] > 0
