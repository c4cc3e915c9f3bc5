"""``forget``: remove a memorised secret (a card number, a password) from a causal language model, touching only a
selected subset S of its parameters.

The pipeline, on the user's own text and tokenizer:

1. **Z and Z̃, token-aligned.** The texts are tokenized as the model saw them (offsets from the tokenizer when it
   reports them: Hugging Face fast tokenizers, ``tokenizers.Tokenizer``, character-level codecs; otherwise the text
   is tokenized in segments cut at the secret's boundaries). Training windows of ``seq_len + 1`` tokens at stride
   ``seq_len // 2``; Z = every window with a secret token among its targets, with targets kept ONLY at the secret's
   tokens (the forget term acts on the secret, not on the text around it); Z̃ = the window starting at the same
   character in the text with every occurrence replaced by ``replacement`` (which may tokenize to another length),
   all targets kept. Held-out windows (``heldout``) measure perplexity: even ones steer the search (validation),
   odd ones are reported (test). Retain batches are drawn from the other training windows.
2. **Score and select** with any strategy of :func:`~sapsel_kernels.strategies.select_parameters` (default
   ``ssd``: the ratio of the empirical Fisher on Z to that on training windows; ``hessian``, the largest diagonal
   entries of the training-loss Hessian at θ*, and ``hessian_ratio`` are measured against it in docs/forget.md),
   budget k; the scores are returned (``report.scores``) and reusable (``forget(..., scores=...)``). Strategies that
   read Z (``ssd``, ``grad_abs``, ``hessian_affected``, ``hessian_ratio``) get the windows as trained on, every
   target kept.
3. **Unlearn** with :class:`~sapsel_kernels.rules.Targeted` (descent on Z̃, NPO on Z's secret tokens, retain
   cross-entropy, SparseSGD on S) through :func:`~sapsel_kernels.unlearn.unlearn` (all-or-nothing, S only), with a
   monitor that measures the secret's exposure and extraction (:mod:`sapsel_kernels.measure`) and the validation
   perplexity every ``check_every`` steps: the step size is searched (a block that leaves the perplexity budget is
   undone and lr divided by 4; a block that barely moves exposure doubles it) and the run stops at the target.
4. **Measure** before and after on the same candidates: exposure (skew-normal and rank), greedy extraction from the
   prefix and from every proper prefix of the secret's groups, teacher-forced accuracy, test perplexity.
"""

import bisect
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .rules import Targeted
from .space import ParamSpace

__all__ = ["forget", "ForgetReport", "build_forget_data", "ForgetData"]

IGNORE = -100


# ================================================================================================ data
@dataclass
class ForgetData:
    """The token-aligned data of one ``forget`` call (all int64 CPU tensors ``[n, seq_len]``).

    ``affected``: Z as trained on (all targets); ``affected_secret``: the same windows with targets only at secret
    tokens (-100 elsewhere); ``corrected``: Z̃; ``train``: every training window (all targets); ``retain``: training
    windows without a secret token; ``val`` / ``test``: held-out windows."""

    affected: Tuple[torch.Tensor, torch.Tensor]
    affected_secret: Tuple[torch.Tensor, torch.Tensor]
    corrected: Tuple[torch.Tensor, torch.Tensor]
    train: Tuple[torch.Tensor, torch.Tensor]
    retain: Tuple[torch.Tensor, torch.Tensor]
    val: Tuple[torch.Tensor, torch.Tensor]
    test: Tuple[torch.Tensor, torch.Tensor]
    n_occurrences: int
    seq_len: int
    offsets_exact: bool


def _encode_offsets(tokenizer, codec, text: str, cuts: Sequence[Tuple[int, int]]) -> Tuple[List[int], List[int],
                                                                                             bool]:
    """Token ids of ``text`` and each token's start character. Exact offsets from a Hugging Face fast tokenizer, a
    ``tokenizers.Tokenizer`` or a character-level codec; otherwise the text is tokenized in segments cut at the
    ``cuts`` spans (the secret occurrences) and tokens get monotone starts inside their segment."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [int(a) for a, _ in enc["offset_mapping"]], True
    if type(tokenizer).__module__.startswith("tokenizers") and hasattr(tokenizer, "encode"):
        enc = tokenizer.encode(text, add_special_tokens=False)
        return list(enc.ids), [int(a) for a, _ in enc.offsets], True
    ids = codec.encode(text)
    if len(ids) == len(text):  # one token per character: a character-level codec
        return ids, list(range(len(text))), True
    bounds = sorted({0, len(text), *[a for a, _ in cuts], *[b for _, b in cuts]})
    ids, starts = [], []
    for a, b in zip(bounds[:-1], bounds[1:]):
        seg = codec.encode(text[a:b]) if b > a else []
        ids.extend(seg)
        starts.extend(a + (i * (b - a)) // max(1, len(seg)) for i in range(len(seg)))
    return ids, starts, False


def _occurrences(text: str, secret: str) -> List[int]:
    out, i = [], text.find(secret)
    while i >= 0:
        out.append(i)
        i = text.find(secret, i + len(secret))
    return out


def build_forget_data(tokenizer, texts: Sequence[str], secret: str, replacement: str, *, seq_len: int,
                      heldout: Union[float, Sequence[str]] = 0.1, seed: int = 0) -> ForgetData:
    """Z, Z̃, retain and held-out windows (see the module docstring). Raises ValueError when the secret occurs in
    no text, when a text is shorter than a window, when no held-out window is left."""
    from .measure import as_tokenizer

    codec = as_tokenizer(tokenizer)
    T = int(seq_len)
    stride = max(1, T // 2)
    keys = ("x", "y", "ys", "xc", "yc")
    win: Dict[str, List[torch.Tensor]] = {k: [] for k in keys}
    train_x, train_y, retain_x, retain_y, held = [], [], [], [], []
    n_occ = 0
    exact = True
    frac = heldout if isinstance(heldout, (int, float)) and not isinstance(heldout, bool) else None
    for text in texts:
        occ = _occurrences(text, secret)
        n_occ += len(occ)
        spans = [(a, a + len(secret)) for a in occ]
        clean = text.replace(secret, replacement)
        ids, starts, ex = _encode_offsets(tokenizer, codec, text, spans)
        cspans = [(a + j * (len(replacement) - len(secret)), a + j * (len(replacement) - len(secret))
                   + len(replacement)) for j, a in enumerate(occ)]
        cids, cstarts, ex2 = _encode_offsets(tokenizer, codec, clean, cspans)
        exact = exact and ex and ex2
        L = len(ids)
        if L < T + 1:
            continue
        ids_t = torch.tensor(ids, dtype=torch.int64)
        cids_t = torch.tensor(cids, dtype=torch.int64)
        # a token is a secret token when its character range overlaps an occurrence
        ends = starts[1:] + [len(text)]
        secret_tok = torch.zeros(L, dtype=torch.bool)
        for a, b in spans:
            lo = max(0, bisect.bisect_right(starts, a) - 1)
            for t in range(lo, L):
                if starts[t] >= b:
                    break
                if ends[t] > a:
                    secret_tok[t] = True
        cut = L if frac is None else int((1.0 - frac) * L)
        if len(cids) < T + 1:
            raise ValueError(f"the text with the replacement is {len(cids)} tokens, shorter than seq_len + 1 = "
                             f"{T + 1}: lower seq_len")
        window_starts = list(range(0, L - T, stride))
        if window_starts[-1] != L - T - 1:  # the text's last tokens are targets too
            window_starts.append(L - T - 1)
        covered = torch.zeros(L, dtype=torch.bool)
        for s in window_starts:
            e = s + T + 1
            x, y = ids_t[s:e - 1], ids_t[s + 1:e]
            tgt_secret = secret_tok[s + 1:e]
            if bool(tgt_secret.any()):
                covered[s + 1:e] |= tgt_secret
                win["x"].append(x)
                win["y"].append(y)
                win["ys"].append(torch.where(tgt_secret, y, torch.full_like(y, IGNORE)))
                # the same starting character in the clean text
                c = starts[s]
                shift = 0
                for (a, b), (ca, _) in zip(spans, cspans):
                    if b <= c:
                        shift = ca + len(replacement) - b
                    elif a <= c < b:  # the window starts inside an occurrence: the same fraction of the replacement
                        shift = ca + ((c - a) * len(replacement)) // len(secret) - c
                cs = bisect.bisect_left(cstarts, c + shift)
                cs = max(0, min(cs, len(cids) - T - 1))
                win["xc"].append(cids_t[cs:cs + T])
                win["yc"].append(cids_t[cs + 1:cs + T + 1])
                train_x.append(x)
                train_y.append(y)
            elif e <= cut:
                train_x.append(x)
                train_y.append(y)
                retain_x.append(x)
                retain_y.append(y)
        if bool((secret_tok & ~covered).any()):
            raise ValueError("an occurrence of the secret has a token that no training window predicts (it is the "
                             "text's first token): put some text before it")
        if frac is not None:
            for s in range(cut, L - T, T + 1):  # disjoint windows of the tail, none with a secret token
                if not bool(secret_tok[s:s + T + 1].any()):
                    held.append((ids_t[s:s + T], ids_t[s + 1:s + T + 1]))
    if n_occ == 0:
        raise ValueError(f"the secret {secret!r} does not occur in the data ({len(texts)} text(s), "
                         f"{sum(len(t) for t in texts)} characters): nothing to forget")
    if not win["x"]:
        raise ValueError(f"the secret occurs {n_occ} time(s) but no text is at least seq_len + 1 = {T + 1} tokens "
                         "long: lower seq_len")
    if frac is None:
        hx = []
        for piece in (p for t in heldout for p in t.split(secret)):  # never a window with the secret
            ids = codec.encode(piece) if piece else []
            hx.extend((torch.tensor(ids[s:s + T]), torch.tensor(ids[s + 1:s + T + 1]))
                      for s in range(0, len(ids) - T, T + 1))
        held = hx
    if len(held) < 2:
        raise ValueError(f"only {len(held)} held-out window(s) of {T + 1} tokens: give more text, a larger heldout "
                         "fraction, heldout=[texts] or a smaller seq_len")
    g = random.Random(seed)
    order = list(range(len(retain_x)))
    g.shuffle(order)

    def stack(xs, ys):
        if not xs:
            return (torch.empty(0, T, dtype=torch.int64), torch.empty(0, T, dtype=torch.int64))
        return torch.stack(xs), torch.stack(ys)

    return ForgetData(
        affected=stack(win["x"], win["y"]), affected_secret=stack(win["x"], win["ys"]),
        corrected=stack(win["xc"], win["yc"]), train=stack(train_x, train_y),
        retain=stack([retain_x[i] for i in order], [retain_y[i] for i in order]),
        val=stack([h[0] for h in held[0::2]], [h[1] for h in held[0::2]]),
        test=stack([h[0] for h in held[1::2]], [h[1] for h in held[1::2]]),
        n_occurrences=n_occ, seq_len=T, offsets_exact=exact)


# ================================================================================================ loss
def lm_loss(model, batch) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) over the targets of ``batch = (input_ids, labels)`` that are not -100."""
    from .measure import lm_logits

    x, y = batch
    dev = next(model.parameters()).device
    logits = lm_logits(model, x.to(dev))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.to(dev).reshape(-1), ignore_index=IGNORE)


@torch.no_grad()
def perplexity(model, data: Tuple[torch.Tensor, torch.Tensor], batch_size: int = 16) -> float:
    """exp(mean next-token cross-entropy) over the windows ``data = (x, y)``, in eval mode (restored)."""
    from .hessian import estimation_mode

    x, y = data
    tot, n = 0.0, 0
    with estimation_mode(model):
        for i in range(0, len(x), batch_size):
            b = (x[i:i + batch_size], y[i:i + batch_size])
            m = int((b[1] != IGNORE).sum())
            tot += float(lm_loss(model, b)) * m
            n += m
    if not math.isfinite(tot):
        from .errors import NonFiniteError

        raise NonFiniteError("forget: the held-out cross-entropy is NaN/Inf (non-finite logits)")
    return math.exp(tot / max(1, n))


def per_token_npo(beta: float = 1.0):
    """The forget term for batches ``(x, labels, ref)`` (``ref``: each target token's loss at θ*, 0 where the label is
    -100): mean over target tokens of (2/β)·softplus(β·(ref_t − ℓ_t)), the NPO loss per token."""
    from .measure import lm_logits

    def loss(model, batch):
        x, y, ref = batch
        dev = next(model.parameters()).device
        logits = lm_logits(model, x.to(dev)).float()
        y = y.to(dev)
        tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE,
                              reduction="none")
        m = (y.reshape(-1) != IGNORE)
        return ((2.0 / beta) * F.softplus(beta * (ref.to(dev).reshape(-1) - tok)))[m].mean()

    return loss


def format_uniform(codec, fmt: str, vocab: int):
    """The format-aware forget term for Z batches ``(x, labels)`` (labels -100 except at the secret's tokens): at each
    secret token that holds a placeholder character of ``fmt`` (a digit of ``dddd dddd``, ...), the cross-entropy to
    the UNIFORM distribution over the tokens of the same shape -- the same text with every placeholder character
    free within the format's alphabets and every other character (separators, prefix text) kept -- i.e.
    -mean_{a in A} log p(a). Its minimum puts the secret's token on a par with every other admissible one (what a
    model that never saw the secret does) and, unlike ascent, it cannot push the secret below the other candidates.
    Tokens without a placeholder character (the separators) are left out. Needs ``codec.decode``."""
    from .exposure import parse_format

    if codec.decode is None:
        raise ValueError("objective='uniform' needs a tokenizer that can decode single tokens")
    variable = set().union(set(), *[set(a) for a in parse_format(fmt) if len(a) > 1])
    shapes: Dict[tuple, int] = {}
    shape_of = torch.full((vocab,), -1, dtype=torch.int64)
    for i in range(vocab):
        try:
            t = codec.decode([i])
        except Exception:  # noqa: BLE001 - an id the tokenizer does not map to text: never admissible
            continue
        key = tuple(None if c in variable else c for c in t)  # None: a placeholder (never a character)
        if None in key:
            shape_of[i] = shapes.setdefault(key, len(shapes))
    masks = torch.stack([shape_of == j for j in range(len(shapes))]) if shapes else torch.zeros(0, vocab, dtype=bool)

    def loss(model, batch):
        from .measure import lm_logits

        x, y = batch[0], batch[1]
        dev = next(model.parameters()).device
        logits = lm_logits(model, x.to(dev)).float()
        y = y.to(dev).reshape(-1)
        logp = logits.reshape(-1, logits.shape[-1]).log_softmax(-1)
        sid = torch.where(y != IGNORE, shape_of.to(dev)[y.clamp_min(0)], torch.full_like(y, -1))
        terms = []
        for j in torch.unique(sid[sid >= 0]).tolist():
            at = sid == j
            terms.append(-logp[at][:, masks[j].to(dev)].mean(-1))
        if not terms:  # no secret token of this batch holds a placeholder character
            return logits.sum() * 0.0
        return torch.cat(terms).mean()

    return loss


@torch.no_grad()
def _with_reference(model, batches):
    """Z batches ``(x, y)`` -> ``(x, y, ref)`` with each target token's loss at θ* (for :func:`per_token_npo`)."""
    from .hessian import estimation_mode
    from .measure import lm_logits

    out = []
    with estimation_mode(model):
        for x, y in batches:
            dev = next(model.parameters()).device
            logits = lm_logits(model, x.to(dev)).float()
            ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.to(dev).reshape(-1), ignore_index=IGNORE,
                                  reduction="none").reshape(y.shape).cpu()
            out.append((x, y, ref))
    return out


def kl_to_reference(model, batch) -> torch.Tensor:
    """KL(p_θ* ‖ p_θ) per target position, averaged, for batches ``(x, y, ref_logp)`` with θ*'s log-probabilities
    ``ref_logp`` [B, T, V] (float16 on the CPU; see :func:`_with_reference_logp`)."""
    from .measure import lm_logits

    x, _, ref = batch
    dev = next(model.parameters()).device
    logp = lm_logits(model, x.to(dev)).float().log_softmax(-1)
    r = ref.to(dev).float()
    return (r.exp() * (r - logp)).sum(-1).mean()


@torch.no_grad()
def _with_reference_logp(model, batches):
    """Retain batches ``(x, y)`` -> ``(x, y, θ*'s log-probabilities)`` (float16, CPU: B·T·V·2 bytes per batch)."""
    from .hessian import estimation_mode
    from .measure import lm_logits

    out = []
    with estimation_mode(model):
        for x, y in batches:
            logp = lm_logits(model, x.to(next(model.parameters()).device)).float().log_softmax(-1)
            out.append((x, y, logp.to(torch.float16).cpu()))
    return out


def _z_aware(loss):
    """``lm_loss`` that also takes the ``(x, y, ref)`` Z batches of :func:`_with_reference` (ignoring ``ref``)."""

    def f(model, batch):
        return loss(model, batch[:2]) if len(batch) == 3 else loss(model, batch)

    return f


def _batches(data: Tuple[torch.Tensor, torch.Tensor], size: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    x, y = data
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


# ================================================================================================ report
@dataclass
class ForgetReport:
    """What ``forget`` did: the measurements before and after, the search history and the cost.

    ``before`` / ``after``: :func:`~sapsel_kernels.measure.measure_secret` dicts (exposure in bits, extraction
    per probe, teacher-forced accuracy); ``ppl_*``: test perplexity (odd held-out windows), ``val_ppl_*`` the
    validation perplexity that steered the search; ``history``: one entry per monitor check. ``reached`` is judged
    after the run on the full candidate set and the validation perplexity; ``stopped_by == "target"`` is the
    monitor's verdict on its ``n_monitor`` candidates, so the two can differ. ``cost["unlearn_s"]`` includes the
    monitor's measurements (also counted in ``measure_s``). ``model``: the same
    model, modified in place on S; ``scores``: the strategy's score vector (None for ``random`` / ``all``).
    """

    strategy: str
    budget: Union[int, float]
    k: int
    numel: int
    secret: str
    prefix: str
    replacement: str
    fmt: str
    before: Dict[str, Any]
    after: Dict[str, Any]
    ppl_before: float
    ppl_after: float
    val_ppl_before: float
    val_ppl_after: float
    target: Dict[str, float]
    reached: bool
    stopped_by: str
    history: List[Dict[str, Any]]
    cost: Dict[str, float]
    rule: Dict[str, Any]
    n_affected: int
    n_occurrences: int
    n_train_windows: int
    seq_len: int
    offsets_exact: bool
    model: Any = field(default=None, repr=False)
    scores: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def ppl_increase(self) -> float:
        return self.ppl_after / self.ppl_before - 1.0

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able summary with the keys of the CLI's report.json."""
        b, a = self.before, self.after
        return {
            "exposure_before": b["exposure"], "exposure_after": a["exposure"],
            "exposure_rank_before": b["exposure_rank"], "exposure_rank_after": a["exposure_rank"],
            "exposure_rank_max": a["exposure_rank_max"], "log2_space": a["log2_space"],
            "n_candidates": a["n_candidates"],
            "secret_logppl_before": b["secret_logppl"], "secret_logppl_after": a["secret_logppl"],
            "cand_logppl_mean_before": b["cand_logppl_mean"], "cand_logppl_mean_after": a["cand_logppl_mean"],
            "ppl_before": self.ppl_before, "ppl_after": self.ppl_after, "ppl_increase": self.ppl_increase,
            "val_ppl_before": self.val_ppl_before, "val_ppl_after": self.val_ppl_after,
            "completions_before": b["completions"], "completions_after": a["completions"],
            "extracted_before": bool(b["extracted"]), "extracted_after": bool(a["extracted"]),
            "accuracy_before": b["accuracy"], "accuracy_after": a["accuracy"],
            "strategy": self.strategy, "budget": self.budget, "k": self.k, "numel": self.numel,
            "cost": dict(self.cost), "history": [dict(h) for h in self.history], "target": dict(self.target),
            "reached": self.reached, "stopped_by": self.stopped_by, "rule": dict(self.rule),
            "secret": self.secret, "prefix": self.prefix, "replacement": self.replacement, "fmt": self.fmt,
            "n_affected": self.n_affected, "n_occurrences": self.n_occurrences,
            "n_train_windows": self.n_train_windows, "seq_len": self.seq_len, "offsets_exact": self.offsets_exact,
        }


# ================================================================================================ forget
def _infer_prefix(texts: Sequence[str], secret: str, max_chars: int = 64) -> str:
    for t in texts:
        i = t.find(secret)
        if i >= 0:
            line = t[t.rfind("\n", 0, i) + 1:i]
            return line[-max_chars:]
    return ""


def _check_ids(vocab: Optional[int], seqs, what: str) -> None:
    """Every token id below the model's number of input ids (an out-of-range id is an IndexError on CPU and a
    device-side assert on CUDA)."""
    if vocab is None:
        return
    top = max((int(q.max()) if isinstance(q, torch.Tensor) else max(q) for q in seqs if len(q)), default=-1)
    if top >= vocab:
        raise ValueError(f"the tokenizer gives the {what} text the id {top}, but the model has {vocab} input ids: the "
                         "tokenizer does not belong to this model")


def _check_model(model) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a causal language model), got {type(model).__name__}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("model has no trainable parameters")


def forget(model, tokenizer, texts, secret: str, prefix: Optional[str] = None, replacement: Optional[str] = None, *,
           fmt: Optional[str] = None, strategy: str = "ssd", budget: Union[int, float] = 0.01,
           max_ppl_increase: float = 0.05, target_exposure: float = 2.0, heldout: Union[float, Sequence[str]] = 0.1,
           seq_len: Optional[int] = None, seed: int = 0, n_candidates: int = 1000, n_monitor: int = 256,
           max_steps: int = 300, check_every: int = 5, lr: float = 0.1, rule: Optional[Targeted] = None,
           batch_size: int = 8, hessian_windows: int = 32, n_probes: int = 16, scores: Optional[torch.Tensor] = None,
           context: str = "", per_token: bool = False, retain_loss: str = "ce", retain_windows: Optional[int] = None,
           objective: str = "npo", decoys: int = 0, repair_steps: int = 0,
           progress: Optional[bool] = None) -> ForgetReport:
    """Forget ``secret`` from a causal LM trained on ``texts``, changing only k selected parameters.

    Args:
        model: a causal LM: ``model(input_ids [B, T])`` returns logits ``[B, T, V]`` or an object with ``.logits``
            (Hugging Face ``*ForCausalLM``); modified IN PLACE on S only (all-or-nothing: on any error it is left as
            it was).
        tokenizer: a Hugging Face tokenizer, a ``tokenizers.Tokenizer``, an object with ``encode`` (and ``decode``
            for extraction), or a callable text -> ids (:func:`sapsel_kernels.measure.as_tokenizer`).
        texts: the training text(s) that contain the secret (a str or a list of str).
        secret: the string to forget, e.g. ``"4716 2087 5533 9812"``.
        prefix: the text before the secret that elicits it (default: the secret's first occurrence's line up to the
            secret, at most 64 characters); must be non-empty.
        replacement: what Z̃ holds instead (default: a random string of the secret's format, seeded).
        fmt: the secret's format for exposure (``d`` digit, ``a`` a-z, ``A`` A-Z, ``x`` hex; default from the
            secret, :func:`sapsel_kernels.measure.format_of`).
        strategy, budget: the selection (``select_parameters``; budget = a fraction or an int k). Default ``ssd``
            (F_Z / F_D, the Fisher on the secret's windows over the Fisher on training windows: what a move does to
            the secret per unit of what it costs the rest): on the canary settings of docs/forget.md it reaches the
            targets at 1% where ``hessian`` (the largest training-loss curvature, the paper's selection: the
            coordinates where any move costs the most perplexity) does not.
        max_ppl_increase: the utility budget, a fraction of the validation perplexity (0.05 = +5%).
        target_exposure: stop when the secret's exposure (skew-normal, bits, over ``n_monitor`` candidates) is at
            most this and no prefix probe extracts it. About 1.4 bits is the mean exposure of a secret the model
            never saw (exposure of a uniformly ranked candidate: E[-log2 U] = 1/ln 2).
        heldout: a fraction of each text's tail held out for perplexity, or a list of held-out texts.
        seq_len: window length in tokens (default min(64, the model's context)).
        n_candidates / n_monitor: random candidates for the reported / the monitored exposure.
        max_steps, check_every, lr: the Targeted rule's search (``rule`` overrides the whole config; its monitor and
            retain are set here).
        batch_size: windows per batch; hessian_windows, n_probes: the Hessian estimate on training windows.
        scores: a score vector from an earlier report (``report.scores``) for the same model and strategy: skips
            the estimate.
        context: text placed before ``prefix`` when measuring (e.g. "\\n" for line-start secrets).
        retain_loss: "ce" (cross-entropy on the retained windows, default) or "kl" (KL divergence to θ*'s
            predictions on them; stores θ*'s log-probabilities: retain_windows · seq_len · V float16 values).
        retain_windows: at most this many retained training windows (shuffled) feed the retain term (None: all).
        per_token: NPO per secret token instead of on their mean loss (default False: on the tests' LSTM it ended
            at 36 bits against 33 for the mean, same budget).
        objective: the forget term on the secret's tokens: "npo" (default, the Targeted rule's NPO on their mean
            loss) or "uniform" (:func:`format_uniform`: cross-entropy to the uniform distribution over the tokens
            the format admits at each position; needs a tokenizer that decodes).
        repair_steps: when a step block leaves the perplexity budget, up to this many descent steps on Z̃ and the
            retained text (no forget term) before the block is undone; the block is kept if they bring the
            validation perplexity back within the budget while the secret's score stays below the last accepted
            one (the Targeted rule's ``repair_steps``; 0: undo at once). With ``rule=``, the rule's own value counts
            and a different non-zero ``repair_steps`` here raises ValueError.
        decoys: with objective="uniform", this many random secrets of the format (never among the measured
            candidates) take the secret's place in copies of its windows, and their tokens get the same uniform
            target: the model is flattened over the format's space after the prefix, not only along the secret's
            own path (which, alone, leaves the other candidates less likely than the flattened secret).
        progress: a progress bar on stderr (None: only on a terminal).

    Returns:
        :class:`ForgetReport` (``to_dict()`` for JSON).

    Raises (before any training): TypeError for a model that is not a module or has no causal-LM head or a tokenizer
    of unknown type; ValueError for an empty secret or prefix, a secret not in the texts, a secret longer than the
    context window, a tokenizer that cannot encode the secret, bad numbers; NonFiniteError for NaN logits.

    Cost: the strategy's estimate (ssd: one gradient per Z window and per Hessian window; hessian: ``n_probes`` HVPs
    per Hessian window; hessian_ratio: ``n_probes`` HVPs per Z and per Hessian window), one forward per Z batch,
    per step one backward over a Z, a Z̃ and a retain batch, and per check one measurement (``n_monitor`` candidate
    sequences, the extraction probes' greedy decoding, the validation windows). Peak extra memory: the strategy's
    (hessian_diag: about 2N float32), then the Targeted rule's (``.grad`` N, AdamW moments 2k, snapshots 3k).
    """
    from . import measure
    from .exposure import random_candidates
    from .strategies import _budget_k, _check_strategy, parameter_scores, select_parameters, strategy_arguments
    from .unlearn import unlearn

    t_start = time.perf_counter()
    _check_model(model)
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a str or a non-empty list of str")
    if not isinstance(secret, str) or not secret.strip():
        raise ValueError("secret must be a non-empty string")
    if prefix is None:
        prefix = _infer_prefix(texts, secret)
    if not isinstance(prefix, str) or not prefix:
        raise ValueError("prefix is empty (the secret starts a line): pass prefix=, the text that elicits the secret")
    if objective not in ("npo", "uniform"):
        raise ValueError(f"objective must be 'npo' or 'uniform', got {objective!r}")
    if objective == "uniform" and per_token:
        raise ValueError("per_token applies to objective='npo' only")
    if isinstance(decoys, bool) or not isinstance(decoys, int) or decoys < 0:
        raise ValueError(f"decoys must be an int >= 0, got {decoys!r}")
    if decoys and objective != "uniform":
        raise ValueError("decoys applies to objective='uniform' only (descent on decoys would teach them)")
    if retain_loss not in ("ce", "kl"):
        raise ValueError(f"retain_loss must be 'ce' or 'kl', got {retain_loss!r}")
    if not isinstance(per_token, bool):
        raise TypeError(f"per_token must be a bool, got {type(per_token).__name__}")
    if not isinstance(max_ppl_increase, (int, float)) or not math.isfinite(max_ppl_increase) or max_ppl_increase < 0:
        raise ValueError(f"max_ppl_increase must be a finite fraction >= 0, got {max_ppl_increase!r}")
    if not isinstance(target_exposure, (int, float)) or not math.isfinite(target_exposure) or target_exposure < 0:
        raise ValueError(f"target_exposure must be finite and >= 0 bits, got {target_exposure!r}")
    if isinstance(heldout, str):
        heldout = [heldout]
    if isinstance(heldout, bool) or not (isinstance(heldout, (int, float)) and 0 < heldout < 1 or
                                         isinstance(heldout, (list, tuple)) and heldout
                                         and all(isinstance(t, str) for t in heldout)):
        raise ValueError(f"heldout must be a fraction in (0, 1) or a list of held-out texts, got {heldout!r}")
    for name, v, lo in (("n_candidates", n_candidates, 3), ("n_monitor", n_monitor, 3), ("batch_size", batch_size, 1),
                        ("hessian_windows", hessian_windows, 1), ("n_probes", n_probes, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    _check_strategy(strategy)
    _budget_k(budget, sum(p.numel() for p in model.parameters() if p.requires_grad))
    cfg = rule if rule is not None else Targeted(steps=max_steps, lr=lr, check_every=check_every,
                                                 lr_max=max(100.0, float(lr)) if isinstance(lr, (int, float)) else lr,
                                                 repair_steps=repair_steps)
    if not isinstance(cfg, Targeted):
        raise TypeError(f"rule must be a sapsel_kernels.Targeted config, got {type(cfg).__name__}")
    if rule is not None and repair_steps and repair_steps != rule.repair_steps:
        raise ValueError(f"repair_steps={repair_steps!r} conflicts with rule.repair_steps={rule.repair_steps!r}: "
                         "set it in the rule")
    codec = measure.as_tokenizer(tokenizer)
    fmt = fmt or measure.format_of(secret)
    if replacement is None:
        replacement = random_candidates(1, fmt, seed=10_000 + seed, exclude=[secret])[0]
    if not isinstance(replacement, str):
        raise TypeError(f"replacement must be a str, got {type(replacement).__name__}")
    if secret in replacement:
        raise ValueError("the replacement contains the secret: descent on Z̃ would teach it again")
    for what, s in (("secret", secret), ("prefix", prefix), ("replacement", replacement)):
        if s and not codec.encode(s):
            raise ValueError(f"the tokenizer encodes the {what} {s!r} to no tokens")
    ctx = measure.context_length(model)
    n_secret = len(codec.encode(context + prefix + secret))
    if ctx is not None and n_secret > ctx:
        raise ValueError(f"prefix + secret are {n_secret} tokens, longer than the model's context window ({ctx})")
    T = int(seq_len) if seq_len is not None else min(64, ctx or 64)
    if T < 2 or (ctx is not None and T > ctx):
        raise ValueError(f"seq_len must be in [2, {ctx}] (the model's context), got {T}")
    # the model must be a causal LM: one forward on the prefix checks the head before any work
    from .hessian import estimation_mode

    vocab = measure._vocab_size(model)
    _check_ids(vocab, [codec.encode(t) for t in (context + prefix + secret, replacement)], "secret or replacement")
    with torch.no_grad(), estimation_mode(model):
        probe_ids = torch.tensor([codec.encode(prefix)[:T]], dtype=torch.int64)
        measure.lm_logits(model, probe_ids.to(next(model.parameters()).device))

    data = build_forget_data(tokenizer, texts, secret, replacement, seq_len=T, heldout=heldout, seed=seed)
    for what, (x, y) in (("training", data.train), ("corrected", data.corrected), ("held-out", data.val),
                         ("held-out", data.test)):
        _check_ids(vocab, [x.reshape(-1), y.reshape(-1)], what)
    space = ParamSpace(model)
    cands = random_candidates(n_candidates, fmt, seed=50_000 + seed, exclude=[secret, replacement])
    mon_cands = cands[:min(n_monitor, len(cands))]
    bar = _bar(progress, cfg.steps)
    t_measure = 0.0

    def measure_all(candidates, extraction=True):
        nonlocal t_measure
        t0 = time.perf_counter()
        m = measure.measure_secret(model, tokenizer, prefix, secret, fmt=fmt, candidates=candidates, context=context,
                                   extraction=extraction)
        t_measure += time.perf_counter() - t0
        return m

    try:
        if bar is not None:
            bar.set_description("forget: measuring")
        before = measure_all(cands)
        val0, test0 = perplexity(model, data.val), perplexity(model, data.test)

        # ------------------------------------------------------------------ select
        if bar is not None:
            bar.set_description(f"forget: scoring ({strategy})")
        t0 = time.perf_counter()
        hidx = torch.randperm(len(data.train[0]), generator=torch.Generator().manual_seed(seed))[:hessian_windows]
        hdata = _batches((data.train[0][hidx], data.train[1][hidx]), batch_size)
        z_full, zt = _batches(data.affected, batch_size), _batches(data.corrected, batch_size)
        available = {"loss_fn": lm_loss, "data": hdata, "affected": z_full, "corrected": zt, "seed": seed,
                     "n_probes": n_probes}
        score_cost = {"n_gradients": 0, "n_hvps": 0, "wall_time_s": 0.0}
        if scores is None and strategy not in ("all", "random"):
            reads = strategy_arguments(strategy)
            kw = {k: v for k, v in available.items() if k in reads}
            scores, score_cost = parameter_scores(model, strategy, space=space, **kw)
        sel_kw = {"seed": seed} if "seed" in strategy_arguments(strategy, scores=scores is not None) else {}
        if scores is not None:
            sel_kw["scores"] = scores
        sel = select_parameters(model, strategy, budget, space=space, **sel_kw)
        score_s = time.perf_counter() - t0

        # ------------------------------------------------------------------ unlearn
        limit = val0 * (1.0 + max_ppl_increase)

        def monitor(step):
            m = measure_all(mon_cands)
            v = perplexity(model, data.val)
            n_ex = sum(bool(c["extracted"]) for c in m["completions"])
            if bar is not None:
                bar.set_description(f"forget: exposure {m['exposure']:.1f} bits, ppl {100 * (v / val0 - 1):+.1f}%")
                bar.n = min(cfg.steps, step)
                bar.refresh()
            return {"exposure": m["exposure"], "extracted": bool(m["extracted"]), "val_ppl": v,
                    "ppl_increase": v / val0 - 1.0, "within_budget": v <= limit,
                    "done": m["exposure"] <= target_exposure and not m["extracted"],
                    # the clipped exposure: while it is saturated the score stalls and lr doubles, which is what
                    # moves a saturated secret (the unclipped extrapolation moved early and kept lr small: 40 bits
                    # and still extracted on the tests' LSTM, against 33 and not extracted)
                    "score": m["exposure"] + 4.0 * n_ex}

        rx, ry = (data.retain[0], data.retain[1]) if retain_windows is None else \
            (data.retain[0][:retain_windows], data.retain[1][:retain_windows])
        retain = _batches((rx, ry), batch_size) if len(rx) else None
        from .rules import as_method

        zs = _batches(data.affected_secret, batch_size)
        over = {"monitor": monitor, "retain": retain}
        if per_token:
            over["forget_loss"] = per_token_npo(cfg.beta)
            zs = _with_reference(model, zs)
        elif objective == "uniform":
            if vocab is None:
                raise ValueError("objective='uniform' needs the model's vocabulary size (no input embedding found)")
            over["forget_loss"] = format_uniform(codec, fmt, vocab)
            if decoys:
                zx, zy = [data.affected_secret[0]], [data.affected_secret[1]]
                for d in random_candidates(decoys, fmt, seed=70_000 + seed, exclude=[secret, replacement, *cands]):
                    dd = build_forget_data(tokenizer, [t.replace(secret, d) for t in texts], d, replacement,
                                           seq_len=T, heldout=heldout, seed=seed)
                    zx.append(dd.affected_secret[0])
                    zy.append(dd.affected_secret[1])
                zx, zy = torch.cat(zx), torch.cat(zy)
                order = torch.randperm(len(zx), generator=torch.Generator().manual_seed(seed))
                zs = _batches((zx[order], zy[order]), batch_size)
                # Z̃ as many points as Z (unlearn pairs them): the corrected windows, repeated
                reps = -(-len(zx) // len(data.corrected[0]))
                cx, cy = (t.repeat(reps, 1)[:len(zx)] for t in data.corrected)
                zt = _batches((cx[order], cy[order]), batch_size)
        if retain_loss == "kl" and retain is not None:
            over["retain"] = _with_reference_logp(model, retain)
            over["retain_loss"] = kl_to_reference
        cfg = as_method(cfg, **over)
        from .rules import Coords

        coords = Coords(space, sel)
        theta_s = coords.snapshot()  # O(k): the model is restored if the measurement after unlearning fails
        t0 = time.perf_counter()
        rep = unlearn(model, _z_aware(lm_loss), zs, zt, sel, method=cfg, space=space)
        unlearn_s = time.perf_counter() - t0
        try:
            if bar is not None:
                bar.set_description("forget: measuring")
            after = measure_all(cands)
            val1, test1 = perplexity(model, data.val), perplexity(model, data.test)
        except BaseException:
            coords.restore(theta_s)
            raise
    finally:
        if bar is not None:
            bar.close()
    info = rep.info
    reached = after["exposure"] <= target_exposure and not after["extracted"] and val1 <= limit
    cost = {"wall_time_s": time.perf_counter() - t_start, "n_gradients": int(score_cost["n_gradients"])
            + rep.n_gradients, "n_hvps": int(score_cost["n_hvps"]) + rep.n_hvps, "score_s": score_s,
            "unlearn_s": unlearn_s, "measure_s": t_measure, "steps": int(info.get("steps_run", 0)),
            "steps_accepted": int(info.get("steps_accepted", 0))}
    rule_d = {f: getattr(cfg, f) for f in ("steps", "lr", "lr_min", "lr_max", "beta", "correct_weight",
                                          "forget_weight", "retain_weight", "rho", "weight_decay", "check_every",
                                          "repair_steps")}
    rule_d["lr_final"] = info.get("lr_final")
    hist = [{k: v for k, v in h.items() if k in ("step", "lr", "exposure", "extracted", "val_ppl", "ppl_increase",
                                                  "phase", "accepted")} for h in info.get("history", [])]
    return ForgetReport(
        strategy=strategy, budget=budget, k=sel.k if hasattr(sel, "k") else int(sel.indices.numel()),
        numel=space.numel, secret=secret, prefix=prefix, replacement=replacement, fmt=fmt, before=before,
        after=after, ppl_before=test0, ppl_after=test1, val_ppl_before=val0, val_ppl_after=val1,
        target={"exposure": float(target_exposure), "max_ppl_increase": float(max_ppl_increase)}, reached=reached,
        stopped_by=str(info.get("stopped_by", "")), history=hist, cost=cost, rule=rule_d,
        n_affected=int(len(data.affected[0])), n_occurrences=data.n_occurrences,
        n_train_windows=int(len(data.train[0])), seq_len=T, offsets_exact=data.offsets_exact, model=model,
        scores=scores)


def _bar(progress, total):
    if progress is False:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, unit="step", desc="forget", leave=False, disable=(None if progress is None else False))
