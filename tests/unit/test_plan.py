"""`rlhf plan` memory model (hand-worked numbers), parameter counts from config.json, suggestions, the
8B configs, and preflight's fit and multi-node launch checks. The comparison with a measured 2-rank
ZeRO-3 run is in tests/distributed/test_two_nodes.py."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from rlhf import plan, preflight
from rlhf.cli import main
from rlhf.config import ZeroRoleCfg, load_config

ROOT = Path(__file__).resolve().parents[2]
LLAMA3_8B = "configs/llama3-8b/ppo_1x8.yaml"
ARCH = plan.Arch(source="test", lm_params=1000, cls_params=900, layers=2, hidden=8, intermediate=16, vocab=50,
                 kv_heads=2, head_dim=4, largest_layer=100)


def test_trained_model_state_zero3_bf16():
    # P=1000 bf16 on N=4: weights 2*1000/4=500, grads 500, master 4*1000/4=1000, adam 8*1000/4=2000,
    # prefetch buffers 2 layers x 100 x 2 bytes = 400
    m = plan.model_memory("actor", 1000, ARCH, ZeroRoleCfg(3, False, False), trained=True, world=4, dtype_bytes=2)
    assert (m.weights, m.grads, m.optimizer, m.working, m.cpu) == (500, 500, 3000, 400, 0)
    assert (m.local_param_numel, m.local_optim_numel) == (250, 500)


def test_offload_and_low_stages():
    # ZeRO-2 + offload_optimizer: full bf16 weights 2000 stay; master+adam 12*1000/4=3000 and the grad
    # partition 500 move to CPU
    m = plan.model_memory("actor", 1000, ARCH, ZeroRoleCfg(2, False, True), trained=True, world=4, dtype_bytes=2)
    assert (m.weights, m.grads, m.optimizer, m.cpu) == (2000, 0, 0, 3500)
    # ZeRO-0 fp32 (plain torch/DeepSpeed stage 0): no master copy, full adam 8000, full grads 4000
    m = plan.model_memory("actor", 1000, ARCH, ZeroRoleCfg(0, False, False), trained=True, world=4, dtype_bytes=4)
    assert (m.weights, m.grads, m.optimizer) == (4000, 4000, 8000)
    # a frozen model under ZeRO-2 is not sharded (the engine runs it at stage 0); ZeRO-3 + offload_param: all on CPU
    m = plan.model_memory("ref", 1000, ARCH, ZeroRoleCfg(2, False, False), trained=False, world=4, dtype_bytes=2)
    assert (m.zero_stage, m.weights, m.optimizer) == (0, 2000, 0)
    m = plan.model_memory("ref", 1000, ARCH, ZeroRoleCfg(3, True, False), trained=False, world=4, dtype_bytes=2)
    assert (m.weights, m.cpu) == (0, 500)


def test_tiny_alias_counts_match_the_built_models(rlhf_cache, tiny_model_dir, tiny_reward_dir):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    arch = plan.architecture("tiny-random")
    assert arch.source.endswith("config.json")
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_reward_dir)
    assert arch.lm_params == sum(p.numel() for p in lm.parameters())
    assert arch.cls_params == sum(p.numel() for p in rm.parameters())


def test_llama3_8b_from_the_known_table():
    arch = plan.architecture("meta-llama/Meta-Llama-3-8B-Instruct")
    assert arch.lm_params == 8_030_261_248 and arch.cls_params == 7_504_928_768
    assert (arch.layers, arch.kv_heads, arch.head_dim) == (32, 8, 128)


def test_suggestions_are_the_cheapest_that_fit():
    cfg = load_config(ROOT / LLAMA3_8B)
    arch = plan.architecture(cfg.model.name_or_path)
    assert plan.estimate(cfg, gpus=8, arch=arch).fits(80)
    sets, _ = plan.suggest(cfg, gpus=8, nodes=1, gpu_mem_gib=40, arch=arch)
    assert "offload_optimizer=true" in sets and "zero_stage=3" in sets
    sets, _ = plan.suggest(cfg, gpus=8, nodes=1, gpu_mem_gib=2000, arch=arch)
    assert "zero_stage=0" in sets
    assert plan.suggest(cfg, gpus=1, nodes=1, gpu_mem_gib=24, arch=arch) is None
    # the rollout gathers the whole 16 GB actor, so 24 GiB never suffices; 40 GiB with full offload does
    assert plan.min_nodes(cfg, gpu_mem_gib=24, arch=arch, gpus_per_node=1) is None
    assert plan.min_nodes(cfg, gpu_mem_gib=40, arch=arch, gpus_per_node=1) == 1


@pytest.mark.parametrize("path, gpus, nodes", [(LLAMA3_8B, 8, 1), ("configs/llama3-8b/ppo_4x8.yaml", 8, 4)])
def test_plan_prints_every_model_of_the_8b_configs(capsys, path, gpus, nodes):
    code = main(["plan", "--config", str(ROOT / path), "--gpus", str(gpus), "--nodes", str(nodes), "--gpu-mem", "80"])
    out = capsys.readouterr().out
    assert code == 0, out
    for role in ("actor", "critic", "ref", "reward"):
        assert any(line.startswith(role) and "8.03B" in line or "7.50B" in line for line in out.splitlines())
    assert "GiB per GPU" in out and "configured settings fit in 80 GiB" in out


def test_plan_json_and_nonfit_exit_code(capsys, rlhf_cache):
    assert main(["plan", "--config", str(ROOT / "configs/tiny.yaml"), "--gpus", "2", "--json"]) == 0
    est = json.loads(capsys.readouterr().out)
    assert [m["role"] for m in est["models"]] == ["actor", "critic", "ref", "reward"]
    assert main(["plan", "--config", str(ROOT / LLAMA3_8B), "--gpus", "1", "--gpu-mem", "24"]) == 2
    assert "nothing fits" in capsys.readouterr().out


def test_preflight_blocks_a_launch_that_cannot_fit(monkeypatch):
    cfg = load_config(ROOT / LLAMA3_8B)
    assert preflight.check_fit(cfg, {}) == []  # no GPU memory given (CPU): never blocks
    assert preflight.check_fit(cfg, {"RLHF_GPU_MEM_GIB": "80", "NUM_GPUS": "8"}) == []
    (blocker,) = preflight.check_fit(cfg, {"RLHF_GPU_MEM_GIB": "40", "NUM_GPUS": "8"})
    assert blocker.code == "plan.no_fit" and "offload_optimizer=true" in blocker.message


def test_launch_checks_port_hostfile_master(tmp_path):
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        (b,) = preflight.check_launch({"NUM_GPUS": "2", "MASTER_PORT": str(port)})
        assert b.code == "launch.port_busy"
        # node 1 sees the master answering on that port: reachable
        assert preflight.check_launch({"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                                       "MASTER_PORT": str(port)}, run_dir=tmp_path) == []
    # closed port: refused, so the host is reachable and rank 0 is simply not up yet
    assert preflight.check_launch({"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": str(port)}, run_dir=tmp_path) == []
    (b,) = preflight.check_launch({"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "no-such-host.invalid"},
                                  run_dir=tmp_path)
    assert b.code == "launch.master_unresolvable"
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost slots=2\n# comment\nno-such-host.invalid slots=8\n")
    codes = [b.code for b in preflight.check_launch({"HOSTFILE": str(hosts), "MASTER_PORT": str(port)})]
    assert codes == ["launch.host_unresolvable"]


def test_versions_must_match_across_nodes(tmp_path):
    where = tmp_path / "launch"
    assert preflight.check_versions(where, 0, 2) == []
    assert (where / "versions-node0.json").is_file()
    assert preflight.check_versions(where, 1, 2) == []  # same machine, same versions
    other = json.loads((where / "versions-node0.json").read_text())
    other["torch"] = "0.0.1"
    (where / "versions-node0.json").write_text(json.dumps(other))
    (b,) = preflight.check_versions(where, 1, 2)
    assert b.code == "launch.version_mismatch" and "torch" in b.message and "0.0.1" in b.message
    (where / "versions-node5.json").write_text(json.dumps(other))  # beyond NNODES: a stale file, ignored
    (where / "versions-node0.json").unlink()
    assert preflight.check_versions(where, 1, 2) == []
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps(other))
    assert preflight.check_versions(None, 1, 2, reference=str(ref))[0].code == "launch.version_mismatch"


def test_check_runs_launch_checks_only_with_launch_env(tmp_path, monkeypatch, rlhf_cache):
    monkeypatch.chdir(ROOT)
    cfg = load_config(ROOT / "configs/tiny.yaml", [f"run.output_dir={tmp_path}"])
    for key in ("NUM_GPUS", "NNODES", "HOSTFILE", "LAUNCHER", "MASTER_ADDR", "LOCAL_RANK", "RLHF_GPU_MEM_GIB"):
        monkeypatch.delenv(key, raising=False)
    assert preflight.check(cfg) == []
    monkeypatch.setenv("NNODES", "2")
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "no-such-host.invalid")
    assert [b.code for b in preflight.check(cfg)] == ["launch.master_unresolvable"]
    monkeypatch.setenv("LOCAL_RANK", "0")  # inside a launch the rank processes skip these checks
    assert preflight.check(cfg) == []


def test_reused_rollout_forward_holds_both_training_graphs_in_the_experience_phase():
    # with the reuse, the experience phase adds one micro-batch of actor (with logits) and critic training
    # activations to its inference forward; without it, only the inference forward remains
    cfg = load_config(ROOT / LLAMA3_8B)
    cfg.ppo.reuse_rollout_forward = False
    off = plan.estimate(cfg, gpus=8, nodes=1).phases
    cfg.ppo.reuse_rollout_forward = True
    on = plan.estimate(cfg, gpus=8, nodes=1).phases
    assert on["update"] == off["update"] and on["rollout"] == off["rollout"]
    assert on["experience"] > off["experience"] + on["update"]  # actor graph (= update's) plus the critic's
