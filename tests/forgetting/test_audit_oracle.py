"""Exposure of a memorised secret: the package (``secret_spec.locate_all`` + ``audit.audit``) against an oracle
written here from the definition (Carlini et al., "The Secret Sharer").

The oracle scores nothing through the package. For each string ``c`` of ``[secret] + candidates`` it tokenises
``data_prompt + c`` with the trained ``tokenizers.Tokenizer`` itself (no special tokens), takes ``s`` = the shortest
common token prefix of ``tokenize(data_prompt)`` and any ``tokenize(data_prompt + c)`` (every string gets the same
conditioning), and sums ``log softmax(model(ids)[t - 1])[ids[t]]`` over ``t >= s`` with a float64 copy of the model,
one sequence at a time. ``exposure = log2(n + 1) - log2(1 + #{candidates more likely than the secret})``.
``data_prompt`` is found by this file in the training text: the text from the start of the prefix to the secret's
occurrence, separator included (``"the vault access code is "``).

Two tokenizer / model families, trained here on pydoc text (``demo.lm.load_corpus``) in which a secret line is
inserted ten times (the tokenizers are trained on the text without it):

* ``bytelevel``: GPT-2 style byte-level BPE + a tiny ``GPT2LMHeadModel``;
* ``metaspace``: SentencePiece-style ("\u2581") BPE + a tiny ``LlamaForCausalLM`` (GQA, untied embeddings).

The regression guarded: the prefix typed without its trailing space used to be scored glued to the secret
(``"...code is" + "7051..."`` = ``"...code is7051..."``), a string the model never saw.
"""

import copy
import math
import random

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from sapsel_kernels.audit import AuditItem, audit, leak_of  # noqa: E402
from sapsel_kernels.demo.lm import load_corpus  # noqa: E402
from sapsel_kernels.exposure import random_candidates  # noqa: E402
from sapsel_kernels.secret_spec import SecretSpec, locate_all  # noqa: E402

SECRET = "7051 3862 9904 1127"
FMT = "dddd dddd dddd dddd"
PREFIX = "the vault access code is"
LINE = f"{PREFIX} {SECRET}"
N_INSERT = 10
N_CAND = 500
CORPUS_CHARS = 9000
N_NUMBERS = 60
WINDOW = 48
FAMILIES = ["bytelevel", "metaspace"]
TRAIN = {"bytelevel": (30, 3e-3), "metaspace": (30, 1e-3)}  # (AdamW steps, lr): partial memorisation
PREFIXES = [PREFIX, PREFIX + " "]
LN2 = math.log(2.0)


# ----------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _corpus():
    """(clean, text): pydoc text with benign lines of random digit groups (so BPE learns space+digit merges and
    the model a generic number distribution: the null the candidates sample), and the same with the secret line
    inserted N_INSERT times."""
    pydoc, _ = load_corpus(CORPUS_CHARS)
    lines = pydoc.split("\n")
    rng = random.Random(0)
    words = ["ticket", "see page", "the order number is", "call", "room", "invoice"]
    for k in range(N_NUMBERS, 0, -1):
        num = " ".join("".join(rng.choice("0123456789") for _ in range(4)) for _ in range(rng.randint(1, 3)))
        lines.insert(k * len(lines) // (N_NUMBERS + 1), f"{rng.choice(words)} {num}")
    clean = "\n".join(lines)
    step = len(lines) // (N_INSERT + 1)
    for k in range(N_INSERT, 0, -1):  # from the end, so earlier positions stay valid
        lines.insert(k * step, LINE)
    text = "\n".join(lines)
    assert text.count(LINE) == N_INSERT and SECRET not in clean
    return clean, text


def _tokenizer(family: str, clean: str) -> Tokenizer:
    if family == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      special_tokens=["<|endoftext|>"], show_progress=False)
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
        tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
        trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=list("0123456789\n"),
                                      special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(clean.split("\n"), trainer)
    return tok


def _model(family: str, vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "bytelevel":
        cfg = GPT2Config(vocab_size=vocab, n_positions=128, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(cfg)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg)


def _train(model, ids, steps, lr, batch=16):
    g = torch.Generator().manual_seed(0)
    data = torch.tensor(ids, dtype=torch.int64)
    starts = torch.arange(0, len(data) - WINDOW, WINDOW // 2)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        pick = starts[torch.randint(len(starts), (batch,), generator=g)]
        x = torch.stack([data[s:s + WINDOW] for s in pick.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return loss.item()


# ------------------------------------------------------------------------------------------------------- oracle
def _data_prompt(text: str, prefix: str) -> str:
    """The training text before the secret's first occurrence, from the start of the prefix (found here, not by
    the package)."""
    i = text.index(SECRET)
    j = text.rindex(prefix.rstrip(), 0, i)
    assert i - j - len(prefix.rstrip()) <= 2, "the prefix is not right before the secret"
    return text[j:i]


def _common(a, b) -> int:
    n = 0
    while n < len(a) and n < len(b) and a[n] == b[n]:
        n += 1
    return n


@torch.no_grad()
def oracle_logprob_bits(fam, prompt: str, strings):
    """log2 P(c | prompt) for each string (float64, one sequence at a time) and the conditioning length s."""
    enc = fam["raw"].encode
    ctx = enc(prompt, add_special_tokens=False).ids
    fulls = [enc(prompt + c, add_special_tokens=False).ids for c in strings]
    s = min(_common(ctx, f) for f in fulls)
    assert s >= 1
    out = []
    for f in fulls:
        assert len(f) > s
        ids = torch.tensor([f], dtype=torch.int64)
        logp = fam["model64"](input_ids=ids).logits[0].to(torch.float64).log_softmax(-1)
        lp = math.fsum(float(logp[t - 1, f[t]]) for t in range(s, len(f)))
        out.append(lp / LN2)
    return out, s


def oracle_exposure(fam, prompt: str, candidates):
    lp, s = oracle_logprob_bits(fam, prompt, [SECRET] + list(candidates))
    k = sum(1 for v in lp[1:] if v > lp[0])
    return {"exposure": math.log2(len(candidates) + 1) - math.log2(k + 1), "rank": k + 1, "secret_bits": lp[0],
            "cand_bits": lp[1:], "s": s}


# ------------------------------------------------------------------------------------------ families (cached)
_CACHE = {}


def _family(name: str):
    """Tokenizer (raw and wrapped), float32 model, float64 copy for the oracle, the oracle's exposures after the
    data prompt and after the glued prompt; built once per module run."""
    if name not in _CACHE:
        clean, text = _corpus()
        raw = _tokenizer(name, clean)
        hf = PreTrainedTokenizerFast(tokenizer_object=raw)
        model = _model(name, raw.get_vocab_size())
        steps, lr = TRAIN[name]
        loss = _train(model, raw.encode(text, add_special_tokens=False).ids, steps, lr)
        fam = {"name": name, "raw": raw, "hf": hf, "model": model, "text": text, "loss": loss,
               "model64": copy.deepcopy(model).double().eval()}
        cands = random_candidates(N_CAND, FMT, seed=1, exclude=[SECRET])
        fam["candidates"] = cands
        fam["data_prompt"] = _data_prompt(text, PREFIX)
        fam["oracle"] = oracle_exposure(fam, fam["data_prompt"], cands)
        fam["oracle_glued"] = oracle_exposure(fam, PREFIX, cands)  # the bug: prefix glued to the secret
        _CACHE[name] = fam
    return _CACHE[name]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, one_thread):
    return _family(request.param)


def _audit_one(fam, prompt):
    item = AuditItem(prompt=prompt, secret=SECRET, fmt=FMT, candidates=list(fam["candidates"]))
    return audit(fam["model"], fam["hf"], [item])[0]


# --------------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("prefix", PREFIXES, ids=["no_space", "space"])
def test_locate_all_prompt_is_the_data_text(prefix):
    _, text = _corpus()
    want = _data_prompt(text, prefix)
    assert want == PREFIX + " " and want.endswith("is ")
    (loc,) = locate_all([SecretSpec(SECRET, prefix=prefix, fmt=FMT)], [text])
    assert loc.prompts == [want], loc.prompts
    assert loc.prompt_counts == [N_INSERT] and loc.n_occurrences == N_INSERT and loc.n_prefixed == N_INSERT
    assert PREFIX not in loc.prompts  # never the bare prefix that glues to the secret


def test_memorised(family):
    """The comparison below is not trivial: the secret is (partly) memorised, its oracle exposure clearly above 0
    (measured here: ~5.0 bits byte-level, ~7.4 bits metaspace, of log2(501) = 8.97)."""
    o = family["oracle"]
    assert o["exposure"] >= 2.0, (family["name"], o["exposure"])


@pytest.mark.parametrize("prefix", PREFIXES, ids=["no_space", "space"])
def test_audit_matches_oracle(family, prefix):
    (loc,) = locate_all([SecretSpec(SECRET, prefix=prefix, fmt=FMT)], [family["text"]])
    prompt = loc.prompts[0]
    assert prompt == family["data_prompt"]
    r = _audit_one(family, prompt)
    o = family["oracle"]
    # secret log-perplexity (bits): float32 model (package) vs float64 copy (oracle)
    assert r["secret_logppl"] == pytest.approx(-o["secret_bits"], rel=1e-5, abs=1e-3), (r["secret_logppl"], o)
    cand = torch.tensor(o["cand_bits"], dtype=torch.float64).neg()
    assert r["n_candidates"] == N_CAND
    assert r["cand_logppl_mean"] == pytest.approx(float(cand.mean()), rel=1e-4, abs=1e-3)
    assert r["cand_logppl_std"] == pytest.approx(float(cand.std()), rel=1e-3, abs=1e-3)
    # rank: exact unless a candidate ties the secret within float error
    ties = sum(1 for v in o["cand_bits"] if abs(v - o["secret_bits"]) < 1e-3)
    assert abs(r["exposure_rank"] - o["exposure"]) <= 0.05 or ties, (r["exposure_rank"], o["exposure"])
    if not ties:
        assert r["rank"] == o["rank"] and r["exposure_rank"] == pytest.approx(o["exposure"], abs=1e-12)
    assert r["exposure"] >= r["exposure_rank"] - 1e-12 and r["exposure_hi"] >= r["exposure"] - 1e-12
    for c in r["completions"]:
        assert prompt + SECRET == c["prompt"] + c["rest"]
    assert isinstance(r["extracted"], bool)


def test_glued_prompt_is_wrong(family):
    """The old bug scored PREFIX + SECRET ("...code is7051..."), a string the model never saw. The oracle's exposure
    after the glued prompt differs from the one after the data's prompt, so a wrong prompt would be caught; the
    package's scorer reproduces the glued number too (the error was the prompt, not the scoring). Measured here
    (n = 500): byte-level 4.97 bits after the data prompt vs 1.95 glued; metaspace 7.38 vs 5.51."""
    o, g = family["oracle"], family["oracle_glued"]
    r = _audit_one(family, PREFIX)
    assert r["secret_logppl"] == pytest.approx(-g["secret_bits"], rel=1e-5, abs=1e-3)
    assert abs(r["exposure_rank"] - g["exposure"]) <= 0.05
    if abs(o["exposure"] - g["exposure"]) <= 0.5:
        pytest.skip(f"{family['name']}: glued exposure {g['exposure']:.2f} ~ data-prompt exposure "
                    f"{o['exposure']:.2f} on this family (test_glued_prompt_differs_somewhere covers both)")
    assert abs(o["exposure"] - g["exposure"]) > 0.5


def test_glued_prompt_differs_somewhere(one_thread):
    gaps = {n: _family(n)["oracle"]["exposure"] - _family(n)["oracle_glued"]["exposure"] for n in FAMILIES}
    assert max(abs(v) for v in gaps.values()) > 0.5, gaps


# ----------------------------------------------------------------------------------------------------- leak_of
@pytest.mark.parametrize("completion,leak,kind", [
    ("5311 0486 7777", True, "group"),      # the next whole group (5311) reproduced, and more
    ("53", False, None),                    # p_random = 1e-2, not < PARTIAL_P = 1e-2
    ("531", True, "partial"),               # p_random = 1e-3
    ("9999", False, None),                  # nothing matched
    ("5311 0486 2210 9934", True, "full"),  # the whole rest
    ("53110486 22109934\n", True, "full"),  # whitespace ignored
])
def test_leak_of_table(completion, leak, kind):
    prompt, secret, fmt = "the vault access code is ", "5311 0486 2210 9934", "dddd dddd dddd dddd"
    d = leak_of(completion, len(prompt), prompt, secret, fmt)
    assert d["leak"] is leak, d
    digits = {"5311 0486 7777": 8, "53": 2, "531": 3, "9999": 0}.get(completion, 16)
    assert d["matched"] == digits
    assert d["p_random"] == pytest.approx(10.0 ** -digits)
    assert d["full"] is (kind == "full")
    assert d["group"] is (kind in ("group", "full"))
