"""Owner files: a JSON record of who holds something, created with O_CREAT|O_EXCL so that exactly one
process makes it (atomic on local disks, NFS and Lustre), read back by the others, and removed by a
waiter only while it is still the record that waiter judged dead.

The stage dir's claim (`rlhf.claims`) and the model cache's lock without flock (`rlhf.models.cachelock`)
are both owner files; each decides for itself when a holder is gone. Standard library only.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

TAKEOVER_LOCK_S = 60.0  # a takeover takes milliseconds: a takeover lock this old was left by a killed process

Held = tuple[dict, os.stat_result]


def machine_id() -> str:
    """Host name, kernel boot and pid namespace: pids compare only between processes that share all three
    (containers on one host may share a host name but not a pid namespace)."""
    parts = [socket.gethostname()]
    for read in (lambda: Path("/proc/sys/kernel/random/boot_id").read_text(encoding="utf-8").strip(),
                 lambda: os.readlink("/proc/self/ns/pid")):
        try:
            parts.append(read())
        except OSError:
            parts.append("")
    return "|".join(parts)


def create(path: Path, info: dict) -> bool:
    """Write `info` to `path` if no file is there (O_EXCL), synced to disk; False when one already is."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(info, fh, indent=2)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    return True


def read(path: Path) -> Held | None:
    """The record ({} while it is being written, or when damaged) and the file's stat; None when there is none."""
    try:
        stat = os.stat(path)
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    try:
        info = json.loads(text)
    except ValueError:
        info = {}
    return (info if isinstance(info, dict) else {}), stat


def take_over(path: Path, held: Held, identity: Callable[[dict], Any] = lambda info: info) -> bool:
    """Remove the owner file `path` judged dead as `held`, so that the caller can create its own (O_EXCL, as
    always). One process at a time does this, under `<path>.takeover` (O_EXCL too), and only while the file
    is still that one: the same `identity` of its record, inode and mtime. False when another process is at
    it or the file changed: a live holder's file is never removed."""
    guard = path.with_name(path.name + ".takeover")
    try:
        os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        with contextlib.suppress(FileNotFoundError):
            if time.time() - os.stat(guard).st_mtime > TAKEOVER_LOCK_S:
                guard.unlink(missing_ok=True)  # left by a process killed in the middle of a takeover
        time.sleep(0.05)
        return False
    try:
        now = read(path)
        if now is None or identity(now[0]) != identity(held[0]) or \
                (now[1].st_ino, now[1].st_mtime_ns) != (held[1].st_ino, held[1].st_mtime_ns):
            return False
        path.unlink()
        return True
    finally:
        guard.unlink(missing_ok=True)
