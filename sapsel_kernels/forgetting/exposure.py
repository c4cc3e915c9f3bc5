"""Exposure of a canary (Carlini et al., "The Secret Sharer", USENIX Security 2019; used by Warnecke et al. 2023).

Definitions. ``R`` is the set of all secrets of the canary's format (``10**16`` for 16 digits); every candidate
``r`` in ``R`` gets the model's log-perplexity ``s(r) = -log2 P(prefix + r) `` (lower = more likely). The canary's
rank is its position when ``R`` is sorted by ``s`` ascending, counting 1 for the most likely, and

    exposure = log2 |R| - log2 rank        (0 <= exposure <= log2 |R|; 53.15 bits for 16 digits).

Ties: rank = 1 + #{r : s(r) < s(canary)} (ties resolved in the canary's favour; with float log-perplexities of a
trained model ties are practically absent).

``|R|`` is far too large to enumerate, so two estimators from ``n`` candidates drawn uniformly from ``R``:

(a) **Rank estimate** :func:`rank_exposure`. With ``K = #{i : s_i < s(canary)}`` among the ``n`` samples, the
    canary's rank among the ``n + 1`` (canary included) is ``K + 1`` and the rank fraction ``(K + 1) / (n + 1)``
    estimates ``rank / |R|``; exposure_rank = ``log2(n + 1) - log2(K + 1)``. ``K ~ Binomial(n, q)`` exactly with
    ``q = (rank - 1) / |R|``, so the estimate is consistent; it saturates at ``log2(n + 1)`` (the canary beats
    every sample), i.e. it is a *lower bound* at high exposure: 13.3 bits with 10k candidates.
(b) **Skew-normal extrapolation** :func:`skewnorm_exposure` (Carlini et al. Sec. 4.3, Warnecke et al.): fit a
    skew-normal to the ``n`` candidate log-perplexities and read the canary's rank fraction off the fitted CDF:
    exposure_sn = ``-log2 CDF(s(canary))``. Fit: maximum likelihood with ``scipy.stats.skewnorm.fit`` when scipy is
    installed (``fit="mle"``), otherwise (or ``fit="moments"``) the method of moments (mean, variance, skewness;
    the sample skewness is clipped to the family's maximum 0.9953). The log-CDF is our own (:func:`skewnorm_logcdf`:
    log-space quadrature, no underflow down to ``1e-300`` and below), so the extrapolation works far into the tail.
    It is clipped to ``[0, log2 |R|]`` (``clip=True``) since exposure cannot exceed ``log2 |R|``.

All scores are float64 tensors/arrays of log-perplexities in bits.
"""

import math
import random
import string
from typing import Dict, List, Optional, Sequence

import torch

from ..errors import NonFiniteError

_SN_MAX_SKEW = 0.9952717464311565  # skewness of the skew-normal as alpha -> inf: sqrt(2)(4-pi)/(pi-2)^1.5


# one alphabet per placeholder; every other character of a format is literal, and "\\c" is the literal c
FORMAT_CLASSES = {"d": "0123456789", "a": string.ascii_lowercase, "A": string.ascii_uppercase,
                  "x": "0123456789abcdef"}


def parse_format(fmt: str) -> List[str]:
    """The characters allowed at each position of a secret format: the class's alphabet for a placeholder
    (``d`` digit, ``a`` a-z, ``A`` A-Z, ``x`` hex digit 0-9a-f), a one-character string for a literal.

    A backslash makes the next character literal (``"id\\d"`` is ``i``, ``d``, then literal ``d``: not ``i``, a
    digit). ValueError for a non-string or a trailing lone backslash.
    """
    if not isinstance(fmt, str):
        raise TypeError(f"a secret format must be a str, got {type(fmt).__name__}")
    out, i = [], 0
    while i < len(fmt):
        c = fmt[i]
        if c == "\\":
            if i + 1 == len(fmt):
                raise ValueError(f"format {fmt!r} ends with a lone backslash (write '\\\\' for a literal one)")
            out.append(fmt[i + 1])
            i += 2
            continue
        out.append(FORMAT_CLASSES.get(c, c))
        i += 1
    return out


def space_size(fmt: str) -> int:
    """Number of secrets of a format string (see :func:`parse_format`; ``10 ** 16`` for "dddd dddd dddd dddd")."""
    return math.prod(len(a) for a in parse_format(fmt))


def matches_format(secret: str, fmt: str) -> bool:
    """Whether ``secret`` is one of the secrets of ``fmt``."""
    return matches_positions(secret, parse_format(fmt))


def matches_positions(secret, pos: List[str]) -> bool:
    return isinstance(secret, str) and len(secret) == len(pos) and all(c in a for c, a in zip(secret, pos))


def _escape(c: str) -> str:
    return "\\" + c if c in FORMAT_CLASSES or c == "\\" else c


def format_of(secret: str) -> str:
    """The format of a secret: ASCII digits -> ``d``, a-z -> ``a``, A-Z -> ``A``, everything else literal
    (escaped where it is a placeholder letter or a backslash), so ``matches_format(secret, format_of(secret))``.

    Hex secrets are not detected (``"4f3a"`` gives ``"dada"``): pass ``fmt="xxxx"`` for them.
    """
    if not isinstance(secret, str):
        raise TypeError(f"secret must be a str, got {type(secret).__name__}")
    table = {**{c: "d" for c in string.digits}, **{c: "a" for c in string.ascii_lowercase},
             **{c: "A" for c in string.ascii_uppercase}}
    return "".join(table.get(c) or _escape(c) for c in secret)


def _digit_format(secret: str) -> str:
    """Digits -> ``d``, everything else literal: :func:`measure_exposure`'s default for character-level canaries."""
    return "".join("d" if c in string.digits else _escape(c) for c in secret)


def random_candidates(n: int, fmt: str = "dddd dddd dddd dddd", *, seed: int = 0,
                      exclude: Sequence[str] = ()) -> List[str]:
    """``n`` secrets drawn uniformly (with replacement) from the format, skipping ``exclude`` (e.g. the canary).

    ``random.Random(seed)`` draws one ``randrange(len(alphabet))`` per placeholder, left to right (literals draw
    nothing), so a seed gives the same candidates on every run. ValueError when ``exclude`` covers every secret of
    the format (e.g. a format without placeholders).
    """
    pos = parse_format(fmt)
    rng = random.Random(seed)
    ex, out = set(exclude), []
    if n > 0 and sum(matches_positions(e, pos) for e in ex) >= math.prod(len(a) for a in pos):
        raise ValueError(f"format {fmt!r} has {space_size(fmt)} secret(s) and all are excluded: no candidate can be "
                         "drawn (does the format have a placeholder d, a, A or x?)")
    while len(out) < n:
        s = "".join(a[rng.randrange(len(a))] if len(a) > 1 else a for a in pos)
        if s not in ex:
            out.append(s)
    return out


def exposure_from_rank(rank, size) -> float:
    """Exact exposure ``log2 |R| - log2 rank`` (rank 1 = most likely)."""
    if not 1 <= rank <= size:
        raise ValueError(f"rank must be in [1, {size}], got {rank}")
    return math.log2(size) - math.log2(rank)


def _as_f64(x) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float64).flatten()
    if t.numel() and not torch.isfinite(t).all():
        raise NonFiniteError("exposure: log-perplexities must be finite (a NaN/Inf score cannot be ranked)")
    return t


def rank_exposure(canary_score: float, candidate_scores) -> Dict[str, float]:
    """Rank-based exposure estimate (a) from ``n`` uniformly drawn candidates.

    Returns ``{"exposure", "rank" (K + 1 among the n + 1), "n", "max" (= log2(n + 1), the saturation value)}``.
    """
    c = _as_f64(candidate_scores)
    n = c.numel()
    if n == 0:
        raise ValueError("need at least one candidate")
    k = int((c < float(canary_score)).sum())
    return {"exposure": math.log2(n + 1) - math.log2(k + 1), "rank": k + 1, "n": n, "max": math.log2(n + 1)}


# ----------------------------------------------------------------------------------------------- skew-normal
_LOG2PI_HALF = 0.5 * math.log(2 * math.pi)


def _log_pdf_std(t: torch.Tensor, alpha: float) -> torch.Tensor:
    """log of the standard skew-normal density 2 phi(t) Phi(alpha t)."""
    return math.log(2.0) - 0.5 * t * t - _LOG2PI_HALF + torch.special.log_ndtr(alpha * t)


def _simpson_log_weights(t: torch.Tensor) -> torch.Tensor:
    """log of composite Simpson weights on an evenly spaced grid with an odd number of points."""
    h = float(t[1] - t[0])
    w = torch.full_like(t, 2.0)
    w[1::2] = 4.0
    w[0] = w[-1] = 1.0
    return (w * (h / 3.0)).log()


def skewnorm_logcdf(x, alpha: float, loc: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    """Natural log of the skew-normal CDF, accurate far into the left tail (float64).

    ``log F(z) = log int_{-inf}^z 2 phi(t) Phi(alpha t) dt`` with ``z = (x - loc) / scale``. The integrand is
    log-concave, so with ``lam = d/dt log f(z) > 0`` (z left of the mode) the substitution ``t = z - v / lam`` gives
    an integrand below ``f(z) e^{-v}``: log-space Simpson rule on ``v in [0, 60]`` (4001 points) is accurate to
    ~1e-9 relative. Elsewhere a direct log-space Simpson rule on ``t in [-12 - |z|, z]`` (no mass is lost: the standard
    skew-normal puts < 1e-30 below -12). Oracles in the tests: alpha = 0 gives log Phi(z), alpha = 1 gives
    2 log Phi(z), and scipy.stats.skewnorm in its accurate range.
    """
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    z = ((_as_f64(x) - loc) / scale)
    out = torch.empty_like(z)
    v = torch.linspace(0.0, 60.0, 4001, dtype=torch.float64)
    for i, zi in enumerate(z.tolist()):
        # d/dt log f at z: -z + alpha * phi(alpha z) / Phi(alpha z)
        az = torch.tensor(alpha * zi, dtype=torch.float64)
        mills = torch.exp(-0.5 * az * az - _LOG2PI_HALF - torch.special.log_ndtr(az))
        lam = float(-zi + alpha * mills)
        if lam > 1.0:
            lf = _log_pdf_std(zi - v / lam, alpha)
            out[i] = torch.logsumexp(lf + _simpson_log_weights(v), 0) - math.log(lam)
        else:
            t = torch.linspace(min(-12.0 - abs(zi), zi - 1.0), zi, 8001, dtype=torch.float64)
            lf = _log_pdf_std(t, alpha)
            out[i] = min(0.0, float(torch.logsumexp(lf + _simpson_log_weights(t), 0)))
    return out


def fit_skewnorm_moments(scores) -> Dict[str, float]:
    """Method-of-moments skew-normal fit ``{"alpha", "loc", "scale"}`` (sample skewness clipped to +-0.9953)."""
    s = _as_f64(scores)
    if s.numel() < 3:
        raise ValueError("need at least 3 scores to fit a skew-normal")
    m, sd = float(s.mean()), float(s.std(unbiased=True))
    if sd == 0:
        raise ValueError("all candidate scores are equal: cannot fit a distribution")
    g = float(((s - m) ** 3).mean()) / float(((s - m) ** 2).mean()) ** 1.5
    g = max(-_SN_MAX_SKEW, min(_SN_MAX_SKEW, g))
    # skewness = (4 - pi)/2 * u^3 / (1 - u^2)^1.5 with u = b delta, b = sqrt(2/pi)
    c = math.copysign(abs(2 * g / (4 - math.pi)) ** (1 / 3), g)
    u = c / math.sqrt(1 + c * c)
    delta = u / math.sqrt(2 / math.pi)
    delta = max(-0.9999, min(0.9999, delta))
    u = delta * math.sqrt(2 / math.pi)
    alpha = delta / math.sqrt(1 - delta * delta)
    scale = sd / math.sqrt(1 - u * u)
    return {"alpha": alpha, "loc": m - scale * u, "scale": scale}


def fit_skewnorm_mle(scores) -> Dict[str, float]:
    """Maximum-likelihood skew-normal fit via ``scipy.stats.skewnorm.fit`` (started from the moment fit)."""
    from scipy.stats import skewnorm

    s = _as_f64(scores)
    m0 = fit_skewnorm_moments(s)
    a, loc, scale = skewnorm.fit(s.numpy(), m0["alpha"], loc=m0["loc"], scale=m0["scale"])
    return {"alpha": float(a), "loc": float(loc), "scale": float(scale)}


def _have_scipy() -> bool:
    try:
        import scipy.stats  # noqa: F401
    except Exception:
        return False
    return True


def skewnorm_exposure(canary_score: float, candidate_scores, *, fit: str = "auto", size: Optional[int] = None,
                      clip: bool = True) -> Dict[str, float]:
    """Skew-normal extrapolation (b): ``-log2 CDF_fit(canary_score)``.

    ``fit``: "auto" (MLE when scipy is importable, else moments), "mle" or "moments". ``size`` (``|R|``) enables
    clipping to ``[0, log2 |R|]``. Returns ``{"exposure", "exposure_raw", "alpha", "loc", "scale", "fit"}``.
    """
    if fit == "auto":
        fit = "mle" if _have_scipy() else "moments"
    if fit == "mle":
        p = fit_skewnorm_mle(candidate_scores)
    elif fit == "moments":
        p = fit_skewnorm_moments(candidate_scores)
    else:
        raise ValueError(f"fit must be 'auto', 'mle' or 'moments', got {fit!r}")
    raw = -float(skewnorm_logcdf([float(canary_score)], p["alpha"], p["loc"], p["scale"])[0]) / math.log(2.0)
    e = raw
    if clip:
        e = max(0.0, e)
        if size is not None:
            e = min(e, math.log2(size))
    return {"exposure": e, "exposure_raw": raw, "fit": fit, **p}


@torch.no_grad()
def sequence_log_perplexity(model: torch.nn.Module, vocab, context: str, suffixes: Sequence[str],
                            batch_size: int = 1024) -> torch.Tensor:
    """Log-perplexity in bits of each suffix given ``context``: ``-sum_t log2 p(s_t | context, s_<t)``.

    Generic over the model and the tokenizer: ``model(ids)`` maps int64 token ids ``[B, T]`` to next-token logits
    ``[B, T, V]`` (any causal LM; the demo's :mod:`sapsel_kernels.demo.lm` models), and ``vocab.encode(text)``
    returns the int64 ids of a string, one id per character of a suffix (a character vocabulary). The context's own
    tokens are not scored (they are the same for every candidate, so they shift all log-perplexities by one constant
    and do not change ranks). All suffixes must have one length. Runs every module in eval mode (restored afterwards).
    Returns float64 ``[len(suffixes)]`` on the CPU.
    """
    if not suffixes:
        return torch.empty(0, dtype=torch.float64)
    L = len(suffixes[0])
    if any(len(s) != L for s in suffixes):
        raise ValueError("all suffixes must have the same length")
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        ctx = vocab.encode(context)
        dev = next(model.parameters()).device
        out = []
        for i in range(0, len(suffixes), batch_size):
            chunk = suffixes[i:i + batch_size]
            suf = torch.stack([vocab.encode(s) for s in chunk])  # [b, L]
            seq = torch.cat([ctx.expand(len(chunk), -1), suf], dim=1).to(dev)
            logits = model(seq[:, :-1]).double()
            logp = logits[:, len(ctx) - 1:].log_softmax(-1)  # predictions for the suffix characters
            tok = seq[:, len(ctx):]
            nll = -logp.gather(-1, tok[..., None]).squeeze(-1).sum(1) / math.log(2.0)
            out.append(nll.cpu())
    finally:
        for m, t in flags:
            m.training = t
    return torch.cat(out)


def measure_exposure(model, vocab, prefix: str, secret: str, *, n_candidates: int = 4000, seed: int = 0,
                     fmt: Optional[str] = None, context: str = "\n", fit: str = "auto",
                     candidates: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """Exposure of ``secret`` after ``context + prefix`` under a character LM (see :func:`sequence_log_perplexity`
    for what ``model`` and ``vocab`` must provide; the demo's models are in :mod:`sapsel_kernels.demo.lm`).

    ``fmt`` defaults to the secret with every digit replaced by 'd' (other characters literal, see
    :func:`parse_format`). Pass the same ``candidates`` (or seed) before
    and after unlearning so both measurements share the reference sample. Returns a flat dict: canary
    log-perplexity (bits), candidate mean/sd, both estimates, ``log2 |R|``.
    """
    fmt = fmt or _digit_format(secret)
    if candidates is None:
        candidates = random_candidates(n_candidates, fmt, seed=seed, exclude=[secret])
    scores = sequence_log_perplexity(model, vocab, context + prefix, [secret] + list(candidates))
    s_c, s = float(scores[0]), scores[1:]
    size = space_size(fmt)
    r = rank_exposure(s_c, s)
    sn = skewnorm_exposure(s_c, s, fit=fit, size=size)
    return {
        "canary_logppl": s_c,
        "cand_logppl_mean": float(s.mean()),
        "cand_logppl_std": float(s.std()),
        "exposure_rank": r["exposure"],
        "exposure_rank_max": r["max"],
        "rank": r["rank"],
        "exposure_sn": sn["exposure"],
        "exposure_sn_raw": sn["exposure_raw"],
        "sn_alpha": sn["alpha"],
        "sn_fit": sn["fit"],
        "log2_space": math.log2(size),
        "n_candidates": len(candidates),
    }
