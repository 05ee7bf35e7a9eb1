"""What the commands leave for people to read: no transformers bars under `logging.progress: false`, chat
replies with their control characters escaped, saved weights readable as the umask allows, the PPO curves
in a grid, and `rlhf score` taking the reward stage's dir as `rlhf chat` takes a stage dir."""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import struct

import pytest
import torch

from rlhf import artifacts, cli, models
from rlhf.commands import chat
from rlhf.commands.chat import Sampling, Session, Speaker


@pytest.fixture
def bars_restored():
    """transformers' and huggingface_hub's bars on for the test, and on again after it."""
    from huggingface_hub.utils import enable_progress_bars
    from transformers.utils import logging as hf_logging

    enable_progress_bars()
    hf_logging.enable_progress_bar()
    yield
    enable_progress_bars()
    hf_logging.enable_progress_bar()


def test_progress_off_silences_the_weight_loading_and_shard_writing_bars(tiny_model_dir, tmp_path, capsys,
                                                                           bars_restored):
    def load_and_save(out) -> str:
        models.load_causal_lm(str(tiny_model_dir)).save_pretrained(out)
        return capsys.readouterr().err

    shown = load_and_save(tmp_path / "a")
    assert "Loading weights" in shown and "Writing model shards" in shown  # what the test would see
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("logging:\n  progress: false\n")
    cli._load(argparse.Namespace(config=str(cfg), overrides=[]))
    assert load_and_save(tmp_path / "b") == ""


def test_chat_escapes_control_characters_but_keeps_the_reply(monkeypatch):
    reply = "one\vtwo\rthree\x1b[2Jfour\x85\n\tfive"
    monkeypatch.setattr(chat, "stream_reply", lambda speaker, messages, sampling: iter([reply[:5], reply[5:]]))
    out = io.StringIO()
    session = Session([Speaker("m", None, None)], Sampling(), out=out)
    session.reset()
    session.say("hi")
    assert out.getvalue() == "m> one\\x0btwo\\x0dthree\\x1b[2Jfour\\x85\n\tfive\n"
    assert session.speakers[0].history[-1] == {"role": "assistant", "content": reply}  # the model's own text


def test_saved_weights_get_the_umask_mode(tiny_model_dir, tmp_path):
    model = models.load_causal_lm(str(tiny_model_dir))
    tokenizer = models.load_tokenizer(str(tiny_model_dir))
    old = os.umask(0o022)
    try:
        out = models.save_pretrained_atomic(model, tokenizer, tmp_path / "final")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes["model.safetensors"] == 0o644, modes
    assert set(modes.values()) == {0o644}


def _png_size(path) -> tuple[int, int]:
    return struct.unpack(">II", path.read_bytes()[16:24])  # the IHDR chunk: width, height


def test_six_curves_make_a_grid(tmp_path):
    from rlhf.plots import plot_curves

    keys = [f"k{i}" for i in range(6)]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, **{k: s * i for i, k in enumerate(keys)}}) + "\n"
                               for s in range(1, 4)))
    width, height = _png_size(plot_curves(metrics, tmp_path / "curves.png", keys, "PPO"))
    assert width < 2 * height, (width, height)  # two rows of three, not one strip of six (2772 x 352)
    width, _ = _png_size(plot_curves(metrics, tmp_path / "two.png", keys[:2], "two"))
    assert width < 1000  # fewer panels than a row holds: no empty places


def test_score_takes_the_reward_stage_dir(tiny_reward_dir, tmp_path, capsys):
    stage_dir = tmp_path / "run" / "reward"
    shutil.copytree(tiny_reward_dir, stage_dir / "final")
    artifacts.write_manifest(stage_dir, "reward", inputs={}, config_hash="t", metrics={})
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"Question {i}?", "completion": f"Answer {i}."}) + "\n"
                            for i in range(2)))
    assert cli.main(["score", "--model", str(stage_dir), "--data", str(rows), "--device", "cpu"]) == 0
    scored = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["response"] for r in scored] == ["Answer 0.", "Answer 1."]
    assert all(isinstance(r["reward"], float) and torch.isfinite(torch.tensor(r["reward"])) for r in scored)
