"""The registry: every family once, in the order of the tables; every tool reads it."""

import dataclasses
import importlib
from pathlib import Path

from plumbing import UsageError


@dataclasses.dataclass(frozen=True)
class Family:
    name: str  # the model's name: OUT/NAME.pt, NAME_metrics.json, ...
    script: str  # the script that defines it, beside this file
    model_class: str  # its DigitsModel subclass in that script


FAMILIES = (
    Family("ARM", "autoregressive_model.py", "ARM"),
    Family("RealNVP", "flow_based_model_realnvp.py", "RealNVP"),
    Family("EBM", "energy_based_model.py", "EBM"),
    Family("ScM", "score_matching.py", "ScoreMatching"),
    Family("SBGM", "score_based_generative_model.py", "SBGM"),
    Family("DDPM", "ddpm.py", "DDPM"),
    Family("VAE", "variational_autoencoder.py", "VAE"),
    Family("GAN", "generative_adversarial_network.py", "GAN"),
    Family("FM", "flow_matching.py", "FM"),
    Family("MDM", "masked_diffusion.py", "MDM"),
)


ROOT = Path(__file__).resolve().parent.parent  # the repository: the scripts, results/, README.md, docs/
SCRIPTS = {entry.name: entry.script for entry in FAMILIES}  # in the order of the tables


def family(name):
    """The registered Family called `name`; an unknown name is a UsageError naming the valid ones."""
    for entry in FAMILIES:
        if entry.name == name:
            return entry
    raise UsageError(f"unknown family {name!r}; choose from {', '.join(f.name for f in FAMILIES)}")


def model_class(name):
    """The DigitsModel subclass of the family `name`, imported from its script."""
    from common import DigitsModel

    entry = family(name)
    module = importlib.import_module(Path(entry.script).stem)
    cls = getattr(module, entry.model_class)
    assert issubclass(cls, DigitsModel) and cls.name == name, f"{entry.script} registers {name} wrongly"
    return cls


def stem(name, conditional):
    """The stem of a run's files: NAME, or NAME_conditional for a model of p(x | y)."""
    return f"{name}_conditional" if conditional else name


def output_paths(out, stem, conditional=False):
    """Every output file of a run, stem NAME or NAME_conditional; a conditional run's samples go to
    an .npz with their labels."""
    return {kind: out / f"{stem}{suffix}" for kind, suffix in dict(
        weights=".pt", resume="_resume.pt", curve="_loss_val_curve.png", gif="_training.gif",
        grid="_samples.png", npy="_samples.npz" if conditional else "_samples.npy",
        metrics="_metrics.json").items()}
