"""The one exception type that reaches the user as a single clear line."""


class SparsebenchError(Exception):
    """Bad input or an unrecoverable run condition, worded for the user.

    The CLI prints it as one line and exits non-zero; no traceback.
    """


class Interrupted(BaseException):
    """A signal (SIGTERM from kill, SLURM, a launcher) asked the run to stop. A BaseException,
    like KeyboardInterrupt, so that no `except Exception` swallows it and a sweep ends."""
