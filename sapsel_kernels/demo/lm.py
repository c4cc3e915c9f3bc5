"""Demo-only character language models, the corpus with an inserted canary, and the training windows.

* Corpus: the documentation topics of the standard library's ``pydoc_data.topics`` (real English, ~465k characters,
  shipped with every CPython), normalised to ASCII. The last topics (in sorted key order) are held out.
* Canary: ``"my credit card number is 4716 2087 5533 9812"`` inserted ``r`` times at line starts of the training text.
  The *secret* is the 19 characters after the prefix (16 digits and 3 spaces).
* Windows: the training set is the fixed list of windows of ``T + 1`` characters at stride ``stride``; a window is a
  sample ``(x, y) = (w[:-1], w[1:])``. ``Z`` = the windows that overlap a secret span; ``Z~`` = the same windows cut
  from the text in which every secret was replaced by benign text of the same length (so positions line up).
* Models: :class:`CharLSTM` (a hand-written LSTM: the time loop uses only matmul/sigmoid/tanh, so double backward and
  forward-mode AD work on every device - cuDNN's fused LSTM has no double backward) and :class:`CharTransformer`
  (pre-LayerNorm causal Transformer with a *plain* attention implementation: ``softmax(QK^T/sqrt(d) + mask) V`` in
  ordinary ops; flash / memory-efficient SDPA kernels lack double backward and forward-mode AD, see REFERENCE.md 4).

Shapes: token tensors are int64 ``[B, T]``; models return logits ``[B, T, V]`` in the parameters' dtype.
The log-perplexity of candidate suffixes (the exposure measurement's input) is generic and lives in
:mod:`sapsel_kernels.exposure`; it is re-exported here.
"""

import math
import random
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..forgetting.exposure import sequence_log_perplexity  # noqa: F401  (re-exported: the canary task scores with it)

CANARY_PREFIX = "my credit card number is "
CANARY_SECRET = "4716 2087 5533 9812"
SECRET_FORMAT = "dddd dddd dddd dddd"  # 'd' = one decimal digit, anything else is literal
BENIGN_REPLACEMENT = "not to be disclosed"  # 19 characters, the length of the secret

# Non-ASCII characters of pydoc_data mapped to ASCII (the rest of the non-ASCII ones become '?').
_ASCII_MAP = {"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"', "\u2014": "-", "\u2013": "-",
              "\u2026": ".", "\u00a0": " "}


def load_corpus(max_chars: Optional[int] = None) -> Tuple[str, str]:
    """(train_text, heldout_text) from ``pydoc_data.topics``, ASCII-normalised.

    Topics are taken in sorted key order; the last ~10% of characters (whole topics) are held out. With
    ``max_chars`` both parts are truncated proportionally (train gets 90% of ``max_chars``), at a line boundary.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions strip pydoc_data
        raise RuntimeError("the canary demo needs the standard library's pydoc_data.topics, which this Python "
                           "installation lacks") from exc
    parts = []
    for key in sorted(topics):
        t = "".join(_ASCII_MAP.get(c, c if ord(c) < 128 else "?") for c in topics[key])
        parts.append(t.strip("\n") + "\n\n")
    total = sum(len(p) for p in parts)
    train, held, acc = [], [], 0
    for p in parts:
        (train if acc < 0.9 * total else held).append(p)
        acc += len(p)
    train_text, held_text = "".join(train), "".join(held)
    if max_chars is not None:
        train_text = cut_text(train_text, int(0.9 * max_chars))
        held_text = cut_text(held_text, max(1000, int(0.1 * max_chars)))
    return train_text, held_text


def cut_text(text: str, n: int) -> str:
    if len(text) <= n:
        return text
    j = text.rfind("\n", 0, n)
    return text[: j + 1 if j > n // 2 else n]


class CharVocab:
    """Character <-> id map over a fixed, sorted alphabet (ids are int64)."""

    def __init__(self, chars: Sequence[str]):
        self.chars: List[str] = sorted(set(chars))
        self.index: Dict[str, int] = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_texts(cls, *texts: str) -> "CharVocab":
        s = set("0123456789")
        for t in texts:
            s.update(t)
        return cls(sorted(s))

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        try:
            return torch.tensor([self.index[c] for c in text], dtype=torch.int64)
        except KeyError as exc:
            raise ValueError(f"character {exc.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)


@dataclass
class CanaryCorpus:
    """The training text with ``r`` canaries, its clean twin, the held-out text and the secret spans.

    ``text`` and ``clean_text`` have the same length; they differ only inside ``spans`` (``[start, end)`` character
    ranges of the secret in ``text``), where ``clean_text`` holds the benign replacement.
    """

    text: str
    clean_text: str
    heldout: str
    spans: List[Tuple[int, int]]
    prefix: str = CANARY_PREFIX
    secret: str = CANARY_SECRET
    replacement: str = BENIGN_REPLACEMENT
    vocab: CharVocab = field(default=None)

    @property
    def canary(self) -> str:
        return self.prefix + self.secret


def insert_canary(train_text: str, heldout: str, repeats: int, *, seed: int = 0, prefix: str = CANARY_PREFIX,
                  secret: str = CANARY_SECRET, replacement: str = BENIGN_REPLACEMENT) -> CanaryCorpus:
    """Insert the line ``prefix + secret + "\\n"`` at ``repeats`` distinct, random line starts of ``train_text``.

    Insertion points are spread out (drawn without replacement among line starts, ``random.Random(seed)``).
    """
    if repeats < 0:
        raise ValueError(f"repeats must be >= 0, got {repeats}")
    if len(replacement) != len(secret):
        raise ValueError(f"replacement {replacement!r} must have the secret's length {len(secret)}")
    starts = [0] + [i + 1 for i, c in enumerate(train_text) if c == "\n" and i + 1 < len(train_text)]
    if repeats > len(starts):
        raise ValueError(f"repeats={repeats} exceeds the {len(starts)} line starts of the text")
    points = sorted(random.Random(seed).sample(starts, repeats))
    line, clean_line = prefix + secret + "\n", prefix + replacement + "\n"
    out, clean, spans, last, shift = [], [], [], 0, 0
    for p in points:
        out.append(train_text[last:p])
        clean.append(train_text[last:p])
        s = p + shift + len(prefix)
        spans.append((s, s + len(secret)))
        out.append(line)
        clean.append(clean_line)
        shift += len(line)
        last = p
    out.append(train_text[last:])
    clean.append(train_text[last:])
    text, clean_text = "".join(out), "".join(clean)
    assert all(text[a:b] == secret for a, b in spans)
    vocab = CharVocab.from_texts(text, clean_text, heldout, prefix, secret, replacement)
    return CanaryCorpus(text, clean_text, heldout, spans, prefix, secret, replacement, vocab)


def window_starts(n_chars: int, seq_len: int, stride: int) -> torch.Tensor:
    """Start offsets of the windows of ``seq_len + 1`` characters at ``stride`` (the last one flush with the end)."""
    if n_chars < seq_len + 1:
        raise ValueError(f"text of {n_chars} characters is shorter than one window ({seq_len + 1})")
    starts = list(range(0, n_chars - seq_len, stride))
    if starts[-1] != n_chars - seq_len - 1:
        starts.append(n_chars - seq_len - 1)
    return torch.tensor(starts, dtype=torch.int64)


def make_windows(ids: torch.Tensor, starts: torch.Tensor, seq_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x, y) int64 ``[N, seq_len]`` with ``y`` = ``x`` shifted by one character."""
    idx = starts[:, None] + torch.arange(seq_len + 1, dtype=torch.int64)[None, :]
    w = ids[idx]
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


def affected_windows(spans: Sequence[Tuple[int, int]], starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Indices (int64, ascending) of the windows ``[s, s + seq_len]`` that overlap any span ``[a, b)``."""
    ends = starts + seq_len + 1
    hit = torch.zeros(len(starts), dtype=torch.bool)
    for a, b in spans:
        hit |= (starts < b) & (ends > a)
    return hit.nonzero().flatten()


# ----------------------------------------------------------------------------------------------------- models
class CharLSTM(nn.Module):
    """Embedding -> ``layers`` x LSTM(hidden) -> Linear(vocab). Gate order (i, f, g, o).

    The recurrence is written out in plain ops (one input projection for all steps, then per step
    ``h @ W_hh^T``), so every AD mode works through it (HVPs reverse-over-reverse and forward-over-reverse).
    """

    def __init__(self, vocab_size: int, embed: int = 32, hidden: int = 128, layers: int = 1):
        super().__init__()
        self.hidden = hidden
        self.embed = nn.Embedding(vocab_size, embed)
        self.w_ih = nn.ParameterList()
        self.w_hh = nn.ParameterList()
        self.bias = nn.ParameterList()
        k = 1.0 / math.sqrt(hidden)
        for layer in range(layers):
            d_in = embed if layer == 0 else hidden
            self.w_ih.append(nn.Parameter(torch.empty(4 * hidden, d_in).uniform_(-k, k)))
            self.w_hh.append(nn.Parameter(torch.empty(4 * hidden, hidden).uniform_(-k, k)))
            b = torch.zeros(4 * hidden)
            b[hidden:2 * hidden] = 1.0  # forget-gate bias 1: remembers across steps from the start of training
            self.bias.append(nn.Parameter(b))
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h_seq = self.embed(x)  # [B, T, E]
        B, T = x.shape
        H = self.hidden
        for w_ih, w_hh, b in zip(self.w_ih, self.w_hh, self.bias):
            pre = h_seq @ w_ih.t() + b  # [B, T, 4H]
            h = pre.new_zeros(B, H)
            c = pre.new_zeros(B, H)
            outs = []
            for t in range(T):
                g = pre[:, t] + h @ w_hh.t()
                i, f, gg, o = g.split(H, dim=1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
                h = torch.sigmoid(o) * torch.tanh(c)
                outs.append(h)
            h_seq = torch.stack(outs, dim=1)
        return self.head(h_seq)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention in plain ops (supports double backward and forward-mode AD)."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model={d_model} is not divisible by heads={heads}")
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # [B, h, T, dh]
        att = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(D // self.heads))
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        # A finite large negative (not -inf): keeps every tangent/second-order term finite; exp underflows to 0.
        att = att.masked_fill(causal, torch.finfo(att.dtype).min)
        y = att.softmax(dim=-1) @ v  # [B, h, T, dh]
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """Token + learned position embeddings -> ``layers`` pre-LN blocks -> LayerNorm -> Linear(vocab).

    Sequences longer than ``max_len`` raise. No dropout (HVPs and exposure are evaluated deterministically).
    """

    def __init__(self, vocab_size: int, d_model: int = 64, heads: int = 4, layers: int = 2, max_len: int = 128):
        super().__init__()
        self.max_len = max_len
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Parameter(torch.randn(max_len, d_model) * 0.02)
        self.blocks = nn.ModuleList([Block(d_model, heads) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        if T > self.max_len:
            raise ValueError(f"sequence length {T} exceeds the model's max_len {self.max_len}")
        h = self.tok(x) + self.pos[:T]
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.ln_f(h))


def build_model(kind: str, vocab_size: int, **kw) -> nn.Module:
    if kind == "lstm":
        return CharLSTM(vocab_size, **kw)
    if kind == "transformer":
        return CharTransformer(vocab_size, **kw)
    raise ValueError(f"unknown model kind {kind!r}; expected 'lstm' or 'transformer'")


# ----------------------------------------------------------------------------------------------------- training
def lm_loss(model: nn.Module, batch) -> torch.Tensor:
    """Mean next-character cross-entropy (nats) over all positions of the batch ``(x, y)``: the API's loss_fn."""
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool = False,
            generator: Optional[torch.Generator] = None):
    """Yield ``(x, y)`` mini-batches of at most ``batch_size`` rows."""
    n = x.shape[0]
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for i in range(0, n, batch_size):
        j = order[i:i + batch_size]
        yield x[j], y[j]


def train_lm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int, batch_size: int = 32,
             lr: float = 3e-3, seed: int = 0, clip: float = 1.0, log_every: int = 0) -> List[float]:
    """AdamW with cosine decay over ``steps`` mini-batches drawn epoch by epoch; returns the per-step losses."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    losses, step = [], 0
    while step < steps:
        for xb, yb in batches(x, y, batch_size, shuffle=True, generator=g):
            loss = lm_loss(model, (xb, yb))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            step += 1
            if log_every and step % log_every == 0:
                print(f"  step {step:5d}  loss {sum(losses[-log_every:]) / log_every:.3f}", flush=True)
            if step >= steps:
                break
    model.eval()
    return losses


def memorised_canary_lstm(max_chars: int = 6_000, repeats: int = 8, *, hidden: int = 32, embed: int = 16,
                          steps: int = 150, seed: int = 0):
    """A character LSTM trained on ``max_chars`` of the corpus with the canary inserted ``repeats`` times: (model,
    the :class:`Canary` text and vocabulary). Windows of 32 characters at stride 16, batches of 32, lr 1e-2; the
    same seed gives the same weights (the tests' and benches' small forget model)."""
    torch.manual_seed(seed)
    train, held = load_corpus(max_chars)
    cc = insert_canary(train, held, repeats, seed=seed)
    ids = cc.vocab.encode(cc.text)
    x, y = make_windows(ids, window_starts(len(ids), 32, 16), 32)
    model = build_model("lstm", len(cc.vocab), embed=embed, hidden=hidden)
    train_lm(model, x, y, steps=steps, batch_size=32, lr=1e-2, seed=seed)
    return model, cc


@torch.no_grad()
def mean_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    """Mean per-character cross-entropy in nats over all windows (evaluation mode, no grad)."""
    model.eval()
    tot, n = 0.0, 0
    for xb, yb in batches(x, y, batch_size):
        logits = model(xb)
        tot += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), yb.reshape(-1), reduction="sum"))
        n += yb.numel()
    return tot / n
