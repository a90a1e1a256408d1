"""Signals and child processes, one mechanism for a model run and for the tools.

A SIGINT, SIGTERM or SIGHUP (a closed terminal) raises KeyboardInterrupt while work can stop
anywhere (training, a tool's loop); inside ``SIGNALS.held()`` (an epoch being recorded, outputs being written) it is
only recorded and takes effect at the block's end, so that every file is completed; a second
signal there stops at once (StopNow). A tool's child runs in a process group of its own: the
signal is forwarded to it (or it is killed, for helpers such as benchmark's busy loop) and the
tool waits for it to finish its outputs, then exits 130 with one line. A child dies with its
parent, even a SIGKILLed one (Linux: PR_SET_PDEATHSIG). A tool holds a lock in its --out while
it runs (claim_out), as a model run holds its family's.
"""

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from plumbing import EXIT_INTERRUPTED, EXIT_USAGE, UsageError, first_line
from plumbing.files import check_out, family_lock

# the signals that stop a run or a tool: Ctrl-C, kill, and a terminal that closed
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class StopNow(BaseException):
    """A second signal to a model run: leave at once, writing nothing more (no `except Exception`
    stops it); every file on disk is whole."""


class Signals:
    """The process's one signal handler. The first SIGINT/SIGTERM/SIGHUP raises KeyboardInterrupt, unless
    it comes inside held(), which records it and raises at the block's end; each is forwarded to
    the spawned children. A later one: StopNow for a model run (stop_on_second), for a tool only
    forwarded (the tool is waiting for its children to finish their outputs)."""

    def __init__(self):
        self.children = []  # (Popen, how: "forward" the signal, or "kill")
        self.previous = {}
        self.reset(stop_on_second=True)

    def reset(self, stop_on_second):
        self.received = None  # the first signal's number, once one came
        self.holding = False
        self.stop_on_second = stop_on_second

    def _handle(self, signum, frame):
        first = self.received is None
        self.received = self.received or signum
        for child, how in list(self.children):
            if child.returncode is None:  # not reaped yet (no poll here: the main thread may be in wait)
                with contextlib.suppress(OSError):
                    os.killpg(child.pid, signum if how == "forward" else signal.SIGKILL)
        if not first and self.stop_on_second:
            raise StopNow
        if first and not self.holding:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self, stop_on_second):
        """The handler on STOP_SIGNALS for the block (in the main thread), then the previous ones."""
        self.reset(stop_on_second)
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        try:
            yield
        finally:
            for sig, handler in self.previous.items():
                signal.signal(sig, handler)
            self.previous.clear()

    def hold(self):
        """From now on a first signal is only recorded (a run writing its outputs)."""
        self.holding = True

    @contextlib.contextmanager
    def held(self):
        """Signals that arrive inside the block (an epoch recorded, tables written) take effect at
        its end, as a KeyboardInterrupt."""
        holding, self.holding = self.holding, True
        try:
            yield
        finally:
            self.holding = holding
        if self.received is not None:
            raise KeyboardInterrupt


SIGNALS = Signals()


def _parent_death_signal():
    """prctl(PR_SET_PDEATHSIG, ...) from the C library (Linux), or None: a child that calls it is
    sent the signal when its parent dies, however it dies (no handler runs on SIGKILL)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL, PR_SET_PDEATHSIG = _parent_death_signal(), 1


def _die_with(parent):
    """The child's preexec_fn: SIGKILL when `parent` dies (and at once if it died already).
    Only a call into libc, resolved before the fork: safe beside the parent's threads."""
    def setup():
        _PRCTL(PR_SET_PDEATHSIG, int(signal.SIGKILL))
        if os.getppid() != parent:  # the parent died before the call
            os._exit(EXIT_INTERRUPTED)
    return setup


def spawn(command, how="forward", **kwargs):
    """Popen in a process group of its own, registered so that a signal to the tool reaches it
    (forwarded, or SIGKILL for helpers such as benchmark's busy loop); it dies with the tool."""
    preexec = _die_with(os.getpid()) if _PRCTL is not None else None
    child = subprocess.Popen(command, start_new_session=True, preexec_fn=preexec, **kwargs)
    SIGNALS.children.append((child, how))
    if SIGNALS.received is not None:  # a signal came while it started
        os.killpg(child.pid, SIGNALS.received if how == "forward" else signal.SIGKILL)
    return child


def finish(child):
    """Wait for a spawned child however long it takes (a forwarded signal makes a model run
    finish its outputs, a second one stops it at once) and unregister it; its exit status."""
    pending = False
    try:
        while True:
            try:
                return child.wait()
            except KeyboardInterrupt:  # already forwarded by the handler: keep waiting, then re-raise
                pending = True
    finally:
        SIGNALS.children[:] = [(c, h) for c, h in SIGNALS.children if c is not child]
        if pending:
            raise KeyboardInterrupt


def run_child(command, **kwargs):
    """subprocess.run(command).returncode, with signals forwarded and the child waited for."""
    return finish(spawn(command, **kwargs))


def report(text):
    """A line on stderr that can't fail (a closed terminal: SIGHUP's usual cause)."""
    with contextlib.suppress(OSError, ValueError):
        print(text, file=sys.stderr, flush=True)


@contextlib.contextmanager
def announced(text, enabled):
    """A status line on stderr around a slow phase (when enabled): "ARM: test NLL ... 4.2 s" on a
    terminal; in a log, a line as it starts and one with its time as it ends."""
    tty = enabled and sys.stderr.isatty()
    if enabled:
        print(f"{text} ...", end="" if tty else "\n", file=sys.stderr, flush=True)
    start = time.perf_counter()
    yield
    if enabled:
        seconds = time.perf_counter() - start
        print(f" {seconds:.1f} s" if tty else f"{text}: {seconds:.1f} s", file=sys.stderr, flush=True)


class Progress:
    """Progress on stderr: a bar on a terminal; in a log (stderr a file or a pipe) a line at most every
    `every` seconds and at the last step, so a long run is never silent; nothing when not enabled."""

    def __init__(self, desc, total, enabled=True, initial=0, unit="epoch", every=10.0):
        from tqdm import tqdm

        self.desc, self.total, self.done, self.unit, self.every = desc, total, initial, unit, every
        self.lines = enabled and not sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=initial, disable=not enabled or self.lines, desc=desc, unit=unit)
        self.start = self.said = time.perf_counter()

    def update(self, **postfix):
        """One step done; postfix: the numbers to show beside it (e.g. train=1.234)."""
        self.done += 1
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)
        now = time.perf_counter()
        if self.lines and (now - self.said >= self.every or self.done >= self.total):
            self.said = now
            numbers = "".join(f", {key} {value}" for key, value in postfix.items())
            report(f"{self.desc}: {self.unit} {self.done}/{self.total}{numbers} ({now - self.start:.0f} s)")

    def close(self):
        self.bar.close()


def emit(text):
    """`text` on stdout. A reader that went away (`| head`) is no failure of the run: stdout then
    points at /dev/null, so that later lines and the exit's flush do not fail either."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


_CLAIMS = []  # the running tool()'s ExitStack: the locks claim_out took, released when it ends


def claim_out(out, prog):
    """Check that --out can be written (files.check_out), then hold the tool's lock in it
    (OUT/.TOOL.lock-digits, as a model run holds its family's) until tool() ends: a second run of
    the same tool into the same folder is refused in one line instead of mixing its files with
    this one's. Called by a tool's body once its --out is known."""
    check_out(out)
    if not _CLAIMS:
        raise RuntimeError("claim_out() is called from the body of processes.tool()")
    _CLAIMS[-1].enter_context(family_lock(out, Path(prog).stem))


def tool(prog, body, interrupted="no table was written; the files in --out are whole"):
    """Run body() with the tools' signal handling: exit 130 with one line when interrupted, 2 with
    one line for a UsageError or a failed write; the locks of claim_out released at the end."""
    with SIGNALS.installed(stop_on_second=False), contextlib.ExitStack() as claims:
        _CLAIMS.append(claims)
        try:
            body()
        except KeyboardInterrupt:
            for child, _ in list(SIGNALS.children):  # one the signal caught between its start and its wait
                with contextlib.suppress(Exception):
                    child.wait(timeout=600)
            report(f"{prog}: interrupted; {interrupted}")
            raise SystemExit(EXIT_INTERRUPTED) from None
        except UsageError as error:
            report(f"{prog}: error: {error}")
            raise SystemExit(EXIT_USAGE) from None
        except OSError as error:
            report(f"{prog}: error: could not write {error.filename or ''} "
                   f"({error.strerror or first_line(error)}); files already written are whole")
            raise SystemExit(EXIT_USAGE) from None
        finally:
            _CLAIMS.pop()
