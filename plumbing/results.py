"""The tools' side of a run: reading its files (checked: a damaged one is one line and counts as
missing), telling whether they come from the current code, and making a missing or stale run
(trained in a scratch folder and moved in whole, or re-scored from its weights)."""

import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from plumbing import UsageError
from common import NUM_PIXELS, PIXEL_MAX
from plumbing.checkpoints import load_trained, pair_problem, scoring_fingerprint, weights_fingerprint
from plumbing.files import (
    SCRATCH, DamagedFile, arrays_checksum, family_lock, read_json, read_npy, read_npz, remove_stale, save_json)
from plumbing.processes import SIGNALS, emit, run_child
from plumbing.registry import ROOT, model_class, output_paths, stem
from plumbing.runs import MAX_AUTO_THREADS, MAX_SAMPLES, threads_flag


THREADS_HELP = (f"CPU threads for torch and for training a missing family: a count, or auto (the default): the "
                f"idle cores when the tool starts, at most {MAX_AUTO_THREADS}, so a busy machine gets one thread")


def add_machine_flags(parser):
    """--threads, --device and --no-progress, as ood.py and inpaint.py take them."""
    parser.add_argument("--threads", type=threads_flag, default=None, metavar="N|auto", help=THREADS_HELP)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"),
                        help="auto picks cuda, then mps, then cpu (default %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or lines")


def add_folder_flags(parser, writes):
    """--weights (the trained families read, and trained into when missing) and --out (the tool's
    own files `writes`), both defaulting to the project's results/."""
    parser.add_argument("--weights", type=Path, default=None, metavar="DIR",
                        help="folder of the trained weights NAME.pt (default: the project's results/, where they "
                             "ship); a family missing there is trained into it first (not with --no-train)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"folder for {writes} (default: the project's results/; a relative path is taken from "
                             f"the current directory)")
    parser.add_argument("--no-train", action="store_true",
                        help="never train: skip a family whose weights are missing from --weights")


def out_folder(value):
    """--out: a relative path is taken from the current directory; None: the project's results/."""
    return ROOT / "results" if value is None else Path(value).absolute()


# what a re-scored run keeps of the metrics of the training that made its weights
TRAINING_KEYS = ("epochs_run", "best_epoch", "best_val_objective", "stopped", "train_seconds", "train_cpu_seconds",
                 "train_seconds_to_best", "peak_memory_mb", "threads", "argv", "changed_settings", "train_flags",
                 "run_seconds")


def train_into(out, name, script, threads, flags=(), extra=(), stdout=None, rescore=False):
    """Run `script` with its defaults (and `flags`) in a scratch folder in `out`; a finished run
    (exit 0, metrics not interrupted) replaces the family's files in `out`, moved in under its
    lock with the metrics last. rescore: no training; the run loads OUT's weights (--sample-only --evaluate),
    scores them with the current code and keeps the training record of OUT's metrics. Returns
    None, or a one-line reason why `out` is unchanged."""
    out.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    conditional, name = "--conditional" in flags, stem(name, "--conditional" in flags)
    paths = output_paths(out, name, conditional)
    scratch = Path(tempfile.mkdtemp(prefix=f".{name}{SCRATCH}{os.getpid()}-", dir=out))
    try:
        for cache in out.glob("_digit_*.pt"):  # the cached digit classifiers: no retraining
            if cache.is_file():
                shutil.copy2(cache, scratch)
        trained = None
        if rescore:
            trained, problem = read_metrics(paths["metrics"], RUN_KEYS)
            if problem:
                return f"{paths['metrics']} {problem}; {out} is unchanged"
            shutil.copy2(paths["weights"], scratch)
            extra = (*extra, "--sample-only", "--evaluate")
        command = [sys.executable, str(ROOT / script), "--no-progress", "--threads", str(threads),
                   "--out", str(scratch), *extra, *flags]
        code = run_child(command, cwd=ROOT, stdout=stdout)
        if code != 0:
            return f"{script} exited with status {code}; {out} is unchanged"
        metrics_file = scratch / paths["metrics"].name
        metrics, problem = read_metrics(metrics_file, RUN_KEYS)
        if problem or metrics.get("interrupted"):
            return (f"{script} did not finish (" + (f"its metrics file {problem}" if problem else "interrupted")
                    + f"); {out} is unchanged")
        if trained is not None:
            save_json(metrics_file, {**metrics, **{k: trained.get(k) for k in TRAINING_KEYS}})
        with SIGNALS.held(), family_lock(out, name):
            moved = [p for p in scratch.iterdir() if p.is_file() and not p.name.startswith(".")]
            paths["metrics"].unlink(missing_ok=True)  # an interrupted move leaves no metrics
            for kind, path in paths.items():
                if not (scratch / path.name).exists() and not (rescore and kind in ("gif", "curve", "resume")):
                    path.unlink(missing_ok=True)  # e.g. a GIF this run did not draw: no stale one
            for path in sorted(moved, key=lambda p: p == metrics_file):
                if path.name.startswith("_digit_") and (out / path.name).exists():
                    continue  # a cache already there
                os.replace(path, out / path.name)
        return None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


MAX_METRICS_BYTES = 10 * 2**20


RUN_KEYS = dict(model="str", epochs_run="int", interrupted="bool")


ROW_KEYS = dict(test_nll_nats="number?", nll_kind="str?", train_seconds="number", sample_seconds="number",
                train_cpu_seconds="number?", epochs_run="int", best_epoch="int", device="str",
                frechet_distance="number", classifier_confidence="number", class_coverage="number",
                copy_rate="number")


SEED_KEYS = dict(test_nll_nats="number?", nll_kind="str?", train_seconds="number", epochs_run="int",
                 frechet_distance="number")


def kind_ok(value, kind):
    if kind.endswith("?"):
        if value is None:
            return True
        kind = kind[:-1]
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "dict":
        return isinstance(value, dict)
    raise ValueError(kind)


def read_metrics(path, keys=ROW_KEYS):
    """(metrics, None) when `path` is a metrics file with `keys` of the right types (dict key ->
    "number", "int", "str", "bool", "dict", a "?" allows null); else (None, what is wrong)."""
    try:
        metrics = read_json(path, MAX_METRICS_BYTES)
    except DamagedFile as error:
        return None, error.problem
    if not isinstance(metrics, dict):
        return None, f"is a JSON {type(metrics).__name__}, not an object"
    missing = [k for k in keys if k not in metrics]
    if missing:
        return None, f"lacks {', '.join(missing)}"
    wrong = [f"{k}={metrics[k]!r:.40}" for k, kind in keys.items() if not kind_ok(metrics[k], kind)]
    if wrong:
        extra = " (a run of fewer than 2 samples has none)" if "frechet_distance" in str(wrong) else ""
        return None, f"has wrong values: {', '.join(wrong)}{extra}"
    return metrics, None


def pixel_rows(max_rows):
    """A header check for read_npy / read_npz: (N, 64) with 1 <= N <= max_rows."""
    def check(shape, dtype):
        if len(shape) != 2 or shape[1] != NUM_PIXELS or not 1 <= shape[0] <= max_rows:
            return f"has shape {shape}; expected (N, 64) with 1 <= N <= {max_rows}"
    return check


def read_labelled_samples(path, max_rows=MAX_SAMPLES):
    """((x (N, 64) float32, y (N,) int64), None) from a conditional run's NAME_conditional_samples.npz;
    (None, what is wrong) otherwise (checked like read_samples)."""
    def labels(shape, dtype):
        if len(shape) != 1 or not 1 <= shape[0] <= max_rows or dtype.kind not in "iu":
            return f"has labels y of shape {shape} and type {dtype}; expected (N,) integers"

    try:
        arrays = read_npz(path, dict(x=pixel_rows(max_rows), y=labels))
    except DamagedFile as error:
        return None, error.problem
    x, y = arrays["x"].astype(np.float32), arrays["y"]
    if y.shape != (len(x),):
        return None, f"has x {x.shape} and y {y.shape}; expected (N, 64) and (N,)"
    if not are_pixels(x) or y.min() < 0 or y.max() > 9:
        return None, "holds values that are not pixels on 0..16 or classes 0..9"
    return (x, y.astype(np.int64)), None


def read_samples(path, max_rows=MAX_SAMPLES):
    """(samples (N, 64) float32, None) from a NAME_samples.npy; (None, what is wrong) for a missing,
    truncated, mis-shaped, oversized or non-finite file. The header is checked before any data
    is read, so a header claiming 10^12 rows costs nothing."""
    try:
        samples = read_npy(path, pixel_rows(max_rows)).astype(np.float32)
    except DamagedFile as error:
        return None, error.problem
    if not are_pixels(samples):
        return None, "holds values that are not pixels on 0..16 (NaN, infinite or out of range)"
    return samples, None


def are_pixels(x):
    """Whether every value of the non-empty array x is finite and on the pixel range 0..16."""
    return bool(np.isfinite(x).all() and x.min() >= 0 and x.max() <= PIXEL_MAX)


def staleness(metrics, script, flags=()):
    """(status, why) of a metrics file: "current" when it comes from a finished default run (with
    `flags`, e.g. ("--seed", "1"), and no other setting changed) of the current code; "rescore"
    when its weights do but the scoring code changed since (re-scored from the weights, no
    training); "retrain" otherwise; why: the reason in a few words (None when current). The
    settings are judged, not the command line: a resumed default run is a default run."""
    changed, wanted = metrics.get("changed_settings"), _settings(flags)
    if metrics.get("stopped") == "sample_only" and not metrics.get("evaluated", True):
        return "retrain", "it comes from --sample-only (samples only, no test NLL)"
    if metrics.get("quick") is not False:
        return "retrain", "it comes from a --quick run"
    if metrics.get("interrupted") is not False or metrics.get("stopped") == "non_finite":
        return "retrain", "its run did not finish"
    if not isinstance(changed, dict):
        return "retrain", "its metrics do not record the run's settings"
    if set(changed) != set(wanted) or any(str(changed[k]) != v for k, v in wanted.items()):
        other = {k: v for k, v in changed.items() if str(v) != wanted.get(k)}
        return "retrain", "its run changed settings (" + ", ".join(f"{k}={v}" for k, v in other.items()) + ")"
    if metrics.get("weights_code_sha256") != weights_fingerprint(ROOT / script, ROOT):
        return "retrain", "the model's code changed since"
    if metrics.get("scoring_code_sha256") != scoring_fingerprint(ROOT / script, ROOT):
        return "rescore", "the scoring code changed since (re-scored from the weights when trained)"
    return "current", None


def run_status(metrics, script, flags=()):
    """staleness's status alone: "current", "rescore" or "retrain"."""
    return staleness(metrics, script, flags)[0]


def is_current(metrics, script, flags=()):
    return run_status(metrics, script, flags) == "current"


def _settings(flags):
    """("--seed", "1", "--conditional") -> {"seed": "1", "conditional": "True"}: a flag followed by
    another flag (or by nothing) is a switch."""
    wanted, i = {}, 0
    while i < len(flags):
        key = flags[i].lstrip("-").replace("-", "_")
        switch = i + 1 == len(flags) or flags[i + 1].startswith("--")
        wanted[key] = "True" if switch else flags[i + 1]
        i += 1 if switch else 2
    return wanted


def current_run(name, script, out, train, threads, flags=(), keys=ROW_KEYS, samples=True):
    """(metrics, samples or None) of OUT/NAME's default run (plus `flags`), made first when it is
    missing, damaged or stale and train is set; None when there is none. A damaged metrics or
    samples file is one line naming it and counts as missing."""
    run = stem(name, "--conditional" in flags)

    def usable():
        metrics, problem = read_metrics(out / f"{run}_metrics.json", keys)
        pixels = None
        if metrics is not None:
            problem = mixed_run(out, run, run != name, metrics)
        if metrics is not None and samples and not problem:
            path = output_paths(out, run, run != name)["npy"]
            pixels, problem = (read_labelled_samples if run != name else read_samples)(path)
            if pixels is not None and isinstance(metrics.get("samples_sha256"), str) and \
                    arrays_checksum(*(pixels if run != name else (pixels,))) != metrics["samples_sha256"]:
                problem = ("holds other samples than its metrics were measured on: a run stopped while it replaced "
                           "its files; run it again")
            problem = problem and f"{path} {problem}"
        elif problem and metrics is None:
            problem = f"{out / f'{run}_metrics.json'} {problem}" if problem != "is missing" else None
        return (None if problem else metrics), pixels, problem

    metrics, pixels, problem = usable()
    if problem:
        print(f"leaderboard: {problem}; treated as missing", file=sys.stderr)
    status, why = ("retrain", None) if metrics is None else staleness(metrics, script, flags)
    if status != "current" and metrics is not None and not train:
        print(f"leaderboard: {out / f'{run}_metrics.json'} is not the current default run: "
              f"{why}; listed as stale (without --no-train it is made again; "
              f"`git checkout results/` restores the shipped files)", file=sys.stderr)
    if status != "current" and train and (ROOT / script).is_file():
        rescore = status == "rescore" and output_paths(out, run)["weights"].is_file()
        emit(f"leaderboard: {'re-scoring' if rescore else 'training'} {name} with its defaults "
             f"{' '.join(flags)} ({script})")
        failed = train_into(out, name, script, threads, flags, rescore=rescore)
        if failed:
            print(f"leaderboard: {failed}", file=sys.stderr)
        else:
            metrics, pixels, problem = usable()
            if problem:
                print(f"leaderboard: {problem}", file=sys.stderr)
    return None if metrics is None else (metrics, pixels)


def mixed_run(out, run, conditional, metrics):
    """"OUT/RUN.pt holds other weights ..." when the weights file beside `metrics` does not hold the
    weights they record (checkpoints.pair_problem), else None; a missing or damaged weights file
    is left to the readers that load it."""
    path = output_paths(out, run, conditional)["weights"]
    if not isinstance(metrics.get("weights_sha256"), str) or not path.is_file():
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a damaged file: load_trained says what is wrong, in one line
        return None
    problem = pair_problem(checkpoint, metrics) if isinstance(checkpoint, dict) else None
    return problem and f"{path} {problem}"


def current_metrics(name, script, out, train, threads, flags=()):
    """OUT/NAME_metrics.json of the default run (plus `flags`), checked for the seed table's
    keys; None when there is none (see current_run)."""
    found = current_run(name, script, out, train, threads, flags, keys=SEED_KEYS, samples=False)
    return None if found is None else found[0]


def load_family(family, out, train, threads, device, sampling=(), tool="ood"):
    """The trained model of `family` (a Family) with the Sampling settings `sampling`
    ((field, value) pairs; the rest at their defaults), training it with its defaults when its
    weights are missing or come from an interrupted run; (None, a one-line reason) when it can't
    be had. A run trains in a scratch folder and replaces OUT's files only when it finishes. Used
    by ood.py and inpaint.py (`tool` names the one that prints)."""
    script = ROOT / family.script
    if not script.is_file():
        return None, f"no {family.script}"
    cls = model_class(family.name)
    weights = out / f"{family.name}.pt"
    unfinished = _interrupted(weights)
    if not weights.is_file() or unfinished:
        why = f"weights {weights} come from an interrupted run" if unfinished else f"no weights {weights}"
        if not train:
            return None, f"{why} (--no-train)"
        print(f"{tool}: {why}; training {family.name} with its defaults ({family.script})", file=sys.stderr,
              flush=True)
        failed = train_into(out, family.name, family.script, threads, extra=("--device", device.type),
                            stdout=subprocess.DEVNULL)
        if failed:
            return None, f"training failed: {failed}"
    try:
        settings = cls.Sampling(**dict(sampling)) if sampling else None
        return load_trained(cls, out, sampling=settings, device=device), None
    except UsageError as error:
        return None, str(error)


def _interrupted(weights):
    """Whether the weights file says its run was interrupted (older files say nothing: finished)."""
    if not weights.is_file():
        return False
    try:
        return torch.load(weights, map_location="cpu", weights_only=True).get("stopped") == "interrupted"
    except Exception:  # a damaged file: load_trained says what is wrong, in one line
        return False
