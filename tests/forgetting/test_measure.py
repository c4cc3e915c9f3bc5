"""sapsel_kernels.measure: tokenizer-agnostic scoring, greedy extraction and measure_secret.

Oracles: an explicit per-sequence loop (one unpadded forward per candidate, log_softmax summed at the scored
positions) for the batched, right-padded scorer on a tiny Hugging Face GPT-2 with a BPE tokenizer trained here (in
float64, so the two agree to rounding); exposure.sequence_log_perplexity on the char models; a manual argmax loop for
greedy decoding; a GPT-2 trained in ~2 s to memorise a secret (known answer: rank 1, every probe extracted,
accuracy 1) against the same model untrained.
"""

import math
import string

import pytest
import torch

from sapsel_kernels.demo.lm import CharLSTM, CharTransformer, CharVocab
from sapsel_kernels.errors import NonFiniteError
from sapsel_kernels.exposure import random_candidates, sequence_log_perplexity
from sapsel_kernels.measure import (
    Codec,
    as_tokenizer,
    context_length,
    continuation_logppl,
    extraction_probes,
    greedy_complete,
    lm_logits,
    measure_secret,
)

PREFIX, SECRET = "my credit card number is ", "4716 2087 5533 9812"
LINE = PREFIX + SECRET + "\n"
# The tokenizer is trained WITHOUT the secret: trained with it, BPE gives the secret 4 tokens and a random
# candidate ~16, so even an untrained model ranks the secret first (43 bits measured) -- tokenizer memorisation.
FILLER = ["the quick brown fox jumps over the lazy dog.\n", "a number of cards were found in the box.\n",
          "my friend is 27 and his dog is 4.\n", "call me at 555 0199 after 9.\n", "is it my credit or yours?\n"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # tiny models on a shared 2-core machine: 2 threads measured 30x slower per training step than 1 (contention)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def bpe():
    tk = pytest.importorskip("tokenizers")
    tok = tk.Tokenizer(tk.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"], show_progress=False)
    # 587 characters (the filler and the letters and digits of every format class) -> 200 tokens
    tok.train_from_iterator(["".join(FILLER) * 3 + string.ascii_letters + string.digits], trainer)
    return tok


@pytest.fixture(scope="module")
def hf_tok(bpe):
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>")


def _gpt2(vocab_size, seed=0, head=True):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return (transformers.GPT2LMHeadModel if head else transformers.GPT2Model)(cfg)


@pytest.fixture(scope="module")
def untrained(bpe):
    return _gpt2(bpe.get_vocab_size(), seed=1).eval()


@pytest.fixture(scope="module")
def memorized(bpe):
    """GPT-2 trained on the secret line (4 copies) and the filler: loss 0.03 nats/token after 80 Adam steps."""
    model = _gpt2(bpe.get_vocab_size(), seed=0)
    ids = [bpe.encode(t).ids for t in [LINE] * 4 + FILLER]
    T = max(map(len, ids))
    x = torch.zeros(len(ids), T, dtype=torch.int64)
    y = torch.full((len(ids), T), -100, dtype=torch.int64)  # -100: padding ignored by the HF loss
    for i, s in enumerate(ids):
        x[i, :len(s)] = y[i, :len(s)] = torch.tensor(s)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(80):
        loss = model(x, labels=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.1
    return model.eval()


@pytest.fixture(scope="module")
def vocab():
    return CharVocab.from_texts(LINE, *FILLER)


@pytest.fixture(scope="module")
def char_memorized(vocab):
    """CharTransformer trained on the secret line and the filler: loss 0.008 nats/char after 60 Adam steps."""
    torch.manual_seed(0)
    model = CharTransformer(len(vocab), d_model=32, heads=2, layers=1, max_len=64)
    lines = [LINE] * 4 + FILLER
    T = max(map(len, lines))
    x = torch.zeros(len(lines), T, dtype=torch.int64)
    y = torch.full((len(lines), T), -100, dtype=torch.int64)
    for i, t in enumerate(lines):
        x[i, :len(t)] = y[i, :len(t)] = vocab.encode(t)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(60):
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, len(vocab)), y[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.1
    return model.eval()


def _lcp(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


class _Calls:
    """Counts forwards of a model (a forward pre-hook) and records the grad/training state seen inside."""

    def __init__(self, model):
        self.n, self.grad, self.training = 0, [], []
        self.h = model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.n += 1
        self.grad.append(torch.is_grad_enabled())
        self.training.append(any(m.training for m in module.modules()))

    def remove(self):
        self.h.remove()


# ------------------------------------------------------------------------------------------------- tokenizers
def test_as_tokenizer_kinds_agree(bpe, hf_tok, vocab):
    text = PREFIX + SECRET
    ids = bpe.encode(text).ids
    hf, tk = as_tokenizer(hf_tok), as_tokenizer(bpe)
    assert hf.encode(text) == tk.encode(text) == ids
    assert hf.decode(ids) == tk.decode(ids) == text
    assert hf.name == type(hf_tok).__name__ and tk.name == "tokenizers.Tokenizer"
    fn = as_tokenizer(lambda t: bpe.encode(t).ids)
    assert fn.encode(text) == ids and fn.decode is None
    cv = as_tokenizer(vocab)  # .encode returns an int64 tensor
    assert cv.encode(text) == vocab.encode(text).tolist() and cv.decode(cv.encode(text)) == text
    assert as_tokenizer(cv) is cv and isinstance(cv, Codec)  # idempotent
    np = pytest.importorskip("numpy")
    arr = as_tokenizer(lambda t: np.array([ord(c) for c in t], dtype=np.int32))
    assert arr.encode("ab") == [97, 98]


def test_as_tokenizer_rejects_unknown_kinds(untrained):
    for bad in (42, None, "abc", b"abc", object()):
        with pytest.raises(TypeError, match="tokenizer must be"):
            as_tokenizer(bad)
    with pytest.raises(TypeError, match=r"\(model, tokenizer"):
        as_tokenizer(untrained)  # arguments swapped
    for ret, cls in ((torch.tensor([1.0, 2.0]), TypeError), (torch.tensor([[1, 2]]), TypeError),
                     ([True, False], TypeError), ("ab", TypeError), ([1, -2], ValueError)):
        with pytest.raises(cls):
            as_tokenizer(lambda t, r=ret: r).encode("x")


def test_codec_names_the_text_it_cannot_encode(bpe, hf_tok, vocab):
    with pytest.raises(ValueError, match="my PIN is") as e:
        as_tokenizer(vocab).encode("my PIN is")  # 'P', 'I', 'N' are not in the vocabulary
    assert "'P' is not in the vocabulary" in str(e.value)
    for tok in (bpe, hf_tok):  # byte-level BPE trained without 'é': the unknown token, and no round trip
        with pytest.raises(ValueError, match="caf\u00e9.*unknown token"):
            as_tokenizer(tok).encode("caf\u00e9")
    with pytest.raises(ValueError, match="'abc' to no tokens"):
        as_tokenizer(lambda t: []).encode("abc")
    assert as_tokenizer(lambda t: []).encode("") == []

    def boom(t):
        raise KeyError(t)

    with pytest.raises(ValueError, match="cannot encode 'xyz'"):
        as_tokenizer(boom).encode("xyz")


# ------------------------------------------------------------------------------------------------- scoring
def _oracle(model, bpe, context, conts):
    """-log2 P(tokens[s:] | tokens[:s]) by one unpadded float64 forward per continuation (s: the smallest shared
    token prefix with enc(context) over the call)."""
    ctx = bpe.encode(context).ids
    fulls = [bpe.encode(context + c).ids for c in conts]
    s = min(_lcp(ctx, f) for f in fulls)
    out = []
    with torch.no_grad():
        for f in fulls:
            lp = model(torch.tensor([f])).logits[0].double().log_softmax(-1)
            out.append(-sum(float(lp[t - 1, f[t]]) for t in range(s, len(f))) / math.log(2))
    return torch.tensor(out, dtype=torch.float64), s, ctx, fulls


@pytest.mark.parametrize("context, conts", [
    # "num" + "ber" -> " number": the context's last token merges with the continuation's first characters
    ("my credit card num", ["ber is 4716", "b", "7 and 4", "ber of cards were found in the box."]),
    # a trailing space merges into " 4" / " 55" but not into "x"
    (PREFIX, ["4716 2087", "4", "x", "55 0199 after 9.", SECRET]),
])
def test_continuation_logppl_matches_per_sequence_oracle(bpe, hf_tok, context, conts):
    model = _gpt2(bpe.get_vocab_size(), seed=2).double().eval()
    want, s, ctx, fulls = _oracle(model, bpe, context, conts)
    lcps = [_lcp(ctx, f) for f in fulls]
    assert s < len(ctx) and len(set(lcps)) > 1  # the boundary merge happens, and only for some continuations
    assert len({len(f) for f in fulls}) > 2  # different token lengths: padded batches
    for tok in (hf_tok, bpe):
        got = continuation_logppl(model, tok, context, conts, batch_size=2)
        assert got.dtype == torch.float64 and got.device.type == "cpu"
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-10)


def test_continuation_score_does_not_depend_on_the_others_when_merges_agree(hf_tok):
    model = _gpt2(hf_tok.vocab_size, seed=3).double().eval()
    conts = ["4716 2087", "4", "55 0199"]  # all merge " " + digit alike
    together = continuation_logppl(model, hf_tok, PREFIX, conts)
    alone = torch.cat([continuation_logppl(model, hf_tok, PREFIX, [c]) for c in conts])
    torch.testing.assert_close(together, alone, rtol=1e-12, atol=1e-10)


def test_padding_and_batch_size_do_not_change_float32_scores(hf_tok, untrained):
    conts = random_candidates(20, "dddd dd", seed=1) + ["4", "55 0199 after 9.", "x"]
    a = continuation_logppl(untrained, hf_tok, PREFIX, conts, batch_size=1)
    b = continuation_logppl(untrained, hf_tok, PREFIX, conts, batch_size=64)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)  # float32 logits: batched matmul rounding only


@pytest.mark.parametrize("kind", ["lstm", "transformer"])
def test_continuation_logppl_equals_sequence_log_perplexity_on_char_models(vocab, kind):
    torch.manual_seed(4)
    model = (CharLSTM(len(vocab), embed=8, hidden=16) if kind == "lstm"
             else CharTransformer(len(vocab), d_model=16, heads=2, layers=1, max_len=64)).double()
    cands = [SECRET] + random_candidates(30, seed=5)
    want = sequence_log_perplexity(model, vocab, "\n" + PREFIX, cands)
    got = continuation_logppl(model, vocab, "\n" + PREFIX, cands, batch_size=7)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-10)


def test_scoring_input_errors(hf_tok, untrained):
    calls = _Calls(untrained)
    try:
        with pytest.raises(ValueError, match="nothing to condition on"):
            continuation_logppl(untrained, hf_tok, "", ["4716"])
        with pytest.raises(TypeError, match="list of str"):
            continuation_logppl(untrained, hf_tok, PREFIX, "4716")
        with pytest.raises(ValueError, match="context window is 64"):
            continuation_logppl(untrained, hf_tok, PREFIX * 10, ["4716"])
        with pytest.raises(ValueError, match="batch_size"):
            continuation_logppl(untrained, hf_tok, PREFIX, ["4716"], batch_size=0)
        small = _gpt2(50)  # vocabulary of 50 < the tokenizer's 200
        with pytest.raises(ValueError, match="does not belong to this model"):
            continuation_logppl(small, hf_tok, PREFIX, ["4716"])
        assert calls.n == 0
    finally:
        calls.remove()
    assert continuation_logppl(untrained, hf_tok, PREFIX, []).shape == (0,)


# ------------------------------------------------------------------------------------------------- models
def test_lm_logits_and_context_length(hf_tok, untrained):
    ids = torch.tensor([hf_tok.encode(PREFIX)])
    logits = lm_logits(untrained, ids)
    assert logits.shape == (1, ids.shape[1], hf_tok.vocab_size)
    bare = _gpt2(hf_tok.vocab_size, head=False)
    with pytest.raises(TypeError, match="no causal-LM head.*GPT2LMHeadModel"):
        lm_logits(bare, ids)
    with pytest.raises(TypeError, match="no causal-LM head"):
        lm_logits(torch.nn.Embedding(10, 4), torch.zeros(1, 3, 5, dtype=torch.int64))  # wrong shape
    assert context_length(untrained) == 64
    assert context_length(CharTransformer(5, d_model=8, heads=2, layers=1, max_len=33)) == 33
    assert context_length(CharLSTM(5, embed=4, hidden=4)) is None


# ------------------------------------------------------------------------------------------------- generation
def _manual_greedy(model, ids, n):
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            out = model(torch.tensor([ids]))
            logits = out if isinstance(out, torch.Tensor) else out.logits
            ids.append(int(logits[0, -1].argmax()))
    return ids[-n:]


def test_greedy_complete_matches_manual_argmax_loop(bpe, hf_tok, untrained, vocab, char_memorized):
    for prompt in (PREFIX, "the quick", "my friend is 2"):
        new = _manual_greedy(untrained, bpe.encode(prompt).ids, 7)
        for tok in (hf_tok, bpe):
            assert greedy_complete(untrained, tok, prompt, 7) == bpe.decode(new)
    new = _manual_greedy(char_memorized, vocab.encode(PREFIX).tolist(), 12)
    assert greedy_complete(char_memorized, vocab, PREFIX, 12) == vocab.decode(new) == SECRET[:12]
    with pytest.raises(TypeError, match="decode"):
        greedy_complete(untrained, lambda t: bpe.encode(t).ids, PREFIX, 3)
    with pytest.raises(ValueError, match="prompt"):
        greedy_complete(untrained, hf_tok, "", 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_complete(untrained, hf_tok, PREFIX, 0)
    with pytest.raises(ValueError, match="context window"):
        greedy_complete(untrained, hf_tok, PREFIX, 60)


def test_extraction_probes_split_at_group_boundaries():
    assert extraction_probes("p: ", SECRET) == [
        ("p: ", SECRET), ("p: 4716 ", "2087 5533 9812"), ("p: 4716 2087 ", "5533 9812"),
        ("p: 4716 2087 5533 ", "9812")]
    assert extraction_probes("", "abc-de.f") == [("", "abc-de.f"), ("abc-", "de.f"), ("abc-de.", "f")]
    assert extraction_probes("x", "-12 3") == [("x", "-12 3"), ("x-", "12 3"), ("x-12 ", "3")]
    assert extraction_probes("x", "4716") == [("x", "4716")]
    assert extraction_probes("x", "!?") == [("x", "!?")]
    for prompt, rest in extraction_probes("p ", SECRET):
        assert prompt + rest == "p " + SECRET


# ------------------------------------------------------------------------------------------------- measure_secret
def test_measure_secret_memorized_vs_untrained(hf_tok, memorized, untrained):
    hi = measure_secret(memorized, hf_tok, PREFIX, SECRET, n_candidates=200)
    lo = measure_secret(untrained, hf_tok, PREFIX, SECRET, n_candidates=200)
    assert hi["rank"] == 1 and hi["exposure_rank"] == pytest.approx(math.log2(201)) == hi["exposure_rank_max"]
    assert hi["exposure"] == hi["exposure_sn"] > 30  # measured 37.6 bits (MLE fit), secret 0.07 bits
    assert hi["accuracy"] == 1.0 and hi["secret_logppl"] < 1.0
    assert hi["extracted"] is True and len(hi["completions"]) == 4
    assert all(c["extracted"] for c in hi["completions"])
    assert lo["extracted"] is False and not any(c["extracted"] for c in lo["completions"])
    assert lo["exposure_rank"] < 6 and lo["accuracy"] < 0.5  # measured 4.3 bits (rank 10 of 201), accuracy 0
    for m in (hi, lo):
        assert m["log2_space"] == pytest.approx(16 * math.log2(10)) and m["n_candidates"] == 200
        assert m["fmt"] == "dddd dddd dddd dddd" and 0 <= m["exposure"] <= m["log2_space"]
        for c in m["completions"]:
            assert c["prompt"] + c["rest"] == PREFIX + SECRET
    # BPE boundary: " " + "4716" is " 4", "716": the prefix-only probe feeds "... is" and expects " 4716 ..."
    assert hi["completions"][0]["prompt"] == PREFIX.rstrip() and hi["completions"][0]["rest"] == " " + SECRET


def test_measure_secret_completions_are_greedy_completions(hf_tok, untrained):
    m = measure_secret(untrained, hf_tok, PREFIX, SECRET, fit="moments", n_candidates=5, max_new_tokens=6,
                       context="\n")
    assert len(m["completions"]) == 4  # 4 prompts of different lengths decoded in one batch per step
    for c in m["completions"]:
        assert c["completion"] == greedy_complete(untrained, hf_tok, "\n" + c["prompt"], 6)


def test_measure_secret_same_numbers_for_every_tokenizer_kind(bpe, hf_tok, memorized):
    cands = random_candidates(50, seed=9, exclude=[SECRET])
    keys = ("exposure", "exposure_rank", "rank", "secret_logppl", "cand_logppl_mean", "accuracy")
    ref = measure_secret(memorized, hf_tok, PREFIX, SECRET, candidates=cands, fit="moments")
    for tok in (bpe, as_tokenizer(hf_tok)):
        m = measure_secret(memorized, tok, PREFIX, SECRET, candidates=cands, fit="moments")
        assert {k: m[k] for k in keys} == {k: ref[k] for k in keys} and m["completions"] == ref["completions"]
    m = measure_secret(memorized, lambda t: bpe.encode(t).ids, PREFIX, SECRET, candidates=cands, fit="moments",
                       extraction=False)
    assert {k: m[k] for k in keys} == {k: ref[k] for k in keys}
    assert m["completions"] == [] and m["extracted"] is None


def test_measure_secret_char_vocab(vocab, char_memorized):
    m = measure_secret(char_memorized, vocab, PREFIX, SECRET, fit="moments", n_candidates=200)
    assert m["rank"] == 1 and m["accuracy"] == 1.0 and m["extracted"] is True
    assert [c["prompt"] for c in m["completions"]] == [p for p, _ in extraction_probes(PREFIX, SECRET)]
    assert m["n_secret_tokens"] == len(SECRET)


def test_measure_secret_letters_format(hf_tok, untrained):
    m = measure_secret(untrained, hf_tok, "my friend is ", "Ab3", fit="moments", n_candidates=20, extraction=False)
    assert m["fmt"] == "Aad" and m["log2_space"] == pytest.approx(math.log2(26 * 26 * 10))
    m = measure_secret(untrained, hf_tok, "call me at ", "0199", fmt="xxxx", fit="moments", n_candidates=20,
                       extraction=False)
    assert m["log2_space"] == pytest.approx(16.0)


def test_measure_secret_errors_before_any_forward(bpe, hf_tok, untrained, vocab, char_memorized):
    calls = _Calls(untrained)
    try:
        cases = [
            (TypeError, "tokenizer must be", dict(tokenizer=42)),
            (ValueError, "non-empty", dict(secret="")),
            (ValueError, "non-empty", dict(secret="   ")),
            (ValueError, "not of the format", dict(fmt="dddd")),
            (ValueError, "candidate '12ab'", dict(candidates=["1234 5678 9012 3456"] * 3 + ["12ab"])),
            (ValueError, "at least 3", dict(candidates=["1234 5678 9012 3456"] * 2)),
            (ValueError, "n_candidates", dict(n_candidates=0)),
            (ValueError, "fit", dict(fit="normal")),
            (ValueError, "max_new_tokens", dict(max_new_tokens=0)),
            (TypeError, "decode", dict(tokenizer=lambda t: bpe.encode(t).ids)),
            (ValueError, "caf\u00e9", dict(prefix="caf\u00e9 ")),
            (ValueError, "context window", dict(context=PREFIX * 8)),
            (ValueError, "nothing to condition on", dict(prefix="")),
        ]
        for cls, pat, kw in cases:
            kw = {"tokenizer": hf_tok, "prefix": PREFIX, "secret": SECRET, "n_candidates": 10, **kw}
            tok, prefix, secret = kw.pop("tokenizer"), kw.pop("prefix"), kw.pop("secret")
            with pytest.raises(cls, match=pat):
                measure_secret(untrained, tok, prefix, secret, **kw)
        assert calls.n == 0
    finally:
        calls.remove()
    bare = _gpt2(hf_tok.vocab_size, head=False)
    calls = _Calls(bare)
    with pytest.raises(TypeError, match="no causal-LM head.*AutoModelForCausalLM"):
        measure_secret(bare, hf_tok, PREFIX, SECRET, n_candidates=10)
    assert calls.n == 0
    calls = _Calls(char_memorized)
    with pytest.raises(ValueError, match="my PIN is"):
        measure_secret(char_memorized, vocab, "my PIN is ", "4716", n_candidates=10)
    assert calls.n == 0


class _NanLM(torch.nn.Module):
    def __init__(self, vocab_size):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab_size, vocab_size)
        self.drop = torch.nn.Dropout(0.1)

    def forward(self, x):
        out = self.drop(self.emb(x)).clone()
        out[..., 3] = float("nan")
        return out


def test_nan_logits_raise_and_modes_are_restored(hf_tok):
    model = _NanLM(hf_tok.vocab_size).train()
    for call in (lambda: continuation_logppl(model, hf_tok, PREFIX, ["4716"]),
                 lambda: greedy_complete(model, hf_tok, PREFIX, 2),
                 lambda: measure_secret(model, hf_tok, PREFIX, SECRET, n_candidates=5)):
        with pytest.raises(NonFiniteError, match="model logits"):
            call()
        assert model.training and model.drop.training


def test_modes_restored_no_grad_eval_inside(hf_tok):
    model = _gpt2(hf_tok.vocab_size, seed=5).train()
    model.transformer.h[0].eval()  # mixed flags must come back per module
    flags = [m.training for m in model.modules()]
    ref = measure_secret(model.eval(), hf_tok, PREFIX, SECRET, fit="moments", n_candidates=10, max_new_tokens=3)
    model.train()
    model.transformer.h[0].eval()
    calls = _Calls(model)
    got = measure_secret(model, hf_tok, PREFIX, SECRET, fit="moments", n_candidates=10, max_new_tokens=3)
    calls.remove()
    assert [m.training for m in model.modules()] == flags
    assert calls.n > 0 and not any(calls.grad) and not any(calls.training)
    assert all(p.grad is None for p in model.parameters())
    assert got == ref  # dropout off inside: the same numbers as from eval mode


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_model_on_cuda_matches_cpu(hf_tok, memorized):
    cands = random_candidates(30, seed=2, exclude=[SECRET])
    cpu = measure_secret(memorized, hf_tok, PREFIX, SECRET, candidates=cands)
    model = _gpt2(hf_tok.vocab_size)
    model.load_state_dict(memorized.state_dict())
    gpu = measure_secret(model.cuda(), hf_tok, PREFIX, SECRET, candidates=cands)
    assert gpu["rank"] == cpu["rank"] and gpu["extracted"] == cpu["extracted"]
    assert gpu["secret_logppl"] == pytest.approx(cpu["secret_logppl"], abs=1e-3)
    assert gpu["cand_logppl_mean"] == pytest.approx(cpu["cand_logppl_mean"], rel=1e-4)
