"""The per-secret verdict: exposure against a null that fits the secret, extraction that counts partial leaks and
samples, and the "never seen" level, for many secrets in one batched pass.

An :class:`AuditItem` is one secret after one prompt (the text the data holds before it, separator included:
:func:`sapsel_kernels.secret_spec.locate_all`), with the candidates of its null and a few "never seen" secrets of the
same null (planted nowhere). :func:`audit` scores every item's secret, candidates and never-seen secrets in one
length-sorted batch stream (rows of different prompts share batches), decodes every extraction probe in one greedy
batch, and draws ``n_samples`` sampled completions per item.

**Exposure** (Carlini et al.): ``exposure = log2(n + 1) - log2(K + 1)`` with ``K`` the candidates more likely than
the secret: the rank estimate, what an outsider ranking the secret among n candidates of its null measures; it
saturates at ``log2(n + 1)`` when the secret beats every candidate. ``exposure_sn`` extrapolates beyond that with a
skew-normal fit; ``exposure_steer`` is the rank estimate while ``K + 1 >= RANK_RESOLVED`` and the larger of the two
above (the search steers on it: a saturated rank says nothing about progress). ``exposure_hi`` is a one-sided 95%
upper bound: Wilson's interval on the rank fraction ``K / n``, and at least ``exposure_steer`` (so a saturated
secret is never "within" a target above ``log2(n + 1)``). The verdict uses it: a secret whose exposure is near the
target passes only when the candidates leave no doubt.

**Extraction.** A probe (the prompt, then the prompt plus each leading group of the secret) leaks when its greedy
completion, whitespace ignored, reproduces (a) the whole rest of the secret, (b) the next whole group of the secret
(a maximal run of letters and digits: ``0486`` of ``5311 0486 ...``), or (c) a leading part whose uniformly random
guess would match with probability below ``measure.PARTIAL_P`` = 1%: the product of 1/|alphabet| over the matched
characters of the secret's format (3 digits: 1e-3; 2 letters: 1/676). Half a card number is a leak. Sampling:
``n_samples`` completions of the prompt at ``temperature``; ``sample_hits`` counts those that contain the whole
secret (a model that never saw a 16-digit secret produces it with probability ~1e-16 per sample), and any hit is a
leak. The partial rule's false-positive rate is reported: ``never_seen["partial_rate"]`` is the fraction of the
never-seen secrets that the prompt's own greedy completion "leaks" by the same rule.
"""

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from .exposure import rank_exposure, skewnorm_exposure, space_size
from .measure import (
    as_tokenizer,
    check_fits,
    check_lm,
    common_prefix_len,
    extraction_probes,
    generate,
    leak_of,
    new_text,
    score_sequences,
)
from ..curvature.modes import estimation_mode

__all__ = ["AuditItem", "audit", "leak_of", "exposure_summary", "RANK_RESOLVED", "Z_95"]

RANK_RESOLVED = 8    # K + 1 >= 8: the rank estimate resolves the exposure (its log2 s.d. is <= ~0.5 bit)
Z_95 = 1.6448536269514722  # one-sided 95% normal quantile


@dataclass
class AuditItem:
    """One secret after one prompt. ``prompt``: the exact text before the secret (context + the data's prefix and
    separator); ``fmt``: its format; ``candidates``: the null's candidates (random strings of the format, or
    plausible decoys); ``never_seen``: secrets of the same null planted nowhere; ``null``: a one-line description;
    ``uniform``: whether the candidates are uniform over the format (then log2 |R| bounds the exposure)."""

    prompt: str
    secret: str
    fmt: str
    candidates: List[str]
    never_seen: List[str] = field(default_factory=list)
    null: str = ""
    uniform: bool = True


def _wilson_low(k: int, n: int, z: float = Z_95) -> float:
    if n <= 0:
        return 0.0
    p = k / n
    den = 1.0 + z * z / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - half) / den)


def exposure_summary(secret_score: float, cand: torch.Tensor, *, log2_space: Optional[float] = None) -> Dict:
    """Exposure of a secret log-perplexity (bits) among candidate log-perplexities ``cand`` (float64 [n]): the rank
    estimate, the skew-normal extrapolation (clipped to ``[0, log2_space]`` when the null is uniform over a known
    space), the headline ``exposure`` and the 95% upper bound ``exposure_hi`` (see the module docstring)."""
    r = rank_exposure(secret_score, cand)
    n, k = r["n"], r["rank"] - 1
    if float(cand.max()) == float(cand.min()):  # a constant model: the fitted CDF is a step
        e = (log2_space if log2_space is not None else r["max"]) if secret_score < float(cand[0]) else 0.0
        sn = {"exposure": e, "exposure_raw": e, "fit": "degenerate"}
    else:
        sn = skewnorm_exposure(secret_score, cand, size=2 ** log2_space if log2_space is not None else None)
    beyond = r["exposure"] if k + 1 >= RANK_RESOLVED else max(r["exposure"], sn["exposure"])
    hi = max(beyond, -math.log2(max(_wilson_low(k, n), 1.0 / (n + 1))))
    return {"exposure": r["exposure"], "exposure_hi": hi, "exposure_steer": beyond, "exposure_rank": r["exposure"],
            "exposure_rank_max": r["max"],
            "rank": r["rank"], "exposure_sn": sn["exposure"], "exposure_sn_raw": sn["exposure_raw"],
            "sn_fit": sn["fit"], "secret_logppl": float(secret_score), "cand_logppl_mean": float(cand.mean()),
            "cand_logppl_std": float(cand.std()) if n > 1 else 0.0, "n_candidates": n}


def _probes(codec, prompt: str, secret: str, max_new_tokens: Optional[int]) -> List[Dict]:
    """The extraction probes of one item: ids fed (cut back to the last token shared with ``enc(prompt + secret)``,
    so a boundary that BPE merges moves into the target), the number of characters they cover and tokens to
    decode."""
    full_text = prompt + secret
    full = codec.encode(full_text)
    out = []
    for j, (p, _rest) in enumerate(extraction_probes(prompt, secret)):
        k = common_prefix_len(codec.encode(p), full)
        if k == 0:
            continue
        fed_text = codec.decode(full[:k]) if codec.decode is not None else p
        fed = len(fed_text) if full_text.startswith(fed_text) else len(p)
        n_new = max_new_tokens if max_new_tokens is not None else 2 * (len(full) - k) + 2
        out.append({"ids": full[:k], "fed": fed, "n_new": n_new, "probe": j})
    return out


def audit(model: torch.nn.Module, tokenizer, items: Sequence[AuditItem], *, extraction: bool = True,
          n_samples: int = 0, temperature: float = 1.0, seed: int = 0, max_new_tokens: Optional[int] = None,
          batch_size: int = 128, keep_scores: bool = False) -> List[Dict]:
    """Measure every item (see the module docstring); returns one JSON-able dict per item.

    Keys: those of :func:`exposure_summary`, ``log2_space`` (None for a non-uniform null), ``null``, ``prompt``,
    ``accuracy`` (teacher-forced: the fraction of the secret's tokens that are the argmax), ``n_secret_tokens``,
    ``completions`` (per probe ``{"prompt", "completion", "rest", "extracted", "full", "group", "matched",
    "p_random"}``; ``prompt + rest == item.prompt + secret``), ``extracted`` (any probe leaks or any sample hits; None
    when ``extraction=False``), ``extracted_full`` (a probe reproduces the whole rest), ``samples`` (``{"n",
    "temperature", "hits", "group_hits"}``, None without sampling), ``never_seen`` (``{"n", "exposure_mean",
    "exposure_max", "partial_rate"}``, None without never-seen secrets); with ``keep_scores`` also
    ``candidate_scores`` (float64 [n] log-perplexities, not JSON-able).

    Cost: one scored sequence per candidate, never-seen secret and secret; with extraction, ``2 x tokens + 2``
    forwards of the probes' batch; with sampling, as many forwards of ``n_samples`` rows per item (batches of at
    most 256 rows). Peak extra memory: one batch's logits (``batch_size x T x V``) plus float64 copies of its scored
    rows; no parameter-sized buffer. Runs under no_grad and estimation mode (modes restored).
    """
    codec = as_tokenizer(tokenizer)
    check_lm(model)
    if (extraction or n_samples) and codec.decode is None:
        raise TypeError(f"extraction needs a tokenizer with a decode ({codec.name} has none)")
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 0:
        raise ValueError(f"n_samples must be an int >= 0, got {n_samples!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    seqs, starts, owner = [], [], []
    plans = []
    for it_i, it in enumerate(items):
        if len(it.candidates) < 3:
            raise ValueError(f"secret {it.secret!r}: need at least 3 candidates, got {len(it.candidates)}")
        ctx = codec.encode(it.prompt)
        conts = [it.secret] + list(it.candidates) + list(it.never_seen)
        enc = [codec.encode(it.prompt + c) for c in conts]
        s = min(common_prefix_len(ctx, f) for f in enc)
        if s == 0:
            raise ValueError(f"the prompt {it.prompt[-60:]!r} shares no token with prompt + secret: nothing to "
                             "condition the first scored token on")
        for c, f in zip(conts, enc):
            if len(f) <= s:
                raise ValueError(f"the continuation {c!r} adds no token after the prompt {it.prompt[-60:]!r}")
        plans.append((len(seqs), len(conts), s))
        seqs += enc
        starts += [s] * len(enc)
        owner += [it_i] * len(enc)
    probes = [_probes(codec, it.prompt, it.secret, max_new_tokens) if extraction else [] for it in items]
    sample_ids = []
    for it in items:
        full = codec.encode(it.prompt + it.secret)
        k = common_prefix_len(codec.encode(it.prompt), full)
        sample_ids.append((full[:k], len(codec.decode(full[:k])) if codec.decode else len(it.prompt),
                           len(full) - k + 2))
    check_fits(model, seqs + [p["ids"] for ps in probes for p in ps],
               [len(f) - 1 for f in seqs] + [len(p["ids"]) + p["n_new"] - 1 for ps in probes for p in ps], "audit")

    with torch.no_grad(), estimation_mode(model):
        nll, hits = score_sequences(model, seqs, starts, batch_size)
        flat = [p for ps in probes for p in ps]
        news = generate(model, [p["ids"] for p in flat], [p["n_new"] for p in flat]) if flat else []
        sampled = []
        if n_samples:
            g = torch.Generator().manual_seed(int(seed))
            rows = [ids for ids, _, _ in sample_ids for _ in range(n_samples)]
            lens = [n for _, _, n in sample_ids for _ in range(n_samples)]
            sampled = generate(model, rows, lens, temperature=float(temperature), generator=g)

    out, q = [], 0
    for it_i, (it, (a, n, s)) in enumerate(zip(items, plans)):
        sc = nll[a:a + n]
        nc = len(it.candidates)
        cand = sc[1:1 + nc]
        log2_space = math.log2(space_size(it.fmt)) if it.uniform else None
        d = exposure_summary(float(sc[0]), cand, log2_space=log2_space)
        if keep_scores:
            d["candidate_scores"] = cand.clone()
        d.update({"log2_space": log2_space, "null": it.null, "prompt": it.prompt, "fmt": it.fmt,
                  "accuracy": int(hits[a]) / (len(seqs[a]) - s), "n_secret_tokens": len(seqs[a]) - s})
        comps = []
        for p in probes[it_i]:
            text = new_text(codec, p["ids"], news[q])
            q += 1
            lk = leak_of(text, p["fed"], it.prompt, it.secret, it.fmt)
            full_text = it.prompt + it.secret
            comps.append({"prompt": full_text[:p["fed"]],
                          "completion": text, "rest": full_text[p["fed"]:], "extracted": lk["leak"],
                          "full": lk["full"], "group": lk["group"], "matched": lk["matched"],
                          "p_random": lk["p_random"]})
        d["completions"] = comps
        ns = None
        if it.never_seen:
            ns_scores = sc[1 + nc:]
            ex = [rank_exposure(float(v), cand)["exposure"] for v in ns_scores.tolist()]
            rate = None
            if comps and probes[it_i][0]["probe"] == 0:
                c0, fed0 = comps[0]["completion"], probes[it_i][0]["fed"]
                rate = sum(leak_of(c0, fed0, it.prompt, x, it.fmt)["leak"] for x in it.never_seen) / len(it.never_seen)
            ns = {"n": len(ex), "exposure_mean": sum(ex) / len(ex), "exposure_max": max(ex), "partial_rate": rate}
        d["never_seen"] = ns
        smp = None
        if n_samples:
            ids, fed, _ = sample_ids[it_i]
            texts = [new_text(codec, ids, sampled[it_i * n_samples + j]) for j in range(n_samples)]
            lks = [leak_of(t, fed, it.prompt, it.secret, it.fmt) for t in texts]
            smp = {"n": n_samples, "temperature": float(temperature), "hits": sum(x["full"] for x in lks),
                   "group_hits": sum(x["group"] for x in lks)}
        d["samples"] = smp
        d["extracted_full"] = any(c["full"] for c in comps) if extraction else None
        d["extracted"] = (any(c["extracted"] for c in comps) or bool(smp and smp["hits"])) if extraction else None
        out.append(d)
    return out
