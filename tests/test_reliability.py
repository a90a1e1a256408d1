"""Issue 39: nothing written outside --out (no planted link is written through), children die
with their parent and SIGHUP is SIGTERM, damaged values and damaged input files are one line,
tools lock their --out, a run's weights and metrics are read only as a pair, and the smaller
items. Real subprocesses and signals where the case needs them; every case is one line, no
traceback."""

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
import plumbing
from conftest import run_main
from test_robustness import alive
from plumbing import checkpoints, files, registry, results, runs

ROOT = registry.ROOT
TINY = ["--quick", "--no-progress", "--channels", "8", "--layers", "2", "--members", "1",
        "--num-samples", "8", "--epochs", "1"]


def one_line(text):
    lines = text.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


@pytest.fixture
def outside(tmp_path):
    """A file outside --out that a planted link points at: it must keep its bytes."""
    target = tmp_path / "outside.txt"
    target.write_bytes(b"precious")
    return target


# -----------------------------------------------------------------------------
# principle 1: every file created in --out is created new, never through a planted link


def test_atomic_write_never_writes_through_a_link_at_the_target_or_the_old_temporary_name(tmp_path, outside):
    out = tmp_path / "out"
    out.mkdir()
    (out / "ARM_metrics.json").symlink_to(outside)
    (out / files.temporary_name("ARM_metrics.json")).symlink_to(outside)  # the old, guessable name
    files.save_json(out / "ARM_metrics.json", dict(model="ARM"))
    assert outside.read_bytes() == b"precious"
    assert not (out / "ARM_metrics.json").is_symlink() and json.loads((out / "ARM_metrics.json").read_text()) == {
        "model": "ARM"}


def test_a_link_planted_at_the_lock_name_is_refused_and_its_target_untouched(tmp_path, outside):
    (tmp_path / ".ARM.lock-digits").symlink_to(outside)
    with pytest.raises(plumbing.UsageError, match="symbolic link"):
        with files.family_lock(tmp_path, "ARM"):
            pass
    os.link(outside, tmp_path / ".DDPM.lock-digits")  # a hard link: the same file as outside.txt
    with pytest.raises(plumbing.UsageError, match="not a plain file"):
        with files.family_lock(tmp_path, "DDPM"):
            pass
    assert outside.read_bytes() == b"precious"


def test_the_write_test_of_out_leaves_nothing_and_follows_no_link(tmp_path, outside):
    out = tmp_path / "out"
    out.mkdir()
    (out / f".write-test-{os.getpid()}").symlink_to(outside)  # the old, guessable name
    files.check_out(out)
    assert outside.read_bytes() == b"precious" and [p.name for p in out.iterdir()] == [f".write-test-{os.getpid()}"]


def test_a_run_into_a_folder_of_planted_links_writes_none_through(tmp_path, outside, capsys):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("ARM_metrics.json", "ARM.pt", "ARM_samples.npy", "_Digit_real_image.png",
                 files.temporary_name("ARM_metrics.json", os.getpid())):
        (out / name).symlink_to(outside)
    assert run_main(arm_script.main, TINY + ["--out", str(out)]) == 0
    assert outside.read_bytes() == b"precious"
    assert not (out / "ARM_metrics.json").is_symlink() and (out / "ARM.pt").is_file()


# -----------------------------------------------------------------------------
# principle 3: children die with their parent; SIGHUP is SIGTERM


def wait_for(condition, seconds=60, proc=None):
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline and (proc is None or proc.poll() is None), \
            proc and proc.communicate(timeout=10)
        time.sleep(0.05)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_spawned_child_dies_with_its_sigkilled_parent():
    parent_code = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); from plumbing import processes; "
                   f"child = processes.spawn([sys.executable, '-c', 'import time; time.sleep(60)']); "
                   f"print(child.pid, flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert alive(child)
    parent.kill()  # SIGKILL: no handler of the parent runs
    parent.wait()
    wait_for(lambda: not alive(child), 10)


def test_sighup_to_a_tool_is_forwarded_to_its_child_and_ends_in_one_line(tmp_path):
    log = tmp_path / "log"
    child_code = (f"import signal, sys, time; from pathlib import Path; log = Path({str(log)!r}); "
                  f"signal.signal(signal.SIGHUP, lambda s, f: (log.write_text(f'got {{s}}'), sys.exit(130))); "
                  f"log.write_text('start'); time.sleep(60)")
    tool_code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from plumbing import processes; "
                 f"processes.tool('t.py', lambda: processes.run_child([sys.executable, '-c', {child_code!r}]))")
    proc = subprocess.Popen([sys.executable, "-c", tool_code], stderr=subprocess.PIPE, text=True)
    wait_for(lambda: log.exists() and log.read_text() == "start", proc=proc)
    proc.send_signal(signal.SIGHUP)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "interrupted" in one_line(stderr)
    assert log.read_text() == f"got {int(signal.SIGHUP)}"  # forwarded, and waited for


def test_sighup_to_a_model_run_stops_training_and_writes_its_outputs(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(ROOT / "autoregressive_model.py"), *TINY, "--threads", "1",
                             "--epochs", "100000", "--patience", "100000", "--checkpoint-seconds", "0",
                             "--val-every", "1", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (out / "ARM_resume.pt").exists(), proc=proc)
    proc.send_signal(signal.SIGHUP)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert json.loads((out / "ARM_metrics.json").read_text())["interrupted"] is True


# -----------------------------------------------------------------------------
# principle 4: damaged values are one line before they reach the maths


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two tiny ARM runs of other seeds: (folder A, folder B)."""
    folders = []
    for seed in (0, 1):
        folder = tmp_path_factory.mktemp(f"seed{seed}")
        assert run_main(arm_script.main, TINY + ["--out", str(folder), "--seed", str(seed)]) == 0
        folders.append(folder)
    return folders


def copy_run(source, target):
    target.mkdir()
    for path in source.iterdir():
        if path.is_file():
            (target / path.name).write_bytes(path.read_bytes())
    return target


def test_nan_weights_with_a_valid_checksum_are_refused_in_one_line(two_runs, tmp_path, capsys):
    out = copy_run(two_runs[0], tmp_path / "nan")
    checkpoint = torch.load(out / "ARM.pt", map_location="cpu", weights_only=True)
    key = next(k for k, v in checkpoint["weights"].items() if v.is_floating_point())
    checkpoint["weights"][key].view(-1)[0] = float("nan")
    checkpoint["weights_sha256"] = checkpoints.weights_checksum(checkpoint["weights"])
    torch.save(checkpoint, out / "ARM.pt")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(plumbing.UsageError, match="NaN or infinite"):
        checkpoints.load_trained(arm_script.ARM, out)
    capsys.readouterr()
    assert run_main(arm_script.main, TINY + ["--out", str(out), "--sample-only"]) == 2
    assert "NaN or infinite" in one_line(capsys.readouterr().err)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_sampler_that_fails_on_its_settings_is_one_line_and_writes_nothing(two_runs, tmp_path, monkeypatch, capsys):
    out = copy_run(two_runs[0], tmp_path / "fails")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def nan_probabilities(self, *args, **kwargs):  # what torch.multinomial says of a temperature near 0
        raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")

    monkeypatch.setattr(arm_script.ARM, "sample", nan_probabilities)
    assert run_main(arm_script.main, TINY + ["--out", str(out), "--sample-only"]) == 2
    assert "try other sampling settings" in one_line(capsys.readouterr().err)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_an_unreadable_checkpoint_is_not_called_corrupted(two_runs, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(torch, "load", denied)
    with pytest.raises(plumbing.UsageError, match="can't read .*Permission denied") as error:
        checkpoints.load_trained(arm_script.ARM, two_runs[0])
    assert "corrupted" not in str(error.value)


# -----------------------------------------------------------------------------
# principle 5: one checked reader of .npy, .npz and .json inputs


def test_the_readers_refuse_a_fifo_a_folder_a_device_and_the_wrong_container_in_one_line(tmp_path):
    os.mkfifo(tmp_path / "fifo.npy")
    np.save(tmp_path / "array.npy", np.zeros((2, 64), np.float32))
    np.savez(tmp_path / "archive.npz", x=np.zeros((2, 64), np.float32), y=np.zeros(2, np.int64))
    start = time.time()
    for path, read, problem in ((tmp_path / "fifo.npy", files.read_npy, "is a FIFO"),
                                (tmp_path, files.read_npy, "is a folder"),
                                (Path("/dev/zero"), files.read_json, "is a device"),
                                (tmp_path / "archive.npz", files.read_npy, "an .npz archive, not an .npy"),
                                (tmp_path / "array.npy", lambda p: files.read_npz(p, {"x": lambda s, d: None}),
                                 "an .npy array, not an .npz")):
        with pytest.raises(files.DamagedFile, match=problem):
            read(path)
    assert time.time() - start < 5  # nothing waited on the FIFO
    assert results.read_samples(tmp_path / "fifo.npy") == (None, "is a FIFO, not a file")
    assert results.read_labelled_samples(tmp_path / "array.npy")[1] == "is an .npy array, not an .npz archive"


def test_a_header_is_checked_before_the_data_is_read(tmp_path):
    path = tmp_path / "huge.npy"
    with open(path, "wb") as f:  # a header that promises 10^12 rows, and 64 bytes of data
        np.lib.format.write_array_header_1_0(f, dict(descr="<f4", fortran_order=False, shape=(10**12, 64)))
        f.write(b"\0" * 64)
    assert results.read_samples(path)[1].startswith("has shape (1000000000000, 64)")
    with pytest.raises(files.DamagedFile, match="GiB"):
        files.read_npy(path)


def test_deeply_nested_json_metrics_are_one_line(tmp_path):
    (tmp_path / "ARM_metrics.json").write_text("[" * 200_000 + "]" * 200_000)
    assert results.read_metrics(tmp_path / "ARM_metrics.json") == (None, "is JSON nested too deep to read")


def test_a_fifo_as_extra_ood_is_refused_at_once(tmp_path, capsys):
    import ood

    os.mkfifo(tmp_path / "set.npy")
    fifo = tmp_path / "set.npy"
    assert run_main(ood.main, ["--out", str(tmp_path / "o"), "--no-train", "--extra-ood", f"x={fifo}"]) == 2
    assert "is a FIFO" in one_line(capsys.readouterr().err)


def test_extra_ood_pixels_scaled_to_0_1_are_refused_not_rounded(tmp_path):
    import ood

    np.save(tmp_path / "scaled.npy", np.full((3, 64), 0.4, np.float32))
    with pytest.raises(plumbing.UsageError, match="multiply them by 16"):
        ood.load_extra_set(f"scaled={tmp_path / 'scaled.npy'}")
    np.save(tmp_path / "binary.npy", np.ones((3, 64), np.float32))  # 0/1 pixels are pixels
    assert ood.load_extra_set(f"binary={tmp_path / 'binary.npy'}")[1].max() == 1


def test_compress_reads_its_input_with_the_checked_reader(tmp_path, capsys):
    import compress

    np.savez(tmp_path / "digits.npz", x=np.zeros((2, 64)))
    with pytest.raises(SystemExit) as exit_:  # (no --threads flag: not run_main)
        compress.main(["encode", str(tmp_path / "digits.npz"), str(tmp_path / "out.bin")])
    assert exit_.value.code == 2 and "an .npz archive, not an .npy" in one_line(capsys.readouterr().err)


# -----------------------------------------------------------------------------
# principle 6: a tool locks its --out; a run that scored nothing keeps the table


def test_a_second_tool_run_into_the_same_out_is_refused_in_one_line(tmp_path, capsys):
    import ood

    holder = subprocess.Popen(
        [sys.executable, "-c", f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); from pathlib import Path; "
                               f"from plumbing import processes; processes.tool('ood.py', lambda: "
                               f"(processes.claim_out(Path({str(tmp_path)!r}), 'ood.py'), print('held', flush=True), "
                               f"time.sleep(60)))"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert run_main(ood.main, ["--out", str(tmp_path), "--no-train", "--device", "cpu", "--no-progress"]) == 2
        assert f"pid {holder.pid}" in one_line(capsys.readouterr().err)
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / "ood.md").exists()


def test_a_tool_run_that_scored_no_family_keeps_the_table(tmp_path, capsys):
    import leaderboard

    (tmp_path / "leaderboard.md").write_text("a good table")
    assert run_main(leaderboard.main, ["--out", str(tmp_path), "--no-train"]) == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr and "no family could be scored" in stderr.strip().splitlines()[-1]
    assert (tmp_path / "leaderboard.md").read_text() == "a good table" and not (tmp_path / "leaderboard.json").exists()


# -----------------------------------------------------------------------------
# principle 7: the smaller items


def test_digits_are_compared_as_numbers():
    with pytest.raises(Exception, match="a class twice"):
        runs.digit_list("03,3")
    assert runs.digit_list("03,7") == (3, 7)


def test_samples_that_do_not_share_equally_are_said(capsys):
    parser = runs.make_parser("x.py", "", epochs=1, batch_size=1, lr=1.0, patience=1)
    parser.add_argument("--conditional", action="store_true")
    runs.parse_args(parser, ["--conditional", "--digits", "0,1,2", "--num-samples", "10"])
    assert "3 of each, 9 in all" in one_line(capsys.readouterr().err)


def test_a_closed_stdout_after_every_file_is_written_is_no_error(tmp_path):
    proc = subprocess.Popen([sys.executable, str(ROOT / "autoregressive_model.py"), *TINY, "--threads", "1",
                             "--out", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone (`| head -0`) before the JSON line
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and "error" not in stderr and "Traceback" not in stderr, stderr
    assert (tmp_path / "ARM_metrics.json").is_file()


def test_a_sample_only_summary_names_only_the_files_it_wrote(two_runs, tmp_path, capsys):
    out = copy_run(two_runs[0], tmp_path / "again")
    capsys.readouterr()
    assert run_main(arm_script.main, TINY + ["--out", str(out), "--sample-only"]) == 0
    summary = capsys.readouterr().err
    assert "sampled 8 in" in summary and "from " in summary and "trained" not in summary
    assert "resume" not in summary and "gif" not in summary and "curve" not in summary and "ARM.pt," not in summary


# -----------------------------------------------------------------------------
# principle 2: weights, samples and metrics of two runs are never read as one run


def test_weights_of_another_run_beside_the_metrics_are_refused_by_every_reader(two_runs, tmp_path, capsys):
    out = copy_run(two_runs[0], tmp_path / "mixed")
    (out / "ARM.pt").write_bytes((two_runs[1] / "ARM.pt").read_bytes())  # a SIGKILL after ARM.pt was replaced
    with pytest.raises(plumbing.UsageError, match="holds other weights than its metrics"):
        checkpoints.load_trained(arm_script.ARM, out)
    assert results.current_run("ARM", "autoregressive_model.py", out, False, 1) is None
    assert "holds other weights than its metrics" in capsys.readouterr().err


def test_samples_of_another_run_beside_the_metrics_are_refused(two_runs, tmp_path, capsys):
    out = copy_run(two_runs[0], tmp_path / "mixed")
    (out / "ARM_samples.npy").write_bytes((two_runs[1] / "ARM_samples.npy").read_bytes())
    assert results.current_run("ARM", "autoregressive_model.py", out, False, 1) is None
    assert "holds other samples than its metrics" in capsys.readouterr().err


def test_a_run_of_one_piece_is_read_and_the_shipped_runs_are_pairs(two_runs):
    assert results.current_run("ARM", "autoregressive_model.py", two_runs[0], False, 1, keys=results.RUN_KEYS)
    shipped = ROOT / "results"
    for metrics_path in sorted(shipped.glob("*_metrics.json")):
        metrics = json.loads(metrics_path.read_text())
        weights = shipped / metrics_path.name.replace("_metrics.json", ".pt")
        checkpoint = torch.load(weights, map_location="cpu", weights_only=True)
        assert checkpoints.pair_problem(checkpoint, metrics) is None, weights


def test_a_float_sampler_setting_beyond_float32_is_refused_where_parsed(tmp_path, capsys):
    import masked_diffusion

    code = run_main(masked_diffusion.main, ["--quick", "--out", str(tmp_path), "--temperature", "1e-45"])
    assert code == 2 and "--temperature: 1e-45 is outside" in one_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []
    assert runs.unusable_float(masked_diffusion.MDM.Sampling(temperature=1e-3)) is None


def test_compress_decode_refuses_a_fifo_at_once(tmp_path, capsys):
    import compress

    os.mkfifo(tmp_path / "coded.bin")
    with pytest.raises(SystemExit) as exit_:
        compress.main(["decode", str(tmp_path / "coded.bin"), str(tmp_path / "out.npy")])
    assert exit_.value.code == 2 and "is a FIFO" in one_line(capsys.readouterr().err)


# -----------------------------------------------------------------------------
# issue 43: a user's runs write only into --out; README.md and docs/ change only by publish.py


def test_every_tool_and_a_family_script_leave_readme_and_docs_alone(tmp_path, monkeypatch):
    """Every tool (leaderboard.py, ood.py, inpaint.py, compress.py) and a family script run with
    their default --out in a copy of the project whose pages hold the real README.md and docs/:
    each writes its files into results/, and not one page changes."""
    import compress
    import inpaint
    import leaderboard
    import ood

    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    for page in files.pages(ROOT):
        (root / page.relative_to(ROOT)).write_bytes(page.read_bytes())
    before = {page: page.read_bytes() for page in files.pages(root)}
    assert len(before) > 5
    monkeypatch.setattr(registry, "ROOT", root)
    monkeypatch.setattr(results, "ROOT", root)
    monkeypatch.chdir(root)
    out = root / "results"
    quiet = ["--no-train", "--no-progress", "--threads", "1"]
    assert run_main(leaderboard.main, ["--no-train", "--threads", "1"]) == 0
    assert run_main(ood.main, quiet) == 0
    assert run_main(inpaint.main, [*quiet, "--models", "Nearest neighbour", "--masks", "bottom", "--pick", "draw",
                                   "--copied", "4"]) == 0
    compress.main(["--weights", str(ROOT / "results"), "--out", str(out), "--limit", "8"])  # codes on one thread
    assert run_main(arm_script.main, TINY) == 0  # its default --out: results/ of the current folder
    written = {p.name for p in out.iterdir()}
    assert {"leaderboard.md", "ood.md", "inpaint.md", "compress.md", "ARM_metrics.json"} <= written
    assert {page: page.read_bytes() for page in files.pages(root)} == before


def test_an_npy_header_numpy_cannot_tokenize_is_one_damaged_file(tmp_path):
    """A header cut inside its brackets makes numpy's parser raise tokenize.TokenError: a damaged
    file like any other, never a traceback (found by the property test of issue #43's round)."""
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (8, \n"
    path = tmp_path / "cut.npy"
    path.write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + b"\x00" * 64)
    with pytest.raises(files.DamagedFile, match="damaged .npy header"):
        files.read_npy(path)
