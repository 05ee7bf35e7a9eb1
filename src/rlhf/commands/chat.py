"""`rlhf chat`: talk to a trained model in the terminal, or answer prompts for a script.

A model is any stage's `final/` (or the stage dir), a checkpoint (exported into a temporary dir first,
through `rlhf.commands.export`), a local HF dir, a hub id or an alias. Each turn renders the conversation with the
model's chat template exactly as training did (`rlhf.encoding.prompt_ids`), and the reply is streamed as
it is generated (transformers' TextIteratorStreamer, generation in a worker thread). With two models
(`--compare`) each keeps its own conversation, and both answer every message, one after the other.

Interactive commands: /reset (new conversation), /system TEXT (set the system message and start over;
/system alone removes it), /help, /quit (or Ctrl-D). Ctrl-C stops a reply being generated.
Without a terminal (or with --prompt), every prompt is answered in a fresh conversation.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from rlhf import artifacts, encoding, models
from rlhf.errors import ConfigError

log = logging.getLogger("rlhf")
# C0 and C1 control characters but newline and tab: a reply holding one (a vertical tab, a carriage return,
# an escape sequence) would move the cursor or restyle the terminal.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
HELP = "/reset new conversation · /system TEXT set the system message (and start over) · /quit"


@dataclass(frozen=True)
class Sampling:
    """How replies are drawn. `greedy` ignores temperature, top_p and top_k."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0
    """0: off."""
    greedy: bool = False
    seed: int | None = None
    """Re-seed before every reply: the same message in the same conversation gets the same reply."""

    def __post_init__(self) -> None:
        problems = [(self.max_new_tokens >= 1, "--max-new-tokens must be >= 1"),
                    (self.temperature > 0, "--temperature must be > 0 (use --greedy for argmax)"),
                    (0 < self.top_p <= 1, "--top-p must be in (0, 1]"), (self.top_k >= 0, "--top-k must be >= 0")]
        for ok, message in problems:
            if not ok:
                raise ConfigError(message)

    def generation_config(self, model):
        from transformers import GenerationConfig

        gen = model.generation_config
        common = {"max_new_tokens": self.max_new_tokens, "eos_token_id": gen.eos_token_id,
                  "pad_token_id": gen.pad_token_id}
        if self.greedy:
            return GenerationConfig(do_sample=False, **common)
        return GenerationConfig(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                                **common)


@dataclass
class Speaker:
    """One model in the chat, with its own conversation."""

    label: str
    model: Any
    tokenizer: Any
    history: list[dict] = field(default_factory=list)


# ------------------------------------------------------------------------------------------- models


def _checkpoint_of(path: Path) -> bool:
    """`checkpoint-N/` or its PPO `actor/`/`critic/` dir."""
    return (artifacts.checkpoint_step(path) is not None
            or (path.name in ("actor", "critic") and artifacts.checkpoint_step(path.parent) is not None))


def label_of(name: str) -> str:
    """A short name for a model: `ppo` for runs/x/ppo/final, `ppo/checkpoint-4`, else the last path part."""
    path = Path(name)
    if path.name == "final":
        return path.parent.name
    if _checkpoint_of(path):
        ckpt = path if artifacts.checkpoint_step(path) is not None else path.parent
        suffix = f"/{path.name}" if ckpt != path else ""
        return f"{ckpt.parent.parent.name}/{ckpt.name}{suffix}"
    return path.name or name


def model_dir(name: str, workdir: Path) -> str:
    """A loadable model dir for `name`: a stage dir's final/, a checkpoint exported into `workdir`, or
    whatever `models.resolve_model` makes of it (dir, alias, hub id)."""
    path = Path(name).expanduser()
    final = artifacts.final_of_stage_dir(path, needed_by="rlhf chat")
    if final is not None:
        return str(final)
    if path.is_dir() and _checkpoint_of(path):
        from rlhf.commands.export import export

        out = workdir / f"model-{len(list(workdir.iterdir()))}"
        print(f"exporting {path} to a temporary dir ...", file=sys.stderr, flush=True)
        return str(export(path, out, causal_lm=True))
    return models.resolve_model(name)


def chat_dtype(device) -> str:
    """bfloat16 on a GPU that has it, else float32 (as `model.dtype: auto`)."""
    import torch

    return "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"


def load_speaker(name: str, workdir: Path, device, dtype: str = "auto") -> Speaker:
    path = model_dir(name, workdir)
    tokenizer = models.load_tokenizer(path)
    model = models.load_causal_lm(path, tokenizer=tokenizer, dtype=chat_dtype(device) if dtype == "auto" else dtype)
    return Speaker(label_of(name), model.to(device).eval(), tokenizer)


# ------------------------------------------------------------------------------------------ replies


def _fit(speaker: Speaker, messages: list[dict], max_new_tokens: int) -> list[int]:
    """Prompt ids of the conversation; the oldest turns are dropped until prompt + reply fit the context."""
    limit = getattr(speaker.model.config, "max_position_embeddings", None) or 10**9
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    while True:
        ids = encoding.prompt_ids(speaker.tokenizer, system + turns)
        if len(ids) + max_new_tokens <= limit or len(turns) <= 1:
            return ids
        turns = turns[2:] if len(turns) > 2 else turns[-1:]


class _Stop:
    """A stopping criterion that a Ctrl-C in the main thread sets."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, input_ids, scores, **kwargs) -> bool:
        return self.event.is_set()


def stream_reply(speaker: Speaker, messages: list[dict], sampling: Sampling) -> Iterator[str]:
    """Pieces of the reply as the model generates them (generation runs in a worker thread). Closing the
    iterator early (Ctrl-C in the consumer) stops the generation after its current token."""
    import torch
    from transformers import StoppingCriteriaList, TextIteratorStreamer

    ids = _fit(speaker, messages, sampling.max_new_tokens)
    device = next(speaker.model.parameters()).device
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    streamer = TextIteratorStreamer(speaker.tokenizer, skip_prompt=True, skip_special_tokens=True)
    stop, failure = _Stop(), []
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)

    def work() -> None:
        try:
            with torch.no_grad():
                speaker.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                       generation_config=sampling.generation_config(speaker.model),
                                       streamer=streamer, stopping_criteria=StoppingCriteriaList([stop]))
        except BaseException as err:  # re-raised in the caller's thread; the streamer must still end
            failure.append(err)
            streamer.end()

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    finished = False
    try:
        yield from streamer
        finished = True
    finally:
        if not finished:  # stopped early: end the generation, and read the queue until the worker closes it
            stop.event.set()
            for _ in streamer:
                pass
        worker.join()
    if failure:
        raise failure[0]


def answer(speaker: Speaker, messages: list[dict], sampling: Sampling, write: Callable[[str], Any]) -> str:
    """Stream the reply through `write`, its control characters but newline and tab written as `\\xNN`
    escapes; Ctrl-C stops it. Returns the reply as the model wrote it (what the conversation keeps)."""
    pieces: list[str] = []
    replies = stream_reply(speaker, messages, sampling)
    try:
        for piece in replies:
            pieces.append(piece)
            write(_CONTROL.sub(lambda found: f"\\x{ord(found.group()):02x}", piece))
    except KeyboardInterrupt:
        replies.close()
        write(" [stopped]")
    return "".join(pieces).strip()


# ------------------------------------------------------------------------------------------ sessions


class Session:
    """The interactive loop: one line in, every speaker's reply out (labelled when there are several)."""

    def __init__(self, speakers: list[Speaker], sampling: Sampling, *, system: str | None = None,
                 out: TextIO = sys.stdout):
        self.speakers, self.sampling, self.system, self.out = speakers, sampling, system, out

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def reset(self) -> None:
        for speaker in self.speakers:
            speaker.history = [{"role": "system", "content": self.system}] if self.system else []

    def handle(self, line: str) -> bool:
        """Act on one line of input; False when the session should end."""
        text = line.strip()
        command, _, rest = text.partition(" ")
        if command in ("/quit", "/exit"):
            return False
        if command == "/reset":
            self.reset()
            self._write("(new conversation)\n")
        elif command == "/system":
            self.system = rest.strip() or None
            self.reset()
            self._write(f"(system message {'set' if self.system else 'removed'}; new conversation)\n")
        elif text.startswith("/"):  # /help, or a command that does not exist
            self._write(f"{HELP}\n")
        elif text:
            self.say(text)
        return True

    def say(self, text: str) -> None:
        for speaker in self.speakers:
            speaker.history.append({"role": "user", "content": text})
            self._write(f"{speaker.label}> ")
            reply = answer(speaker, speaker.history, self.sampling, self._write)
            speaker.history.append({"role": "assistant", "content": reply})
            self._write("\n")


def interact(session: Session, read: Callable[[str], str] = input) -> None:
    """Read lines until /quit or end of input; Ctrl-C at the prompt only reminds how to leave."""
    session.reset()
    labels = ", ".join(s.label for s in session.speakers)
    session._write(f"chatting with {labels}. {HELP}\n")
    while True:
        try:
            line = read("you> ")
        except EOFError:
            session._write("\n")
            return
        except KeyboardInterrupt:
            session._write("\n(/quit or Ctrl-D to leave)\n")
            continue
        if not session.handle(line):
            return


def answer_prompts(speakers: list[Speaker], prompts: Iterable[str], sampling: Sampling, *,
                   system: str | None = None, jsonl: bool = False, out: TextIO = sys.stdout) -> int:
    """Each prompt in a fresh conversation. Plain: the replies streamed, one line each (labelled with
    several models); jsonl: one `{"prompt", "replies": {label: text}}` line per prompt. Returns the count."""
    count = 0
    for prompt in (p.strip() for p in prompts):
        if not prompt:
            continue
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        replies = {}
        for speaker in speakers:
            if not jsonl and len(speakers) > 1:
                out.write(f"{speaker.label}> ")
            write = (lambda _piece: None) if jsonl else (lambda piece: (out.write(piece), out.flush()))
            replies[speaker.label] = answer(speaker, messages, sampling, write)
            if not jsonl:
                out.write("\n")
        if jsonl:
            out.write(json.dumps({"prompt": prompt, "replies": replies}, ensure_ascii=False) + "\n")
        out.flush()
        count += 1
    return count


def _labelled(speakers: list[Speaker]) -> list[Speaker]:
    """Two models of the same name are told apart: `ppo (1)`, `ppo (2)`."""
    if len({s.label for s in speakers}) < len(speakers):
        for i, speaker in enumerate(speakers, 1):
            speaker.label = f"{speaker.label} ({i})"
    return speakers


def run_chat(names: list[str], sampling: Sampling, *, device: str = "auto", dtype: str = "auto",
             system: str | None = None, prompts: list[str] | None = None, jsonl: bool = False) -> int:
    """`rlhf chat`: interactive when stdin is a terminal and no prompts are given, else answer the prompts
    (`prompts`, else stdin's lines)."""
    from rlhf import engine

    quiet = logging.getLogger("transformers")
    quiet.setLevel(logging.ERROR)  # generation-flag notes on every reply are noise in a chat
    with tempfile.TemporaryDirectory(prefix="rlhf-chat-") as tmp:
        run_device = engine.usable_device(device, "--device")
        speakers = _labelled([load_speaker(name, Path(tmp), run_device, dtype) for name in names])
        if prompts is None and sys.stdin.isatty() and not jsonl:
            with contextlib.suppress(ImportError):
                import readline  # noqa: F401  (line editing and history for input())
            interact(Session(speakers, sampling, system=system))
            return 0
        answer_prompts(speakers, prompts if prompts is not None else sys.stdin, sampling, system=system, jsonl=jsonl)
    return 0
