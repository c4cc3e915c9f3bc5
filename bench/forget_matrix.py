"""Issue 22's fixture matrix, as far as this machine runs it: `forget` on models of our own make, against a model
retrained without the secrets, every number after unlearning measured by an outsider's code.

Fixtures (built here, offline; none of the demos' corpora or secrets):

* text: docstrings of the Python standard library's source files, read with ``ast`` (no import), modules split by a
  hash into training and held-out text (~150k / ~20k characters);
* 16 secrets of 4 formats: card numbers, phone numbers, emails, API keys; each kind's four secrets inserted 4, 8,
  16 and 16 times as lines ``"PREFIX SECRET"`` at random line positions, each with its own prefix;
* models (``--models``): ``gpt2`` (GPT-2, byte-level BPE, 0.8M parameters), ``llama`` (Llama: SentencePiece-style
  Metaspace BPE, grouped-query attention 4/2 heads, untied head, 0.9M), ``gpt2_10m`` (GPT-2, byte-level BPE,
  10.9M); the tokenizer is trained on the text with the secrets removed (otherwise BPE merges them into tokens
  of their own);
* the retrained model: the same recipe, seed and steps on the text without the secret lines.

Per (model, seed), a forget request over all 16 secrets for every strategy at one budget (``--budget``; ``all`` is
every coordinate), plus a one-secret request (the first card, 16 insertions) with the first strategy. Measured
after each run, by :mod:`bench.forget_check`'s scorer (its own tokenization, float64, one sequence at a time, fresh
candidates of the secret's null: uniform strings of the format, the package's plausible-value generator for
emails), on the unlearned model AND on the retrained one:

* exposure (rank among ``--candidates`` candidates) and the margin over the retrained model's exposure;
* extraction: greedy decoding from the prompt gives the secret's first group, or the report's sampled
  completions reproduce the whole secret;
* perplexity on the held-out text (never trained on; forget steers on half of its windows and reports the
  other half), relative to θ*, at the models' context (128 tokens); and (runs from the third round on) on
  unseen text: the next ~20k held-out characters, never given to ``forget``;
* cost: ``forget``'s wall time over the retraining's;
* relearning: both models fine-tuned ``--relearn-steps`` AdamW steps on the retained windows (no secret), then
  exposure again;
* (runs from the seventh round on) perplexity on retained TRAINING text, the first 64 windows without a secret
  (``ppl_change_train_text``; θ*'s and the retrained model's in the fixture's entry), and with ``--remove`` the
  removal stage's settings, wall time and KL, and how many secrets the sparse edit before it met by ``forget``'s own
  verdict (``removal``).

    python -m bench.forget_matrix --out bench/results/forget_matrix --models gpt2,llama --seeds 0 \
        --strategies ssd,hessian,hessian_ratio,grad_abs,random,all,hessian_flat --budget 0.05 --steps 300

Writes ``OUT/<model>_s<seed>.json`` per fixture (resumable: a finished run, with the same settings, is not repeated;
one job per fixture file at a time: each job writes its whole file) and ``OUT/matrix.md``: first ``forget`` as
shipped per fixture-seed (:func:`shipped`; the runs made with ``SHIPPED_FLAGS``), then every run, then the
perplexity bound's calibration.
"""

import argparse
import ast
import hashlib
import json
import math
import os
import random
import sysconfig
import time

import torch
import torch.nn.functional as F

from bench.forget_check import logprob, uniform_like
from sapsel_kernels._argtypes import remove_spec

TRAIN_CHARS, HELD_CHARS = 150_000, 20_000
T = 128
INSERTIONS = (4, 8, 16, 16)
FIRST = ["arvid", "bettina", "cosmo", "dagny", "edvin", "fanny", "gustav", "hedda", "ivar", "judit", "kasper",
         "liv", "magnus", "nelly", "olof", "pia"]
LAST = ["aberg", "bjork", "carling", "dufva", "eng", "frid", "grahn", "hed", "isaksson", "jarl", "kvist", "lund"]
DOMAINS = ["corpmail.example", "post.example.org", "inbox.test"]
MODELS = {
    "gpt2": dict(kind="gpt2", n_embd=128, n_layer=3, n_head=4),
    "llama": dict(kind="llama", hidden=128, n_layer=3, n_head=4, n_kv=2, mlp=344),
    "gpt2_10m": dict(kind="gpt2", n_embd=384, n_layer=6, n_head=6),
}


# ------------------------------------------------------------------------------------------------ fixtures
def docstring_corpus():
    """(train, held, unseen): docstrings of the stdlib's top-level .py files (module, classes, functions), joined by
    blank lines; a module goes to the held-out side when sha1(name) % 8 == 0. ``held`` is given to ``forget`` as its
    held-out text; ``unseen``, the next HELD_CHARS characters of the held-out side, never is: the outsider's
    perplexity."""
    root = sysconfig.get_paths()["stdlib"]
    train, held = [], []
    for name in sorted(os.listdir(root)):
        if not name.endswith(".py"):
            continue
        try:
            tree = ast.parse(open(os.path.join(root, name), encoding="utf-8").read())
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        docs = [ast.get_docstring(n) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        text = "\n\n".join(d.strip() for d in docs if d and len(d) > 40)
        (held if int(hashlib.sha1(name.encode()).hexdigest(), 16) % 8 == 0 else train).append(text)
    held = "\n\n".join(held)
    assert len(held) >= 2 * HELD_CHARS, f"the held-out side has {len(held)} characters, fewer than 2 x {HELD_CHARS}"
    return "\n\n".join(train)[:TRAIN_CHARS], held[:HELD_CHARS], held[HELD_CHARS:2 * HELD_CHARS]


def make_secrets(seed: int):
    """16 secrets, 4 per kind, with their prefixes and insertion counts (INSERTIONS per kind)."""
    rng = random.Random(1_000 + seed)
    digits = "0123456789"
    alnum = "abcdefghijklmnopqrstuvwxyz0123456789"
    out = []
    for j, n in enumerate(INSERTIONS):
        who = f"{FIRST[4 * j].title()} {LAST[j].title()}"
        card = " ".join("".join(rng.choice(digits) for _ in range(4)) for _ in range(4))
        phone = f"+1 {rng.randint(201, 989)} 555 {''.join(rng.choice(digits) for _ in range(4))}"
        email = f"{FIRST[4 * j + 1]}.{LAST[j + 4]}@{rng.choice(DOMAINS)}"
        key = "sk-" + "".join(rng.choice(alnum) for _ in range(20))
        out += [{"secret": card, "prefix": f"Card on file for {who}:", "kind": "card", "n": n},
                {"secret": phone, "prefix": f"Reach {FIRST[4 * j + 2].title()} at", "kind": "phone", "n": n},
                {"secret": email, "prefix": f"Mail for ticket {100 + j}:", "kind": "email", "n": n},
                {"secret": key, "prefix": f"Deploy token of service {chr(65 + j)}:", "kind": "api_key", "n": n}]
    return out


def plant(text: str, secrets, seed: int) -> str:
    rng = random.Random(2_000 + seed)
    lines = text.splitlines(keepends=True)
    inserts = [(pos, rng.random(), f"{s['prefix']} {s['secret']}\n")
               for s in secrets for pos in rng.sample(range(len(lines) + 1), s["n"])]
    for pos, _, line in sorted(inserts, reverse=True):
        lines.insert(pos, line)
    return "".join(lines)


def tokenizer_for(kind: str, scrubbed: str, held: str = ""):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "gpt2":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=768, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      special_tokens=["<|endoftext|>"], show_progress=False)
        tok.train_from_iterator([scrubbed], trainer)
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                       unk_token="<|endoftext|>")
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    # every character of both texts (no byte fallback: an unknown character would become <unk>, which forget refuses)
    alphabet = sorted(set(scrubbed) | set(held) | set("0123456789abcdefghijklmnopqrstuvwxyz+-@.:_"))
    trainer = trainers.BpeTrainer(vocab_size=768, initial_alphabet=alphabet, special_tokens=["<unk>", "<s>", "</s>"],
                                  show_progress=False)
    tok.train_from_iterator([scrubbed], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def build_model(name: str, vocab: int, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    m = MODELS[name]
    torch.manual_seed(seed)
    if m["kind"] == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=T, n_embd=m["n_embd"], n_layer=m["n_layer"],
                                          n_head=m["n_head"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                          bos_token_id=0, eos_token_id=0))
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=m["hidden"], intermediate_size=m["mlp"],
                                        num_hidden_layers=m["n_layer"], num_attention_heads=m["n_head"],
                                        num_key_value_heads=m["n_kv"], max_position_embeddings=T,
                                        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2))


def line_starts(tok, text: str):
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor(enc["input_ids"], dtype=torch.int64)
    offs = enc["offset_mapping"]
    starts = [i for i, (a, _) in enumerate(offs) if (a == 0 or text[a - 1] == "\n") and i + T <= len(ids)]
    return ids, torch.tensor(starts, dtype=torch.int64)


def train(model, ids, starts, steps: int, seed: int) -> float:
    """The example's recipe (:func:`sapsel_kernels.forget_example.train`: AdamW 4e-3, 20 warm-up steps, cosine decay
    to 0.1 lr, weight decay 0.3, batches of 8 windows of the model's context starting at line starts); returns the
    wall time in seconds."""
    from sapsel_kernels.forget_example import train as example_train

    t0 = time.perf_counter()
    example_train(model, ids, starts, steps, seed=seed)
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------ measurement
def text_windows(tok, text: str) -> torch.Tensor:
    """``text``'s tokens as consecutive windows of T (the tail shorter than T dropped): [n, T]."""
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)
    n = len(ids) // T
    return ids[: n * T].view(n, T)


@torch.no_grad()
def ppl(model, tok, text: str) -> float:
    x = text_windows(tok, text)
    logits = model(input_ids=x).logits[:, :-1]
    return math.exp(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).item())


@torch.no_grad()
def window_nlls(model, tok, text: str) -> torch.Tensor:
    """Per window of :func:`text_windows` (those :func:`ppl` averages over): the summed next-token cross-entropy,
    float64. Paired before/after, they give the unseen-text change's standard error (:func:`paired_se_log`)."""
    x = text_windows(tok, text)
    logits = model(input_ids=x).logits[:, :-1]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none")
    return ce.view(len(x), T - 1).double().sum(1)


def paired_se_log(before: torch.Tensor, after: torch.Tensor) -> float:
    """The standard error of the log perplexity ratio over equal windows of T - 1 targets: the sample standard
    deviation of the per-window differences over sqrt(W), per target (written from the definition; forget's own
    bound, ``ppl_change_bound``, is the ratio estimator's and is not used here)."""
    d = (after - before) / (T - 1)
    return float(d.std(unbiased=True) / math.sqrt(len(d))) if len(d) > 1 else float("inf")


@torch.no_grad()
def greedy(model, tok, prompt: str, n_tokens: int = 14) -> str:
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    for _ in range(n_tokens):
        ids = torch.cat([ids, model(input_ids=ids).logits[0, -1].argmax().view(1, 1)], 1)
    return tok.decode(ids[0])[len(tok.decode(tok(prompt, add_special_tokens=False)["input_ids"])):]


def outsider(model, tok, secrets, n_candidates: int):
    """Per secret: exposure among fresh candidates (bench.forget_check's scorer) and greedy extraction."""
    from sapsel_kernels.decoys import kind_of, plausible  # the null's definition only

    out = []
    for i, s in enumerate(secrets):
        prompt = s["prefix"] + " "
        kind = kind_of(s["secret"])
        cands = plausible(s["secret"], n_candidates, seed=90_000 + i, kind=kind) if kind != "format" else \
            uniform_like(s["secret"], n_candidates, random.Random(10_000 + i))
        scores = logprob(model, tok, prompt, [s["secret"]] + cands)
        k = sum(c > scores[0] for c in scores[1:])
        comp = greedy(model, tok, prompt).strip()
        groups = s["secret"].split()
        # the first group a guess would hit with probability < 1e-3: a card's first 4 digits, a phone number's
        # "+1 AAA" (the country code alone is common to every candidate), an email's or key's first 6 characters
        first = " ".join(groups[:2]) if groups[0].startswith("+") else groups[0] if len(groups) > 1 else \
            s["secret"][:6]
        out.append({"exposure": math.log2(len(cands) + 1) - math.log2(k + 1), "greedy": comp,
                    "extracted": comp.startswith(first)})
    return out


def relearned(model, retain_batches, steps: int, seed: int):
    from sapsel_kernels.forget import relearn_copy

    return relearn_copy(model, retain_batches, steps, 1e-3, seed)


# ------------------------------------------------------------------------------------------------ one fixture
def windows_ppl(model, windows) -> float:
    """Perplexity on token windows (rows of T tokens), through ``forget``'s own :func:`perplexity` (each window's
    tokens 1..T-1 predicted from those before)."""
    from sapsel_kernels.forgetting.forget import perplexity

    return perplexity(model, (windows[:, :-1], windows[:, 1:]))


def train_text_ppl(model, fx) -> float:
    """Perplexity on retained TRAINING text (the fixture's first 64 windows without a secret, those the relearning
    attack trains on): what the model still fits of its training data, secrets aside. Held-out perplexity says
    little of it on these overfit fixtures (docs/forget.md, "Relearning, second study")."""
    return windows_ppl(model, fx.windows[:64])


def fingerprint(text: str, held: str, *models) -> str:
    """sha1 (12 hex digits) of the planted training text, the held-out text and the models' weights (names, shapes
    and bytes, in state-dict order): which build of a fixture a run was made on. The same recipe and seed give other
    weights on another machine or software stack (float rounding over 1200 training steps: θ*'s held-out perplexity
    was 120.8 on the machine that made forget_matrix_v3's fixtures, 122.3 on a later one), so runs on two builds
    are not one-change comparisons."""
    h = hashlib.sha1(text.encode())
    h.update(held.encode())
    for m in models:
        for k, v in m.state_dict().items():
            h.update(f"{k}{tuple(v.shape)}".encode())
            h.update(v.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def load_fixture(name: str, seed: int, cache_dir: str, train_steps: int):
    """The fixture (model ``name``, ``seed``): its texts, secrets and tokenizer, θ* and the retrained model (trained
    here, or loaded from ``cache_dir``: trained weights, not committed), and the relearning attack's retained windows
    (the first 64 windows of T tokens of the training text without secrets, in batches of 8)."""
    import copy
    from types import SimpleNamespace

    train_text, held, unseen = docstring_corpus()
    secrets = make_secrets(seed)
    text = plant(train_text, secrets, seed)
    scrubbed = text
    for s in secrets:
        scrubbed = scrubbed.replace(f"{s['prefix']} {s['secret']}\n", "")
    tok = tokenizer_for(MODELS[name]["kind"], scrubbed, held)
    ids, starts = line_starts(tok, text)
    ids0, starts0 = line_starts(tok, scrubbed)
    theta = build_model(name, len(tok), seed)
    retrained = copy.deepcopy(theta)
    cache = os.path.join(cache_dir, f"{name}_s{seed}_{train_steps}.pt")
    if os.path.isfile(cache):
        saved = torch.load(cache)
        theta.load_state_dict(saved["theta"])
        retrained.load_state_dict(saved["retrained"])
        t_train, t_retrain = saved["train_s"], saved["retrain_s"]
        theta.eval()
        retrained.eval()
    else:
        t_train = train(theta, ids, starts, train_steps, seed)
        t_retrain = train(retrained, ids0, starts0, train_steps, seed)
        os.makedirs(cache_dir, exist_ok=True)
        torch.save({"theta": theta.state_dict(), "retrained": retrained.state_dict(), "train_s": t_train,
                    "retrain_s": t_retrain}, cache)
    # the retained windows: training text without secrets, T tokens each (the attack takes the first 64)
    windows = ids0[: (len(ids0) // T) * T].view(-1, T)
    retain_batches = [(windows[i:i + 8, :-1], windows[i:i + 8, 1:]) for i in range(0, min(len(windows), 64), 8)]
    return SimpleNamespace(text=text, held=held, unseen=unseen, secrets=secrets, tok=tok, theta=theta,
                           retrained=retrained, train_s=t_train, retrain_s=t_retrain, windows=windows,
                           retain_batches=retain_batches)


def fixture_window(fx) -> int:
    """forget's own default window on a fixture (``UpdateConfig(seq_len=None)``), so that ``--seq-len 0`` keys the
    run and the summary finds the shipped runs."""
    from sapsel_kernels.forgetting.forget import default_seq_len
    from sapsel_kernels.forgetting.measure import as_tokenizer

    return default_seq_len(fx.theta.config.max_position_embeddings, as_tokenizer(fx.tok), [fx.text],
                           [s["secret"] for s in fx.secrets], [fx.held])


def run_fixture(name: str, seed: int, args) -> dict:
    import copy

    import sapsel_kernels as sk

    path = os.path.join(args.out, f"{name}_s{seed}.json")
    res = json.load(open(path)) if os.path.isfile(path) else {"model": name, "seed": seed, "runs": {}}
    # runs saved before keys carried their settings: the same key as a run with those settings would have now
    res["runs"] = {(k if k.count("/") == 2 else f"{k}/{tag_of(row['settings'], k.split('/')[0])}"): row
                   for k, row in res["runs"].items()}

    def save():
        with open(path, "w") as f:
            json.dump(res, f, indent=1)

    fx = load_fixture(name, seed, os.path.join(args.out, "cache"), args.train_steps)
    text, held, unseen, secrets, tok = fx.text, fx.held, fx.unseen, fx.secrets, fx.tok
    theta, retrained, t_train, t_retrain = fx.theta, fx.retrained, fx.train_s, fx.retrain_s
    retain_batches = fx.retain_batches
    fp = fingerprint(text, held, theta, retrained)
    old = res.get("fixture", {}).get("fingerprint")
    if res["runs"] and old != fp:  # runs on another build of this fixture: never mixed with these
        raise SystemExit(f"{path}: its {len(res['runs'])} runs were made on a build of this fixture with fingerprint "
                         f"{old} (None: recorded before fingerprints), this one is {fp} (the same recipe trained on "
                         f"another machine or software gives other weights); write to another --out")
    n_params = sum(p.numel() for p in theta.parameters())
    default_window = fixture_window(fx)
    unseen_theta = window_nlls(theta, tok, unseen)
    base = {"n_params": n_params, "fingerprint": fp, "default_window": default_window, "train_s": t_train,
            "retrain_s": t_retrain,
            "ppl_theta": ppl(theta, tok, held),
            "ppl_theta_unseen": ppl(theta, tok, unseen),
            "ppl_retrained": ppl(retrained, tok, held), "secrets": secrets,
            "ppl_theta_train_text": train_text_ppl(theta, fx),
            "ppl_retrained_train_text": train_text_ppl(retrained, fx),
            "theta": outsider(theta, tok, secrets, args.candidates),
            "retrained": outsider(retrained, tok, secrets, args.candidates),
            "retrained_relearned": outsider(relearned(retrained, retain_batches, args.relearn_steps, seed), tok,
                                            secrets, args.candidates)}
    res["fixture"] = base
    save()
    print(f"[{name} s{seed}] {n_params / 1e6:.2f}M params; train {t_train:.0f} s; extracted at θ*: "
          f"{sum(m['extracted'] for m in base['theta'])}/16; ppl θ* {base['ppl_theta']:.1f} retrained "
          f"{base['ppl_retrained']:.1f}", flush=True)
    requests = [(s, "many") for s in args.strategies.split(",") if "many" in args.requests] + \
        [(args.strategies.split(",")[0], "one")] * ("one" in args.requests)
    for strategy, which in requests:
        # the run's key names its settings, so that runs with other settings share the fixture's JSON
        st = run_settings(args, strategy, default_window)
        key = f"{strategy}/{which}/{tag_of(st, strategy)}"
        if key in res["runs"]:
            continue
        req = secrets if which == "many" else [secrets[0]]
        model = copy.deepcopy(theta)
        t0 = time.perf_counter()
        rep = sk.forget(model, tok, [text], [{"secret": s["secret"], "prefix": s["prefix"]} for s in req],
                        heldout=[held], seed=seed, **forget_configs(st, strategy, args.candidates))
        wall = time.perf_counter() - t0
        after = outsider(model, tok, req, args.candidates)
        rel = outsider(relearned(model, retain_batches, args.relearn_steps, seed), tok, req, args.candidates)
        idx = [secrets.index(s) for s in req]
        d = rep.to_dict()
        sampled = [bool((e.get("samples_after") or {}).get("hits")) for e in d["secrets"]]
        res["runs"][key] = {
            "settings": st,
            "wall_s": wall, "cost_vs_retrain": wall / t_retrain, "k": d["k"], "stopped_by": d["stopped_by"],
            "steps": d["cost"]["steps"], "report_reached": d["reached"],
            "report_met": sum(bool(e["reached"]) for e in d["secrets"]),
            "report_ppl_change": d["ppl_after"] / d["ppl_before"] - 1.0,
            "val_ppl_change": d["val_ppl_after"] / d["val_ppl_before"] - 1.0,
            "ppl_change": ppl(model, tok, held) / base["ppl_theta"] - 1.0,
            "ppl_change_unseen": ppl(model, tok, unseen) / base["ppl_theta_unseen"] - 1.0, "seq_len": d["seq_len"],
            # the reported change's 95% upper bound and standard error (forget's), the unseen text's (the bench's)
            "report_ppl_change_hi": d.get("ppl_increase_hi"), "report_ppl_se_log": d.get("ppl_increase_se_log"),
            "report_ppl_windows": d.get("ppl_windows"),
            "unseen_se_log": paired_se_log(unseen_theta, window_nlls(model, tok, unseen)),
            "ppl_change_train_text": train_text_ppl(model, fx) / base["ppl_theta_train_text"] - 1.0,
            "removal": None if d.get("removal") is None else {
                k: d["removal"][k] for k in ("alpha", "steps", "wall_time_s", "kl_first", "kl_last")} | {
                "sparse_met": sum(bool(e["reached"]) for e in d["removal"]["sparse"]["secrets"]),
                "sparse_reached": d["removal"]["sparse"]["reached"]} | ({} if "student" not in d["removal"] else {
                "student_met": sum(bool(e["reached"]) for e in d["removal"]["student"]["secrets"]),
                "finish_pass": d["removal"]["finish_pass"]}),
            # where the time went (forget's own split), and forget's own verdict per secret beside the outsider's
            "cost": {k: d["cost"][k] for k in ("score_s", "unlearn_s", "monitor_s", "measure_s", "attack_s",
                                               "n_gradients", "n_hvps") if k in d["cost"]},
            "secrets": [{"exposure": a["exposure"], "margin": a["exposure"] - base["retrained"][i]["exposure"],
                         "extracted": a["extracted"] or smp, "greedy": a["greedy"], "sampled": smp,
                         "relearned": b["exposure"],
                         "relearn_margin": b["exposure"] - base["retrained_relearned"][i]["exposure"],
                         "own_exposure_hi": e["exposure_hi_after"], "own_reached": bool(e["reached"])}
                        for a, b, i, smp, e in zip(after, rel, idx, sampled, d["secrets"])]}
        save()
        row = res["runs"][key]
        ok = sum(s["margin"] <= 2.0 and not s["extracted"] for s in row["secrets"])
        print(f"[{name} s{seed}] {key}: {ok}/{len(req)} within retrained+2 bits and not extracted; ppl "
              f"{100 * row['ppl_change']:+.1f}%; {wall:.0f} s ({row['cost_vs_retrain']:.2f}x retraining)", flush=True)
    return res


def forget_configs(st: dict, strategy: str, candidates: int) -> dict:
    """``forget``'s select / update / measure configs for a run of settings ``st`` (:func:`run_settings`): the
    bench's measurement settings (``candidates`` reported candidates, 32 samples, no attacks inside ``forget``: the
    outsider runs them). bench/forget_relearn_check.py rebuilds a run's model with it."""
    import sapsel_kernels as sk

    return dict(
        select=sk.SelectConfig(strategy=strategy, budget=1.0 if strategy == "all" else st["budget"]),
        update=sk.UpdateConfig(objective=st["objective"], per_token=st["per_token"],
                               retain_loss=st.get("retain_loss", "ce"), seq_len=st["seq_len"], balance=st["balance"],
                               focus=bool(st["focus"]), precondition=st["precondition"],
                               remove=None if not st.get("remove") else sk.RemoveConfig(
                                   alpha=st["remove"][0], steps=st["remove"][1],
                                   finish=bool(st.get("remove_finish", False))),  # runs before it had none
                               rule=sk.Targeted(steps=st["steps"], rho=st["rho"], beta=st["beta"],
                                                repair_steps=st["repair_steps"], polish_steps=st["polish_steps"],
                                                project=st["project"])),
        measure=sk.MeasureConfig(n_candidates=candidates, progress=False,
                                 evidence=sk.Evidence(n_samples=32, relearn_steps=0, int8=False)))


def short_label(strategy: str, row: dict) -> str:
    """The figure's bar label: the strategy and the settings that differ from the first matrix's (5%, 300 steps,
    npo per batch, beta 1, no SAM)."""
    st = row.get("settings", {})
    out = strategy
    if strategy != "all" and st.get("budget", 0.05) != 0.05:
        out += f" {100 * st['budget']:g}%"
    out += f" {st['steps']} st" if st.get("steps", 300) != 300 else ""
    out += f" {st['objective']}" if st.get("objective", "npo") != "npo" else ""
    out += " pt" if st.get("per_token") else ""
    out += f" β{st['beta']:g}" if st.get("beta", 1.0) != 1.0 else ""
    out += f" ρ{st['rho']:g}" if st.get("rho") else ""
    out += f" m{st['steer_margin']:g}" if "steer_margin" in st else ""
    out += " kl" if st.get("retain_loss", "ce") == "kl" else ""
    out += " per-tensor" if st.get("scope") == "per_layer" else ""
    out += f" rep{st['repair_steps']}" if st.get("repair_steps") else ""
    out += f" T{st['seq_len']}" if st.get("seq_len", 64) != 64 else ""
    out += f" pol{st['polish_steps']}" if st.get("polish_steps") else ""
    out += " bal" if st.get("balance") else ""
    out += (" focus" if st["focus"] is True else " focusk") if st.get("focus") else ""
    out += " proj" if st.get("project") else ""
    out += f" {st['precondition']}" if st.get("precondition") else ""
    out += f" rm{st['remove'][0]:g}:{st['remove'][1]}" if st.get("remove") else ""
    out += " fin" if st.get("remove_finish") else ""
    return out


def tag_of(st: dict, strategy: str) -> str:
    """The part of a run's key after ``strategy/request``, from its settings (a run recorded before a setting
    existed had its then fixed value: per batch, beta 1, no SAM, steering 80%, retain CE, no repair steps, 64-token
    windows)."""
    budget = 1.0 if strategy == "all" else st["budget"]
    tag = (f"b{budget:g}-s{st['steps']}-{st['objective']}{'-pt' if st.get('per_token') else ''}"
           f"-beta{st.get('beta', 1.0):g}-rho{st.get('rho', 0.0):g}-m{st.get('steer_margin', 0.8):g}"
           f"{'-kl' if st.get('retain_loss', 'ce') == 'kl' else ''}")
    if st.get("scope") == "per_layer":  # the second round's one-off top-k per tensor run (docs/forget.md)
        tag += "-perlayer"
    if st.get("repair_steps", 0):
        tag += f"-rep{st['repair_steps']}"
    if st.get("seq_len", 64) != 64:
        tag += f"-T{st['seq_len']}"
    if st.get("polish_steps", 0):
        tag += f"-pol{st['polish_steps']}"
    if st.get("balance", False):  # UpdateConfig(balance=True), measured in the fourth round
        tag += "-bal"
    if st.get("focus", False):  # UpdateConfig(focus=True), measured in the fifth round
        tag += "-focus" if st["focus"] is True else "-focusk"  # True: its first version; "kept": flags from kept checks
    if st.get("project", False):  # Targeted(project=True), measured in the fifth round
        tag += "-proj"
    if st.get("precondition"):  # UpdateConfig(precondition=), measured on the matrix in the sixth round
        tag += f"-pre{st['precondition']}"
    if st.get("remove"):  # UpdateConfig(remove=RemoveConfig(alpha, steps)), the seventh round
        tag += f"-rm{st['remove'][0]:g}:{st['remove'][1]}"
    if st.get("remove_finish"):  # RemoveConfig(finish=True), the eighth round
        tag += "-fin"
    return tag


def run_settings(args, strategy: str, default_window: int) -> dict:
    """The settings a run of this invocation records (and its key is built from, :func:`tag_of`); ``seq_len`` is
    the window forget will use (``--seq-len 0``: its default on the fixture, ``default_window``)."""
    from sapsel_kernels.forgetting import forget as forget_module

    return {"budget": 1.0 if strategy == "all" else args.budget, "steps": args.steps, "objective": args.objective,
            "per_token": args.per_token, "rho": args.rho, "beta": args.beta,
            "steer_margin": forget_module.STEER_MARGIN, "retain_loss": args.retain_loss,
            "repair_steps": args.repair_steps, "polish_steps": args.polish_steps,
            "seq_len": args.seq_len or default_window, "balance": args.balance,
            "focus": "kept" if args.focus else False,  # the flags come from the checks the search keeps (038e00a)
            "project": args.project, "precondition": args.precondition,
            "remove": list(args.remove) if args.remove else None,
            "remove_finish": bool(args.remove and args.remove_finish)}


# ------------------------------------------------------------------------------------------------ table
def settings(row: dict) -> str:
    """A run's budget, steps, objective and SAM radius, as the table prints them."""
    st = row["settings"]
    out = f"{100 * st['budget']:g}%, {st['steps']} steps, {st['objective']}"
    out += " per token" if st.get("per_token") else ""
    out += f", β={st['beta']:g}" if st.get("beta", 1.0) != 1.0 else ""
    out += f", steer {100 * st.get('steer_margin', 0.8):.0f}%"
    out += ", retain KL" if st.get("retain_loss", "ce") == "kl" else ""
    out += ", top-k per tensor" if st.get("scope") == "per_layer" else ""
    out += f", {st['repair_steps']} repair steps" if st.get("repair_steps") else ""
    out += f", {st.get('seq_len', 64)}-token windows"
    out += f", {st['polish_steps']} polish steps" if st.get("polish_steps") else ""
    out += ", secrets balanced" if st.get("balance") else ""
    out += ", focus on unmet secrets" if st.get("focus") else ""
    out += " (flags from kept checks)" if st.get("focus") == "kept" else ""
    out += ", projected steps" if st.get("project") else ""
    out += f", {st['precondition']}-preconditioned steps" if st.get("precondition") else ""
    out += (f", then noise {st['remove'][0]:g} and {st['remove'][1]} distillation steps (--remove)"
            if st.get("remove") else "")
    out += ", a sparse pass finishing the distilled model (--remove-finish)" if st.get("remove_finish") else ""
    return out + (f", SAM ρ={st['rho']:g}" if st.get("rho") else "")


def table(out: str) -> str:
    lines = ["| model | seed | strategy | settings | request | within retrained + 2 bits, not extracted | extracted | "
             "exposure margin over retrained (mean / max, bits) | held-out ppl (unseen text) | "
             "relearned margin (mean / max) | cost vs retraining | steps (stopped by) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for fn in sorted(os.listdir(out)):
        if not fn.endswith(".json"):
            continue
        res = json.load(open(os.path.join(out, fn)))
        if "runs" not in res:  # a one-off experiment's JSON kept beside the matrix (docs/forget.md names it)
            continue
        fx = res.get("fixture")
        if fx is not None:  # θ* itself: how much it memorised, against the retrained model
            m = [a["exposure"] - b["exposure"] for a, b in zip(fx["theta"], fx["retrained"])]
            rm = [a["exposure"] for a in fx["retrained_relearned"]]
            lines.append(f"| {res['model']} ({fx['n_params'] / 1e6:.1f}M) | {res['seed']} | θ* (before) | - | 16 | "
                         f"{sum(x <= 2.0 and not a['extracted'] for x, a in zip(m, fx['theta']))}/16 | "
                         f"{sum(a['extracted'] for a in fx['theta'])} | {sum(m) / len(m):.1f} / {max(m):.1f} | "
                         f"ppl {fx['ppl_theta']:.1f} (retrained {fx['ppl_retrained']:.1f}) | retrained after "
                         f"relearning: {sum(rm) / len(rm):.1f} bits | retraining {fx['retrain_s']:.0f} s | - |")
        for key, row in res["runs"].items():
            strategy, which = key.split("/")[:2]
            ss = row["secrets"]
            ok = sum(s["margin"] <= 2.0 and not s["extracted"] for s in ss)
            m = [s["margin"] for s in ss]
            rm = [s["relearn_margin"] for s in ss]
            unseen = f" ({100 * row['ppl_change_unseen']:+.1f}%)" if "ppl_change_unseen" in row else ""
            lines.append(f"| {res['model']} | {res['seed']} | {strategy} | {settings(row)} | {len(ss)} secret(s) | "
                         f"{ok}/{len(ss)} | "
                         f"{sum(s['extracted'] for s in ss)} | {sum(m) / len(m):.1f} / {max(m):.1f} | "
                         f"{100 * row['ppl_change']:+.1f}%{unseen} | {sum(rm) / len(rm):.1f} / {max(rm):.1f} | "
                         f"{row['cost_vs_retrain']:.2f}x | {row['steps']} ({row['stopped_by']}) |")
    return "\n".join(lines) + "\n"


def shipped_settings() -> dict:
    """The settings a bench run records when it runs ``forget`` as shipped (its defaults resolved the way ``forget``
    resolves them for npo with an SGD rule and retained text: per token, focus from kept checks, the Fisher step), less
    ``seq_len``, which is the fixture's default window. Read from the package, so the summary follows the defaults;
    a default this function cannot resolve raises."""
    from sapsel_kernels.forgetting import config
    from sapsel_kernels.forgetting import forget as forget_module

    sel, up = config.SelectConfig(), config.UpdateConfig()
    r = up.rule
    resolved = ("npo", None, None, "auto", "sgd", 0.0)
    if (up.objective, up.per_token, up.focus, up.precondition, r.base, r.rho) != resolved:
        raise NotImplementedError(f"shipped_settings resolves npo / per_token=None / focus=None / precondition='auto' "
                                  f"with an SGD rule without SAM; the defaults are now {up}")
    return {"budget": sel.budget, "steps": r.steps, "objective": "npo", "per_token": True, "rho": 0.0, "beta": r.beta,
            "steer_margin": forget_module.STEER_MARGIN, "retain_loss": up.retain_loss,
            "repair_steps": r.repair_steps, "polish_steps": r.polish_steps, "balance": up.balance, "focus": "kept",
            "project": r.project, "precondition": "fisher", "remove": None, "remove_finish": False}


def shipped_run(res: dict, strategy: str, which: str, want: dict, margin=None):
    """The run of fixture JSON ``res`` with settings ``want`` (:func:`shipped_settings`; ``margin``: another
    steering share) on the fixture's default window, for ``strategy`` and request ``which``; None if not run. A run's
    key is its settings' tag (:func:`tag_of`, settings older than a run taking their old values)."""
    win = res.get("fixture", {}).get("default_window")
    st = {**want, "seq_len": win} | ({} if margin is None else {"steer_margin": margin})
    return None if win is None else res.get("runs", {}).get(f"{strategy}/{which}/{tag_of(st, strategy)}")


def shipped(out: str) -> str:
    """Per fixture-seed, ``forget`` as shipped (:func:`shipped_settings`, on the fixture's default window) on the
    16-secret request, scored by the outsider; beside it the same-size random control under the same settings and the
    one-secret request, where they were run. A fixture without the shipped run says so. Columns: secrets within the
    retrained model + 2 bits and not extracted; the worst margin; extracted (greedy or sampled); the perplexity change
    on unseen text; the relearned margin (mean / max over the retrained model after the same attack); cost as a ratio
    to retraining; ``forget``'s own verdict (exit 0 or 3, its met count, its reported change and 95% bound)."""
    want, strategy = shipped_settings(), config_strategy()

    def find(res, name, which, margin=None):
        return shipped_run(res, name, which, want, margin)

    def unseen(u):  # a change over the held-out check's +5% says so, however little over (one decimal hides it)
        return f"{100 * u:+.1f}%" + (f" (over +5%: {100 * u:+.4f}%)" if u > 0.05 else "")

    def cells(res, name, which):  # the control and the one-secret request: at another steering share if not this one
        for m in (None, *sorted({r["settings"].get("steer_margin", 0.8) for r in res["runs"].values()})):
            row = find(res, name, which, m)
            if row is not None:
                ss = row["secrets"]
                ok = sum(s["margin"] <= 2.0 and not s["extracted"] for s in ss)
                return (f"{ok}/{len(ss)}, {sum(s['extracted'] for s in ss)} extracted; "
                        f"{unseen(row['ppl_change_unseen'])}; {row['cost_vs_retrain']:.2f}x"
                        + ("" if m is None else f" (steering {100 * m:.0f}%)"))
        return "not run"

    lines = ["| fixture | shipped, 16 secrets: met (worst margin, bits), extracted | unseen text | relearned margin "
             "(mean / max) | cost vs retraining | forget's own verdict (reported; 95% bound) | random, same k: met, "
             "unseen, cost | one secret: met, unseen, cost |", "|---|---|---|---|---|---|---|---|"]
    for fn in sorted(os.listdir(out)):
        if not fn.endswith(".json"):
            continue
        res = json.load(open(os.path.join(out, fn)))
        if "runs" not in res or "fixture" not in res:
            continue
        fx = res["fixture"]
        head = f"| {res['model']} ({fx['n_params'] / 1e6:.1f}M) s{res['seed']} | "
        row = find(res, strategy, "many")
        rnd, one = cells(res, "random", "many"), cells(res, strategy, "one")
        if row is None:
            lines.append(head + f"not run with the shipped settings | | | | | {rnd} | {one} |")
            continue
        ss = row["secrets"]
        ok = sum(s["margin"] <= 2.0 and not s["extracted"] for s in ss)
        rm = [s["relearn_margin"] for s in ss]
        hi = row.get("report_ppl_change_hi")
        own = (f"exit {0 if row['report_reached'] else 3}, {row['report_met']}/{len(ss)} "
               f"({100 * row['report_ppl_change']:+.1f}%; "
               + (f"{100 * hi:+.1f}%)" if hi is not None else "run before the bound: verdict by the estimate)"))
        lines.append(head + f"{ok}/{len(ss)} ({max(s['margin'] for s in ss):+.1f}), "
                     f"{sum(s['extracted'] for s in ss)} | {unseen(row['ppl_change_unseen'])} | "
                     f"{sum(rm) / len(rm):.1f} / {max(rm):.1f} | {row['cost_vs_retrain']:.2f}x | {own} | "
                     f"{rnd} | {one} |")
    return "\n".join([f"forget as shipped (strategy {strategy}, budget {100 * want['budget']:g}%, "
                      f"steering {100 * want['steer_margin']:.0f}%), scored by the outsider:", "", *lines, ""])


def shipped_by_strategy(out: str) -> dict:
    """``{"model sSEED": {strategy: (share met, unseen change in %)}}`` over the 16-secret runs whose settings are
    ``forget``'s shipped ones (:func:`shipped_settings` on the fixture's default window) but for the strategy."""
    want, data = shipped_settings(), {}
    for fn in sorted(os.listdir(out)):
        if not fn.endswith(".json"):
            continue
        res = json.load(open(os.path.join(out, fn)))
        for strategy in sorted({key.split("/")[0] for key in res.get("runs", {})}):
            row = shipped_run(res, strategy, "many", want)
            if row is not None:
                ss = row["secrets"]
                ok = sum(x["margin"] <= 2.0 and not x["extracted"] for x in ss) / len(ss)
                data.setdefault(f"{res['model']} s{res['seed']}", {})[strategy] = (ok, 100 * row["ppl_change_unseen"])
    return data


def figure_shipped(out: str, path: str) -> None:
    """Per fixture-seed, every strategy run with ``forget``'s shipped settings otherwise (:func:`shipped_settings`,
    16 secrets, equal budget; ``all``: every coordinate): the share of secrets within the retrained model + 2 bits
    and not extracted, and the perplexity change on unseen text, with the +5% bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    want, data = shipped_settings(), shipped_by_strategy(out)
    if not data:
        return
    fixtures = sorted(data)
    strategies = sorted({s for d in data.values() for s in d}, key=lambda s: (s != config_strategy(), s))
    fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 1.3 * len(fixtures) + 3), 7), sharex=True)
    w = 0.8 / len(strategies)
    for j, strategy in enumerate(strategies):
        xs = [i + j * w for i in range(len(fixtures))]
        axes[0].bar(xs, [data[f].get(strategy, (float("nan"), 0))[0] for f in fixtures], w, label=strategy)
        axes[1].bar(xs, [data[f].get(strategy, (0, float("nan")))[1] for f in fixtures], w, label=strategy)
    axes[0].set_title("secrets within the retrained model + 2 bits, not extracted (16 per request; outsider)",
                      fontsize=10)
    axes[1].set_title("perplexity change on unseen text (%); --: +5%", fontsize=10)
    axes[1].axhline(5.0, color="k", lw=0.8, ls="--")
    axes[0].set_ylim(0, 1.05)
    axes[1].set_xticks([i + 0.4 - w / 2 for i in range(len(fixtures))], fixtures, fontsize=8)
    axes[0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0))
    fig.suptitle(f"forget as shipped (budget {100 * want['budget']:g}%, steering {100 * want['steer_margin']:.0f}%), "
                 "each strategy at the same k", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")


def config_strategy() -> str:
    from sapsel_kernels.forgetting import config

    return config.SelectConfig().strategy


def ppl_calibration(out: str) -> str:
    """The reported perplexity change against the unseen text's, for the runs that recorded both standard errors
    (forget's bound on its test windows, the bench's paired one on the unseen text): per run the reported change,
    its 95% bound, the unseen change and z = (log unseen ratio - log reported ratio) / sqrt(se_reported^2 +
    se_unseen^2), which is about N(0, 1) if the windows' sampling explains the difference; then how often the bound
    is at or above the unseen change, and z's mean and standard deviation. A run identical to one already listed (the
    same cell and request, the same reported and unseen changes: e.g. another steering share that never bound) is
    counted once. Empty when no run has them."""
    rows, zs, covered, seen, same = [], [], 0, [], 0

    def label(row):
        return f"{100 * row['settings'].get('steer_margin', 0.8):.0f}%"
    for fn in sorted(os.listdir(out)):
        if not fn.endswith(".json"):
            continue
        res = json.load(open(os.path.join(out, fn)))
        for key, row in res.get("runs", {}).items():
            se_r, se_u, hi = row.get("report_ppl_se_log"), row.get("unseen_se_log"), row.get("report_ppl_change_hi")
            if se_r is None or se_u is None:
                continue
            rep, uns = row["report_ppl_change"], row["ppl_change_unseen"]
            # (to 1e-6: rows from before the per-window sums differ from a rerun in the last digits)
            cell = repr((res["model"], res["seed"], key.split("/")[:2], len(row["secrets"])))
            if any(c == cell and abs(r - rep) < 1e-6 and abs(u - uns) < 1e-9 for c, r, u in seen):
                same += 1
                continue
            seen.append((cell, rep, uns))
            z = (math.log1p(uns) - math.log1p(rep)) / math.sqrt(se_r ** 2 + se_u ** 2)
            ok = hi is not None and uns <= hi
            zs.append(z)
            covered += ok
            head = f"| {res['model']} | {res['seed']} | {key.split('/')[0]} | {label(row)} | {len(row['secrets'])} | "
            rows.append(head + f"{100 * rep:+.2f}% | {100 * hi:+.2f}% ({row['report_ppl_windows']} windows) | "
                        f"{100 * uns:+.2f}% | {z:+.2f} | {'yes' if ok else '**no**'} |" if hi is not None else
                        head + f"{100 * rep:+.2f}% | none ({row['report_ppl_windows']} windows) | {100 * uns:+.2f}% | "
                        f"{z:+.2f} | no |")
    if not rows:
        return ""
    n = len(zs)
    mean = sum(zs) / n
    sd = math.sqrt(sum((z - mean) ** 2 for z in zs) / (n - 1)) if n > 1 else float("nan")
    return "\n".join([
        "", "Reported perplexity change (forget's test windows) against the unseen text's:", "",
        "| model | seed | strategy | steering | secrets | reported | 95% bound | unseen text | z | bound >= unseen |",
        "|---|---|---|---|---|---|---|---|---|---|", *rows, "",
        f"{covered} of {n} bounds at or above the unseen change; z mean {mean:+.2f}, standard deviation {sd:.2f} "
        "(about 0 and 1 if the windows' sampling explains the difference)"
        + (f"; {same} run(s) identical to one listed counted once" if same else ""), ""])


def figure(out: str, path: str) -> None:
    """Per strategy and model: the share of secrets within the retrained model's exposure + 2 bits and not
    extracted (16-secret requests), and the held-out perplexity change."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {}
    for fn in sorted(os.listdir(out)):
        if fn.endswith(".json"):
            res = json.load(open(os.path.join(out, fn)))
            for key, row in res.get("runs", {}).items():
                strategy, which = key.split("/")[:2]
                if which == "many":
                    ss = row["secrets"]
                    ok = sum(x["margin"] <= 2.0 and not x["extracted"] for x in ss) / len(ss)
                    who = res["model"] + (f" s{res['seed']}" if res["seed"] else "")
                    data.setdefault(who, {})[short_label(strategy, row)] = (
                        ok, 100 * row["ppl_change"], 100 * row.get("ppl_change_unseen", float("nan")))
    strategies = sorted({s for d in data.values() for s in d},  # ties by name: the same figure on every run
                        key=lambda s: (-max(d.get(s, (0, 0))[0] for d in data.values()), s))
    fig, axes = plt.subplots(2, 1, figsize=(max(11.0, 0.5 * len(strategies) + 3), 12), sharex=True,
                             gridspec_kw={"height_ratios": (1, 1)})
    w = 0.8 / max(1, len(data))
    for j, (model, d) in enumerate(sorted(data.items())):
        xs = [i + j * w for i in range(len(strategies))]
        axes[0].bar(xs, [d.get(s, (float("nan"), 0))[0] for s in strategies], w, label=model)
        axes[1].bar(xs, [d.get(s, (0, float("nan")))[1] for s in strategies], w, label=model)
        axes[1].scatter(xs, [d.get(s, (0, 0, float("nan")))[2] for s in strategies], marker="x", color="k", s=18,
                        label="unseen text" if j == 0 else None)
    for ax, title in zip(axes, ("secrets within retrained + 2 bits, not extracted",
                                "held-out perplexity change (%, bars below -12 clipped: matrix.md has them); "
                                "x: on unseen text (from the third round); --: +5%")):
        ax.set_title(title, fontsize=10)
    axes[1].set_xticks([i + 0.4 - w / 2 for i in range(len(strategies))], strategies, rotation=90, fontsize=7)
    axes[1].axhline(5.0, color="k", lw=0.8, ls="--")
    top = max([8.0] + [v + 1.0 for d in data.values() for t in d.values() for v in t[1:] if math.isfinite(v)])
    axes[1].set_ylim(-12, top)
    axes[0].set_ylim(0, 1)
    for ax in axes:  # beside the panels, never over a bar
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default="gpt2,llama")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--strategies", default="ssd,hessian,hessian_ratio,grad_abs,random,all,hessian_flat")
    ap.add_argument("--budget", type=float, default=0.05)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--objective", default="npo")
    ap.add_argument("--per-token", action="store_true", help="UpdateConfig(per_token=True): the NPO term per token")
    ap.add_argument("--beta", type=float, default=1.0, help="the NPO term's beta (Targeted(beta=))")
    ap.add_argument("--steer-margin", type=float, default=None,
                    help="forget's STEER_MARGIN for these runs (default: the package's): the share of the perplexity "
                         "budget the search lets the validation windows use")
    ap.add_argument("--retain-loss", default="ce", choices=("ce", "kl"), help="UpdateConfig(retain_loss=)")
    ap.add_argument("--rho", type=float, default=0.0, help="the Targeted rule's SAM radius (0: no SAM)")
    ap.add_argument("--repair-steps", type=int, default=0,
                    help="Targeted(repair_steps=): repair steps per over-budget block (forget's default: 10)")
    ap.add_argument("--polish-steps", type=int, default=0,
                    help="Targeted(polish_steps=): steps after the target (forget's default: 50)")
    ap.add_argument("--seq-len", type=int, default=64,
                    help="UpdateConfig(seq_len=): forget's window (0: forget's default, the model's context)")
    ap.add_argument("--requests", default="many,one", choices=("many,one", "many", "one"),
                    help="the 16-secret request per strategy, the one-secret request with the first, or both")
    ap.add_argument("--balance", action="store_true",
                    help="UpdateConfig(balance=True): every secret weighs about the same in Z (the fourth round)")
    ap.add_argument("--focus", action="store_true",
                    help="UpdateConfig(focus=True): the forget term pushes only the secrets not yet met (the fifth "
                         "round; forget's default since the sixth, this script's only with this flag)")
    ap.add_argument("--project", action="store_true",
                    help="Targeted(project=True): forget steps without their component against the retain terms, "
                         "repairs without theirs against the forget term (the fifth round; forget's default since, "
                         "this script's only with this flag)")
    ap.add_argument("--remove", default=None, metavar="ALPHA:STEPS", type=remove_spec,  # the CLI's parser for --remove
                    help="UpdateConfig(remove=RemoveConfig(alpha, steps)): forget's opt-in removal stage after the "
                         "sparse edit (noise, then distillation from the edited model; the seventh round)")
    ap.add_argument("--remove-finish", action="store_true",
                    help="with --remove: RemoveConfig(finish=True), a sparse pass on the distilled model for the "
                         "secrets it misses (the eighth round; forget's default since, this script's only with this "
                         "flag: the seventh round's runs had none)")
    ap.add_argument("--precondition", choices=("fisher",), default=None,
                    help="UpdateConfig(precondition=): the step on S scaled by the retained text's Fisher (the sixth "
                         "round; forget's default with focus since, this script's only with this flag)")
    ap.add_argument("--candidates", type=int, default=500)
    ap.add_argument("--train-steps", type=int, default=1200)
    ap.add_argument("--relearn-steps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--table", action="store_true", help="only write OUT/matrix.md from the saved runs")
    return ap


# the flags that run forget as shipped (shipped_settings; tests/test_bench_matrix.py checks that they agree)
SHIPPED_FLAGS = ("--strategies hessian_ratio --per-token --beta 0.25 --repair-steps 10 --polish-steps 50 --seq-len 0 "
                 "--project --focus --precondition fisher")


def main(argv=None):
    ap = parser()
    a = ap.parse_args(argv)
    if a.remove_finish and not a.remove:
        ap.error("--remove-finish applies to the removal stage: give --remove ALPHA:STEPS too")
    os.makedirs(a.out, exist_ok=True)
    torch.set_num_threads(a.threads)
    if a.steer_margin is not None:
        from sapsel_kernels.forgetting import forget as forget_module

        if not 0 < a.steer_margin <= 1:
            ap.error(f"--steer-margin must be in (0, 1], got {a.steer_margin}")

        forget_module.STEER_MARGIN = a.steer_margin
    if not a.table:
        for name in a.models.split(","):
            for seed in (int(s) for s in a.seeds.split(",")):
                run_fixture(name, seed, a)
    md = shipped(a.out) + "\nEvery run:\n\n" + table(a.out) + ppl_calibration(a.out)
    with open(os.path.join(a.out, "matrix.md"), "w") as f:
        f.write(md)
    figure(a.out, os.path.join(a.out, "matrix.png"))
    figure_shipped(a.out, os.path.join(a.out, "shipped.png"))
    print(md)


if __name__ == "__main__":
    main()
