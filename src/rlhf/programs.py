"""Program rewards: a `module:function` that scores responses, called the way the final stage calls it.

The function receives the prompts (message lists) and the responses (texts), plus each field of the prompt
rows (`fields` in the internal schema: an `answer` next to a maths question) that it names as a parameter,
or all of them when it takes `**kwargs`, as one list per field aligned with the responses (None where a
row lacks it). It returns one float per response. What goes wrong is one line naming the function and, where one
row is to blame, that prompt row (`file:line`, else its text): it raised, it returned another number of
values, or a value that is not a number. A NaN or infinite score is the stage's non-finite guard's to
handle (`run.on_nonfinite`), whose message names the source and the row (`experience.blame_scores`).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rlhf.errors import ConfigError, TrainingError

_OWN_PARAMETERS = ("prompts", "responses")


def load_program(spec: str, key: str = "ppo.rewards") -> Callable:
    """The function `module:function` names; ConfigError naming `key` when it cannot be imported or called."""
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"{key}: cannot import '{spec}' ({err}); check the module is on PYTHONPATH") from None
    if not callable(fn):
        raise ConfigError(f"{key}: '{spec}' is not callable")
    return fn


def _accepted_fields(fn: Callable, names: set[str]) -> set[str]:
    """Which row fields `fn` takes: those it names as parameters, or all with **kwargs."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin or C function: no fields
        return set()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return names - set(_OWN_PARAMETERS)
    return names & {p.name for p in parameters if p.name not in _OWN_PARAMETERS}


def row_name(row: dict) -> str:
    """A prompt row as a message names it: where it was read, else its last message's start."""
    if row.get("where"):
        return str(row["where"])
    prompt = row.get("prompt")
    text = prompt[-1]["content"] if isinstance(prompt, list) and prompt else str(prompt)
    return repr(text[:60] + ("..." if len(text) > 60 else ""))


@dataclass
class Program:
    """A loaded program reward: `spec` as configured, the function, and the config key that named it."""

    spec: str
    fn: Callable
    key: str = "ppo.rewards"

    def __call__(self, rows: Sequence[dict], responses: Sequence[str]) -> list[float]:
        """One float per response; `rows` are the prompt rows the responses answer, one per response."""
        fields = {name for row in rows for name in row.get("fields", {})}
        taken = _accepted_fields(self.fn, fields)
        try:
            values = self._call(rows, responses, taken)
        except Exception as err:
            raise TrainingError(self._blame(rows, responses, taken, err)) from err
        try:
            values = list(values)
        except TypeError:
            raise TrainingError(f"{self.key}: {self.spec} returned {type(values).__name__}, not a list of floats "
                                f"(one per response)") from None
        if len(values) != len(responses):
            raise TrainingError(f"{self.key}: {self.spec} returned {len(values)} values for {len(responses)} "
                                "responses; return one float per response")
        out = []
        for row, value in zip(rows, values, strict=True):
            try:
                out.append(float(value))
            except (TypeError, ValueError):
                raise TrainingError(f"{self.key}: {self.spec} returned {value!r} for prompt row {row_name(row)}; "
                                    "return a float for every response") from None
        return out

    def _call(self, rows: Sequence[dict], responses: Sequence[str], taken: set[str]):
        kwargs = {name: [row.get("fields", {}).get(name) for row in rows] for name in sorted(taken)}
        return self.fn([row["prompt"] for row in rows], list(responses), **kwargs)

    def _blame(self, rows: Sequence[dict], responses: Sequence[str], taken: set[str], err: Exception) -> str:
        """The error's line: the first row that fails on its own, when one does."""
        what = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}".rstrip(": ")
        for i, row in enumerate(rows):
            try:
                self._call([row], [responses[i]], taken)
            except Exception:
                return f"{self.key}: {self.spec} raised {what} on prompt row {row_name(row)}; fix the function"
        return f"{self.key}: {self.spec} raised {what} on a batch of {len(rows)} responses; fix the function"
