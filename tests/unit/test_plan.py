"""`rlhf plan` memory model (hand-worked numbers), parameter counts from config.json (LoRA adapters
included), the reward model's and critic's own architectures, suggestions, the 8B configs, and
preflight's fit and multi-node launch checks. The comparisons with measured runs are in
tests/distributed/test_two_nodes.py (2-rank ZeRO-3, full fine-tuning) and tests/stages/test_plan_measured.py
(LoRA actor and critic)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from rlhf import plan, preflight
from rlhf.cli import main
from rlhf.config import LoraCfg, ZeroRoleCfg, load_config
from rlhf.errors import ModelError

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


def test_reused_rollout_forward_holds_both_training_graphs_in_the_experience_phase_and_the_update():
    # with the reuse, the experience phase adds one micro-batch of actor (with logits) and critic training
    # activations to its inference forward, and the update holds both (the critic's graph waits through
    # the actor's backward); without it, the update holds one model's activations at a time
    cfg = load_config(ROOT / LLAMA3_8B)
    arch = plan.architecture(cfg.model.name_or_path)
    mb, seq = cfg.ppo.micro_batch_size, cfg.data.max_prompt_length + cfg.ppo.max_new_tokens
    actor = plan.train_activations(arch, mb, seq, 2, lm=True)
    critic = plan.train_activations(arch, mb, seq, 2, lm=False)
    cfg.ppo.reuse_rollout_forward = False
    off = plan.estimate(cfg, gpus=8, nodes=1, arch=arch).phases
    cfg.ppo.reuse_rollout_forward = True
    on = plan.estimate(cfg, gpus=8, nodes=1, arch=arch).phases
    assert on["rollout"] == off["rollout"] and off["update"] == max(actor, critic) == actor
    assert on["experience"] == off["experience"] + actor + critic and on["update"] == actor + critic


def test_activations_with_and_without_checkpointing():
    # H=8, L=2, V=50, one row of 10 tokens at 2 bytes: a layer keeps 1*10*8*34*2/2 = 2720 bytes; fp32 LM
    # logits and log-softmax 10*50*4*2 = 4000. Checkpointing keeps each layer's input (10*8*2 = 160, x2)
    # plus one full layer recomputed in the backward: 320 + 2720 = 3040
    assert plan.train_activations(ARCH, 1, 10, 2, lm=False) == 2 * 2720
    assert plan.train_activations(ARCH, 1, 10, 2, lm=True) == 2 * 2720 + 4000
    assert plan.train_activations(ARCH, 1, 10, 2, lm=False, checkpointing=True) == 3040


def test_lora_trains_only_the_adapters():
    # P=1000 held (frozen base + adapters), T=40 trained, bf16 on N=4 under ZeRO-3: weights 2*1000/4=500,
    # grads 2*40/4=20, master 4*40/4=40 + adam 8*40/4=80 = 120; Adam m,v elements 2*40/4=20
    m = plan.model_memory("actor", 1000, ARCH, ZeroRoleCfg(3, False, False), trained=True, world=4, dtype_bytes=2,
                          trained_params=40)
    assert (m.weights, m.grads, m.optimizer, m.local_param_numel, m.local_optim_numel) == (500, 20, 120, 250, 20)
    # ZeRO-0 fp32: full weights 4000, grads 4*40=160, adam 8*40=320 (no master copy)
    m = plan.model_memory("actor", 1000, ARCH, ZeroRoleCfg(0, False, False), trained=True, world=4, dtype_bytes=4,
                          trained_params=40)
    assert (m.weights, m.grads, m.optimizer) == (4000, 160, 320)


@pytest.fixture(scope="module")
def llama3_8b_lora() -> plan.Arch:
    return plan.architecture("meta-llama/Meta-Llama-3-8B-Instruct", LoraCfg(enabled=True, r=16))


def test_llama3_8b_lora_adapter_counts(llama3_8b_lora):
    # r=16 on every linear layer but the LM head: r*(in+out) per layer, hidden 4096, kv 8x128=1024, MLP 14336
    #   q, o 16*(4096+4096)=131072 each; k, v 16*(4096+1024)=81920 each; gate, up, down 16*(4096+14336)=294912 each
    #   = 1,310,720 per layer x 32 = 41,943,040
    adapters = 41_943_040
    assert llama3_8b_lora.lm_lora == plan.LoraCounts(params=8_030_261_248 + adapters, trained=adapters)
    # the classifier also trains its 4096 x 1 score head, a copy peft makes next to the original
    assert llama3_8b_lora.cls_lora == plan.LoraCounts(params=7_504_928_768 + adapters + 4096, trained=adapters + 4096)
    # q_proj and v_proj at r=8: 8*(4096+4096) + 8*(4096+1024) = 106,496 per layer x 32 = 3,407,872
    qv = plan.architecture("meta-llama/Meta-Llama-3-8B-Instruct", LoraCfg(r=8, target_modules=["q_proj", "v_proj"]))
    assert qv.lm_lora.trained == 3_407_872


def test_plan_of_the_8b_config_with_lora_has_the_smaller_optimizer_state(capsys):
    # same ZeRO-3 sharding by 8, so each trained model's optimizer state shrinks by trained/params:
    # actor 41.94M/8.03B = 0.52%, critic (adapters + score head) 41.95M/7.50B = 0.56%; no reference copy
    def plan_json(*sets: str) -> dict:
        args = ["plan", "--config", str(ROOT / LLAMA3_8B), "--gpus", "8", "--json"]
        assert main(args + [x for s in sets for x in ("--set", s)]) == 0
        return {m["role"]: m for m in json.loads(capsys.readouterr().out)["models"]}

    full, lora = plan_json(), plan_json("model.lora.enabled=true")
    assert list(full) == ["actor", "critic", "ref", "reward"] and list(lora) == ["actor", "critic", "reward"]
    assert lora["actor"]["optimizer"] / full["actor"]["optimizer"] == pytest.approx(41_943_040 / 8_030_261_248)
    assert lora["critic"]["optimizer"] / full["critic"]["optimizer"] == pytest.approx(41_947_136 / 7_504_928_768)
    assert full["actor"]["optimizer"] / 2**30 > 11 and lora["actor"]["optimizer"] / 2**30 < 0.1  # GiB per GPU
    assert lora["actor"]["grads"] / full["actor"]["grads"] == pytest.approx(41_943_040 / 8_030_261_248)
    assert lora["actor"]["weights"] > full["actor"]["weights"]  # the frozen base stays, adapters come on top
    # the critic alone can follow LoRA: ppo.critic_lora
    mixed = plan_json("ppo.critic_lora=true")
    assert mixed["actor"]["trained_params"] == mixed["actor"]["params"] == 8_030_261_248
    assert mixed["critic"]["trained_params"] == 41_947_136 and "ref" in mixed


def test_critic_and_reward_model_use_their_own_architecture(tmp_path):
    # reward.base_model (a known 70B id): the reward model and the critic initialised from it are 70B
    # classifiers, the actor and reference stay 8B; critic_init: sft puts the critic back on the policy
    cfg = load_config(ROOT / LLAMA3_8B, [f"run.output_dir={tmp_path}",
                                         "reward.base_model=meta-llama/Meta-Llama-3-70B-Instruct"])
    est = {m.role: m for m in plan.estimate(cfg, gpus=8).models}
    big = plan.architecture("meta-llama/Meta-Llama-3-70B-Instruct").cls_params
    assert est["reward"].params == est["critic"].params == big and est["actor"].params == 8_030_261_248
    assert plan.estimate(cfg, gpus=8, stage="reward").models[0].params == big
    cfg.ppo.critic_init = "sft"
    assert {m.role: m.params for m in plan.estimate(cfg, gpus=8).models}["critic"] == 7_504_928_768
    # the reward stage's output, once it exists, is what PPO loads: its config.json wins
    final = tmp_path / cfg.run.name / "reward" / "final"
    final.mkdir(parents=True)
    small = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "num_labels": 1}
    (final / "config.json").write_text(json.dumps(small))
    cfg.ppo.critic_init = "reward"
    est = plan.estimate(cfg, gpus=8)
    rows = {m.role: m for m in est.models}
    assert rows["reward"].params == rows["critic"].params == plan.architecture(str(final)).cls_params
    assert rows["reward"].arch_source == str(final / "config.json") and f"critic from {final}" in est.arch_source


def test_dpo_with_lora_has_no_reference_copy():
    cfg = load_config(ROOT / LLAMA3_8B)
    assert [m.role for m in plan.estimate(cfg, gpus=8, stage="dpo").models] == ["policy", "ref"]
    cfg.model.lora.enabled = True
    (policy,) = plan.estimate(cfg, gpus=8, stage="dpo").models
    assert policy.trained_params == 41_943_040


def test_auto_dtype_is_planned_as_bf16():
    # a plan is for GPUs, where `model.dtype: auto` means bfloat16
    auto = load_config(ROOT / LLAMA3_8B, ["model.dtype=auto"])
    bf16 = load_config(ROOT / LLAMA3_8B, ["model.dtype=bfloat16"])
    arch = plan.architecture(auto.model.name_or_path)
    a, b = plan.estimate(auto, gpus=8, arch=arch), plan.estimate(bf16, gpus=8, arch=arch)
    assert a.dtype == "bfloat16" and a.peak == b.peak


def test_deepspeed_buckets_by_zero_stage():
    # ARCH hidden 8, bf16: reduce bucket 8^2 = 64 elements (128 bytes) per trained model at ZeRO >= 1; ZeRO-1/2's
    # all-gather bucket is a chunk size over the flat weights, no buffer (0 bytes); ZeRO-3 adds a prefetch
    # bucket of int(0.9 * 64) = 57 elements (114 bytes) to every model, trained or not
    def buckets(stage: int, trained: bool) -> float:
        return plan.model_memory("m", 1000, ARCH, ZeroRoleCfg(stage, False, False), trained=trained, world=4,
                                 dtype_bytes=2).buckets

    assert [buckets(s, True) for s in (0, 1, 2, 3)] == [0, 128, 128, 242]
    assert [buckets(s, False) for s in (0, 2, 3)] == [0, 0, 114]
    m = plan.model_memory("m", 1000, ARCH, ZeroRoleCfg(3, False, False), trained=True, world=4, dtype_bytes=2)
    assert m.state == m.weights + m.grads + m.optimizer + m.working + 242


def test_tiny_plan_peak_counts_the_buckets_deepspeed_allocates(capsys, rlhf_cache):
    # configs/tiny.yaml: hidden 64, ZeRO-3 for all four models, float32 (4 bytes). The actor and the critic
    # each hold a reduce bucket of 64^2 = 4096 elements; every model a prefetch bucket of
    # int(0.9 * 4096) = 3686: (2 * 4096 + 4 * 3686) * 4 = 91,744 bytes on top of the peak without them
    cfg = load_config(ROOT / "configs/tiny.yaml")
    est = plan.estimate(cfg, gpus=1)
    without = sum(m.weights + m.grads + m.optimizer + m.working for m in est.models) + max(est.phases.values())
    assert est.peak == without + 91_744
    assert {m.role: m.buckets for m in est.models} == {"actor": 31128, "critic": 31128, "ref": 14744, "reward": 14744}
    assert main(["plan", "--config", str(ROOT / "configs/tiny.yaml"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["bucket_bytes"] == 91_744 and out["peak_bytes"] == est.peak
    assert main(["plan", "--config", str(ROOT / "configs/tiny.yaml")]) == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("model"))
    assert "buckets" in header.split()


def test_static_kv_cache_stays_through_experience_and_update(rlhf_cache):
    # tiny: 2 layers x 2 KV heads x head_dim 16, rollout batch 8, 64 prompt + 16 new tokens, float32:
    # K and V = 2 * 2 * 2 * 16 * 8 * 80 * 4 = 327,680 bytes, allocated once by the static decoder and kept;
    # the CUDA graph also keeps its output logits, 8 rows x 1000 vocab x 4 bytes = 32,000
    # (at ZeRO-2: under ZeRO-3 the loop releases them after each rollout, so only the rollout counts them)
    cfg = load_config(ROOT / "configs/tiny.yaml", ["deepspeed.zero_stage=2"])
    arch = plan.architecture("tiny-random")
    hf = plan.estimate(cfg, gpus=1, arch=arch).phases
    cfg.ppo.generation = "static"
    static = plan.estimate(cfg, gpus=1, arch=arch).phases
    cfg.ppo.generation = "graph"
    graph = plan.estimate(cfg, gpus=1, arch=arch).phases
    assert static["rollout"] == hf["rollout"] == graph["rollout"]
    for phase in ("experience", "update"):
        assert static[phase] == hf[phase] + 327_680
        assert graph[phase] == hf[phase] + 327_680 + 32_000
    zero3 = load_config(ROOT / "configs/tiny.yaml", ["deepspeed.zero_stage=3", "ppo.generation=graph"])
    released = plan.estimate(zero3, gpus=1, arch=arch).phases
    zero3.ppo.generation = "hf"
    assert released == plan.estimate(zero3, gpus=1, arch=arch).phases


def test_a_critic_free_plan_has_no_critic_and_a_rollout_of_every_sample(rlhf_cache):
    # tiny, float32, one rank (ZeRO-3 on one rank gathers nothing): a rollout row of 64 prompt + 16 new
    # tokens holds K and V 2 * 2 layers * 2 heads * 16 * 80 * 4 = 40,960 bytes, the prefill's layer
    # 64 * (4 * 64 + 2 * 128) * 4 = 131,072 and a row of logits 1000 * 4 = 4000: 176,032 a row.
    # GAE samples 8 rows (rollout_batch_size 8); grpo with 4 samples per prompt 8 x 4 = 32.
    gae = plan.estimate(load_config(ROOT / "configs/tiny.yaml"), gpus=1)
    grpo_cfg = load_config(ROOT / "configs/tiny.yaml", ["ppo.advantage=grpo", "ppo.samples_per_prompt=4"])
    grpo = plan.estimate(grpo_cfg, gpus=1)
    assert [m.role for m in grpo.models] == ["actor", "ref", "reward"]
    assert gae.phases["rollout"] == 8 * 176_032 and grpo.phases["rollout"] == 32 * 176_032
    # the micro-batch forwards and the update are the same but for the critic's training graph (kept from the
    # experience forwards: ppo.reuse_rollout_forward), 2 layers x 4 rows x 80 tokens x 64 x 34 x 4/2 bytes =
    # 2,785,280, so the peak loses the critic's state and that graph
    critic = next(m for m in gae.models if m.role == "critic")
    critic_graph = gae.phases["update"] - grpo.phases["update"]
    assert critic_graph == 2_785_280
    assert max(grpo.phases.values()) == grpo.phases["experience"] == gae.phases["experience"] - critic_graph
    assert gae.peak - grpo.peak == critic.state + critic_graph >= critic.state
    # with a program for the reward the reward model goes too, and its architecture is not looked up (a
    # reward.base_model that resolves nowhere is no matter); a GAE critic initialised from it still needs it
    sets = ["ppo.reward_fn=m:f", "reward.base_model=no-such-org/no-such-model"]
    fn = load_config(ROOT / "configs/tiny.yaml", ["ppo.advantage=rloo", "ppo.samples_per_prompt=4", *sets])
    assert [m.role for m in plan.estimate(fn, gpus=1).models] == ["actor", "ref"]
    with pytest.raises(ModelError, match="no-such-org/no-such-model: no config.json"):
        plan.estimate(load_config(ROOT / "configs/tiny.yaml", sets), gpus=1)
