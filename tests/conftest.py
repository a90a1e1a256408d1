"""Shared test helpers: run a script's main() and check every output it must write."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from plumbing import checkpoints  # noqa: E402


def run_main(main, argv):
    """main(argv) -> exit status (0 when it returns normally). One thread unless argv says
    otherwise (a later --threads wins): see one_thread below."""
    try:
        main(["--threads", "1", *argv])
    except SystemExit as exit_:
        return exit_.code
    return 0


def check_outputs(out, name, nll_kind):
    """Every file a run writes exists, decodes and holds sane values; returns the metrics."""
    from PIL import Image

    out = Path(out)
    for png in (f"{name}_loss_val_curve.png", f"{name}_samples.png", "_Digit_real_image.png"):
        with Image.open(out / png) as image:
            image.load()
            assert image.size[0] > 64 and image.size[1] > 64
    with Image.open(out / f"{name}_training.gif") as gif:
        assert gif.n_frames >= 2
    samples = np.load(out / f"{name}_samples.npy")
    assert samples.dtype == np.float32 and samples.ndim == 2 and samples.shape[1] == 64
    assert samples.shape[0] >= 64
    assert np.isfinite(samples).all() and samples.min() >= 0 and samples.max() <= 16
    metrics = json.loads((out / f"{name}_metrics.json").read_text())
    for key in ("model", "test_nll_nats", "test_bpd", "nll_kind", "epochs_run", "best_epoch",
                "train_seconds", "sample_seconds", "device", "seed", "num_params", "torch_version"):
        assert key in metrics, key
    assert metrics["model"] == name and metrics["nll_kind"] == nll_kind
    if nll_kind is None:
        assert metrics["test_nll_nats"] is None and metrics["test_bpd"] is None
    else:
        assert math.isfinite(metrics["test_nll_nats"]) and metrics["test_nll_nats"] > 0
        assert metrics["test_bpd"] == pytest.approx(metrics["test_nll_nats"] / (64 * math.log(2)))
    assert metrics["epochs_run"] >= 1 and 1 <= metrics["best_epoch"] <= metrics["epochs_run"]
    assert metrics["train_seconds"] > 0 and metrics["sample_seconds"] > 0 and metrics["num_params"] > 0
    # the whole run's seconds hold its phases; other samplers are benchmark.py --samplers', not the run's
    assert metrics["run_seconds"] >= metrics["train_seconds"] + metrics["quality_draws_seconds"]
    assert "other_samplers" not in metrics
    weights = torch.load(out / f"{name}.pt", map_location="cpu", weights_only=True)
    assert weights["model_name"] == name and weights["epoch"] == metrics["epochs_run"]
    assert weights["kind"] == "weights" and checkpoints.weights_checksum(weights["weights"]) == weights["weights_sha256"]
    assert "optimizer" not in weights and "frames" not in weights  # the small file that ships
    resume = torch.load(out / f"{name}_resume.pt", map_location="cpu", weights_only=True)
    assert resume["kind"] == "resume" and resume["state"]["epoch"] == metrics["epochs_run"]
    assert not list(out.glob(".*tmp*")), "temporary files left behind"
    return metrics


def guided_samples(model, y, guidance, seed=5):
    """model.sample(len(y), y) with its sampling setting guidance = w (classifier-free guidance),
    from torch seed `seed`: the draw the guidance tests compare."""
    import dataclasses

    model.sampling = dataclasses.replace(model.sampling, guidance=guidance)
    torch.manual_seed(seed)
    return model.sample(len(y), y)


def check_conditional_outputs(out, name, digits, nll_kind, num_samples=64):
    """The files of a `--conditional --digits ...` run (num_samples shared by the digits, class by
    class) and none of the default run's; returns the metrics."""
    out = Path(out)
    assert not (out / f"{name}.pt").exists() and not (out / f"{name}_samples.npy").exists()
    assert (out / f"{name}_conditional.pt").is_file() and (out / f"{name}_conditional_samples.png").is_file()
    metrics = json.loads((out / f"{name}_conditional_metrics.json").read_text())
    assert metrics["conditional"] and metrics["digits"] == list(digits) and 0 <= metrics["class_accuracy"] <= 1
    if nll_kind is not None:
        assert 0 <= metrics["generative_classifier_accuracy"] <= 1 and math.isfinite(metrics["test_nll_nats"])
    with np.load(out / f"{name}_conditional_samples.npz") as samples:
        per_class = num_samples // len(digits)
        assert samples["x"].shape == (per_class * len(digits), 64) and samples["x"].dtype == np.float32
        assert samples["y"].dtype == np.int64 and samples["y"].tolist() == [d for d in digits for _ in range(per_class)]
    return metrics


@pytest.fixture(autouse=True)
def one_thread():
    """Tests run single-threaded: steady on a busy machine, where 2 threads made the EBM's SGLD
    test 20x slower (measured), and the tests share the cores with each other's processes."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
