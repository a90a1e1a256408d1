"""The model contract, for every registered family alike (registry.FAMILIES: a family is covered by
being registered): a finite loss on a batch (x, y), samples of shape (n, 64) on 0..16, a test NLL
of shape (B,) where a likelihood exists, an OOD score where ood_kind says there is one, and weights
that survive the round trip through OUT/NAME.pt (save_weights, then load_trained rebuilds the
model from the stored config)."""

import math

import pytest
import torch

import common
from plumbing import checkpoints, registry
import plumbing

# family -> tiny settings for Model.build, so the test is fast; a family missing here is tested
# at its defaults (slower, but covered)
TINY = {
    "ARM": dict(channels=8, layers=2),
    "RealNVP": dict(num_couplings=2, hidden=16),
    "EBM": dict(hidden=16, layers=1, sgld_steps=2, sample_steps=2),
    "ScM": dict(hidden=16, blocks=1, langevin_steps=2),
    "SBGM": dict(hidden=16, blocks=1, ode_steps=2, sample_steps=10),
    "DDPM": dict(num_steps=10, hidden=16, blocks=1, ddim_steps=2),
    "VAE": dict(latent=2, hidden=16, channels=4, components=3, iwae_samples=4),
    "GAN": dict(latent=4, hidden=16),
    "FM": dict(hidden=16, blocks=1, ode_steps=2),
    "MDM": dict(hidden=8, blocks=1, masks_per_level=1),
}
CONDITIONAL_TINY = {"VAE": dict(components=10)}  # a conditional VampPrior needs a pseudo-input per class
NAMES = [family.name for family in registry.FAMILIES]


def test_the_registry_names_each_family_once_and_every_tool_reads_it():
    import benchmark
    import leaderboard

    assert len(NAMES) == len(set(NAMES)) == len({f.script for f in registry.FAMILIES})
    assert list(registry.SCRIPTS) == NAMES
    assert benchmark.SCRIPTS is leaderboard.SCRIPTS is registry.SCRIPTS
    with pytest.raises(plumbing.UsageError, match="unknown family 'XYZ'; choose from ARM, "):
        registry.family("XYZ")


@pytest.mark.parametrize("name", NAMES)
def test_every_family_keeps_the_contract(name, tmp_path):
    cls = registry.model_class(name)
    torch.manual_seed(0)
    model = cls.build(**TINY.get(name, {}))
    assert model.name == name and model.nll_kind in ("exact", "upper_bound", None)
    assert model.ood_kind in ("nll", "energy", "score-norm", None)
    assert model.ood_kind != "nll" or model.nll_kind is not None
    splits, labels = (load(torch.device("cpu"), quick=True) for load in (common.load_splits, common.load_label_splits))
    x, y = splits["train"][:16], labels["train"][:16]
    loss = model.loss(x, y)
    assert loss.shape == () and math.isfinite(loss.item())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    values = model.train_step(x, y, model.configure_optimizer(1e-3))
    assert math.isfinite(values["loss"])
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items()), "the step moved nothing"
    model.eval()
    with torch.no_grad():
        assert math.isfinite(float(model.eval_loss(splits["val"][:8], labels["val"][:8])))
    torch.manual_seed(1)
    samples = model.sample(5)
    assert samples.shape == (5, 64) and samples.min() >= 0 and samples.max() <= 16
    if model.nll_kind:
        with torch.no_grad():
            nll = model.test_nll(x[:3])
        assert nll.shape == (3,) and torch.isfinite(nll).all() and (nll > 0).all()
    else:
        with pytest.raises(NotImplementedError):
            model.test_nll(x[:3])
    if model.ood_kind:
        with torch.no_grad():
            score = model.ood_score(x[:3])
        assert score.shape == (3,) and torch.isfinite(score).all()
    metrics = model.extra_metrics({k: v[:8] for k, v in splits.items()}, {k: v[:8] for k, v in labels.items()})
    assert isinstance(metrics, dict)

    state = common.TrainState(epoch=1, best_epoch=1, best_val=1.0, best_weights=common.cpu_state(model),
                              history=dict(train=[1.0], val=[1.0]))
    checkpoints.save_weights(tmp_path / f"{name}.pt", name, common.dataclasses.asdict(model.config), state)
    loaded = checkpoints.load_trained(cls, tmp_path, sampling=model.sampling)
    assert type(loaded) is cls and loaded.config == model.config and not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    torch.manual_seed(2)
    expected = model.sample(3)
    torch.manual_seed(2)
    assert torch.equal(loaded.sample(3), expected)
    # the shipped file is the weights alone: no optimizer, frames or RNG states
    shipped = torch.load(tmp_path / f"{name}.pt", weights_only=True)
    assert not {"optimizer", "frames", "rng", "state"} & shipped.keys()


def test_damaged_weights_are_refused_by_their_checksum(tmp_path):
    cls = registry.model_class("ARM")
    model = cls.build(channels=8, layers=2)
    state = common.TrainState(best_weights=common.cpu_state(model))
    path = tmp_path / "ARM.pt"
    checkpoints.save_weights(path, "ARM", common.dataclasses.asdict(model.config), state)
    shipped = torch.load(path, weights_only=True)
    shipped["weights"]["nets.0.head.bias"][0] += 1.0  # one number changed inside the tensor data
    torch.save(shipped, path)
    with pytest.raises(plumbing.UsageError, match="checksum"):
        checkpoints.load_trained(cls, tmp_path)


@pytest.mark.parametrize("name", NAMES)
def test_every_family_has_a_conditional_model(name, tmp_path):
    """--conditional for every family: the loss uses the labels, sample(n, y) draws n samples of the
    classes y, test_nll(x, y) and class_log_likelihoods where a likelihood exists, and the weights
    come back from OUT/NAME_conditional.pt only as a conditional model."""
    cls = registry.model_class(name)
    torch.manual_seed(0)
    model = cls.build(conditional=True, **{**TINY.get(name, {}), **CONDITIONAL_TINY.get(name, {})})
    assert model.conditional and registry.stem(name, True) == f"{name}_conditional"
    splits, labels = (load(torch.device("cpu"), quick=True) for load in (common.load_splits, common.load_label_splits))
    x, y = splits["train"][:16], labels["train"][:16]
    model.train_step(x, y, model.configure_optimizer(1e-3))  # a step first: class weights may start at zero
    torch.manual_seed(1)
    loss = model.loss(x, y)
    torch.manual_seed(1)
    other = model.loss(x, (y + 1) % 10)
    assert loss.shape == () and math.isfinite(loss.item()) and loss.item() != other.item(), "the labels are unused"
    model.eval()
    asked = torch.tensor([3, 7, 7, 0, 9])
    torch.manual_seed(1)
    samples = model.sample(5, asked)
    assert samples.shape == (5, 64) and samples.min() >= 0 and samples.max() <= 16
    if model.nll_kind:
        with torch.no_grad():
            nll = model.test_nll(x[:3], y[:3])
            scores = model.class_log_likelihoods(x[:3])
        assert nll.shape == (3,) and torch.isfinite(nll).all() and (nll > 0).all()
        assert scores.shape == (3, 10) and torch.isfinite(scores).all()
        assert not torch.allclose(scores[:, 0], scores[:, 1]), "every class gives the same likelihood"
    metrics = model.extra_metrics({k: v[:8] for k, v in splits.items()}, {k: v[:8] for k, v in labels.items()})
    assert isinstance(metrics, dict)
    model.extra_images({k: v[:8] for k, v in splits.items()})

    state = common.TrainState(epoch=1, best_epoch=1, best_val=1.0, best_weights=common.cpu_state(model),
                              history=dict(train=[1.0], val=[1.0]))
    checkpoints.save_weights(tmp_path / f"{name}_conditional.pt", name, common.dataclasses.asdict(model.config), state)
    loaded = checkpoints.load_trained(cls, tmp_path, sampling=model.sampling, conditional=True)
    assert loaded.conditional and loaded.config == model.config
    torch.manual_seed(2)
    expected = model.sample(3, asked[:3])
    torch.manual_seed(2)
    assert torch.equal(loaded.sample(3, asked[:3]), expected)
    (tmp_path / f"{name}_conditional.pt").rename(tmp_path / f"{name}.pt")
    with pytest.raises(plumbing.UsageError, match="load it with --conditional"):
        checkpoints.load_trained(cls, tmp_path)
