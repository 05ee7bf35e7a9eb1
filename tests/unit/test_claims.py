"""Claims (`rlhf.claims`): one live run per directory, without models.

Other processes hold claims here as small Python subprocesses (`_holder`), so that "alive" and "gone" are
real processes on this machine; a claim from another machine is a file written by hand, or one made here
before `socket.gethostname` is patched to name another host. Then the races: several processes starting
at once on a free directory, and on a dead run's claim: exactly one wins. Scheduler jobs are simulated
with their environment variables (SLURM_JOB_ID, SLURM_RESTART_COUNT, RLHF_JOB_ID, RLHF_JOB_RESTART).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from rlhf import claims, ownerfile
from rlhf.errors import ClaimError

HOLDER = """
import sys
from rlhf import claims
held = claims.claim(sys.argv[1], 300)
print("claimed", flush=True)
sys.stdin.read()  # until the test closes stdin
held.release()
"""


JOB_VARS = ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "RLHF_JOB_ID", "RLHF_JOB_RESTART")


@pytest.fixture(autouse=True)
def _no_scheduler_job(monkeypatch):
    """Each test starts outside any scheduler job, also when the suite itself runs in one."""
    for key in JOB_VARS:
        monkeypatch.delenv(key, raising=False)


def _holder(directory: Path) -> subprocess.Popen:
    """A process on this machine that claims `directory` and holds it until its stdin is closed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "claimed"
    return proc


def _foreign(directory: Path, *, heartbeat_age: float, pid: int = 4242) -> Path:
    """A claim written on "node-b" (another machine): only its heartbeat can tell whether it lives."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / claims.CLAIM
    started = time.time() - 3600
    path.write_text(json.dumps({"token": "node-b-run", "host": "node-b", "pid": pid, "pid_start": "123",
                                "machine": "node-b|boot|pid:[1]", "started": started,
                                "command": "rlhf sft --config c.yaml"}), encoding="utf-8")
    beat = time.time() - heartbeat_age
    os.utime(path, (beat, beat))
    return path


def _hhmm(started: float) -> str:
    return time.strftime("%H:%M", time.localtime(started))


def test_a_live_holder_refuses_a_second_claim_then_releases(tmp_path):
    directory = tmp_path / "runs" / "x" / "reward"
    holder = _holder(directory)
    try:
        info = json.loads((directory / claims.CLAIM).read_text())
        assert (info["host"], info["pid"]) == (socket.gethostname(), holder.pid)
        assert "-c" in info["command"]
        with pytest.raises(ClaimError) as refused:
            claims.claim(directory, 300)
        assert str(refused.value) == (f"{directory} is in use by pid {holder.pid} on {socket.gethostname()} since "
                                      f"{_hhmm(info['started'])}; wait for it, or stop it")
    finally:
        holder.communicate("", timeout=30)
    assert holder.returncode == 0 and not (directory / claims.CLAIM).exists()
    held = claims.claim(directory, 300)
    assert json.loads((directory / claims.CLAIM).read_text())["pid"] == os.getpid()
    held.release()
    assert not (directory / claims.CLAIM).exists()


def test_a_killed_holders_claim_is_taken_over(tmp_path, caplog):
    holder = _holder(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert (tmp_path / claims.CLAIM).exists()  # nothing ran after the kill
    caplog.set_level(logging.WARNING, logger="rlhf")
    held = claims.claim(tmp_path, 300)
    assert f"{tmp_path}: taking over the claim of pid {holder.pid} on {socket.gethostname()}" in caplog.text
    assert "its process is gone" in caplog.text
    assert json.loads((tmp_path / claims.CLAIM).read_text())["pid"] == os.getpid()
    held.release()


def test_another_machines_claim_lives_until_its_heartbeat_is_older_than_the_timeout(tmp_path, caplog):
    path = _foreign(tmp_path, heartbeat_age=20)
    started = json.loads(path.read_text())["started"]
    with pytest.raises(ClaimError) as refused:
        claims.claim(tmp_path, 300)
    assert re.fullmatch(rf"{re.escape(str(tmp_path))} is in use by pid 4242 on node-b since {claims._clock(started)} "
                        r"\(last heartbeat 2\d s ago; taken over after run.claim_timeout_s=300 s without one\); "
                        r"wait for it, or stop it", str(refused.value)), str(refused.value)
    assert path.exists()

    beat = time.time() - 301
    os.utime(path, (beat, beat))
    caplog.set_level(logging.WARNING, logger="rlhf")
    held = claims.claim(tmp_path, 300)
    assert re.search(rf"{re.escape(str(tmp_path))}: taking over the claim of pid 4242 on node-b \(since "
                     rf"{claims._clock(started)}\): its heartbeat stopped 3\d\d s ago \(run.claim_timeout_s=300\)",
                     caplog.text), caplog.text
    assert json.loads(path.read_text())["host"] == socket.gethostname()
    held.release()


def test_a_claim_being_written_is_live_and_a_damaged_old_one_is_not(tmp_path):
    path = tmp_path / claims.CLAIM
    path.write_text("", encoding="utf-8")  # created, content not yet written
    with pytest.raises(ClaimError, match=r"is in use by another start \(its claim.json is being written\)"):
        claims.claim(tmp_path, 300)
    os.utime(path, (time.time() - 400, time.time() - 400))
    lock = tmp_path / "claim.json.takeover"
    lock.touch()  # another start is taking it over right now
    with pytest.raises(ClaimError, match="several starts are claiming it at once"):
        claims.claim(tmp_path, 300)
    os.utime(lock, (time.time() - 100, time.time() - 100))  # left by a start killed during its takeover
    claims.claim(tmp_path, 300).release()
    assert list(tmp_path.iterdir()) == []


def _within(seconds: float, check) -> bool:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_the_heartbeat_refreshes_the_claim_and_notices_a_takeover(tmp_path, caplog):
    held = claims.claim(tmp_path, 0.5)  # a beat every 0.05 s
    path = tmp_path / claims.CLAIM
    os.utime(path, (time.time() - 100, time.time() - 100))
    assert _within(5, lambda: time.time() - path.stat().st_mtime < 5)
    caplog.set_level(logging.WARNING, logger="rlhf")
    taken = json.loads(path.read_text()) | {"token": "someone-else"}
    path.write_text(json.dumps(taken), encoding="utf-8")
    lost = f"{tmp_path}: this run's claim.json was removed or taken over by another start"
    assert _within(5, lambda: lost in caplog.text)
    held.release()
    assert json.loads(path.read_text())["token"] == "someone-else"  # not ours to remove


def test_a_claim_left_by_this_process_is_reused(tmp_path):
    claims.claim(tmp_path, 300)  # never released (a stage that raised, called without run_stage)
    again = claims.claim(tmp_path, 300)
    again.release()
    claims.release_all()
    assert not (tmp_path / claims.CLAIM).exists()


def _race(directory: str, start, results, done) -> None:
    judge = claims._dead_because

    def slow_judge(*args):  # every start judges the dead claim before any of them acts on its verdict
        verdict = judge(*args)
        time.sleep(0.3)
        return verdict

    claims._dead_because = slow_judge
    start.wait()
    mine, refusal = claims._acquire(Path(directory), f"token-{os.getpid()}", 300)
    results.put((os.getpid(), mine is not None, refusal))
    done.wait()  # stay alive: the losers' verdicts are about a live winner
    os._exit(0)


@pytest.mark.parametrize("dead_claim", [False, True], ids=["free", "dead-claim"])
def test_of_simultaneous_starts_exactly_one_claims(tmp_path, dead_claim):
    if dead_claim:  # a claim whose process has ended, on this machine: every start wants to take it over
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        (tmp_path / claims.CLAIM).write_text(json.dumps({"token": "gone", "pid": gone.pid, "host": "here",
                                                         "machine": ownerfile.machine_id(), "started": 0}))
    ctx = multiprocessing.get_context("fork")
    start, done, results = ctx.Barrier(6), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(tmp_path), start, results, done)) for _ in range(6)]
    for proc in procs:
        proc.start()
    try:
        outcomes = [results.get(timeout=60) for _ in procs]
    finally:
        done.set()
        for proc in procs:
            proc.join(timeout=30)
    winners = [pid for pid, won, _ in outcomes if won]
    assert len(winners) == 1, outcomes
    assert json.loads((tmp_path / claims.CLAIM).read_text())["pid"] == winners[0]
    refusals = {refusal for _, won, refusal in outcomes if not won}
    assert all(f"is in use by pid {winners[0]} on" in r or "being written" in r for r in refusals), refusals
    assert [p.name for p in tmp_path.iterdir()] == [claims.CLAIM]  # nothing set aside is left behind


def _ranks(rank: int, world: int, init_file: str, root: str) -> None:
    """2 ranks on a gloo group; LOCAL_RANK says how the ranks sit on "nodes"."""
    import torch.distributed as dist

    dist.init_process_group("cpu:gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    root_dir, out = Path(root), {}
    try:
        for case, local_rank, directory in (("one_node", rank, "a"), ("shared_fs", 0, "b"),
                                            ("local_disks", 0, f"c{rank}"), ("refused_on_node1", 0, f"d{rank}"),
                                            ("refused_on_main", rank, "e")):
            os.environ["LOCAL_RANK"] = str(local_rank)
            try:
                held = claims.claim(root_dir / directory, 300)
            except ClaimError as err:
                out[case] = {"error": str(err)}
            else:
                info = json.loads((root_dir / directory / claims.CLAIM).read_text())
                out[case] = {"mine": held is not None, "holder": info["pid"], "pid": os.getpid()}
                dist.barrier()  # everyone has read the claim before its holder releases it
                if held is not None:
                    held.release()
            dist.barrier()
        (root_dir / f"rank{rank}.json").write_text(json.dumps(out), encoding="utf-8")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_ranks_claim_once_per_disk_and_exit_together(tmp_path):
    _foreign(tmp_path / "d1", heartbeat_age=0)  # node 1's own disk: its copy is held by a live run elsewhere
    _foreign(tmp_path / "e", heartbeat_age=0)
    mp.spawn(_ranks, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    # One node: the main rank claims for both.
    assert r0["one_node"]["mine"] and not r1["one_node"]["mine"]
    assert r0["one_node"]["holder"] == r1["one_node"]["holder"] == r0["one_node"]["pid"]
    # Two nodes on a shared filesystem: node 1's first rank finds the main rank's claim and joins it.
    assert r0["shared_fs"]["mine"] and not r1["shared_fs"]["mine"]
    assert r1["shared_fs"]["holder"] == r0["shared_fs"]["pid"]
    # Node-local disks: each node's first rank claims its own copy.
    assert r0["local_disks"]["mine"] and r1["local_disks"]["mine"]
    assert r1["local_disks"]["holder"] == r1["local_disks"]["pid"] != r0["local_disks"]["pid"]
    # Held elsewhere on one node's disk, or on the main rank's: both ranks stop with the holder's line.
    for case, where in (("refused_on_node1", "d1"), ("refused_on_main", "e")):
        assert r0[case] == r1[case] and r0[case]["error"].startswith(f"{tmp_path / where} is in use by pid 4242 on node-b")
    assert not (tmp_path / "d0" / claims.CLAIM).exists()  # the main rank's own copy was released
    for directory in ("a", "b", "c0", "c1"):
        assert not (tmp_path / directory / claims.CLAIM).exists()


def _cfg(tmp_path: Path):
    from rlhf.config import config_from_dict

    return config_from_dict({"run": {"output_dir": str(tmp_path / "runs")}, "model": {"name_or_path": str(tmp_path)},
                             "logging": {"tensorboard": False, "plots": False}}, source="t.yaml")


def test_run_stage_releases_the_claim_when_the_stage_fails(tmp_path, monkeypatch):
    from rlhf import preflight, stages
    from rlhf.stages.common import StageRun

    cfg = _cfg(tmp_path)

    class Failing:
        @staticmethod
        def run(cfg, restart=False):
            StageRun(cfg, "sft", restart=restart)
            assert json.loads((cfg.stage_dir("sft") / claims.CLAIM).read_text())["pid"] == os.getpid()
            raise RuntimeError("a bug in the stage")

    monkeypatch.setattr(preflight, "check", lambda *args, **kwargs: [])
    monkeypatch.setattr(stages, "_module", lambda stage: Failing)
    with pytest.raises(RuntimeError, match="a bug in the stage"):
        stages.run_stage("sft", cfg)
    assert not (cfg.stage_dir("sft") / claims.CLAIM).exists()


def test_eval_claims_its_dir(tmp_path, monkeypatch):
    from rlhf.commands import evaluation

    cfg = _cfg(tmp_path)
    path = _foreign(cfg.run.dir / "eval", heartbeat_age=0)
    with pytest.raises(ClaimError, match=r"/eval is in use by pid 4242 on node-b since .*; wait for it, or stop it$"):
        evaluation.run_eval(cfg)  # refused before anything is loaded
    path.unlink()

    def compare(cfg, **options):
        assert json.loads(path.read_text())["pid"] == os.getpid()
        raise ClaimError("stand-in for any error of the evaluation")

    monkeypatch.setattr(evaluation, "_compare", compare)
    with pytest.raises(ClaimError, match="stand-in"):
        evaluation.run_eval(cfg)
    assert not path.exists()


def _in_job(monkeypatch, job_id: str | None, restart: int | None = None, host: str | None = None) -> None:
    """This process as a run of Slurm job `job_id` (restart count `restart`; unset on a job's first run) on `host`."""
    for key, value in (("SLURM_JOB_ID", job_id), ("SLURM_RESTART_COUNT", restart)):
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, str(value))
    if host is not None:
        monkeypatch.setattr(socket, "gethostname", lambda: host)


def test_a_requeued_jobs_next_run_takes_over_its_claim_at_once_on_another_host(tmp_path, monkeypatch, caplog):
    # Run 0 of Slurm job 5001 on node-a stopped uncleanly (os._exit: no release) a moment ago.
    _in_job(monkeypatch, "5001", host="node-a")
    proc = subprocess.run([sys.executable, "-c", "import os, sys; from rlhf import claims; "
                           "claims.claim(sys.argv[1], 300); os._exit(1)", str(tmp_path)],
                          timeout=120)
    assert proc.returncode == 1
    path = tmp_path / claims.CLAIM
    left = json.loads(path.read_text())
    assert left["job"] == {"scheduler": "slurm", "id": "5001", "restart": 0}
    # The subprocess's own host name is this machine's; make the claim node-a's, with a fresh heartbeat.
    left["host"], left["machine"] = "node-a", "node-a|boot-a|pid:[1]"
    path.write_text(json.dumps(left), encoding="utf-8")
    before = path.read_bytes()

    # Another job on node-b: refused as before (a live heartbeat from another machine), nothing touched.
    _in_job(monkeypatch, "5002", host="node-b")
    with pytest.raises(ClaimError, match=rf"is in use by pid {left['pid']} on node-a since .*\(last heartbeat \d s ago"):
        claims.claim(tmp_path, 300)
    # The same run of job 5001 (another srun of it, say) is refused too: restart 0 is not an earlier run.
    _in_job(monkeypatch, "5001", host="node-b")
    with pytest.raises(ClaimError, match="is in use by pid"):
        claims.claim(tmp_path, 300)
    assert path.read_bytes() == before

    # Job 5001 requeued: its restart 1 lands on node-b and takes the claim over at once, heartbeat or not.
    _in_job(monkeypatch, "5001", restart=1, host="node-b")
    caplog.set_level(logging.WARNING, logger="rlhf")
    held = claims.claim(tmp_path, 300)
    assert (f"{tmp_path}: taking over the claim of pid {left['pid']} on node-a (since {_hhmm(left['started'])}): it "
            "was made by an earlier run of Slurm job 5001 (restart 0; this is restart 1)") in caplog.text
    now = json.loads(path.read_text())
    assert (now["host"], now["job"]) == ("node-b", {"scheduler": "slurm", "id": "5001", "restart": 1})
    held.release()
    assert not path.exists()


def test_a_later_run_of_the_job_keeps_its_claim_from_an_earlier_one(tmp_path, monkeypatch):
    """A run of the job that still lives after the scheduler started the next (a node it judged dead) cannot take
    the newer run's claim; nor can a claim without a job, or another scheduler's job of the same id."""
    for job in ({"scheduler": "slurm", "id": "5001", "restart": 2}, None,
                {"scheduler": "other", "id": "5001", "restart": 0}, {"scheduler": "slurm", "id": "5001", "restart": "0"}):
        path = _foreign(tmp_path, heartbeat_age=0)
        path.write_text(json.dumps(json.loads(path.read_text()) | {"job": job}), encoding="utf-8")
        _in_job(monkeypatch, "5001", restart=1)
        with pytest.raises(ClaimError, match="is in use by pid 4242 on node-b"):
            claims.claim(tmp_path, 300)
        assert json.loads(path.read_text())["job"] == job


def test_the_claim_names_its_job_and_rlhf_job_id_names_any_schedulers(tmp_path, monkeypatch):
    path = tmp_path / claims.CLAIM
    claims.claim(tmp_path, 300).release()  # no scheduler
    held = claims.claim(tmp_path, 300)
    assert json.loads(path.read_text())["job"] is None
    held.release()
    _in_job(monkeypatch, "5001", restart=3)
    monkeypatch.setenv("RLHF_JOB_ID", "k8s/rlhf-7f3a")  # wins over Slurm's
    held = claims.claim(tmp_path, 300)
    assert json.loads(path.read_text())["job"] == {"scheduler": "other", "id": "k8s/rlhf-7f3a", "restart": 0}
    held.release()

    # restart 0 of that job left a claim from another machine; its restart 1 takes it over at once
    _foreign(tmp_path, heartbeat_age=0)
    path.write_text(json.dumps(json.loads(path.read_text()) | {"job": {"scheduler": "other", "id": "k8s/rlhf-7f3a",
                                                                       "restart": 0}}), encoding="utf-8")
    monkeypatch.setenv("RLHF_JOB_RESTART", "1")
    claims.claim(tmp_path, 300).release()
    monkeypatch.setenv("RLHF_JOB_RESTART", "one")
    with pytest.raises(ClaimError) as refused:
        claims.claim(tmp_path, 300)
    assert str(refused.value) == ("RLHF_JOB_RESTART='one' is not a whole number; set it to how many times job "
                                  "k8s/rlhf-7f3a was restarted (0 on its first run), or unset it")
    assert not path.exists()
