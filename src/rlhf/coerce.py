"""Typed dataclasses from YAML mappings, for any tree of dataclasses (`rlhf.config` is one such schema).

`build(cls, raw, source=...)` checks a mapping against `cls`'s type hints, key by key and section by
section, converting where YAML is ambiguous (`1e-5` reads as a string), and reports every problem of
the mapping at once: one line each, starting with where the key came from and its dotted path
(`file.yaml: sft.batch_size`, or `--set sft.batch_size` for a key an override gave), with the closest
valid key for an unknown one. A dataclass states its own range rules in `__post_init__` by raising
`FieldError` (through `require`); the line then names that key. `--set a.b=value` overrides are merged
into the mapping first, so they get the same checks.

Conventions: type hints may be bool, int, float, str, Literal, `X | None`, unions, `list[X]`,
`dict[K, V]` and nested dataclasses; a field with `metadata={"internal": True}` is no key (never read
from a mapping, never written by `dump`).

This module imports only the standard library, PyYAML and `rlhf.errors`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from rlhf.errors import ConfigError


class FieldError(Exception):
    """Raised inside `__post_init__`; `build` adds the file and section to the message."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key
        self.message = message


def require(ok: bool, key: str, message: str) -> None:
    """A range rule of a dataclass field: FieldError(key, message) unless `ok`."""
    if not ok:
        raise FieldError(key, message)


def read_mapping(path: str | Path) -> dict:
    """The top-level mapping of a YAML file (an empty file is `{}`); ConfigError naming the file (and the
    line, for a YAML syntax error) when it is missing, not YAML, not UTF-8 or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid UTF-8; save the config as UTF-8") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def build(cls: type, raw: dict, *, source: str, overrides: list[str] | None = None,
          override_example: str = "section.key=value") -> Any:
    """`cls` from a mapping (as read from YAML), `overrides` (`key=value`, dotted keys) merged in first.

    `raw` is left as it is. Every problem is reported at once: the ConfigError holds one line per problem.
    `override_example` is the `--set` shown to an override without `=`.
    """
    raw = json.loads(json.dumps(raw, default=str))  # deep copy, plain types only
    given = frozenset(_apply_override(raw, item, override_example) for item in overrides or [])
    errors: list[str] = []
    out = _section(cls, raw, prefix="", origin=_Origin(source, given), errors=errors)
    if errors:
        raise ConfigError("\n".join(errors))
    return out


def dump(value: Any) -> Any:
    """A dataclass tree as plain dicts, lists and scalars (internal fields left out), as YAML writes it."""
    if dataclasses.is_dataclass(value):
        return {f.name: dump(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not f.metadata.get("internal")}
    if isinstance(value, list):
        return [dump(v) for v in value]
    if isinstance(value, dict):
        return {k: dump(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class _Origin:
    """Where the values being checked came from, for error messages: the file, or `--set` for the keys
    an override gave (and everything under them)."""

    path: str
    overridden: frozenset[str] = frozenset()

    def of(self, key: str) -> str:
        """`--set` when `key` (dotted, `name[i]` for list items) came from an override, else the file."""
        given = any(key == k or key.startswith((f"{k}.", f"{k}[")) for k in self.overridden)
        return "--set" if given else self.path

    def at(self, key: str) -> str:
        """The start of a message about `key`: `--set sft.batch_size` or `file.yaml: sft.batch_size`."""
        origin = self.of(key)
        return f"--set {key}" if origin == "--set" else f"{origin}: {key}"


def _apply_override(raw: dict, item: str, example: str) -> str:
    """Merge one `--set key=value` into `raw`; returns the dotted key."""
    if "=" not in item:
        raise ConfigError(f"--set {item}: expected key=value, e.g. --set {example}")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {key}: '{part}' is not a section")
        node = nxt
    try:
        node[parts[-1]] = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        node[parts[-1]] = text
    return ".".join(parts)


def _closest(name: str, options: list[str], prefix: str = "") -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" (did you mean '{prefix}{match[0]}'?)" if match else f"; valid keys: {', '.join(options)}"


# Returned for a section that could not be built; its parent leaves the key at its default.
_INVALID = object()


def _section(cls: type, raw: Any, prefix: str, origin: _Origin, errors: list[str]) -> Any:
    """Section `cls` from a mapping. Each bad key is appended to `errors` and keeps its default, so one pass
    finds every problem; a value that is not a mapping at all raises ConfigError."""
    where = prefix.rstrip(".") or "top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin.at(where)}: expected a mapping of keys, got {_type_name(raw)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            errors.append(f"{origin.of(f'{prefix}{key}')}: unknown key '{prefix}{key}'"
                          f"{_closest(str(key), list(fields), prefix)}")
            continue
        try:
            coerced = _coerce(hints[key], value, f"{prefix}{key}", origin, errors)
        except ConfigError as err:
            errors.append(str(err))
            continue
        if coerced is not _INVALID:
            kwargs[key] = coerced
    return _construct(cls, kwargs, prefix, origin, errors)


def _construct(cls: type, kwargs: dict, prefix: str, origin: _Origin, errors: list[str]) -> Any:
    """`cls(**kwargs)`. A failed range check is recorded and its key dropped (back to its default) to look
    for the next one; a check that fails again on the same key, or on a key the file did not set, ends it."""
    reported = set()
    while True:
        try:
            return cls(**kwargs)
        except FieldError as err:
            if err.key in reported:
                return _INVALID
            reported.add(err.key)
            shown = kwargs.get(err.key, getattr(cls, err.key, None))
            errors.append(f"{origin.at(prefix + err.key)}: {err.message} (got {shown!r})")
            if err.key not in kwargs:
                return _INVALID
            kwargs = {k: v for k, v in kwargs.items() if k != err.key}


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _coerce(tp: Any, value: Any, key: str, origin: _Origin, errors: list[str]) -> Any:
    """Check `value` against type hint `tp`; convert where YAML is ambiguous (`1e-5` reads as a string).

    A value of the wrong shape raises ConfigError; problems inside a section are appended to `errors`.
    """
    kind = typing.get_origin(tp)
    if kind in (typing.Union, types.UnionType):
        return _coerce_union(typing.get_args(tp), value, key, origin, errors)
    if kind is dict:
        key_tp, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{origin.at(key)}: expected a mapping, got {_type_name(value)}")
        return {_coerce(key_tp, k, key, origin, errors): _coerce(value_tp, v, f"{key}.{k}", origin, errors)
                for k, v in value.items()}
    if kind is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            shown = ", ".join(repr(a) for a in allowed)
            raise ConfigError(f"{origin.at(key)}: must be one of {shown} (got {value!r})")
        return value
    if kind is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{origin.at(key)}: expected a list, got {_type_name(value)}")
        items = [_coerce(item_tp, v, f"{key}[{i}]", origin, errors) for i, v in enumerate(value)]
        return [item for item in items if item is not _INVALID]
    if dataclasses.is_dataclass(tp):
        return _section(tp, value, prefix=f"{key}.", origin=origin, errors=errors)
    return _coerce_scalar(tp, value, key, origin)


def _coerce_union(options: tuple, value: Any, key: str, origin: _Origin, errors: list[str]) -> Any:
    """The first option `value` has the shape of (a mapping fits a section, not a string); its inner
    problems are reported. None of them: the first option's error."""
    if value is None and type(None) in options:
        return None
    failures = []
    for option in (o for o in options if o is not type(None)):
        inner: list[str] = []
        try:
            coerced = _coerce(option, value, key, origin, inner)
        except ConfigError as err:
            failures.append(err)
            continue
        errors.extend(inner)
        return coerced
    raise failures[0]


def _coerce_scalar(tp: type, value: Any, key: str, origin: _Origin) -> Any:
    bad = ConfigError(f"{origin.at(key)}: expected {tp.__name__}, got {_type_name(value)} {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise ConfigError(f"{origin.at(key)}: unsupported type {tp!r}")
