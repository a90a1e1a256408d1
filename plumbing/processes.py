"""Signals and child processes, one mechanism for a model run and for the tools.

A SIGINT or SIGTERM raises KeyboardInterrupt while work can stop anywhere (training, a
tool's loop); inside ``SIGNALS.held()`` (an epoch being recorded, outputs being written) it is
only recorded and takes effect at the block's end, so that every file is completed; a second
signal there stops at once (StopNow). A tool's child runs in a process group of its own: the
signal is forwarded to it (or it is killed, for helpers such as benchmark's busy loop) and the
tool waits for it to finish its outputs, then exits 130 with one line.
"""

import contextlib
import os
import signal
import subprocess
import sys
import threading

from plumbing import EXIT_INTERRUPTED, EXIT_USAGE, UsageError


class StopNow(BaseException):
    """A second signal to a model run: leave at once, writing nothing more (no `except Exception`
    stops it); every file on disk is whole."""


class Signals:
    """The process's one signal handler. The first SIGINT/SIGTERM raises KeyboardInterrupt, unless
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
        """The handler on SIGINT and SIGTERM for the block (in the main thread), then the previous ones."""
        self.reset(stop_on_second)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
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


def spawn(command, how="forward", **kwargs):
    """Popen in a process group of its own, registered so that a signal to the tool reaches it
    (forwarded, or SIGKILL for helpers such as benchmark's busy loop)."""
    child = subprocess.Popen(command, start_new_session=True, **kwargs)  # (no preexec_fn: torch has threads)
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


def tool(prog, body, interrupted="no table was written; the files in --out are whole"):
    """Run body() with the tools' signal handling: exit 130 with one line when interrupted, 2 with
    one line for a UsageError or a failed write."""
    with SIGNALS.installed(stop_on_second=False):
        try:
            body()
        except KeyboardInterrupt:
            for child, _ in list(SIGNALS.children):  # one the signal caught between its start and its wait
                with contextlib.suppress(Exception):
                    child.wait(timeout=600)
            print(f"{prog}: interrupted; {interrupted}", file=sys.stderr)
            raise SystemExit(EXIT_INTERRUPTED) from None
        except UsageError as error:
            print(f"{prog}: error: {error}", file=sys.stderr)
            raise SystemExit(EXIT_USAGE) from None
        except OSError as error:
            print(f"{prog}: error: could not write {error.filename or ''} ({error.strerror or error}); "
                  f"files already written are whole", file=sys.stderr)
            raise SystemExit(EXIT_USAGE) from None
