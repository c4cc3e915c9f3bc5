"""``forget``: token-aligned Z / Z̃, the Targeted rule's search, the end-to-end job on a character LM that memorised
a card number, and the errors raised before any training."""

import functools
import math

import pytest
import torch

import sapsel_kernels as sk
from sapsel_kernels.demo import lm
from sapsel_kernels.forget import (IGNORE, MeasureConfig, SelectConfig, TargetConfig, UpdateConfig,
                                    build_forget_data, forget, lm_loss)
from sapsel_kernels.rules import Targeted
from sapsel_kernels.space import ParamSpace

SECRET = lm.CANARY_SECRET
PREFIX = lm.CANARY_PREFIX
CANARY = {"secret": SECRET, "prefix": PREFIX}  # forget's secret argument: the secret with the prefix that elicits it
BENIGN = {**CANARY, "replacement": lm.BENIGN_REPLACEMENT}  # ... and the replacement Z̃ holds


@functools.lru_cache(maxsize=None)
def _memorised():
    """A character LSTM (27k parameters) trained until it completes the card number: (model state, corpus)."""
    model, cc = lm.memorised_canary_lstm(10_000, 8, hidden=64, steps=350)
    return {k: v.clone() for k, v in model.state_dict().items()}, cc


def _model():
    state, cc = _memorised()
    model = lm.build_model("lstm", len(cc.vocab), embed=16, hidden=64)
    model.load_state_dict(state)
    return model, cc


# ------------------------------------------------------------------------------------------------ data alignment
def test_windows_are_token_aligned_on_a_character_codec():
    """Oracle: with a character codec and a same-length replacement, Z̃ is Z with exactly the secret's characters
    replaced, and Z is exactly the set of windows whose targets overlap an occurrence (brute force over the text)."""
    _, cc = _model()
    repl = "0000 1111 2222 3333"
    d = build_forget_data(cc.vocab, [cc.text], SECRET, repl, seq_len=32, heldout=[cc.heldout])
    text, V = cc.text, cc.vocab
    spans = [(i, i + len(SECRET)) for i in range(len(text)) if text.startswith(SECRET, i)]
    assert d.n_occurrences == len(spans) == 8 and d.offsets_exact
    starts = list(range(0, len(text) - 32, 16))
    starts += [len(text) - 33] if starts[-1] != len(text) - 33 else []  # the last window ends at the last character
    expect = [s for s in starts if any(a < s + 33 and b > s + 1 for a, b in spans)]  # a target (s+1 .. s+32) in a span
    assert len(d.affected[0]) == len(expect)
    clean = text.replace(SECRET, repl)
    for j, s in enumerate(expect):
        assert torch.equal(d.affected[0][j], V.encode(text[s:s + 32]))
        assert torch.equal(d.corrected[1][j], V.encode(clean[s + 1:s + 33]))
        ys = d.affected_secret[1][j]
        inside = torch.tensor([any(a <= s + 1 + t < b for a, b in spans) for t in range(32)])
        assert torch.equal(ys != IGNORE, inside)
        assert torch.equal(ys[inside], d.affected[1][j][inside])
    # retain windows hold no secret character; held-out windows come from the held-out text
    for x in d.retain[0]:
        assert SECRET[:4] not in V.decode(x)
    assert len(d.val[0]) + len(d.test[0]) == (len(V.encode(cc.heldout)) - 32 + 32) // 33


def test_each_window_knows_the_secrets_it_targets_and_balancing_evens_their_weight():
    """Oracle (brute force over the text): a Z window's owners are exactly the secrets with a character among its
    targets. balanced_order repeats the windows of the secret with fewer windows until both weigh about the same,
    in a seeded shuffle; nothing to repeat (one secret, counts within 1.5x) gives None; factors round halves up."""
    from sapsel_kernels.forgetting.forget import balanced_order

    _, cc = _model()
    other = "4242 1717"
    text = cc.text
    occ = [a for a in range(len(text)) if text.startswith(SECRET, a)]
    cut = [next(j for j in range(c, len(text)) if all(not (a <= j < a + len(SECRET)) for a in occ))
           for c in (len(text) // 3, 2 * len(text) // 3)]
    text = text[:cut[0]] + f" {other} " + text[cut[0]:cut[1]] + f" {other} " + text[cut[1]:]
    assert text.count(other) == 2 and text.count(SECRET) == 8
    d = build_forget_data(cc.vocab, [text], [SECRET, other], [lm.BENIGN_REPLACEMENT, "0000 0000"], seq_len=32,
                          heldout=[cc.heldout])
    spans = {k: [(i, i + len(sec)) for i in range(len(text)) if text.startswith(sec, i)]
             for k, sec in enumerate((SECRET, other))}
    starts = list(range(0, len(text) - 32, 16))
    starts += [len(text) - 33] if starts[-1] != len(text) - 33 else []
    expect = [s for s in starts if any(a < s + 33 and b > s + 1 for v in spans.values() for a, b in v)]
    assert len(d.owners) == len(d.affected[0]) == len(expect)
    for j, s in enumerate(expect):
        want = tuple(k for k, v in spans.items() if any(a < s + 33 and b > s + 1 for a, b in v))
        assert d.owners[j] == want, (j, s)
        # per target position (a character: position t predicts text[s + 1 + t]) the secrets it lies in
        assert d.token_owners.shape[1:] == (32, 1)
        for t in range(32):
            inside = [k for k, v in spans.items() if any(a <= s + 1 + t < b for a, b in v)]
            assert d.token_owners[j, t].tolist() == (inside or [-1]), (j, t)
    counts = [sum(k in o for o in d.owners) for k in (0, 1)]
    assert counts[0] > 2 * counts[1] > 0
    order = balanced_order(d.owners, seed=5)
    assert order is not None and torch.equal(order, balanced_order(d.owners, seed=5))
    assert not torch.equal(order, balanced_order(d.owners, seed=6))
    after = [sum(k in d.owners[int(w)] for w in order) for k in (0, 1)]
    assert abs(after[0] - after[1]) <= 0.25 * max(after)  # from counts[0] > 2 x counts[1]
    assert sorted(set(order.tolist())) == list(range(len(d.owners)))  # every window stays in
    assert balanced_order([(0,), (0,), (1,), (1,)], seed=0) is None
    assert balanced_order([(0,)] * 5 + [(1,)] * 4, seed=0) is None  # 5 / 4 rounds to 1: nothing repeats
    assert balanced_order([], seed=0) is None
    assert balanced_order([(0,)] * 5, seed=0) is None
    assert sorted(balanced_order([(0,)] * 4 + [(1,)], seed=0).tolist()) == [0, 1, 2, 3, 4, 4, 4, 4]
    # factors round half up: 3 / 2 = 1.5 -> 2, 5 / 2 = 2.5 -> 3
    assert sorted(balanced_order([(0,)] * 3 + [(1,)] * 2, seed=0).tolist()) == [0, 1, 2, 3, 3, 4, 4]
    assert sorted(balanced_order([(0,)] * 5 + [(1,)] * 2, seed=0).tolist()) == [0, 1, 2, 3, 4] + [5] * 3 + [6] * 3
    # a window of two secrets takes the larger factor (secret 1: 5 / 1): the rare secret is not short-changed
    assert sorted(balanced_order([(0,)] * 4 + [(0, 1)], seed=0).tolist()) == [0, 1, 2, 3] + [4] * 5


def test_a_token_spanning_two_adjacent_secrets_counts_for_both():
    """A BPE merge across two touching occurrences ("k9x" + "y7z" -> one token "k9xy7z"): the window's owners hold
    both secrets, not the last one written."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    filler = "the quick brown fox jumps over the lazy dog and runs far away from here\n"
    text = (filler * 3 + "key k9xy7z ok\n") * 6 + filler * 3
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], tokenizers.trainers.BpeTrainer(vocab_size=200, special_tokens=["[UNK]"],
                                                                    show_progress=False))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok)
    assert "k9xy7z" in fast.convert_ids_to_tokens(fast(text)["input_ids"])
    d = build_forget_data(fast, [text], ["k9x", "y7z"], ["aaa", "bbb"], seq_len=16, heldout=0.2)
    assert d.owners and all(o == (0, 1) for o in d.owners)
    # the merged token is owned by both, at every position it is a target, and only there
    merged = fast.convert_tokens_to_ids("k9xy7z")
    at = d.affected_secret[1] == merged
    assert d.token_owners.shape[2] == 2 and bool(at.any())
    assert bool((d.token_owners[at] == torch.tensor([0, 1])).all())
    assert bool((d.token_owners[~at] == -1).all())


def test_the_focused_term_is_the_npo_mean_over_the_active_secrets_tokens_only():
    """Oracle written from the definition (float64; the term works in float32 logits, hence rtol 1e-6):
    (2/β)·softplus(β·(ref − ℓ)) averaged over the target tokens of the active
    secrets, ℓ from the model's own log-softmax. The term takes the pool's next batch with an active token (a batch
    of met secrets only is skipped), every secret active again once all are met, and its gradient flows."""
    from sapsel_kernels.forgetting.forget import Focus, focused_npo

    torch.manual_seed(0)
    V, T = 11, 6
    model = torch.nn.Sequential(torch.nn.Embedding(V, 8), torch.nn.Linear(8, V)).double()
    x = torch.randint(0, V, (3, 2, T))
    y = torch.randint(0, V, (3, 2, T))
    own = torch.full((3, 2, T, 2), -1, dtype=torch.int64)
    own[0, :, 1:3, 0] = 0          # batch 0: secret 0 only
    own[1, 0, 2, 0] = 0            # batch 1: secrets 0 and 1, and a token of both
    own[1, 1, 4:, 0] = 1
    own[1, 0, 3, :] = torch.tensor([0, 1])
    own[2, :, 0, 0] = 1            # batch 2: secret 1 only
    labels = torch.where((own >= 0).any(-1), y, torch.full_like(y, IGNORE))
    ref = torch.rand(3, 2, T, dtype=torch.float64) * (labels != IGNORE)
    pool = [(x[i], labels[i], ref[i], own[i]) for i in range(3)]
    beta = 0.5

    def oracle(i, active):
        logp = torch.log_softmax(model(x[i]), -1)
        terms, n = 0.0, 0
        for r in range(2):
            for t in range(T):
                secrets = [o for o in own[i, r, t].tolist() if o >= 0]
                if any(active[o] for o in secrets):
                    ell = -logp[r, t, y[i, r, t]]
                    terms = terms + (2 / beta) * torch.nn.functional.softplus(beta * (ref[i, r, t] - ell))
                    n += 1
        return terms / n

    focus = Focus(2)
    loss = focused_npo(beta, focus, pool)
    for i in (0, 1, 2, 0):  # all active: every batch in turn
        assert torch.allclose(loss(model, None), oracle(i, [True, True]), rtol=1e-6)
    focus.update([False, True])  # secret 0 met: batch 0 is skipped, batch 1 keeps secret 1's tokens only
    got = [loss(model, None) for _ in range(3)]  # the cursor was at batch 0: batches 1, 2, 1
    for g, i in zip(got, (1, 2, 1)):
        assert torch.allclose(g, oracle(i, [False, True]), rtol=1e-6)
    got[0].backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters())
    focus.update([False, False])  # every secret met: all active again, never an empty term
    assert focus.active.tolist() == [True, True]
    with pytest.raises(ValueError, match="3 flags for 2 secrets"):
        focus.update([True, False, True])


def test_windows_with_a_longer_replacement_on_a_bpe_tokenizer():
    """A replacement of another token length: Z̃ starts at the same character as Z (same leading tokens), and the
    secret's tokens are exactly those that overlap it (checked through the fast tokenizer's own offsets)."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    _, cc = _model()
    text = cc.text
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.train_from_iterator([text], tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"],
                                                                    show_progress=False))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok)
    repl = "not to be disclosed, ever"
    d = build_forget_data(fast, [text], SECRET, repl, seq_len=24, heldout=0.2)
    assert d.offsets_exact and len(d.affected[0]) > 0
    checked = 0
    for x, xc, ys in zip(d.affected[0], d.corrected[0], d.affected_secret[1]):
        a, c = fast.decode(x.tolist()), fast.decode(xc.tolist())
        if SECRET[:4] in a:  # the window starts before an occurrence: the same text up to it, then the replacement
            lead = a.split(SECRET[:4])[0]
            rest = c[len(lead):].strip() if c.startswith(lead) else None
            assert rest and (repl.startswith(rest) or rest.startswith(repl)), (a, c)
            checked += 1
        secret_text = fast.decode(ys[ys != IGNORE].tolist())
        assert secret_text.strip() and set(secret_text.replace(" ", "")) <= set("0123456789")
    assert checked >= 8


# ------------------------------------------------------------------------------------------------ the rule
def test_targeted_rule_fixed_steps_moves_only_s_and_lowers_the_secret_loss():
    model, cc = _model()
    d = build_forget_data(cc.vocab, [cc.text], SECRET, lm.BENIGN_REPLACEMENT, seq_len=32, heldout=[cc.heldout])
    sp = ParamSpace(model)
    theta0 = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    sel = sk.select_parameters(model, "random", 0.05, seed=1)
    zs = [(d.affected_secret[0][:8], d.affected_secret[1][:8])]
    zt = [(d.corrected[0][:8], d.corrected[1][:8])]
    before = float(lm_loss(model, zs[0]).detach())
    rep = sk.unlearn(model, lm_loss, zs, zt, sel, method=Targeted(steps=20, lr=1.0))
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    changed = torch.nonzero(theta != theta0).reshape(-1)
    assert set(changed.tolist()) <= set(sel.indices.tolist()) and rep.n_changed == changed.numel() > 0
    assert float(lm_loss(model, zs[0]).detach()) > before + 0.2  # the secret's tokens are less likely
    assert rep.info["steps_run"] == 20 and rep.n_gradients == 20 * 16
    assert sp.numel == theta.numel()


def test_targeted_rule_search_undoes_blocks_that_leave_the_budget():
    """A monitor that rejects the first two checks: θ_S is restored exactly each time, lr is divided by 4."""
    model, cc = _model()
    d = build_forget_data(cc.vocab, [cc.text], SECRET, lm.BENIGN_REPLACEMENT, seq_len=32, heldout=[cc.heldout])
    sel = sk.select_parameters(model, "random", 0.05, seed=1)
    theta0 = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    seen = []

    def monitor(step):
        theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        seen.append((step, bool(torch.equal(theta, theta0))))
        n = len(seen)
        return {"within_budget": n not in (2, 3), "done": n == 5, "score": 10.0 - n}

    zs = [(d.affected_secret[0][:8], d.affected_secret[1][:8])]
    zt = [(d.corrected[0][:8], d.corrected[1][:8])]
    rep = sk.unlearn(model, lm_loss, zs, zt, sel, method=Targeted(steps=40, lr=4e-3, check_every=3, monitor=monitor))
    # check 1 at step 0 (θ*), 2 and 3 rejected (each restored to θ*: the next block starts from it again)
    assert seen[0] == (0, True) and seen[1][0] == 3 and seen[2] == (3, False) and seen[3][0] == 3
    hist = rep.info["history"]
    assert [h["accepted"] for h in hist] == [True, False, False, True, True]
    assert [h["lr"] for h in hist] == pytest.approx([4e-3, 4e-3, 1e-3, 2.5e-4, 2.5e-4])
    assert rep.info["stopped_by"] == "target" and rep.info["steps_run"] == 12 and rep.info["steps_accepted"] == 6


def _hand_targeted(model, sel, zs, zt, retain, lr, phases, beta=1.0):
    """The oracle of the repair test: plain SGD on the flat parameter vector, masked to S, with the NPO objective
    (forget phases) or Z̃ + retain only (repair phases), written out by hand."""
    params = list(model.parameters())
    mask = torch.zeros(sum(p.numel() for p in params), dtype=torch.bool)
    mask[sel.indices] = True
    with torch.no_grad():
        ref = float(lm_loss(model, zs[0]))
    for forget_term in phases:
        loss = lm_loss(model, zt[0]) + lm_loss(model, retain[0])
        if forget_term:
            loss = loss + (2.0 / beta) * torch.nn.functional.softplus(beta * (ref - lm_loss(model, zs[0])))
        grads = torch.autograd.grad(loss, params)
        flat = torch.nn.utils.parameters_to_vector(params).detach()
        g = torch.cat([x.reshape(-1) for x in grads])
        flat[mask] -= lr * g[mask]
        torch.nn.utils.vector_to_parameters(flat, params)


def _search_problem():
    """The repair and polish tests' problem: the memorised LSTM, a random 5% selection, one batch of Z (secret
    targets only), Z̃ and retained windows, and θ* to reload."""
    model, cc = _model()
    d = build_forget_data(cc.vocab, [cc.text], SECRET, lm.BENIGN_REPLACEMENT, seq_len=32, heldout=[cc.heldout])
    sel = sk.select_parameters(model, "random", 0.05, seed=1)
    zs = [(d.affected_secret[0][:8], d.affected_secret[1][:8])]
    zt = [(d.corrected[0][:8], d.corrected[1][:8])]
    retain = [(d.retain[0][:8], d.retain[1][:8])]
    return model, sel, zs, zt, retain, {k: v.clone() for k, v in model.state_dict().items()}


def test_targeted_repair_steps_match_a_hand_written_loop_and_undo_when_they_fail():
    """repair_steps: a block over the budget is followed by descent on Z̃ + the retained text only (no forget term);
    it is kept when the monitor is back within the budget with a better score, and undone (θ_S restored exactly, lr
    divided by 4) when the repair does not get back within the budget or the secret came back."""
    model, sel, zs, zt, retain, state0 = _search_problem()
    theta0 = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])

    kept = []  # on_keep: the monitor's results of the states the search kept, never of one it undid

    def run(verdicts, repair_steps=2, steps=8):
        model.load_state_dict(state0)
        calls = iter(verdicts)
        kept.clear()

        def monitor(step):
            ok, score = next(calls)
            return {"within_budget": ok, "done": score < 1, "score": score}

        return sk.unlearn(model, lm_loss, zs, zt, sel, method=Targeted(
            steps=steps, lr=0.5, check_every=2, repair_steps=repair_steps, retain=retain, monitor=monitor,
            on_keep=lambda m: kept.append(m["score"])))

    # θ*, then a forget block over the budget, one repair block back within it with a lower score: done
    rep = run([(True, 10.0), (False, 5.0), (True, 0.5)])
    assert kept == [10.0, 0.5]
    oracle, _ = _model()
    _hand_targeted(oracle, sel, zs, zt, retain, 0.5, [True, True, False, False])
    got = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    want = torch.cat([p.detach().reshape(-1) for p in oracle.parameters()])
    assert not torch.equal(got, theta0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert [(h["phase"], h["accepted"]) for h in rep.info["history"]] == [
        ("start", True), ("forget", False), ("repair", True)]
    assert rep.info["stopped_by"] == "target" and rep.info["steps_run"] == 4 and rep.info["steps_accepted"] == 4
    # 4 steps: every one with Z̃ and the retained batch, the first two with Z too
    assert rep.n_gradients == 16 * 4 + 8 * 2
    # the repair gets back within the budget but the secret came back (score 12 > 10): undone, lr / 4
    rep = run([(True, 10.0), (False, 5.0), (True, 12.0), (True, 0.5)], steps=6)
    assert kept == [10.0, 0.5]  # the repair within the budget (12.0) was undone: not kept
    hist = rep.info["history"]
    assert [(h["phase"], h["accepted"]) for h in hist] == [("start", True), ("forget", False), ("repair", False),
                                                           ("forget", True)]
    assert hist[-1]["lr"] == pytest.approx(0.125) and rep.info["steps_accepted"] == 2
    oracle, _ = _model()
    _hand_targeted(oracle, sel, zs, zt, retain, 0.125, [True, True])
    torch.testing.assert_close(torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
                               torch.cat([p.detach().reshape(-1) for p in oracle.parameters()]), rtol=1e-5, atol=1e-6)
    # the repair never gets back within the budget: both repair blocks run, then θ_S is restored to θ* exactly
    rep = run([(True, 10.0), (False, 5.0), (False, 4.0), (False, 3.0)], repair_steps=4, steps=6)
    assert [(h["phase"], h["accepted"]) for h in rep.info["history"]] == [
        ("start", True), ("forget", False), ("repair", False), ("repair", False)]
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in model.parameters()]), theta0)
    assert rep.info["stopped_by"] == "steps" and rep.info["steps_accepted"] == 0


def test_targeted_polish_steps_match_a_hand_written_loop_and_stop_at_the_first_failed_block():
    """polish_steps: after the target, blocks of descent on Z̃ + the retained text only, kept while the monitor says
    done, within the budget, at a lower cost; the first block that fails is undone (θ_S restored exactly) and ends
    the run. Checked against the hand-written SGD loop."""
    model, sel, zs, zt, retain, state0 = _search_problem()

    def flat(m):
        return torch.cat([p.detach().reshape(-1) for p in m.parameters()])

    def run(verdicts, polish_steps=6, steps=20):
        model.load_state_dict(state0)
        calls = iter(verdicts)

        def monitor(step):  # (within budget, done, cost)
            ok, done, cost = next(calls)
            return {"within_budget": ok, "done": done, "score": 0.0 if done else 10.0, "cost": cost}

        return sk.unlearn(model, lm_loss, zs, zt, sel, method=Targeted(
            steps=steps, lr=0.5, check_every=2, polish_steps=polish_steps, retain=retain, monitor=monitor))

    # a forget block meets the target at cost 0.04; two polish blocks lower the cost, the third does not: undone
    rep = run([(True, False, 0.0), (True, True, 0.04), (True, True, 0.03), (True, True, 0.02), (True, True, 0.025)])
    assert [(h["phase"], h["accepted"]) for h in rep.info["history"]] == [
        ("start", True), ("forget", True), ("polish", True), ("polish", True), ("polish", False)]
    assert rep.info["stopped_by"] == "target" and rep.info["steps_run"] == 8 and rep.info["steps_accepted"] == 6
    oracle, _ = _model()
    _hand_targeted(oracle, sel, zs, zt, retain, 0.5, [True, True, False, False, False, False])
    torch.testing.assert_close(flat(model), flat(oracle), rtol=1e-5, atol=1e-6)
    # the first polish block loses a secret (not done): undone, the model is the target block's
    rep = run([(True, False, 0.0), (True, True, 0.04), (True, False, 0.01)])
    assert [(h["phase"], h["accepted"]) for h in rep.info["history"]][-1] == ("polish", False)
    oracle, _ = _model()
    _hand_targeted(oracle, sel, zs, zt, retain, 0.5, [True, True])
    torch.testing.assert_close(flat(model), flat(oracle), rtol=1e-5, atol=1e-6)
    # polish_steps bounds the polish (6 steps = 3 blocks, all kept), and 0 turns it off
    rep = run([(True, False, 0.0), (True, True, 0.04), (True, True, 0.03), (True, True, 0.02), (True, True, 0.01)])
    assert rep.info["steps_run"] == 8 and rep.info["history"][-1]["accepted"]
    rep = run([(True, False, 0.0), (True, True, 0.04)], polish_steps=0)
    assert rep.info["steps_run"] == 2 and [h["phase"] for h in rep.info["history"]] == ["start", "forget"]
    with pytest.raises(ValueError, match="polish_steps"):
        Targeted(polish_steps=-1)


def test_targeted_config_validation():
    with pytest.raises(ValueError, match="lr_min <= lr <= lr_max"):
        Targeted(lr=1000.0)
    with pytest.raises(ValueError, match="beta must be > 0"):
        Targeted(beta=0.0)
    with pytest.raises(TypeError, match="monitor must be callable"):
        Targeted(monitor=3)
    with pytest.raises(ValueError, match="finite"):
        Targeted(retain_weight=float("nan"))
    with pytest.raises(ValueError, match="repair_steps"):
        Targeted(repair_steps=-1)
    # repair_steps given both in the rule and beside it can only happen through forget's deprecated keywords:
    # tests/forgetting/test_forget_config.py (test_a_keyword_with_its_config_is_refused)


# ------------------------------------------------------------------------------------------------ end to end
def test_forget_lowers_exposure_within_the_perplexity_budget():
    """On this heavily memorised 27k-parameter LSTM (8 insertions in 9k characters) the paper's hessian selection
    does NOT reach the 2-bit target within +5% perplexity (44.5 bits after, from 48.0, with the search steering the
    validation windows to within 80% of the budget and the batch mean's NPO term at beta 1; 45.6 within 60%, the
    margin of today; 33-41 when it steered to the full budget): what must hold is that the search never accepts a
    state beyond its limit, that exposure drops, and that only S moves. The objective is pinned to the batch mean's
    term, the one these numbers were measured with (the per-token term at beta 0.25, today's default: 45.7)."""
    model, cc = _model()
    theta0 = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    measure = MeasureConfig(n_candidates=300, n_monitor=150, context="\n", evidence=None, progress=False)
    rep = forget(model, cc.vocab, cc.text, BENIGN, heldout=[cc.heldout],
                 select=SelectConfig(strategy="hessian", budget=0.05),
                 update=UpdateConfig(rule=Targeted(steps=100), seq_len=32, per_token=False), measure=measure)
    d = rep.to_dict()
    assert d["exposure_steer_before"] > 40 and d["extracted_before"], "the fixture must have memorised the secret"
    # the trajectory is sensitive to the batches (see above): only a clear drop
    assert d["exposure_steer_after"] < d["exposure_steer_before"] - 2, d["history"]
    limit = rep.val_ppl_before * (1 + 0.05 * d["target"]["steer_margin"])
    assert rep.val_ppl_after <= limit * (1 + 1e-9)
    assert all(h["val_ppl"] <= limit * (1 + 1e-9) for h in d["history"] if h["accepted"])
    (s,) = d["secrets"]
    assert s["reached"] == (s["exposure_hi_after"] <= 2.0 and not s["extracted_after"])
    # the perplexity meets the budget by its 95% bound (which is above the estimate)
    assert d["ppl_increase_hi"] >= d["ppl_increase"]
    assert d["ppl_bound_within_budget"] == (d["ppl_increase_hi"] <= 0.05)
    assert d["reached"] == (s["reached"] and d["ppl_bound_within_budget"])
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    changed = torch.nonzero(theta != theta0).reshape(-1)
    assert 0 < changed.numel() <= d["k"] == math.ceil(0.05 * theta.numel())
    for key in ("exposure_before", "exposure_after", "ppl_before", "ppl_after", "completions_before",
                "completions_after", "extracted_after", "strategy", "k", "cost", "history"):
        assert key in d
    assert d["cost"]["n_hvps"] > 0 and d["cost"]["n_gradients"] > 0 and d["strategy"] == "hessian"
    # the scores are reusable: no second estimate
    model2, _ = _model()
    rep2 = forget(model2, cc.vocab, cc.text, BENIGN, heldout=[cc.heldout],
                  select=SelectConfig(strategy="hessian", budget=0.05, scores=rep.scores),
                  update=UpdateConfig(rule=Targeted(steps=0), seq_len=32), measure=measure)
    assert rep2.cost["n_hvps"] == 0 and rep2.k == rep.k


def test_ssd_selection_forgets_far_more_than_hessian_within_the_budget():
    """ssd (Fisher on Z over Fisher on training windows; the default until the fixture matrix chose hessian_ratio)
    against the paper's hessian at the same 1% budget, steps and perplexity budget, on the fixture (51 bits before):
    ssd ends at 2-4.2 bits (seeds 0-3, measured when this test was written, steering to 80% of the budget), hessian at
    about 38. Asserted: ssd below 6 bits and at least 20 bits below hessian, no extraction, both within the budget,
    ssd's cost counted in gradients only (no HVP). The objective is pinned to the one measured then (the batch
    mean's NPO term, beta 1)."""
    out = {}
    for strategy in ("ssd", "hessian"):
        model, cc = _model()
        rep = forget(model, cc.vocab, cc.text, BENIGN, heldout=[cc.heldout],
                     select=SelectConfig(strategy=strategy, budget=0.01),
                     update=UpdateConfig(rule=Targeted(steps=100), seq_len=32, per_token=False),
                     measure=MeasureConfig(n_candidates=300, n_monitor=150, context="\n", evidence=None,
                                           progress=False))
        assert rep.val_ppl_after <= rep.val_ppl_before * 1.05 * (1 + 1e-9)
        out[strategy] = rep
    ssd, hess = out["ssd"].to_dict(), out["hessian"].to_dict()
    assert ssd["exposure_steer_before"] > 40
    assert ssd["exposure_after"] < 6.0 and not ssd["extracted_after"], ssd["history"]
    assert ssd["exposure_steer_after"] < hess["exposure_steer_after"] - 20, (ssd["exposure_steer_after"],
                                                                            hess["exposure_steer_after"])
    assert ssd["cost"]["n_hvps"] == 0 and ssd["cost"]["n_gradients"] > 0 and hess["cost"]["n_hvps"] > 0


def test_forget_errors_before_any_training():
    model, cc = _model()
    theta0 = [p.detach().clone() for p in model.parameters()]
    update, measure = UpdateConfig(seq_len=32), MeasureConfig(progress=False)
    kw = dict(heldout=[cc.heldout], update=update, measure=measure)
    with pytest.raises(ValueError, match="does not occur"):
        forget(model, cc.vocab, cc.text, {**CANARY, "secret": "1234 5678 0000 1111"}, **kw)
    with pytest.raises(ValueError, match="not in the vocabulary|cannot encode|encode"):
        forget(model, cc.vocab, cc.text, {**CANARY, "replacement": "\u00e9\u00e9\u00e9"}, **kw)
    with pytest.raises(ValueError, match="non-empty"):
        forget(model, cc.vocab, cc.text, {**CANARY, "secret": "  "}, **kw)
    with pytest.raises(ValueError, match="non-empty"):
        forget(model, cc.vocab, cc.text, "  ", **kw)
    with pytest.raises(ValueError, match="contains the secret"):
        forget(model, cc.vocab, cc.text, {**CANARY, "replacement": "x " + SECRET}, **kw)
    with pytest.raises(ValueError, match="budget"):  # a budget is checked against the model's N, inside forget
        forget(model, cc.vocab, cc.text, CANARY, select=SelectConfig(budget=-1), **kw)
    with pytest.raises(ValueError, match="heldout"):
        forget(model, cc.vocab, cc.text, CANARY, heldout=1.5, update=update, measure=measure)
    with pytest.raises(ValueError, match="no training window predicts"):
        forget(model, cc.vocab, SECRET + cc.text, CANARY, **kw)
    small = lm.build_model("lstm", 30, embed=4, hidden=8)  # fewer input ids than the codec produces
    with pytest.raises(ValueError, match="does not belong to this model"):
        forget(small, cc.vocab, cc.text, CANARY, **kw)
    with pytest.raises(ValueError, match="max_ppl_increase"):  # checked where the config is built
        forget(model, cc.vocab, cc.text, CANARY, target=TargetConfig(max_ppl_increase=-1), **kw)
    with pytest.raises(TypeError, match="tokenizer|Tokenizer"):
        forget(model, 3.5, cc.text, CANARY, **kw)
    # many secrets: each is checked against the data before anything trains
    two = [{"secret": SECRET, "prefix": PREFIX}, {"secret": "0000 1111 2222 3333", "prefix": PREFIX}]
    with pytest.raises(ValueError, match="'0000 1111 2222 3333' does not occur"):
        forget(model, cc.vocab, cc.text, two, **kw)
    with pytest.raises(ValueError, match="is given 2 times"):
        forget(model, cc.vocab, cc.text, [SECRET, SECRET], **kw)
    # (a list of secrets with one prefix beside it: only through the deprecated prefix= keyword,
    # tests/forgetting/test_forget_config.py)
    with pytest.raises(ValueError, match="held-out texts are empty"):
        forget(model, cc.vocab, cc.text, CANARY, heldout=["  "], update=update, measure=measure)
    with pytest.raises(ValueError, match="held-out text contains the secret"):
        forget(model, cc.vocab, cc.text, CANARY, heldout=[cc.heldout + PREFIX + SECRET], update=update,
               measure=measure)
    with pytest.raises(ValueError, match="precedes none"):
        forget(model, cc.vocab, cc.text, {**CANARY, "prefix": "my debit card number is"}, **kw)
    for p, t in zip(model.parameters(), theta0):
        assert torch.equal(p, t)


def test_forget_errors_on_hf_models():
    transformers = pytest.importorskip("transformers")
    _, cc = _model()
    V = cc.vocab
    cfg = transformers.GPT2Config(vocab_size=len(V), n_positions=16, n_embd=8, n_layer=1, n_head=2, bos_token_id=0,
                                  eos_token_id=0)
    with pytest.raises(ValueError, match="context window"):
        forget(transformers.GPT2LMHeadModel(cfg), V, cc.text, CANARY, heldout=[cc.heldout],
               measure=MeasureConfig(progress=False))
    cfg.n_positions = 64
    with pytest.raises(TypeError, match="causal-LM head|logits"):
        forget(transformers.GPT2Model(cfg), V, cc.text, CANARY, heldout=[cc.heldout],
               update=UpdateConfig(seq_len=32), measure=MeasureConfig(progress=False))


def test_default_window_is_the_models_context_capped():
    """UpdateConfig(seq_len=None): the model's context (n_positions), at most FORGET_SEQ_CAP tokens; 64 for a model
    that does not say its context (the LSTM). Shorter windows left positions 64-127 of the matrix's 128-context
    models unmeasured: +1% on the windows the search steered on, +10% at the later positions (docs/forget.md)."""
    transformers = pytest.importorskip("transformers")
    from sapsel_kernels.forgetting.config import FORGET_SEQ_CAP

    _, cc = _model()
    kw = dict(heldout=[cc.heldout] * 6, select=SelectConfig(strategy="random", budget=0.01),  # >= 16 windows of 257
              update=UpdateConfig(rule=Targeted(steps=0)),
              measure=MeasureConfig(n_candidates=10, n_monitor=5, evidence=None, progress=False))
    for n_positions, expect in ((72, 72), (FORGET_SEQ_CAP + 44, FORGET_SEQ_CAP)):
        torch.manual_seed(0)
        cfg = transformers.GPT2Config(vocab_size=len(cc.vocab), n_positions=n_positions, n_embd=8, n_layer=1,
                                      n_head=2, bos_token_id=0, eos_token_id=0)
        rep = forget(transformers.GPT2LMHeadModel(cfg), cc.vocab, cc.text, CANARY, **kw)
        assert rep.seq_len == expect
    model, _ = _model()
    assert forget(model, cc.vocab, cc.text, CANARY, **kw).seq_len == 64


def test_default_window_shrinks_to_fit_the_data_but_not_below_the_old_default():
    """default_seq_len: the context capped at FORGET_SEQ_CAP, lowered so that every text with a secret gives a window
    (with its replacement too), texts of a window or more hold MIN_COVERED of the tokens, and the held-out texts (or
    tails, for a fraction) give MIN_HELD_WINDOWS windows; never below min(64, context); 64 without a context. The
    window counts are computed here from the definition (windows of T + 1 tokens at stride T + 1)."""
    from sapsel_kernels.forgetting.config import FORGET_SEQ_CAP
    from sapsel_kernels.forgetting.forget import MIN_HELD_WINDOWS, default_seq_len

    class Chars:  # one token per character
        @staticmethod
        def encode(t):
            return list(t)

    secret = "S3CR3T"
    long = "a" * 5000 + secret + "b" * 5000
    held = ["c" * 20_000]
    assert default_seq_len(None, Chars, [long], [secret], held) == 64
    assert default_seq_len(48, Chars, [long], [secret], held) == 48
    assert default_seq_len(72, Chars, [long], [secret], held) == 72
    assert default_seq_len(4096, Chars, [long], [secret], held) == FORGET_SEQ_CAP
    # a 150-token text holds the secret: 149-token windows (+1 target) cover it; a shorter text without it does not
    # count (and holds < 10% of the tokens)
    short = "y" * 100 + secret + "y" * 44
    assert default_seq_len(4096, Chars, [long, "x" * 100, short], [secret], held) == 149
    # ... with the secret replaced by a 1-token replacement the clean text has 145 tokens
    assert default_seq_len(4096, Chars, [long, short], [secret], held, ["R"]) == 144
    assert default_seq_len(4096, Chars, [long, "y" * 20 + secret], [secret], held) == 64  # not below 64
    # 20 documents of 200 tokens without a secret: 28% of the tokens, left out by 256-token windows, not by 128
    assert default_seq_len(4096, Chars, [long] + ["d" * 200] * 20, [secret], held) == 128

    def n_windows(T, lengths, start=0.0):
        return sum(len(range(int(start * n), n - T, T + 1)) for n in lengths)

    assert n_windows(256, [2000]) < MIN_HELD_WINDOWS and n_windows(128, [2000]) < MIN_HELD_WINDOWS \
        <= n_windows(64, [2000])
    assert default_seq_len(4096, Chars, [long], [secret], ["c" * 2000]) == 64
    assert n_windows(128, [2200]) >= MIN_HELD_WINDOWS > n_windows(256, [2200])
    assert default_seq_len(4096, Chars, [long], [secret], ["c" * 2200]) == 128
    # a held-out fraction: the texts' tails
    assert n_windows(64, [len(long)], 0.9) < MIN_HELD_WINDOWS
    assert default_seq_len(4096, Chars, [long], [secret], 0.1) == 64
    longer = "a" * 25_000 + secret + "b" * 25_000
    assert n_windows(256, [len(longer)], 0.9) >= MIN_HELD_WINDOWS
    assert default_seq_len(4096, Chars, [longer], [secret], 0.1) == FORGET_SEQ_CAP


def test_per_token_npo_matches_its_formula_and_is_ascent_at_theta_star():
    from sapsel_kernels.forget import _with_reference, per_token_npo

    model, cc = _model()
    d = build_forget_data(cc.vocab, [cc.text], SECRET, lm.BENIGN_REPLACEMENT, seq_len=32, heldout=[cc.heldout])
    (x, y, ref), = _with_reference(model, [(d.affected_secret[0][:4], d.affected_secret[1][:4])])
    m = y != IGNORE
    loss = per_token_npo(0.5)(model, (x, y, ref))
    # ref = own loss: softplus(0) = log 2
    assert float(loss.detach()) == pytest.approx((2 / 0.5) * math.log(2.0), rel=1e-6)
    loss.backward()
    # at θ* its gradient is -(mean over secret tokens of their loss gradient): gradient ascent on the secret
    g_npo = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    tok = torch.nn.functional.cross_entropy(model(x).reshape(-1, len(cc.vocab)), y.reshape(-1), ignore_index=IGNORE,
                                            reduction="none")
    (-tok[m.reshape(-1)].mean()).backward()
    for a, p in zip(g_npo, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)


def test_kl_retain_term_is_zero_with_zero_gradient_at_theta_star():
    from sapsel_kernels.forget import _with_reference_logp, kl_to_reference

    model, cc = _model()
    d = build_forget_data(cc.vocab, [cc.text], SECRET, lm.BENIGN_REPLACEMENT, seq_len=32, heldout=[cc.heldout])
    (b,) = _with_reference_logp(model, [(d.retain[0][:4], d.retain[1][:4])])
    kl = kl_to_reference(model, b)
    assert abs(float(kl.detach())) < 1e-3  # float16 reference: ~1e-4 rounding
    kl.backward()
    assert max(float(p.grad.abs().max()) for p in model.parameters()) < 1e-2
    with torch.no_grad():
        model.head.bias.add_(0.5 * torch.randn_like(model.head.bias))
    assert float(kl_to_reference(model, b).detach()) > 1e-2  # a moved model has a positive divergence


def test_forget_rejects_bad_retain_loss():
    model, cc = _model()
    with pytest.raises(ValueError, match="retain_loss"):  # checked where the config is built
        forget(model, cc.vocab, cc.text, CANARY, heldout=[cc.heldout],
               update=UpdateConfig(retain_loss="mse", seq_len=32), measure=MeasureConfig(progress=False))


def test_targeted_rule_with_sam_moves_only_s():
    model, cc = _model()
    d = build_forget_data(cc.vocab, [cc.text], SECRET, lm.BENIGN_REPLACEMENT, seq_len=32, heldout=[cc.heldout])
    theta0 = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    sel = sk.select_parameters(model, "random", 0.05, seed=2)
    zs = [(d.affected_secret[0][:8], d.affected_secret[1][:8])]
    zt = [(d.corrected[0][:8], d.corrected[1][:8])]
    rep = sk.unlearn(model, lm_loss, zs, zt, sel, method=Targeted(steps=4, lr=1.0, rho=0.05))
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    changed = torch.nonzero(theta != theta0).reshape(-1)
    assert set(changed.tolist()) <= set(sel.indices.tolist()) and changed.numel() > 0
    assert rep.n_gradients == 4 * 2 * 16  # two passes per SAM step over a Z and a Z̃ batch of 8


def test_format_uniform_matches_its_formula_and_its_minimum_is_uniform():
    """objective='uniform': at each secret token that is a digit, -mean over the 10 digit tokens of log p (by hand
    from the logits); the separators are left out; a model that is uniform over the digits there scores log 10."""
    from sapsel_kernels.forget import format_uniform
    from sapsel_kernels.measure import as_tokenizer

    model, cc = _model()
    model.eval()  # no dropout: the two evaluations below see the same function
    d = build_forget_data(cc.vocab, [cc.text], SECRET, lm.BENIGN_REPLACEMENT, seq_len=32, heldout=[cc.heldout])
    x, y = d.affected_secret[0][:4], d.affected_secret[1][:4]
    V = len(cc.vocab)
    loss = format_uniform(as_tokenizer(cc.vocab), sk.measure.format_of(SECRET), V)
    with torch.no_grad():
        logp = model(x).log_softmax(-1).reshape(-1, V)
    digits = torch.tensor([cc.vocab.encode(c)[0] for c in "0123456789"])
    yy = y.reshape(-1)
    at = (yy != IGNORE) & torch.isin(yy, digits)
    assert int(at.sum()) > 0 and int(((yy != IGNORE) & ~at).sum()) > 0  # digits and separators among the targets
    expect = -logp[at][:, digits].mean(-1).mean()
    assert float(loss(model, (x, y))) == pytest.approx(float(expect), rel=1e-5)

    class Uniform(torch.nn.Module):  # logits equal on every digit: the minimum, -log(1/10) when only digits have mass
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, ids):
            out = torch.full((*ids.shape, V), -1e4) + self.w
            out[..., digits] = 0.0
            return out

    assert float(loss(Uniform(), (x, y))) == pytest.approx(math.log(10), rel=1e-6)
    kw = dict(heldout=[cc.heldout], measure=MeasureConfig(progress=False))
    with pytest.raises(ValueError, match="objective"):
        forget(model, cc.vocab, cc.text, CANARY, update=UpdateConfig(objective="ascent", seq_len=32), **kw)
    with pytest.raises(ValueError, match="decoys applies to objective='uniform'"):
        forget(model, cc.vocab, cc.text, CANARY, update=UpdateConfig(decoys=4, seq_len=32), **kw)
    with pytest.raises(ValueError, match="per_token applies"):
        forget(model, cc.vocab, cc.text, CANARY, update=UpdateConfig(objective="uniform", per_token=True, seq_len=32),
               **kw)


def test_forget_uniform_objective_with_decoys_runs_and_moves_only_s():
    """objective='uniform' with decoys: the decoy windows join Z (and Z̃ is repeated to match), the run stays within
    the budget and moves only S. (It does not forget better than NPO: docs/forget.md.)"""
    model, cc = _model()
    theta0 = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    rep = forget(model, cc.vocab, cc.text, BENIGN, heldout=[cc.heldout], select=SelectConfig(budget=0.05),
                 update=UpdateConfig(objective="uniform", rule=Targeted(steps=10), seq_len=32, decoys=2),
                 measure=MeasureConfig(n_candidates=50, n_monitor=30, context="\n", progress=False))
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert 0 < int((theta != theta0).sum()) <= rep.k
    assert rep.val_ppl_after <= rep.val_ppl_before * 1.05 * (1 + 1e-9)
    assert rep.cost["steps"] > 0


def test_calibrated_push_matches_its_formula_and_stops_at_the_candidates_level():
    """objective='calibrated': the hinge max(0, mean candidate NLL - secret NLL) / secret tokens after the prompt,
    checked against a per-sequence NLL written here; zero (and no gradient) once the secret is as unlikely as the
    candidates."""
    from sapsel_kernels.forget import calibrated_push

    model, cc = _model()
    V = cc.vocab
    cands = ["0000 1111 2222 3333", "9876 5432 1098 7654"]

    def nll(text):  # per-sequence NLL of the text after PREFIX, one sequence at a time (char codec: no merges)
        ids = V.encode(PREFIX + text).tolist()
        s = len(V.encode(PREFIX).tolist())
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids[:-1]])).float(), -1)[0]
        return -sum(float(logp[t - 1, ids[t]]) for t in range(s, len(ids))), len(ids) - s

    loss = calibrated_push(V, [(PREFIX, SECRET)], [lambda n, call: cands[:n]], n_resample=2)
    got = loss(model, None)
    (s_nll, n), c_nll = nll(SECRET), [nll(c)[0] for c in cands]
    assert got.item() == pytest.approx(max(0.0, sum(c_nll) / 2 - s_nll) / n, rel=1e-4)
    assert got.item() > 0  # the memorised secret is far more likely than the two candidates
    got.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.zero_grad()
    flat = calibrated_push(V, [(PREFIX, SECRET)], [lambda n, call: [SECRET] * n], n_resample=2)(model, None)
    # candidates exactly as likely as the secret: nothing left to push (up to float32 summation order, which differs
    # between the secret's and the candidates' batches with the thread count: 5e-8 at 2 threads)
    assert flat.item() == pytest.approx(0.0, abs=1e-6)
