"""Resumable per-prompt work for `rlhf data synth`'s model-based methods (constitutional, judge).

Each prompt's result is one JSON line appended to a log in the output dir as soon as its chunk of prompts
is done, keyed by the prompt text. A re-run of the same command reads the log and does only the prompts
not in it, so an interrupted run loses at most the chunk in flight. A kill in the middle of a write leaves
a half-written last line: it is cut off (that prompt is redone); an unreadable line elsewhere is an error.
The settings that decide the results are stored next to the log, and a re-run with other settings is
refused instead of mixing two kinds of rows in one set.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from rlhf.errors import DataError

log = logging.getLogger("rlhf")


class RowLog:
    """An append-only JSONL file of one record per prompt (`record["prompt"]`)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def load(self) -> dict[str, dict]:
        """The records written so far, by prompt; a half-written last line is cut off the file."""
        if not self.path.exists():
            return {}
        data = self.path.read_bytes()
        complete, _, tail = data.rpartition(b"\n")
        records: dict[str, dict] = {}
        for i, line in enumerate(complete.split(b"\n") if complete else [], 1):
            try:
                record = json.loads(line)
                records[record["prompt"]] = record
            except (ValueError, KeyError, TypeError) as err:
                raise DataError(f"{self.path}:{i}: not a row of this log ({err}); delete that line (its prompt "
                                "is redone) or the whole file to start over") from None
        if tail:  # no newline after it: the write was cut short
            with open(self.path, "r+b") as fh:
                fh.truncate(len(data) - len(tail))
            log.warning("%s: cut off a half-written last line (%d bytes); its prompt is done again",
                        self.path, len(tail))
        return records

    def append(self, records: list[dict]) -> None:
        """Append records, one line each, and flush them to disk."""
        with open(self.path, "a", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def check_settings(path: Path, settings: dict, n_done: int) -> None:
    """Store `settings` at `path`, or, when a log with rows exists, require the stored ones to match."""
    if path.exists() and n_done:
        before = json.loads(path.read_text(encoding="utf-8"))
        diff = [f"{k}: {before.get(k)!r} there, {settings.get(k)!r} now" for k in sorted(set(before) | set(settings))
                if before.get(k) != settings.get(k)]
        if diff:
            raise DataError(f"{path.parent}: holds {n_done} prompts done with other settings ({'; '.join(diff)}); "
                            f"use another --out, or delete {path.parent} to start over")
    path.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def run_chunks(out: Path, name: str, prompts: list[str], process: Callable[[list[str]], list[dict]], *,
               settings: dict, chunk_size: int, seed: int, progress: bool) -> list[dict]:
    """One record per prompt, in prompt order: read from `<out>/<name>.jsonl`, or made by `process(chunk)`
    for `chunk_size` prompts at a time and appended there at once, under a progress bar.

    The chunks are cut from the whole prompt list and chunk i is seeded with `seed + i * chunk_size`, so a
    prompt is sampled in the same batch with the same seed however often the run was interrupted (unless a
    chunk was cut short mid-write: its rest is then sampled on its own).
    """
    import torch
    from tqdm.auto import tqdm

    out.mkdir(parents=True, exist_ok=True)
    rows = RowLog(out / f"{name}.jsonl")
    done = rows.load()
    check_settings(out / f"{name}.settings.json", settings, len(done))
    if done:
        log.info("synth: %s holds %d prompts already; doing the other %d", rows.path, len(done),
                 sum(p not in done for p in prompts))
    bar = tqdm(total=len(prompts), initial=sum(p in done for p in prompts), desc=f"synth: {name}", unit="prompt",
               disable=not progress)
    for start in range(0, len(prompts), chunk_size):
        todo = [p for p in prompts[start:start + chunk_size] if p not in done]
        if not todo:
            continue
        torch.manual_seed(seed + start)
        records = process(todo)
        rows.append(records)
        done.update((r["prompt"], r) for r in records)
        bar.update(len(todo))
    bar.close()
    return [done[p] for p in prompts]
