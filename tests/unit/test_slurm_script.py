"""The Slurm script (`stages/slurm/stage.sbatch`) without Slurm: its #SBATCH flags, and what it does when run
with stand-ins for `srun`, `scancel` and `scontrol` on PATH.

The stand-in srun runs the one task in a session of its own and, once the task's first process has ended,
SIGKILLs whatever is left of it, as slurmstepd ends a step; its scancel sends the signal to every process
of that session, as Slurm signals every process of a step. The "stage" keeps the contract of the stage
scripts (stages/lib.sh): on SIGUSR1 it waits for its Python "rank", which takes a while to save, and exits
138 (128 + SIGUSR1).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SBATCH = ROOT / "stages" / "slurm" / "stage.sbatch"

FAKE_SRUN = """#!PYTHON
import json, os, signal, subprocess, sys
fake = os.environ["FAKE_DIR"]
args = sys.argv[1:]
while args and args[0].startswith("-"):  # srun's own options
    args.pop(0)
keys = ("NNODES", "MASTER_ADDR", "MASTER_PORT", "NUM_GPUS", "SRUN_CPUS_PER_TASK", "OMP_NUM_THREADS")
with open(os.path.join(fake, "srun.json"), "w") as fh:
    json.dump({k: os.environ.get(k) for k in keys}, fh)
task = subprocess.Popen(args, env={**os.environ, "SLURM_NODEID": "0"}, start_new_session=True)
with open(os.path.join(fake, "pgid"), "w") as fh:
    fh.write(str(task.pid))
code = task.wait()
try:
    os.killpg(task.pid, signal.SIGKILL)  # the step ends with its task: what is left of it is killed
except ProcessLookupError:
    pass
sys.exit(code if code >= 0 else 128 - code)
"""
FAKE_SCANCEL = """#!/usr/bin/env bash
echo "scancel $*" >> "$FAKE_DIR/calls"
sig=TERM
for arg in "$@"; do case $arg in --signal=*) sig=${arg#--signal=} ;; esac; done
kill -s "$sig" -- "-$(cat "$FAKE_DIR/pgid")"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
if [ "$1" = show ]; then printf 'node-a\\nnode-b\\n'; else echo "scontrol $*" >> "$FAKE_DIR/calls"; fi
"""
STAGE = """#!/usr/bin/env bash
set -euo pipefail
stopped=0
trap 'stopped=1' USR1
"$RANK_PY" "$FAKE_DIR/rank.py" "$@" &
rank=$!
status=0
wait "$rank" || status=$?
while kill -0 "$rank" 2>/dev/null; do status=0; wait "$rank" || status=$?; done
if [ "$stopped" = 1 ]; then exit 138; fi
exit "$status"
"""
RANK = """
import os, signal, sys, time
fake = os.environ["FAKE_DIR"]
if sys.argv[1] == "fail":
    sys.exit(3)
stop = []
signal.signal(signal.SIGUSR1, lambda *_: stop.append(1))
open(os.path.join(fake, "ready"), "w").close()
while not stop:
    time.sleep(0.05)
time.sleep(1.0)  # saving a checkpoint
with open(os.path.join(fake, "calls"), "a") as fh:
    fh.write("rank saved\\n")
"""


def _sbatch_lines() -> list[str]:
    return [line.split(None, 1)[1].strip() for line in SBATCH.read_text().splitlines() if line.startswith("#SBATCH")]


def test_sbatch_flags_requeue_on_time_limit_and_append_to_one_log():
    flags = _sbatch_lines()
    assert "--requeue" in flags and "--open-mode=append" in flags
    # B: sends USR1 to the batch shell only: the ranks would die of an untrapped USR1
    assert "--signal=B:USR1@120" in flags
    text = SBATCH.read_text()
    assert re.search(r"^trap on_time_limit USR1$", text, re.M)
    assert 'export SRUN_CPUS_PER_TASK=' in text and "OMP_NUM_THREADS" in text


def test_bash_syntax_is_clean():
    proc = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr


def _fakes(tmp_path: Path) -> tuple[dict[str, str], Path]:
    fake = tmp_path / "fake"
    (fake / "bin").mkdir(parents=True)
    for name, body in (("srun", FAKE_SRUN.replace("PYTHON", sys.executable)), ("scancel", FAKE_SCANCEL),
                       ("scontrol", FAKE_SCONTROL)):
        (fake / "bin" / name).write_text(body)
        (fake / "bin" / name).chmod(0o755)
    (fake / "stage.sh").write_text(STAGE)
    (fake / "rank.py").write_text(RANK)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SRUN_", "OMP_", "MASTER_"))
           and k not in ("NNODES", "NUM_GPUS")}
    env.update({"PATH": f"{fake / 'bin'}:{os.environ['PATH']}", "FAKE_DIR": str(fake), "RANK_PY": sys.executable,
                "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_JOB_ID": "1234567", "SLURM_JOB_NUM_NODES": "2",
                "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_CPUS_PER_TASK": "32", "SLURM_GPUS_ON_NODE": "8"})
    return env, fake


def _calls(fake: Path) -> list[str]:
    path = fake / "calls"
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.timeout(60)
def test_usr1_stops_the_stage_lets_it_save_then_requeues_the_job(tmp_path):
    env, fake = _fakes(tmp_path)
    proc = subprocess.Popen(["bash", str(SBATCH), str(fake / "stage.sh"), "wait"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (fake / "ready").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # Slurm, 120 s before the time limit
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 138, err  # the stage's status: stopped on SIGUSR1
    # USR1 passed on to the step (never the batch shell); the rank saved; only then the requeue
    assert _calls(fake) == ["scancel --signal=USR1 1234567", "rank saved", "scontrol requeue 1234567"]
    assert "rlhf: Slurm job 1234567, restart 0" in err and "requeueing" in err


def test_a_failing_stage_fails_the_job_without_a_requeue(tmp_path):
    env, fake = _fakes(tmp_path)
    proc = subprocess.run(["bash", str(SBATCH), str(fake / "stage.sh"), "fail"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert _calls(fake) == []


@pytest.mark.parametrize("job_id", ["1", "12767", "2767", "99999", "123456789"])
def test_master_port_is_below_the_ephemeral_range_and_cpus_reach_the_ranks(tmp_path, job_id):
    env, fake = _fakes(tmp_path)
    env["SLURM_JOB_ID"] = job_id
    proc = subprocess.run(["bash", str(SBATCH), str(fake / "stage.sh"), "fail"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    seen = json.loads((fake / "srun.json").read_text())
    assert 20000 <= int(seen["MASTER_PORT"]) <= 29999  # Linux picks outgoing ports from 32768 up
    assert seen | {"MASTER_PORT": None} == {"NNODES": "2", "MASTER_ADDR": "node-a", "MASTER_PORT": None,
                                           "NUM_GPUS": "8", "SRUN_CPUS_PER_TASK": "32", "OMP_NUM_THREADS": "4"}


def test_threads_and_port_set_by_the_user_win(tmp_path):
    env, fake = _fakes(tmp_path)
    env.update({"OMP_NUM_THREADS": "2", "MASTER_PORT": "23456", "NUM_GPUS": "64"})
    subprocess.run(["bash", str(SBATCH), str(fake / "stage.sh"), "fail"], env=env, capture_output=True, timeout=60)
    seen = json.loads((fake / "srun.json").read_text())
    assert (seen["OMP_NUM_THREADS"], seen["MASTER_PORT"]) == ("2", "23456")
    env.pop("OMP_NUM_THREADS")
    subprocess.run(["bash", str(SBATCH), str(fake / "stage.sh"), "fail"], env=env, capture_output=True, timeout=60)
    assert json.loads((fake / "srun.json").read_text())["OMP_NUM_THREADS"] == "1"  # 32 CPUs for 64 ranks: 1 each
