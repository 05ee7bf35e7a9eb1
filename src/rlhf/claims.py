"""One live run per directory: a stage (and `rlhf eval`) claims its directory before it writes anything.

The claim is `<dir>/claim.json`, created with O_CREAT|O_EXCL (atomic on local disks and on NFS), holding
who runs there: host, pid, start time and command. While the run lives a thread touches the file every
`run.claim_timeout_s / 10` seconds (its modification time is the heartbeat), and the run removes it on
every exit it lives to see: done, error, SIGTERM stop, a stop for another rank's failure (`failwatch`).
The claim also records the scheduler job the run belongs to. A start that finds a claim

- held by a live run refuses, naming the holder (exit 2), and has touched nothing;
- whose process is gone (same machine: same host, kernel boot and pid namespace, and that pid no longer
  runs the process that claimed) or, from another machine where pids say nothing, whose heartbeat is older
  than `run.claim_timeout_s`, takes it over with a warning; the stage then resumes from its last complete
  checkpoint as after any stop;
- made by an earlier run of this run's own scheduler job (a requeued Slurm job keeps its SLURM_JOB_ID and
  counts up SLURM_RESTART_COUNT; `RLHF_JOB_ID`/`RLHF_JOB_RESTART` for other schedulers) takes it over at
  once, on any host: the scheduler starts a job's next run only after its previous one ended. A claim of
  another job is judged as above.

One start at a time takes over (under an O_EXCL `claim.json.takeover`), removing the claim only while it is
still the one judged dead, and then creates its own as any start does: of several starts that find the
same dead claim, exactly one gets the directory.

Under a launcher the main rank claims for all ranks; then the first rank of every other node claims its
node's copy (node-local disks, `rlhf.replicate`), or finds the main rank's claim and joins it (a shared
filesystem). Every rank learns the outcome through the process group, so all of them exit together.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shlex
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from rlhf import engine, failwatch, ownerfile
from rlhf.errors import ClaimError

log = logging.getLogger("rlhf")

CLAIM = "claim.json"
# Heartbeats per timeout: a live run misses several (a long GIL hold, NFS attribute caching of up to a
# minute) before it could look dead.
BEATS_PER_TIMEOUT = 10
_ATTEMPTS = 20  # create, or take over a dead claim and create again; other starts may race for each step


class Claim:
    """A claim this process made; its heartbeat thread touches the file until `release()`."""

    def __init__(self, path: Path, token: str, interval_s: float):
        self.path = path
        self.token = token
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(interval_s,), name="rlhf-claim-heartbeat",
                                        daemon=True)
        self._thread.start()
        _HELD.append(self)

    def _beat(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                held = ownerfile.read(self.path)
                if held is not None and held[0].get("token") == self.token:
                    os.utime(self.path)
                    continue
            except OSError:  # a filesystem hiccup (or gone between the read and the touch): try at the next beat
                continue
            log.warning("%s: this run's %s was removed or taken over by another start (it judged the run "
                        "dead); two runs may now write there: stop one of them", self.path.parent, CLAIM)
            return

    def release(self) -> None:
        """Stop the heartbeat and remove the file, if it is still this run's."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        try:
            held = ownerfile.read(self.path)
            if held is not None and held[0].get("token") == self.token:
                self.path.unlink(missing_ok=True)
        except OSError as err:  # left behind: the next start takes it over (its process will be gone)
            log.warning("%s: could not remove the claim (%s)", self.path, err.strerror or err)
        with contextlib.suppress(ValueError):  # released twice at once: the main thread and the failure watcher
            _HELD.remove(self)


_HELD: list[Claim] = []


def release_all() -> None:
    """Release every claim this process holds (`run_stage` and `rlhf eval` on their way out; at exit)."""
    for held in list(_HELD):
        held.release()


atexit.register(release_all)
# A rank that another rank's failure stops leaves by os._exit, past atexit and every `finally`. Releasing
# there is safe: the run is ending on every rank, and what a rank still writes in its last second lands in a
# checkpoint without its marker, which the next start removes.
failwatch.before_exit(release_all)


def claim(directory: str | Path, timeout_s: float) -> Claim | None:
    """Collective. Claim `directory` for this run (created if missing): the main rank first, then the
    first rank of every other node. Raises ClaimError on every rank when another live run holds any node's
    copy. Returns the claim this rank made (None where it made none)."""
    directory = Path(directory)
    _job()  # a malformed restart count stops every rank here, before any collective
    token, mine, refusal = uuid.uuid4().hex, None, None
    if engine.is_main():
        mine, refusal = _acquire(directory, token, timeout_s)
    token, refusal = engine.broadcast_object((token, refusal))
    if refusal is None and engine.local_rank() == 0 and not engine.is_main():
        mine, refusal = _acquire(directory, token, timeout_s)
    refusals = [r for r in engine.all_gather_object(refusal) if r]
    if refusals:
        if mine is not None:
            mine.release()
        raise ClaimError(refusals[0])
    return mine


def _acquire(directory: Path, token: str, timeout_s: float) -> tuple[Claim | None, str | None]:
    """(claim, None) when made here; (None, None) when this run already holds it (another rank's claim on
    a shared filesystem); (None, message) when another live run holds it."""
    path = directory / CLAIM
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for _ in range(_ATTEMPTS):
            if _create(path, token):
                return Claim(path, token, max(timeout_s / BEATS_PER_TIMEOUT, 0.05)), None
            held = ownerfile.read(path)
            if held is None:
                continue  # released between our create and our read
            info, stat = held
            if info.get("token") == token:
                return None, None
            reason = _dead_because(info, stat, timeout_s)
            if reason is None:
                return None, _in_use(directory, info, stat, timeout_s)
            if ownerfile.take_over(path, held, lambda info: info.get("token")) and reason != _OURS:
                log.warning("%s: taking over the claim of pid %s on %s (since %s): %s", directory,
                            info.get("pid", "?"), info.get("host", "?"), _clock(info.get("started")), reason)
    except OSError as err:
        return None, f"{directory}: cannot claim the directory ({err.strerror or err}); check the path and its permissions"
    return None, f"{directory}: several starts are claiming it at once; wait for them, or stop them"


def _create(path: Path, token: str) -> bool:
    """Create the claim file, or return False when one exists."""
    now = time.time()
    info = {"token": token, "host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
            "machine": ownerfile.machine_id(), "started": now, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z",
                                                                               time.localtime(now)),
            "command": shlex.join(sys.argv), "job": _job()}
    return ownerfile.create(path, info)


_OURS = "held by this process"  # an earlier stage run in this process that did not release it (tests)


def _dead_because(info: dict, stat: os.stat_result, timeout_s: float) -> str | None:
    """Why a claim can be taken over, or None while its run lives. A claim of an earlier run of this job
    is dead wherever it was made; otherwise, on the same machine the pid decides (a stopped but live
    process keeps its claim), elsewhere the heartbeat does."""
    same_machine = info.get("machine") == ownerfile.machine_id()
    if same_machine and info.get("pid") == os.getpid():
        return _OURS
    earlier = _earlier_run(info.get("job"))
    if earlier is not None:
        return earlier
    if same_machine:
        return "its process is gone" if _gone(info) else None
    age = time.time() - stat.st_mtime
    if age > timeout_s:
        return f"its heartbeat stopped {age:.0f} s ago (run.claim_timeout_s={timeout_s:g})"
    return None


def _job() -> dict | None:
    """The scheduler job this process runs in, {"scheduler", "id", "restart"}, or None outside one.

    Slurm keeps a job's id when it requeues the job and counts its runs in SLURM_RESTART_COUNT (unset on
    the first). `RLHF_JOB_ID` and `RLHF_JOB_RESTART` name a job of any other scheduler the same way, and win.
    """
    env = os.environ
    if env.get("RLHF_JOB_ID"):
        scheduler, job_id, count_key = "other", env["RLHF_JOB_ID"], "RLHF_JOB_RESTART"
    elif env.get("SLURM_JOB_ID"):
        scheduler, job_id, count_key = "slurm", env["SLURM_JOB_ID"], "SLURM_RESTART_COUNT"
    else:
        return None
    count = env.get(count_key, "").strip() or "0"
    if not count.isdecimal():
        raise ClaimError(f"{count_key}={count!r} is not a whole number; set it to how many times job {job_id} "
                         "was restarted (0 on its first run), or unset it")
    return {"scheduler": scheduler, "id": job_id, "restart": int(count)}


def _earlier_run(theirs) -> str | None:
    """Why a claim's job info (`theirs`) shows an earlier run of this process's own job, else None. The
    scheduler starts a job's next run once the previous one has ended, so that claim's run is over, on
    whatever nodes it ran; a claim of the same run or of another job says nothing here."""
    mine = _job()
    if mine is None or not isinstance(theirs, dict):
        return None
    restart = theirs.get("restart")
    same_job = (theirs.get("scheduler"), theirs.get("id")) == (mine["scheduler"], mine["id"])
    if not same_job or type(restart) is not int or restart >= mine["restart"]:
        return None
    name = f"Slurm job {mine['id']}" if mine["scheduler"] == "slurm" else f"job {mine['id']} (RLHF_JOB_ID)"
    return f"it was made by an earlier run of {name} (restart {restart}; this is restart {mine['restart']})"


def _gone(info: dict) -> bool:
    pid = info.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False  # unknown: leave it to the heartbeat of a later start on another machine, or a person
    if Path("/proc/self/stat").exists():
        start = _process_start(pid)
        return start is None or (info.get("pid_start") is not None and start != info["pid_start"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's live process
        return False
    return False


def _process_start(pid: int) -> str | None:
    """When process `pid` started, in clock ticks since boot (Linux /proc), so that a pid reused by a later
    process is not taken for the claimer; None when no such process runs (a zombie counts as ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # after the command name, which may hold spaces
    return None if len(fields) < 20 or fields[0] == "Z" else fields[19]


def _in_use(directory: Path, info: dict, stat: os.stat_result, timeout_s: float) -> str:
    if not info:
        return f"{directory} is in use by another start (its {CLAIM} is being written); wait for it, or stop it"
    heartbeat = ""
    if info.get("machine") != ownerfile.machine_id():
        heartbeat = (f" (last heartbeat {time.time() - stat.st_mtime:.0f} s ago; taken over after "
                     f"run.claim_timeout_s={timeout_s:g} s without one)")
    return (f"{directory} is in use by pid {info.get('pid', '?')} on {info.get('host', '?')} since "
            f"{_clock(info.get('started'))}{heartbeat}; wait for it, or stop it")


def _clock(started) -> str:
    """`12:01` today, else `2026-11-27 12:01` (local time)."""
    if not isinstance(started, (int, float)):
        return "?"
    when = time.localtime(started)
    same_day = time.strftime("%Y-%m-%d", when) == time.strftime("%Y-%m-%d")
    return time.strftime("%H:%M" if same_day else "%Y-%m-%d %H:%M", when)
