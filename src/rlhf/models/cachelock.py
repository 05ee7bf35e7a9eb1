"""One builder at a time for a model cache entry, also where `flock` does not work.

`cache_lock(path)` takes `flock` on `path` where the filesystem supports it. Where it does not (Lustre
mounted without `-o flock`, NFS without a lock daemon: flock fails with ENOSYS, ENOLCK or EOPNOTSUPP; no
`fcntl` at all off POSIX) it falls back to a lock *file*, `<path>.owner` (`rlhf.ownerfile`), created with
O_CREAT|O_EXCL (atomic on local disks, NFS and Lustre) and holding who builds: host, machine, pid and time. The holder
removes it when done. A waiter takes over a lock file whose holder is gone: at once on the same machine
(same host name, kernel boot and pid namespace) when its pid no longer runs; on any machine once the file is
older than `RLHF_CACHE_LOCK_STALE_S` (default 600 s; an alias build takes about 30 s), which is all a waiter
on another machine, where pids say nothing, can go by. One waiter at a time takes over (O_EXCL
`<path>.owner.takeover`), and only while the file is still the one it judged stale.

The lock only saves duplicate work: what a build publishes is renamed into place whole (`aliases._install`),
so a reader never sees a half-written dir even when two builders do run at once (a holder judged stale
while alive, or nodes whose mounts differ, one with flock and one without).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from rlhf import ownerfile

log = logging.getLogger(__name__)

# What flock raises where the filesystem has no locks (Lustre's default mount: ENOSYS; NFS: ENOLCK).
NO_FLOCK = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}
STALE_S = 600.0
POLL_S = 0.5


@contextlib.contextmanager
def cache_lock(path: Path, *, stale_s: float | None = None, poll_s: float = POLL_S) -> Iterator[None]:
    """Hold an exclusive lock on `path` (flock, else the lock file `<path>.owner`) while the body runs."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        fcntl = None
    if fcntl is not None:
        with open(path, "a+b") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX)
            except OSError as err:
                if err.errno not in NO_FLOCK:
                    raise
                log.debug("%s: flock unsupported here (%s); using a lock file", path, err.strerror)
            else:
                try:
                    yield
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)
                return
    if stale_s is None:
        stale_s = float(os.environ.get("RLHF_CACHE_LOCK_STALE_S") or STALE_S)
    with _owner_file(path.with_name(path.name + ".owner"), stale_s, poll_s):
        yield


@contextlib.contextmanager
def _owner_file(path: Path, stale_s: float, poll_s: float) -> Iterator[None]:
    mine = {"host": socket.gethostname(), "machine": ownerfile.machine_id(), "pid": os.getpid(), "time": time.time()}
    told = False
    while not ownerfile.create(path, mine):
        held = ownerfile.read(path)
        if held is None:
            continue  # released between our create and our read
        reason = _stale_because(held[0], held[1], stale_s)
        if reason is not None:
            if ownerfile.take_over(path, held):
                log.warning("%s: taking over the lock of pid %s on %s: %s", path, held[0].get("pid", "?"),
                            held[0].get("host", "?"), reason)
            continue
        if not told:
            log.info("%s: waiting for pid %s on %s, which builds this entry", path, held[0].get("pid", "?"),
                     held[0].get("host", "?"))
            told = True
        time.sleep(poll_s)
    try:
        yield
    finally:
        held = ownerfile.read(path)
        if held is not None and held[0] == mine:  # taken over (judged stale) meanwhile: the file is theirs
            path.unlink(missing_ok=True)


def _stale_because(info: dict, stat: os.stat_result, stale_s: float) -> str | None:
    """Why a lock file can be taken over, or None while its holder may live. The age bound holds on this
    machine too: a pid reused by another process would otherwise keep a dead builder's lock forever."""
    pid = info.get("pid")
    if info.get("machine") == ownerfile.machine_id() and isinstance(pid, int) and pid > 0 and os.name == "posix":
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return "its process is gone"
        except PermissionError:  # another user's live process
            pass
    age = time.time() - stat.st_mtime
    if age > stale_s:
        return f"it is {age:.0f} s old (RLHF_CACHE_LOCK_STALE_S={stale_s:g})"
    return None
