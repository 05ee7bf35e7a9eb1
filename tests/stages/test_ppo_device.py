"""PPO builds every tensor on the run's device: no factory call in the package without an explicit device.

On a GPU, a tensor made without `device=` lands on the CPU and the first forward that mixes it with the
model's tensors fails ("Expected all tensors to be on the same device"). On this CPU-only machine both
places are the same, so the test watches the calls themselves: under a `TorchFunctionMode`, every tensor
factory (`torch.full`, `zeros`, `tensor`, `arange`, `randperm`, ...) called from the package's own code
must name its device. Calls made inside torch, transformers or DeepSpeed are theirs to place.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from test_ppo import make_cfg, run_ppo
from torch.overrides import TorchFunctionMode

import rlhf
from rlhf.config import RewardSourceCfg

PACKAGE = str(Path(rlhf.__file__).parent)
FACTORIES = {"tensor", "full", "zeros", "ones", "empty", "arange", "randperm", "rand", "randn", "randint",
             "linspace", "eye"}
# engine's collective helpers move whatever they are given to the backend's device: their flags are host-side
EXEMPT = {str(Path(PACKAGE) / "engine" / "collectives.py")}


class DevicelessFactories(TorchFunctionMode):
    """Records (file:line, function) for each tensor factory the package calls without `device=`."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in FACTORIES and "device" not in kwargs:
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(PACKAGE) and caller not in EXEMPT:
                frame = sys._getframe(1)
                self.calls.append(f"{Path(caller).relative_to(PACKAGE)}:{frame.f_lineno} torch.{name}")
        return func(*args, **kwargs)


def test_every_tensor_the_ppo_stage_makes_names_its_device(tmp_path, tiny_model_dir, tiny_reward_dir):
    # a reward model (scored at EOS) and a reward function (scores from Python floats) cover both scorers;
    # reuse of the rollout forward draws the shuffle before the forwards
    watch = DevicelessFactories()
    with watch:
        run_ppo(make_cfg(tmp_path / "rm", tiny_model_dir, tiny_reward_dir, steps=1, reuse_rollout_forward=True))
        run_ppo(make_cfg(tmp_path / "fn", tiny_model_dir, None, steps=1, reward_fn="ppo_reward:target_share",
                         critic_init="sft", reuse_rollout_forward=False))
    assert not watch.calls, "tensors made without the run's device:\n" + "\n".join(sorted(set(watch.calls)))


def test_the_watch_catches_a_deviceless_factory():
    # the check itself: a package-side call without `device=` is reported, one with it is not
    from rlhf.batching import encode_prompts

    class Tok:
        pad_token_id = 0

    watch = DevicelessFactories()
    import rlhf.encoding as encoding

    original = encoding.prompt_ids
    encoding.prompt_ids = lambda tok, prompt: [5, 6]
    try:
        with watch:
            encode_prompts(Tok(), ["a", "b"], 8, torch.device("cpu"))
            assert not watch.calls
            from rlhf.stages.ppo import experience

            experience.normalize_scores({"reward_model": torch.ones(2, device="cpu")},
                                        [RewardSourceCfg()], torch.ones(2, dtype=torch.bool, device="cpu"), None, None)
            assert not watch.calls
            from rlhf import losses

            losses.masked_mean(torch.ones(2, device="cpu"), torch.ones(2, device="cpu"))
            torch.arange(3)  # from this test file: not the package's
            assert not watch.calls
            exec(compile("import torch\ntorch.arange(3)\n", str(Path(PACKAGE) / "fake.py"), "exec"))
    finally:
        encoding.prompt_ids = original
    assert watch.calls == ["fake.py:2 torch.arange"]


def test_checkpoint_random_state_includes_the_gpu_generator(tmp_path, monkeypatch):
    # sampling and shuffles on a GPU draw from its CUDA generator: a resumed run must continue that stream
    from safetensors.torch import load_file, save_file

    from rlhf.stages.ppo import checkpoint

    gpu_state = torch.arange(16, dtype=torch.uint8, device="cpu")
    restored = {}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=None: gpu_state.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device=None: restored.update(state=state,
                                                                                                  device=device))
    gpu = torch.device("cuda", 0)
    plain, tensors = checkpoint.rng_state(gpu)
    assert torch.equal(tensors["cuda"], gpu_state)
    save_file(tensors, str(tmp_path / "rng-0.safetensors"))
    checkpoint.set_rng_state(plain, load_file(str(tmp_path / "rng-0.safetensors")), gpu)
    assert torch.equal(restored["state"], gpu_state) and restored["device"] == gpu
    _, cpu_only = checkpoint.rng_state(torch.device("cpu"))
    assert set(cpu_only) == {"torch"}


def test_out_of_gpu_memory_in_ppo_names_the_model_and_keeps_the_checkpoint(tmp_path, tiny_model_dir,
                                                                           tiny_reward_dir):
    # the critic's forward runs out of memory in step 2: one line naming the critic, checkpoint-1 kept
    import pytest

    from rlhf.errors import TrainingError

    cfg = make_cfg(tmp_path, tiny_model_dir, tiny_reward_dir, steps=3)

    def oom_from_step_2(ctx, stats):
        if ctx.step == 1:
            def raise_oom(*args, **kwargs):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB. GPU 0 has a total "
                                             "capacity of 79.10 GiB of which 1.50 GiB is free. Of the allocated ...")
            ctx.critic.module.register_forward_pre_hook(raise_oom)  # the critic's ScalarHead

    with pytest.raises(TrainingError) as err:
        run_ppo(cfg, on_step=oom_from_step_2)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("ppo: CUDA out of memory in the critic model (CUDA out of memory. Tried to allocate "
                              "4.00 GiB. GPU 0 has a total capacity of 79.10 GiB of which 1.50 GiB is free)")
    assert "checkpoint-1 is kept" in message and "deepspeed.critic.zero_stage=3" in message
    ckpts = cfg.stage_dir("ppo") / "checkpoints"
    assert [p.name for p in sorted(ckpts.iterdir())] == ["checkpoint-1"]
