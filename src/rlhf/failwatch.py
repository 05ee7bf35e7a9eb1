"""Stop every rank when one rank fails, on every node, with that rank's error.

A launcher only watches the ranks of its own node. When a rank on one node fails, the ranks on the other
nodes carry on into their next collective. Over NCCL that collective then waits for the process group's
timeout (`run.collective_timeout_s`, 30 minutes by default; `engine.init_distributed` sets it for gloo and
NCCL alike) while holding the GPUs; over gloo it fails once the peer's process has exited, with
"Connection closed by peer" and nothing about the cause. So a failing rank announces its error in the
process group's key-value store (`announce`), and a daemon thread in every rank polls that store every
POLL_S seconds (`start`); a rank that sees another rank's announcement prints it and exits with status 1.

The store lives in global rank 0's process, and a failing rank keeps its process up for a few polls after
announcing, so that its peers read the announcement before their collectives fail. A watcher that loses
the store (rank 0 exited, after success or failure) stops quietly: only an announcement ends a rank. It
ends the rank with `os._exit`, which runs no `finally` and no `atexit` handler, so what must happen on the
way out is registered with `before_exit` (`rlhf.claims` releases the rank's claims there). A
rank killed outright (SIGKILL, OOM killer) cannot announce anything: the launcher of its node stops the
ranks there, and the other nodes see the collective fail or time out as before.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

log = logging.getLogger("rlhf")

KEY = "rlhf/failed"
POLL_S = 1.0
# The hooks get this long: a hung filesystem (a claim on NFS) must not keep a failed run on its GPUs.
EXIT_HOOKS_S = 5.0

_stop: threading.Event | None = None
_thread: threading.Thread | None = None
_store = None
_rank = 0
_announced = False
_hooks: list = []


def start(store, rank: int) -> None:
    """Start this rank's watcher on the process group's key-value `store` (once; a no-op without a store).

    `engine.init_distributed` calls it with `engine.store()` and `engine.rank()`; nothing here imports
    `rlhf.engine`, so the dependency goes one way.
    """
    global _stop, _thread, _store, _rank
    if store is None or _thread is not None:
        return
    _store, _rank = store, rank
    _stop = threading.Event()
    _thread = threading.Thread(target=_watch, args=(store, _stop, _rank), name="rlhf-failwatch", daemon=True)
    _thread.start()


def _watch(store, stop: threading.Event, me: int) -> None:
    while not stop.wait(POLL_S):
        try:
            if not store.check([KEY]):
                continue
            message = store.get(KEY).decode("utf-8", "replace")
        except Exception:  # the store is gone (rank 0 exited): nothing left to learn from it
            return
        if _announced or stop.is_set():
            return
        print(f"error: {message}; stopping rank {me} too", file=sys.stderr, flush=True)
        sys.stdout.flush()
        _run_hooks()
        os._exit(1)


def before_exit(hook) -> None:
    """Run `hook()` before the watcher ends this rank for another rank's failure (registered twice, it runs
    once). Hooks run in registration order, within EXIT_HOOKS_S in all; one that raises is logged and
    skipped."""
    if hook not in _hooks:
        _hooks.append(hook)


def _run_hooks() -> None:
    def run() -> None:
        for hook in list(_hooks):
            try:
                hook()
            except Exception as err:  # the rank stops anyway; what the hook left undone the next start handles
                log.warning("on the way out: %s failed (%s)", getattr(hook, "__qualname__", hook), err)

    helper = threading.Thread(target=run, name="rlhf-failwatch-exit", daemon=True)
    helper.start()
    helper.join(timeout=EXIT_HOOKS_S)


def announce(message: str) -> None:
    """Tell the other ranks that this one failed (first line of `message`), then stay up for a few polls:
    while this process lives, its peers' collectives keep waiting instead of failing on a closed connection,
    so their watchers read the announcement (and rank 0's process holds the store). When another rank
    failed first, print its announcement instead: it is the cause."""
    global _announced
    store = _store
    if store is None or _thread is None:  # no watcher started: a single process, or no store to share
        return
    _announced = True
    first_line = (message.strip().splitlines() or ["unknown error"])[0][:500]
    try:
        if store.check([KEY]):
            print(f"error: {store.get(KEY).decode('utf-8', 'replace')} (the first rank to fail)", file=sys.stderr,
                  flush=True)
            return
        store.set(KEY, f"rank {_rank} failed: {first_line}")
    except Exception as err:  # best effort: the collective timeout (run.collective_timeout_s) still applies
        log.debug("could not announce the failure to the other ranks: %s", err)
        return
    time.sleep(3 * POLL_S)


def stop() -> None:
    """Stop this rank's watcher (before the final barrier)."""
    global _thread
    if _stop is not None:
        _stop.set()
    if _thread is not None:
        _thread.join(timeout=5 * POLL_S)
        _thread = None
