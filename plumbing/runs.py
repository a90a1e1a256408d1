"""A whole run: the command line every family script shares, and what its main() does with it
(train or load, then evaluate and write every output), with the machine's threads and device."""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common import (
    EMA, Hooks, NUM_CLASSES, NUM_PIXELS, TrainState, add_options, batched, cpu_state, draw_samples,
    load_label_splits, load_splits, nats_to_bpd, nonnegative_float, options_from, positive_float, positive_int,
    seed_int, seeded, set_rng_state, set_seed, thread_count, timed, train, unit_interval)
from plumbing import EXIT_INTERRUPTED, EXIT_NONFINITE, EXIT_USAGE, UsageError, first_line
from plumbing.checkpoints import (
    check_model_size, fingerprints, load_checkpoint, load_weights_into, save_resume, save_weights,
    train_state_from, weights_checksum)
from plumbing.files import (
    arrays_checksum, check_out, family_lock, finite_or_none, image_grid, labelled, remove_stale, save_arrays, save_curve,
    save_gif, save_image, save_json, with_row_labels)
from plumbing.processes import SIGNALS, Progress, StopNow, announced, emit, report
from plumbing.quality import (
    NonFiniteSamples, averaged_conditional_quality, averaged_quality, check_samples, draw_seeds,
    frechet_to, generative_classifier)
from plumbing.registry import ROOT, output_paths, stem


def digit_list(text):
    """--digits: "3,7" -> (3, 7), each a class 0..9, none twice (as numbers: 03 is 3)."""
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isascii() and part.isdigit() and int(part) < NUM_CLASSES for part in parts):
        raise argparse.ArgumentTypeError(f"expected distinct digits 0-9 separated by commas (e.g. 3,7), got {text!r}")
    digits = tuple(int(part) for part in parts)
    if len(set(digits)) < len(digits):
        raise argparse.ArgumentTypeError(f"expected distinct digits 0-9 separated by commas (e.g. 3,7), got {text!r} "
                                         f"(a class twice)")
    return digits


def threads_flag(value):
    """--threads: "auto" (None: chosen at start from the idle cores) or a count 1..256."""
    return None if value == "auto" else thread_count(value)


class Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line and exit 2 (used by every script)."""

    def error(self, message):  # one line, exit 2 (argparse's default prints the whole usage)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def make_parser(script, doc, *, epochs, batch_size, lr, patience, ema=0.0, gif_every=1, val_every=1,
                num_samples=1000):
    """The flags every script shares; defaults are the script's own. script: its __file__."""
    parser = Parser(prog=Path(script).name, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=positive_int, default=None,
                       help=f"maximum number of epochs (default {epochs}; 2 with --quick)")
    train.add_argument("--batch-size", type=positive_int, default=batch_size,
                       help="minibatch size (default %(default)s)")
    train.add_argument("--lr", type=positive_float, default=lr, help="learning rate (default %(default)s)")
    train.add_argument("--patience", type=positive_int, default=patience,
                       help="early stopping: epochs without a better validation objective (default %(default)s)")
    train.add_argument("--val-every", type=positive_int, default=val_every,
                       help="compute the validation objective every K epochs and at the last; the best "
                            "weights are those of a validated epoch (default %(default)s)")
    train.add_argument("--ema", type=unit_interval, default=ema,
                       help="decay of an exponential moving average of the weights used for "
                            "evaluation and sampling; 0 turns it off (default %(default)s)")
    train.add_argument("--seed", type=seed_int, default=0, help="random seed (default %(default)s)")
    train.add_argument("--resume", action="store_true",
                       help="continue training from OUT/NAME_resume.pt (model, optimizer, EMA, epoch, "
                            "RNG states); the flags of training must be the same")
    run_group = parser.add_argument_group("machine and outputs")
    run_group.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"),
                           help="auto picks cuda, then mps, then cpu (default %(default)s)")
    run_group.add_argument("--threads", type=threads_flag, default=None, metavar="N|auto",
                           help=f"CPU threads for torch (default auto: the cores idle at the start, measured "
                                f"over 0.2 s, at most {MAX_AUTO_THREADS}; results repeat exactly for the same "
                                f"seed and thread count)")
    run_group.add_argument("--out", type=Path, default=Path("results"),
                           help="folder for every output (default %(default)s)")
    run_group.add_argument("--num-samples", type=positive_int, default=None,
                           help=f"samples written to NAME_samples.npy (default {num_samples}; 64 with --quick)")
    run_group.add_argument("--gif-every", type=positive_int, default=gif_every,
                           help="add a frame to the training GIF every K epochs (default %(default)s)")
    run_group.add_argument("--checkpoint-seconds", type=nonnegative_float, default=CHECKPOINT_SECONDS,
                           help="rewrite the resume checkpoint OUT/NAME_resume.pt at most this often while "
                                "training (0: after every epoch); it is always written when training ends "
                                "(default %(default)s)")
    run_group.add_argument("--digits", type=digit_list, default=None, metavar="D,D,...",
                           help="with --conditional: the classes to draw, e.g. 3,7 (default all ten); "
                                "--num-samples are shared equally among them")
    run_group.add_argument("--sample-only", action="store_true",
                           help="no training: load the weights OUT/NAME.pt (or --weights) and write samples, "
                                "their picture and their quality into OUT")
    run_group.add_argument("--weights", type=Path, default=None, metavar="FILE",
                           help="with --sample-only: the weights to sample (default OUT/NAME.pt), e.g. "
                                "--weights results/DDPM.pt --out my_samples samples the shipped weights and "
                                "leaves results/ as it is")
    run_group.add_argument("--evaluate", action="store_true",
                           help="with --sample-only: also the test NLL, the generative classifier, the other "
                                "samplers and the family's own metrics and pictures, as after training")
    run_group.add_argument("--quick", action="store_true",
                           help="a tiny run for smoke tests: 2 epochs, small data subsets, 64 samples")
    run_group.add_argument("--no-progress", action="store_true",
                           help="no progress on stderr (by default a bar on a terminal, a line every 10 s in a log)")
    parser.set_defaults(_full_epochs=epochs, _full_samples=num_samples)
    return parser


def parse_args(parser, argv=None):
    args = parser.parse_args(argv)
    asked_samples = args.num_samples is not None  # not a default
    if args.epochs is None:
        args.epochs = 2 if args.quick else args._full_epochs
    if args.num_samples is None:
        args.num_samples = 64 if args.quick else args._full_samples
    if args.quick:
        args.gif_every = 1  # several frames even in a 2-epoch run
    if args.resume and args.sample_only:
        parser.error("--resume and --sample-only exclude each other")
    for flag, value in (("--weights", args.weights is not None), ("--evaluate", args.evaluate)):
        if value and not args.sample_only:
            parser.error(f"{flag} goes with --sample-only (a training run evaluates its own weights)")
    if args.digits is not None and not args.conditional:
        parser.error("--digits picks the classes of a conditional model; add --conditional")
    classes = len(args.digits or range(NUM_CLASSES))
    if args.conditional and args.num_samples < classes:
        parser.error(f"--num-samples {args.num_samples} is fewer than the {classes} classes to draw")
    # equal shares per class, the rest not drawn: said when the count or the classes were asked for
    if args.conditional and (asked_samples or args.digits) and args.num_samples % classes:
        print(f"{parser.prog}: note: --num-samples {args.num_samples} shared by {classes} classes draws "
              f"{args.num_samples // classes} of each, {args.num_samples // classes * classes} in all", file=sys.stderr)
    if args.num_samples > MAX_SAMPLES:  # refused up front: the quality measures compare every pair
        parser.error(f"--num-samples {args.num_samples} is too many "
                     f"(at most {MAX_SAMPLES}: the sample-quality measures compare every pair of samples)")
    defaults = vars(parser.parse_args([]))
    defaults.update(epochs=args._full_epochs, num_samples=args._full_samples)
    del args._full_epochs, args._full_samples
    args.prog = parser.prog
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in the metrics
    # what makes this run other than the script's default run: the leaderboard judges a run by
    # its settings, not its argv (a resumed default run is a default run)
    args.changed_settings = {key: value for key, value in vars(args).items()
                             if key in defaults and not key.startswith("_") and key not in RESULT_NEUTRAL
                             and value != defaults[key]}
    return args


MAX_SAMPLES = 10_000  # --num-samples at most: the sample-quality measures hold an N x N distance matrix


RESULT_NEUTRAL = ("out", "threads", "no_progress", "checkpoint_seconds", "resume", "device",  # not settings
                  "weights", "evaluate")


# 2 torch threads trained eight of nine families 1.1-1.6x faster than 1 on an idle 2-core machine
# (docs/speed.md, `python benchmark.py`: a training step on 1 and on 2 threads); beside a busy core, two
# spinning threads stall each other, so the default takes only the cores that are idle
MAX_AUTO_THREADS = 2




# the resume checkpoint is rewritten at most this often while training, and when training ends:
# written after every epoch it took DDPM's ~450 short epochs 27 ms each on the idle machine (a
# 20 MB file), about 12 s beside its ~50 s of training
CHECKPOINT_SECONDS = 30.0


def _cpu_times():
    """(idle, total) jiffies of all cores from /proc/stat's first line (Linux)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return values[3] + values[4], sum(values)  # idle + iowait; user .. steal


def idle_cores(interval=0.2):
    """How many cores other processes leave idle, measured over `interval` seconds; None where
    /proc/stat is unreadable (not Linux)."""
    try:
        idle0, total0 = _cpu_times()
        time.sleep(interval)
        idle1, total1 = _cpu_times()
    except (OSError, ValueError, IndexError):
        return None
    return (os.cpu_count() or 1) * (idle1 - idle0) / max(total1 - total0, 1)


def auto_threads(max_threads=MAX_AUTO_THREADS):
    """Torch threads for this run: the idle cores (rounded), at least 1 and at most max_threads
    and the cores this process may use. Beside one CPU-bound job on 2 cores this gives 1: two
    spinning threads on shared cores trained the ARM 3.0x slower than on the idle machine, one
    thread 1.4x (docs/speed.md)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    idle = idle_cores()
    free = usable if idle is None else int(idle + 0.5)
    return max(1, min(max_threads, usable, free))


def choose_device(name):
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": has_mps}
    if name not in available:
        raise UsageError(f"unknown device {name!r}; choose one of auto, cpu, cuda, mps")
    if not available[name]:
        have = ", ".join(k for k, ok in available.items() if ok)
        raise UsageError(f"--device {name} was asked for but is not available here (available: {have})")
    return torch.device(name)


def peak_memory_mb():
    """Peak resident memory of this process so far, in MiB (Linux reports KiB, macOS bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


class _Throttled:
    """checkpoint() at most every `seconds` while training (maybe), and once more at the end if
    an epoch came after the last call (finish)."""

    def __init__(self, checkpoint, seconds, epoch):
        self.checkpoint, self.seconds = checkpoint, seconds
        self.epoch, self.at = epoch, time.perf_counter()

    def maybe(self, epoch):
        if time.perf_counter() - self.at >= self.seconds:
            self.checkpoint()
            self.epoch, self.at = epoch, time.perf_counter()

    def finish(self, epoch):
        if epoch > self.epoch:
            self.checkpoint()


class RunHooks(Hooks):
    """The loop's hooks in a run: signals stop training between steps and never mid-record; the
    resume checkpoint is rewritten at most every checkpoint_seconds and when training ends, so a
    killed run loses at most that much; a progress bar; the val Frechet distance's classifier
    cached in OUT."""

    def __init__(self, name, state, checkpoint, checkpoint_seconds, out, progress, epochs):
        self.saver = _Throttled(checkpoint, checkpoint_seconds, state.epoch)
        self.bar = Progress(name, epochs, enabled=progress, initial=state.epoch)
        self.sample_distance = lambda samples, reference: frechet_to(samples, reference, out)

    @contextlib.contextmanager
    def interruptible(self):
        try:
            yield
        finally:
            SIGNALS.hold()  # from here on the run writes its outputs: a signal waits for them

    def recording(self):
        return SIGNALS.held()

    def after_epoch(self, state, means, val):
        self.saver.maybe(state.epoch)
        self.bar.update(train=f"{means['train']:.3f}", val="-" if val is None else f"{val:.3f}",  # - : not validated
                        best=f"{state.best_val:.3f}@{state.best_epoch}")

    def after_training(self, state):
        self.bar.close()
        self.saver.finish(state.epoch)


# a sampler setting of magnitude outside this range means nothing in float32 arithmetic (a temperature of
# 1e-45 divides logits into inf, and torch.multinomial fails on the NaN probabilities): refused where parsed
FLOAT_SETTING_RANGE = (1e-30, 1e30)


def unusable_float(settings):
    """The one-line reason a float field of the dataclass `settings` is unusable (nonzero and of
    magnitude outside FLOAT_SETTING_RANGE), or None."""
    low, high = FLOAT_SETTING_RANGE
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        if isinstance(value, float) and value != 0 and not low <= abs(value) <= high:
            return (f"argument --{field.name.replace('_', '-')}: {value:g} is outside what float32 sampling can "
                    f"use (0, or a magnitude from {low:g} to {high:g})")
    return None


def main(model_class, doc, argv=None, *, settle=None, extra_flags=None, **training):
    """A family script's main(): its flags (the shared ones with the script's training defaults
    `training`, one per field of model_class.Config and .Sampling, and extra_flags(parser)'s),
    then the run. settle(args, config, sampling) -> (config, sampling): what flags alone can't
    decide or check; a UsageError from it is a usage error (exit 2)."""
    script = sys.modules[model_class.__module__].__file__
    parser = make_parser(script, doc, **training)
    add_options(parser, model_class.name, model_class.Config)
    if extra_flags:
        extra_flags(parser)
    if dataclasses.fields(model_class.Sampling):
        add_options(parser, f"{model_class.name} evaluation and sampling (free to change with --sample-only)",
                    model_class.Sampling)
    args = parse_args(parser, argv)
    config, sampling = options_from(args, model_class.Config), options_from(args, model_class.Sampling)
    unusable = unusable_float(sampling)
    if unusable:
        parser.error(unusable)
    if settle:
        try:
            config, sampling = settle(args, config, sampling)
        except UsageError as error:
            parser.error(str(error))
    run(args, model_class, config, sampling)


def run(args, model_class, config, sampling=None):
    """Train (or with --sample-only load) model_class(config, sampling) and write every output;
    exits 2 on bad input, 1 on a non-finite loss, 130 when interrupted, returns normally otherwise."""
    with SIGNALS.installed(stop_on_second=True):  # the first signal stops training, or any other phase, at once
        try:
            code = _run(args, model_class, config, sampling)
        except UsageError as error:
            report(f"{args.prog}: error: {error}")
            code = EXIT_USAGE
        except OSError as error:  # a failed write: the files written before it, and the old ones, are whole
            report(f"{args.prog}: error: could not write {error.filename or args.out} "
                   f"({error.strerror or first_line(error)}); files already written are whole")
            code = EXIT_USAGE
        except NonFiniteSamples as error:
            report(f"{args.prog}: error: {error}; no output written, the files already in {args.out} are untouched")
            code = EXIT_NONFINITE
        except (KeyboardInterrupt, StopNow):
            report(f"{args.prog}: interrupted; files already written are whole")
            code = EXIT_INTERRUPTED
    if code:
        raise SystemExit(code)


def _run(args, model_class, config, sampling):
    out = Path(args.out)
    device = choose_device(args.device)  # before --out is made: a refused device leaves nothing behind
    check_model_size(model_class, config, sampling, "the flags")
    check_out(out)
    with family_lock(out, stem(model_class.name, config.conditional)):  # a second run into OUT is refused
        return _run_locked(args, model_class, config, sampling, out, device)


def _run_locked(args, model_class, config, sampling, out, device):
    started = time.perf_counter()  # the run's wall time, beside what its averaged measures add (issue #40)
    remove_stale(out)
    torch.set_num_threads(args.threads or auto_threads())
    set_seed(args.seed)
    model = model_class(config, sampling).to(device)
    name, config = model.name, dataclasses.asdict(model.config)
    paths = output_paths(out, stem(name, model.conditional), model.conditional)
    make_command = (f"python {args.prog} --out {out}" + (" --quick" if args.quick else "")
                    + (" --conditional" if model.conditional else ""))

    splits, labels = load_splits(device, args.quick), load_label_splits(device, args.quick)
    optimizer = model.configure_optimizer(args.lr)
    ema = EMA(model, args.ema) if args.ema > 0 else None
    state = TrainState(best_weights=cpu_state(model))
    train_flags = dict(batch_size=args.batch_size, lr=args.lr, ema=args.ema, val_every=args.val_every,
                       seed=args.seed, quick=args.quick)

    weights_path = args.weights or paths["weights"]
    if args.sample_only:
        shipped = ROOT / "results" / paths["weights"].name
        hint = (f"sample the shipped ones into {out} with --weights {_shown(shipped)}, or make them with: {make_command}"
                if args.weights is None and shipped.is_file() and shipped.resolve() != paths["weights"].resolve()
                else f"make it with: {make_command}")
        checkpoint = load_checkpoint(weights_path, name, config, "weights", hint)
        state = train_state_from(dict(checkpoint, best_weights=checkpoint["weights"]), weights_path)
    elif args.resume:
        saved = load_checkpoint(paths["resume"], name, config, "resume",
                                f"--resume continues a run made on this machine (the repository ships "
                                f"weights only); start one with: {make_command}")
        differ = {k: (v, train_flags[k]) for k, v in saved.get("train_flags", {}).items() if train_flags.get(k) != v}
        if differ:
            raise UsageError(f"{paths['resume']} was trained with other flags; resume with the same ones ("
                             + ", ".join(f"--{k.replace('_', '-')} {old} (checkpoint) vs {new} (now)"
                                         for k, (old, new) in differ.items()) + ")")
        try:
            state = train_state_from(saved["state"], paths["resume"])
            load_weights_into(model, saved["model"], paths["resume"])
            optimizer.load_state_dict(saved["optimizer"])
            if ema and saved["ema"] is not None:
                ema.shadow = {k: v.to(device) for k, v in saved["ema"].items()}
            set_rng_state(state.rng)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise UsageError(f"{paths['resume']} has a damaged or older layout ({type(error).__name__}: "
                             f"{first_line(error, '')})") from None

    reason = "sample_only"
    if not args.sample_only:
        data = {split: (splits[split], labels[split]) for split in ("train", "val")}
        hooks = RunHooks(name, state, lambda: save_resume(paths["resume"], name, config, train_flags, state,
                                                          model, optimizer, ema),
                         args.checkpoint_seconds, out, shows_progress(args), args.epochs)
        reason = train(model, data, optimizer, ema, state, epochs=args.epochs, batch_size=args.batch_size,
                       patience=args.patience, gif_every=args.gif_every, seed=args.seed,
                       val_every=args.val_every, hooks=hooks)
        if not state.history["train"]:
            if reason == "interrupted":  # (a non-finite first epoch has said so already)
                print(f"{name}: no epoch completed; nothing to write", file=sys.stderr)
            return EXIT_INTERRUPTED if reason == "interrupted" else EXIT_NONFINITE
        if not state.best_epoch:  # stopped before the first validated epoch (--val-every): no best weights yet
            print(f"{name}: stopped before the first validated epoch (every {args.val_every}); no weights to write"
                  + (f"; --resume continues from {paths['resume']}" if reason == "interrupted" else ""),
                  file=sys.stderr)
            return EXIT_INTERRUPTED if reason == "interrupted" else EXIT_NONFINITE

    def write_training():  # called once the samples are known to be finite, before any other output
        if args.sample_only:
            return
        save_weights(paths["weights"], name, config, state, stopped=reason)
        save_curve(paths["curve"], state.history, state.best_epoch, name, model.objective, model.val_objective)
        if state.frames:
            save_gif(paths["gif"], [labelled(image_grid(s), f"{name}  epoch {e}")
                                    for s, e in zip(state.frames, state.frame_epochs)])
        else:  # no frame drawn in this run: the previous run's GIF must not stand beside its weights
            paths["gif"].unlink(missing_ok=True)

    load_weights_into(model, state.best_weights, weights_path)
    model.eval()
    SIGNALS.hold()
    metrics, written = _final_outputs(model, splits, labels, args, device, paths, state, reason, write_training,
                                      started=started)
    emit(json.dumps(finite_or_none({k: metrics[k] for k in (
        "model", "test_nll_nats", "test_bpd", "nll_kind", "epochs_run", "best_epoch",
        "train_seconds", "sample_seconds")})))
    report(summary(metrics, written, weights_path))
    if metrics["interrupted"]:  # exit status and metrics agree; a signal after this point changes neither
        return EXIT_INTERRUPTED
    return EXIT_NONFINITE if reason == "non_finite" else 0


@contextlib.contextmanager
def evaluating():
    """The evaluation and sampling with the run's settings: a failure of the maths there (an
    extreme sampler setting: a temperature near 0 gives torch.multinomial NaN probabilities; a
    count too large for memory) is one line, exit 2, and nothing is written."""
    try:
        yield
    except (RuntimeError, ValueError, ZeroDivisionError, OverflowError, IndexError, MemoryError) as error:
        raise UsageError(f"evaluation or sampling failed with these settings ({type(error).__name__}: "
                         f"{first_line(error, '')}); nothing written: try other sampling settings") from None


def _final_outputs(model, splits, labels, args, device, paths, state, reason, write_training=lambda: None, *,
                   started):
    """Evaluate the best state on the test split and write samples, images and metrics; the
    samples are checked before anything is written (write_training first: weights, curve, GIF).
    --sample-only evaluates only the samples unless --evaluate. Returns (metrics, paths written)."""
    out, name, show = Path(args.out), paths["weights"].stem, shows_progress(args)
    evaluate = args.evaluate or not args.sample_only
    with evaluating():  # nothing is written before its end
        conditional = model.conditional
        given = [labels["test"]] if conditional else []  # a conditional model's NLL is -log p(x | y)
        test_nll, nll_seconds, extra, images = None, dict(wall=None, cpu=None), {}, {}
        if model.nll_kind and evaluate:
            with announced(f"{name}: test NLL of {len(splits['test'])} images", show), timed(device) as nll_seconds, \
                    seeded(args.seed + 3, device), torch.no_grad():
                test_nll = float(batched(model.test_nll, splits["test"], *given).mean())
        if evaluate:
            with announced(f"{name}: other metrics", show), seeded(args.seed + 5, device):
                extra = model.extra_metrics(splits, labels)
                images = model.extra_images(splits)
        if conditional and evaluate:
            with announced(f"{name}: generative classifier on {len(splits['test'])} images", show), \
                    timed(device) as classify_seconds, seeded(args.seed + 6, device), torch.no_grad():
                predicted = generative_classifier(model, splits["test"], labels["train"])
            extra.update(generative_classifier_accuracy=None if predicted is None else
                         float((predicted == labels["test"]).double().mean()),
                         generative_classifier_seconds=None if predicted is None else
                         round(classify_seconds["wall"], 2))

        # a conditional model draws num_samples // k of each of the k classes asked for, class by class
        digits = torch.tensor(args.digits or range(NUM_CLASSES), device=device)
        drawn = digits.repeat_interleave(args.num_samples // len(digits)) if conditional else None
        with announced(f"{name}: {args.num_samples} samples", show), timed(device) as sample_seconds:
            samples = draw_samples(model, args.num_samples if drawn is None else len(drawn), args.seed + 4, device,
                                   labels=drawn).cpu()
        check_samples(samples, "the sampler")
        # more draws with their own seeds, for the quality measures only (a mean and its spread), not
        # written; skipped after an interrupt, to be quick
        seeds = [] if reason == "interrupted" else draw_seeds(args.seed + 4)[1:]
        with announced(f"{name}: {len(seeds)} more draws of {len(samples)} samples for their quality",
                       show and bool(seeds)), timed(device) as draws_seconds:
            draws = [samples] + [draw_samples(model, len(samples), seed, device, labels=drawn).cpu() for seed in seeds]
        for k, more in enumerate(draws[1:], 1):
            check_samples(more, f"the sampler (quality draw {k + 1})")
    write_training()
    written = [] if args.sample_only else ([paths["weights"], paths["resume"], paths["curve"]]
                                           + [paths["gif"]] * bool(state.frames))
    save_image(out / "_Digit_real_image.png", image_grid(splits["test"][:64]))
    if conditional:  # rows of each class asked for, labelled with it; at least a 10 x 10 grid in all
        per_class = len(drawn) // len(digits)
        shown = min(per_class, 10 * max(1, 10 // len(digits)))  # 100 of one class, 50 of each of two, ...
        rows = _padded_rows(samples.view(len(digits), per_class, NUM_PIXELS)[:, :shown], min(shown, 10))
        row_labels = [str(d) for d in digits.tolist() for _ in range(rows.shape[1])]
        grid = image_grid(rows.reshape(-1, NUM_PIXELS), nrow=rows.shape[2])
        save_image(paths["grid"], with_row_labels(grid, row_labels))
        written_samples = samples.numpy().astype(np.float32), drawn.cpu().numpy().astype(np.int64)
        save_arrays(paths["npy"], dict(zip("xy", written_samples)))
    else:
        save_image(paths["grid"], image_grid(samples[:64]))
        written_samples = (samples.numpy().astype(np.float32),)
        save_arrays(paths["npy"], written_samples[0])
    written += [paths["npy"], paths["grid"], out / "_Digit_real_image.png"]
    for suffix, (pixels, nrow) in images.items():
        save_image(out / f"{name}_{suffix}.png", image_grid(pixels, nrow=nrow))
        written.append(out / f"{name}_{suffix}.png")
    metrics = dict(
        model=model.name, conditional=conditional, digits=None if drawn is None else digits.tolist(),
        evaluated=evaluate, test_nll_nats=test_nll,
        test_bpd=nats_to_bpd(test_nll) if test_nll is not None else None,
        nll_kind=model.nll_kind if evaluate else None, epochs_run=state.epoch, best_epoch=state.best_epoch,
        best_val_objective=state.best_val if math.isfinite(state.best_val) else None,
        objective=model.objective, val_objective=model.val_objective or model.objective,
        stopped=reason, interrupted=reason == "interrupted" or bool(SIGNALS.received),
        train_seconds=round(state.train_seconds, 2), sample_seconds=round(sample_seconds["wall"], 3),
        train_seconds_to_best=round(sum(state.epoch_seconds[:state.best_epoch]), 2),
        peak_memory_mb=round(peak_memory_mb(), 1),
        # CPU seconds of this process: on a shared machine, wall time overstates the cost
        train_cpu_seconds=round(state.train_cpu_seconds, 2), sample_cpu_seconds=round(sample_seconds["cpu"], 3),
        test_nll_seconds=nll_seconds["wall"] and round(nll_seconds["wall"], 2),
        test_nll_cpu_seconds=nll_seconds["cpu"] and round(nll_seconds["cpu"], 2),
        num_samples=len(samples), device=str(device), threads=torch.get_num_threads(),
        seed=args.seed, num_params=sum(p.numel() for p in model.parameters()),
        torch_version=str(torch.__version__), quick=args.quick, config=dataclasses.asdict(model.config),
        sampling=dataclasses.asdict(model.sampling), argv=args.argv,
        changed_settings=getattr(args, "changed_settings", None),
        weights_sha256=weights_checksum(state.best_weights),
        # the samples' checksum: a reader refuses samples and metrics of two runs (a write stopped half-way)
        samples_sha256=arrays_checksum(*written_samples),
        **fingerprints(sys.modules[type(model).__module__].__file__, ROOT),
        train_flags=dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         patience=args.patience, ema=args.ema, val_every=args.val_every),
        **extra)
    with timed(device) as quality_seconds:
        arrays = [x.numpy() for x in draws]
        metrics.update(averaged_conditional_quality(arrays, drawn.cpu().numpy(), out) if conditional
                       else averaged_quality(arrays, out))
    # what the averaged measures add to a run: the extra draws, and scoring every draw (wall and CPU seconds)
    metrics.update(quality_draws_seconds=round(draws_seconds["wall"], 3),
                   quality_draws_cpu_seconds=round(draws_seconds["cpu"], 3),
                   quality_seconds=round(quality_seconds["wall"], 3),
                   quality_cpu_seconds=round(quality_seconds["cpu"], 3),
                   # the whole run from its start (after the imports) to here: what those seconds are a share of
                   run_seconds=round(time.perf_counter() - started, 2))
    metrics["interrupted"] = metrics["interrupted"] or bool(SIGNALS.received)
    save_json(paths["metrics"], metrics)
    return metrics, written + [paths["metrics"]]


def _padded_rows(classes, width):
    """(K, S, 64) samples of K classes -> (K, R, width, 64): each class's S samples in rows of `width`,
    the last row filled out with blank (zero) cells."""
    k, count, pixels = classes.shape
    rows = math.ceil(count / width)
    padded = classes.new_zeros(k, rows * width, pixels)
    padded[:, :count] = classes
    return padded.view(k, rows, width, pixels)


def shows_progress(args):
    """Progress bars (on a terminal) or lines (in a log) go to stderr, unless --no-progress."""
    return not args.no_progress


def _shown(path):
    """A path as a person would type it here: relative to the current folder when inside it."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def summary(metrics, written, weights):
    """The few lines a person reads at the end of a run: headline numbers and the files it wrote
    (weights: the file trained, or read by --sample-only)."""
    m, nll = metrics, metrics["test_nll_nats"]
    likelihood = (f"test NLL {nll:.2f} nats/image ({m['test_bpd']:.3f} bits/dim, {m['nll_kind'].replace('_', ' ')})"
                  if nll is not None else "no likelihood" if m["evaluated"] else "test NLL not computed (--evaluate)")
    frechet = "n/a" if m["frechet_distance"] is None else f"{m['frechet_distance']:.2f}"
    quality = f"Frechet distance {frechet}"
    if m["conditional"]:
        classifier = m.get("generative_classifier_accuracy")
        per_class = m["frechet_mean_over_classes"]
        some = m["digits"] is not None and len(m["digits"]) < NUM_CLASSES
        quality = (f"p(x | y): class accuracy {m['class_accuracy']:.3f}, Frechet distance to the test digits of "
                   + ("the same class" if not some or len(m["digits"]) > 1 else f"class {m['digits'][0]}")
                   + (", mean over classes " if not some or len(m["digits"]) > 1 else ": ")
                   + ("n/a" if per_class is None else f"{per_class:.2f}")
                   + ("" if classifier is None else f", generative classifier accuracy {classifier:.3f}")
                   + f"; {quality}" + (" to the test digits of all ten classes (which samples of only "
                                       f"{', '.join(map(str, m['digits']))} can't match)" if some else ""))
    state = "interrupted, " if m["interrupted"] else ""
    if m["stopped"] == "sample_only":
        made = (f"sampled {m['num_samples']} in {m['sample_seconds']:.2f} s on {m['threads']} thread(s) "
                f"from {_shown(weights)} ({m['epochs_run']} epochs of training)")
    else:
        made = (f"{state}{m['epochs_run']} epochs (best {m['best_epoch']}), trained {m['train_seconds']:.0f} s on "
                f"{m['threads']} thread(s), {m['num_samples']} samples in {m['sample_seconds']:.2f} s")
    folders = {}
    for path in written:
        folders.setdefault(str(Path(_shown(path)).parent), []).append(Path(path).name)
    return "\n".join([f"{m['model']}: {likelihood}; {quality}, copy rate {m['copy_rate']:.3f}, "
                      f"coverage {m['class_coverage']:.3f}; {made}"]
                     + [f"  wrote into {folder}/: {', '.join(names)}" for folder, names in folders.items()])
