"""Two fingerprints date a run (issue 36): its weights are stale only when the code that decides
them changes, its metrics when the scoring code changes, and then they are re-scored from the
weights without training. Edits to comments, docstrings, README or the machinery stale nothing."""

import json
import shutil
from pathlib import Path

import pytest

import autoregressive_model as arm_script
from conftest import run_main
from plumbing import registry, results

ROOT = registry.ROOT
RUNS = [(family, conditional) for family in registry.FAMILIES for conditional in (False, True)]


@pytest.fixture
def copy_root(tmp_path, monkeypatch):
    """A copy of the code (no results/) that results.run_status reads instead of the repository."""
    root = tmp_path / "repo"
    shutil.copytree(ROOT, root, ignore=shutil.ignore_patterns("results", ".git", "__pycache__", "*.pt", "*.gif"))
    monkeypatch.setattr(results, "ROOT", root)
    return root


def edit(path, old, new):
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1))


def shipped(family, conditional):
    stem = registry.stem(family.name, conditional)
    return json.loads((ROOT / "results" / f"{stem}_metrics.json").read_text())


def statuses():
    return {(family.name, conditional): results.run_status(shipped(family, conditional), family.script,
                                                           ("--conditional",) if conditional else ())
            for family, conditional in RUNS}


def test_every_shipped_run_is_current():
    assert set(statuses().values()) == {"current"}


def test_comment_docstring_readme_lock_and_signal_edits_leave_every_run_current(copy_root):
    edit(copy_root / "common.py", "\nimport ", "\n# a reader's note\nimport ")
    edit(copy_root / "common.py", '"""', '"""A changed docstring. ')
    edit(copy_root / "ddpm.py", "\nimport ", "\n# another note\nimport ")
    (copy_root / "README.md").write_text((copy_root / "README.md").read_text() + "\nA new paragraph.\n")
    edit(copy_root / "plumbing" / "files.py", "def family_lock(", "def _unused():\n    return 1\n\n\ndef family_lock(")
    edit(copy_root / "plumbing" / "processes.py", "    def _handle(self, signum, frame):\n",
         "    def _handle(self, signum, frame):\n        signum = int(signum)\n")
    assert set(statuses().values()) == {"current"}


def test_completion_and_ood_edits_leave_every_run_current(copy_root):
    """What only the tools use (complete, missing_nll, completion_nll, ood_score, common.repaint)
    is computed afresh by every tool run: an edit to it neither retrains nor re-scores a run."""
    edit(copy_root / "ddpm.py", "    def complete(self, x, missing, steps=20, resample=2):",
         "    def complete(self, x, missing, steps=30, resample=3):")
    edit(copy_root / "common.py", "    z = sigmas[0] * torch.randn_like(known)\n",
         "    z = sigmas[0] * torch.randn_like(known)\n    z = z + 0\n")
    edit(copy_root / "energy_based_model.py", "    def ood_score(self, x):\n", "    def ood_score(self, x):\n        x = x + 0\n")
    assert set(statuses().values()) == {"current"}


def test_a_scoring_change_rescores_and_a_training_change_retrains(copy_root, monkeypatch):
    edit(copy_root / "plumbing" / "quality.py", "\ndef sample_quality(", "\nSCALE = 1.0\n\n\ndef sample_quality(")
    assert set(statuses().values()) == {"rescore"}
    arm = copy_root / "autoregressive_model.py"
    text = arm.read_text()
    start = text.index("    def loss(self, x, y")
    body = text.index("\n", text.index("):", start)) + 1
    arm.write_text(text[:body] + "        x = x * 1\n" + text[body:])
    changed = statuses()
    assert changed.pop(("ARM", False)) == changed.pop(("ARM", True)) == "retrain"
    assert set(changed.values()) == {"rescore"}


def test_an_evaluation_method_of_one_family_rescores_that_family_only(copy_root):
    """ddpm.py's class_log_likelihoods (a SCORED method: the conditional table's generative
    classifier): the DDPM runs re-score, their weights stay current, and no other family is touched."""
    edit(copy_root / "ddpm.py", "    def class_log_likelihoods(self, x, exact=6, strata=18):",
         "    def class_log_likelihoods(self, x, exact=6, strata=20):")
    changed = statuses()
    assert changed.pop(("DDPM", False)) == changed.pop(("DDPM", True)) == "rescore"
    assert set(changed.values()) == {"current"}


def test_an_edit_to_the_other_samplers_leaves_every_run_current(copy_root):
    """samplers() is only benchmark.py --samplers': an edit to it neither retrains nor re-scores."""
    edit(copy_root / "ddpm.py", "        others = dict(ancestral=self.sample_ancestral, ddim=self.sample_ddim)",
         "        others = dict(ddim=self.sample_ddim, ancestral=self.sample_ancestral)")
    assert set(statuses().values()) == {"current"}


def test_the_leaderboard_rescores_a_rescore_run_from_its_weights(copy_root, monkeypatch, tmp_path):
    """current_run asks train_into to re-score (no training) when only the scoring code changed."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("ARM_metrics.json", "ARM_samples.npy", "ARM.pt"):
        shutil.copy2(ROOT / "results" / name, out)
    edit(copy_root / "plumbing" / "quality.py", "\ndef sample_quality(", "\nSCALE = 1.0\n\n\ndef sample_quality(")
    calls = []
    monkeypatch.setattr(results, "train_into", lambda *args, **kwargs: calls.append(kwargs) or "stub: not run")
    results.current_run("ARM", "autoregressive_model.py", out, True, 1)
    assert [call["rescore"] for call in calls] == [True]


TINY = ["--quick", "--no-progress", "--channels", "8", "--layers", "2", "--members", "1", "--num-samples", "8",
        "--epochs", "1"]


def test_rescoring_keeps_the_weights_and_the_training_record(tmp_path):
    """train_into(rescore=True): the script runs --sample-only on OUT's weights; the weights, GIF,
    curve and the training record in the metrics stay, the samples and scores are new."""
    out = tmp_path / "out"
    assert run_main(arm_script.main, TINY + ["--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    metrics = json.loads(before["ARM_metrics.json"])
    metrics.update(train_seconds=1234.5, epochs_run=77)  # a training record the re-score must keep
    (out / "ARM_metrics.json").write_text(json.dumps(metrics))
    (out / "ARM_samples.npy").write_bytes(b"old samples")
    assert results.train_into(out, "ARM", "autoregressive_model.py", 1, extra=TINY, rescore=True) is None
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    for name in ("ARM.pt", "ARM_training.gif", "ARM_loss_val_curve.png"):
        assert after[name] == before[name], name
    rescored = json.loads(after["ARM_metrics.json"])
    assert (rescored["train_seconds"], rescored["epochs_run"]) == (1234.5, 77)
    assert rescored["test_nll_nats"] == pytest.approx(metrics["test_nll_nats"])
    assert after["ARM_samples.npy"] != b"old samples" and Path(out / "ARM_samples.npy").stat().st_size > 0
