"""Argument validators for the command line: argparse ``type=`` functions.

Each function takes the option's string and returns the parsed value or raises ``argparse.ArgumentTypeError`` with
a one-line message; argparse turns that into ``usage: ...`` + ``error: argument --x: <message>`` and exit code 2,
before the command does any work. A value of 0 is either rejected or means what the option's help says: no
validator ever maps it to a default.

Lists are comma-separated; blanks around items are ignored, empty items (``"0.1,,0.2"``), empty lists and
duplicates are rejected (a duplicated budget would run and count a grid cell twice).

The demo tasks' parsers (``sapsel_kernels.demo.<task>.build_parser``) declare them in their ``add_argument``
calls, so ``sapsel demo``, ``python -m sapsel_kernels.demo.<task>`` and ``<task>.main([...])`` validate alike.
"""

import argparse
import math
import os
import tempfile
from typing import Callable, Iterable, List, Optional

__all__ = ["positive_int", "nonneg_int", "int_at_least", "fraction", "budget_list", "rate_list", "positive_int_list",
           "choice_list", "list_of", "checked", "output_dir"]

_Error = argparse.ArgumentTypeError


def _int(text: str) -> int:
    try:
        return int(str(text).strip())
    except ValueError:
        raise _Error(f"{text!r} is not an integer") from None


def int_at_least(lo: int) -> Callable[[str], int]:
    """``type=`` for an integer >= ``lo``."""

    def parse(text: str) -> int:
        v = _int(text)
        if v < lo:
            raise _Error(f"must be an integer >= {lo}, got {v}")
        return v

    parse.__name__ = f"int_at_least_{lo}"
    return parse


positive_int = int_at_least(1)
positive_int.__name__ = "positive_int"
positive_int.__doc__ = "``type=`` for an integer >= 1 (counts: seeds, probes, threads, epochs, steps)."
nonneg_int = int_at_least(0)
nonneg_int.__name__ = "nonneg_int"
nonneg_int.__doc__ = "``type=`` for an integer >= 0 (where 0 has a documented meaning, e.g. --chars 0 = all)."


def _float(text: str) -> float:
    try:
        v = float(str(text).strip())
    except ValueError:
        raise _Error(f"{text!r} is not a number") from None
    if not math.isfinite(v):
        raise _Error(f"{text!r} is not a finite number")
    return v


def fraction(text: str, *, closed_right: bool = True) -> float:
    """A float in (0, 1] (``closed_right=True``) or in (0, 1)."""
    v = _float(text)
    if v <= 0 or v > 1 or (v == 1 and not closed_right):
        interval = "(0, 1]" if closed_right else "(0, 1)"
        raise _Error(f"{text.strip()!r} is outside {interval}")
    return v


def list_of(item: Callable[[str], object], what: str = "value") -> Callable[[str], List[object]]:
    """``type=`` for a comma-separated list whose items are parsed by ``item`` (an ``ArgumentTypeError`` from it
    is reported with the item's position)."""

    def parse(text: str) -> List[object]:
        parts = [t.strip() for t in str(text).split(",")]
        if not any(parts):
            raise _Error(f"expected a comma-separated list of {what}s, got {text!r}")
        out, seen = [], set()
        for i, t in enumerate(parts, 1):
            if not t:
                raise _Error(f"empty item {i} in {text!r}")
            try:
                v = item(t)
            except _Error as exc:
                raise _Error(str(exc) if len(parts) == 1 else f"item {i} of {text!r}: {exc}") from None
            if v in seen:
                raise _Error(f"duplicate {what} {t!r} in {text!r}")
            seen.add(v)
            out.append(v)
        return out

    parse.__name__ = f"list_of_{what.replace(' ', '_')}"
    return parse


budget_list = list_of(fraction, "budget")
budget_list.__doc__ = "``type=`` for budgets: comma-separated fractions of the parameters, each in (0, 1]."
rate_list = list_of(lambda t: fraction(t, closed_right=False), "rate")
rate_list.__doc__ = "``type=`` for rates (e.g. poisoning rates): comma-separated floats, each in (0, 1)."
positive_int_list = list_of(positive_int, "positive integer")
positive_int_list.__doc__ = "``type=`` for a comma-separated list of integers >= 1."


def choice_list(choices: Iterable[str], what: str = "name") -> Callable[[str], List[str]]:
    """``type=`` for a comma-separated subset of ``choices`` (order kept, unknown names and duplicates rejected)."""
    allowed = tuple(choices)

    def item(t: str) -> str:
        if t not in allowed:
            raise _Error(f"unknown {what} {t!r}; choose from {', '.join(allowed)}")
        return t

    return list_of(item, what)


def checked(parse: Callable[[str], object]) -> Callable[[str], object]:
    """``type=`` from a parse function that raises ValueError with a readable message (argparse would replace that
    message by "invalid <name> value")."""

    def wrapped(text: str):
        try:
            return parse(text)
        except ValueError as exc:
            raise _Error(str(exc)) from None

    wrapped.__name__ = getattr(parse, "__name__", "value")
    return wrapped


def _nearest_existing(path: str) -> str:
    p = os.path.abspath(path)
    while not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return p


def _probe_writable(directory: str) -> Optional[str]:
    """None if a file can be created in ``directory``, else the reason. A real create (removed at once), not only
    ``os.access``: as root ``os.access`` says yes on a read-only mount."""
    if not os.access(directory, os.W_OK | os.X_OK):
        return "permission denied"
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def output_dir(text: str) -> str:
    """``type=`` for an output folder: an existing writable directory, or a path whose nearest existing ancestor is
    a writable directory (so ``os.makedirs`` will succeed after the work). Nothing is created here. Returns ``text``
    unchanged."""
    if not str(text).strip():
        raise _Error("the output folder must not be empty")
    if os.path.exists(text) and not os.path.isdir(text):
        raise _Error(f"{text!r} exists and is not a directory")
    base = _nearest_existing(text)
    if not os.path.isdir(base):
        raise _Error(f"cannot create {text!r}: {base!r} is not a directory")
    why = _probe_writable(base)
    if why is not None:
        where = "" if os.path.abspath(base) == os.path.abspath(text) else f" (in {base!r})"
        raise _Error(f"cannot write to {text!r}{where}: {why}")
    return text
