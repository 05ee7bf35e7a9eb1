"""`python tests/distributed/rank_digest_cli.py <rlhf arguments>`: the rlhf CLI, and after the PPO stage has
trained, each rank writes a digest of the actor and critic weights it holds to $RLHF_DIGEST_DIR/rank-<r>.json
(for tests that check the ranks stayed one model)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path


def _digest(module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _install() -> None:
    from rlhf import engine
    from rlhf.stages import ppo

    train = ppo.train  # the stage calls it by this module-level name

    def train_then_digest(ctx, on_step=None):
        train(ctx, on_step=on_step)
        out = Path(os.environ["RLHF_DIGEST_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        report = {"actor": _digest(ctx.actor.module), "critic": _digest(ctx.critic.module), "step": ctx.step}
        (out / f"rank-{engine.rank()}.json").write_text(json.dumps(report), encoding="utf-8")

    ppo.train = train_then_digest


if __name__ == "__main__":
    _install()
    from rlhf.cli import main

    sys.exit(main(sys.argv[1:]))
