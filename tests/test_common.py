"""The shared core: split, transforms, flags, seeding, resume, sample-only, interruption,
atomic outputs and checkpoint checks. The loop is exercised through the ARM script with a
tiny configuration, since runs.run never branches on the family."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import autoregressive_model as arm_script
import common
from conftest import check_outputs, run_main
from plumbing import checkpoints, files, runs

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--quick", "--no-progress", "--channels", "8", "--layers", "2"]


def history(out):
    return torch.load(Path(out) / "ARM.pt", weights_only=True)["history"]


def resume_history(out):
    return torch.load(Path(out) / "ARM_resume.pt", weights_only=True)["state"]["history"]


# --- data and transforms -------------------------------------------------------


def test_split_sizes_and_order():
    pixels, labels = common.load_digits_arrays()
    splits = common.load_splits(torch.device("cpu"))
    assert [len(splits[k]) for k in ("train", "val", "test")] == [1000, 350, 447]
    assert torch.equal(splits["test"], torch.from_numpy(pixels[1350:]))
    assert splits["train"].dtype == torch.float32 and splits["train"].max() == 16
    label_splits = common.load_label_splits(torch.device("cpu"))
    assert torch.equal(label_splits["val"], torch.from_numpy(labels[1000:1350]))


def test_transforms_and_log_jacobian():
    x = torch.arange(17.0).repeat(4)[:64]
    y = common.pixels_to_pm1(x)
    assert y.min() == -1 and y.max() == 1
    assert torch.allclose(common.pm1_to_pixels(y), x)
    jacobian = torch.autograd.functional.jacobian(common.pixels_to_pm1, x)
    assert common.PM1_LOGDET == pytest.approx(torch.linalg.slogdet(jacobian).logabsdet.item(), abs=1e-4)
    torch.manual_seed(0)
    v = common.dequantize(x.expand(1000, 64))
    assert ((v >= x) & (v < x + 1)).all()
    assert (v - x).mean().item() == pytest.approx(0.5, abs=0.01)
    assert common.nats_to_bpd(64 * math.log(2)) == pytest.approx(1.0)


def test_uniform_dequantized_density_gives_the_discrete_uniform_nll():
    """A uniform density on [0, 17)^64 is a bound that is tight: 64 log 17 nats."""
    x = torch.randint(0, 17, (10, 64)).float()
    v = common.dequantize(x)
    log_density = torch.where((v >= 0) & (v < 17), -math.log(17), -math.inf).sum(1)
    assert torch.allclose(-log_density, torch.full((10,), 64 * math.log(17)))


# --- flags and devices ---------------------------------------------------------


@pytest.mark.parametrize("argv, words", [
    (["--epochs", "-1"], "integer >= 1"),
    (["--epochs", "abc"], "integer >= 1"),
    (["--lr", "0"], "number > 0"),
    (["--lr", "nan"], "number > 0"),
    (["--device", "tpu"], "cpu"),
    (["--ema", "1.5"], "[0, 1)"),
    (["--bogus"], "unrecognized"),
    (["--resume", "--sample-only"], "exclude"),
])
def test_bad_flags_exit_2_with_one_line(argv, words, tmp_path, capsys):
    assert run_main(arm_script.main, argv + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_missing_device_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run_main(arm_script.main, TINY + ["--device", "cuda", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "cuda" in err and "not available" in err and "Traceback" not in err


def test_out_that_is_a_file_exits_2_before_training(tmp_path, capsys):
    target = tmp_path / "a_file"
    target.write_text("x")
    assert run_main(arm_script.main, TINY + ["--out", str(target)]) == 2
    assert run_main(arm_script.main, TINY + ["--out", str(target / "below")]) == 2
    assert "--out" in capsys.readouterr().err
    assert target.read_text() == "x"


# --- reproducibility, resume, sample-only ----------------------------------------


def test_the_loop_validates_every_k_epochs_and_keeps_a_validated_best(tmp_path):
    assert run_main(arm_script.main, TINY + ["--epochs", "5", "--val-every", "2", "--out", str(tmp_path)]) == 0
    val = history(tmp_path)["val"]
    validated = [epoch for epoch, value in enumerate(val, start=1) if value is not None]
    assert len(val) == 5 and validated == [2, 4, 5]  # every 2nd epoch and the last
    weights = torch.load(tmp_path / "ARM.pt", weights_only=True)
    assert weights["best_epoch"] in validated and weights["best_val"] == min(val[e - 1] for e in validated)
    check_outputs(tmp_path, "ARM", "exact")


def test_same_seed_same_losses_other_seed_other_losses(tmp_path):
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        assert run_main(arm_script.main, TINY + ["--seed", seed, "--out", str(tmp_path / name)]) == 0
    assert history(tmp_path / "a") == history(tmp_path / "b")
    assert history(tmp_path / "a") != history(tmp_path / "c")
    samples = [np.load(tmp_path / n / "ARM_samples.npy") for n in "ab"]
    assert np.array_equal(*samples)


def test_resumed_run_ends_with_the_same_losses_as_an_uninterrupted_one(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    every = TINY + ["--val-every", "1"]  # a run validates its last epoch: here the 2-epoch run's 2nd as well
    assert run_main(arm_script.main, every + ["--epochs", "4", "--out", str(straight)]) == 0
    assert run_main(arm_script.main, every + ["--epochs", "2", "--out", str(resumed)]) == 0
    assert len(history(resumed)["train"]) == 2 == len(resume_history(resumed)["train"])
    assert run_main(arm_script.main, every + ["--epochs", "4", "--resume", "--out", str(resumed)]) == 0
    assert history(resumed) == history(straight)
    check_outputs(resumed, "ARM", "exact")
    with Image.open(resumed / "ARM_training.gif") as gif:
        assert gif.n_frames == 4  # frames from before the resume are kept
    a = json.loads((straight / "ARM_metrics.json").read_text())
    b = json.loads((resumed / "ARM_metrics.json").read_text())
    assert a["test_nll_nats"] == pytest.approx(b["test_nll_nats"], abs=1e-4)


@pytest.mark.parametrize("seconds, epochs_written", [("0", [1, 2, 3]), ("1000", [3])])
def test_resume_checkpoint_every_epoch_or_when_training_ends(seconds, epochs_written, tmp_path, monkeypatch):
    """--checkpoint-seconds 0 writes the resume file after every epoch; a long interval writes it
    once, when training ends (it is never missing at the end)."""
    written, original = [], checkpoints.save_resume
    monkeypatch.setattr(runs, "save_resume", lambda path, *rest: written.append(rest[3].epoch) or original(path, *rest))
    assert run_main(arm_script.main, TINY + ["--epochs", "3", "--patience", "3", "--checkpoint-seconds", seconds,
                                             "--out", str(tmp_path)]) == 0
    assert written == epochs_written
    assert len(resume_history(tmp_path)["train"]) == 3


def test_sample_only_reproduces_samples_and_metrics_without_training(tmp_path, capsys):
    assert run_main(arm_script.main, TINY + ["--sample-only", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "ARM.pt" in err and "python autoregressive_model.py" in err
    assert run_main(arm_script.main, TINY + ["--out", str(tmp_path)]) == 0
    before = np.load(tmp_path / "ARM_samples.npy")
    metrics_before = json.loads((tmp_path / "ARM_metrics.json").read_text())
    checkpoint_before = (tmp_path / "ARM.pt").read_bytes()
    (tmp_path / "ARM_samples.npy").unlink()
    capsys.readouterr()
    # by default only the samples, their picture and their quality: no NLL, and the summary says so
    assert run_main(arm_script.main, TINY + ["--sample-only", "--out", str(tmp_path)]) == 0
    assert np.array_equal(np.load(tmp_path / "ARM_samples.npy"), before)
    metrics = json.loads((tmp_path / "ARM_metrics.json").read_text())
    assert metrics["test_nll_nats"] is None and metrics["evaluated"] is False and metrics["stopped"] == "sample_only"
    assert metrics["frechet_distance"] == pytest.approx(metrics_before["frechet_distance"], abs=1e-6)
    err = capsys.readouterr().err
    assert "sampled 64 in" in err and "trained" not in err and "not computed (--evaluate)" in err
    wrote = err.split("wrote into ")[1]
    assert "ARM_samples.npy" in wrote and "ARM.pt" not in wrote and "curve" not in wrote and "gif" not in wrote
    # --evaluate: the numbers of the training run, from the weights alone
    assert run_main(arm_script.main, TINY + ["--sample-only", "--evaluate", "--out", str(tmp_path)]) == 0
    metrics = json.loads((tmp_path / "ARM_metrics.json").read_text())
    assert metrics["test_nll_nats"] == pytest.approx(metrics_before["test_nll_nats"], abs=1e-4)
    assert metrics["epochs_run"] == metrics_before["epochs_run"] and metrics["evaluated"] is True
    assert (tmp_path / "ARM.pt").read_bytes() == checkpoint_before


def test_sample_only_reads_weights_from_anywhere_and_writes_only_into_out(tmp_path, capsys):
    """--weights FILE samples weights kept elsewhere (the shipped ones) into another --out; the
    folder of the weights is left as it was, and a missing OUT/NAME.pt names --weights."""
    shipped, mine = tmp_path / "shipped", tmp_path / "mine"
    assert run_main(arm_script.main, TINY + ["--out", str(shipped)]) == 0
    before = {p.name: p.read_bytes() for p in shipped.iterdir() if p.is_file()}
    capsys.readouterr()
    assert run_main(arm_script.main, TINY + ["--sample-only", "--out", str(mine)]) == 2
    assert "with --weights results/ARM.pt" in capsys.readouterr().err  # the shipped weights, named
    assert run_main(arm_script.main, TINY + ["--sample-only", "--out", str(mine), "--weights",
                                             str(shipped / "ARM.pt")]) == 0
    assert {p.name: p.read_bytes() for p in shipped.iterdir() if p.is_file()} == before
    assert np.array_equal(np.load(mine / "ARM_samples.npy"), np.load(shipped / "ARM_samples.npy"))
    assert not (mine / "ARM.pt").exists()
    err = capsys.readouterr().err
    assert f"from {shipped / 'ARM.pt'}" in err
    with pytest.raises(SystemExit) as stopped:
        arm_script.main(TINY + ["--weights", str(shipped / "ARM.pt"), "--out", str(mine)])
    assert stopped.value.code == 2 and "goes with --sample-only" in capsys.readouterr().err


# --- bad checkpoints -------------------------------------------------------------


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


@pytest.mark.parametrize("damage, words", [
    ("truncate", "truncated or corrupted"),
    ("garbage", "truncated or corrupted"),
    ("pickled_code", "refused"),
    ("other_model", "checkpoint of RealNVP"),
    ("other_config", "another configuration"),
    ("old_layout", "older or foreign layout (missing epoch_seconds)"),
    ("wrong_type", "damaged: best_val is a str"),
    ("damaged_weights", "do not match their sha256"),
])
def test_bad_checkpoints_exit_2_with_one_line(damage, words, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_main(arm_script.main, TINY + ["--out", str(tmp_path)]) == 0
    path = tmp_path / "ARM.pt"
    argv = TINY + ["--sample-only", "--out", str(tmp_path)]
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00not a checkpoint" * 100)
    elif damage == "pickled_code":
        torch.save({"model_name": "ARM", "payload": Payload()}, path)
    elif damage == "other_model":
        checkpoint = torch.load(path, weights_only=True)
        checkpoint["model_name"] = "RealNVP"
        torch.save(checkpoint, path)
    elif damage == "other_config":
        argv = [a if a != "8" else "16" for a in argv]
    elif damage in ("old_layout", "wrong_type", "damaged_weights"):
        checkpoint = torch.load(path, weights_only=True)
        if damage == "old_layout":
            del checkpoint["epoch_seconds"]
        elif damage == "wrong_type":
            checkpoint["best_val"] = "0.5"
        else:
            checkpoint["weights"]["nets.0.head.bias"][3] *= 1.5  # bytes altered inside the tensor data
        torch.save(checkpoint, path)
    capsys.readouterr()
    assert run_main(arm_script.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "pwned.txt").exists()


# --- interruption, non-finite losses, atomic writes ------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_checkpoints_writes_outputs_and_exits_130(signum, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, str(ROOT / "autoregressive_model.py"), *TINY, "--threads", "1",
                             "--epochs", "500", "--patience", "500", "--checkpoint-seconds", "0", "--val-every", "1",
                             "--out", str(tmp_path)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:  # interrupt once two epochs are checkpointed (two GIF frames)
        time.sleep(0.2)
        if (tmp_path / "ARM_resume.pt").exists() and resume_history(tmp_path)["train"][1:]:
            break
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    metrics = check_outputs(tmp_path, "ARM", "exact")
    assert metrics["interrupted"] is True and metrics["epochs_run"] < 500


def test_non_finite_loss_keeps_best_state_writes_outputs_exits_1(tmp_path, capsys, monkeypatch):
    calls = {"n": 0}
    original = arm_script.ARM.loss

    def failing_loss(self, x, y):
        calls["n"] += self.training  # training steps only, not validation
        loss = original(self, x, y)
        return loss * math.nan if calls["n"] > 9 else loss  # 4 steps an epoch: epoch 3, step 2

    monkeypatch.setattr(arm_script.ARM, "loss", failing_loss)
    assert run_main(arm_script.main, TINY + ["--epochs", "4", "--val-every", "1", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "non-finite" in err and "epoch 3, step 2" in err
    metrics = check_outputs(tmp_path, "ARM", "exact")
    assert metrics["epochs_run"] == 2 and metrics["best_epoch"] in (1, 2)
    assert metrics["stopped"] == "non_finite"
    best = torch.load(tmp_path / "ARM.pt", weights_only=True)["weights"]
    assert all(torch.isfinite(v).all() for v in best.values() if v.is_floating_point())


def test_a_run_stopped_before_its_first_validation_writes_no_weights_and_can_resume(tmp_path, capsys, monkeypatch):
    calls = {"n": 0}
    original = arm_script.ARM.loss

    def interrupted_loss(self, x, y):
        calls["n"] += self.training
        if calls["n"] > 9:  # 4 steps an epoch: a signal in epoch 3, before the validation of epoch 5
            raise KeyboardInterrupt
        return original(self, x, y)

    monkeypatch.setattr(arm_script.ARM, "loss", interrupted_loss)
    flags = TINY + ["--epochs", "6", "--val-every", "5", "--out", str(tmp_path)]
    assert run_main(arm_script.main, flags) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"ARM: stopped before the first validated epoch (every 5); no weights to write; "
                       f"--resume continues from {tmp_path / 'ARM_resume.pt'}")
    assert not (tmp_path / "ARM.pt").exists() and not (tmp_path / "ARM_metrics.json").exists()
    assert resume_history(tmp_path)["val"] == [None, None]  # two epochs kept
    monkeypatch.setattr(arm_script.ARM, "loss", original)
    assert run_main(arm_script.main, flags + ["--resume"]) == 0
    weights = torch.load(tmp_path / "ARM.pt", weights_only=True)
    assert weights["best_epoch"] in (5, 6) and weights["epoch"] == 6


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "x.json"
    files.save_json(path, {"a": 1})

    def broken(tmp):
        tmp.write_text('{"a": ')
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        files.atomic_write(path, broken)
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_json_has_no_nan():
    assert files.finite_or_none({"a": [1.0, math.nan], "b": math.inf}) == {"a": [1.0, None], "b": None}


# --- no input ends in a traceback ----------------------------------------------------

FLAG_VALUES = {
    "--epochs": st.sampled_from(["1", "0", "-2", "x", "1e3", ""]),
    "--batch-size": st.sampled_from(["64", "0", "-1", "a"]),
    "--lr": st.sampled_from(["1e-3", "0", "-1", "inf", "nan", "x"]),
    "--patience": st.sampled_from(["1", "0", "x"]),
    "--ema": st.sampled_from(["0", "0.5", "1", "-0.1"]),
    "--seed": st.sampled_from(["0", "7", "-1", "x", str(2**64), str(2**31)]),
    "--device": st.sampled_from(["cpu", "auto", "gpu", ""]),
    "--threads": st.sampled_from(["1", "0", "x", "100000", "auto"]),
    "--num-samples": st.sampled_from(["8", "0", "x", "1"]),
    "--gif-every": st.sampled_from(["1", "0"]),
    "--channels": st.sampled_from(["4", "0", "x"]),
    "--dropout": st.sampled_from(["0.1", "1", "-1"]),
}
SWITCHES = ["--resume", "--sample-only", "--unknown-flag", "stray"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flags=st.dictionaries(st.sampled_from(sorted(FLAG_VALUES)), st.none(), max_size=4).flatmap(
    lambda keys: st.fixed_dictionaries({k: FLAG_VALUES[k] for k in keys})),
    switches=st.lists(st.sampled_from(SWITCHES), max_size=2, unique=True))
def test_random_arguments_end_in_exit_0_or_2_never_a_traceback(flags, switches, tmp_path_factory, capsys):
    out = tmp_path_factory.mktemp("fuzz")
    argv = ["--quick", "--no-progress", "--epochs", "1", "--layers", "1", "--out", str(out)]
    for flag, value in flags.items():
        argv += [flag, value]
    argv += switches
    code = run_main(arm_script.main, argv)
    err = capsys.readouterr().err
    assert code in (0, 2), (argv, err)
    assert "Traceback" not in err
    if code == 2:
        assert "error:" in err


def test_resume_needs_the_training_checkpoint_and_the_same_training_flags(tmp_path, capsys):
    """The weights file alone (a fresh clone) is enough for --sample-only, not for --resume; and
    --resume with another learning rate or batch size is refused instead of recorded."""
    assert run_main(arm_script.main, TINY + ["--epochs", "1", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    for flags, words in ((["--lr", "0.5"], "--lr 0.007 (checkpoint) vs 0.5 (now)"),
                         (["--batch-size", "7"], "--batch-size 64 (checkpoint) vs 7 (now)")):
        assert run_main(arm_script.main, TINY + ["--epochs", "2", "--resume", *flags, "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err
    assert len(history(tmp_path)["train"]) == 1  # nothing was trained or overwritten
    (tmp_path / "ARM_resume.pt").unlink()
    assert run_main(arm_script.main, TINY + ["--epochs", "2", "--resume", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "ARM_resume.pt" in err and "weights only" in err and len(err.splitlines()) == 1
    assert run_main(arm_script.main, TINY + ["--sample-only", "--out", str(tmp_path)]) == 0


def test_one_sample_is_written_without_a_frechet_distance(tmp_path):
    """A covariance needs two samples: with one, the distance is null instead of a crash."""
    assert run_main(arm_script.main, TINY + ["--num-samples", "1", "--out", str(tmp_path)]) == 0
    metrics = json.loads((tmp_path / "ARM_metrics.json").read_text())
    assert metrics["frechet_distance"] is None and 0 <= metrics["copy_rate"] <= 1
    assert np.load(tmp_path / "ARM_samples.npy").shape == (1, 64)


def test_stale_temporary_files_of_dead_processes_are_removed_at_start(tmp_path):
    stale = tmp_path / files.temporary_name("ARM_metrics.json", 999999999)  # no such process
    stale.write_text('{"trunc')
    mine = tmp_path / files.temporary_name("x.json")  # a live process's: left alone
    mine.write_text("{}")
    assert run_main(arm_script.main, TINY + ["--epochs", "1", "--out", str(tmp_path)]) == 0
    assert not stale.exists() and mine.exists()


def test_a_failed_write_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    def refuse(path, data):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(runs, "save_json", refuse)
    assert run_main(arm_script.main, TINY + ["--epochs", "1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "ARM_metrics.json" in err and "Permission denied" in err and len(err.splitlines()) == 1
    check = json.loads  # the weights written before the failure are whole
    assert torch.load(tmp_path / "ARM.pt", weights_only=True)["epoch"] == 1 and check("{}") == {}


def test_sigint_during_sample_only_is_one_line_and_exit_130(tmp_path):
    import variational_autoencoder as vae_script

    tiny_vae = ["--quick", "--no-progress", "--hidden", "16", "--latent", "2", "--channels", "4",
                "--components", "3", "--iwae-samples", "4"]
    assert run_main(vae_script.main, tiny_vae + ["--epochs", "1", "--out", str(tmp_path)]) == 0
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, str(ROOT / "variational_autoencoder.py"), *tiny_vae[:-1], "300000",
                             "--threads", "1", "--sample-only", "--evaluate", "--out", str(tmp_path)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(20)  # loading done, the test NLL under way (300000 importance samples per image take minutes)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)  # the second one stops at once
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert "interrupted" in stderr.strip().splitlines()[-1]
    assert not list(tmp_path.glob(".*tmp*"))


def test_a_run_ends_with_a_short_human_summary(tmp_path, capsys):
    """stdout keeps its one JSON line; stderr ends with the headline numbers and the files."""
    assert run_main(arm_script.main, TINY + ["--epochs", "1", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["model"] == "ARM"
    lines = captured.err.strip().splitlines()[-2:]
    assert lines[0].startswith("ARM: test NLL ") and "Frechet distance" in lines[0] and "trained" in lines[0]
    assert lines[1].startswith(f"  wrote into {tmp_path}/: ARM.pt, ")
    written = lines[1].split(": ", 1)[1].split(", ")
    assert set(written) == {p.name for p in tmp_path.iterdir() if not p.name.startswith(("_digit_", "."))}


def test_a_full_disk_is_an_os_error_naming_the_file_and_the_old_file_stays(tmp_path):
    path = tmp_path / "ARM.pt"
    checkpoints.save_checkpoint(path, {"a": torch.ones(3)})

    def full(tmp):
        tmp.write_bytes(b"partial")
        raise OSError(28, "No space left on device")  # as a write() to a full disk: no file name

    with pytest.raises(OSError) as error:
        files.atomic_write(path, full)
    assert error.value.filename == str(path) and "No space" in error.value.strerror
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ARM.pt"]


@pytest.mark.parametrize("idle, usable, expected", [(0.0, 2, 1), (0.9, 2, 1), (1.1, 2, 1), (1.6, 2, 2),
                                                     (2.0, 2, 2), (7.5, 8, 2), (3.0, 1, 1), (None, 2, 2)])
def test_auto_threads_takes_the_idle_cores(idle, usable, expected, monkeypatch):
    monkeypatch.setattr(runs, "idle_cores", lambda interval=0.2: idle)
    monkeypatch.setattr(runs.os, "sched_getaffinity", lambda pid: set(range(usable)), raising=False)
    assert runs.auto_threads() == expected


def test_idle_cores_sees_a_busy_core():
    """While a spinning process holds a core, at most the other cores can be idle."""
    import multiprocessing

    if not Path("/proc/stat").is_file():
        pytest.skip("no /proc/stat")
    stop = multiprocessing.Event()
    spinner = multiprocessing.Process(target=_spin, args=(stop,))
    spinner.start()
    try:
        time.sleep(0.2)
        idle = runs.idle_cores(0.3)
    finally:
        stop.set()
        spinner.join()
    assert 0 <= idle <= (os.cpu_count() or 1) - 0.7


def _spin(stop):
    while not stop.is_set():
        pass


# --- the shared maths: box posterior, RK4 with divergence, residual MLP --------------


def quadrature_box_posterior(logits, x_tilde, sigma_tilde, half_width, step=5e-4):
    """Brute-force oracle in float64: y uniform in the box c_k +- h of a level k ~ softmax(logits),
    observed as x~ = y + sigma~ eps; tanh-sinh quadrature on each box (nodes y = c_k + h tanh(pi/2 sinh s),
    s in [-4, 4] by `step`: dense near the edges, where a far observation puts the posterior), or the
    17 centres for h = 0; weights normalised in log space. -> (p(k | x~) (17,), E[eps | x~], E[y | x~])."""
    centers = torch.arange(17, dtype=torch.float64) / 8 - 1
    if half_width:
        s = torch.arange(-4, 4 + step / 2, step, dtype=torch.float64)
        inner = math.pi / 2 * torch.sinh(s)
        offsets = half_width * torch.tanh(inner)
        log_dy = torch.log(torch.cosh(s)) - 2 * torch.log(torch.cosh(inner))  # + constants
    else:
        offsets, log_dy = torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    y = centers[:, None] + offsets  # (17, nodes)
    log_weight = logits.log_softmax(0)[:, None] + log_dy - 0.5 * ((x_tilde - y) / sigma_tilde) ** 2
    weight = torch.softmax(log_weight.flatten(), 0).view_as(y)
    return weight.sum(1), (weight * (x_tilde - y) / sigma_tilde).sum(), (weight * y).sum()


@pytest.mark.parametrize("half_width", [common.PM1_BIN_HALF_WIDTH, 0.0])
def test_box_posterior_matches_a_quadrature_oracle(half_width):
    """common.box_posterior against quadrature over the boxes (h > 0) or the sum over the 17 point
    masses (h = 0), in float64: from boxes wide in noise units (sigma~ = 1e-3) to very narrow ones
    (sigma~ = 1e4, FM's head near t = 0: w = 6e-6), for x~ inside, between and far outside the boxes;
    observed as z = alpha x + sigma eps with alpha != 1, so that only sigma / alpha = sigma~ counts."""
    torch.manual_seed(0)
    logits = torch.randn(17, dtype=torch.float64) * 2
    x_tilde = torch.tensor([-3.0, -1.0, -0.9375, 0.01, 0.5626, 1.06, 2.0, 30.0], dtype=torch.float64)
    alpha = torch.full((1,), 0.7, dtype=torch.float64)
    for sigma_tilde in (1e-3, 0.02, 0.3, 5.0, 150.0, 1e4):
        got = common.box_posterior(logits.expand(1, len(x_tilde), 17), alpha * x_tilde[None], alpha,
                                   alpha * sigma_tilde, half_width=half_width)
        for i, value in enumerate(x_tilde.tolist()):
            probs, mean_eps, mean_y = quadrature_box_posterior(logits, value, sigma_tilde, half_width)
            where = (sigma_tilde, value)
            assert torch.allclose(got.probs[0, i], probs, atol=1e-9), where  # measured: 2e-11
            assert abs(got.mean_noise[0, i].item() - mean_eps.item()) <= 1e-7 * max(1.0, abs(mean_eps.item())), where
            assert abs(got.mean_data[0, i].item() - mean_y.item()) <= 2e-7, where  # measured: 3.5e-8


def test_box_posterior_of_vanishing_boxes_is_that_of_point_masses_and_float32_stays_finite():
    """h -> 0 is continuous (h = 1e-6 against the point masses of h = 0). In float32 every output is
    finite, even for observations a thousand times outside the data range (the truncated-normal mean
    is clamped to its interval), and it matches float64 for observations of data, z = alpha (y + sigma~
    eps), while the boxes are not narrow (sigma~ <= 1; for sigma~ >= 100 float32 log-masses of boxes
    of width 2 h / sigma~ < 1e-3 lose precision: E[x | z] measured up to 0.06 off)."""
    torch.manual_seed(1)
    logits = torch.randn(2, 64, 17, dtype=torch.float64) * 2
    z = torch.randn(2, 64, dtype=torch.float64) * 2
    alpha, sigma = torch.tensor([1.0, 0.3], dtype=torch.float64), torch.tensor([0.05, 2.0], dtype=torch.float64)
    points = common.box_posterior(logits, z, alpha, sigma, half_width=0)
    tiny = common.box_posterior(logits, z, alpha, sigma, half_width=1e-6)
    for field in ("probs", "mean_noise", "mean_data"):
        assert torch.allclose(getattr(points, field), getattr(tiny, field), atol=1e-6), field
    y = (torch.rand(2, 64, dtype=torch.float64) * 2 - 1) * 17 / 16
    eps = torch.randn(2, 64, dtype=torch.float64)
    for sigma_tilde in (1e-6, 1e-4, 1e-2, 1.0, 1e2, 1e4):
        for scale in (1.0, 0.01):
            alpha = torch.full((2,), scale, dtype=torch.float64)
            z = scale * (y + sigma_tilde * eps)
            exact = common.box_posterior(logits, z, alpha, sigma_tilde * alpha)
            single = common.box_posterior(logits.float(), z.float(), alpha.float(), (sigma_tilde * alpha).float())
            far = common.box_posterior(logits.float(), 1e3 * z.float(), alpha.float(), (sigma_tilde * alpha).float())
            assert all(torch.isfinite(getattr(p, field)).all() for p in (single, far)
                       for field in ("probs", "mean_noise", "mean_data"))
            if sigma_tilde <= 1:
                assert torch.allclose(single.probs.double(), exact.probs, atol=1e-4)
                assert torch.allclose(single.mean_noise.double(), exact.mean_noise, atol=1e-4)
                assert torch.allclose(single.mean_data.double(), exact.mean_data, atol=1e-5)


def test_rk4_with_divergence_on_a_linear_flow():
    """dx/dt = A x: x(T) = exp(T A) x(0), and the density carried from N(0, I) is
    N(0, exp(T A) exp(T A)^T), whose log-density changes by -T tr A along each path. Integrating back
    from x(T) (decreasing, unequal nodes) recovers x(0), the integral of the divergence is -T tr A
    (exact: it is constant), and log N(x(0); 0, I) + the integral is the log-density at T."""
    torch.manual_seed(2)
    d, end = 4, 1.5
    a = torch.randn(d, d, dtype=torch.float64) * 0.5
    x0 = torch.randn(5, d, dtype=torch.float64)
    flow = torch.linalg.matrix_exp(end * a)
    x_end = x0 @ flow.T

    def field(x, s):
        return x @ a.T, torch.full((len(x),), a.trace().item(), dtype=x.dtype)

    nodes = (end * torch.linspace(1, 0, 41, dtype=torch.float64) ** 1.5).tolist()  # unequal, decreasing
    back, integral = common.rk4_with_divergence(field, x_end, nodes)
    assert torch.allclose(back, x0, atol=1e-8)
    assert torch.allclose(integral, torch.full((5,), -end * a.trace().item(), dtype=torch.float64), atol=1e-12)
    density = torch.distributions.MultivariateNormal(torch.zeros(d, dtype=torch.float64), flow @ flow.T)
    assert torch.allclose(common.standard_normal_log_prob(back) + integral, density.log_prob(x_end), atol=1e-7)
    forward, _ = common.rk4_with_divergence(field, x0, nodes[::-1])
    assert torch.allclose(forward, x_end, atol=1e-7)


def test_residual_mlp_starts_at_zero_and_its_conditioning_matters():
    """The output layer starts at zero; with random weights, e changes the output (time embedding),
    an unconditional MLP takes no conditioning, and dropout acts only in training."""
    torch.manual_seed(3)
    net = common.ResidualMLP(6, 3, 16, 2, dropout=0.5, embedding=common.FourierTimeEmbedding(8), embed=8)
    x, u = torch.randn(4, 6), torch.rand(4)
    assert torch.equal(net.eval()(x, u), torch.zeros(4, 3))
    torch.nn.init.normal_(net.out.weight)
    assert not torch.allclose(net(x, u), net(x, 1 - u))
    assert torch.equal(net(x, u), net(x, u)) and not torch.equal(net.train()(x, u), net(x, u))
    plain = common.ResidualMLP(6, 3, 16, 1).eval()
    assert plain.blocks[0].cond is None and plain(x).shape == (4, 3)


def test_ema_update_averages_the_weights_and_copies_the_buffers():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = common.EMA(net, decay=0.9)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    net(torch.randn(5, 3))  # moves the BatchNorm's running statistics (buffers)
    ema.update(net)
    for key, value in net.state_dict().items():
        if key in ema.parameter_names:  # w_ema <- 0.9 w_ema + 0.1 w
            assert torch.allclose(ema.shadow[key], 0.9 * before[key] + 0.1 * value, atol=1e-6), key
        else:
            assert torch.equal(ema.shadow[key], value), key
    assert not torch.equal(ema.shadow["0.weight"], net.state_dict()["0.weight"])
