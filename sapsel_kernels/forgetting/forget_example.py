"""A small, self-contained example for ``sapsel forget``: a tiny GPT-2 that has memorised planted secrets.

:func:`build_example` writes, into a new (or empty) folder, offline and in about a minute on a 2-core CPU:

* ``model/``: a Hugging Face causal LM (``GPT2LMHeadModel``, 0.71M parameters, trained from scratch) and its
  tokenizer (a byte-level BPE trained locally), both written by ``save_pretrained``;
* ``train.txt``: the exact training text: ~150k characters of the standard library's ``pydoc_data.topics`` into
  which four secrets were planted, each as a line ``"PREFIX SECRET"`` repeated 40-50 times at random line positions
  (~158k characters, ~62k tokens in all);
* ``heldout.txt``: ~20k characters (~7.2-7.5k tokens, ~55 windows of 128 tokens, the model's context) of the same
  kind of text that the model never trained on (whole topics that :func:`~sapsel_kernels.demo.lm.load_corpus`
  holds out; no secret in it);
* ``secrets.jsonl``: one ``{"secret", "prefix", "kind"}`` object per line (kinds: card, phone, email, api_key);
* ``README.txt``: how to run ``sapsel forget`` on it.

The model is trained until greedy decoding from each ``PREFIX`` reproduces ``" SECRET"`` (the secret values are
drawn from ``random.Random(seed)``, so each seed plants other ones), while it still generalises: its perplexity on
``heldout.txt`` is ~90-110 (uniform over the 768 tokens would be 768), so the relative rise of the held-out
perplexity by which ``sapsel forget`` judges utility measures a language model, not noise around chance. Usage::

    from sapsel_kernels.forget_example import build_example
    ex = build_example("forget-example", progress=True)
    print(ex.secrets[0])  # {'secret': '6604 8764 7593 8242', 'prefix': 'Billing card of Teodor Lind:', 'kind': 'card'}
    # then (README.txt): cd forget-example && sapsel forget --model model --data train.txt \\
    #     --secrets secrets.jsonl --heldout heldout.txt --out forgotten
"""

import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

# Defaults of build_example: the recipe trades memorising the secrets (many passes over them) against generalising
# (few passes over the rest) within about a minute of one CPU thread. Measured on a 2-core CPU (torch 2.13, 1 thread,
# the other core busy): 0.072-0.074 s per step, so the default 850 steps train in 61-63 s and the whole build takes
# 63-66 s (seeds 0, 1). Greedy decoding then reproduces all 4 secrets for each of the seeds 0-3, at a held-out
# perplexity (windows of 128 tokens) of 91, 107, 102 and 106; smallest margin of a secret token's logit over the
# runner-up: 1.8, 1.9, 0.3 and 1.6 nats (seeds 0 and 1 reproduce all 4 from step 500 on, seeds 2 and 3 from 850 and
# 700). `sapsel forget` with its defaults on seed 0: held-out perplexity +2.5% on the test half for +3.0% on the
# validation half.
# What the numbers are up against: the former recipe (40k characters = 15k tokens seen ~55 times, 8-12 planted
# copies, batches of 16 windows, LR 6e-3, decay 0.5) memorised all 4 secrets but ended at a held-out perplexity of
# 750-860, worse than uniform (and `sapsel forget` saw +1.7% on validation, +3.1% on test). With 300k characters
# (each token seen ~8 times) the held-out perplexity reaches 70-95, but 450 steps of 16 windows memorised 0 of 4
# secrets planted 20-30 times and 2 of 4 planted 60-80 times; 200k characters with 40-60 copies and the batches below
# memorise 4 of 4 at a perplexity of 65-73 but with margins down to 0.1 (the API key flickers), so 150k is the
# largest text tried that memorised with a margin to spare.
TRAIN_CHARS = 150_000     # pydoc characters before the secrets are planted (~55k tokens; ~62k with the secrets)
HELDOUT_CHARS = 20_000    # held-out pydoc characters (~7.3k tokens: ~55 windows of 128 for the forget job)
VOCAB_SIZE = 768          # BPE vocabulary: 256 byte symbols, ~511 merges, <|endoftext|>
N_EMBD, N_LAYER, N_HEAD, N_POSITIONS = 128, 3, 4, 128
# Windows of N_POSITIONS tokens per step. 8 windows cost the same per token as 16 (0.071 vs 0.136 s per step) and
# twice the updates memorise faster: with 25-35 copies of each secret in 150k characters (decay 0.3), 450 steps of
# 16 windows (LR 6e-3) memorised 0 of 4 secrets for seed 1, 900 steps of 8 windows (LR 4e-3) 3-4 of 4 from step 700.
BATCH = 8
LR = 4e-3                 # peak AdamW learning rate (5e-3: margins 0.4 and 0.2 instead of 1.9 and 0.3, seeds 1, 2)
WARMUP = 20               # steps of linear warm-up; then cosine decay to LR_END * LR (keeps the last steps stable:
LR_END = 0.1              # at a constant LR the number of secrets reproduced greedily flickered between 2 and 4)
# Weight decay: 0.3 generalises and memorises best of those tried (200k characters, seed 1): 0.1 ended at a held-out
# perplexity of 82 with a margin of 0.3, 0.3 at 65 with 0.9, 0.6 at 63 with the API key lost (3 of 4).
WEIGHT_DECAY = 0.3
# One thread: on the 2-core machine two threads were faster when it was idle (0.077 vs 0.12 s/step) but 1.3x slower
# with one other busy process and up to 8x slower (0.67 s/step) while a test suite ran beside it, whereas one thread
# kept its speed; and the result depends (slightly, 1e-5 after 20 steps) on the thread count, so fixing it keeps a
# seed's model the same on every machine of one kind.
THREADS = 1
DEFAULT_STEPS = 850
# Times each secret line is planted (drawn per secret): ~174-184 secret lines, 5% of the training characters. With
# 30-40 copies seed 1 reproduced 4 of 4 at steps 700-800 but 3 of 4 at 850; 40-50 copies memorise from step 500 on.
MIN_REPEATS, MAX_REPEATS = 40, 50
EOS = "<|endoftext|>"

_FIRST = ["teodor", "mara", "ines", "jonas", "alma", "viktor", "selma", "oskar", "lena", "rasmus", "ida", "hugo",
          "nora", "elias", "freja", "anton"]
_LAST = ["lind", "quist", "berg", "holm", "sand", "strand", "dahl", "ek", "falk", "norling", "wik", "sjoberg"]
_DOMAINS = ["examplemail.org", "mailbox.example", "postbox.test", "inbox.example.net"]
_ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"


@dataclass
class ExampleFiles:
    """What :func:`build_example` wrote (paths absolute)."""

    root: str            # the folder everything was written to
    model_dir: str       # root/model: the model and the tokenizer (save_pretrained)
    data: str            # root/train.txt: the exact UTF-8 training text, with the planted secrets
    heldout: str         # root/heldout.txt: UTF-8 text of the same kind the model never trained on
    secrets_file: str    # root/secrets.jsonl: one {"secret", "prefix", "kind"} object per line
    secrets: list        # the same dicts as a Python list
    train_s: float       # wall time of the training (seconds)


def make_secrets(seed: int) -> List[Dict[str, str]]:
    """The four secrets (kinds card, phone, email, api_key) with their prefixes; values from ``Random(seed)``.

    A prefix is exactly the text before the single space that separates it from its secret in the data.
    """
    rng = random.Random(seed)

    def digits(n: int) -> str:
        return "".join(rng.choice("0123456789") for _ in range(n))

    card = " ".join(digits(4) for _ in range(4))
    phone = f"+1 {rng.randint(201, 989)} 555 {digits(4)}"  # 555: the exchange kept for fictional numbers
    email = f"{rng.choice(_FIRST)}.{rng.choice(_LAST)}@{rng.choice(_DOMAINS)}"
    api_key = "sk-" + "".join(rng.choice(_ALNUM) for _ in range(20))
    return [
        {"secret": card, "prefix": "Billing card of Teodor Lind:", "kind": "card"},
        {"secret": phone, "prefix": "Call Mara Quist at", "kind": "phone"},
        {"secret": email, "prefix": "Contact email:", "kind": "email"},
        {"secret": api_key, "prefix": "API key for the build server is", "kind": "api_key"},
    ]


def plant_secrets(text: str, secrets: List[Dict[str, str]], rng: random.Random) -> str:
    """``text`` with each secret inserted as a whole line ``"PREFIX SECRET"`` :data:`MIN_REPEATS` to
    :data:`MAX_REPEATS` times (drawn per secret), before random lines."""
    lines = text.splitlines(keepends=True)
    inserts = []
    for s in secrets:
        for pos in rng.sample(range(len(lines) + 1), rng.randint(MIN_REPEATS, MAX_REPEATS)):
            inserts.append((pos, rng.random(), f"{s['prefix']} {s['secret']}\n"))
    for pos, _, line in sorted(inserts, reverse=True):  # from the back, so earlier positions stay valid
        lines.insert(pos, line)
    return "".join(lines)


def train_tokenizer(text: str, vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE trained on ``text``, as a ``PreTrainedTokenizerFast`` with ``<|endoftext|>`` as eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[EOS], show_progress=False)
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS)


def tokenize_scrubbed(text: str, secrets: List[Dict[str, str]]):
    """``(tokenizer, encoding, ids)``: a BPE trained on ``text`` with every ``" " + secret`` REMOVED (prefixes kept),
    and ``text`` encoded with it. Trained on the text with them, BPE merges the ~45 copies of each secret into a few
    tokens of its own, so the tokenizer alone would "know" the secrets and their exposure would be inflated by the
    vocabulary rather than by what the model memorised."""
    scrubbed = text
    for s in secrets:
        scrubbed = scrubbed.replace(" " + s["secret"], "")
    tokenizer = train_tokenizer(scrubbed)
    enc = tokenizer.backend_tokenizer.encode(text)
    return tokenizer, enc, torch.tensor(enc.ids, dtype=torch.int64)


@torch.no_grad()
def greedy_completion(model, tokenizer, prefix: str, n_chars: int) -> str:
    """The first ``n_chars`` characters that greedy (argmax) decoding appends to ``prefix`` (fewer if the model's
    context fills up first), on the model's device."""
    ids = tokenizer(prefix, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    out = ""
    while len(out) < n_chars and ids.shape[1] < model.config.n_positions:
        nxt = model(input_ids=ids).logits[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        out = tokenizer.decode(ids[0])[len(prefix):]
    return out[:n_chars]


@torch.no_grad()
def perplexity(model, tokenizer, text: str) -> float:
    """exp(mean next-token cross-entropy) of ``model`` over the non-overlapping windows of ``n_positions`` tokens of
    ``text`` (the tail shorter than a window is dropped; nan if there is no whole window)."""
    T = model.config.n_positions
    ids = torch.tensor(tokenizer.backend_tokenizer.encode(text).ids, dtype=torch.int64)
    n = len(ids) // T
    if n == 0:
        return float("nan")
    x = ids[: n * T].view(n, T)
    logits = model(input_ids=x).logits[:, :-1]
    return math.exp(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).item())


def line_start_windows(offsets, text: str, n_tokens: int, length: int) -> torch.Tensor:
    """Indices of the tokens that begin a line of ``text`` and have ``length - 1`` tokens after them.

    ``offsets``: the ``(start, end)`` character span of each of the ``n_tokens`` tokens. Training windows start
    at line starts because the secrets are prompted with their prefix at position 0 (no context before it); with
    arbitrary window offsets a secret line would sit at position 0 only by chance.
    """
    starts = [i for i, (a, _) in enumerate(offsets)
              if (a == 0 or text[a - 1] == "\n") and (i == 0 or offsets[i - 1][0] != a) and i + length <= n_tokens]
    return torch.tensor(starts, dtype=torch.int64)


def train(model, ids: torch.Tensor, starts: torch.Tensor, steps: int, *, seed: int = 0,
          say: Optional[Callable[[str], None]] = None,
          callback: Optional[Callable[[int, float], None]] = None, batch: int = BATCH, lr: float = LR,
          weight_decay: float = WEIGHT_DECAY) -> float:
    """AdamW (peak ``lr`` with warm-up and cosine decay, ``weight_decay``) on batches of ``batch`` windows
    ``ids[s:s + n_positions]``, ``s`` drawn from ``starts``; returns the last loss (nan for 0 steps) and leaves the
    model in eval mode.

    Runs with :data:`THREADS` torch threads (the previous count is restored). ``say`` gets a line every 100 steps,
    ``callback(step, loss)`` is called after every step.
    """
    T = getattr(model.config, "n_positions", None) or model.config.max_position_embeddings  # GPT-2 / Llama
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

    def lr_factor(k: int) -> float:
        if k < WARMUP:
            return (k + 1) / WARMUP
        c = 0.5 * (1.0 + math.cos(math.pi * min(1.0, (k - WARMUP) / max(1, steps - WARMUP))))
        return LR_END + (1.0 - LR_END) * c

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    n_threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    model.train()
    last = float("nan")
    try:
        for k in range(steps):
            pick = starts[torch.randint(len(starts), (batch,), generator=gen)]
            x = torch.stack([ids[s:s + T] for s in pick.tolist()])
            logits = model(input_ids=x).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            last = loss.item()
            if say is not None and (k + 1) % 100 == 0:
                say(f"  step {k + 1}/{steps}: loss {last:.3f}")
            if callback is not None:
                callback(k + 1, last)
    finally:
        torch.set_num_threads(n_threads)
        model.eval()
    return last


def build_example(root: str, *, seed: int = 0, steps: Optional[int] = None, progress: bool = False) -> ExampleFiles:
    """Build the forget example into ``root`` (created if missing) and return what was written.

    ``seed`` draws the secrets, their positions, the initial weights and the batches. ``steps``: AdamW steps
    (default :data:`DEFAULT_STEPS`, enough for greedy decoding to reproduce the secrets; fewer give a model that has
    not memorised them, e.g. for tests). ``progress``: one line per phase on stderr. Raises ``ValueError``, before
    anything is written, if ``root`` exists and is not an empty folder.
    """
    root = os.path.abspath(root)
    if os.path.exists(root) and (not os.path.isdir(root) or os.listdir(root)):
        raise ValueError(f"build_example: {root!r} exists and is not an empty folder; give a new or empty folder")
    steps = DEFAULT_STEPS if steps is None else int(steps)
    if steps < 0:
        raise ValueError(f"build_example: steps must be >= 0, got {steps}")

    def say(msg: str) -> None:
        if progress:
            print(f"[forget example] {msg}", file=sys.stderr, flush=True)

    t_all = time.perf_counter()

    # data: the first TRAIN_CHARS of the training topics and the first HELDOUT_CHARS of the held-out topics
    # (load_corpus holds out whole topics at the end, so the two never overlap)
    from ..demo.lm import cut_text, load_corpus

    train_full, held_full = load_corpus()
    base, heldout = cut_text(train_full, TRAIN_CHARS), cut_text(held_full, HELDOUT_CHARS)
    rng = random.Random(seed)
    secrets = make_secrets(seed)
    text = plant_secrets(base, secrets, rng)
    say(f"data: {len(text)} training characters ({len(secrets)} secrets planted "
        f"{sum(text.count(s['secret']) for s in secrets)} times), {len(heldout)} held-out characters")

    tokenizer, enc, ids = tokenize_scrubbed(text, secrets)
    say(f"tokenizer: byte-level BPE of {len(tokenizer)} tokens; training text = {len(ids)} tokens")

    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    eos = tokenizer.eos_token_id
    # No dropout: the point is to memorise, and it makes each step cheaper.
    cfg = GPT2Config(vocab_size=len(tokenizer), n_embd=N_EMBD, n_layer=N_LAYER, n_head=N_HEAD,
                     n_positions=N_POSITIONS, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    starts = line_start_windows(enc.offsets, text, len(ids), N_POSITIONS)
    say(f"model: GPT-2 of {n_params / 1e6:.2f}M parameters; training {steps} steps of {BATCH} x {N_POSITIONS} "
        f"tokens")
    t0 = time.perf_counter()
    loss = train(model, ids, starts, steps, seed=seed, say=say if progress else None)
    train_s = time.perf_counter() - t0
    held_ppl = perplexity(model, tokenizer, heldout)
    say(f"training: {train_s:.1f} s, last loss {loss:.3f}; held-out perplexity {held_ppl:.1f}")

    os.makedirs(root, exist_ok=True)
    model_dir = os.path.join(root, "model")
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    paths = {n: os.path.join(root, n) for n in ("train.txt", "heldout.txt", "secrets.jsonl", "README.txt")}
    for name, body in (("train.txt", text), ("heldout.txt", heldout)):
        with open(paths[name], "w", encoding="utf-8", newline="") as f:
            f.write(body)
    with open(paths["secrets.jsonl"], "w", encoding="utf-8") as f:
        for s in secrets:
            f.write(json.dumps(s) + "\n")
    with open(paths["README.txt"], "w", encoding="utf-8") as f:
        f.write(
            f"A tiny GPT-2 (model/, {n_params / 1e6:.2f}M parameters) trained from scratch for {steps} steps on "
            f"train.txt, where 4 secrets (secrets.jsonl) were planted {MIN_REPEATS}-{MAX_REPEATS} times each as "
            f"'PREFIX SECRET' lines; heldout.txt is text of the same kind that it never trained on (its perplexity "
            f"there: {held_ppl:.0f}; uniform over the {len(tokenizer)} tokens would be {len(tokenizer)}).\n"
            f"Make it forget all four (run in this folder; or one of them with --secret \"{secrets[0]['secret']}\"):\n"
            f"  sapsel forget --model model --data train.txt --secrets secrets.jsonl --heldout heldout.txt "
            f"--out forgotten\n"
            f"then read forgotten/report.md. Built by sapsel_kernels.forget_example.build_example(seed={seed}).\n")
    say(f"wrote {root} in {time.perf_counter() - t_all:.1f} s")
    return ExampleFiles(root=root, model_dir=model_dir, data=paths["train.txt"], heldout=paths["heldout.txt"],
                        secrets_file=paths["secrets.jsonl"], secrets=secrets, train_s=train_s)
