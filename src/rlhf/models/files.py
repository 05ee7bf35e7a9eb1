"""Small file helpers of the model layer: reading a JSON object, removing a file or dir tree."""

from __future__ import annotations

import json
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
