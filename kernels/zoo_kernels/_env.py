"""The ZOO_* environment switches of zoo and zoo_kernels, checked where they are read.

A value a switch does not take raises a ValueError that names the variable, the value and what it takes (it used to
be a bare int() traceback inside a decode step, or a spelling silently taken for the default: ZOO_DECODE_PDL=false
kept PDL on). An unset or empty variable is the default, as before; surrounding spaces are ignored. Booleans take
1/true/yes/on and 0/false/no/off in any case.

Several switches are read at every call on purpose (benchmarks and tests set them between captures): the parse is
cached per (variable, value), so such a read costs an environment lookup and a dict hit.

The switches a module reads when it is imported are read inside `read_at_import()`: a bad value there stops the
import before any command's own error handling runs (the `zoo` console script imports zoo before its main), so when
nothing catches it, it ends as one line (`zoo: $ZOO_PDL_MAX_ROWS='abc': expected ...`) instead of a traceback
through the import chain; $ZOO_TRACEBACK=1 keeps the traceback.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Iterator, Sequence

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def env_flag(name: str, default: bool) -> bool:
    """$name as a boolean (1/true/yes/on, 0/false/no/off, any case); `default` where unset or empty."""
    return _flag(name, os.environ.get(name, ""), default)


def env_int(name: str, default: int | None, low: int | None = None, high: int | None = None,
            choices: Sequence[int] | None = None, what: str = "") -> int | None:
    """$name as an int within [low, high] (either may be None: no bound) and among `choices` (None: any);
    `default` where unset or empty. `what` says what the number means, for the error message."""
    return _int(name, os.environ.get(name, ""), default, low, high, None if choices is None else tuple(choices), what)


def env_choice(name: str, default: str, choices: Sequence[str]) -> str:
    """$name as one of `choices` (any case; returned as spelled in `choices`); `default` where unset or empty."""
    return _choice(name, os.environ.get(name, ""), default, tuple(choices))


class SwitchError(ValueError):
    """A value of a ZOO_* switch that it does not take."""


def bad_value(name: str, value: str, expected: str) -> SwitchError:
    """The error for a value of $name that it does not take (for a switch of its own syntax)."""
    return SwitchError(f"${name}={value!r}: expected {expected}")


@contextlib.contextmanager
def read_at_import() -> Iterator[None]:
    """Around the switches a module reads at import: their error still stops the import (a caller may catch it), and
    if nothing does, the interpreter reports it as one line `prog: message` (exit status 1) instead of a traceback
    through every module of the import chain, unless $ZOO_TRACEBACK is on."""
    try:
        yield
    except SwitchError as e:
        _report_in_one_line_if_uncaught(e)
        raise


def _report_in_one_line_if_uncaught(error: SwitchError) -> None:
    """Install an excepthook that prints `error`, if it reaches the top uncaught, as one line; every other exception
    goes to the hook in place before (only this error object is shortened)."""
    previous = sys.excepthook

    def hook(kind, value, tb):
        try:
            traceback = env_flag("ZOO_TRACEBACK", False)
        except ValueError:  # a bad $ZOO_TRACEBACK too: the full report
            traceback = True
        if value is not error or traceback:
            return previous(kind, value, tb)
        print(f"{_prog()}: {value}", file=sys.stderr)

    sys.excepthook = hook


def _prog() -> str:
    """The command's name as its usage line gives it: `zoo`, `train.py`; the module of `python -m zoo.cli`, and
    `python` for `python -c` (sys.argv[0] is '-m' or '-c' while their module or code is being found)."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if name == "-m":
        given = getattr(sys, "orig_argv", [])
        name = given[given.index("-m") + 1] if "-m" in given[:-1] else ""
    return name if name and name != "-c" else "python"


@functools.lru_cache(maxsize=256)
def _flag(name: str, value: str, default: bool) -> bool:
    word = value.strip().lower()
    if not word:
        return default
    if word in _TRUE or word in _FALSE:
        return word in _TRUE
    raise bad_value(name, value, f"1/true/yes/on or 0/false/no/off (unset: {int(default)})")


@functools.lru_cache(maxsize=256)
def _int(name: str, value: str, default: int | None, low: int | None, high: int | None,
         choices: tuple[int, ...] | None, what: str) -> int | None:
    if not value.strip():
        return default
    if choices is not None:
        expected = f"one of {', '.join(map(str, choices))}"
    elif low is not None and high is not None:
        expected = f"an int from {low} to {high}"
    elif low == 1:
        expected = "a positive int"
    elif low is not None:
        expected = f"an int >= {low}"
    else:
        expected = "an int"
    expected += f" ({what})" if what else ""
    try:
        number = int(value.strip())
    except ValueError:
        raise bad_value(name, value, expected) from None
    if ((choices is not None and number not in choices) or (low is not None and number < low)
            or (high is not None and number > high)):
        raise bad_value(name, value, expected)
    return number


@functools.lru_cache(maxsize=256)
def _choice(name: str, value: str, default: str, choices: tuple[str, ...]) -> str:
    word = value.strip().lower()
    if not word:
        return default
    for choice in choices:
        if word == choice.lower():
            return choice
    raise bad_value(name, value, f"one of {', '.join(choices)}")


__all__ = ["SwitchError", "bad_value", "env_choice", "env_flag", "env_int", "read_at_import"]
