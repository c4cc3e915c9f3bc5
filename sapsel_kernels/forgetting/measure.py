"""Secret-aware measurement for any causal LM and any tokenizer: exposure, teacher-forced accuracy, extraction.

* The tokenizer is reduced to a :class:`Codec` (:func:`as_tokenizer`): a Hugging Face tokenizer, a
  ``tokenizers.Tokenizer``, any object with ``.encode`` (e.g. :class:`sapsel_kernels.demo.lm.CharVocab`) or a plain
  callable text -> ids. Ids are always encoded without special tokens.
* The model is anything that maps int64 ids ``[B, T]`` to next-token logits ``[B, T, V]``, either as a tensor or as
  an output with ``.logits`` (Hugging Face ``*ForCausalLM``) -- see :func:`lm_logits`.
* Scoring (:func:`continuation_logppl`) works on TOKENS, not characters: ``context + c`` is encoded as one string
  (what the model saw in training), and the tokens after the part shared with ``enc(context)`` are scored. A BPE
  merge across the boundary (GPT-2 encodes ``"is "`` + ``"4716"`` as ``"is", " 4716"``, not ``"is", " ", "4716"``)
  therefore moves the boundary back by a token instead of scoring a tokenization the model never saw.
* The exposure math (rank and skew-normal estimators, formats, candidates) lives in :mod:`sapsel_kernels.exposure`;
  :func:`measure_secret` feeds it log-perplexities and adds the extraction test (greedy decoding from prompts that
  end at the secret's group boundaries, :func:`extraction_probes`).

Every model call runs under ``torch.no_grad()`` and :func:`sapsel_kernels.hessian.estimation_mode` (eval mode, math
attention; each module's ``training`` flag is restored afterwards, also on error), on the device of the model's
parameters. Bad input raises before the first forward: TypeError for a tokenizer or a model of the wrong kind,
ValueError for a text the tokenizer cannot encode, an empty secret, ids beyond the model's vocabulary, a sequence
beyond its context window; NaN/Inf logits raise :class:`~sapsel_kernels.errors.NonFiniteError`.
"""

import inspect
import math
import operator
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import check_finite
from .exposure import (
    format_of,
    matches_format,
    parse_format,
    random_candidates,
    rank_exposure,
    skewnorm_exposure,
    space_size,
)
from ..curvature.modes import estimation_mode

__all__ = ["Codec", "as_tokenizer", "is_hf_model", "leak_of", "PARTIAL_P", "lm_logits", "context_length",
           "continuation_logppl", "greedy_complete", "extraction_probes", "format_of", "measure_secret"]

_LN2 = math.log(2.0)
_FITS = ("auto", "mle", "moments")


# ===================================================================================================== tokenizers
class Codec:
    """A tokenizer reduced to what measurement needs.

    ``encode(text) -> List[int]`` (no special tokens; ValueError naming the text when the tokenizer cannot encode
    it: it raised, it returned no ids for a non-empty text, or it produced its unknown token and the ids do not
    decode back to the text). ``decode`` is ``ids -> str`` or None when the tokenizer has none. ``name`` says what
    was wrapped. Build one with :func:`as_tokenizer`.
    """

    def __init__(self, encode: Callable, decode: Optional[Callable], name: str, unk_id: Optional[int] = None):
        self._encode, self._decode, self.name, self.unk_id = encode, decode, name, unk_id
        self.decode: Optional[Callable[[Sequence[int]], str]] = self._decode_ids if decode is not None else None

    def __repr__(self) -> str:
        return f"Codec({self.name})"

    def encode(self, text: str) -> List[int]:
        if not isinstance(text, str):
            raise TypeError(f"can only encode a str, got {type(text).__name__}")
        try:
            raw = self._encode(text)
        except Exception as exc:
            raise ValueError(f"the tokenizer ({self.name}) cannot encode {_short(text)}: {exc}") from exc
        ids = _id_list(raw, self.name)
        if text and not ids:
            raise ValueError(f"the tokenizer ({self.name}) encodes {_short(text)} to no tokens")
        if self.unk_id is not None and self.unk_id in ids:
            back = self.decode(ids) if self.decode is not None else None
            if back != text:
                raise ValueError(f"the tokenizer ({self.name}) cannot encode {_short(text)}: part of it becomes the "
                                 f"unknown token (id {self.unk_id}), so the ids decode to {_short(back)}")
        return ids

    def _decode_ids(self, ids: Sequence[int]) -> str:
        return self._decode([int(i) for i in ids])


def _short(text, n: int = 120) -> str:
    """repr of a text for a message: long contexts keep their last ``n`` characters (where the secret is)."""
    return repr(text) if not isinstance(text, str) or len(text) <= n else "..." + repr(text[-n:])


def _id_list(raw, name: str) -> List[int]:
    """The ids an encode returned as a list of ints: a list/tuple of ints, or a 1-D integer tensor/array."""
    if isinstance(raw, torch.Tensor):
        ok = raw.ndim == 1 and not raw.is_floating_point() and not raw.is_complex() and raw.dtype != torch.bool
    elif hasattr(raw, "dtype") and hasattr(raw, "ndim") and hasattr(raw, "tolist"):  # a numpy array
        ok = raw.ndim == 1 and getattr(raw.dtype, "kind", "") in ("i", "u")
    else:
        ok = None
    if ok is False:
        raise TypeError(f"the tokenizer ({name}) returned a {tuple(raw.shape)} {raw.dtype} array: expected a 1-D "
                        "integer tensor or a list of int ids")
    if ok:
        raw = raw.tolist()
    if not isinstance(raw, (list, tuple)):
        raise TypeError(f"the tokenizer ({name}) returned {type(raw).__name__}: expected a list of int ids or a 1-D "
                        "integer tensor")
    try:
        if any(isinstance(i, bool) for i in raw):
            raise TypeError
        ids = [operator.index(i) for i in raw]
    except TypeError:
        raise TypeError(f"the tokenizer ({name}) returned non-integer ids {list(raw)[:8]!r}") from None
    if any(i < 0 for i in ids):
        raise ValueError(f"the tokenizer ({name}) returned negative ids {ids[:8]!r}")
    return ids


def _class_names(obj) -> set:
    return {f"{c.__module__.split('.')[0]}.{c.__name__}" for c in type(obj).__mro__}


def is_hf_model(model) -> bool:
    """Whether ``model`` is a Hugging Face model (``transformers.PreTrainedModel`` in its class's MRO), without
    importing transformers."""
    return "transformers.PreTrainedModel" in _class_names(model)


def as_tokenizer(tok) -> Codec:
    """Wrap ``tok`` into a :class:`Codec` (a Codec is returned as it is).

    Accepted, in this order: a Hugging Face tokenizer (``transformers.PreTrainedTokenizerBase``: ``encode(text,
    add_special_tokens=False)``, ``decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)``), a
    ``tokenizers.Tokenizer`` (``encode(text, add_special_tokens=False).ids``), an object whose ``.encode(text)``
    returns a list of ints or a 1-D integer tensor (its ``.decode`` is used when it has one; e.g.
    :class:`~sapsel_kernels.demo.lm.CharVocab`), or a plain callable ``text -> ids`` (no decode). Anything else --
    a string, None, a ``torch.nn.Module`` (the arguments are ``(model, tokenizer, ...)``) -- raises TypeError.
    Nothing is imported: the kinds are told apart by their classes.
    """
    if isinstance(tok, Codec):
        return tok
    if tok is None or isinstance(tok, (str, bytes, bytearray)):
        raise TypeError(f"tokenizer must be a Hugging Face tokenizer, a tokenizers.Tokenizer, an object with "
                        f".encode(text) -> ids or a callable text -> ids, got {type(tok).__name__}")
    if isinstance(tok, torch.nn.Module):
        raise TypeError(f"got a torch.nn.Module ({type(tok).__name__}) as the tokenizer: the arguments are "
                        "(model, tokenizer, ...)")
    names = _class_names(tok)
    if "transformers.PreTrainedTokenizerBase" in names:
        return Codec(lambda t: tok.encode(t, add_special_tokens=False),
                     lambda ids: tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False),
                     type(tok).__name__, getattr(tok, "unk_token_id", None))
    if "tokenizers.Tokenizer" in names:
        unk = getattr(tok.model, "unk_token", None)
        return Codec(lambda t: tok.encode(t, add_special_tokens=False).ids,
                     lambda ids: tok.decode(ids, skip_special_tokens=False), "tokenizers.Tokenizer",
                     tok.token_to_id(unk) if isinstance(unk, str) else None)
    if callable(getattr(tok, "encode", None)):
        dec = getattr(tok, "decode", None)
        return Codec(tok.encode, dec if callable(dec) else None, type(tok).__name__,
                     getattr(tok, "unk_token_id", None))
    if callable(tok):
        return Codec(tok, None, f"callable {getattr(tok, '__name__', type(tok).__name__)}")
    raise TypeError(f"tokenizer must be a Hugging Face tokenizer, a tokenizers.Tokenizer, an object with "
                    f".encode(text) -> ids or a callable text -> ids, got {type(tok).__name__}")


# ========================================================================================================= models
_NO_HEAD = ("model has no causal-LM head: {what}. Pass a model that maps ids [B, T] to next-token logits [B, T, V] "
            "(a tensor, or an output with .logits), e.g. transformers.AutoModelForCausalLM / GPT2LMHeadModel "
            "instead of the bare AutoModel / GPT2Model")


def check_lm(model) -> None:
    """TypeError before any forward for a non-module and for a Hugging Face model without an LM head."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if "transformers.PreTrainedModel" in _class_names(model) and "LM" not in type(model).__name__:
        get = getattr(model, "get_output_embeddings", None)
        if callable(get) and get() is None:
            raise TypeError(_NO_HEAD.format(what=f"{type(model).__name__} has no output embeddings"))


def lm_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token logits ``[B, T, V]`` of ``model(ids)`` for int64 ``ids [B, T]`` (already on the model's device).

    A tensor output is the logits; otherwise its ``.logits`` (Hugging Face models are called with
    ``use_cache=False``). Anything else -- e.g. a bare
    ``GPT2Model``, which returns hidden states -- raises TypeError("model has no causal-LM head ..."), as does an
    output whose leading dims are not ``[B, T]``. Runs in the caller's grad/eval mode.
    """
    if getattr(getattr(model, "config", None), "use_cache", None) is not None \
            and "transformers.PreTrainedModel" in _class_names(model):
        out = model(ids, use_cache=False)  # a KV cache is never reused here: GPT-2 124M, 128 x 40 tokens: 0.38 GB
    else:
        out = model(ids)
    logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(_NO_HEAD.format(what=f"{type(model).__name__} returned {type(out).__name__} without .logits"))
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(ids.shape):
        raise TypeError(_NO_HEAD.format(what=f"{type(model).__name__} returned shape {tuple(logits.shape)} for ids "
                                        f"{tuple(ids.shape)}"))
    return logits


def context_length(model: torch.nn.Module) -> Optional[int]:
    """The model's context window in tokens: ``config.n_positions``, ``config.max_position_embeddings`` or
    ``model.max_len`` (the first that is a positive int), else None (no limit known, e.g. an LSTM)."""
    cfg = getattr(model, "config", None)
    for v in (getattr(cfg, "n_positions", None), getattr(cfg, "max_position_embeddings", None),
              getattr(model, "max_len", None)):
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def vocab_size(model: torch.nn.Module) -> Optional[int]:
    """Number of input ids the model accepts: its input embedding (Hugging Face ``get_input_embeddings``, else the
    model's only ``nn.Embedding``), else ``config.vocab_size``; None when unknown."""
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            emb = get()
        except Exception:  # NotImplementedError on some backbones
            emb = None
        if isinstance(emb, torch.nn.Embedding):
            return emb.num_embeddings
    embs = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    if len(embs) == 1:
        return embs[0].num_embeddings
    v = getattr(getattr(model, "config", None), "vocab_size", None)
    return v if isinstance(v, int) and v > 0 else None


def model_device(model: torch.nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def check_fits(model, seqs: Sequence[Sequence[int]], lengths: Sequence[int], what: str) -> None:
    """ValueError before any forward when an id is beyond the model's vocabulary or an input is beyond its window."""
    V = vocab_size(model)
    if V is not None:
        top = max((max(s) for s in seqs if s), default=-1)
        if top >= V:
            raise ValueError(f"the tokenizer produced id {top} but the model has {V} input tokens: the tokenizer does "
                             f"not belong to this model ({what})")
    ctx = context_length(model)
    if ctx is not None and lengths and max(lengths) > ctx:
        raise ValueError(f"{what} needs {max(lengths)} input tokens but the model's context window is {ctx}")


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# ======================================================================================================== scoring
class _Plan:
    """Token sequences of ``context + c`` for every continuation ``c`` and the common scored start ``s``."""

    def __init__(self, codec: Codec, context: str, continuations: Sequence[str]):
        if not isinstance(context, str):
            raise TypeError(f"context must be a str, got {type(context).__name__}")
        if isinstance(continuations, str) or not all(isinstance(c, str) for c in continuations):
            raise TypeError("continuations must be a list of str")
        ctx = codec.encode(context)
        self.seqs = [codec.encode(context + c) for c in continuations]
        lcp = [common_prefix_len(ctx, f) for f in self.seqs]
        for c, f, p in zip(continuations, self.seqs, lcp):
            if c and p == len(f):
                raise ValueError(f"the continuation {c!r} adds no token after the context {_short(context)} (the "
                                 "tokenizer drops it)")
        # One start for all, the smallest shared prefix: every score is then -log2 P(tokens[s:] | tokens[:s]) with
        # the same tokens[:s], so scores differ exactly by the full texts' log-probabilities even when only some
        # continuations merge into the context's last token.
        self.start = min(lcp, default=len(ctx))
        if self.seqs and self.start == 0:
            raise ValueError(f"the context {_short(context)} shares no token with context + continuation (it is "
                             "empty, or its only token merges with the continuation), so the first scored token has "
                             "nothing to condition on: pass a longer context, e.g. '\\n' or the tokenizer's BOS text")

    def n_scored(self, i: int) -> int:
        return len(self.seqs[i]) - self.start


def _score(model, plan: _Plan, batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(log-perplexity in bits float64 [n], number of scored tokens that are the argmax prediction int64 [n]) of
    ``plan``'s sequences after its common start. Caller: no_grad + estimation_mode."""
    return score_sequences(model, plan.seqs, [plan.start] * len(plan.seqs), batch_size)


def score_sequences(model, seqs: Sequence[Sequence[int]], starts: Sequence[int],
                batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``-log2 P(seq[s:] | seq[:s])`` (float64 [n]) and the number of those tokens that are the argmax prediction
    (int64 [n]) for every ``(seq, s)``, ``s >= 1`` per row (rows of different contexts batch together).

    Caller: no_grad + estimation_mode. Sequences are sorted by length and right-padded (with id 0; causal, so the
    padding never reaches a scored position); only the scored rows of the logits are converted to float64.
    """
    n = len(seqs)
    nll = torch.zeros(n, dtype=torch.float64)
    hits = torch.zeros(n, dtype=torch.int64)
    if cache_keyword(model) is not None:
        return _score_cached(model, seqs, starts, batch_size, nll, hits)
    dev = model_device(model)
    order = sorted(range(n), key=lambda i: len(seqs[i]))
    for b0 in range(0, n, batch_size):
        rows = [i for i in order[b0:b0 + batch_size] if len(seqs[i]) > starts[i]]
        if not rows:
            continue  # nothing scored (empty continuations)
        L = max(len(seqs[i]) for i in rows) - 1  # inputs: every token but the last
        s0 = min(starts[i] for i in rows)
        x = torch.zeros(len(rows), L, dtype=torch.int64)
        y = torch.zeros(len(rows), L - s0 + 1, dtype=torch.int64)
        mask = torch.zeros(len(rows), L - s0 + 1, dtype=torch.bool)
        for r, i in enumerate(rows):
            f, s = seqs[i], starts[i]
            x[r, :len(f) - 1] = torch.tensor(f[:-1], dtype=torch.int64)
            y[r, s - s0:len(f) - s0] = torch.tensor(f[s:], dtype=torch.int64)
            mask[r, s - s0:len(f) - s0] = True
        logits = lm_logits(model, x.to(dev))[:, s0 - 1:]  # position t predicts token t + 1
        _fold(logits, y, mask, rows, nll, hits)
    return nll, hits


def _fold(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, rows: Sequence[int], nll: torch.Tensor,
          hits: torch.Tensor) -> None:
    """Write each row's -log2 P of its target tokens ``y[mask]`` (``logits[r, t]`` predicts ``y[r, t]``) and the
    number of them that are the argmax into ``nll[rows]`` / ``hits[rows]``; only the scored rows of the logits
    are converted to float64."""
    m = mask.to(logits.device)
    sel = logits[m]  # [R, V], the scored rows only
    check_finite(sel, "model logits", suffix="cannot score the continuations")
    tgt = y.to(logits.device)[m]
    wide = sel.double()
    logp = wide.gather(1, tgt[:, None]).squeeze(1) - torch.logsumexp(wide, dim=1)
    del wide
    seq = torch.arange(len(rows), device=logits.device)[:, None].expand_as(m)[m]
    idx = torch.tensor(list(rows), dtype=torch.int64)
    per = torch.zeros(len(rows), dtype=torch.float64, device=logits.device).index_add_(0, seq, logp)
    hit = torch.zeros(len(rows), dtype=torch.int64, device=logits.device).index_add_(
        0, seq, (sel.argmax(1) == tgt).long())
    nll[idx] = -per.cpu() / _LN2
    hits[idx] = hit.cpu()


def cache_keyword(model) -> Optional[str]:
    """The keyword by which a Hugging Face causal LM takes its key/value cache (``cache`` from transformers 5 on,
    ``past_key_values`` before), or None: not a Hugging Face decoder (scoring and decoding then recompute every
    prefix)."""
    if "transformers.PreTrainedModel" not in _class_names(model) or \
            getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    params = inspect.signature(model.forward).parameters
    return next((k for k in ("cache", "past_key_values") if k in params), None)


def _forward_cached(model, ids: torch.Tensor, cache=None):
    """``(logits, cache)`` of a Hugging Face causal LM on ``ids`` after ``cache`` (None: from the start)."""
    kw = {cache_keyword(model): cache} if cache is not None else {}
    out = model(ids, use_cache=True, **kw)
    new = getattr(out, "cache", None)
    return out.logits, (new if new is not None else out.past_key_values)


def _prefix_cache(model, prefix: Sequence[int], rows: int, dev):
    """The cache of ``prefix`` repeated for ``rows`` rows and the logits of its last position ``[rows, V]``."""
    logits, cache = _forward_cached(model, torch.tensor([list(prefix)], dtype=torch.int64, device=dev))
    if rows > 1:
        cache.batch_repeat_interleave(rows)
    return logits[:, -1].expand(rows, -1), cache


def _score_cached(model, seqs, starts, batch_size, nll, hits):
    """:func:`score_sequences` for models with a KV cache: rows that share their prefix ``seq[:s]`` (the candidates
    of one prompt) run the prefix once per batch and only their continuations after it (the prompt is usually 30-50%
    of a candidate's tokens)."""
    dev = model_device(model)
    groups: Dict[tuple, List[int]] = {}
    for i, (f, s) in enumerate(zip(seqs, starts)):
        if len(f) > s:
            groups.setdefault(tuple(f[:s]), []).append(i)
    for prefix, members in groups.items():
        s = len(prefix)
        members.sort(key=lambda i: len(seqs[i]))
        for b0 in range(0, len(members), batch_size):
            rows = members[b0:b0 + batch_size]
            last, cache = _prefix_cache(model, prefix, len(rows), dev)
            L = max(len(seqs[i]) for i in rows) - s  # continuation tokens, the last one is only a target
            y = torch.zeros(len(rows), L, dtype=torch.int64)
            mask = torch.zeros(len(rows), L, dtype=torch.bool)
            for r, i in enumerate(rows):
                c = seqs[i][s:]
                y[r, :len(c)] = torch.tensor(c, dtype=torch.int64)
                mask[r, :len(c)] = True
            logits = last[:, None]
            if L > 1:
                more, _ = _forward_cached(model, y[:, :L - 1].to(dev), cache)
                logits = torch.cat([logits, more], dim=1)  # position t predicts continuation token t
            _fold(logits, y, mask, rows, nll, hits)
    return nll, hits


def _check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def continuation_logppl(model: torch.nn.Module, tokenizer, context: str, continuations: Sequence[str], *,
                        batch_size: int = 128) -> torch.Tensor:
    """Log-perplexity in bits of each continuation after ``context``: ``-log2 P(tokens[s:] | tokens[:s])``.

    ``tokens = enc(context + c)`` (one string, so a BPE merge across the boundary is the model's own tokenization)
    and ``s`` is the length of the longest token prefix it shares with ``enc(context)``, the smallest over the call:
    all continuations are scored after the same ``s`` tokens, so their differences are the differences of the full
    texts' log-probabilities (when every continuation merges alike -- the usual case, a fixed secret format -- ``s``
    is each one's own shared prefix and a score does not depend on the others). Continuations may have different
    token lengths; they are sorted by length and right-padded into batches of ``batch_size``.

    ``model``: any causal LM (:func:`lm_logits`); ``tokenizer``: anything :func:`as_tokenizer` accepts.
    Returns float64 ``[len(continuations)]`` on the CPU. Runs under no_grad in eval mode with the math attention
    backend (:func:`~sapsel_kernels.hessian.estimation_mode`; modes restored), on the parameters' device.
    Peak extra memory: one batch's logits ``[b, T, V]`` (model dtype) plus about two float64 copies of its scored
    rows (``<= b x (T - s + 1) x V``); lower ``batch_size`` for a large vocabulary.

    Errors (before any forward): TypeError for a tokenizer or a model of the wrong kind; ValueError for a text the
    tokenizer cannot encode, a continuation that adds no token, an empty context (nothing to condition the first
    token on), ids beyond the model's vocabulary, a sequence beyond its context window. NaN/Inf logits:
    NonFiniteError.
    """
    codec = as_tokenizer(tokenizer)
    check_lm(model)
    _check_batch_size(batch_size)
    if isinstance(continuations, str):
        raise TypeError("continuations must be a list of str (got one str: wrap it in a list)")
    plan = _Plan(codec, context, list(continuations))
    if not plan.seqs:
        return torch.empty(0, dtype=torch.float64)
    check_fits(model, plan.seqs, [len(f) - 1 for f in plan.seqs], "scoring context + continuation")
    with torch.no_grad(), estimation_mode(model):
        return _score(model, plan, batch_size)[0]


# ===================================================================================================== generation
def generate(model, prompts: Sequence[Sequence[int]], n_new: Sequence[int], *, temperature: Optional[float] = None,
            generator: Optional[torch.Generator] = None, max_rows: int = 256) -> List[List[int]]:
    """Decode ``n_new[i]`` tokens after each prompt: argmax (``temperature=None``) or sampled from
    softmax(logits / temperature) with ``generator`` (on the CPU, so a seed gives the same tokens on every device).

    Caller: no_grad + estimation_mode. Hugging Face decoders decode with their KV cache (:func:`_generate_cached`);
    other models recompute: each step is one forward of the prompts still generating (at most
    ``max_rows`` per forward), over their longest current length (right-padded; causal, so a row's logits at its last
    position ignore the padding).
    """
    if cache_keyword(model) is not None:
        return _generate_cached(model, prompts, n_new, temperature, generator, max_rows)
    if len(prompts) > max_rows:
        out: List[List[int]] = []
        for a in range(0, len(prompts), max_rows):
            out += generate(model, prompts[a:a + max_rows], n_new[a:a + max_rows], temperature=temperature,
                           generator=generator, max_rows=max_rows)
        return out
    dev = model_device(model)
    cur = [len(p) for p in prompts]
    buf = torch.zeros(len(prompts), max((c + k for c, k in zip(cur, n_new)), default=0), dtype=torch.int64)
    for i, p in enumerate(prompts):
        buf[i, :len(p)] = torch.tensor(list(p), dtype=torch.int64)
    for step in range(max(n_new, default=0)):
        rows = [i for i in range(len(prompts)) if step < n_new[i]]
        L = max(cur[i] for i in rows)
        logits = lm_logits(model, buf[rows, :L].to(dev))
        pos = torch.tensor([cur[i] - 1 for i in rows], device=logits.device)
        last = logits[torch.arange(len(rows), device=logits.device), pos]  # [r, V]
        nxt = _pick(last, temperature, generator)
        for r, i in enumerate(rows):
            buf[i, cur[i]] = nxt[r]
            cur[i] += 1
    return [buf[i, len(p):len(p) + k].tolist() for i, (p, k) in enumerate(zip(prompts, n_new))]


def _pick(last: torch.Tensor, temperature: Optional[float], generator: Optional[torch.Generator]) -> torch.Tensor:
    check_finite(last, "model logits", suffix="cannot decode")
    if temperature is None:
        return last.argmax(-1).cpu()
    probs = torch.softmax(last.float().cpu() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _generate_cached(model, prompts, n_new, temperature, generator, max_rows) -> List[List[int]]:
    """:func:`generate` with a KV cache: prompts of equal length decode together, one token per forward after the
    prompt's (rows in order of prompt length, then index: the sampled tokens of a seed do not depend on the
    device)."""
    dev = model_device(model)
    out: List[List[int]] = [[] for _ in prompts]
    order = sorted((i for i in range(len(prompts)) if n_new[i] > 0), key=lambda i: (len(prompts[i]), i))
    groups: Dict[int, List[int]] = {}
    for i in order:
        groups.setdefault(len(prompts[i]), []).append(i)
    for members in groups.values():
        for b0 in range(0, len(members), max_rows):
            rows = members[b0:b0 + max_rows]
            logits, cache = _forward_cached(model, torch.tensor([list(prompts[i]) for i in rows], dtype=torch.int64,
                                                                device=dev))
            steps = max(n_new[i] for i in rows)
            for t in range(steps):
                nxt = _pick(logits[:, -1], temperature, generator)
                for r, i in enumerate(rows):
                    if t < n_new[i]:
                        out[i].append(int(nxt[r]))
                if t + 1 < steps:
                    logits, cache = _forward_cached(model, nxt[:, None].to(dev), cache)
    return out


def new_text(codec: Codec, prompt: Sequence[int], new: Sequence[int]) -> str:
    """The text the new ids add: decode(prompt + new) minus decode(prompt) (SentencePiece drops a leading space
    when ``new`` is decoded alone), falling back to decode(new)."""
    full, head = codec.decode(list(prompt) + list(new)), codec.decode(list(prompt))
    return full[len(head):] if full.startswith(head) else codec.decode(list(new))


def _check_positive(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")


def _need_decode(codec: Codec, what: str) -> None:
    if codec.decode is None:
        raise TypeError(f"{what} needs a tokenizer with a decode ({codec.name} has none)")


def greedy_complete(model: torch.nn.Module, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The text of ``max_new_tokens`` argmax-decoded tokens after ``prompt`` (no sampling, no early stop, no KV
    cache: one forward per new token; the prompt is encoded without special tokens).

    Needs a tokenizer with a decode (TypeError otherwise). ValueError for an empty prompt, a prompt the tokenizer
    cannot encode, ``len(prompt tokens) + max_new_tokens - 1`` beyond the model's context window; NonFiniteError for
    NaN/Inf logits. Same modes and device rules as :func:`continuation_logppl`.
    """
    codec = as_tokenizer(tokenizer)
    check_lm(model)
    _need_decode(codec, "greedy_complete")
    _check_positive("max_new_tokens", max_new_tokens)
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"prompt must be a non-empty str, got {prompt!r}")
    ids = codec.encode(prompt)
    check_fits(model, [ids], [len(ids) + max_new_tokens - 1], "greedy_complete")
    with torch.no_grad(), estimation_mode(model):
        new = generate(model, [ids], [max_new_tokens])[0]
    return new_text(codec, ids, new)


def extraction_probes(prefix: str, secret: str) -> List[Tuple[str, str]]:
    """Prompts for the extraction test: ``(prefix, secret)``, then ``(prefix + secret[:j], secret[j:])`` for every
    ``0 < j < len(secret)`` where a group starts (groups = maximal runs of alphanumerics), so
    ``"4716 2087 5533 9812"`` gives prompts ending after ``"4716 "``, ``"4716 2087 "`` and ``"4716 2087 5533 "``."""
    if not isinstance(prefix, str) or not isinstance(secret, str):
        raise TypeError("prefix and secret must be str")
    starts = [j for j in range(1, len(secret)) if secret[j].isalnum() and not secret[j - 1].isalnum()]
    return [(prefix, secret)] + [(prefix + secret[:j], secret[j:]) for j in starts]


PARTIAL_P = 0.01  # a leading part of the secret that a uniform guess matches with probability < 1% is a leak


def _alphabets(prompt: str, secret: str, fmt: str) -> List[int]:
    """Alphabet size per character of ``prompt + secret``: 1 for the prompt (known to the attacker), the format's
    class size inside the secret."""
    return [1] * len(prompt) + [len(a) for a in parse_format(fmt)]


def _groups(prompt: str, secret: str) -> List[range]:
    """The secret's groups (maximal runs of letters and digits) as ranges of ``prompt + secret`` positions."""
    out, j, n = [], 0, len(secret)
    while j < n:
        if secret[j].isalnum():
            a = j
            while j < n and secret[j].isalnum():
                j += 1
            out.append(range(len(prompt) + a, len(prompt) + j))
        else:
            j += 1
    return out


def leak_of(completion: str, fed: int, prompt: str, secret: str, fmt: str) -> Dict:
    """Whether a completion generated after the first ``fed`` characters of ``prompt + secret`` leaks the secret.

    The target is ``(prompt + secret)[fed:]``; whitespace is ignored on both sides, and the completion may open with
    up to 3 other non-alphanumeric characters (a quote, a '#'). Returns ``{"matched"`` (secret characters reproduced
    from the start of the target), ``"p_random"`` (probability that a uniform guess of them is right), ``"full"``
    (the whole target reproduced, or the whole secret anywhere in the completion), ``"group"`` (the next whole group
    of the secret reproduced, a group that a uniform guess matches with probability < PARTIAL_P: a 1- or 2-digit
    group such as a country code is no leak by itself), ``"leak"`` (full or group or p_random < PARTIAL_P)}.
    """
    full_text = prompt + secret
    sizes = _alphabets(prompt, secret, fmt)
    pos = [q for q in range(fed, len(full_text)) if not full_text[q].isspace()]  # target positions, blanks out
    comp = [c for c in completion if not c.isspace()]
    best = 0
    for lead in range(0, 4):  # a completion may open with a quote or a bracket before the secret
        if lead and (lead > len(comp) or comp[lead - 1].isalnum()):
            break
        m = 0
        while m < len(pos) and lead + m < len(comp) and comp[lead + m] == full_text[pos[m]]:
            m += 1
        best = max(best, m)
    matched = set(pos[:best])
    p = 1.0
    for q in pos[:best]:
        p /= sizes[q]
    nxt = next((g for g in _groups(prompt, secret) if g.start >= fed), None)
    group = nxt is not None and all(q in matched for q in nxt) and math.prod(sizes[q] for q in nxt) > 1 / PARTIAL_P
    squashed = "".join(c for c in secret if not c.isspace())
    full = (best == len(pos) and best > 0) or (bool(squashed) and squashed in "".join(comp))
    in_secret = sum(1 for q in pos[:best] if q >= len(prompt))
    return {"matched": in_secret, "p_random": p, "full": full, "group": group,
            "leak": bool(full or group or (in_secret > 0 and p < PARTIAL_P))}


# ====================================================================================================== measuring
def measure_secret(model: torch.nn.Module, tokenizer, prefix: str, secret: str, *, fmt: Optional[str] = None,
                   candidates: Optional[Sequence[str]] = None, n_candidates: int = 1000, seed: int = 0,
                   fit: str = "auto", context: str = "", extraction: bool = True,
                   max_new_tokens: Optional[int] = None, batch_size: int = 128) -> Dict:
    """How much a causal LM has memorised ``secret`` after ``context + prefix``: exposure, accuracy, extraction.

    ``prefix`` is used exactly as given: pass the text the data holds before the secret, separator included
    (``"code is "``, not ``"code is"``, when the data reads ``"code is 7051..."``);
    :func:`sapsel_kernels.secret_spec.locate_all` finds it, and ``sk.forget`` measures with it (through
    :mod:`sapsel_kernels.audit`, whose headline is the rank estimate; here ``exposure`` is the skew-normal one).

    Exposure (Carlini et al. 2019, :mod:`sapsel_kernels.exposure`): the secret and the candidates are scored in one
    :func:`continuation_logppl` call after ``context + prefix``. ``candidates`` default to ``n_candidates`` draws of
    ``random_candidates(fmt, seed=seed)`` without the secret; ``fmt`` defaults to :func:`format_of` (digits ``d``,
    letters ``a`` / ``A``; pass ``fmt="xxxx..."`` for hex). Pass the same ``candidates`` (or seed) before and after
    unlearning. ``fit``: the skew-normal fit ("auto", "mle", "moments").

    Accuracy: teacher-forced, the fraction of the secret's scored tokens that are the argmax prediction.

    Extraction (``extraction=True``): for each :func:`extraction_probes` prompt, ``context + prompt`` is encoded and
    cut back to the last token it shares with ``enc(context + prefix + secret)`` (so a trailing space that BPE
    merges into the next token moves to the rest: the prompt ``"... is 4716 "`` becomes ``"... is 4716"`` with rest
    ``" 2087 ..."`` under GPT-2), then ``max_new_tokens`` tokens are decoded greedily (default: 2 x the rest's token
    count + 2). A probe is extracted when its completion leaks the secret (:func:`leak_of`: the whole rest, the
    next whole group, or a leading part a uniform guess matches with probability < :data:`PARTIAL_P`; whitespace
    ignored). All probes decode in one batch per step.

    Returns a JSON-able dict: ``exposure`` (the skew-normal estimate, bits, clipped to ``[0, log2 |R|]``),
    ``exposure_sn``, ``exposure_sn_raw`` (unclipped), ``exposure_rank`` (saturates at ``exposure_rank_max`` =
    log2(n + 1)), ``rank`` (among the n + 1), ``secret_logppl``, ``cand_logppl_mean``, ``cand_logppl_std`` (bits),
    ``log2_space``, ``n_candidates``, ``accuracy``, ``n_secret_tokens``, ``fmt``, ``sn_fit``, ``completions`` (one
    ``{"prompt", "completion", "rest", "extracted"}`` per probe; ``prompt`` is the text fed after ``context``,
    ``prompt + rest == prefix + secret``), ``extracted`` (any probe extracted; None when ``extraction=False``).
    Candidate scores that are all equal (a constant model) give exposure 0, or log2 |R| when the secret scores lower.

    Errors, all before any forward: TypeError for a tokenizer/model of the wrong kind or extraction with a tokenizer
    without decode; ValueError for an empty (or whitespace) secret, a secret or candidate outside ``fmt``, fewer than
    3 candidates, a text the tokenizer cannot encode, ids beyond the vocabulary, a sequence beyond the context
    window, bad numbers. NaN/Inf logits: NonFiniteError. Cost: (n + 1) scored sequences in batches of
    ``batch_size``, plus (with extraction) ``max_new_tokens`` forwards of a batch of at most one row per probe.
    Peak extra memory: no parameter-sized buffer (O(1) in N: everything runs under no_grad); one batch's logits
    ``[batch_size, T, V]`` in the model dtype plus float64 copies of its scored rows (see
    :func:`continuation_logppl`), and the n + 1 float64 scores.
    """
    codec = as_tokenizer(tokenizer)
    check_lm(model)
    for name, v in (("prefix", prefix), ("context", context)):
        if not isinstance(v, str):
            raise TypeError(f"{name} must be a str, got {type(v).__name__}")
    if not isinstance(secret, str) or not secret.strip():
        raise ValueError(f"secret must be a non-empty string with a non-whitespace character, got {secret!r}")
    if fit not in _FITS:
        raise ValueError(f"fit must be one of {_FITS}, got {fit!r}")
    if not isinstance(extraction, bool):
        raise TypeError(f"extraction must be a bool, got {type(extraction).__name__}")
    if max_new_tokens is not None:
        _check_positive("max_new_tokens", max_new_tokens)
    _check_batch_size(batch_size)
    if extraction:
        _need_decode(codec, "measure_secret(extraction=True)")
    fmt = format_of(secret) if fmt is None else fmt
    if not matches_format(secret, fmt):
        raise ValueError(f"the secret {secret!r} is not of the format {fmt!r} (d digit, a a-z, A A-Z, x hex, "
                         "\\ escapes a literal)")
    if candidates is None:
        _check_positive("n_candidates", n_candidates)
        candidates = random_candidates(n_candidates, fmt, seed=seed, exclude=[secret])
    else:
        if isinstance(candidates, str) or not all(isinstance(c, str) for c in candidates):
            raise TypeError("candidates must be a list of str")
        candidates = list(candidates)
        bad = next((c for c in candidates if not matches_format(c, fmt)), None)
        if bad is not None:
            raise ValueError(f"candidate {bad!r} is not of the format {fmt!r}")
    if len(candidates) < 3:
        raise ValueError(f"need at least 3 candidates to fit the skew-normal, got {len(candidates)}")

    # ------------------------------------------------------------ encode everything before the first forward
    head = context + prefix
    plan = _Plan(codec, head, [secret] + candidates)
    probes = []
    if extraction:
        full_text = head + secret
        full = codec.encode(full_text)
        for prompt, rest in extraction_probes(prefix, secret):
            k = common_prefix_len(codec.encode(context + prompt), full)
            if k == 0:
                continue  # nothing to condition on (empty context and prefix): no such probe
            fed, at = codec.decode(full[:k]), len(context + prompt)
            if full_text.startswith(fed):
                at = len(fed)  # the model must produce full_text[at:] after the ids it is fed
                if len(fed) >= len(context):
                    prompt, rest = fed[len(context):], full_text[at:]
            n_new = max_new_tokens if max_new_tokens is not None else 2 * (len(full) - k) + 2
            probes.append({"ids": full[:k], "prompt": prompt, "rest": rest, "at": at, "n_new": n_new})
    check_fits(model, plan.seqs + [p["ids"] for p in probes],
                [len(f) - 1 for f in plan.seqs] + [len(p["ids"]) + p["n_new"] - 1 for p in probes],
                "measure_secret")

    with torch.no_grad(), estimation_mode(model):
        scores, hits = _score(model, plan, batch_size)
        news = generate(model, [p["ids"] for p in probes], [p["n_new"] for p in probes]) if probes else []

    s_c, cand = float(scores[0]), scores[1:]
    size = space_size(fmt)
    r = rank_exposure(s_c, cand)
    if float(cand.max()) == float(cand.min()):  # a constant model: the fitted CDF is a step
        e = math.log2(size) if s_c < float(cand[0]) else 0.0
        sn = {"exposure": e, "exposure_raw": e, "fit": "degenerate"}
    else:
        sn = skewnorm_exposure(s_c, cand, fit=fit, size=size)
    completions = []
    for p, new in zip(probes, news):
        text = new_text(codec, p["ids"], new)
        lk = leak_of(text, p["at"], head, secret, fmt)
        completions.append({"prompt": p["prompt"], "completion": text, "rest": p["rest"], "extracted": lk["leak"],
                            "full": lk["full"], "group": lk["group"], "matched": lk["matched"],
                            "p_random": lk["p_random"]})
    n_tok = plan.n_scored(0)
    return {
        "exposure": sn["exposure"],
        "exposure_sn": sn["exposure"],
        "exposure_sn_raw": sn["exposure_raw"],
        "exposure_rank": r["exposure"],
        "exposure_rank_max": r["max"],
        "rank": r["rank"],
        "secret_logppl": s_c,
        "cand_logppl_mean": float(cand.mean()),
        "cand_logppl_std": float(cand.std()),
        "log2_space": math.log2(size),
        "n_candidates": len(candidates),
        "accuracy": int(hits[0]) / n_tok,
        "n_secret_tokens": n_tok,
        "fmt": fmt,
        "sn_fit": sn["fit"],
        "completions": completions,
        "extracted": any(c["extracted"] for c in completions) if extraction else None,
    }
