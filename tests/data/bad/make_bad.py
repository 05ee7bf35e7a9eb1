"""Write the bad-input corpus in this directory, byte for byte (BOM, CRLF, non-UTF-8, truncation).

`python tests/data/bad/make_bad.py [OUT_DIR]`; tests/unit/test_data_loaders.py checks the files on disk
still equal `CORPUS`, so an editor or a line-ending conversion cannot silently change them.
"""

from __future__ import annotations

import sys
from pathlib import Path


def _lines(*rows: str, end: str = "\n") -> bytes:
    """JSON Lines text from pre-written rows."""
    return "".join(row + end for row in rows).encode("utf-8")


GOOD_1 = '{"prompt": "Hi there", "chosen": "Glad to help!", "rejected": "No."}'
GOOD_2 = '{"prompt": "Help me cook", "chosen": "Happy to help you cook.", "rejected": "Whatever."}'

# name -> exact bytes; comments say where the problem is (1-based physical line).
CORPUS: dict[str, bytes] = {
    # line 3 is cut off mid-string and has no newline
    "truncated.jsonl": _lines(GOOD_1, GOOD_2) + b'{"prompt": "Hi", "chosen": "Hel',
    # a pretty-printed JSON array saved as .jsonl
    "array.jsonl": ("[\n  " + GOOD_1 + ",\n  " + GOOD_2 + "\n]\n").encode("utf-8"),
    # UTF-8 byte order mark before line 1: loads fine
    "bom.jsonl": b"\xef\xbb\xbf" + _lines(GOOD_1, GOOD_2),
    # Windows line endings and a blank CRLF line: loads fine
    "crlf.jsonl": _lines(GOOD_1, "", GOOD_2, end="\r\n"),
    # line 2 holds a Latin-1 "e acute" (0xe9) at column 32
    "non_utf8.jsonl": _lines(GOOD_1) + b'{"prompt": "Hi", "chosen": "Caf\xe9 is open.", "rejected": "No."}\n',
    # line 2: rejected is null
    "null_field.jsonl": _lines(GOOD_1, '{"prompt": "Hi", "chosen": "Glad to help!", "rejected": null}'),
    # line 3: chosen is whitespace only
    "empty_field.jsonl": _lines(GOOD_1, GOOD_2, '{"prompt": "Hi", "chosen": "   ", "rejected": "No."}'),
    # line 2: chosen and rejected are the same text
    "same_pair.jsonl": _lines(GOOD_1, '{"prompt": "Hi", "chosen": "Sure.", "rejected": "Sure."}'),
    # line 2: chosen is a number
    "wrong_type.jsonl": _lines(GOOD_1, '{"prompt": "Hi", "chosen": 42, "rejected": "No."}'),
    # line 2: rejected is missing
    "missing_field.jsonl": _lines(GOOD_1, '{"prompt": "Hi", "chosen": "Glad to help!"}'),
    # line 2: a role that is not system/user/assistant
    "unknown_role.jsonl": _lines(
        '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}',
        '{"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello!"}]}',
    ),
    # line 2 is a JSON number, not an object
    "not_object.jsonl": _lines(GOOD_1, "42"),
    # no bytes at all
    "empty.jsonl": b"",
}


def write(out_dir: Path) -> None:
    """Write every corpus file into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, data in CORPUS.items():
        (out_dir / name).write_bytes(data)


if __name__ == "__main__":
    write(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
