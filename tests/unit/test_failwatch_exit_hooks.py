"""The failure watcher's way out (`rlhf.failwatch`), in one process: no process group, an in-memory store.

Another rank's failure ends this rank by `os._exit(1)`, which runs no `finally` and no atexit handler, so each
case runs in a subprocess. Its claim (`rlhf.claims`) must be released on that way out, so that a re-run, or
the requeued job, finds the directory free; and nothing on the way out may keep the rank alive for long.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

RANK = """
import sys, time
import torch.distributed as dist
from rlhf import claims, failwatch

failwatch.POLL_S, failwatch.EXIT_HOOKS_S = 0.05, float(sys.argv[2])
held = claims.claim(sys.argv[1], 300)
if sys.argv[3] == "hang":  # a hook that never returns (a hung filesystem), before the claims' own
    failwatch._hooks.insert(0, lambda: time.sleep(3600))
if sys.argv[3] == "raise":
    failwatch._hooks.insert(0, lambda: 1 / 0)
store = dist.HashStore()
failwatch.start(store, 0)
print("claimed", flush=True)
store.set(failwatch.KEY, "rank 1 failed: OSError: disk full")
time.sleep(60)  # training on; the watcher ends the process
print("still running", flush=True)
"""


def _rank(directory: Path, exit_hooks_s: float = 5.0, hook: str = "none") -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", RANK, str(directory), str(exit_hooks_s), hook], capture_output=True,
                          text=True, timeout=60)
    return proc, time.monotonic() - start


@pytest.mark.timeout(120)
def test_a_rank_stopped_for_another_ranks_failure_releases_its_claim(tmp_path):
    proc, _ = _rank(tmp_path)
    assert proc.returncode == 1 and proc.stdout == "claimed\n", proc.stderr
    assert proc.stderr.splitlines()[-1] == "error: rank 1 failed: OSError: disk full; stopping rank 0 too"
    assert not (tmp_path / "claim.json").exists()


@pytest.mark.timeout(120)
def test_a_hook_that_hangs_or_raises_does_not_keep_the_rank(tmp_path):
    proc, took = _rank(tmp_path / "hang", exit_hooks_s=0.5, hook="hang")
    assert proc.returncode == 1 and "stopping rank 0 too" in proc.stderr
    assert took < 30  # not the 60 s sleep, nor the hour-long hook
    assert (tmp_path / "hang" / "claim.json").exists()  # left to the next start, which takes it over
    proc, _ = _rank(tmp_path / "raise", hook="raise")
    assert proc.returncode == 1 and "on the way out: <lambda> failed (division by zero)" in proc.stderr
    assert not (tmp_path / "raise" / "claim.json").exists()  # the hooks after it still ran
