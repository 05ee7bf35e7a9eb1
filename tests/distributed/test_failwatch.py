"""A rank that fails on one node stops the ranks of the other nodes within seconds (rlhf.failwatch).

Two "nodes" on loopback, one CPU rank each, each started by its own `deepspeed --no_ssh` launcher, as on
a cluster: a launcher only watches its own node's ranks. Rank 1 raises in PPO step 2's update; rank 0 goes
on into that update's collectives. Without the watcher, gloo fails rank 0's collective once rank 1's
process has gone ("Connection closed by peer", no word of the cause); NCCL would wait for its timeout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from launch import cpu_rank_env, free_port, ppo_config  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def test_a_failure_on_one_node_stops_the_other_node(tmp_path, tiny_model_dir, tiny_reward_dir):
    config = ppo_config(tmp_path, tiny_model_dir, tiny_reward_dir, zero_stage=2,
                        ppo={"steps": 3, "mini_batch_size": 4, "grad_accum": 1, "save_steps": 10, "sample_every": 10})
    start = time.monotonic()
    procs, outs = _two_nodes(tmp_path, config, "fail_on_rank:1:2", timeout=180)
    assert len(outs) == 2, "a node was still running 180 s after the start (waiting in a collective)"
    assert "injected failure on rank 1 at step 2" in outs[1]
    assert procs[1].returncode != 0 and procs[0].returncode != 0
    # node 0 learnt of rank 1's error and stopped at once, with rank 1's message
    assert "rank 1 failed: OSError: injected failure on rank 1 at step 2; stopping rank 0 too" in outs[0], outs[0][-3000:]
    assert time.monotonic() - start < 180


def test_a_preflight_blocker_on_one_node_stops_every_node_before_loading(tmp_path, tiny_model_dir, tiny_reward_dir):
    """Rank 1 alone finds a blocker (as a data file missing from one node's disk). It used to raise before the
    process group existed, and node 0 waited at the rendezvous until run.collective_timeout_s (30 min); now
    the roll call stops both nodes within seconds, each naming rank 1's blocker, before any weights load."""
    config = ppo_config(tmp_path, tiny_model_dir, tiny_reward_dir, zero_stage=2,
                        ppo={"steps": 3, "mini_batch_size": 4, "grad_accum": 1, "save_steps": 10, "sample_every": 10})
    procs, outs = _two_nodes(tmp_path, config, "blocker_on_rank:1", timeout=120)
    assert len(outs) == 2, "a node was still waiting 120 s after the start"
    blocker = "[data.missing] rank 1 on "
    for node, out in enumerate(outs):
        assert procs[node].returncode != 0
        assert blocker in out and "is not on rank 1's disk" in out, out[-3000:]
    assert "roll call: 2 rank(s) on 2 node(s), all answered" in outs[0]
    assert "node1: host " in outs[0] and "one all-reduce: gloo " in outs[0]


def _two_nodes(tmp_path: Path, config: Path, fault: str, *, timeout: float):
    """PPO under `fault` on two loopback nodes, one rank each, each node's own `deepspeed --no_ssh`; returns
    (processes, outputs of those that ended within `timeout`). Whatever is still running is killed."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = free_port()
    env = cpu_rank_env(RLHF_FAULT=fault)
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--no_ssh", "--hostfile", str(hostfile),
               "--num_nodes", "2", "--node_rank", str(node), "--master_addr", "127.0.0.1",
               "--master_port", str(port), "--num_gpus", "1", str(ROOT / "tests" / "faults" / "faulty_cli.py"),
               "ppo", "--config", str(config)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True))
    outs = []
    try:
        for proc in procs:
            outs.append(proc.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:  # the whole launcher session: launcher and its rank
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return procs, outs
