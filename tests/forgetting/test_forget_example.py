"""The self-contained forget example (sapsel_kernels.forget_example): files, loading, planted secrets, seeding.

Built with a few training steps only (the default build takes about a minute; whether the default memorises the
secrets is checked by hand, see the module docstring): ~10 s on a 2-core CPU.
"""

import json
import os

import pytest
import torch

from sapsel_kernels.forget_example import MAX_REPEATS, MIN_REPEATS, build_example, greedy_completion

KINDS = {"card", "phone", "email", "api_key"}


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    assert torch.get_num_threads() == n  # build_example restores the thread count it changed for training


def test_build_example_files_secrets_and_seeding(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ex = build_example(str(tmp_path / "ex"), seed=0, steps=5)

    # files
    assert ex.root == str(tmp_path / "ex")
    for p in (ex.model_dir, ex.data, ex.heldout, ex.secrets_file, os.path.join(ex.root, "README.txt")):
        assert os.path.exists(p), p
    assert ex.model_dir == os.path.join(ex.root, "model") and ex.train_s > 0

    # model and tokenizer load offline and run
    model = AutoModelForCausalLM.from_pretrained(ex.model_dir, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(ex.model_dir, local_files_only=True)
    assert not model.training and tok.eos_token is not None
    ids = tok("Call Mara Quist at", return_tensors="pt").input_ids
    assert int(ids.max()) < model.config.vocab_size
    assert isinstance(greedy_completion(model, tok, "Contact email:", 5), str)

    # secrets: the file matches the list; four kinds; each planted MIN_REPEATS-MAX_REPEATS (40-50) times as
    # "PREFIX SECRET" lines
    with open(ex.secrets_file, encoding="utf-8") as f:
        from_file = [json.loads(line) for line in f if line.strip()]
    assert from_file == ex.secrets
    assert {s["kind"] for s in ex.secrets} == KINDS and len(ex.secrets) == 4
    with open(ex.data, encoding="utf-8") as f:
        data = f.read()
    with open(ex.heldout, encoding="utf-8") as f:
        heldout = f.read()
    assert len(heldout) >= 12_000  # ~40 windows of 64 tokens at least, for sapsel forget's validation/test halves
    assert heldout not in data and not any(p in data for p in heldout.split("\n\n") if len(p) > 200)
    for s in ex.secrets:
        assert set(s) == {"secret", "prefix", "kind"} and not s["prefix"].endswith(" ")
        n = data.count(s["secret"])
        assert MIN_REPEATS <= n <= MAX_REPEATS, (s, n)
        assert data.count(f"\n{s['prefix']} {s['secret']}\n") + data.startswith(f"{s['prefix']} {s['secret']}\n") == n
        assert not any(s["secret"] in line for line in heldout.splitlines())
        # the tokenizer was trained without the secrets: the card number is not merged into a few tokens (pydoc
        # has almost no digit merges: 20 tokens here, against 9 when the BPE is trained on the text with secrets)
        if s["kind"] == "card":
            assert len(tok(" " + s["secret"]).input_ids) >= 16, tok.tokenize(" " + s["secret"])

    # other seed, other secrets (prefixes and kinds stay)
    ex1 = build_example(str(tmp_path / "ex1"), seed=1, steps=1)
    for a, b in zip(ex.secrets, ex1.secrets):
        assert a["secret"] != b["secret"] and (a["prefix"], a["kind"]) == (b["prefix"], b["kind"])

    # a non-empty root is refused and left alone
    before = {p: os.path.getmtime(os.path.join(ex.root, p)) for p in os.listdir(ex.root)}
    with pytest.raises(ValueError, match="not an empty folder"):
        build_example(ex.root, seed=0, steps=1)
    assert {p: os.path.getmtime(os.path.join(ex.root, p)) for p in os.listdir(ex.root)} == before
    (tmp_path / "empty").mkdir()
    build_example(str(tmp_path / "empty"), seed=2, steps=0)  # an existing empty folder is fine
