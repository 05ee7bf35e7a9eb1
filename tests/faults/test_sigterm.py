"""Graceful stop: SIGTERM (what Slurm, Kubernetes and `docker stop` send before a kill) and SIGUSR1 (an early
warning, `sbatch --signal=USR1@120`) finish the current step on every rank, save a checkpoint at that step, and
end the command with 128 + the signal's number (143, 138) and "resume with the same command"; running the same
command again resumes there and reaches the full step count. A stage script relays the signal to its ranks
and keeps the log until they are done; output whose reader is gone never stops a rank.
(PPO: tests/stages/test_ppo.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from faultkit import (
    FAULTY_CLI,
    ROOT,
    TermAtStep,
    cfg_of,
    cli_env,
    error_lines,
    extra_callback,
    fake_stage,
    logged_steps,
    manifest_step,
    tiny_raw,
    write_cfg,
)

from rlhf import artifacts, cli
from rlhf.errors import StopRequested
from rlhf.stages import run_stage

sys.path.insert(0, str(ROOT / "tests" / "distributed"))
from launch import cpu_rank_env, free_port  # noqa: E402

pytestmark = pytest.mark.slow
LAUNCH_VARS = ("NUM_GPUS", "NNODES", "NODE_RANK", "HOSTFILE", "LAUNCHER", "MASTER_ADDR", "MASTER_PORT", "LOG_DIR")


def stop_line(stage: str, sig: str, step: int, ckpts: Path) -> str:
    return f"{stage}: stopped on {sig} at step {step} after saving a checkpoint in {ckpts}; resume with the same command"


def test_sigusr1_with_stdout_gone_saves_exits_138_and_resumes(tmp_path, rlhf_cache, caplog):
    """One process, progress bars on, its stdout a pipe whose reader exited before the first line (as when the
    `tee` of a signalled process group dies): the Trainer's log lines fail with EPIPE and are dropped, training
    goes on, and SIGUSR1 stops it like SIGTERM, with exit 138."""
    raw = tiny_raw(tmp_path, final_stage=None)
    raw["logging"]["progress"] = True
    config = write_cfg(tmp_path / "cfg.yaml", raw)
    stage_dir = cfg_of(raw).stage_dir("sft")
    ckpts = stage_dir / "checkpoints"
    proc = subprocess.Popen([sys.executable, str(FAULTY_CLI), "sft", "--config", str(config)], cwd=ROOT,
                            env=cli_env(rlhf_cache, "usr1_in_step:3"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader is gone
    stderr = proc.stderr.read()
    assert proc.wait(timeout=300) == 138, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == stop_line("sft", "SIGUSR1", 3, ckpts)
    assert not error_lines(stderr) and "BrokenPipeError" not in stderr
    # Step 3 is not a save step (save_steps 2): the checkpoint is there because of the signal.
    assert artifacts.latest_checkpoint(ckpts).name == "checkpoint-3"
    assert logged_steps(stage_dir, "loss") == [1, 2, 3]  # every step after the first failed print trained
    assert not (stage_dir / artifacts.MANIFEST).exists() and not (stage_dir / "final").exists()

    caplog.set_level("INFO", logger="rlhf")
    run_stage("sft", cfg_of(raw))  # the same command again, in this process (the CLI path is shown above)
    assert f"resuming from {ckpts / 'checkpoint-3'}" in caplog.text
    assert manifest_step(stage_dir) == 8
    assert logged_steps(stage_dir, "loss") == list(range(1, 9))


@pytest.mark.parametrize("stage", ["reward", "dpo"])
def test_sigterm_in_process_stops_then_resumes(stage, tmp_path, rlhf_cache, tiny_model_dir):
    raw = tiny_raw(tmp_path, final_stage="dpo" if stage == "dpo" else None)
    raw["reward"]["base_model"] = str(tiny_model_dir)
    cfg = cfg_of(raw)
    if stage == "dpo":
        fake_stage(cfg.run.dir, "sft", tiny_model_dir)
    handlers_before = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)]
    with extra_callback(TermAtStep(5)), pytest.raises(StopRequested, match=f"{stage}: stopped on SIGTERM at step 5 "
                                                      ".*resume with the same command") as stopped:
        run_stage(stage, cfg)
    assert stopped.value.exit_code == 143
    # the stage's handlers are gone again
    assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)] == handlers_before
    ckpts = cfg.stage_dir(stage) / "checkpoints"
    assert [p.name for p in artifacts.list_checkpoints(ckpts)] == ["checkpoint-4", "checkpoint-5"]
    assert not (cfg.stage_dir(stage) / artifacts.MANIFEST).exists()

    run_stage(stage, cfg)
    assert manifest_step(cfg.stage_dir(stage)) == 8
    assert logged_steps(cfg.stage_dir(stage), "loss") == list(range(1, 9))


def _signal_session(sid: int, signum: int) -> list[str]:
    """`signum` to every process of session `sid`, as Slurm signals every process of a job step."""
    names = []
    for proc in psutil.process_iter(["name"]):
        try:
            if os.getsid(proc.pid) == sid:
                os.kill(proc.pid, signum)
                names.append(proc.info["name"])
        except (ProcessLookupError, PermissionError):
            pass
    return names


def _kill_session(sid: int) -> None:
    """After a failed test: nothing this test started may outlive it."""
    _signal_session(sid, signal.SIGKILL)


@pytest.mark.distributed
def test_stage_script_sigterm_and_sigusr1_save_and_resume(tmp_path, rlhf_cache):
    """`NUM_GPUS=2 bash stages/01_sft.sh` (deepspeed launcher, 2 CPU ranks), SIGTERM to every process of the
    run mid-training (bash, the log's tee, both launcher processes, both ranks): every rank saves the same
    step well within the launcher's 30 s, the log has the stop line, the script exits 143; the same command
    resumes from that checkpoint; SIGUSR1 to the script alone (as `sbatch --signal=B:USR1@120` signals the
    batch shell), relayed by it, stops it the same way with 138. (A resumed run reaching the full step count:
    the other tests here.)

    The ranks are held at the start of the step the test signals in (tests/faults/ranksite), so the stop
    lands on that step: a 70 ms step could otherwise run to the end on a loaded machine first."""
    raw = tiny_raw(tmp_path, final_stage=None)
    raw["sft"].update({"max_steps": 20, "save_steps": 1000})  # the only checkpoints before the end: the stops'
    raw["logging"]["progress"] = True
    config = write_cfg(tmp_path / "cfg.yaml", raw)
    stage_dir = cfg_of(raw).stage_dir("sft")
    ckpts, log = stage_dir / "checkpoints", cfg_of(raw).run.dir / "logs" / "sft.log"
    env = cpu_rank_env(**cli_env(rlhf_cache), NUM_GPUS="2", PY=sys.executable, PREFLIGHT="0",  # tested elsewhere
                       PYTHONPATH=os.pathsep.join([str(ROOT / "tests" / "faults" / "ranksite"),
                                                   os.environ.get("PYTHONPATH", "")]))
    for key in LAUNCH_VARS[1:]:
        env.pop(key, None)

    def launch(name: str, held_at: int | None = None) -> subprocess.Popen:
        fault = {"RLHF_FAULT": f"wait_in_step:{held_at}", "RLHF_FAULT_GATE": str(tmp_path / f"{name}.gate")}
        with open(tmp_path / f"{name}.out", "w") as terminal:  # a file, as Slurm's slurm-<id>.out
            return subprocess.Popen(["bash", "stages/01_sft.sh", str(config)], cwd=ROOT,
                                    env={**env, "MASTER_PORT": str(free_port()), **(fault if held_at else {})},
                                    stdout=terminal, stderr=subprocess.STDOUT, start_new_session=True)

    proc = launch("first", held_at=3)
    try:
        _wait_until_held(proc, tmp_path / "first")
        signalled = time.monotonic()
        names = _signal_session(proc.pid, signal.SIGTERM)
        (tmp_path / "first.gate").touch()
        assert proc.wait(timeout=60) == 143, (tmp_path / "first.out").read_text()[-3000:]
        took = time.monotonic() - signalled
    finally:
        _kill_session(proc.pid)
    assert {"bash", "tee"} <= set(names) and len(names) >= 6  # bash x2, tee, runner, launch.py, 2 ranks
    assert took < 30, f"the stop took {took:.1f} s; the launcher kills its ranks 30 s after a SIGTERM"
    assert [p.name for p in artifacts.list_checkpoints(ckpts)] == ["checkpoint-3"] and \
        (ckpts / "checkpoint-3" / artifacts.COMPLETE_MARKER).exists()
    assert stop_line("sft", "SIGTERM", 3, ckpts) in log.read_text() and "BrokenPipeError" not in log.read_text()
    assert not (stage_dir / artifacts.MANIFEST).exists()

    proc = launch("again", held_at=6)
    try:
        _wait_until_held(proc, tmp_path / "again")
        _usr1_to_the_script(proc.pid)
        (tmp_path / "again.gate").touch()
        assert proc.wait(timeout=60) == 138, (tmp_path / "again.out").read_text()[-3000:]
    finally:
        _kill_session(proc.pid)
    assert "resuming from " + str(ckpts / "checkpoint-3") + " (step 3)" in log.read_text()
    assert artifacts.latest_checkpoint(ckpts).name == "checkpoint-6"
    assert stop_line("sft", "SIGUSR1", 6, ckpts) in log.read_text()
    assert not (stage_dir / artifacts.MANIFEST).exists()

    assert logged_steps(stage_dir, "loss") == list(range(1, 7))  # each resumed run logged from its checkpoint on


def _wait_until_held(proc: subprocess.Popen, gate: Path) -> None:
    """Until a rank waits at the gate (faulty_cli's wait_in_step; the other rank is at most at that step's
    start: the steps before it end in collectives)."""
    deadline = time.monotonic() + 240
    while not gate.with_name(gate.name + ".gate.waiting").exists():
        assert proc.poll() is None, f"the run ended before the held step: {gate.with_suffix('.out')}"
        assert time.monotonic() < deadline, "the held step not reached within 240 s"
        time.sleep(0.1)


def _usr1_to_the_script(sid: int) -> None:
    """SIGUSR1 to the script (the leader of session `sid`) alone; returns once its relay has reached the
    launcher's process group, which the ranks share: DeepSpeed's runner and launch.py do not handle SIGUSR1,
    so they end on it."""
    launchers = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if ("deepspeed.launcher.runner" in cmd or "deepspeed.launcher.launch" in cmd) and os.getsid(proc.pid) == sid:
            launchers.append(proc)
    assert len(launchers) == 2, launchers
    os.kill(sid, signal.SIGUSR1)
    deadline = time.monotonic() + 30
    while any(_running(proc) for proc in launchers):
        assert time.monotonic() < deadline, "the launcher was still running 30 s after SIGUSR1 reached the script"
        time.sleep(0.05)


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


FAKE_RANK = """import os, signal, sys, time
got = []
for s in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(s, lambda n, f: got.append(n))
print(f"rank pgid {os.getpgid(0)}", flush=True)
open(os.environ["FAKE_READY"], "w").close()
deadline = time.monotonic() + 20
while not got and time.monotonic() < deadline:
    time.sleep(0.02)
time.sleep(0.5)  # finishing its step and saving: the log must still be read
print("rank got " + " ".join(signal.Signals(n).name for n in got), flush=True)
sys.exit(128 + got[0] if got else 0)
"""


@pytest.mark.parametrize("how", ["usr1_to_the_script", "term_to_its_group"])
def test_stage_script_relays_stop_signals_and_keeps_the_log(how, tmp_path):
    """No model: a stand-in for `rlhf.cli` records the signals it gets. SIGUSR1 to the script's pid alone
    (`docker stop` signals PID 1 only) and SIGTERM to the script's process group (`kill -TERM -- -PGID`) both
    reach the rank, once, in a process group of its own; its lines after the signal reach the log; the script
    exits 128 + the signal's number."""
    fake = tmp_path / "python"
    (tmp_path / "rank.py").write_text(FAKE_RANK)
    fake.write_text(f'#!/usr/bin/env bash\nif [ "$1 $2" = "-m rlhf.cli" ]; then exec {sys.executable} '
                    f'{tmp_path / "rank.py"}; fi\nexec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    ready = tmp_path / "ready"
    env = {**os.environ, "PY": str(fake), "FAKE_READY": str(ready), "LOG_DIR": str(tmp_path / "logs"),
           "PREFLIGHT": "0"}  # the stand-in answers every `-m rlhf.cli`: it is the rank here, not a preflight
    for key in LAUNCH_VARS[:-1]:
        env.pop(key, None)
    proc = subprocess.Popen(["bash", "stages/01_sft.sh", "configs/tiny.yaml"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.02)
        if how == "usr1_to_the_script":
            proc.send_signal(signal.SIGUSR1)
        else:
            os.killpg(proc.pid, signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
    finally:
        _kill_session(proc.pid)
    sig = "SIGUSR1" if how == "usr1_to_the_script" else "SIGTERM"
    assert proc.returncode == 128 + getattr(signal, sig), out
    log = (tmp_path / "logs" / "sft.log").read_text()
    assert log.splitlines()[-1] == f"rank got {sig}" and out == log
    assert int(log.split()[2]) != proc.pid  # the rank's process group is its own, not the script's


def test_torchrun_relays_sigusr1_to_its_workers():
    cmd = subprocess.run(["bash", "-c", 'source stages/lib.sh && rlhf_launcher && printf "%s\\n" "${LAUNCH[@]}"'],
                         cwd=ROOT, env={**os.environ, "LAUNCHER": "torchrun", "NUM_GPUS": "2", "PY": "py"},
                         capture_output=True, text=True, check=True).stdout.split()
    assert "SIGUSR1" in cmd[cmd.index("--signals-to-handle") + 1].split(",")


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGUSR1, 138)])
def test_a_stop_ends_rlhf_pipeline_with_128_plus_the_signal(signum, code, tmp_path, monkeypatch, capsys):
    """`rlhf pipeline && rlhf eval` must not go on after a stop: non-zero, yet no `error:` line and no failure
    announced to the other ranks (they stopped alike)."""
    from rlhf import failwatch, stages

    config = write_cfg(tmp_path / "cfg.yaml", tiny_raw(tmp_path))
    message = stop_line("sft", signal.Signals(signum).name, 3, tmp_path)

    def stopped(*args, **kwargs):
        raise StopRequested(message, signum)

    announced = []
    monkeypatch.setattr(stages, "run_pipeline", stopped)
    monkeypatch.setattr(failwatch, "announce", announced.append)
    monkeypatch.setattr(cli, "_setup_logging", lambda: None)  # no handler on this process's root logger
    assert cli.main(["pipeline", "--config", str(config)]) == code
    assert capsys.readouterr().err.strip().splitlines()[-1] == message
    assert announced == []
