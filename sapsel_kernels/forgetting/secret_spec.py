"""What a forget request names: one or many secrets, each with its prefix, format, replacement and null.

A request is a list of :class:`SecretSpec`. They come from Python (a str, a dict, a SecretSpec, or a list of them:
:func:`as_specs`) or from a JSON-lines file (:func:`load_secrets_file`, the CLI's ``--secrets FILE.jsonl``), and
are checked against the training text by :func:`locate_all` before anything trains:

* every secret occurs in the data, no secret is given twice, no secret lies inside another or overlaps another
  where they occur, each secret is of its format;
* **the prompt that is measured is the text the data holds before each occurrence**, separator included: with the
  prefix ``"the vault access code is"`` typed without its trailing space and the data holding
  ``"...code is 7051..."``, the measured prompt is ``"the vault access code is "`` (what the model trained on), never
  the bare concatenation ``"...code is7051"`` (a string the model never saw, which made an unlearned model look
  clean). A prefix must precede at least one occurrence, followed only by non-alphanumeric characters (at most
  :data:`MAX_SEPARATOR`); occurrences it does not precede are measured after their own line; the distinct prompts
  (the :data:`MAX_PROMPTS` most frequent) are measured and the worst one counts.

Nothing here imports torch.
"""

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["SecretSpec", "LocatedSecret", "as_specs", "load_secrets_file", "locate_all", "occurrences",
           "MAX_SEPARATOR", "MAX_PROMPTS"]

MAX_SEPARATOR = 8   # characters between a prefix and its secret (": ", " = ", "\n", " - "): never alphanumeric
MAX_PROMPTS = 3     # distinct data prompts measured per secret (the most frequent ones)
MIN_DECOYS = 20     # user decoys: split into disjoint never-seen, monitored and reported sets
INFERRED_PREFIX_CHARS = 64
_KEYS = {"secret", "prefix", "format", "replacement", "decoys", "kind"}


@dataclass(frozen=True)
class SecretSpec:
    """One secret of a forget request.

    ``secret``: the string to forget, as it occurs in the data. ``prefix``: the text that elicits it (None: the text
    before its first occurrence on that line, at most 64 characters). ``fmt``: its format for exposure (None: from
    the secret, :func:`sapsel_kernels.exposure.format_of`). ``replacement``: what Z̃ holds instead (None: a random
    secret of the format). ``decoys``: the user's own null, candidates of the same kind the secret is ranked among
    (None: the package's null for its kind, :mod:`sapsel_kernels.decoys`). ``kind``: a label carried into the report.
    """

    secret: str
    prefix: Optional[str] = None
    fmt: Optional[str] = None
    replacement: Optional[str] = None
    decoys: Optional[Tuple[str, ...]] = None
    kind: Optional[str] = None

    def __post_init__(self):
        if not isinstance(self.secret, str) or not self.secret.strip():
            raise ValueError(f"secret must be a non-empty string, got {self.secret!r}")
        for name in ("prefix", "fmt", "replacement", "kind"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise TypeError(f"{name} of secret {self.secret!r} must be a str, got {type(v).__name__}")
        if self.prefix is not None and not self.prefix:
            raise ValueError(f"the prefix of secret {self.secret!r} is empty")
        if self.decoys is not None:
            d = self.decoys
            if isinstance(d, str) or not all(isinstance(x, str) and x for x in d):
                raise TypeError(f"decoys of secret {self.secret!r} must be a list of non-empty str")
            d = tuple(dict.fromkeys(x for x in d if x != self.secret))  # distinct, the secret itself left out
            if len(d) < MIN_DECOYS:
                raise ValueError(f"secret {self.secret!r} has {len(d)} distinct decoy(s) other than itself; forget "
                                 f"needs at least {MIN_DECOYS} (disjoint monitored and reported sets; 2000 or more for "
                                 "a usable rank)")
            object.__setattr__(self, "decoys", d)


def as_specs(secrets: Any) -> List[SecretSpec]:
    """A list of :class:`SecretSpec` from a str, a dict (keys ``secret``, ``prefix``, ``format``/``fmt``,
    ``replacement``, ``decoys``, ``kind``), a SecretSpec, or a non-empty list/tuple of them."""
    items = [secrets] if isinstance(secrets, (str, dict, SecretSpec)) else secrets
    if not isinstance(items, (list, tuple)) or not items:
        raise TypeError("secret must be a str, a dict, a SecretSpec or a non-empty list of them")
    out = []
    for i, s in enumerate(items):
        if isinstance(s, SecretSpec):
            out.append(s)
        elif isinstance(s, str):
            out.append(SecretSpec(s))
        elif isinstance(s, dict):
            out.append(_from_dict(s, f"secret #{i + 1}"))
        else:
            raise TypeError(f"secret #{i + 1} must be a str, a dict or a SecretSpec, got {type(s).__name__}")
    return out


def _from_dict(d: Dict[str, Any], where: str) -> SecretSpec:
    unknown = sorted(set(d) - _KEYS - {"fmt"})
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))} (allowed: "
                         f"{', '.join(sorted(_KEYS))})")
    if "secret" not in d:
        raise ValueError(f"{where}: no \"secret\" key")
    if "format" in d and "fmt" in d:
        raise ValueError(f"{where}: both \"format\" and \"fmt\"")
    decoys = d.get("decoys")
    if decoys is not None and (isinstance(decoys, str) or not isinstance(decoys, list)):
        raise ValueError(f"{where}: \"decoys\" must be a list of strings")
    try:
        return SecretSpec(d["secret"], d.get("prefix"), d.get("format", d.get("fmt")), d.get("replacement"),
                          tuple(decoys) if decoys is not None else None, d.get("kind"))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None


def load_secrets_file(path: str) -> List[SecretSpec]:
    """The secrets of a JSON-lines file: one JSON object per line (blank lines and lines starting with ``#`` are
    skipped), keys ``"secret"`` (required), ``"prefix"``, ``"format"``, ``"replacement"``, ``"decoys"`` (a list of
    strings), ``"kind"``. ValueError naming the line for a line that is not a JSON object, a missing or wrong key, or
    a file without any secret; OSError / UnicodeError for an unreadable file."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path}, line {n}"
        try:
            d = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a JSON object {{\"secret\": ...}}, got {type(d).__name__}")
        out.append(_from_dict(d, where))
    if not out:
        raise ValueError(f"{path}: no secret in the file (one JSON object per line, e.g. "
                         "{\"secret\": \"4716 2087 5533 9812\", \"prefix\": \"card:\"})")
    return out


@dataclass
class LocatedSecret:
    """A secret found in the data: ``spec``, ``fmt`` (resolved), ``prefix`` (the user's, or the inferred one),
    ``prompts`` (the distinct texts the data holds before the occurrences, separator included: from the prefix where
    it precedes the occurrence, else the occurrence's own line up to the secret; most frequent first, at most
    :data:`MAX_PROMPTS`), ``prompt_counts`` (occurrences per prompt), ``n_occurrences`` (all occurrences in the
    data), ``n_prefixed`` (those the prefix precedes), ``n_prompts`` (distinct prompts before the cut to
    MAX_PROMPTS)."""

    spec: SecretSpec
    fmt: str
    prefix: str
    prompts: List[str]
    prompt_counts: List[int]
    n_occurrences: int
    n_prefixed: int
    n_prompts: int = 1
    spans: List[Tuple[int, int, int]] = field(default_factory=list)  # (text index, start, end)

    @property
    def secret(self) -> str:
        return self.spec.secret


def occurrences(text: str, secret: str) -> List[int]:
    """The start of every non-overlapping occurrence of ``secret`` in ``text``, left to right."""
    out, i = [], text.find(secret)
    while i >= 0:
        out.append(i)
        i = text.find(secret, i + len(secret))
    return out


def _prompt_before(text: str, i: int, prefix: str) -> Optional[str]:
    """The data's text from the start of ``prefix`` to position ``i`` (the secret's start) when ``prefix`` ends at
    most MAX_SEPARATOR non-alphanumeric characters before ``i``; the prefix may be typed with or without its trailing
    whitespace. None when the prefix does not precede this occurrence."""
    for p in dict.fromkeys((prefix, prefix.rstrip())):
        if not p:
            continue
        for gap in range(0, MAX_SEPARATOR + 1):
            j = i - gap
            if j - len(p) < 0:
                break
            sep = text[j:i]
            if any(c.isalnum() for c in sep):
                break
            if text.startswith(p, j - len(p)):
                return text[j - len(p):i]
    return None


def _infer_prefix(texts: Sequence[str], secret: str) -> str:
    for t in texts:
        i = t.find(secret)
        if i >= 0:
            return t[t.rfind("\n", 0, i) + 1:i][-INFERRED_PREFIX_CHARS:]
    return ""


def locate_all(specs: Sequence[SecretSpec], texts: Sequence[str], *, context: str = "") -> List[LocatedSecret]:
    """Find every secret of a request in ``texts`` and the prompts to measure it after; check the request.

    ValueError (naming the secret) for: a secret given twice; a secret that contains another one of the request; a
    secret not of its format; a secret that occurs in no text; occurrences of two secrets that overlap; a prefix
    that precedes no occurrence; a secret that starts a line when no prefix is given. All checks run before any
    model work.
    """
    from .exposure import format_of, matches_format, parse_format

    seen = Counter(s.secret for s in specs)
    dup = [s for s, c in seen.items() if c > 1]
    if dup:
        raise ValueError(f"the secret {dup[0]!r} is given {seen[dup[0]]} times: list each secret once")
    for a in specs:
        for b in specs:
            if a is not b and a.secret in b.secret:
                raise ValueError(f"the secret {a.secret!r} lies inside the secret {b.secret!r}: forgetting the longer "
                                 "one covers it; list one of them (or make them disjoint)")
    out = []
    for s in specs:
        fmt = s.fmt if s.fmt is not None else format_of(s.secret)
        try:
            parse_format(fmt)
        except ValueError as exc:
            raise ValueError(f"secret {s.secret!r}: {exc}") from None
        if not matches_format(s.secret, fmt):
            raise ValueError(f"the secret {s.secret!r} is not of its format {fmt!r} (d digit, a a-z, A A-Z, x hex, "
                             "\\ escapes a literal)")
        occ = [(ti, i) for ti, t in enumerate(texts) for i in occurrences(t, s.secret)]
        if not occ:
            raise ValueError(f"the secret {s.secret!r} does not occur in the data ({len(texts)} text(s), "
                             f"{sum(len(t) for t in texts)} characters): nothing to forget")
        prefix = s.prefix
        if prefix is None:
            prefix = _infer_prefix(texts, s.secret)
            if not prefix:
                raise ValueError(f"the secret {s.secret!r} starts a line where it first occurs, so no prefix can be "
                                 "inferred: give its prefix, the text that elicits it")
        prompts, n_prefixed = Counter(), 0
        for ti, i in occ:
            p = _prompt_before(texts[ti], i, prefix)
            if p is not None:
                prompts[context + p] += 1
                n_prefixed += 1
        if n_prefixed:
            # occurrences the prefix does not precede are measured too, after their own line (up to the secret):
            # a secret the prefix no longer elicits may still follow "paid with" elsewhere in the data
            for ti, i in occ:
                if _prompt_before(texts[ti], i, prefix) is None:
                    t = texts[ti]
                    line = t[t.rfind("\n", 0, i) + 1:i][-INFERRED_PREFIX_CHARS:]
                    if any(c.isalnum() for c in line):
                        prompts[context + line] += 1
        if not prompts:
            ti, i = occ[0]
            before = texts[ti][max(0, i - 40):i]
            raise ValueError(f"the prefix {prefix!r} precedes none of the {len(occ)} occurrence(s) of the secret "
                             f"{s.secret!r} (at most {MAX_SEPARATOR} non-alphanumeric characters may separate them); "
                             f"the data has {before!r} before its first occurrence")
        top = prompts.most_common(MAX_PROMPTS)
        out.append(LocatedSecret(spec=s, fmt=fmt, prefix=prefix, prompts=[p for p, _ in top],
                                 prompt_counts=[c for _, c in top], n_occurrences=len(occ),
                                 n_prefixed=n_prefixed, n_prompts=len(prompts),
                                 spans=[(ti, i, i + len(s.secret)) for ti, i in occ]))
    # occurrences of two secrets must not overlap (Z̃ replaces each occurrence by its replacement)
    spans = sorted((ti, a, b, k) for k, ls in enumerate(out) for ti, a, b in ls.spans)
    for (t1, a1, b1, k1), (t2, a2, b2, k2) in zip(spans, spans[1:]):
        if t1 == t2 and a2 < b1:
            raise ValueError(f"the secrets {out[k1].secret!r} and {out[k2].secret!r} overlap in the data (text "
                             f"{t1}, characters {a2}-{b1}): list them as one secret")
    return out

