"""Realistic decoys for exposure (sapsel_kernels.decoys): kind detection, determinism, distinctness, exclusion,
style mirroring, errors and a sanity check that the email null is not degenerate."""

import collections
import math
import re
import statistics
import subprocess
import sys

import pytest

from sapsel_kernels import decoys
from sapsel_kernels.decoys import kind_of, null_description, plausible
from sapsel_kernels.exposure import format_of, matches_format, random_candidates

EMAIL = "teodor.lind@gmail.com"
NAME = "Teodor Lind"
CARD = "4111 1111 1111 1111"


# ------------------------------------------------------------------------------------------------------- kind_of
@pytest.mark.parametrize("secret,kind", [
    ("teodor.lind@gmail.com", "email"),
    ("Teodor.Lind@Example.COM", "email"),
    ("jane+newsletter@example.org", "email"),
    ("j.doe.1987@mail.co.uk", "email"),
    ("first_last-99@sub.domain.io", "email"),
    ("x@y.de", "email"),
    ("12345@acme-corp.io", "email"),
    ("JANE.DOE@EXAMPLE.COM", "email"),
    ("Teodor Lind", "name"),
    ("Anna Maria Rossi", "name"),
    ("Anne-Marie Dubois", "name"),
    ("Siobhan O'Brien", "name"),
    ("Ronald McDonald", "name"),
    ("José García", "name"),
    ("Li Wu", "name"),
    ("Teodor", "format"),                      # one word
    ("Anna Maria Luisa Rossi", "format"),      # four words
    ("teodor lind", "format"),                 # not capitalised
    ("ABC DEF", "format"),                     # no lowercase letter
    ("Teodor  Lind", "format"),                # double space
    ("Teodor Lind3", "format"),
    ("4111 1111 1111 1111", "format"),
    ("4111-1111-1111-1111", "format"),
    ("+1 415 555 0132", "format"),
    ("(415) 555-0132", "format"),
    ("sk-abc123def456ghi789", "format"),
    ("AKIAIOSFODNN7EXAMPLE", "format"),
    ("123-45-6789", "format"),
    ("", "format"),
    ("jane@localhost", "format"),              # no TLD
    ("jane@@example.com", "format"),
    ("jane.@example.com", "format"),           # empty dot atom
    (".jane@example.com", "format"),
    ("jane@-example.com", "format"),           # label starts with a hyphen
    ("jane@example.c", "format"),              # one-letter TLD
    ("jane doe@example.com", "format"),
    (" jane@example.com", "format"),
])
def test_kind_of(secret, kind):
    assert kind_of(secret) == kind


def test_kind_of_type():
    with pytest.raises(TypeError):
        kind_of(1234)


# ---------------------------------------------------------------------------------------------------------- lists
def test_lists():
    assert len(decoys.FIRST_NAMES) >= 200 and len(decoys.LAST_NAMES) >= 200 and len(decoys.DOMAINS) >= 40
    for lst in (decoys.FIRST_NAMES, decoys.LAST_NAMES, decoys.DOMAINS):
        assert len(set(lst)) == len(lst)
        assert all(x.isascii() for x in lst)
    # every name is one capitalised word of letters, so name decoys are names and email local parts are clean
    assert all(re.fullmatch(r"[A-Z][A-Za-z]*[a-z]", x) for x in decoys.FIRST_NAMES + decoys.LAST_NAMES)
    assert all(kind_of("a@" + d) == "email" for d in decoys.DOMAINS)
    assert set(decoys.DOMAINS) == set(decoys.WEBMAIL_DOMAINS) | set(decoys.ORG_DOMAINS)
    tlds = {d.rsplit(".", 1)[1] for d in decoys.DOMAINS}
    assert {"com", "org", "net", "io", "de"} <= tlds
    # several cultures: a handful of spot checks from different regions
    assert {"Teodor", "Priya", "Chinedu", "Hiroshi", "Zeynep", "Alejandro", "Olga"} <= set(decoys.FIRST_NAMES)
    assert {"Lind", "Nguyen", "Okafor", "Kowalski", "Yilmaz", "Garcia", "Patel"} <= set(decoys.LAST_NAMES)


def test_module_is_import_light():
    """decoys.py needs only the standard library: loaded on its own it does not pull in torch."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('decoys_alone', {decoys.__file__!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "assert len(m.plausible('a.b@c.com', 5)) == 5 and len(m.plausible('Ann Lee', 5)) == 5\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -------------------------------------------------------------------------------------------- determinism, distinct
@pytest.mark.parametrize("secret", [EMAIL, NAME, "Anna Maria Rossi", CARD, "sk-abc123def456"])
def test_deterministic_per_seed(secret):
    a = plausible(secret, 200, seed=3)
    assert a == plausible(secret, 200, seed=3)
    assert a != plausible(secret, 200, seed=4)
    assert len(set(a) & set(plausible(secret, 200, seed=4))) < 20
    assert a[:50] != plausible(secret, 50, seed=0)


@pytest.mark.parametrize("secret,n", [(EMAIL, 5000), (NAME, 5000), ("Anna Maria Rossi", 3000), (CARD, 2000),
                                      ("+1 415 555 0132", 2000)])
def test_distinct_and_never_the_secret(secret, n):
    out = plausible(secret, n, seed=1)
    assert len(out) == n and len(set(out)) == n
    assert secret not in out
    kind = kind_of(secret)
    assert all(kind_of(d) == kind for d in out)


def test_zero():
    assert plausible(EMAIL, 0) == plausible(NAME, 0) == plausible(CARD, 0) == []


def test_secret_in_name_space_excluded():
    """'Teodor Lind' is itself a combination of the lists: drawing most of the space never returns it."""
    assert "Teodor" in decoys.FIRST_NAMES and "Lind" in decoys.LAST_NAMES
    cap = len(decoys.FIRST_NAMES) * len(decoys.LAST_NAMES)
    out = plausible(NAME, cap - 1, seed=0)
    assert len(set(out)) == cap - 1 and NAME not in out
    with pytest.raises(ValueError, match=str(cap - 1)):
        plausible(NAME, cap, seed=0)


@pytest.mark.parametrize("secret", [EMAIL, NAME, "Anna Maria Rossi", CARD])
def test_exclude(secret):
    first = plausible(secret, 300, seed=0)
    again = plausible(secret, 1000, seed=0, exclude=first)
    assert not set(again) & set(first) and secret not in again and len(set(again)) == 1000
    # a single string counts as one string, not as its characters
    one = plausible(secret, 50, seed=0, exclude=first[0])
    assert first[0] not in one


def test_exclude_emails_case_insensitive():
    first = plausible(EMAIL, 100, seed=0)
    again = plausible(EMAIL, 100, seed=0, exclude=[e.upper() for e in first])
    assert not {e.casefold() for e in again} & {e.casefold() for e in first}
    # the secret, in another case, is the same address
    assert all(e.casefold() != EMAIL for e in plausible(EMAIL.upper(), 3000, seed=2))


# ------------------------------------------------------------------------------------------------------- formats
@pytest.mark.parametrize("secret", [CARD, "+1 415 555 0132", "sk-abc123def456ghi789", "AKIA7QX2", "123-45-6789"])
def test_format_decoys(secret):
    fmt = format_of(secret)
    out = plausible(secret, 500, seed=7)
    assert all(matches_format(d, fmt) for d in out)
    # exactly exposure.random_candidates (no repeats in a space this large)
    assert out == random_candidates(500, fmt, seed=7, exclude=[secret])
    assert plausible(secret, 10, seed=7, kind="format") == out[:10]


def test_format_small_space():
    out = plausible("42", 99, seed=0)
    assert sorted(out) == sorted(f"{i:02d}" for i in range(100) if i != 42)
    out = plausible("42", 90, seed=0, exclude=["00", "01", "xx"])
    assert len(set(out)) == 90 and not {"00", "01", "42"} & set(out)
    with pytest.raises(ValueError, match="only 99"):
        plausible("42", 100)
    with pytest.raises(ValueError, match="only 0"):
        plausible("--", 1)


def test_format_kind_applies_to_everything():
    out = plausible(EMAIL, 20, kind="format")
    assert all(matches_format(d, format_of(EMAIL)) for d in out)
    out = plausible(NAME, 20, kind="format")
    assert all(matches_format(d, "Aaaaaa Aaaa") for d in out)


# -------------------------------------------------------------------------------------------------------- emails
def _split(e):
    local, _, domain = e.partition("@")
    return local, domain


def test_email_lowercase():
    out = plausible(EMAIL, 1000, seed=0)
    assert all(kind_of(e) == "email" for e in out)
    assert all(e == e.lower() for e in out)
    assert not any("+" in e for e in out)


def test_email_uppercase():
    out = plausible("JANE.DOE@EXAMPLE.COM", 300, seed=0)
    assert all(kind_of(e) == "email" and e == e.upper() for e in out)


def test_email_mixed_case():
    out = plausible("Teodor.Lind@Example.com", 300, seed=0)
    assert all(kind_of(e) == "email" for e in out)
    for e in out:
        local, domain = _split(e)
        assert any(c.isupper() for c in local) and (domain[0].isupper() or domain[0].isdigit())
        assert all(w[:1].isupper() or not w[:1].isalpha() for w in re.split(r"[._\-]", local))
    # mixed local part, lowercase domain
    out = plausible("Teodor.Lind@example.com", 300, seed=0)
    assert all(_split(e)[1] == _split(e)[1].lower() and _split(e)[0] != _split(e)[0].lower() for e in out)


def test_email_tag_mirrored():
    out = plausible("jane+news@example.org", 300, seed=0)
    assert all(kind_of(e) == "email" and re.fullmatch(r"[^+@]+\+[a-z]+@[^@]+", e) for e in out)
    assert len({_split(e)[0].split("+")[1] for e in out}) >= 10


def test_email_patterns_seen():
    """All the common local-part shapes occur (first.last, flast, first_last, first.last + 2 digits, ...)."""
    first, last = set(map(str.lower, decoys.FIRST_NAMES)), set(map(str.lower, decoys.LAST_NAMES))
    out = plausible(EMAIL, 3000, seed=5)
    seen = collections.Counter()
    for e in out:
        local, _ = _split(e)
        m = re.fullmatch(r"([a-z]+)([._-]?)([a-z]*)(\d*)", local)
        assert m, local
        a, sep, b, digits = m.groups()
        if a in first and b in last and sep:
            seen["first" + sep + "last" + ("NN" if len(digits) == 2 else "")] += 1
        elif len(a) >= 2 and a[0] in "abcdefghijklmnopqrstuvwxyz" and a[1:] in last and not sep:
            seen["flast"] += 1
        elif a in first and not sep and not b and digits:
            seen["first+digits"] += 1
    for key in ("first.last", "first_last", "first-last", "first.lastNN", "flast", "first+digits"):
        assert seen[key] >= 20, (key, seen)


def test_email_distribution_not_degenerate():
    out = plausible(EMAIL, 1000, seed=11)
    locals_, domains = zip(*map(_split, out))
    shapes = [re.sub(r"\d+", "9", re.sub(r"[a-z]+", "a", loc)) for loc in locals_]  # "a.a9", "a_a", ...
    assert len(set(domains)) >= 40                    # of 58: half webmail, half organisations
    assert len(set(zip(shapes, domains))) >= 100      # local-part shapes x domains
    assert len(set(shapes)) >= 6
    top_domain_share = collections.Counter(domains).most_common(1)[0][1] / len(out)
    assert top_domain_share < 0.1
    lengths = [len(e) for e in out]
    assert statistics.pstdev(lengths) > 2.5 and max(lengths) - min(lengths) >= 15
    assert len({loc[0] for loc in locals_}) >= 20
    chars = collections.Counter("".join(locals_))
    total = sum(chars.values())
    entropy = -sum(c / total * math.log2(c / total) for c in chars.values())
    assert entropy > 4.0 and len(chars) >= 30         # letters, digits and separators
    assert sum(any(ch.isdigit() for ch in loc) for loc in locals_) / len(out) > 0.1


def test_email_cannot_draw_enough(monkeypatch):
    monkeypatch.setattr(decoys, "FIRST_NAMES", ("Ann",))
    monkeypatch.setattr(decoys, "LAST_NAMES", ("Lee",))
    monkeypatch.setattr(decoys, "WEBMAIL_DOMAINS", ("x.com",))
    monkeypatch.setattr(decoys, "ORG_DOMAINS", ("y.org",))
    with pytest.raises(ValueError, match=r"could draw only \d+ distinct plausible emails of the 3000"):
        plausible(EMAIL, 3000)


# --------------------------------------------------------------------------------------------------------- names
@pytest.mark.parametrize("secret", [NAME, "Anna Maria Rossi", "Anne-Marie Dubois"])
def test_name_decoys(secret):
    words = len(secret.split(" "))
    out = plausible(secret, 1000, seed=0)
    first, last = set(decoys.FIRST_NAMES), set(decoys.LAST_NAMES)
    for d in out:
        w = d.split(" ")
        assert len(w) == words and kind_of(d) == "name"
        assert w[0] in first and w[-1] in last
        if words == 3:
            assert w[1] in first and w[1] != w[0]
    assert len({d.split(" ")[0] for d in out}) >= 150
    assert len({d.split(" ")[-1] for d in out}) >= 150


# -------------------------------------------------------------------------------------------------------- errors
def test_errors():
    with pytest.raises(ValueError, match="n must be >= 0"):
        plausible(EMAIL, -1)
    with pytest.raises(ValueError, match="does not apply"):
        plausible(CARD, 5, kind="email")
    with pytest.raises(ValueError, match="does not apply"):
        plausible(NAME, 5, kind="email")
    with pytest.raises(ValueError, match="does not apply"):
        plausible(EMAIL, 5, kind="name")
    with pytest.raises(ValueError, match="does not apply"):
        plausible(CARD, 5, kind="name")
    with pytest.raises(ValueError, match="kind must be one of"):
        plausible(EMAIL, 5, kind="phone")
    with pytest.raises(TypeError):
        plausible(1234, 5)
    with pytest.raises(TypeError):
        plausible(EMAIL, 2.5)


def test_null_description():
    e = null_description("email")
    assert e.startswith("plausible emails") and f"{len(decoys.DOMAINS)} domains" in e
    assert null_description("name").startswith("plausible person names")
    assert null_description("format", "dddd dddd dddd dddd") == \
        "uniform random strings of the format 'dddd dddd dddd dddd'"
    assert "uniform random strings" in null_description("format")
    with pytest.raises(ValueError):
        null_description("phone")
