"""`python tests/faults/faulty_cli.py <rlhf arguments>`: the rlhf CLI with one fault injected at an exact point.

The fault is named by the environment variable RLHF_FAULT; the process kills itself with SIGKILL there, so
nothing (no `finally`, no atexit, no flush) runs after it, exactly as when a node dies:

  kill_in_step:N           inside optimizer step N: after the backward pass, before the weights change
  kill_before_marker:N     checkpoint-N is fully written but its completion marker is not (a kill mid-save)
  kill_before_manifest:S   stage S has renamed final/ into place but not written stage.json
  kill_after_stage:S       right after stage S wrote stage.json (between two stages of a pipeline)
  term_in_step:N           SIGTERM (not SIGKILL) at the start of optimizer step N, as Slurm sends before preemption
  usr1_in_step:N           SIGUSR1 at the start of optimizer step N, the early warning of `sbatch --signal=USR1@120`
  wait_in_step:N           not a kill: at the start of optimizer step N, creates $RLHF_FAULT_GATE.waiting and waits
                           until $RLHF_FAULT_GATE exists (a run a test holds alive while it starts another)
  nan_grads_in_step:N      not a kill: every gradient of one weight is NaN during optimizer step N only (for
                           `run.on_nonfinite: skip` under a launcher, where a test cannot add a callback itself)
  nan_actor_grads_in_ppo_step:N  not a kill: every actor gradient of one weight is NaN during the update of PPO
                           step N; each rank writes whether that update left the actor and critic weights it holds
                           (its ZeRO-3 partition) unchanged to $RLHF_FAULT_REPORT-<rank>.json
  fail_on_rank:R:N         not a kill: global rank R alone raises OSError at the start of PPO step N's update
                           (a failure the other ranks do not share, such as a node-local disk)
  blocker_on_rank:R        not a kill: global rank R alone finds a preflight blocker (a data file missing from
                           one node's disk)

Without RLHF_FAULT it is the plain CLI.
"""

from __future__ import annotations

import os
import signal
import sys


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_in_step(step: int) -> None:
    from transformers import TrainerCallback

    from rlhf.stages import common
    from rlhf.stages.ppo import loop

    class KillInStep(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if state.global_step + 1 == step:  # global_step counts finished steps
                _die()

    callbacks = common.StageRun.callbacks
    common.StageRun.callbacks = lambda self: callbacks(self) + [KillInStep()]
    ppo_update = loop.ppo_update

    def ppo_update_then_die(actor, critic, exp, ppo, guard, at_step, **kwargs):  # step N's rollout done, no update
        if at_step == step:
            _die()
        return ppo_update(actor, critic, exp, ppo, guard, at_step, **kwargs)

    loop.ppo_update = ppo_update_then_die


def _signal_in_step(signum: int, step: int) -> None:
    from transformers import TrainerCallback

    from rlhf.stages import common

    class SignalInStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step + 1 == step:
                os.kill(os.getpid(), signum)

    callbacks = common.StageRun.callbacks
    common.StageRun.callbacks = lambda self: callbacks(self) + [SignalInStep()]


def _wait_in_step(step: int) -> None:
    import time
    from pathlib import Path

    from transformers import TrainerCallback

    from rlhf.stages import common

    gate = Path(os.environ["RLHF_FAULT_GATE"])

    class WaitInStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step + 1 == step:
                gate.with_name(gate.name + ".waiting").touch()
                while not gate.exists():
                    time.sleep(0.05)

    callbacks = common.StageRun.callbacks
    common.StageRun.callbacks = lambda self: callbacks(self) + [WaitInStep()]


def nan_grads_callback(first: int, last: int):
    """A TrainerCallback: from the start of step `first` to the end of step `last`, every gradient of one
    weight is NaN (the weights themselves stay finite: only the updates of those steps are bad)."""
    import torch
    from transformers import TrainerCallback

    class NanGradsAtSteps(TrainerCallback):
        handle = None

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step + 1 == first:
                weight = next(p for p in model.parameters() if p.requires_grad)
                self.handle = weight.register_hook(lambda grad: torch.full_like(grad, float("nan")))

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == last and self.handle is not None:
                self.handle.remove()

    return NanGradsAtSteps()


def _nan_grads_in_step(step: int) -> None:
    from rlhf.stages import common

    callbacks = common.StageRun.callbacks
    common.StageRun.callbacks = lambda self: callbacks(self) + [nan_grads_callback(step, step)]


def _nan_actor_grads_in_ppo_step(step: int) -> None:
    import json

    import torch

    from rlhf import engine
    from rlhf.stages.ppo import loop

    ppo_update = loop.ppo_update

    def poisoned_update(actor, critic, exp, ppo, guard, at_step, **kwargs):
        if at_step != step:
            return ppo_update(actor, critic, exp, ppo, guard, at_step, **kwargs)

        def held(eng):  # what this rank holds: its ZeRO-3 partition, else the whole parameter
            return [getattr(p, "ds_tensor", p).detach().clone() for p in eng.module.parameters()]

        before = {role: held(eng) for role, eng in (("actor", actor), ("critic", critic))}
        weight = next(p for p in actor.module.parameters() if p.requires_grad)
        handle = weight.register_hook(lambda grad: torch.full_like(grad, float("nan")))
        try:
            out = ppo_update(actor, critic, exp, ppo, guard, at_step, **kwargs)
        finally:
            handle.remove()
        report = {f"{role}_unchanged": all(torch.equal(a, b) for a, b in zip(before[role], held(eng), strict=True))
                  for role, eng in (("actor", actor), ("critic", critic))}
        with open(f"{os.environ['RLHF_FAULT_REPORT']}-{engine.rank()}.json", "w", encoding="utf-8") as fh:
            json.dump(report, fh)
        return out

    loop.ppo_update = poisoned_update


def _fail_on_rank(spec: str) -> None:
    from rlhf import engine
    from rlhf.stages.ppo import loop

    rank, step = (int(x) for x in spec.split(":"))
    ppo_update = loop.ppo_update

    def update_or_fail(actor, critic, exp, ppo, guard, at_step, **kwargs):
        if at_step == step and engine.rank() == rank:
            raise OSError(f"injected failure on rank {rank} at step {step}")
        return ppo_update(actor, critic, exp, ppo, guard, at_step, **kwargs)

    loop.ppo_update = update_or_fail


def _blocker_on_rank(rank: int) -> None:
    from rlhf import preflight

    check = preflight.check

    def check_here(*args, **kwargs):
        found = check(*args, **kwargs)
        if int(os.environ.get("RANK", "0")) == rank:
            found.append(preflight.Blocker("data.missing", f"injected: data/here.jsonl is not on rank {rank}'s disk"))
        return found

    preflight.check = check_here


def _kill_before_marker(step: int) -> None:
    from rlhf import artifacts

    mark = artifacts.mark_checkpoint_complete

    def mark_or_die(path, at_step):
        if at_step == step:
            _die()
        mark(path, at_step)

    artifacts.mark_checkpoint_complete = mark_or_die


def _kill_around_manifest(stage: str, *, before: bool) -> None:
    from rlhf import artifacts

    write = artifacts.write_manifest

    def write_and_die(stage_dir, name, **kwargs):
        if name == stage and before:
            _die()
        path = write(stage_dir, name, **kwargs)
        if name == stage:
            _die()
        return path

    artifacts.write_manifest = write_and_die


def install(fault: str) -> None:
    kind, _, arg = fault.partition(":")
    if kind == "kill_in_step":
        _kill_in_step(int(arg))
    elif kind == "term_in_step":
        _signal_in_step(signal.SIGTERM, int(arg))
    elif kind == "usr1_in_step":
        _signal_in_step(signal.SIGUSR1, int(arg))
    elif kind == "wait_in_step":
        _wait_in_step(int(arg))
    elif kind == "nan_actor_grads_in_ppo_step":
        _nan_actor_grads_in_ppo_step(int(arg))
    elif kind == "nan_grads_in_step":
        _nan_grads_in_step(int(arg))
    elif kind == "fail_on_rank":
        _fail_on_rank(arg)
    elif kind == "blocker_on_rank":
        _blocker_on_rank(int(arg))
    elif kind == "kill_before_marker":
        _kill_before_marker(int(arg))
    elif kind == "kill_before_manifest":
        _kill_around_manifest(arg, before=True)
    elif kind == "kill_after_stage":
        _kill_around_manifest(arg, before=False)
    else:
        raise SystemExit(f"faulty_cli: unknown RLHF_FAULT {fault!r}")


if __name__ == "__main__":
    if os.environ.get("RLHF_FAULT"):
        install(os.environ["RLHF_FAULT"])
    from rlhf.cli import main

    sys.exit(main(sys.argv[1:]))
