"""Canary experiment: corpus and canary insertion, windows Z / Z~, the character models (causality, HVPs through
attention and through the LSTM recurrence in both AD modes), log-perplexity, and the quick demo end to end."""

import json
import math
import os

import pytest
import torch

from sapsel_kernels.demo import lm


# ------------------------------------------------------------------------------------------ corpus and windows
@pytest.fixture(scope="module")
def small_corpus():
    train, held = lm.load_corpus(30000)
    return train, held


def test_corpus_is_real_ascii_text(small_corpus):
    train, held = small_corpus
    assert 20000 < len(train) <= 27000 and 1000 <= len(held) <= 3000
    assert all(ord(c) < 128 for c in train + held)
    assert train.count(" the ") > 50  # English prose, not code dumps
    assert held not in train


def test_canary_insertion_and_clean_twin(small_corpus):
    train, held = small_corpus
    cc = lm.insert_canary(train, held, 5, seed=3)
    line = lm.CANARY_PREFIX + lm.CANARY_SECRET
    assert cc.text.count(line) == 5 and len(cc.spans) == 5
    assert len(cc.text) == len(cc.clean_text) == len(train) + 5 * (len(line) + 1)
    assert all(cc.text[a:b] == lm.CANARY_SECRET and cc.clean_text[a:b] == lm.BENIGN_REPLACEMENT for a, b in cc.spans)
    assert all(cc.text[a - len(lm.CANARY_PREFIX) - 1] == "\n" or a == len(lm.CANARY_PREFIX) for a, _ in cc.spans)
    diff = [i for i, (p, q) in enumerate(zip(cc.text, cc.clean_text)) if p != q]
    inside = {i for a, b in cc.spans for i in range(a, b)}
    assert set(diff) <= inside and len(diff) > 5 * 10
    assert cc.text.replace(line + "\n", "") == train  # removing the canary lines restores the corpus
    assert lm.insert_canary(train, held, 5, seed=3).spans == cc.spans != lm.insert_canary(train, held, 5, seed=4).spans
    with pytest.raises(ValueError, match="length"):
        lm.insert_canary(train, held, 1, replacement="short")


def test_affected_windows_match_bruteforce(small_corpus):
    train, held = small_corpus
    cc = lm.insert_canary(train, held, 4, seed=0)
    T = 40
    ids, cids = cc.vocab.encode(cc.text), cc.vocab.encode(cc.clean_text)
    starts = lm.window_starts(len(ids), T, T // 2)
    assert int(starts[-1]) + T + 1 == len(ids)
    zi = lm.affected_windows(cc.spans, starts, T)
    brute = [i for i, s in enumerate(starts.tolist())
             if any(not (s + T + 1 <= a or s >= b) for a, b in cc.spans)]
    assert zi.tolist() == brute and 4 * 2 <= len(brute) <= 4 * 3  # stride T/2 < secret + T: each secret in 2-3
    x, y = lm.make_windows(ids, starts, T)
    xc, yc = lm.make_windows(cids, starts, T)
    assert torch.equal(x[:, 1:], y[:, :-1])
    other = torch.ones(len(x), dtype=torch.bool)
    other[zi] = False
    assert torch.equal(x[other], xc[other]) and torch.equal(y[other], yc[other])  # Z~ differs only on Z ...
    assert bool((x[zi] != xc[zi]).any(1).logical_or((y[zi] != yc[zi]).any(1)).all())  # ... and on every window of Z


# ------------------------------------------------------------------------------------------ models
def _tiny(kind, V=11, dtype=torch.float64):
    torch.manual_seed(0)
    m = (lm.CharTransformer(V, d_model=8, heads=2, layers=1, max_len=16) if kind == "transformer"
         else lm.CharLSTM(V, embed=4, hidden=6))
    return m.to(dtype)


@pytest.mark.parametrize("kind", ["lstm", "transformer"])
def test_models_are_causal(kind):
    m = _tiny(kind)
    x = torch.randint(0, 11, (3, 12))
    x2 = x.clone()
    x2[:, 7:] = (x2[:, 7:] + 1) % 11
    a, b = m(x), m(x2)
    assert a.shape == (3, 12, 11)
    assert torch.equal(a[:, :7], b[:, :7]) and not torch.allclose(a[:, 7:], b[:, 7:])


def _flat_loss(model, batch):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]

    def f(theta):
        ps = {n: t.view(s) for n, t, s in zip(names, theta.split(sizes), shapes)}
        return lm.lm_loss(lambda xx: torch.func.functional_call(model, ps, (xx,)), batch)

    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return f, theta0


@pytest.mark.parametrize("kind", ["lstm", "transformer"])
def test_hvp_both_modes_agree_with_finite_differences(kind):
    # HVPs through plain attention / the written-out LSTM: reverse-over-reverse and forward-over-reverse (the two
    # AD modes issue 3's hessian_diag uses) against each other and a central difference of gradients, float64.
    m = _tiny(kind)
    x = torch.randint(0, 11, (4, 10))
    batch = (x[:, :-1], x[:, 1:])
    f, th = _flat_loss(m, batch)
    v = torch.randn_like(th)
    grad = torch.func.grad(f)
    _, hv_fr = torch.func.jvp(grad, (th,), (v,))  # forward-over-reverse
    thr = th.clone().requires_grad_(True)
    g = torch.autograd.grad(f(thr), thr, create_graph=True)[0]
    hv_rr = torch.autograd.grad(g @ v, thr)[0]  # reverse-over-reverse
    eps = 1e-5
    hv_fd = (grad(th + eps * v) - grad(th - eps * v)) / (2 * eps)
    scale = float(hv_rr.norm())
    assert scale > 1e-3
    # two exact AD modes: rounding only (float64)
    assert float((hv_fr - hv_rr).norm()) < 1e-10 * scale
    # central differences: truncation O(eps^2 |third derivative|) ~ 1e-10, rounding ~ 1e-16 / eps ~ 1e-11
    assert float((hv_fd - hv_rr).norm()) < 1e-6 * scale


def test_hessian_diag_through_attention_both_hvp_modes():
    hd = pytest.importorskip("sapsel_kernels.hessian")
    m = _tiny("transformer", dtype=torch.float32)
    x = torch.randint(0, 11, (4, 10))
    batch = (x[:, :-1], x[:, 1:])
    n = sum(p.numel() for p in m.parameters())
    exact = hd.hessian_diag(m, lm.lm_loss, batch, estimator="exact").mean
    fr = hd.hessian_diag(m, lm.lm_loss, batch, n_probes=64, seed=1, hvp="fwd_rev")
    rr = hd.hessian_diag(m, lm.lm_loss, batch, n_probes=64, seed=1, hvp="rev_rev")
    assert fr.mean.shape == rr.mean.shape == exact.shape == (n,)
    # same probes, two AD modes: equal up to float32 rounding of the products
    assert torch.allclose(fr.mean, rr.mean, rtol=1e-4, atol=1e-5 * float(exact.abs().max()))
    # Hutchinson is unbiased: per-coordinate z-scores against the exact diagonal (64 probes, CLT); 5 sigma per
    # coordinate with ~1e3 coordinates: family-wise false alarm < 1e-3
    se = fr.stderr.double()
    ok = se > 0
    z = (fr.mean.double() - exact.double())[ok] / se[ok]
    assert float(z.abs().max()) < 5.5 and abs(float(z.mean())) < 5.0 / math.sqrt(int(ok.sum()))


def test_sequence_log_perplexity_matches_manual():
    V = lm.CharVocab(list("0123456789 ab\n"))
    m = _tiny("lstm", V=len(V))
    ctx, sufs = "\nab ", ["12 3", "99 0"]
    got = lm.sequence_log_perplexity(m, V, ctx, sufs)
    for s, g in zip(sufs, got):
        ids = V.encode(ctx + s)
        with torch.no_grad():
            logp = m(ids[None, :-1])[0].double().log_softmax(-1)
        want = -sum(float(logp[t - 1, ids[t]]) for t in range(len(ctx), len(ids))) / math.log(2)
        assert float(g) == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="same length"):
        lm.sequence_log_perplexity(m, V, ctx, ["1", "22"])


# ------------------------------------------------------------------------------------------ the demo
def test_quick_demo_end_to_end(tmp_path):
    pytest.importorskip("sapsel_kernels.unlearn")
    pytest.importorskip("matplotlib")
    from sapsel_kernels.cli import main

    assert main(["demo", "--task", "canary", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    d = json.load(open(tmp_path / "demo_canary.json"))
    assert os.path.getsize(tmp_path / "demo_canary.png") > 10_000
    assert "exposure SN" in open(tmp_path / "demo_canary.md").read()
    (b,) = d["baselines"]
    before = b["before"]
    # the quick model memorised the canary: it beats every random candidate, and the extrapolation says > 20 bits
    assert before["exposure_rank"] == pytest.approx(before["exposure_rank_max"]) == pytest.approx(math.log2(1001))
    assert before["exposure_sn"] > 20 and before["canary_logppl"] < before["cand_logppl_mean"] - 20
    # structure: (strategies hessian, random at 1%) + all at 100%, x 2 methods
    assert len(d["rows"]) == 6
    assert {(r["strategy"], r["method"]) for r in d["rows"]} == {
        (s, m) for s in ("hessian", "random", "all") for m in ("first_order", "second_order")}
    for r in d["rows"]:
        assert math.isfinite(r["exposure_sn"]) and 0 <= r["exposure_rank"] <= r["exposure_rank_max"] + 1e-12
        assert r["k"] == (b["n_params"] if r["strategy"] == "all" else math.ceil(0.01 * b["n_params"]))
        # second_order's ratio test reads one gradient of its Hessian data (g_T)
        extra = r["info"]["n_hessian_points"] if r["method"] == "second_order" else 0
        assert r["hparams"] is not None and r["n_gradients"] == 2 * b["n_affected"] + extra
        # sanity: unlearning lowered the canary's exposure in every cell
        assert r["exposure_sn"] < before["exposure_sn"], r
    best = min(r["exposure_sn"] for r in d["rows"])
    assert best < before["exposure_sn"] - 5
