"""A forget request's secrets: the JSON-lines file, and every check made against the data before any model work
(the prompt the data holds before each occurrence, duplicates, nesting, overlap, formats, missing secrets)."""

import json

import pytest

from sapsel_kernels.secret_spec import MAX_SEPARATOR, SecretSpec, as_specs, load_secrets_file, locate_all

DATA = ("intro line\nthe vault access code is 7051 3862 9904 1127 and more\n"
        "Billing card of Teodor Lind: 5311 0486 2210 9934\n"
        "again, the vault access code is 7051 3862 9904 1127.\n"
        "Contact email:teodor.lind@example.org\n")


def test_prompt_is_the_text_the_data_holds_before_the_secret():
    """The prefix typed with or without its trailing space gives the same prompt: the data's, separator included
    (never the glued 'code is7051')."""
    for prefix in ("the vault access code is", "the vault access code is ", "vault access code is"):
        (loc,) = locate_all([SecretSpec("7051 3862 9904 1127", prefix)], [DATA])
        assert loc.prompts == [prefix.rstrip() + " "] and loc.prompt_counts == [2], prefix
        assert loc.n_occurrences == 2 and loc.n_prefixed == 2
    (loc,) = locate_all([SecretSpec("5311 0486 2210 9934", "Billing card of Teodor Lind:")], [DATA])
    assert loc.prompts == ["Billing card of Teodor Lind: "]
    (loc,) = locate_all([SecretSpec("teodor.lind@example.org", "Contact email: ")], [DATA])
    assert loc.prompts == ["Contact email:"]  # the data has no space here: the user's trailing space is not invented
    (loc,) = locate_all([SecretSpec("teodor.lind@example.org")], [DATA], context="\n")  # inferred: its line
    assert loc.prefix == "Contact email:" and loc.prompts == ["\nContact email:"]


def test_separator_limit_and_alphanumeric_gap():
    text = "key:" + " " * MAX_SEPARATOR + "abc123\nkey: x abc999\n"
    (loc,) = locate_all([SecretSpec("abc123", "key:")], [text])
    assert loc.prompts == ["key:" + " " * MAX_SEPARATOR]
    with pytest.raises(ValueError, match="precedes none of the 1 occurrence"):
        locate_all([SecretSpec("abc999", "key:")], [text])  # 'x' between prefix and secret
    with pytest.raises(ValueError, match="precedes none"):
        locate_all([SecretSpec("abc123", "key:")], ["key:" + " " * (MAX_SEPARATOR + 1) + "abc123"])


@pytest.mark.parametrize("specs,msg", [
    ([SecretSpec("9999 8888 7777 6666", "code is")], "does not occur in the data"),
    ([SecretSpec("9999 8888 7777 6666")], "does not occur in the data"),  # not "prefix is empty"
    ([SecretSpec("7051 3862 9904 1127", "code is"), SecretSpec("7051 3862 9904 1127", "code is")],
     "is given 2 times"),
    ([SecretSpec("7051 3862 9904 1127", "code is"), SecretSpec("3862 9904", "x")], "lies inside the secret"),
    ([SecretSpec("7051 3862 9904 1127", "code is", fmt="dddd-dddd-dddd-dddd")], "is not of its format"),
    ([SecretSpec("7051 3862 9904 1127", "code is", fmt="dd\\")], "lone backslash"),
    ([SecretSpec("7051 3862 9904 1127", "Billing card")], "precedes none of the 2 occurrence"),
    ([SecretSpec("intro")], "starts a line"),
])
def test_bad_requests_raise_before_any_model_work(specs, msg):
    with pytest.raises(ValueError, match=msg):
        locate_all(specs, [DATA])


def test_overlapping_occurrences_raise():
    text = "a: 12345 6789\n"
    with pytest.raises(ValueError, match="overlap in the data"):
        locate_all([SecretSpec("12345 6", "a:"), SecretSpec("45 6789", "c:")], [text + "c: 45 6789\n"])


def test_secrets_file(tmp_path):
    p = tmp_path / "s.jsonl"
    rows = [{"secret": "7051 3862 9904 1127", "prefix": "the vault access code is"},
            {"secret": "teodor.lind@example.org", "format": None, "decoys": [f"x{i}@e.org" for i in range(30)]}]
    p.write_text("# comment\n\n" + "\n".join(json.dumps(r) for r in rows) + "\n")
    specs = load_secrets_file(str(p))
    assert [s.secret for s in specs] == [r["secret"] for r in rows]
    assert specs[0].prefix == "the vault access code is" and len(specs[1].decoys) == 30
    for body, msg in [('{"secret": "a"}\n{"secret": "b",}\n', "line 2: not valid JSON"),
                      ('["a"]\n', "line 1: expected a JSON object"),
                      ('{"prefix": "x"}\n', "line 1: no \"secret\" key"),
                      ('{"secret": "a", "colour": 1}\n', "line 1: unknown key"),
                      ('{"secret": ""}\n', "line 1: secret must be a non-empty string"),
                      ('{"secret": "a", "decoys": "b"}\n', "line 1: \"decoys\" must be a list"),
                      ('{"secret": "a", "decoys": ["b", "a", "b"]}\n', "line 1: .* 1 distinct decoy"),
                      ('{"secret": "a", "prefix": 3}\n', "line 1: prefix of secret 'a' must be a str"),
                      ("\n# nothing\n", "no secret in the file")]:
        p.write_text(body)
        with pytest.raises(ValueError, match=msg):
            load_secrets_file(str(p))


def test_as_specs_forms():
    assert as_specs("a")[0] == SecretSpec("a")
    assert as_specs({"secret": "a", "fmt": "a"})[0].fmt == "a"
    assert [s.secret for s in as_specs(["a", {"secret": "b"}, SecretSpec("c")])] == ["a", "b", "c"]
    for bad in ([], 3, [3]):
        with pytest.raises(TypeError):
            as_specs(bad)


def test_occurrences_the_prefix_does_not_precede_are_measured_after_their_own_line():
    text = "card: 4716 2087 5533 9812\n" + "then paid with 4716 2087 5533 9812 ok\n" * 5
    (loc,) = locate_all([SecretSpec("4716 2087 5533 9812", "card:")], [text])
    assert loc.n_occurrences == 6 and loc.n_prefixed == 1
    assert loc.prompts == ["then paid with ", "card: "] and loc.prompt_counts == [5, 1]


def test_leak_rule_edges():
    from sapsel_kernels.measure import leak_of

    prompt, secret = "card: ", "4716 2087 5533 9812"
    fmt = "dddd dddd dddd dddd"
    assert leak_of('"4716 2087', len(prompt), prompt, secret, fmt)["leak"]  # an opening quote hides nothing
    assert leak_of("see 4716 2087 5533 9812", len(prompt), prompt, secret, fmt)["full"]  # the whole secret anywhere
    assert not leak_of("x4716", len(prompt), prompt, secret, fmt)["leak"]  # an alphanumeric first: no alignment
    phone = "+1 734 555 0142"
    lk = leak_of("+1 212 555 9999", len(prompt), prompt, phone, "+d ddd ddd dddd")
    assert not lk["group"] and not lk["leak"]  # a one-digit group (a country code) is no leak by itself
    assert leak_of("+1 734", len(prompt), prompt, phone, "+d ddd ddd dddd")["leak"]  # 4 digits: p = 1e-4
