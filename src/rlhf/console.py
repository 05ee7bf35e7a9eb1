"""Terminal output that outlives its reader: a training run goes on when its stdout or stderr pipe or terminal
goes away (the log `tee` of a signalled process group, a closed ssh session)."""

from __future__ import annotations

import errno
import os
import sys


class _PipeSafeStream:
    """A text stream (sys.stdout, sys.stderr) whose write and flush never raise because its reader is gone."""

    # EPIPE: a pipe whose reader exited (a killed `tee`, `| head`); EIO: a terminal that hung up.
    GONE = (errno.EPIPE, errno.EIO)

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as err:
            if err.errno not in self.GONE:
                raise
            self._discard()
            return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as err:
            if err.errno not in self.GONE:
                raise
            self._discard()

    def _discard(self) -> None:
        # Point the descriptor at /dev/null: later writes from Python, from C code and from child processes,
        # and the interpreter's flush at exit, then all succeed and go nowhere.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
            self._stream.flush()  # what the failed write left in the buffer
        except (OSError, ValueError):
            pass

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def survive_closed_output() -> None:
    """Make sys.stdout and sys.stderr drop what they cannot deliver instead of raising: a training run goes on
    when its output pipe or terminal goes away (the log `tee` of a signalled process group, a closed ssh
    session). tqdm re-raises BrokenPipeError from a progress bar, and a print has no way to ignore it, so
    without this the main rank dies at its next line of output, before it can save. Call it before logging
    is set up, so the log handler writes through it too."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _PipeSafeStream):
            setattr(sys, name, _PipeSafeStream(stream))
