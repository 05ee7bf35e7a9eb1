"""Small file helpers of the model layer: reading a JSON object, removing a file or dir tree, file modes."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from rlhf.errors import ModelError


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; ModelError naming the file when it is unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelError(f"{path}: not readable JSON ({err}); restore or re-create the file") from err
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object; restore or re-create the file")
    return data


def rmtree(path: Path) -> None:
    """Remove a dir tree, a file or a symlink (never following it); nothing when `path` is absent."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _umask() -> int:
    """The process's umask: from /proc (Linux), else by setting and restoring it."""
    try:
        found = re.search(r"^Umask:\s*([0-7]+)", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        found = None
    if found:
        return int(found.group(1), 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def umask_modes(root: Path) -> None:
    """Give every file under `root` the mode a plain open() gives (0666 less the umask). safetensors writes
    each weights file as a temporary file (mode 0600) renamed into place, so saved weights would otherwise
    be readable by their owner only, unlike the config and tokenizer files beside them."""
    mode = 0o666 & ~_umask()
    for path in Path(root).rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)
