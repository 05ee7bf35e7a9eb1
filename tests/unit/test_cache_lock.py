"""The model cache's lock (`rlhf.models.cachelock`) with flock and, forced unavailable as on Lustre without
`-o flock`, with its O_EXCL lock file: one holder at a time, a dead or old holder taken over, a live one
waited for; two processes building one alias build it once; and `rlhf fetch`'s choice of models, with the
hub download wired up but not run (no network here)."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from rlhf import models
from rlhf.commands import fetch
from rlhf.config import load_config
from rlhf.errors import ModelError
from rlhf.models import aliases, cachelock

FORK = multiprocessing.get_context("fork")


@pytest.fixture
def no_flock(monkeypatch: pytest.MonkeyPatch) -> None:
    """flock fails as on a Lustre client mounted without `-o flock` (also in processes forked from here)."""
    import fcntl

    def unsupported(*args):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", unsupported)


def _hold(lock: Path, log: Path, name: str, seconds: float) -> None:
    with cachelock.cache_lock(lock, poll_s=0.01):
        with log.open("a") as fh:
            fh.write(f"{name} in {time.time()}\n")
        time.sleep(seconds)
        with log.open("a") as fh:
            fh.write(f"{name} out {time.time()}\n")


def test_lock_file_excludes_another_process_without_flock(no_flock, tmp_path: Path) -> None:
    lock, log = tmp_path / ".m.lock", tmp_path / "log"
    with cachelock.cache_lock(lock):
        owner = json.loads((tmp_path / ".m.lock.owner").read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        child = FORK.Process(target=_hold, args=(lock, log, "child", 0))
        child.start()
        time.sleep(0.3)
        assert not log.exists()  # still waiting for us
        released = time.time()
    child.join(10)
    assert child.exitcode == 0
    entered = float(log.read_text().split()[2])
    assert entered >= released
    assert not (tmp_path / ".m.lock.owner").exists()


def _owner(path: Path, **info) -> None:
    path.write_text(json.dumps(info))


def _killed_while_holding(lock: Path) -> None:
    with cachelock.cache_lock(lock):
        os._exit(0)  # no release: as a builder killed mid-build leaves it


def test_lock_of_a_dead_process_on_this_machine_is_taken_over(no_flock, tmp_path: Path, caplog) -> None:
    child = FORK.Process(target=_killed_while_holding, args=(tmp_path / ".m.lock",))
    child.start()
    child.join(10)
    assert json.loads((tmp_path / ".m.lock.owner").read_text())["pid"] == child.pid
    start = time.monotonic()
    with cachelock.cache_lock(tmp_path / ".m.lock", stale_s=3600):  # the age bound plays no part here
        assert json.loads((tmp_path / ".m.lock.owner").read_text())["pid"] == os.getpid()
    assert time.monotonic() - start < 2
    assert f"taking over the lock of pid {child.pid}" in caplog.text and "its process is gone" in caplog.text


def test_lock_from_another_machine_is_waited_for_until_it_is_old(no_flock, tmp_path: Path) -> None:
    owner = tmp_path / ".m.lock.owner"
    _owner(owner, host="other", machine="other||", pid=os.getpid(), time=time.time())  # a live pid here says nothing
    got = threading.Event()

    def take() -> None:
        with cachelock.cache_lock(tmp_path / ".m.lock", stale_s=1.0, poll_s=0.01):
            got.set()

    waiter = threading.Thread(target=take)
    waiter.start()
    assert not got.wait(0.4)  # fresh: its holder may live
    old = time.time() - 5
    os.utime(owner, (old, old))  # no newer than 1 s ago: taken over
    waiter.join(5)
    assert got.is_set() and not owner.exists()


def test_lock_older_than_the_bound_is_taken_over_even_from_a_live_pid(no_flock, tmp_path: Path) -> None:
    """A pid says the builder lives, but a pid may be reused: past the age bound the lock is taken anyway."""
    owner = tmp_path / ".m.lock.owner"
    holder = FORK.Process(target=_hold, args=(tmp_path / ".m.lock", tmp_path / "log", "holder", 30))
    holder.start()
    try:
        while not (tmp_path / "log").exists():
            time.sleep(0.01)
        old = time.time() - 5
        os.utime(owner, (old, old))
        with cachelock.cache_lock(tmp_path / ".m.lock", stale_s=1.0, poll_s=0.01):
            assert json.loads(owner.read_text())["pid"] == os.getpid() and holder.is_alive()
    finally:
        holder.kill()
        holder.join(5)


def _stand_in_build(out: Path) -> None:
    """What an alias build leaves (config.json, weights), slowly, counted in builds.log beside the cache."""
    with (out.parents[1] / "builds.log").open("a") as fh:
        fh.write(f"{os.getpid()}\n")
    time.sleep(0.3)
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"")


def _materialize(queue) -> None:
    queue.put(str(aliases.materialize("stand-in")))


@pytest.mark.parametrize("lock", ["flock", "lock_file"])
def test_two_processes_build_one_alias_once(lock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            request) -> None:
    if lock == "lock_file":
        request.getfixturevalue("no_flock")
    monkeypatch.setenv("RLHF_CACHE", str(tmp_path))
    monkeypatch.setitem(aliases.ALIASES, "stand-in", aliases.Alias(_stand_in_build))
    queue = FORK.Queue()
    procs = [FORK.Process(target=_materialize, args=(queue,)) for _ in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(20)
    assert [proc.exitcode for proc in procs] == [0, 0]
    final = tmp_path / "models" / "stand-in"
    assert {queue.get(timeout=5) for _ in procs} == {str(final)}
    assert len((tmp_path / "builds.log").read_text().split()) == 1
    assert sorted(p.name for p in final.parent.iterdir()) == [".stand-in.lock", "stand-in"]  # no lock file left


# ------------------------------------------------------------------------------------------ rlhf fetch

@pytest.mark.parametrize(("stages", "sets", "expected"), [
    (["sft", "reward", "ppo"], [], ["model.name_or_path"]),
    (["ppo"], [], []),  # reads the sft and reward outputs only
    (["ppo"], ["ppo.policy_init=base"], ["model.name_or_path"]),
    (["reward"], ["reward.base_model=./rm-base", "model.tokenizer=./tok"], ["reward.base_model", "model.tokenizer"]),
])
def test_fetch_reads_only_what_the_stages_load(stages, sets, expected) -> None:
    cfg = load_config("configs/tiny.yaml", sets)
    assert [key for key, _ in fetch.models_read(cfg, stages)] == expected


def test_fetch_builds_an_alias_once_and_names_where(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLHF_CACHE", str(tmp_path))
    monkeypatch.setitem(aliases.ALIASES, "stand-in", aliases.Alias(_stand_in_build))
    cfg = load_config("configs/tiny.yaml", ["model.name_or_path=stand-in"])
    lines = fetch.run(cfg, ["sft"])
    assert lines == [f"fetch: model.name_or_path stand-in: {tmp_path / 'models' / 'stand-in'}"]
    assert fetch.run(cfg, ["sft"]) == lines and len((tmp_path / "builds.log").read_text().split()) == 1


def test_fetch_downloads_a_hub_id_only_when_online(monkeypatch: pytest.MonkeyPatch) -> None:
    """The download itself needs a network: `snapshot_download` is a stand-in that records its call."""
    import huggingface_hub
    from huggingface_hub import constants

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, **kw: calls.append((repo, kw)) or f"/hf/{repo}/snapshot")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert models.fetch_model("some-org/some-model") == "/hf/some-org/some-model/snapshot"
    [(repo, kw)] = calls
    assert repo == "some-org/some-model" and "*.bin" in kw["ignore_patterns"] and "*.gguf" in kw["ignore_patterns"]
    assert kw["allow_patterns"] is None
    models.fetch_model("some-org/some-model", allow_pickle=True, tokenizer_only=True)
    assert "*.bin" not in calls[1][1]["ignore_patterns"] and "*.safetensors" not in calls[1][1]["allow_patterns"]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="^some-org/some-model: .*offline with no cached copy"):
        models.fetch_model("some-org/some-model")
    assert len(calls) == 2
