"""Error types. Every user-facing error is one line that names the file, row or key and says what to do.

The CLI prints `error: <message>` for any `RlhfError` and exits with the error's `exit_code`, without a
traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import signal


class RlhfError(Exception):
    """Base class for errors caused by user input (config, data, model dirs, launch environment)."""

    exit_code = 2


class ConfigError(RlhfError):
    """Invalid pipeline config: unknown key, wrong type, out-of-range value, missing section."""


class DataError(RlhfError):
    """Unreadable or invalid data. The message starts with `file:line:` (or `file:`) when known."""


class ModelError(RlhfError):
    """A model dir or hub id that cannot be used for the requested role."""


class ArtifactError(RlhfError):
    """A stage input (output of an earlier stage) that is missing, incomplete or of the wrong kind."""


class ClaimError(RlhfError):
    """The directory is in use by another live run (its claim file names the holder)."""


class TrainingError(RlhfError):
    """Training stopped on purpose: non-finite loss or reward, exploding KL, failed save."""

    exit_code = 3


class StopRequested(RlhfError):
    """The run was asked to stop (SIGTERM, or SIGUSR1 as an early warning) and saved a checkpoint; re-running
    the command resumes it. The exit status is 128 + the signal's number, what a shell reports for a process
    that signal ended (143 for SIGTERM, 138 for SIGUSR1 on Linux): not 0, so `rlhf pipeline && rlhf eval`
    stops there, yet not an error of the run (no `error:` prefix, the other ranks are not told it failed)."""

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.signum = int(signum)
        self.exit_code = 128 + self.signum
