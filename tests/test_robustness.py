"""Issue 29: nothing lost around the tools. Safe temporary-file cleanup, signals in leaderboard.py,
ood.py and benchmark.py (real processes and signals, with a stand-in model script that behaves
like one: it finishes its outputs on the first signal and exits 130), non-finite samples,
damaged or partial results files, currency by settings, one run per family and folder, size
limits, and the smaller items. Every case: exit 0, 1, 2 or 130, no traceback, nothing outside
the project's own outputs touched, shipped weights and samples never replaced by a partial run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import autoregressive_model as arm_script
import benchmark
import common
import leaderboard
import ood
import plumbing
from conftest import run_main
from plumbing import checkpoints, files, quality, registry, results, runs

ROOT = registry.ROOT
TINY = ["--quick", "--no-progress", "--channels", "8", "--layers", "2", "--members", "1",
        "--num-samples", "8", "--epochs", "1"]  # a few seconds; 8 samples: no extended measures


@pytest.fixture(autouse=True)
def fingerprint_once(monkeypatch):
    """The fingerprints parse common.py and a script: once per test, not per call."""
    import functools

    for name in ("weights_fingerprint", "scoring_fingerprint"):
        monkeypatch.setattr(results, name, functools.lru_cache(getattr(checkpoints, name)))


def file_bytes(folder):
    """name -> bytes of every plain file in a folder (the project's outputs and the user's)."""
    return {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}


def one_line(text):
    lines = text.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def last_line(text):
    """The closing line of a tool that printed progress notes before it (ood.py's "training ...")."""
    assert "Traceback" not in text, text
    return text.strip().splitlines()[-1]


# -----------------------------------------------------------------------------
# the temporary-file cleanup removes only what this project provably made


def test_cleanup_removes_only_this_projects_stale_temporaries(tmp_path):
    user = {".thesis.tmp20240101.tex": b"thesis", ".draft.tmp4242.md": b"draft", ".notes.tmp1.md": b"n",
            ".ARM_metrics.json.tmp-digits-12x.json": b"not a pid",
            ".ARM_metrics.tmp999999999.json": b"a form this project no longer writes"}
    for name, data in user.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / ".x.tmp99999.md").mkdir()  # a folder with such a name: never touched
    (tmp_path / ".ARM.pt.tmp-digits-999999999.pt").mkdir()
    (tmp_path / ".target").write_bytes(b"linked")
    (tmp_path / ".ARM_samples.npy.tmp-digits-999999998.npy").symlink_to(tmp_path / ".target")
    ours = [tmp_path / files.temporary_name("ARM_metrics.json", 999999999),
            tmp_path / files.temporary_name("ARM.pt", 999999999, tag="0a1b2c3d")]
    for path in ours:
        path.write_bytes(b"{\"trunc")
    alive = tmp_path / files.temporary_name("ARM.pt", os.getppid())  # a live process's: left alone
    alive.write_bytes(b"x")
    files.remove_stale(tmp_path)
    assert not any(p.exists() for p in ours)
    assert all((tmp_path / name).read_bytes() == data for name, data in user.items())
    assert (tmp_path / ".x.tmp99999.md").is_dir() and (tmp_path / ".ARM.pt.tmp-digits-999999999.pt").is_dir()
    assert (tmp_path / ".ARM_samples.npy.tmp-digits-999999998.npy").is_symlink() and alive.exists()
    assert (tmp_path / ".target").read_bytes() == b"linked"


def test_atomic_write_uses_the_marked_temporary_name(tmp_path):
    seen = []
    files.atomic_write(tmp_path / "a.json", lambda tmp: (seen.append(tmp.name), tmp.write_text("{}")))
    tag = seen[0].rsplit("-", 1)[1].split(".")[0]  # random: a name no one can plant a link at in advance
    assert seen == [files.temporary_name("a.json", tag=tag)] and files.TEMP_MARKER in seen[0]
    assert seen[0].endswith(f"{os.getpid()}-{tag}.json") and file_bytes(tmp_path) == {"a.json": b"{}"}


def test_a_run_in_a_folder_of_user_files_touches_none_of_them(tmp_path, capsys):
    user = {".thesis.tmp20240101.tex": b"thesis", ".draft.tmp4242.md": b"draft", "notes.txt": b"mine"}
    for name, data in user.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / ".x.tmp99999.md").mkdir()
    (tmp_path / ".ARM.lock-digits").write_text("999999999")  # a lock a SIGKILLed run left: taken over
    assert run_main(arm_script.main, TINY + ["--out", str(tmp_path)]) == 0
    assert all((tmp_path / name).read_bytes() == data for name, data in user.items())
    assert (tmp_path / ".x.tmp99999.md").is_dir() and not (tmp_path / ".ARM.lock-digits").exists()
    assert (tmp_path / "ARM.pt").is_file() and not list(tmp_path.glob(f".*{files.TEMP_MARKER}*"))


# -----------------------------------------------------------------------------
# signals in the tools: forwarded, waited for, cleaned up, exit 130 in one line

FAKE_SCRIPT = r'''
"""A stand-in model run: trains until a signal, then finishes its (partial) outputs and exits 130."""
import json, os, signal, sys, time
from pathlib import Path

out = Path(sys.argv[sys.argv.index("--out") + 1])
log = Path(os.environ["FAKE_LOG"])
got = []
signal.signal(signal.SIGINT, lambda s, f: got.append(s))
signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
with open(log, "a") as f:
    f.write(f"start {os.getpid()}\n")
while not got:
    time.sleep(0.02)
time.sleep(1.0)  # finishing its outputs takes a while: the tool must wait
for name in ("ARM", "DDPM"):
    (out / f"{name}.pt").write_bytes(b"partial 1-epoch weights")
    (out / f"{name}_metrics.json").write_text(json.dumps(dict(model=name, epochs_run=1, interrupted=True)))
with open(log, "a") as f:
    f.write(f"finished {got}\n")
sys.exit(130)
'''


def children_of(pid):
    """pids of the live (not zombie) processes whose parent is pid."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def run_tool_and_signal(tmp_path, setup, call, sig, wait_for_children=1):
    """Start a tool (python -c: `setup` then `call`) whose model runs are FAKE_SCRIPT, send `sig`
    to its pid alone once its child runs, and return (returncode, stderr, log, child pids)."""
    fake_root = tmp_path / "fake_root"
    fake_root.mkdir()
    for script in ("fake.py", "autoregressive_model.py"):
        (fake_root / script).write_text(FAKE_SCRIPT)
    log = tmp_path / "log.txt"
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from pathlib import Path; "
            f"import leaderboard, ood, benchmark; from plumbing import registry, results; "
            f"FAKE = Path({str(fake_root)!r}); results.ROOT = benchmark.ROOT = FAKE; {setup}; {call}")
    env = dict(os.environ, FAKE_LOG=str(log))
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (log.exists() and "start" in log.read_text()):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    kids = children_of(proc.pid)
    assert len(kids) >= wait_for_children
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    return proc.returncode, stderr, log.read_text(), kids


def test_sigterm_to_leaderboard_is_forwarded_waited_for_and_keeps_the_shipped_weights(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "ARM.pt").write_bytes(b"shipped 85-epoch weights")
    (out / "ARM_training.gif").write_bytes(b"shipped gif")
    before = file_bytes(out)
    code, stderr, log, kids = run_tool_and_signal(
        tmp_path, "leaderboard.SCRIPTS = {'ARM': 'fake.py'}",
        f"leaderboard.main(['--out', {str(out)!r}, '--threads', '1'])", signal.SIGTERM)
    assert code == 130 and "interrupted" in one_line(stderr)
    assert "finished [15]" in log  # one SIGTERM reached the child, which finished before the tool left
    assert not any(alive(pid) for pid in kids)
    assert file_bytes(out) == before and not [p for p in out.iterdir() if p.is_dir()]  # scratch removed


def test_sigint_to_ood_while_it_trains_a_missing_family_leaves_no_weights(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    code, stderr, log, kids = run_tool_and_signal(
        tmp_path, "registry.FAMILIES = (registry.Family('ARM', 'autoregressive_model.py', 'ARM'),)",
        f"ood.main(['--out', {str(out)!r}, '--threads', '1', '--no-progress', '--device', 'cpu'])",
        signal.SIGINT)
    assert code == 130 and "interrupted" in last_line(stderr) and "finished [2]" in log
    assert not any(alive(pid) for pid in kids)
    assert list(out.iterdir()) == []  # no 1-epoch ARM.pt for the next --no-train to score


def test_sigterm_to_benchmark_busy_ends_the_busy_loop_and_the_run(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    for name in ("ARM", "DDPM"):
        (out / f"{name}_metrics.json").write_text(json.dumps(dict(threads=2, epochs_run=10, train_seconds=20.0)))
    before = file_bytes(out)
    code, stderr, log, kids = run_tool_and_signal(
        tmp_path, "benchmark.SCRIPTS = {'ARM': 'fake.py', 'DDPM': 'fake.py'}",
        f"benchmark.main(['--out', {str(out)!r}, '--busy'])", signal.SIGTERM, wait_for_children=2)
    assert code == 130 and "interrupted" in one_line(stderr) and "finished [15]" in log
    assert len(kids) == 2 and not any(alive(pid) for pid in kids)  # the busy loop and the run
    assert file_bytes(out) == before


def test_the_busy_loop_ends_with_its_parent_even_a_sigkilled_one():
    inner = (f"import os, subprocess, sys, time; print(subprocess.Popen([sys.executable, '-c', {benchmark.BUSY_LOOP!r}, "
             f"str(os.getpid())]).pid, flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", inner], stdout=subprocess.PIPE, text=True)
    hog = int(parent.stdout.readline())
    assert alive(hog)
    parent.kill()  # SIGKILL: no handler runs
    parent.wait()
    deadline = time.time() + 10
    while alive(hog) and time.time() < deadline:
        time.sleep(0.1)
    assert not alive(hog)


def test_an_interrupted_run_is_not_moved_in_and_its_weights_are_not_scored(tmp_path, monkeypatch, capsys):
    """A child that exits 130 leaves OUT as it was; weights marked interrupted (a script stopped
    by hand) are retrained by ood.py, or skipped in one line with --no-train."""
    (tmp_path / "fake.py").write_text(FAKE_SCRIPT.replace("while not got", "got = [0]\nwhile not got"))
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "log"))
    monkeypatch.setattr(results, "ROOT", tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    reason = results.train_into(out, "ARM", "fake.py", 1)
    assert "exited with status 130" in reason and list(out.iterdir()) == []
    monkeypatch.setattr(results, "ROOT", ROOT)  # the real ARM script scores the weights below
    model = arm_script.ARM(arm_script.ARMConfig(channels=8, layers=2, members=1))
    state = common.TrainState(best_weights=common.cpu_state(model), epoch=1, best_epoch=1)
    checkpoints.save_weights(out / "ARM.pt", "ARM", common.dataclasses.asdict(model.config), state, stopped="interrupted")
    family = registry.family("ARM")
    loaded, why = results.load_family(family, out, False, 1, torch.device("cpu"))
    assert loaded is None and "interrupted run" in why and "--no-train" in why


FINISHED_SCRIPT = r'''
"""A stand-in model run that finishes: weights, samples and metrics, no GIF (no frame drawn)."""
import json, sys
from pathlib import Path
import numpy as np

out = Path(sys.argv[sys.argv.index("--out") + 1])
(out / "ARM.pt").write_bytes(b"new weights")
np.save(out / "ARM_samples.npy", np.ones((8, 64), np.float32))
(out / "_digit_classifier.pt").write_bytes(b"a cache made here")
(out / "ARM_metrics.json").write_text(json.dumps(dict(model="ARM", epochs_run=3, interrupted=False)))
'''


def test_a_finished_run_is_moved_in_whole_and_nothing_else_is_touched(tmp_path, monkeypatch):
    (tmp_path / "fake.py").write_text(FINISHED_SCRIPT)
    monkeypatch.setattr(results, "ROOT", tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    old = {"ARM.pt": b"old", "ARM_training.gif": b"old gif", "ARM_metrics.json": b"{}", "notes.md": b"mine",
           "_digit_classifier.pt": b"the cache already here", "DDPM.pt": b"another family"}
    for name, data in old.items():
        (out / name).write_bytes(data)
    stale = out / f".ARM{files.SCRATCH}999999999-abc"  # a scratch folder a SIGKILLed tool left
    stale.mkdir()
    (out / f".ARM{files.SCRATCH}{os.getppid()}-abc").mkdir()  # a live tool's: left alone
    assert results.train_into(out, "ARM", "fake.py", 1) is None
    now = file_bytes(out)
    assert now["ARM.pt"] == b"new weights" and "ARM_training.gif" not in now  # no stale GIF beside them
    assert json.loads(now["ARM_metrics.json"])["epochs_run"] == 3 and now["ARM_samples.npy"]
    assert {k: now[k] for k in ("notes.md", "_digit_classifier.pt", "DDPM.pt")} == {
        k: old[k] for k in ("notes.md", "_digit_classifier.pt", "DDPM.pt")}
    assert [p.name for p in out.iterdir() if p.is_dir()] == [f".ARM{files.SCRATCH}{os.getppid()}-abc"]


# -----------------------------------------------------------------------------
# non-finite samples: found before anything is written


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A folder with one tiny finished ARM run."""
    out = tmp_path_factory.mktemp("trained")
    torch.set_num_threads(1)
    assert run_main(arm_script.main, TINY + ["--out", str(out)]) == 0
    return out


def test_nan_samples_are_one_line_exit_1_and_leave_every_file_as_it_was(trained, monkeypatch, capsys):
    before = file_bytes(trained)
    monkeypatch.setattr(arm_script.ARM, "sample", lambda self, n: torch.full((n, 64), float("nan")))
    capsys.readouterr()
    for extra in (["--sample-only"], []):  # loading the weights, and a training run
        assert run_main(arm_script.main, TINY + ["--out", str(trained), *extra]) == 1
        line = one_line(capsys.readouterr().err)
        assert "NaN" in line and "untouched" in line
        after = file_bytes(trained)
        after.pop("ARM_resume.pt")  # the training state of the new run: the only file it may write
        assert after == {k: v for k, v in before.items() if k != "ARM_resume.pt"}


def test_a_validation_frechet_of_nan_samples_is_nan_not_a_scipy_error(tmp_path):
    class Sampler:
        val_objective, conditional = common.VAL_FRECHET, False

        def sample(self, n):
            return torch.full((n, 64), float("nan"))

    val = (torch.zeros(10, 64), torch.zeros(10))
    assert np.isnan(common.validate(Sampler(), {"val": val}, 0, torch.device("cpu"), tmp_path))


# -----------------------------------------------------------------------------
# damaged or partial results: one line naming the file, treated as missing


def _metrics(**changes):
    metrics = dict(model="ARM", test_nll_nats=80.0, nll_kind="exact", train_seconds=10.0, sample_seconds=0.5,
                   train_cpu_seconds=9.0, epochs_run=5, best_epoch=4, device="cpu", frechet_distance=20.0,
                   classifier_confidence=0.9, class_coverage=2.2, copy_rate=0.01, interrupted=False, quick=False,
                   stopped="early_stopping", **checkpoints.fingerprints(ROOT / "autoregressive_model.py", ROOT),
                   changed_settings={}, argv=["--no-progress"])
    metrics.update(changes)
    return metrics


def _npy_header_only(path, shape):
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, dict(descr="<f4", fortran_order=False, shape=shape))


DAMAGED = {
    "truncated metrics": lambda out: (out / "ARM_metrics.json").write_text(json.dumps(_metrics())[:40]),
    "metrics a list": lambda out: (out / "ARM_metrics.json").write_text("[1, 2]"),
    "wrong-typed field": lambda out: (out / "ARM_metrics.json").write_text(json.dumps(_metrics(epochs_run="5"))),
    "missing key": lambda out: (out / "ARM_metrics.json").write_text(
        json.dumps({k: v for k, v in _metrics().items() if k != "train_seconds"})),
    "NaN value": lambda out: (out / "ARM_metrics.json").write_text(json.dumps(_metrics(copy_rate=float("nan")))),
    "--num-samples 1 run": lambda out: (out / "ARM_metrics.json").write_text(json.dumps(_metrics(frechet_distance=None))),
    "missing samples": lambda out: (out / "ARM_samples.npy").unlink(),
    "truncated samples": lambda out: (out / "ARM_samples.npy").write_bytes((out / "ARM_samples.npy").read_bytes()[:300]),
    "10^12 rows": lambda out: _npy_header_only(out / "ARM_samples.npy", (10**12, 64)),
    "NaN samples": lambda out: np.save(out / "ARM_samples.npy", np.full((8, 64), np.nan, np.float32)),
    "wrong shape": lambda out: np.save(out / "ARM_samples.npy", np.zeros((8, 3), np.float32)),
    "pickled samples": lambda out: np.save(out / "ARM_samples.npy", np.array([{}], dtype=object), allow_pickle=True),
}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_a_damaged_run_is_one_line_naming_the_file_and_counts_as_missing(case, tmp_path, monkeypatch, capsys):
    (tmp_path / "ARM_metrics.json").write_text(json.dumps(_metrics()))
    np.save(tmp_path / "ARM_samples.npy", np.ones((8, 64), np.float32))
    assert results.current_run("ARM", "autoregressive_model.py", tmp_path, False, 1) is not None
    DAMAGED[case](tmp_path)
    capsys.readouterr()
    assert results.current_run("ARM", "autoregressive_model.py", tmp_path, False, 1) is None
    line = one_line(capsys.readouterr().err)
    assert str(tmp_path / "ARM_") in line and "treated as missing" in line
    trained = []  # with training allowed, it is retrained (into a scratch folder, moved in when finished)
    monkeypatch.setattr(results, "train_into", lambda *a, **k: trained.append(a[1]) or "stub: not run")
    results.current_run("ARM", "autoregressive_model.py", tmp_path, True, 1)
    assert trained == ["ARM"]


def test_leaderboard_and_seed_table_run_through_a_damaged_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(leaderboard, "SCRIPTS", {"ARM": "autoregressive_model.py", "DDPM": "ddpm.py"})
    gmm, kde = leaderboard.gaussian_mixture, leaderboard.kernel_density  # one setting each: quick
    monkeypatch.setattr(leaderboard, "gaussian_mixture", lambda splits, n, seed: gmm(splits, n, seed, (5,), 1))
    monkeypatch.setattr(leaderboard, "kernel_density", lambda splits, n, seed: kde(splits, n, seed, (2.0,), 1))
    measure = quality.sample_quality  # the short measures: the baselines' extended ones take long
    monkeypatch.setattr(quality, "sample_quality",  # as averaged_quality calls it, once per draw
                        lambda samples, cache_dir, *args, **kwargs: measure(samples, cache_dir, extended=False))
    (tmp_path / "ARM_metrics.json").write_text('{"model": "ARM", "test_nll')
    (tmp_path / "DDPM_metrics.json").write_text(json.dumps(_metrics(model="DDPM", frechet_distance=None)))
    assert run_main(leaderboard.main, ["--out", str(tmp_path), "--no-train"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(tmp_path / "ARM_metrics.json") in err and "DDPM_metrics.json" in err
    assert [r["model"] for r in json.loads((tmp_path / "leaderboard.json").read_text())][:1] == ["Independent pixels"]
    assert run_main(leaderboard.main, ["--out", str(tmp_path), "--no-train", "--seeds", "0", "1"]) == 0
    assert "Traceback" not in capsys.readouterr().err and json.loads((tmp_path / "seeds.json").read_text())["rows"] == []


@pytest.mark.parametrize("damage", ['{"train_flags": ', json.dumps(dict(train_flags=dict(lr="x"))), "[]",
                                    json.dumps(dict(threads=2, epochs_run=0, train_seconds=1.0))])
def test_benchmark_refuses_a_damaged_run_in_one_line_per_file(damage, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(benchmark, "SCRIPTS", {"DDPM": "ddpm.py"})
    monkeypatch.setattr(benchmark, "BUSY_FAMILIES", ("DDPM",))
    (tmp_path / "DDPM_metrics.json").write_text(damage)
    for extra in ([], ["--busy"]):
        assert run_main(benchmark.main, ["--out", str(tmp_path), *extra]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and str(tmp_path / "DDPM_metrics.json") in err
        assert "no usable default runs of DDPM" in err.strip().splitlines()[-1]


def test_a_weights_config_of_the_wrong_type_or_an_absurd_size_is_one_line(tmp_path):
    model = arm_script.ARM(arm_script.ARMConfig(channels=8, layers=2, members=1))
    state = common.TrainState(best_weights=common.cpu_state(model), epoch=1, best_epoch=1)
    family = registry.family("ARM")
    for config, expected in ((dict(channels=12.0), "channels=12.0"), (dict(position=1), "position=1"),
                             (dict(channels=10**6), "parameters")):
        stored = {**common.dataclasses.asdict(model.config), **config}
        checkpoints.save_weights(tmp_path / "ARM.pt", "ARM", stored, state)
        with pytest.raises(plumbing.UsageError, match=expected):
            checkpoints.load_trained(arm_script.ARM, tmp_path)
        loaded, why = results.load_family(family, tmp_path, False, 1, torch.device("cpu"))
        assert loaded is None and expected in why and "\n" not in why


# -----------------------------------------------------------------------------
# currency by the settings, not the command line


def _parse(argv):
    parser = runs.make_parser(arm_script.__file__, "", epochs=85, batch_size=64, lr=7e-3, patience=8, ema=0.99)
    common.add_options(parser, "ARM", arm_script.ARMConfig)
    return runs.parse_args(parser, argv)


def test_a_resumed_default_run_is_current_and_changed_settings_are_not():
    script = "autoregressive_model.py"
    for argv, flags, current in (
            (["--resume", "--no-progress", "--threads", "1", "--out", "x", "--checkpoint-seconds", "5"], (), True),
            (["--device", "cpu", "--epochs", "85"], (), True),  # the default, spelt out
            (["--seed", "1", "--resume"], ("--seed", "1"), True),
            (["--seed", "1"], (), False), ([], ("--seed", "1"), False),
            (["--epochs", "3"], (), False), (["--channels", "9"], (), False),
            (["--quick"], (), False), (["--num-samples", "10"], (), False), (["--sample-only"], (), False)):
        changed = _parse(argv).changed_settings
        metrics = _metrics(changed_settings=changed, argv=argv, quick="--quick" in argv)
        assert results.is_current(metrics, script, flags) is current, (argv, changed)
    assert not results.is_current(_metrics(interrupted=True), script)
    assert results.run_status(_metrics(weights_code_sha256="old"), script) == "retrain"
    assert results.run_status(_metrics(scoring_code_sha256="old"), script) == "rescore"


# -----------------------------------------------------------------------------
# one run per family and folder


def test_a_second_run_into_the_same_folder_is_refused_in_one_line(tmp_path, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); from plumbing import files\n"
                               f"with files.family_lock(__import__('pathlib').Path({str(tmp_path)!r}), 'ARM'):\n"
                               f"    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert run_main(arm_script.main, TINY + ["--out", str(tmp_path)]) == 2
        line = one_line(capsys.readouterr().err)
        assert f"pid {holder.pid}" in line and "ARM" in line and str(tmp_path) in line
        assert [p.name for p in tmp_path.iterdir()] == [".ARM.lock-digits"]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    with files.family_lock(tmp_path, "ARM"):  # free again once its holder is gone
        pass
    assert list(tmp_path.iterdir()) == []


# -----------------------------------------------------------------------------
# size limits, refused up front (exit 2)


def test_sizes_that_cannot_fit_are_refused_up_front(tmp_path, capsys):
    out = tmp_path / "new"
    for argv in (["--num-samples", str(10**9)], ["--channels", str(10**5)]):
        assert run_main(arm_script.main, TINY + argv + ["--out", str(out)]) == 2
        assert "Traceback" not in capsys.readouterr().err and not out.exists()
    for shape in ((10**12, 64), (5 * 10**6, 8, 8)):
        path = tmp_path / "huge.npy"
        _npy_header_only(path, shape)
        with pytest.raises(plumbing.UsageError, match="at most"):
            ood.load_extra_set(f"huge={path}")
        assert run_main(ood.main, ["--out", str(tmp_path / "o"), "--no-train", "--extra-ood", f"huge={path}"]) == 2
        assert "at most" in one_line(capsys.readouterr().err)


# -----------------------------------------------------------------------------
# the smaller items


def test_relative_out_is_taken_from_the_current_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert results.out_folder(Path("mine")) == tmp_path / "mine"
    assert results.out_folder(None) == ROOT / "results"
    assert run_main(benchmark.main, ["--out", "mine"]) == 2
    assert str(tmp_path / "mine") in one_line(capsys.readouterr().err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_unavailable_device_is_one_line_and_makes_no_folder(tmp_path, capsys):
    out = tmp_path / "new"
    for main, argv in ((benchmark.main, ["--device", "cuda"]), (arm_script.main, TINY + ["--device", "cuda"]),
                       (ood.main, ["--device", "cuda", "--no-train"])):
        assert run_main(main, argv + ["--out", str(out)]) == 2
        assert "cuda" in one_line(capsys.readouterr().err) and not out.exists()


def test_resume_across_quick_is_refused(trained, capsys):
    argv = [a for a in TINY if a != "--quick"] + ["--resume", "--out", str(trained)]
    before = file_bytes(trained)
    assert run_main(arm_script.main, argv) == 2
    assert "--quick True (checkpoint) vs False (now)" in one_line(capsys.readouterr().err)
    assert file_bytes(trained) == before


def test_a_run_without_a_gif_frame_removes_the_previous_gif(tmp_path, monkeypatch):
    def one_epoch_no_frame(model, data, optimizer, ema, state, **kwargs):
        state.record_epoch(1, {"train": 1.0}, 1.0, common.cpu_state(model), None, dict(wall=0.1, cpu=0.1))
        return "max_epochs"

    (tmp_path / "ARM_training.gif").write_bytes(b"the previous run's GIF")
    monkeypatch.setattr(runs, "train", one_epoch_no_frame)
    assert run_main(arm_script.main, TINY + ["--out", str(tmp_path)]) == 0
    assert (tmp_path / "ARM.pt").is_file() and not (tmp_path / "ARM_training.gif").exists()


def test_a_non_finite_first_epoch_says_nothing_is_written_once(tmp_path, monkeypatch, capsys):
    def non_finite(self, x, y, optimizer):
        raise common.NonFiniteLoss("non-finite loss (nan)")

    monkeypatch.setattr(arm_script.ARM, "train_step", non_finite)
    assert run_main(arm_script.main, TINY + ["--out", str(tmp_path)]) == 1
    line = one_line(capsys.readouterr().err)
    assert "nothing is written" in line and "writing the outputs" not in line
    assert not (tmp_path / "ARM.pt").exists()


# -----------------------------------------------------------------------------
# the property test, widened to the tools: any damage to a run's files is a line, never a crash

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats() | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                           max_leaves=5)


@pytest.fixture(scope="module")
def a_run(tmp_path_factory):
    """A folder with a made-up finished ARM run: metrics, samples and tiny weights."""
    out = tmp_path_factory.mktemp("a_run")
    (out / "ARM_metrics.json").write_text(json.dumps(_metrics(train_flags=dict(lr=1e-3, batch_size=64), threads=1,
                                                                 train_seconds_to_best=5.0, num_samples=8,
                                                                 peak_memory_mb=100.0)))
    np.save(out / "ARM_samples.npy", np.ones((8, 64), np.float32))
    model = arm_script.ARM(arm_script.ARMConfig(channels=8, layers=2, members=1))
    state = common.TrainState(best_weights=common.cpu_state(model), epoch=1, best_epoch=1)
    checkpoints.save_weights(out / "ARM.pt", "ARM", common.dataclasses.asdict(model.config), state)
    return {p.name: p.read_bytes() for p in out.iterdir()}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(target=st.sampled_from(["ARM_metrics.json", "ARM_samples.npy", "ARM.pt"]),
       how=st.sampled_from(["truncate", "overwrite", "json field"]), at=st.integers(0, 40000),
       junk=st.binary(min_size=1, max_size=16), key=st.sampled_from(sorted(_metrics()) + ["train_flags", "threads"]),
       value=JSON_VALUES)
def test_any_damage_to_a_run_is_a_line_in_every_tool_never_a_crash(a_run, target, how, at, junk, key, value,
                                                                   tmp_path_factory, capsys):
    out = tmp_path_factory.mktemp("damaged")
    for name, data in a_run.items():
        (out / name).write_bytes(data)
    data = a_run[target]
    if how == "truncate":
        data = data[:at % max(len(data), 1)]
    elif how == "overwrite":
        at %= max(len(data), 1)
        data = data[:at] + junk + data[at + len(junk):]
    elif target == "ARM_metrics.json":
        metrics = json.loads(data)
        metrics[key] = value
        data = json.dumps(metrics).encode()
    (out / target).write_bytes(data)
    capsys.readouterr()
    results.current_run("ARM", "autoregressive_model.py", out, False, 1)
    results.current_metrics("ARM", "autoregressive_model.py", out, False, 1)
    benchmark.usable_runs(out, ["ARM"], benchmark.SPEED_KEYS)
    benchmark.usable_runs(out, ["ARM"], benchmark.BUSY_KEYS)
    model, why = results.load_family(registry.family("ARM"), out, False, 1, torch.device("cpu"))
    assert (model is None) == (why is not None) and (why is None or "\n" not in why)
    try:
        ood.load_extra_set(f"x={out / 'ARM_samples.npy'}")
    except plumbing.UsageError as error:
        assert "\n" not in str(error)
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 4  # at most a line per reader
