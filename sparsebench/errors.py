"""The one exception type that reaches the user as a single clear line, and the one that
ends a run on a signal."""

import os
import signal
import sys
import threading


class SparsebenchError(Exception):
    """Bad input or an unrecoverable run condition, worded for the user.

    The CLI prints it as one line and exits non-zero; no traceback.
    """


class Interrupted(BaseException):
    """A signal (SIGTERM from kill, SLURM, a launcher) asked the run to stop. A BaseException,
    like KeyboardInterrupt, so that no `except Exception` swallows it and a sweep ends."""


def one_line(err: BaseException, limit: int | None = None) -> str:
    """An unexpected exception as one line: its type and the first line of its message."""
    first = (str(err).splitlines() or [""])[0]
    return f"{type(err).__name__}: {first[:limit]}"


def on_sigterm(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def redeliver_interrupts(unraisable) -> None:
    """sys.unraisablehook: a signal's exception raised inside a finalizer (`__del__`, e.g. the
    tokenizer's regex objects) is printed and dropped by Python, and the run would go on as if
    Ctrl-C or kill had never come. Send the signal again, from a thread a moment later, so that
    it lands after the finalizer (sent from here it would land in this hook, and be dropped)."""
    if isinstance(unraisable.exc_value, (KeyboardInterrupt, Interrupted)):
        ctrl_c = isinstance(unraisable.exc_value, KeyboardInterrupt)
        signum = signal.SIGINT if ctrl_c else signal.SIGTERM
        threading.Timer(0.01, os.kill, (os.getpid(), signum)).start()
    else:
        sys.__unraisablehook__(unraisable)


def catch_interrupts() -> None:
    """SIGTERM unwinds like Ctrl-C (Interrupted), and neither is lost in a finalizer."""
    signal.signal(signal.SIGTERM, on_sigterm)
    sys.unraisablehook = redeliver_interrupts
