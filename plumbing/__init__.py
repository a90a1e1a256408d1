"""The machinery behind the scripts, one folder below what a reader of a model needs.

common.py holds the data, the settings, the model contract, the shared maths and networks and the
training loop: what a family script uses. This package holds what turns a training loop into a
run a person can trust and tools can read, one module a concern:

    registry     the ten families once, the names of their files
    runs         the command line, a whole run from flags to files (each family's main())
    checkpoints  weights and resume files, loaded safely; the fingerprints that date a result
    quality      the sample-quality measures every family and baseline is scored by
    files        atomic writes, images, curves, README/docs tables, locks, stale temporaries
    processes    signals (one mechanism for runs and tools) and the tools' child processes
    results      the tools' reading of a run's files, and making a missing or stale run
    baselines    fitting a classical baseline's setting on the validation split
"""


class UsageError(Exception):
    """Bad input from the user: reported in one line, exit status 2."""


EXIT_USAGE, EXIT_NONFINITE, EXIT_INTERRUPTED = 2, 1, 130


def first_line(error, fallback=None):
    """The first line of an exception's message, for a one-line report; `fallback` (by default
    the exception's type name) when the message is empty."""
    text = str(error)
    return text.splitlines()[0] if text else (type(error).__name__ if fallback is None else fallback)
