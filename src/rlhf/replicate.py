"""Node-local disks: copy what global rank 0 wrote to every node that cannot see it.

Every artifact has one writer, global rank 0 (transformers writes model files from it alone, and ZeRO-3
gathers full weights to it alone). On a shared filesystem the other nodes simply read what it wrote. On
node-local disks they would find nothing, so after each save the stage calls `replicate(paths)` (a
collective).

Which nodes need copies is found once per run directory and process (`_receivers`): rank 0 writes a file
holding a random token into the directory, and the first rank of every other node reads it back. A node
that reads the token sees rank 0's filesystem and gets nothing; when every node does, `replicate` returns
at once, with no listing, no digest and no collective. Otherwise rank 0 lists the files under `paths`, the
first rank of each receiving node reports which ones its disk lacks (or holds with another size or
digest), and rank 0 sends just those over a process group of itself and those ranks: one copy per node,
not one per rank. The node's first rank writes each file atomically (temporary name, then rename). Files
that each rank writes for itself (ZeRO shards, RNG states) are never sent: every node's ranks wrote their
own, and rank 0's are of no use elsewhere.

Paths are sent relative to a root each rank names itself (the run directory), so nodes may keep their runs
at different places.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
from pathlib import Path

from rlhf import artifacts, engine

log = logging.getLogger("rlhf")
CHUNK = 64 * 1024 * 1024  # bytes per broadcast: bounds the memory a large weight file takes in flight
SHARED_MARKER = ".rlhf-shared-"  # + a random token: a new name each time, so no file cache can answer for it
# What one rank writes for itself: DeepSpeed's ZeRO shards, the HF Trainer's and PPO's random states.
PER_RANK = re.compile(r"(bf16_)?zero_pp_rank_\d+_mp_rank_\d+_(optim|model)_states\.pt|rng_state_\d+\.pth|"
                      r"rng-\d+\.(json|safetensors)")


def _digest(path: Path) -> str:
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(8 * 1024 * 1024), b""):
            h.update(block)
    return h.hexdigest()


def _listing(root: Path, paths: list[Path], by_content: bool) -> dict[str, tuple[int, str]]:
    """{relative path: (size, content digest or "")} of the files under `paths` (files or directories),
    without the per-rank ones."""
    files: list[Path] = []
    for path in paths:
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(item for item in sorted(path.rglob("*")) if item.is_file())
    files = [f for f in files if not PER_RANK.fullmatch(f.name)]
    return {f.relative_to(root).as_posix(): (f.stat().st_size, _digest(f) if by_content else "") for f in files}


def _missing(root: Path, listing: dict[str, tuple[int, str]]) -> list[str]:
    out = []
    for rel, (size, digest) in listing.items():
        local = root / rel
        if not local.is_file() or local.stat().st_size != size or (digest and _digest(local) != digest):
            out.append(rel)
    return out


# (world size, root as this rank names it) -> receiving ranks: a node's disk layout does not change while
# the process lives.
_RECEIVERS: dict[tuple[int, str], tuple[int, ...]] = {}


def _receivers(root: Path) -> tuple[int, ...]:
    """The global ranks that receive copies of what rank 0 writes under `root`: the first rank of each node
    that does not see it there. Collective on the first call per `root`; every rank then holds the same
    answer."""
    key = (engine.world_size(), str(root))
    if key not in _RECEIVERS:
        _RECEIVERS[key] = _find_receivers(root)
    return _RECEIVERS[key]


def _find_receivers(root: Path) -> tuple[int, ...]:
    leader = engine.local_rank() == 0 and not engine.is_main()
    if not engine.any_rank(leader):  # one node: nothing to look for
        return ()
    token = None
    if engine.is_main():
        token = secrets.token_hex(16)
        try:
            (root / f"{SHARED_MARKER}{token}").write_text(token, encoding="utf-8")
        except OSError as err:  # every node then gets copies: slower, never wrong
            log.warning("%s: cannot write the shared-filesystem probe (%s); copying files to every node", root, err)
            token = None
    token = engine.broadcast_object(token)
    sees = False
    if leader and token is not None:
        try:
            sees = (root / f"{SHARED_MARKER}{token}").read_text(encoding="utf-8") == token
        except OSError:  # not there: this node has a disk of its own
            sees = False
    flags = engine.all_gather_object(leader and not sees)  # after it, every leader has looked
    if engine.is_main() and token is not None:
        (root / f"{SHARED_MARKER}{token}").unlink(missing_ok=True)
    receivers = tuple(r for r, needs in enumerate(flags) if needs)
    if engine.is_main() and receivers:
        log.info("%s: the nodes of ranks %s do not see it (disks of their own): they get copies of what "
                 "rank 0 writes there", root, list(receivers))
    return receivers


def replicate(root: str | Path, paths: list[str | Path], *, prune: str | Path | None = None,
              by_content: bool = False) -> list[str]:
    """Collective. Make every node's copy of `paths` (under `root`) match global rank 0's; returns the
    relative paths this rank wrote. A no-op in a single process, on one node and where every node sees
    rank 0's `root` (a shared filesystem).

    Checkpoint completion markers are sent last, so a copy interrupted midway is an incomplete checkpoint
    (never loaded). With `prune` (a checkpoints dir), checkpoint dirs that rank 0 has rotated out are
    deleted from the receiving nodes' disks as well. `by_content` compares files by a digest, not only by
    size: for paths that are overwritten in place (a final model of the same shape as an earlier run's)."""
    if engine.world_size() <= 1:
        return []
    root = Path(root)
    receivers = _receivers(root)
    if not receivers:
        return []
    group = engine.subgroup([0, *receivers])  # made on the first call, by every rank alike
    paths = [Path(p) for p in paths]
    prune = Path(prune) if prune is not None else None
    kept = sorted(p.name for p in prune.iterdir()) if (engine.is_main() and prune and prune.is_dir()) else None
    listing, kept = engine.broadcast_object((_listing(root, paths, by_content), kept) if engine.is_main() else None)
    leader = engine.rank() in receivers
    wanted = _missing(root, listing) if leader else []
    gathered = engine.all_gather_object(wanted)
    needed = sorted({rel for part in gathered for rel in (part or [])},
                    key=lambda rel: (Path(rel).name == artifacts.COMPLETE_MARKER, rel))
    written = []
    if leader or engine.is_main():  # the other ranks wait at the barrier below
        for rel in needed:
            if _send(group, root, rel, listing[rel][0], write=leader and rel in wanted):
                written.append(rel)
    if written:
        log.info("replicated %d file(s) from rank 0 to this node's disk under %s", len(written), root)
    if leader and kept is not None and prune.is_dir():
        for old in prune.iterdir():
            if old.is_dir() and artifacts.checkpoint_step(old) is not None and old.name not in kept:
                shutil.rmtree(old, ignore_errors=True)
    engine.barrier()
    return written


def _send(group, root: Path, rel: str, size: int, *, write: bool) -> bool:
    """Broadcast one file from rank 0 to the ranks of `group` in chunks; with `write`, store it under this
    rank's `root`."""
    import torch

    target = root / rel
    tmp = target.with_name(target.name + f".part{engine.rank()}")
    if write:
        target.parent.mkdir(parents=True, exist_ok=True)
    src = open(root / rel, "rb") if engine.is_main() else None
    fh = open(tmp, "wb") if write else None
    try:
        for start in range(0, size, CHUNK):
            n = min(CHUNK, size - start)
            buf = (torch.frombuffer(bytearray(src.read(n)), dtype=torch.uint8) if src is not None
                   else torch.empty(n, dtype=torch.uint8))
            engine.broadcast_in(group, buf, src=0)
            if fh is not None:
                fh.write(buf.numpy().tobytes())
    finally:
        for handle in (src, fh):
            if handle is not None:
                handle.close()
    if write:
        os.replace(tmp, target)
    return write


def agree_on_step(step: int | None) -> int | None:
    """The smallest resume step over all ranks (None counts as 0, i.e. a fresh start), so that every rank
    resumes from a checkpoint all nodes hold completely."""
    if engine.world_size() <= 1:
        return step
    import torch

    value = engine.all_reduce(torch.tensor([float(step or 0)]), "min")
    agreed = int(value.item())
    return agreed or None
