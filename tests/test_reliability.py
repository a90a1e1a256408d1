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
from plumbing import checkpoints, files, processes, registry, results, runs

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
