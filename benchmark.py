"""Speed of every family, measured against the machine it runs on.

    python benchmark.py             # OUT/benchmark.md and .json: the speed table below
    python benchmark.py --samplers  # OUT/samplers.md and .json: each family's other samplers
    python benchmark.py --busy      # OUT/busy.md and .json: ARM and DDPM beside a CPU-bound process

The speed table takes, per family, what its default run recorded in OUT/NAME_metrics.json
(seconds per epoch, seconds to the best validation value, seconds per 1000 samples, peak memory)
and measures its training step here, on 1 and on 2 threads: the matrix-multiply FLOPs of one
step, counted with torch.utils.flop_counter's formulas from the shapes (forward and backward,
every network evaluation of the step, e.g. the EBM's Langevin chains), the seconds per step, and
so the achieved fraction of this machine's fp32 matmul throughput, measured on 1024 x 1024
products at the same thread count. The share of an epoch spent in training steps shows what the
rest (validation, GIF frames) costs. Below it, what the averaged sample-quality measures (5 draws
of 1000 instead of one, each scored) add to each default and conditional run. Then each default run against an earlier table
(--before, by default results/benchmark_before.json: the runs before the speed round): training
seconds, test NLL and Frechet distance before and after, and whether it got worse. The busy table runs ARM's and DDPM's default runs beside one
CPU-bound process, with the automatic thread count and with 2 threads forced. The sampler
table puts each family's other samplers (its `samplers()`: fewer or more steps, another solver)
beside its default one, on the shipped weights: seconds per 1000 samples and the Frechet distance
over the same sample seeds as the run's own draws, so each draw of another sampler starts from
the noise of the default's draw, and their paired difference is read with its own spread. Nothing here
depends on a GPU; with --device cuda the step is timed there. Run it on an otherwise idle
machine, after the default runs (python leaderboard.py).
"""

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

import common
import leaderboard
import plumbing
from plumbing import checkpoints, files, processes, quality, registry, results, runs

ROOT = registry.ROOT
SCRIPTS = registry.SCRIPTS  # name -> script (tests narrow it)
BUSY_FAMILIES = ("ARM", "DDPM")
# one CPU-bound process that also ends when benchmark.py is gone, however it ended (even SIGKILL)
BUSY_LOOP = ("import os, sys\nwhile os.getppid() == int(sys.argv[1]):\n"
             "    for _ in range(10**6):\n        pass")  # argv: the parent's pid

# -----------------------------------------------------------------------------
# measurements


class MatmulFlops(TorchDispatchMode):
    """FLOPs of the matrix products (mm, addmm, bmm, convolutions and their backward) run inside
    it, from torch.utils.flop_counter's formulas of the shapes. (torch's FlopCounterMode itself
    also tracks modules with backward hooks, which torch.autograd.grad inside a step refuses.)"""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out


def matmul_flops_per_second(device, n=1024, min_seconds=1.0):
    """Achieved fp32 FLOP/s of (n, n) @ (n, n) products: the machine's practical peak."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b  # warm-up
    reps = 0
    with common.timed(device) as seconds:
        start = time.perf_counter()
        while reps < 3 or time.perf_counter() - start < min_seconds:
            a @ b
            reps += 1
    return 2 * n**3 * reps / seconds["wall"]


def step_speed(model, optimizer, train, labels, batch_size, device, min_seconds=2.0):
    """(matmul FLOPs of one training step, wall seconds per step) on full batches of the train
    pixels and their labels."""
    batches = [(train[i:i + batch_size], labels[i:i + batch_size])
               for i in range(0, len(train) - batch_size + 1, batch_size)]
    model.train()
    for batch in batches[:2]:  # warm-up: allocator, optimizer state
        model.train_step(*batch, optimizer)
    with MatmulFlops() as counter:
        model.train_step(*batches[0], optimizer)
    steps = 0
    with common.timed(device) as seconds:
        start = time.perf_counter()
        while steps < 5 or time.perf_counter() - start < min_seconds:
            model.train_step(*batches[steps % len(batches)], optimizer)
            steps += 1
    return counter.flops, seconds["wall"] / steps


def speed_row(name, script, out, splits, labels, device, peaks):
    """One family: what its default run recorded, and its training step timed here at each thread
    count of `peaks` (thread count -> matmul FLOP/s)."""
    metrics, _ = results.read_metrics(out / f"{name}_metrics.json", SPEED_KEYS)  # checked in main
    flags = metrics["train_flags"]
    steps = {}
    for threads, peak in peaks.items():
        torch.set_num_threads(threads)
        common.set_seed(0)
        model = registry.model_class(name).build().to(device)  # the defaults: the run's config if current
        flops, step_seconds = step_speed(model, model.configure_optimizer(flags["lr"]), splits["train"],
                                         labels["train"], flags["batch_size"], device)
        steps[threads] = dict(step_ms=1000 * step_seconds, achieved_gflops=flops / step_seconds / 1e9,
                              matmul_fraction=flops / step_seconds / peak)
    run_threads = metrics["threads"]
    epoch_seconds = metrics["train_seconds"] / metrics["epochs_run"]
    steps_per_epoch = math.ceil(len(splits["train"]) / flags["batch_size"])
    step_at_run = steps.get(run_threads, steps[max(steps)])["step_ms"] / 1000
    return dict(model=name, threads=run_threads, epochs=metrics["epochs_run"],
                seconds_per_epoch=epoch_seconds, seconds_to_best=metrics["train_seconds_to_best"],
                train_seconds=metrics["train_seconds"],
                seconds_per_1000_samples=metrics["sample_seconds"] * 1000 / metrics["num_samples"],
                peak_memory_mb=metrics["peak_memory_mb"], step_mflop=flops / 1e6, steps=steps,
                step_share_of_epoch=min(1.0, steps_per_epoch * step_at_run / epoch_seconds),
                test_nll_nats=metrics.get("test_nll_nats"), frechet_distance=metrics.get("frechet_distance"),
                frechet_distance_seed_std=metrics.get("frechet_distance_seed_std"), train_flags=flags,
                current=results.run_status(metrics, script) != "retrain")  # a re-score keeps the training record


def comparison_lines(rows, before):
    """Markdown lines comparing this table's rows with `before` (an earlier benchmark.json): training
    seconds, test NLL and the Frechet distance (mean +- s.d. over sample seeds) of each default run.
    A family counts as worse when its NLL rose by more than NLL_TOLERANCE nats or its Frechet
    distance by more than the larger of the two s.d.s across sample seeds."""
    earlier = {row["model"]: row for row in before["rows"]}
    peaks = before.get("matmul_flops_per_second", {})
    lines = ["Before and after: each default run of the earlier table (" + (before.get("note") or "an earlier run")
             + "; measured on a machine of fp32 matmul throughput "
             + ", ".join(f"{p / 1e9:.0f} GFLOP/s on {t} thread(s)" for t, p in peaks.items())
             + ") against this one. Worse: test NLL up by more than "
             f"{NLL_TOLERANCE} nats, or the Frechet distance up by more than the larger s.d. across its sample seeds.",
             "", "| model | train s before | train s after | faster | test NLL before | after | Frechet before "
             "| after | verdict |", "|---|---|---|---|---|---|---|---|---|"]
    totals = [0.0, 0.0]
    for row in rows:
        old = earlier.get(row["model"])
        if old is None:
            continue
        totals[0] += old["train_seconds"]
        totals[1] += row["train_seconds"]
        worse = []
        if None not in (old.get("test_nll_nats"), row["test_nll_nats"]) and (
                row["test_nll_nats"] - old["test_nll_nats"] > NLL_TOLERANCE):
            worse.append("NLL")
        spreads = [s for s in (old.get("frechet_distance_seed_std"), row["frechet_distance_seed_std"]) if s is not None]
        if None not in (old.get("frechet_distance"), row["frechet_distance"]) and spreads and (
                row["frechet_distance"] - old["frechet_distance"] > max(spreads)):
            worse.append("Frechet")
        lines.append(f"| {row['model']} | {old['train_seconds']:.1f} | {row['train_seconds']:.1f} "
                     f"| {old['train_seconds'] / row['train_seconds']:.2f}x | {leaderboard.fmt(old.get('test_nll_nats'))} "
                     f"| {leaderboard.fmt(row['test_nll_nats'])} | {leaderboard.seed_pm(old, 'frechet_distance')} "
                     f"| {leaderboard.seed_pm(row, 'frechet_distance')} "
                     f"| {'worse: ' + ', '.join(worse) if worse else 'not worse'} |")
    lines += ["", f"Training seconds of these default runs in all: {totals[0]:.0f} before, {totals[1]:.0f} after."]
    return lines


def extra_draw_scoring_seconds(out, splits, labels):
    """Seconds to score one more draw of 1000 samples (its fast measures, as averaged_quality and
    averaged_conditional_quality score every draw after the first): (unconditional, conditional),
    timed here on the train digits (the cost does not depend on what the samples show), the
    fastest of three after a first call that loads the classifiers."""
    x, y = splits["train"].cpu().numpy(), labels["train"].cpu().numpy()
    score = dict(unconditional=lambda: quality.sample_quality(x, out, slow=False),
                 conditional=lambda: quality.conditional_quality(x, y, out))
    fastest = {}
    for kind, call in score.items():
        call()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        fastest[kind] = min(times)
    return fastest["unconditional"], fastest["conditional"]


def measures_cost_lines(out, scoring_seconds):
    """Markdown lines: what the averaged sample-quality measures add to each default and conditional
    run in `out`: the quality.QUALITY_DRAWS - 1 draws after the first (the run's own seconds) and
    their scoring (scoring_seconds: one draw's, unconditional and conditional), as a share of the
    run's wall time from start to metrics (run_seconds). A run recorded before run_seconds was kept
    shows the share of its training time instead, marked: an upper bound."""
    extra = quality.QUALITY_DRAWS - 1
    lines = [f"What the averaged measures add to each run ({quality.QUALITY_DRAWS} draws of 1000 instead of one): "
             f"the run's seconds for its {extra} extra draws, their scoring ({extra} x one draw's fast measures, "
             f"timed here: {scoring_seconds[0]:.2f} s unconditional, {scoring_seconds[1]:.2f} s conditional), and "
             "the two as a share of the run's wall time (training, test NLL, samples, files; * a run recorded "
             "before its wall time was kept: the share of its training time, an upper bound).", "",
             "| run | run s | extra draws s | their scoring s | added, share of the run |", "|---|---|---|---|---|"]
    for name in SCRIPTS:
        for run, scoring in ((name, extra * scoring_seconds[0]), (f"{name}_conditional", extra * scoring_seconds[1])):
            metrics, _ = results.read_metrics(out / f"{run}_metrics.json", COST_KEYS)
            if metrics is None:
                continue
            added = metrics["quality_draws_seconds"] + scoring
            whole = results.kind_ok(metrics.get("run_seconds"), "number") and metrics["run_seconds"]
            lines.append(f"| {run} | {f'{whole:.1f}' if whole else '-'} | {metrics['quality_draws_seconds']:.2f} "
                         f"| {scoring:.2f} | {100 * added / (whole or metrics['train_seconds']):.1f}%"
                         f"{'' if whole else ' *'} |")
    return lines


def speed_table(out, device, thread_counts, before=None):
    peaks = {}
    for threads in thread_counts:
        torch.set_num_threads(threads)
        peaks[threads] = matmul_flops_per_second(device)
    splits, labels = common.load_splits(device), common.load_label_splits(device)
    rows = []
    for name, script in SCRIPTS.items():
        processes.emit(f"benchmark: {name} training step")
        rows.append(speed_row(name, script, out, splits, labels, device, peaks))
    one, most = min(thread_counts), max(thread_counts)
    lines = [f"Machine: {os.cpu_count()} CPU cores, device {device}, torch {torch.__version__}; fp32 matmul "
             f"throughput (1024 x 1024 products) " + ", ".join(f"{peaks[t] / 1e9:.0f} GFLOP/s on {t} thread(s)"
                                                               for t in thread_counts) + ".",
             "",
             "From each default run's metrics (its thread count in the threads column): seconds per epoch "
             "(training steps, validation, GIF frames), epochs, seconds to its best validation value, "
             "training seconds, seconds per 1000 samples with the default sampler, peak resident memory. "
             "Measured here: one training step's matmul FLOPs (forward and backward, every network "
             f"evaluation of the step), its time on {one} and {most} thread(s), the {most}-thread speed-up, "
             f"the achieved fraction of the matmul throughput on {most} thread(s), and the share of an "
             "epoch spent in training steps (the rest: validation, GIF frames, data shuffling).", "",
             f"| model | threads | s / epoch | epochs | s to best | train s | s / 1000 samples | peak MiB "
             f"| MFLOP / step | step ms, {one} thread | step ms, {most} threads | speed-up "
             f"| GFLOP/s | of matmul peak | step share of epoch |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s1, s2 = r["steps"][one], r["steps"][most]
        lines.append(f"| {r['model']}{'' if r['current'] else ' (stale)'} | {r['threads']} "
                     f"| {r['seconds_per_epoch']:.2f} | {r['epochs']} | {r['seconds_to_best']:.1f} "
                     f"| {r['train_seconds']:.1f} | {r['seconds_per_1000_samples']:.2f} | {r['peak_memory_mb']:.0f} "
                     f"| {r['step_mflop']:.0f} | {s1['step_ms']:.1f} | {s2['step_ms']:.1f} "
                     f"| {s1['step_ms'] / s2['step_ms']:.2f}x | {s2['achieved_gflops']:.1f} "
                     f"| {100 * s2['matmul_fraction']:.1f}% | {100 * r['step_share_of_epoch']:.0f}% |")
    total = sum(r["train_seconds"] for r in rows)
    scoring_seconds = extra_draw_scoring_seconds(out, splits, labels)
    lines += ["", f"All {len(rows)} default runs: {total:.0f} s of training in all.", ""]
    lines += measures_cost_lines(out, scoring_seconds)
    if before is not None:
        lines += [""] + comparison_lines(rows, before)
    write(out, "benchmark", "\n".join(lines) + "\n",
          dict(device=str(device), thread_counts=list(thread_counts), cpu_count=os.cpu_count(),
               matmul_flops_per_second={str(t): p for t, p in peaks.items()},
               torch_version=torch.__version__, rows=rows,
               extra_draw_scoring_seconds=dict(zip(("unconditional", "conditional"), scoring_seconds))))


def sampler_row(model, sampler_name, sampler, seeds, count, out, device):
    """One sampler of a trained model (None: its default one): a draw of `count` samples from each
    seed, timed; the draws' Frechet distances to the test digits, their mean and s.d. (as
    quality.over_draws merges them), and the mean seconds per 1000 samples."""
    draws, seconds = [], []
    for seed in seeds:
        with common.timed(device) as elapsed:
            draw = common.draw_samples(model, count, seed, device, sampler=sampler).cpu()
        quality.check_samples(draw, f"{model.name}'s sampler {sampler_name}")
        draws.append(draw.numpy())
        seconds.append(elapsed["wall"])
    scores = [quality.sample_quality(x, out, extended=False) for x in draws]
    merged = quality.over_draws(scores, ("frechet_distance",))
    return dict(sampler=sampler_name, seconds_per_1000=1000 * sum(seconds) / len(seconds) / count,
                frechet_distance=merged["frechet_distance"],
                frechet_distance_seed_std=merged["frechet_distance_seed_std"],
                frechet_by_draw=[s["frechet_distance"] for s in scores])


def sampler_table(out, device):
    """Each family with other samplers (model.samplers()), on its weights in OUT: its default
    sampler and each other one, QUALITY_DRAWS draws of the run's sample count (1000) from its own
    draw seeds, so the default sampler's numbers are the run's own; the
    other samplers' Frechet distance beside the default's, and their paired difference draw by
    draw (the same seed: for an ODE or a deterministic sampler the same starting noise)."""
    families = []
    for name, script in SCRIPTS.items():
        metrics, _ = results.read_metrics(out / f"{name}_metrics.json", SAMPLER_KEYS)  # checked in main
        family = registry.model_class(name)
        try:  # the run's sampler settings: its default sampler is the one it drew with
            sampling = family.Sampling(**metrics["sampling"])
        except TypeError as error:
            raise plumbing.UsageError(f"{out / f'{name}_metrics.json'} has sampler settings this code does not "
                                      f"know ({error}); re-make it with: python leaderboard.py --out {out}") from None
        model = checkpoints.load_trained(family, out, sampling=sampling, device=device)
        others = model.samplers()
        if not others:
            continue
        seeds, count = quality.draw_seeds(metrics["seed"] + 4), metrics["num_samples"]  # the run's own draws
        processes.emit(f"benchmark: {name}'s samplers, {len(seeds)} draws of {count} each")
        default = sampler_row(model, "default", None, seeds, count, out, device)
        rows = [default]
        for sampler_name, sampler in others.items():
            row = sampler_row(model, sampler_name, sampler, seeds, count, out, device)
            row["difference"], row["difference_seed_std"] = quality.mean_std(
                [a - b for a, b in zip(row["frechet_by_draw"], default["frechet_by_draw"])])
            rows.append(row)
        families.append(dict(model=name, sampling=metrics["sampling"], rows=rows,
                             current=results.run_status(metrics, script) != "retrain",
                             # the default sampler's draws are the run's own: the same numbers as its metrics
                             matches_run=default["frechet_distance"] == metrics["frechet_distance"]))
    lines = [f"Each family's other samplers on its shipped weights, on {torch.get_num_threads()} thread(s) "
             f"({device}): seconds per 1000 samples (the mean over the draws), the Frechet distance (MLP) to "
             f"the test digits, the mean +- s.d. over {quality.QUALITY_DRAWS} draws of 1000 from the run's own "
             f"sample seeds, and the difference to the default sampler's Frechet distance on the same seed (mean "
             f"+- s.d. over the draws; its standard error is that / sqrt({quality.QUALITY_DRAWS})). The default "
             f"sampler's settings are the run's `sampling`.", "",
             "| model | sampler | s / 1000 samples | Frechet distance | minus the default's, same seeds |",
             "|---|---|---|---|---|"]
    for family in families:
        for row in family["rows"]:
            difference = ("-" if row["sampler"] == "default" else
                          leaderboard.pm(row["difference"], row["difference_seed_std"]))
            lines.append(f"| {family['model']}{'' if family['current'] else ' (stale)'} | {row['sampler']} "
                         f"| {row['seconds_per_1000']:.2f} | {leaderboard.seed_pm(row, 'frechet_distance')} "
                         f"| {difference} |")
    differ = [f["model"] for f in families if not f["matches_run"]]
    lines += ["", "The default sampler's draws here give each run's own Frechet distance (its metrics)." if not differ
              else f"The default sampler's draws here do not give the run's own Frechet distance for {', '.join(differ)} "
                   f"(made on another machine or torch version, or stale)."]
    write(out, "samplers", "\n".join(lines) + "\n",
          dict(device=str(device), threads=torch.get_num_threads(), torch_version=torch.__version__,
               families=families))


# -----------------------------------------------------------------------------
# default runs in fresh processes: thread counts, and a busy machine


class RunFailed(Exception):
    """A default run beside the busy core did not finish: one line, exit 1."""


def default_run(name, script, out, flags=()):
    """The family's default run with extra flags in a scratch folder (the out folder's cached
    digit classifiers copied in), signals forwarded to it; returns its metrics."""
    with tempfile.TemporaryDirectory() as scratch:
        for cache in out.glob("_digit_*.pt"):
            shutil.copy(cache, scratch)
        command = [sys.executable, str(ROOT / script), "--no-progress", "--out", scratch, *flags]
        code = processes.run_child(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        metrics, problem = results.read_metrics(Path(scratch) / f"{name}_metrics.json", BUSY_KEYS)
        if code != 0 or problem:
            raise RunFailed(f"{script} {' '.join(flags)} beside the busy core "
                            + (f"exited with status {code}" if code else f"wrote a metrics file that {problem}"))
        return metrics


def busy_table(out, families=BUSY_FAMILIES):
    """Default runs beside one CPU-bound process (a Python busy loop), with the default automatic
    thread count and with 2 threads forced, against the idle default run in OUT."""
    rows = []
    for name in families:
        idle, _ = results.read_metrics(out / f"{name}_metrics.json", BUSY_KEYS)  # checked in main
        for threads in ("auto", "2"):
            hog = processes.spawn([sys.executable, "-c", BUSY_LOOP, str(os.getpid())], how="kill")
            try:
                time.sleep(1.0)  # let it show in the idle-core measurement
                processes.emit(f"benchmark: {name} beside a busy core, --threads {threads}")
                busy = default_run(name, SCRIPTS[name], out, ["--threads", threads])
            finally:
                hog.kill()
                processes.finish(hog)
            rows.append(dict(model=name, threads_flag=threads, threads=busy["threads"],
                             idle_train_seconds=idle["train_seconds"], idle_threads=idle["threads"],
                             idle_epochs=idle["epochs_run"], busy_train_seconds=busy["train_seconds"],
                             busy_epochs=busy["epochs_run"],
                             slowdown=busy["train_seconds"] / idle["train_seconds"],
                             slowdown_per_epoch=(busy["train_seconds"] / busy["epochs_run"])
                             / (idle["train_seconds"] / idle["epochs_run"])))
    lines = ["| model | --threads beside the busy core | threads used | busy train s (epochs) "
             "| idle train s (epochs, threads) | slowdown | per epoch |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['threads_flag']} | {r['threads']} | {r['busy_train_seconds']:.1f} "
                     f"({r['busy_epochs']}) | {r['idle_train_seconds']:.1f} ({r['idle_epochs']}, {r['idle_threads']}) "
                     f"| {r['slowdown']:.2f}x | {r['slowdown_per_epoch']:.2f}x |")
    write(out, "busy", "\n".join(lines) + "\n", dict(cpu_count=os.cpu_count(), rows=rows))


def write(out, stem, table, data):
    with processes.SIGNALS.held():  # both files complete, then a signal's exit 130
        files.write_table(out / f"{stem}.md", table)
        files.save_json(out / f"{stem}.json", data)
    processes.emit(table)


SPEED_KEYS = dict(train_flags="dict", threads="int", epochs_run="int", train_seconds="number",
                  train_seconds_to_best="number", sample_seconds="number", num_samples="int",
                  peak_memory_mb="number")
COST_KEYS = dict(train_seconds="number", quality_draws_seconds="number")
BUSY_KEYS = dict(threads="int", epochs_run="int", train_seconds="number")
SAMPLER_KEYS = dict(seed="int", sampling="dict", frechet_distance="number", epochs_run="int", train_seconds="number",
                    num_samples="int")
NLL_TOLERANCE = 0.3  # nats per image: a change of the defaults for speed may cost at most this much test NLL
BEFORE = ROOT / "results" / "benchmark_before.json"  # the default runs before the speed round (issue #41)


def usable_runs(out, families, keys):
    """The families whose OUT/NAME_metrics.json has `keys` with sane values; a damaged file is one
    line naming it (and the family counts as missing)."""
    usable = []
    for name in families:
        path = out / f"{name}_metrics.json"
        metrics, problem = results.read_metrics(path, keys)
        if metrics is not None and keys is SPEED_KEYS:
            flags = metrics["train_flags"]
            if not (results.kind_ok(flags.get("lr"), "number") and results.kind_ok(flags.get("batch_size"), "int")
                    and flags["batch_size"] > 0 and flags["lr"] > 0):
                problem = "has wrong values: train_flags needs lr and batch_size"
        if metrics is not None and not problem and (metrics["epochs_run"] < 1 or metrics["train_seconds"] <= 0
                                                    or metrics.get("num_samples", 1) < 1):
            problem = "has wrong values: no epoch, no training time or no samples"
        if problem and problem != "is missing":
            print(f"benchmark: {path} {problem}; treated as missing", file=sys.stderr)
        if not problem:
            usable.append(name)
    return usable


def main(argv=None):
    parser = runs.Parser(prog="benchmark.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None,
                        help="folder of the default runs and of the tables (default: the project's results/; "
                             "a relative path is taken from the current directory)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps"),
                        help="device of the timed training steps (default %(default)s)")
    parser.add_argument("--threads", type=common.thread_count, nargs="+", default=[1, runs.MAX_AUTO_THREADS],
                        metavar="N", help="CPU thread counts of the timed training steps (default 1 2)")
    parser.add_argument("--before", type=Path, default=BEFORE,
                        help="an earlier benchmark.json to compare each default run's training time, test NLL "
                             "and Frechet distance with (default: results/benchmark_before.json, the runs before "
                             "the speed round); a missing file leaves the comparison out")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--busy", action="store_true",
                        help=f"only time {' and '.join(BUSY_FAMILIES)}'s default runs beside one CPU-bound process")
    mode.add_argument("--samplers", action="store_true",
                        help="only time and score each family's other samplers beside its default one "
                             f"({quality.QUALITY_DRAWS} draws of 1000 each, on the largest --threads count)")
    args = parser.parse_args(argv)
    out = results.out_folder(args.out)
    processes.tool("benchmark.py", lambda: benchmark(args, out),
                     "its child runs were stopped and their scratch folders removed; the files in --out are whole")


def benchmark(args, out):
    device = runs.choose_device(args.device)  # a refused device: one line, before anything runs
    families = list(BUSY_FAMILIES) if args.busy else list(SCRIPTS)
    usable = usable_runs(out, families, BUSY_KEYS if args.busy else SAMPLER_KEYS if args.samplers else SPEED_KEYS)
    missing = [n for n in families if n not in usable]
    if missing:
        raise plumbing.UsageError(f"no usable default runs of {', '.join(missing)} in {out}; make them with: "
                                f"python leaderboard.py --out {out}")
    processes.claim_out(out, "benchmark.py")
    if args.samplers:
        torch.set_num_threads(max(args.threads))
        sampler_table(out, device)
    elif args.busy:
        try:
            busy_table(out, families)
        except RunFailed as error:
            print(f"benchmark.py: error: {error}; no table written", file=sys.stderr)
            raise SystemExit(plumbing.EXIT_NONFINITE) from None
    else:
        before = None
        if args.before is not None and args.before.is_file():
            try:
                before = files.read_json(args.before)
                if not isinstance(before.get("rows"), list):
                    raise files.DamagedFile(f"{args.before} has no rows")
            except files.DamagedFile as error:
                raise plumbing.UsageError(f"--before: {error}") from None
        speed_table(out, device, sorted(set(args.threads)), before)


if __name__ == "__main__":
    main()
