"""The model contract, for every family alike: a finite loss, samples of shape (n, 64) on 0..16,
a test NLL of shape (B,) where a likelihood exists, and weights that survive the round trip
through OUT/NAME.pt (save_weights, then load_trained rebuilds the model from the stored config)."""

import importlib
import math

import pytest
import torch

import common

# family -> (script module, tiny settings for Model.build)
FAMILIES = {
    "ARM": ("autoregressive_model", dict(channels=8, layers=2)),
    "RealNVP": ("flow_based_model_realnvp", dict(num_couplings=2, hidden=16)),
    "EBM": ("energy_based_model", dict(hidden=16, layers=1, sgld_steps=2, sample_steps=2)),
    "ScM": ("score_matching", dict(hidden=16, blocks=1, langevin_steps=2)),
    "SBGM": ("score_based_generative_model", dict(hidden=16, blocks=1, ode_steps=2, sample_steps=10)),
    "DDPM": ("ddpm", dict(num_steps=10, hidden=16, blocks=1, ddim_steps=2)),
}


def model_class(name):
    module = importlib.import_module(FAMILIES[name][0])
    (cls,) = [v for v in vars(module).values()
              if isinstance(v, type) and issubclass(v, common.DigitsModel) and v.name == name]
    return cls


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_keeps_the_contract(name, tmp_path):
    cls = model_class(name)
    torch.manual_seed(0)
    model = cls.build(**FAMILIES[name][1])
    assert model.name == name and model.nll_kind in ("exact", "upper_bound", None)
    x = common.load_splits(torch.device("cpu"), quick=True)["train"][:16]
    loss = model.loss(x)
    assert loss.shape == () and math.isfinite(loss.item())
    values = model.train_step(x, model.configure_optimizer(1e-3))
    assert math.isfinite(values["loss"])
    model.eval()
    torch.manual_seed(1)
    samples = model.sample(5)
    assert samples.shape == (5, 64) and samples.min() >= 0 and samples.max() <= 16
    if model.nll_kind:
        with torch.no_grad():
            nll = model.test_nll(x[:3])
        assert nll.shape == (3,) and torch.isfinite(nll).all()
    else:
        with pytest.raises(NotImplementedError):
            model.test_nll(x[:3])

    state = common.TrainState(epoch=1, best_epoch=1, best_val=1.0, best_weights=common._cpu_state(model),
                              history=dict(train=[1.0], val=[1.0]))
    common.save_weights(tmp_path / f"{name}.pt", name, common.dataclasses.asdict(model.config), state)
    loaded = common.load_trained(cls, tmp_path, sampling=model.sampling)
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
    cls = model_class("ARM")
    model = cls.build(channels=8, layers=2)
    state = common.TrainState(best_weights=common._cpu_state(model))
    path = tmp_path / "ARM.pt"
    common.save_weights(path, "ARM", common.dataclasses.asdict(model.config), state)
    shipped = torch.load(path, weights_only=True)
    shipped["weights"]["nets.0.head.bias"][0] += 1.0  # one number changed inside the tensor data
    torch.save(shipped, path)
    with pytest.raises(common.UsageError, match="checksum"):
        common.load_trained(cls, tmp_path)
