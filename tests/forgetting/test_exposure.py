"""Exposure estimators (sapsel_kernels.exposure) against toy "models" whose exact ranks are known.

Two toys over the real canary format (16 digits, |R| = 10^16):

* additive: s(x) = sum_j C[j, x_j] with integer costs; the exact number of secrets with a smaller score follows from
  a 16-fold convolution of the per-position cost histograms (int64, exact up to 10^16). Oracle for the rank estimate
  (K ~ Binomial(n, q) exactly) and a realistic, *not* skew-normal distribution.
* bijective: rank(x) = (A x + B) mod 10^16 + 1 (A invertible mod 10^16) and s(x) = skew-normal quantile of
  (rank - 1/2) / |R|, so candidate scores are exactly skew-normal and every secret's rank is known in closed form:
  oracle for the skew-normal extrapolation far beyond the sampled range (up to 43 bits).
"""

import math
import random
import statistics

import pytest
import torch

from sapsel_kernels.exposure import (
    exposure_from_rank,
    fit_skewnorm_mle,
    fit_skewnorm_moments,
    format_of,
    matches_format,
    measure_exposure,
    parse_format,
    random_candidates,
    rank_exposure,
    skewnorm_exposure,
    skewnorm_logcdf,
    space_size,
)

R = 10 ** 16
LOG2R = math.log2(R)


def _group(digits):
    s = "".join(map(str, digits)) if not isinstance(digits, str) else digits
    return " ".join(s[i:i + 4] for i in range(0, 16, 4))


# ------------------------------------------------------------------------------------------ log-CDF accuracy
def _log_ndtr(z):
    return torch.special.log_ndtr(torch.tensor(z, dtype=torch.float64))


@pytest.mark.parametrize("z", [-40.0, -12.0, -3.0, -1.0, 0.0, 1.5, 4.0])
def test_skewnorm_logcdf_closed_forms(z):
    # alpha = 0: Phi(z); alpha = 1: Phi(z)^2 (d/dz Phi^2 = 2 phi Phi); alpha = -1: Phi(z) (2 - Phi(z)).
    # Composite Simpson on these smooth integrands: measured error < 3e-10 (relative); 1e-8 leaves margin.
    lp = float(_log_ndtr(z))
    exact = {0.0: lp, 1.0: 2 * lp, -1.0: lp + math.log(2 - math.exp(lp))}
    for alpha, want in exact.items():
        got = float(skewnorm_logcdf([z], alpha)[0])
        assert got == pytest.approx(want, rel=1e-8, abs=1e-10), (alpha, z)


def test_skewnorm_logcdf_matches_scipy_and_scales():
    st = pytest.importorskip("scipy.stats")
    # (scipy itself loses digits to cancellation in the far left tail for large alpha, e.g. alpha=10, z=-2)
    for alpha in (3.0, -4.0, 0.5):
        for z in (-2.0, -0.5, 0.0, 1.0, 2.5):
            want = float(st.skewnorm.logcdf(z, alpha))
            got = float(skewnorm_logcdf([5.0 + 2.0 * z], alpha, loc=5.0, scale=2.0)[0])
            assert got == pytest.approx(want, rel=1e-7, abs=1e-10), (alpha, z)


def test_skewnorm_logcdf_monotone_far_tail():
    # scipy underflows to -inf here; ours must stay finite and decreasing toward the tail
    v = skewnorm_logcdf([-50.0, -30.0, -10.0, -3.0], 5.0)
    assert torch.isfinite(v).all() and (v[1:] > v[:-1]).all()


# ------------------------------------------------------------------------------------------ skew-normal fits
def _sn_sample(n, alpha, gen):
    d = alpha / math.sqrt(1 + alpha * alpha)
    u0 = torch.randn(n, generator=gen, dtype=torch.float64).abs()
    u1 = torch.randn(n, generator=gen, dtype=torch.float64)
    return d * u0 + math.sqrt(1 - d * d) * u1


@pytest.mark.parametrize("fit", ["moments", "mle"])
def test_skewnorm_fit_recovers_parameters(fit):
    if fit == "mle":
        pytest.importorskip("scipy")
    x = 10.0 + 3.0 * _sn_sample(20000, 3.0, torch.Generator().manual_seed(1))
    p = fit_skewnorm_moments(x) if fit == "moments" else fit_skewnorm_mle(x)
    # Spread of the estimates over 30 replicates of n = 20000 (measured): alpha sd 0.11 (moments) / 0.07 (MLE),
    # loc sd 0.027 / 0.019, scale sd 0.023 / 0.020. Tolerances: 5 sd of the noisier estimator.
    assert p["alpha"] == pytest.approx(3.0, abs=0.55)
    assert p["loc"] == pytest.approx(10.0, abs=0.14)
    assert p["scale"] == pytest.approx(3.0, abs=0.12)


def test_skewnorm_fit_rejects_degenerate():
    with pytest.raises(ValueError, match="equal"):
        fit_skewnorm_moments(torch.ones(10))
    with pytest.raises(ValueError, match="finite"):
        rank_exposure(0.0, torch.tensor([1.0, float("nan")]))


# ------------------------------------------------------------------------------------------ additive toy
class AdditiveToy:
    def __init__(self, seed=0, cmax=400):
        g = torch.Generator().manual_seed(seed)
        self.C = torch.randint(0, cmax, (16, 10), generator=g)  # costs in units of 0.01 bit
        cnt = torch.zeros(16 * cmax + 1, dtype=torch.int64)
        cnt[0] = 1
        for j in range(16):
            new = torch.zeros_like(cnt)
            for d in range(10):
                c = int(self.C[j, d])
                new[c:] += cnt[:len(cnt) - c]
            cnt = new
        assert int(cnt.sum()) == R
        self.cum = torch.cat([torch.zeros(1, dtype=torch.int64), cnt.cumsum(0)])  # cum[s] = #{score < s}

    def score_int(self, x):
        return sum(int(self.C[j, int(ch)]) for j, ch in enumerate(x.replace(" ", "")))

    def scores(self, xs):
        return torch.tensor([self.score_int(x) for x in xs], dtype=torch.float64) / 100.0

    def n_less(self, x):
        return int(self.cum[self.score_int(x)])


def test_exact_exposure_small_space_by_enumeration():
    # 4-digit format: enumerate all 10^4 secrets; with every other secret as a "candidate" the rank estimate is the
    # exact exposure, and both agree with sorting.
    toy = AdditiveToy(seed=3)
    allx = [f"{i:04d}" for i in range(10 ** 4)]
    sc = torch.tensor([sum(int(toy.C[j, int(c)]) for j, c in enumerate(x)) for x in allx], dtype=torch.float64)
    for canary in ("0000", "4716", "9812"):
        i = int(canary)
        rank = 1 + int((sc < sc[i]).sum())
        others = torch.cat([sc[:i], sc[i + 1:]])
        est = rank_exposure(float(sc[i]), others)
        assert est["rank"] == rank
        assert est["exposure"] == pytest.approx(exposure_from_rank(rank, space_size("dddd")), abs=1e-12)


def test_rank_estimate_is_binomial_on_additive_toy():
    toy = AdditiveToy(seed=0)
    order = toy.C.argsort(1)
    n = 4000
    cands = random_candidates(n, seed=11)
    s_cand = toy.scores(cands)
    rng = random.Random(5)
    for m in (2, 5, 7):  # m positions forced to their cheapest digit: q from ~0.4 down to ~1e-3
        canary = _group([int(order[j, 0]) if j < m else rng.randrange(10) for j in range(16)])
        k_exact = toy.n_less(canary)
        q = k_exact / R
        assert n * q > 5, "canary too rare for a binomial z-test with this n"
        est = rank_exposure(toy.score_int(canary) / 100.0, s_cand)
        K = est["rank"] - 1
        z = (K - n * q) / math.sqrt(n * q * (1 - q))
        assert abs(z) < 4.5, (m, K, n * q, z)  # 4.5 sigma: two-sided false alarm 7e-6 per check
        # the exposure estimate vs the exact one: delta method sd = sqrt((1-q)/(n q)) / ln 2, plus the known bias
        # of the (K + 1)/(n + 1) fraction, at most (1 - q) / ((n + 1) q ln 2) bits
        exact = exposure_from_rank(k_exact + 1, R)
        sd = math.sqrt((1 - q) / (n * q)) / math.log(2)
        assert abs(est["exposure"] - exact) < 4.5 * sd + (1 - q) / ((n + 1) * q * math.log(2)) + 1e-9


def test_rank_estimate_saturates():
    est = rank_exposure(-1.0, torch.arange(99, dtype=torch.float64))
    assert est["rank"] == 1 and est["exposure"] == pytest.approx(math.log2(100)) == est["max"]
    est = rank_exposure(1e9, torch.arange(99, dtype=torch.float64))
    assert est["rank"] == 100 and est["exposure"] == 0.0


# ------------------------------------------------------------------------------------------ bijective toy
A = 7_654_321_987_654_321  # odd, not a multiple of 5: invertible mod 10^16
B = 123_456_789


def _toy_rank(x):
    return (A * int(x.replace(" ", "")) + B) % R + 1


def _toy_secret(k):
    return _group(f"{(pow(A, -1, R) * (k - 1 - B)) % R:016d}")


def _toy_scores(ranks, loc=60.0, scale=4.0):
    # skew-normal with alpha = 1: CDF = Phi(z)^2, so the quantile is Phi^-1(sqrt(p)) in closed form (exact tails)
    q = torch.tensor([(r - 0.5) / R for r in ranks], dtype=torch.float64)
    return loc + scale * torch.special.ndtri(q.sqrt())


def test_bijective_toy_is_consistent():
    for k in (1, 1000, 10 ** 10, R):
        assert _toy_rank(_toy_secret(k)) == k


@pytest.mark.parametrize("fit", ["mle", "moments"])
@pytest.mark.parametrize("k", [10 ** 10, 1000])
def test_skewnorm_extrapolation_unbiased_on_exact_family(fit, k):
    if fit == "mle":
        pytest.importorskip("scipy")
    exact = exposure_from_rank(k, R)  # 19.9 and 43.2 bits: far beyond log2(n + 1) = 12.3
    s_c = float(_toy_scores([k])[0])
    M, n = 20, 5000
    est = []
    for rep in range(M):
        cands = random_candidates(n, seed=100 + rep)
        est.append(skewnorm_exposure(s_c, _toy_scores([_toy_rank(x) for x in cands]), fit=fit, size=R)["exposure"])
        assert rank_exposure(s_c, _toy_scores([_toy_rank(x) for x in cands[:50]]))["rank"] == 1
    m, sd = statistics.mean(est), statistics.stdev(est)
    # z-test of the mean over M replicates (100 replicates measured: bias < 1 se, sd 0.7 bit at 20, 1.8 at 43 bits)
    assert abs(m - exact) < 4.0 * sd / math.sqrt(M), (m, sd, exact)
    assert sd < 0.15 * exact  # the extrapolation is informative, not noise


def test_skewnorm_exposure_clips_to_space():
    s = _toy_scores(range(10 ** 15, 10 ** 16, 10 ** 12))
    e = skewnorm_exposure(-1e3, s, fit="moments", size=R)
    assert e["exposure"] == LOG2R and e["exposure_raw"] > LOG2R
    e = skewnorm_exposure(1e3, s, fit="moments", size=R)
    assert e["exposure"] == pytest.approx(0.0, abs=1e-9)


def test_random_candidates_format_and_uniformity():
    c = random_candidates(3000, seed=0, exclude=["4716 2087 5533 9812"])
    assert all(len(x) == 19 and x[4] == x[9] == x[14] == " " for x in c)
    digits = torch.tensor([int(ch) for x in c for ch in x if ch != " "])
    counts = torch.bincount(digits, minlength=10).double()
    chi2 = float(((counts - counts.mean()) ** 2 / counts.mean()).sum())
    assert chi2 < 33.7  # chi-square, 9 dof: P(X > 33.7) = 1e-4
    assert random_candidates(5, seed=3) == random_candidates(5, seed=3) != random_candidates(5, seed=4)


def test_measure_exposure_on_a_memorizing_toy_lm():
    # A "language model" that puts 0.9 of its mass on the canary's next digit: its exposure must be near-maximal,
    # and a uniform model's is ~0 (the canary is an ordinary candidate).
    from sapsel_kernels.demo.lm import CharVocab

    vocab = CharVocab(list("0123456789 \nmycreditanumbs"))
    prefix, secret = "my credit card number is ", "4716 2087 5533 9812"
    seq = vocab.encode("\n" + prefix + secret)

    noise = torch.randn(len(seq), len(vocab), generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    class Memorizer(torch.nn.Module):
        def __init__(self, strength):
            super().__init__()
            self.strength = strength
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            B, T = x.shape
            logits = noise[:T].expand(B, T, len(vocab)).clone()  # position-dependent, canary-agnostic preferences
            if self.strength:
                nxt = seq[1:T + 1]  # position-indexed: the true next character of the canary line
                logits[:, torch.arange(T), nxt] = self.strength
            return logits

    hi = measure_exposure(Memorizer(8.0), vocab, prefix, secret, n_candidates=500, seed=0)
    lo = measure_exposure(Memorizer(0.0), vocab, prefix, secret, n_candidates=500, seed=0)
    assert hi["rank"] == 1 and hi["exposure_rank"] == pytest.approx(math.log2(501))
    assert hi["exposure_sn"] > 30
    # canary-agnostic model: the canary is an ordinary candidate, -log2 of a uniform rank fraction (mean 1.44
    # bits; P(> 8 bits) = 0.4%); both estimates agree within the rank estimate's resolution
    assert lo["exposure_rank"] < 8 and abs(lo["exposure_sn"] - lo["exposure_rank"]) < 1.5


# ------------------------------------------------------------------------------------------ format classes
def test_format_classes_and_escapes():
    assert space_size("dddd dddd dddd dddd") == R and space_size("") == 1
    assert space_size("aA-x") == 26 * 26 * 16 and space_size("id\\d") == 10 and space_size("\\\\") == 1
    assert parse_format("a\\x-") == ["abcdefghijklmnopqrstuvwxyz", "x", "-"]
    assert matches_format("4f-Z", "xx-A") and not matches_format("4g-Z", "xx-A") and not matches_format("4f-", "xx-A")
    assert matches_format("id7", "i\\dd") and not matches_format("i77", "i\\dd")
    with pytest.raises(ValueError, match="lone backslash"):
        space_size("dd\\")
    with pytest.raises(TypeError, match="format"):
        space_size(None)


def test_format_of_round_trips():
    assert format_of("4716 2087") == "dddd dddd"
    assert format_of("Pw:x9\\") == "Aa:ad\\\\"
    for secret in ("4716 2087 5533 9812", "hunter2", "AB-12\\cd", "naïve 1"):
        assert matches_format(secret, format_of(secret))
        assert format_of(secret).count("\\") % 2 == 0


def test_random_candidates_digit_stream_unchanged_and_classes_uniform():
    # 'd' draws randrange(10) per digit and literals draw nothing, so a seed's digit candidates (stored lists,
    # before/after comparisons) are those of the plain per-digit loop
    rng = random.Random(7)
    old = ["".join(str(rng.randrange(10)) if c == "d" else c for c in "dddd-dd") for _ in range(50)]
    assert random_candidates(50, "dddd-dd", seed=7) == old
    c = random_candidates(3000, "xA\\a", seed=1)
    assert all(matches_format(x, "xA\\a") and x[2] == "a" for x in c)
    for j, k in ((0, 16), (1, 26)):
        counts = torch.bincount(torch.tensor(["0123456789abcdefABCDEFGHIJKLMNOPQRSTUVWXYZ".index(x[j]) for x in c]),
                                minlength=42).double()
        counts = counts[counts > 0]
        assert len(counts) == k
        chi2 = float(((counts - counts.mean()) ** 2 / counts.mean()).sum())
        assert chi2 < {16: 44.3, 26: 60.1}[k]  # chi-square with k - 1 dof: P(X > bound) = 1e-4


def test_random_candidates_refuses_an_exhausted_space():
    with pytest.raises(ValueError, match="all are excluded"):
        random_candidates(1, "pin", exclude=["pin"])
    with pytest.raises(ValueError, match="all are excluded"):
        random_candidates(3, "d", exclude=[str(i) for i in range(10)])
    assert random_candidates(4, "d", exclude=[str(i) for i in range(9)]) == ["9"] * 4
    assert random_candidates(0, "pin", exclude=["pin"]) == []


def test_measure_exposure_default_format_keeps_letters_literal():
    # digits become 'd', every other character is literal -- also a letter that is a placeholder ('d', 'a', 'x')
    from sapsel_kernels.demo.lm import CharVocab

    vocab = CharVocab(list("0123456789 adix\n"))

    class Uniform(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(len(vocab)))

        def forward(self, x):
            return self.w.expand(*x.shape, len(vocab)) + torch.randn(*x.shape, len(vocab)) * 0.1

    m = measure_exposure(Uniform(), vocab, "a ", "id x 42", n_candidates=20, fit="moments")
    assert m["log2_space"] == pytest.approx(math.log2(100))
