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

__all__ = ["secrets_file", "positive_int", "nonneg_int",
           "int_at_least", "fraction", "open_fraction", "float_at_least", "nonneg_float",
           "positive_float", "budget_list", "rate_list", "positive_int_list", "choice_list", "lazy_choice", "list_of",
           "checked", "output_dir", "nonempty_text", "text_file", "model_dir", "secret_format", "device",
           "remove_spec"]

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


def remove_spec(text: str):
    """``type=`` for ``--remove ALPHA:STEPS``: the removal stage's noise share in (0, 1] and its distillation steps
    (>= 1), as ``(alpha, steps)``."""
    parts = str(text).split(":")
    if len(parts) != 2:
        raise _Error(f"expected ALPHA:STEPS (e.g. 0.9:600), got {text!r}")
    alpha, steps = fraction(parts[0]), positive_int(parts[1])
    return alpha, steps


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


def float_at_least(lo: float) -> Callable[[str], float]:
    """``type=`` for a finite float >= ``lo``."""

    def parse(text: str) -> float:
        v = _float(text)
        if v < lo:
            raise _Error(f"must be a number >= {lo:g}, got {text.strip()!r}")
        return v

    parse.__name__ = f"float_at_least_{lo:g}"
    return parse


def positive_float(text: str) -> float:
    """``type=`` for a finite float > 0 (step sizes)."""
    v = _float(text)
    if v <= 0:
        raise _Error(f"must be a number > 0, got {text.strip()!r}")
    return v


nonneg_float = float_at_least(0.0)
nonneg_float.__name__ = "nonneg_float"
nonneg_float.__doc__ = "``type=`` for a finite float >= 0 (bits, fractions of an increase)."


def open_fraction(text: str) -> float:
    """``type=`` for a float in (0, 1)."""
    return fraction(text, closed_right=False)


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
rate_list = list_of(open_fraction, "rate")
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


def lazy_choice(load: Callable[[], Iterable[str]], what: str = "name") -> Callable[[str], str]:
    """``type=`` for one name out of ``load()``, called only when the option is given (the list lives in a module
    that imports torch-heavy code; building the parser must not import it)."""

    def parse(text: str) -> str:
        allowed = tuple(load())
        if text not in allowed:
            raise _Error(f"unknown {what} {text!r}; choose from {', '.join(allowed)}")
        return text

    parse.__name__ = what.replace(" ", "_")
    return parse


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


def nonempty_text(text: str) -> str:
    """``type=`` for a string that is not empty or only blanks; returned unchanged (blanks inside a secret or a prefix
    are part of it)."""
    if not str(text).strip():
        raise _Error("must not be empty")
    return text


def existing_file(text: str) -> str:
    """``type=`` for a file that exists and can be opened for reading (its content is checked by its reader)."""
    _read_bytes(text, "a file", 1)
    return text


def _read_bytes(text: str, what: str, limit: int = -1) -> bytes:
    """The bytes of the file ``text``, or the usage error saying why not (empty name, missing, a directory,
    unreadable)."""
    if not str(text).strip():
        raise _Error("the file name must not be empty")
    if not os.path.exists(text):
        raise _Error(f"{text!r} does not exist")
    if os.path.isdir(text):
        raise _Error(f"{text!r} is a directory, not {what}")
    try:
        with open(text, "rb") as f:
            return f.read(limit)
    except OSError as exc:
        raise _Error(f"cannot read {text!r}: {exc.strerror or exc}") from None


def text_file(text: str) -> str:
    """``type=`` for a UTF-8 text file that can be read and holds more than blanks. The whole file is read once
    here, so an unreadable or binary file fails before a model is loaded. Returns ``text`` unchanged."""
    raw = _read_bytes(text, "a text file")
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Error(f"{text!r} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None
    if not content.strip():
        raise _Error(f"{text!r} is empty" if not content else f"{text!r} holds only blanks")
    return text


def secrets_file(text: str) -> str:
    """``type=`` for a JSON-lines secrets file (:func:`sapsel_kernels.secret_spec.load_secrets_file`): a readable
    UTF-8 file whose every non-blank line is a JSON object with a "secret"; a bad line is named by its number."""
    text_file(text)
    from .forgetting.secret_spec import load_secrets_file

    try:
        load_secrets_file(text)
    except (OSError, UnicodeError, TypeError, ValueError) as exc:
        raise _Error(str(exc)) from None
    return text


def model_dir(text: str) -> str:
    """``type=`` for a local Hugging Face model folder: an existing directory with a ``config.json`` (what
    ``save_pretrained`` writes). Whether it holds a causal LM, its weights and a tokenizer is checked when it is
    loaded. Returns ``text`` unchanged."""
    if not str(text).strip():
        raise _Error("the model folder must not be empty")
    if not os.path.exists(text):
        raise _Error(f"{text!r} does not exist (a local folder written by save_pretrained is expected)")
    if not os.path.isdir(text):
        raise _Error(f"{text!r} is not a directory (a local folder written by save_pretrained is expected)")
    if not os.path.isfile(os.path.join(text, "config.json")):
        raise _Error(f"{text!r} has no config.json: not a Hugging Face model folder (model.save_pretrained(DIR) "
                     "writes one)")
    return text


def secret_format(text: str) -> str:
    """``type=`` for a secret format of :mod:`sapsel_kernels.exposure` (e.g. ``"dddd dddd dddd dddd"``; placeholders
    and escapes as in ``exposure.parse_format``): it must describe more than one secret, since exposure ranks the
    secret among the format's other secrets. Returned unchanged (its blanks are literal characters)."""
    from .forgetting.exposure import space_size

    if not text:
        raise _Error("the format must not be empty")
    try:
        size = space_size(text)
    except ValueError as exc:
        raise _Error(str(exc)) from None
    if size <= 1:
        raise _Error(f"{text!r} has no placeholder (e.g. 'd' for a digit), so it describes a single secret and "
                     "exposure is undefined")
    return text


def device(text: str) -> str:
    """``type=`` for a torch device string (``cpu``, ``cuda``, ``cuda:1``); a CUDA device must exist. Checked with
    ``torch.cuda.device_count()``, which does not create a CUDA context."""
    import torch

    try:
        dev = torch.device(str(text).strip())
    except (RuntimeError, ValueError):
        raise _Error(f"{text!r} is not a device (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count()
        if n == 0:
            raise _Error(f"{text!r}: no CUDA device is available")
        if dev.index is not None and dev.index >= n:
            raise _Error(f"{text!r}: only {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
    elif dev.type != "cpu":
        raise _Error(f"{text!r}: only cpu and cuda devices are supported")
    return str(dev)
