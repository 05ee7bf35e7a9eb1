"""Node-local disks: copy what global rank 0 wrote to every node that cannot see it.

Every artifact has one writer, global rank 0 (transformers writes model files from it alone, and ZeRO-3
gathers full weights to it alone). On a shared filesystem the other nodes simply read what it wrote. On
node-local disks they would find nothing, so after each save the stage calls `replicate(paths)` (a
collective): rank 0 lists the files under `paths`, the first rank of each node reports which ones its disk
lacks (or holds with another size), and rank 0 sends just those over the process group; the node's first
rank writes each file atomically (temporary name, then rename). On a shared filesystem nothing is missing
and nothing is sent, so the same code serves both layouts without a setting.

Paths are sent relative to a root each rank names itself (the run directory), so nodes may keep their runs
at different places.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from rlhf import artifacts, engine

log = logging.getLogger("rlhf")
CHUNK = 64 * 1024 * 1024  # bytes per broadcast: bounds the memory a large weight file takes in flight


def _digest(path: Path) -> str:
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(8 * 1024 * 1024), b""):
            h.update(block)
    return h.hexdigest()


def _listing(root: Path, paths: list[Path], by_content: bool) -> dict[str, tuple[int, str]]:
    """{relative path: (size, content digest or "")} of the files under `paths` (files or directories)."""
    files: list[Path] = []
    for path in paths:
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(item for item in sorted(path.rglob("*")) if item.is_file())
    return {f.relative_to(root).as_posix(): (f.stat().st_size, _digest(f) if by_content else "") for f in files}


def _missing(root: Path, listing: dict[str, tuple[int, str]]) -> list[str]:
    out = []
    for rel, (size, digest) in listing.items():
        local = root / rel
        if not local.is_file() or local.stat().st_size != size or (digest and _digest(local) != digest):
            out.append(rel)
    return out


_MULTI_NODE: dict[int, bool] = {}  # world size -> answer: the layout does not change within a process group


def _multi_node() -> bool:
    """True when some rank other than 0 is the first rank of its node (a second node exists). Collective
    on its first call only."""
    import torch

    if engine.world_size() not in _MULTI_NODE:
        flag = 1.0 if (engine.local_rank() == 0 and not engine.is_main()) else 0.0
        _MULTI_NODE[engine.world_size()] = bool(engine.all_reduce_sum(torch.tensor([flag])).item() > 0)
    return _MULTI_NODE[engine.world_size()]


def replicate(root: str | Path, paths: list[str | Path], *, prune: str | Path | None = None,
              by_content: bool = False) -> list[str]:
    """Collective. Make every node's copy of `paths` (under `root`) match global rank 0's; returns the
    relative paths this rank wrote. A no-op in a single process and on a shared filesystem.

    Checkpoint completion markers are sent last, so a copy interrupted midway is an incomplete checkpoint
    (never loaded). With `prune` (a checkpoints dir), checkpoint dirs that rank 0 has rotated out are
    deleted from the other nodes' disks as well. `by_content` compares files by a digest, not only by size:
    for paths that are overwritten in place (a final model of the same shape as an earlier run's)."""
    if engine.world_size() <= 1 or not _multi_node():
        return []
    root = Path(root)
    paths = [Path(p) for p in paths]
    prune = Path(prune) if prune is not None else None
    kept = sorted(p.name for p in prune.iterdir()) if (engine.is_main() and prune and prune.is_dir()) else None
    listing, kept = engine.broadcast_object((_listing(root, paths, by_content), kept) if engine.is_main() else None)
    leader = engine.local_rank() == 0 and not engine.is_main()
    wanted = _missing(root, listing) if leader else []
    gathered = engine.all_gather_object(wanted)
    needed = sorted({rel for part in gathered for rel in (part or [])},
                    key=lambda rel: (Path(rel).name == artifacts.COMPLETE_MARKER, rel))
    written = []
    for rel in needed:
        if _send(root, rel, listing[rel][0], write=leader and rel in wanted):
            written.append(rel)
    if written:
        log.info("replicated %d file(s) from rank 0 to this node's disk under %s", len(written), root)
    if leader and kept is not None and prune.is_dir():
        for old in prune.iterdir():
            if old.is_dir() and artifacts.checkpoint_step(old) is not None and old.name not in kept:
                shutil.rmtree(old, ignore_errors=True)
    engine.barrier()
    return written


def _send(root: Path, rel: str, size: int, *, write: bool) -> bool:
    """Broadcast one file from rank 0 in chunks; with `write`, store it under this rank's `root`."""
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
            engine.broadcast(buf, src=0)
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
