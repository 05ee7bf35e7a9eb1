"""One run per stage dir, end to end: a second start on a live run (the same command, `--restart`, the
pipeline) is refused with one line and touches nothing; a claim from another machine is honoured while its
heartbeat is fresh and taken over once it is older than `run.claim_timeout_s`, and the stage resumes.
(A SIGKILLed run's claim being taken over: test_kill_resume.py; claims on 2 ranks: tests/unit/test_claims.py
and tests/distributed/test_sft_deepspeed_files.py.)"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from faultkit import (
    FAULTY_CLI,
    ROOT,
    TermAtStep,
    cfg_of,
    cli_env,
    error_lines,
    extra_callback,
    logged_steps,
    manifest_step,
    run_cli,
    tiny_raw,
    write_cfg,
)

from rlhf import artifacts, claims
from rlhf.errors import ClaimError, StopRequested
from rlhf.stages import run_pipeline, run_stage

pytestmark = pytest.mark.slow


def _snapshot(stage_dir: Path) -> dict[str, tuple[int, int]]:
    """Every file of the stage dir but the claim (its heartbeat touches it) with its size and mtime."""
    return {p.relative_to(stage_dir).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(stage_dir.rglob("*")) if p.is_file() and p.name != claims.CLAIM}


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.1)


def test_a_second_start_on_a_live_run_is_refused_and_the_run_finishes_intact(tmp_path, rlhf_cache):
    raw = tiny_raw(tmp_path, final_stage=None)
    config = write_cfg(tmp_path / "cfg.yaml", raw)
    stage_dir = cfg_of(raw).stage_dir("sft")
    gate = tmp_path / "gate"
    env = {**cli_env(rlhf_cache, "wait_in_step:5"), "RLHF_FAULT_GATE": str(gate)}
    first = subprocess.Popen([sys.executable, str(FAULTY_CLI), "sft", "--config", str(config)], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(gate.with_name("gate.waiting"), first)  # held inside step 5: checkpoints 2 and 4 are saved
        before = _snapshot(stage_dir)
        assert "checkpoints/checkpoint-4/checkpoint.complete" in before
        started = json.loads((stage_dir / claims.CLAIM).read_text())["started"]
        line = (f"{stage_dir} is in use by pid {first.pid} on {socket.gethostname()} since "
                f"{claims._clock(started)}; wait for it, or stop it")
        # The same command with --restart (which would delete the checkpoints): one line, exit 2.
        second = run_cli(["sft", "--config", str(config), "--restart"], rlhf_cache)
        assert second.returncode == 2, second.stderr[-3000:]
        assert error_lines(second.stderr) == [f"error: {line}"] and "Traceback" not in second.stderr
        # The pipeline (in this process, to save a start-up), also with --restart: the same refusal.
        with pytest.raises(ClaimError) as refused:
            run_pipeline(cfg_of(raw), restart=True)
        assert str(refused.value) == line
        assert _snapshot(stage_dir) == before  # not a file written, changed or deleted
    finally:
        gate.touch()
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert manifest_step(stage_dir) == 8
    assert logged_steps(stage_dir, "loss") == list(range(1, 9))  # one run's steps, once each
    ckpts = sorted(p.name for p in (stage_dir / "checkpoints").glob("checkpoint-*"))
    assert ckpts == [p.name for p in artifacts.list_checkpoints(stage_dir / "checkpoints")] == \
        ["checkpoint-6", "checkpoint-8"]
    assert not (stage_dir / claims.CLAIM).exists()  # released at the end


def test_another_machines_claim_is_honoured_until_its_heartbeat_times_out_then_the_stage_resumes(
        tmp_path, rlhf_cache, caplog):
    raw = tiny_raw(tmp_path, final_stage=None)
    raw["run"]["claim_timeout_s"] = 600
    cfg = cfg_of(raw)
    stage_dir = cfg.stage_dir("sft")
    with extra_callback(TermAtStep(5)), pytest.raises(StopRequested):
        run_stage("sft", cfg)  # stopped after saving checkpoint-5
    assert not (stage_dir / claims.CLAIM).exists()  # a SIGTERM stop releases the claim
    # The run went on on node-b (requeued there), whose node then died: its claim stays, written by hand.
    path = stage_dir / claims.CLAIM
    started = time.time() - 600
    path.write_text(json.dumps({"token": "node-b-run", "host": "node-b", "pid": 4242, "machine": "node-b|boot|ns",
                                "started": started, "command": "rlhf sft --config cfg.yaml"}), encoding="utf-8")
    os.utime(path, (time.time() - 30, time.time() - 30))
    before = _snapshot(stage_dir)
    with pytest.raises(ClaimError) as refused:
        run_stage("sft", cfg, restart=True)
    line = re.fullmatch(rf"{re.escape(str(stage_dir))} is in use by pid 4242 on node-b since "
                        rf"{claims._clock(started)} \(last heartbeat (\d+) s ago; taken over after "
                        r"run.claim_timeout_s=600 s without one\); wait for it, or stop it", str(refused.value))
    assert line is not None and 30 <= int(line.group(1)) < 60, str(refused.value)  # seconds: the preflight ran
    assert _snapshot(stage_dir) == before

    os.utime(path, (time.time() - 601, time.time() - 601))
    caplog.set_level(logging.INFO, logger="rlhf")
    run_stage("sft", cfg)
    assert re.search(rf"{re.escape(str(stage_dir))}: taking over the claim of pid 4242 on node-b \(since "
                     rf"{claims._clock(started)}\): its heartbeat stopped 6\d\d s ago \(run.claim_timeout_s=600\)",
                     caplog.text)
    assert f"resuming from {stage_dir / 'checkpoints' / 'checkpoint-5'}" in caplog.text
    assert manifest_step(stage_dir) == 8 and logged_steps(stage_dir, "loss") == list(range(1, 9))
    assert not path.exists()
