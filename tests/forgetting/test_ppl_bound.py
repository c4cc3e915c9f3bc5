"""The reported perplexity change's upper confidence bound (``forget.ppl_change_bound``): the t quantile against
scipy and a Monte Carlo sample, the standard error against a jackknife, coverage on a synthetic population of
windows, and the bound in ``forget``'s report."""

import math

import pytest
import torch

from sapsel_kernels.forgetting.forget import heldout_factor, perplexity, ppl_change_bound, t_quantile, window_nll


# ------------------------------------------------------------------------------------------------ t quantile
@pytest.mark.parametrize("nu", [1, 2, 3, 4, 7, 19, 60, 1000])
def test_t_quantile_matches_scipy(nu):
    stats = pytest.importorskip("scipy.stats")
    for p in (0.5, 0.8, 0.95, 0.975, 0.999):
        assert t_quantile(p, nu) == pytest.approx(float(stats.t.ppf(p, nu)), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("nu", [1, 3, 12])
def test_t_quantile_matches_a_monte_carlo_sample(nu):
    """Independent of scipy: the fraction of 400k Student-t draws (a normal over the root of a chi-square's mean,
    built from normals) below the 0.95 quantile is 0.95 within 4 binomial standard deviations (0.0014)."""
    g = torch.Generator().manual_seed(nu)
    n = 400_000
    z = torch.randn(n, generator=g, dtype=torch.float64)
    chi = (torch.randn(n, nu, generator=g, dtype=torch.float64) ** 2).sum(1)
    draws = z / torch.sqrt(chi / nu)
    frac = float((draws <= t_quantile(0.95, nu)).double().mean())
    assert abs(frac - 0.95) < 4 * math.sqrt(0.95 * 0.05 / n)


def test_t_quantile_refuses_what_it_does_not_compute():
    for p, nu in ((0.4, 3), (1.0, 3), (0.95, 0), (0.95, 2.5)):
        with pytest.raises(ValueError, match="t_quantile"):
            t_quantile(p, nu)


# ------------------------------------------------------------------------------------------------ the bound
def _windows(g, w, skewed=True):
    """W windows' before/after NLL sums and target counts: counts 20-60, per-target NLL ~3 before, a change per
    window from a normal plus (``skewed``) an exponential (skewness 2): mean 0.03 (0.01) nats per target."""
    n = torch.randint(20, 61, (w,), generator=g)
    b = n * (3.0 + 0.3 * torch.randn(w, generator=g, dtype=torch.float64))
    expo = -torch.log(torch.rand(w, generator=g, dtype=torch.float64))
    shift = 0.05 * expo * skewed - 0.02 + 0.04 * torch.randn(w, generator=g, dtype=torch.float64)
    return b, b + n * shift, n


def test_bound_change_is_the_ratio_of_perplexities_and_its_se_agrees_with_a_jackknife():
    g = torch.Generator().manual_seed(0)
    b, a, n = _windows(g, 300)
    r = ppl_change_bound((b, n), (a, n))
    expect = math.exp(float(a.sum() - b.sum()) / int(n.sum())) - 1.0
    assert r["change"] == pytest.approx(expect, rel=1e-12)
    assert r["n_windows"] == 300 and r["level"] == 0.95
    # jackknife (leave one window out) of the log ratio: written from its definition, not from the delta method
    d = (a - b)
    logs = torch.tensor([float(d.sum() - d[i]) / float(n.sum() - n[i]) for i in range(300)], dtype=torch.float64)
    se_jk = math.sqrt(299 / 300 * float(((logs - logs.mean()) ** 2).sum()))
    assert r["se_log"] == pytest.approx(se_jk, rel=0.02)
    assert r["change_hi"] == pytest.approx(math.exp(math.log1p(expect) + t_quantile(0.95, 299) * r["se_log"]) - 1,
                                           rel=1e-9)
    assert r["change_hi"] > r["change"]


@pytest.mark.parametrize("skewed", [False, True])
def test_bound_covers_the_population_change_95_percent_of_the_time(skewed):
    """Coverage, statistically: 2,000 samples of 20 windows without replacement from a population of 20,000
    windows; the bound is at or above the population's change in 95% of them, within 3 binomial standard deviations
    (1.5 points) when the per-window change is symmetric. When it is skewed (an exponential's skewness 2), the t
    bound under-covers, as any t interval on a right-skewed sample of 20 does: measured 92.3%; asserted between 90
    and 96.5% (docs/forget.md states it). A bound without the t term (the point estimate) covers about half: the
    check can fail."""
    g = torch.Generator().manual_seed(1)
    b, a, n = _windows(g, 20_000, skewed)
    truth = math.exp(float(a.sum() - b.sum()) / int(n.sum())) - 1.0
    hits, naive = 0, 0
    reps = 2000
    for _ in range(reps):
        i = torch.randperm(20_000, generator=g)[:20]
        r = ppl_change_bound((b[i], n[i]), (a[i], n[i]))
        hits += r["change_hi"] >= truth
        naive += r["change"] >= truth
    cover, sd = hits / reps, math.sqrt(0.95 * 0.05 / reps)
    if skewed:
        assert 0.90 <= cover <= 0.965, cover
    else:
        assert abs(cover - 0.95) <= 3 * sd, cover
    assert naive / reps < 0.7


def test_bound_needs_two_windows_and_the_same_windows():
    one = (torch.tensor([30.0], dtype=torch.float64), torch.tensor([10]))
    r = ppl_change_bound(one, (torch.tensor([33.0], dtype=torch.float64), torch.tensor([10])))
    assert r["change"] == pytest.approx(math.exp(0.3) - 1) and r["change_hi"] == math.inf and r["n_windows"] == 1
    two = (torch.tensor([30.0, 20.0], dtype=torch.float64), torch.tensor([10, 10]))
    with pytest.raises(ValueError, match="same windows"):
        ppl_change_bound(two, (torch.tensor([33.0, 20.0], dtype=torch.float64), torch.tensor([10, 9])))
    with pytest.raises(ValueError, match="same windows"):
        ppl_change_bound(two, one)
    # no change at all: a zero-width bound at zero
    r = ppl_change_bound(two, two)
    assert r["change"] == 0.0 and r["change_hi"] == 0.0 and r["se_log"] == 0.0


def test_window_nll_sums_to_the_perplexity():
    """window_nll's per-window sums are the perplexity's: exp(sum / count) == perplexity(), -100 targets excluded."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(11, 8), torch.nn.Linear(8, 11))
    x = torch.randint(0, 11, (37, 9))
    y = torch.randint(0, 11, (37, 9))
    y[3, :4] = -100
    s, c = window_nll(model, (x, y), batch_size=8)
    assert s.dtype == torch.float64 and s.shape == (37,) and int(c[3]) == 5 and int(c.sum()) == 37 * 9 - 4
    ref = torch.nn.functional.cross_entropy(model(x).reshape(-1, 11).double(), y.reshape(-1), ignore_index=-100,
                                            reduction="sum")
    assert float(s.sum()) == pytest.approx(float(ref.detach()), rel=1e-5)
    kept = []
    expect = math.exp(float(ref.detach()) / int(c.sum()))
    assert perplexity(model, (x, y), batch_size=8, windows=kept) == pytest.approx(expect, rel=1e-5)
    assert torch.equal(kept[0], s) and torch.equal(kept[1], c)


def test_forget_reports_the_bound_of_its_reported_change():
    """End to end on the memorised LSTM, the report against an oracle written from the definition, not through
    window_nll or ppl_change_bound: the test windows' NLLs from the model's own logits (float64, one window at a
    time) before and after, the log ratio D, the ratio estimator's standard error element by element, and the
    bound exp(D + t se) - 1 (t from scipy when installed)."""
    import copy

    from sapsel_kernels.forget import MeasureConfig, SelectConfig, UpdateConfig, build_forget_data, forget
    from sapsel_kernels.rules import Targeted

    from .test_forget import BENIGN, SECRET, _model

    model, cc = _model()
    theta = copy.deepcopy(model)
    measure = MeasureConfig(n_candidates=60, n_monitor=30, context="\n", evidence=None, progress=False)
    rep = forget(model, cc.vocab, cc.text, BENIGN, heldout=[cc.heldout],
                 select=SelectConfig(strategy="grad_abs", budget=0.05),
                 update=UpdateConfig(rule=Targeted(steps=10, check_every=5), seq_len=32), measure=measure)
    u = rep.utility
    assert rep.ppl_after != rep.ppl_before, "the run must move the reported perplexity"
    x, y = build_forget_data(cc.vocab, [cc.text], SECRET, BENIGN["replacement"], seq_len=32,
                             heldout=[cc.heldout]).test

    def nll(m):
        m.eval()
        with torch.no_grad():
            return [float(torch.nn.functional.cross_entropy(m(x[i:i + 1])[0].double(), y[i], reduction="sum"))
                    for i in range(len(x))]

    b, a = nll(theta), nll(model)
    w, n = len(x), [int(t.numel()) for t in y]
    big_n = sum(n)
    D = (sum(a) - sum(b)) / big_n
    resid = [(ai - bi - D * ni) / (big_n / w) for ai, bi, ni in zip(a, b, n)]  # per window, in mean-window units
    se = math.sqrt(sum(r * r for r in resid) / (w - 1) / w)
    try:
        from scipy.stats import t as student_t
        tq = float(student_t.ppf(0.95, w - 1))
    except ImportError:
        tq = t_quantile(0.95, w - 1)
    assert u["ppl_windows"] == w >= 2
    assert rep.ppl_increase == pytest.approx(math.exp(D) - 1, rel=1e-5)  # forget: float32 logits
    assert u["ppl_increase_se_log"] == pytest.approx(se, rel=1e-5) and se > 0
    assert u["ppl_increase_hi"] == pytest.approx(math.exp(D + tq * se) - 1, rel=1e-5)
    assert u["ppl_increase_hi"] > rep.ppl_increase and u["ppl_bound_level"] == 0.95


def test_the_summary_prints_the_bound_or_says_there_is_none():
    from sapsel_kernels.forgetting.report import summary_lines

    base = {"ppl_before": 10.0, "ppl_after": 10.3, "ppl_increase": 0.03, "target": {"max_ppl_increase": 0.05},
            "utility_text": "heldout"}
    line = next(x for x in summary_lines({**base, "ppl_increase_hi": 0.0612, "ppl_windows": 24})
                if x.startswith("perplexity"))
    assert "(+3.00%; 95% bound +6.12%, 24 windows)" in line
    line = next(x for x in summary_lines({**base, "ppl_increase_hi": None, "ppl_windows": 1})
                if x.startswith("perplexity"))
    assert "(+3.00%; no bound from 1 window)" in line
    line = next(x for x in summary_lines(base) if x.startswith("perplexity"))  # a report from before the bound
    assert "(+3.00%)" in line


def test_the_bound_decides_the_verdict(monkeypatch):
    """The same run twice, on a secret written into the text but never trained on (met from the start at a 5-bit
    target), no step taken (change 0): reached; then with the bound widened by 10 points (ppl_change_bound
    wrapped): the estimate is still within the budget but the verdict is not reached, ``ppl_bound_within_budget``
    says why and the exit-code-3 line names the bound."""
    from sapsel_kernels.cli import not_reached_reasons
    from sapsel_kernels.forget import MeasureConfig, SelectConfig, TargetConfig, UpdateConfig, forget
    from sapsel_kernels.forgetting import forget as forget_module
    from sapsel_kernels.rules import Targeted

    from .test_forget import _model

    def run():
        model, cc = _model()
        cut = [cc.text.index("\n", f * len(cc.text) // 3) + 1 for f in (1, 2)]
        text = cc.text[:cut[0]] + "code 4242 1717\n" + cc.text[cut[0]:cut[1]] + "code 4242 1717\n" + cc.text[cut[1]:]
        return forget(model, cc.vocab, text, {"secret": "4242 1717", "prefix": "code"}, heldout=[cc.heldout],
                      target=TargetConfig(exposure=5.0),
                      select=SelectConfig(strategy="random", budget=0.05),
                      update=UpdateConfig(rule=Targeted(steps=0), seq_len=32),
                      measure=MeasureConfig(n_candidates=60, n_monitor=30, context="\n", evidence=None,
                                            progress=False)).to_dict()

    d = run()
    assert d["reached"] and d["ppl_within_budget"] and d["ppl_bound_within_budget"]
    assert d["ppl_increase"] == 0.0 == d["ppl_increase_hi"] and not not_reached_reasons(d)
    real = forget_module.ppl_change_bound

    def wide(*a, **k):
        r = real(*a, **k)
        return {**r, "change_hi": r["change"] + 0.10}

    monkeypatch.setattr(forget_module, "ppl_change_bound", wide)
    d = run()
    assert not d["reached"] and d["ppl_within_budget"] and not d["ppl_bound_within_budget"]
    assert all(s["reached"] for s in d["secrets"])
    (why,) = not_reached_reasons(d)
    assert "within the budget but its 95% upper bound (+10.00%" in why and f"{d['ppl_windows']} test windows" in why
    # no step was taken, so the change and its spread are 0 (the bound was widened by hand): no factor projected
    assert "as much would bring it within the budget" not in why
    rep = {**d, "ppl_increase": 0.042, "ppl_increase_hi": 0.0675, "ppl_increase_se_log": 0.0142, "ppl_windows": 36}
    (why,) = not_reached_reasons(rep)
    assert f"about {heldout_factor(0.042, 0.0142, 36, 0.05):.1f}x as much would bring it within the budget" in why


@pytest.mark.parametrize("change,se,w,budget", [(0.042, 0.0142, 36, 0.05), (0.0256, 0.0167, 36, 0.05),
                                                 (0.0, 0.03, 20, 0.05), (-0.02, 0.05, 7, 0.10),
                                                 (0.049, 0.02, 36, 0.05), (0.01, 0.001, 36, 0.05)])
def test_heldout_factor_is_the_least_text_that_brings_the_bound_within_the_budget(change, se, w, budget):
    """The oracle, written from the definition with scipy's t: with w' = factor * w test windows and the standard
    error shrinking as sqrt(w / w'), the bound is within the budget, and with one window fewer (if still >= w) not."""
    stats = pytest.importorskip("scipy.stats")
    m = heldout_factor(change, se, w, budget)
    assert m is not None and m >= 1.0
    wp = round(m * w)
    assert abs(wp - m * w) < 1e-9

    def bound(n):
        return math.expm1(math.log1p(change) + stats.t.ppf(0.95, n - 1) * se * math.sqrt(w / n))
    assert bound(wp) <= budget + 1e-12
    if wp > w:
        assert bound(wp - 1) > budget
    else:  # already within: the bound as forget computes it says so too
        assert bound(w) <= budget


def test_heldout_factor_is_none_where_no_text_would_do():
    assert heldout_factor(0.05, 0.01, 36, 0.05) is None  # the estimate at the budget
    assert heldout_factor(0.07, 0.01, 36, 0.05) is None
    assert heldout_factor(0.01, float("inf"), 36, 0.05) is None
    assert heldout_factor(0.01, 0.01, 1, 0.05) is None
    assert heldout_factor(0.01, None, 36, 0.05) is None
    assert heldout_factor(0.01, 0.01, 36, float("nan")) is None
