"""rlhf chat on the tiny model: a session driven in a pseudo-terminal (streamed replies, /system, /reset,
/quit), replies streamed piece by piece and stoppable, conversations kept per model, prompts from stdin."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlhf import artifacts, encoding
from rlhf.commands.chat import (
    Sampling,
    Session,
    Speaker,
    answer,
    answer_prompts,
    label_of,
    load_speaker,
    model_dir,
    stream_reply,
)
from rlhf.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
GREEDY = Sampling(max_new_tokens=12, greedy=True)


@pytest.fixture(scope="module")
def speaker(tiny_model_dir, tmp_path_factory) -> Speaker:
    return load_speaker(str(tiny_model_dir), tmp_path_factory.mktemp("chat"), torch.device("cpu"))


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu",
            "CUDA_VISIBLE_DEVICES": "", "TERM": "dumb", "PYTHONUNBUFFERED": "1"}


class Terminal:
    """A command on a pseudo-terminal: what it writes is read back; lines are typed into it."""

    def __init__(self, args: list[str], log: Path):
        master, slave = pty.openpty()
        self._err = open(log, "w")  # noqa: SIM115  (closed in close())
        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=self._err, env=_env(), cwd=ROOT)
        os.close(slave)
        self.fd, self.seen = master, ""

    def expect(self, text: str, timeout: float = 60) -> str:
        """Read until `text` appears; returns what came before it (and drops it from the buffer)."""
        end = time.monotonic() + timeout
        while text not in self.seen:
            left = end - time.monotonic()
            ready, _, _ = select.select([self.fd], [], [], max(left, 0))
            if not ready:
                raise AssertionError(f"no {text!r} within {timeout} s; the terminal shows {self.seen[-2000:]!r}")
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:  # the command ended
                chunk = b""
            if not chunk:
                raise AssertionError(f"the command ended before {text!r}; it showed {self.seen[-2000:]!r}")
            self.seen += chunk.decode("utf-8", errors="replace").replace("\r\n", "\n")
        before, _, self.seen = self.seen.partition(text)
        return before

    def type(self, line: str) -> None:
        os.write(self.fd, (line + "\n").encode())
        self.expect(line + "\n")  # the terminal echoes what is typed

    def close(self) -> int:
        code = self.proc.wait(timeout=30)
        os.close(self.fd)
        self._err.close()
        return code


def test_chat_session_in_a_terminal(tmp_path, tiny_model_dir, speaker):
    """Typed message -> the reply (greedy: the one `answer` gives for the same conversation); /system
    and /reset start over; /quit ends the command with status 0."""
    expected_first = answer(speaker, [{"role": "user", "content": "Why is the sky blue?"}], GREEDY, lambda _: None)
    expected_system = answer(speaker, [{"role": "system", "content": "Answer in French."},
                                       {"role": "user", "content": "Where do penguins live?"}], GREEDY, lambda _: None)
    term = Terminal([sys.executable, "-m", "rlhf.cli", "chat", "--model", str(tiny_model_dir), "--greedy",
                     "--max-new-tokens", "12"], tmp_path / "stderr.txt")
    try:
        banner = term.expect("you> ")
        assert "chatting with policy" in banner and "/reset" in banner
        term.type("Why is the sky blue?")
        term.expect("policy> ")
        assert term.expect("\nyou> ").strip() == expected_first
        term.type("/system Answer in French.")
        assert "system message set; new conversation" in term.expect("you> ")
        term.type("Where do penguins live?")
        term.expect("policy> ")
        assert term.expect("\nyou> ").strip() == expected_system  # the system message and a fresh history
        term.type("/reset")
        assert "(new conversation)" in term.expect("you> ")
        term.type("/nonsense")
        assert "/quit" in term.expect("you> ")  # unknown commands show the help line
        term.type("/quit")
    finally:
        code = term.close()
    assert code == 0, (tmp_path / "stderr.txt").read_text()[-2000:]


def test_replies_stream_piece_by_piece_and_equal_generate(speaker):
    messages = [{"role": "user", "content": "How do plants grow?"}]
    pieces = list(stream_reply(speaker, messages, Sampling(max_new_tokens=16, greedy=True)))
    assert len(pieces) > 1  # streamed as generated, not handed over at the end
    ids = torch.tensor([encoding.prompt_ids(speaker.tokenizer, messages)])
    with torch.no_grad():
        out = speaker.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    assert "".join(pieces) == speaker.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_ctrl_c_stops_a_reply_and_the_next_one_runs(speaker):
    written = []

    def write(piece: str) -> None:
        written.append(piece)
        if len(written) == 2:
            raise KeyboardInterrupt  # as Ctrl-C in the terminal while the reply streams

    start = time.monotonic()
    reply = answer(speaker, [{"role": "user", "content": "Is water wet?"}], Sampling(max_new_tokens=64, seed=0), write)
    assert written[-1] == " [stopped]" and reply == "".join(written[:2]).strip()
    assert time.monotonic() - start < 30
    assert answer(speaker, [{"role": "user", "content": "Hi"}], GREEDY, lambda _: None) is not None  # worker gone


def test_session_keeps_a_conversation_per_model(speaker, tiny_model_dir, tmp_path):
    other = Speaker("other", speaker.model, speaker.tokenizer)
    out = io.StringIO()
    session = Session([speaker, other], GREEDY, system="Be brief.", out=out)
    session.reset()
    assert session.handle("Hello there")
    for s in (speaker, other):
        assert [m["role"] for m in s.history] == ["system", "user", "assistant"]
    assert re.search(r"^policy> .*\nother> .*\n$", out.getvalue(), re.S)
    session.handle("/system")
    assert speaker.history == [] and session.system is None
    assert not session.handle("/quit")


def test_prompts_from_stdin_each_in_a_fresh_conversation(tiny_model_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rlhf.cli", "chat", "--model", str(tiny_model_dir), "--compare",
                           str(tiny_model_dir), "--greedy", "--max-new-tokens", "6", "--jsonl"],
                          input="Why is the sky blue?\n\nIs water wet?\n", capture_output=True, text=True, env=_env(),
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["Why is the sky blue?", "Is water wet?"]
    for row in rows:  # the same model twice: told apart, and the same greedy reply
        assert list(row["replies"]) == ["policy (1)", "policy (2)"]
        assert len(set(row["replies"].values())) == 1


def test_answer_prompts_plain_output(speaker):
    out = io.StringIO()
    assert answer_prompts([speaker], ["Hi", "  ", "Bye"], GREEDY, out=out) == 2  # blank lines are skipped
    replies = ["".join(stream_reply(speaker, [{"role": "user", "content": p}], GREEDY)) for p in ("Hi", "Bye")]
    assert out.getvalue() == "".join(f"{r}\n" for r in replies)  # streamed as is, a newline after each


def test_stage_dirs_and_checkpoints_are_found(tmp_path, tiny_model_dir):
    """A stage dir means its final/; a checkpoint is exported into the work dir (see tests/stages/test_export.py)."""
    stage = tmp_path / "runs" / "t" / "sft"
    shutil.copytree(tiny_model_dir, stage / "final")
    artifacts.write_manifest(stage, "sft", inputs={}, config_hash="test", metrics={})
    ckpt = stage / "checkpoints" / "checkpoint-1"
    shutil.copytree(tiny_model_dir, ckpt)
    artifacts.mark_checkpoint_complete(ckpt, 1)
    work = tmp_path / "work"
    work.mkdir()
    assert model_dir(str(stage), work) == str(stage / "final")
    exported = Path(model_dir(str(ckpt), work))
    assert exported.parent == work and (exported / "model.safetensors").is_file()


def test_labels_and_bad_flags():
    assert label_of("runs/t/ppo/final") == "ppo"
    assert label_of("runs/t/ppo/checkpoints/checkpoint-4") == "ppo/checkpoint-4"
    assert label_of("runs/t/ppo/checkpoints/checkpoint-4/actor") == "ppo/checkpoint-4/actor"
    assert label_of("tiny-random") == "tiny-random"
    with pytest.raises(ConfigError, match="--top-p"):
        Sampling(top_p=0)
    with pytest.raises(ConfigError, match="--temperature"):
        Sampling(temperature=0)
