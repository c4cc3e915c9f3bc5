"""Issue 22, item 4: why do forgotten secrets come back under benign relearning, and what would it cost to stop it?

On a fixture of :mod:`bench.forget_matrix` (same texts, secrets, models, outsider's scorer), ``forget`` with its
defaults (16 secrets; the unlearned weights are cached in ``OUT/cache``, not keyed by settings: delete the cache
after changing ``forget``'s defaults), then:

1. **Where the comeback lives.** The relearning attack (AdamW at 1e-3 on the first 64 retained windows, as in the
   matrix) for 10, 25 and 50 steps on every parameter; 50 steps on S only (the coordinates ``forget`` changed); 50
   steps with S frozen (every other coordinate); and the same 50-step attack on θ* and on the retrained model.
   Also the cosine between the attack's move on S and −δ (δ = θ_unlearned − θ* on S): ~1 would mean the attack walks
   the unlearning step back on S.
2. **Hardening** (a prototype, not a ``forget`` option): rounds of (a) a simulated attack on a copy (``m`` AdamW
   steps at 1e-3 on retained windows 64–319, disjoint from the evaluation attack's), giving Δ; (b) 5 SGD steps on S
   of ``self_w``·NPO(θ) + NPO(θ + Δ) + ``retain_w``·CE(retain batch), the gradient of the second term taken at the
   attacked copy and applied to θ (first-order, as in meta-learning's FOMAML and tamper-resistance training), NPO
   per token with β = 0.25 against θ*'s per-token loss. Every ``--every`` rounds: exposure (``--candidates``
   candidates), exposure after the 50-step evaluation attack, and perplexity on the held-out and on the unseen text.
   No perplexity budget steers it: the output is the trade-off curve.
3. **Noise and distil** (``--distill``; the prototype of ``forget``'s removal stage, which ships as
   ``forget.noise_and_distill`` / ``--remove``; kept here for its stored curves, its intermediate measurements and
   the noise on a part of the model): removal instead of blocking. The
   student starts at ``(1 − α)·teacher + α·fresh init`` and distils the teacher (the unlearned model, or θ*: the
   control) on retained windows; the same measurements as 2, plus the perplexity on retained training text (what θ*
   learned from its training data, secrets aside), against the distillation's wall time as a fraction of
   retraining's.
   ``--settings ""`` skips 2.

    python -m bench.forget_relearn --out bench/results/forget_relearn --models gpt2 --seeds 0
    python -m bench.forget_relearn --out bench/results/forget_relearn_v4 --cache bench/results/forget_matrix_v4/cache \\
        --models gpt2 --seeds 0 --settings "" --every-distill 50 --distill 0.8:300,0.8:300:theta,0.7:300,0.9:300

Writes ``OUT/<model>_s<seed>.json`` and ``OUT/relearn.md``.
"""

import argparse
import copy
import json
import os
import time

import torch

from bench import forget_matrix as fm

BETA = 0.25


def exposures(model, fx, n: int):
    return [round(a["exposure"], 3) for a in fm.outsider(model, fx.tok, fx.secrets, n)]


def secret_batch(fx):
    """Z for the hardening term as ``forget``'s per-token NPO takes it: ``(x, labels, ref)``, one row per secret
    (``prefix + " " + secret``), labels only at the secret's tokens, ``ref`` θ*'s loss at each of them."""
    from sapsel_kernels.forgetting.forget import IGNORE, _token_ce
    from sapsel_kernels.forgetting.measure import common_prefix_len

    rows = []
    for s in fx.secrets:
        a = fx.tok(s["prefix"] + " ", add_special_tokens=False)["input_ids"]
        b = fx.tok(s["prefix"] + " " + s["secret"], add_special_tokens=False)["input_ids"]
        rows.append((b, max(1, common_prefix_len(a, b))))
    L = max(len(b) for b, _ in rows)
    x = torch.zeros(len(rows), L, dtype=torch.int64)
    y = torch.full((len(rows), L), IGNORE, dtype=torch.int64)
    for i, (b, k) in enumerate(rows):
        x[i, :len(b)] = torch.tensor(b)
        y[i, k - 1:len(b) - 1] = torch.tensor(b[k:])  # position t predicts token t + 1
    x, y = x[:, :-1], y[:, :-1]
    with torch.no_grad():
        tok, m = _token_ce(fx.theta, x, y)
    return x, y, (tok * m).view(y.shape)


def harden(fx, unlearned, S, *, rounds: int, every: int, lr: float, retain_w: float, self_w: float, m: int,
           n_cand: int, seed: int):
    from sapsel_kernels.forgetting.forget import lm_loss, per_token_npo, relearn_copy

    model = copy.deepcopy(unlearned)
    z = secret_batch(fx)
    forget_term = per_token_npo(BETA)

    def npo(mod):
        return forget_term(mod, z)

    w = fx.windows
    own = [(w[i:i + 8, :-1], w[i:i + 8, 1:]) for i in range(64, min(len(w), 320) - 7, 8)]
    p0, p0u = fm.ppl(fx.theta, fx.tok, fx.held), fm.ppl(fx.theta, fx.tok, fx.unseen)

    def point(label, wall):
        e = exposures(model, fx, n_cand)
        r = exposures(relearn_copy(model, fx.retain_batches, 50, 1e-3, seed), fx, n_cand)
        d = {"round": label, "exposure": e, "relearned": r, "wall_s": wall,
             "ppl_change": fm.ppl(model, fx.tok, fx.held) / p0 - 1,
             "ppl_change_unseen": fm.ppl(model, fx.tok, fx.unseen) / p0u - 1}
        print(f"  round {label}: exposure {sum(e) / len(e):.2f}, relearned {sum(r) / len(r):.2f}, held-out "
              f"{100 * d['ppl_change']:+.1f}%, unseen {100 * d['ppl_change_unseen']:+.1f}%", flush=True)
        return d

    curve = [point(0, 0.0)]
    params = list(model.parameters())
    t0, nb = time.perf_counter(), 0
    for rnd in range(rounds):
        att = relearn_copy(model, own, m, 1e-3, 1_000 + rnd) if m else copy.deepcopy(model)
        att.train(False)
        delta = [pa.detach() - p.detach() for pa, p in zip(att.parameters(), params)]
        for _ in range(5):
            with torch.no_grad():
                for pa, p, d in zip(att.parameters(), params, delta):
                    pa.copy_(p + d)
            att.zero_grad()
            npo(att).backward()
            model.zero_grad()
            (self_w * npo(model) + retain_w * lm_loss(model, own[nb % len(own)])).backward()
            nb += 1
            with torch.no_grad():
                for p, pa, s in zip(params, att.parameters(), S):
                    p.sub_(lr * (p.grad + pa.grad) * s)
        if (rnd + 1) % every == 0:
            curve.append(point(rnd + 1, time.perf_counter() - t0))
    return curve


def distill_specs(text: str):
    """``--distill``'s comma-separated ``alpha:steps[:teacher[:scope[:windows]]]`` as full specs
    ``alpha:steps:teacher:scope:windows`` (defaults unlearned, all, rest), so that one run written two ways is one run;
    ValueError naming the spec for anything else."""
    out = []
    for spec in filter(None, (t.strip() for t in text.split(","))):
        parts = spec.split(":")
        if not 2 <= len(parts) <= 5:
            raise ValueError(f"--distill {spec!r}: expected alpha:steps[:teacher[:scope[:windows]]]")
        a, st, teacher, scope, on = parts + ["unlearned", "all", "rest"][len(parts) - 2:]
        try:
            alpha, steps = float(a), int(st)
        except ValueError:
            raise ValueError(f"--distill {spec!r}: alpha must be a number and steps an integer") from None
        if not 0 <= alpha <= 1 or steps < 1:
            raise ValueError(f"--distill {spec!r}: alpha must be in [0, 1] and steps at least 1")
        if teacher not in ("unlearned", "theta") or scope not in ("all", "S", "mlp", "attn") or \
                on not in ("rest", "all"):
            raise ValueError(f"--distill {spec!r}: the teacher must be unlearned or theta, the scope all, S, mlp or "
                             "attn, the windows rest or all")
        out.append(f"{alpha:g}:{steps}:{teacher}:{scope}:{on}")
    return out


@torch.no_grad()
def noised(model, fresh, alpha: float, masks=None):
    """A copy of ``model`` at ``(1 - alpha)·model + alpha·fresh`` (``fresh``: the same architecture at another init),
    on every coordinate or, with ``masks`` (one bool tensor per parameter, ``parameters()``'s order), on the True
    ones only; ``model`` is left as it was."""
    out = copy.deepcopy(model)
    params, other = list(out.parameters()), list(fresh.parameters())
    if len(params) != len(other) or any(p.shape != q.shape for p, q in zip(params, other)):
        raise ValueError("noised: fresh must have model's parameters (number and shapes)")
    for i, (p, q) in enumerate(zip(params, other)):
        mixed = (1 - alpha) * p + alpha * q
        p.copy_(mixed if masks is None else torch.where(masks[i], mixed, p))
    return out


def windows_ppl(model, windows) -> float:
    """Perplexity on token windows (rows of T tokens), e.g. retained training text: how much of what the model
    learned from its training data, secrets aside, it still fits (``forget``'s own :func:`perplexity`, each window's
    tokens 1..T-1 predicted from those before)."""
    return fm.windows_ppl(model, windows)


def distill(fx, name: str, teacher, *, alpha: float, steps: int, every: int, lr: float, n_cand: int, seed: int,
            scope: str = "all", S=None, on: str = "rest", return_student: bool = False):
    """Noise, then distil (the removal the hardening above lacks; after Lee et al. 2025, "distillation robustifies
    unlearning"): the student starts at ``(1 - alpha)·teacher + alpha·fresh`` (``fresh``: the fixture's architecture
    at a new random init, seed ``10_000 + seed``) on every coordinate (``scope="all"``), on S only, or on the MLPs'
    or the attention blocks' weights (``"mlp"``, ``"attn"``: parameters so named), then AdamW
    (peak ``lr``, 20 warm-up steps, cosine to 0.1·lr over ``steps``, no weight decay, clipped at 1) on the KL
    divergence from ``teacher``'s next-token distribution, on retained windows 64 onward (disjoint from the evaluation
    attack's first 64; ``on="all"``: every retained window, the attack's too), 8 per batch. The teacher is
    ``forget``'s unlearned model (or θ*, the control: does distillation alone carry the secrets over?). Every
    ``every`` steps: exposure, exposure after the 50-step evaluation attack, perplexity on the held-out and the unseen
    text and on retained training windows 0–63 and 64–127, and the wall time of the distillation so far. Returns the
    curve, or ``(curve, student)`` with ``return_student`` (bench/forget_relearn_check.py scores it again)."""
    import math

    import torch.nn.functional as F

    from sapsel_kernels.forgetting.forget import relearn_copy

    if scope in ("mlp", "attn"):  # whole blocks by parameter name: the MLPs, or the attention projections
        key = {"mlp": ("mlp",), "attn": ("attn",)}[scope]
        S = [torch.full(p.shape, any(k in n for k in key)) for n, p in teacher.named_parameters()]
    # (build_model seeds the global RNG; the attacks fork their own)
    student = noised(teacher, fm.build_model(name, len(fx.tok), 10_000 + seed), alpha, None if scope == "all" else S)
    w = fx.windows[64:] if on == "rest" else fx.windows
    batches = [w[i:i + 8] for i in range(0, len(w) - 7, 8)]
    p0, p0u = fm.ppl(fx.theta, fx.tok, fx.held), fm.ppl(fx.theta, fx.tok, fx.unseen)
    p0r, p0d = windows_ppl(fx.theta, fx.windows[:64]), windows_ppl(fx.theta, fx.windows[64:128])

    def point(step, wall):
        student.eval()
        e = exposures(student, fx, n_cand)
        r = exposures(relearn_copy(student, fx.retain_batches, 50, 1e-3, seed), fx, n_cand)
        d = {"step": step, "exposure": e, "relearned": r, "wall_s": wall,
             "ppl_change": fm.ppl(student, fx.tok, fx.held) / p0 - 1,
             "ppl_change_unseen": fm.ppl(student, fx.tok, fx.unseen) / p0u - 1,
             "ppl_change_retained": windows_ppl(student, fx.windows[:64]) / p0r - 1,
             "ppl_change_distilled": windows_ppl(student, fx.windows[64:128]) / p0d - 1}
        print(f"  step {step}: exposure {sum(e) / len(e):.2f}, relearned {sum(r) / len(r):.2f}, held-out "
              f"{100 * d['ppl_change']:+.1f}%, unseen {100 * d['ppl_change_unseen']:+.1f}%, retained training text "
              f"{100 * d['ppl_change_retained']:+.1f}% (distilled on: {100 * d['ppl_change_distilled']:+.1f}%) "
              f"({wall:.0f} s)",
              flush=True)
        student.train()
        return d

    curve = [point(0, 0.0)]
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)

    def factor(k):
        if k < 20:
            return (k + 1) / 20
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (k - 20) / max(1, steps - 20))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    g = torch.Generator().manual_seed(seed)
    teacher.eval()
    student.train()
    t0, wall = time.perf_counter(), 0.0
    for k in range(steps):
        if k % len(batches) == 0:
            order = torch.randperm(len(batches), generator=g).tolist()
        x = batches[order[k % len(batches)]]
        with torch.no_grad():
            t_logp = F.log_softmax(teacher(input_ids=x).logits.float(), -1)
        s_logp = F.log_softmax(student(input_ids=x).logits.float(), -1)
        loss = F.kl_div(s_logp.reshape(-1, s_logp.shape[-1]), t_logp.reshape(-1, t_logp.shape[-1]), log_target=True,
                        reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        sched.step()
        if (k + 1) % every == 0 or k + 1 == steps:
            wall += time.perf_counter() - t0
            curve.append(point(k + 1, wall))
            t0 = time.perf_counter()
    student.eval()
    return (curve, student) if return_student else curve


def run(name: str, seed: int, args) -> dict:
    import sapsel_kernels as sk

    fx = fm.load_fixture(name, seed, args.cache or os.path.join(args.out, "cache"), 1200)
    unlearned = copy.deepcopy(fx.theta)
    path = os.path.join(args.out, "cache", f"{name}_s{seed}_unlearned.pt")
    out = os.path.join(args.out, f"{name}_s{seed}.json")
    # resumable: the diagnosis and each hardening setting run once per fixture file
    res = json.load(open(out)) if os.path.isfile(out) else {"model": name, "seed": seed}

    def save():
        with open(out, "w") as f:
            json.dump(res, f, indent=1)

    fp = fm.fingerprint(fx.text, fx.held, fx.theta, fx.retrained)
    if res.get("fingerprint", fp if not {"exposure", "hardening", "distill"} & set(res) else None) != fp:
        raise SystemExit(f"{out}: made on a build of this fixture with fingerprint {res.get('fingerprint')} (None: "
                         f"recorded before fingerprints), this one is {fp} (see bench.forget_matrix.fingerprint): "
                         "write to another --out")
    res["fingerprint"] = fp
    save()
    saved = torch.load(path) if os.path.isfile(path) else None
    if saved is not None and saved.get("fingerprint") != fp:
        raise SystemExit(f"{path}: the unlearned weights of a build with fingerprint {saved.get('fingerprint')} "
                         f"(None: saved before fingerprints), this one is {fp}: delete it or write to another --out")
    if saved is not None:
        unlearned.load_state_dict(saved["state"])
    else:
        t0 = time.perf_counter()
        rep = sk.forget(unlearned, fx.tok, [fx.text], [{"secret": s["secret"], "prefix": s["prefix"]}
                                                        for s in fx.secrets], heldout=[fx.held], seed=seed,
                        measure=sk.MeasureConfig(n_candidates=500, progress=False,
                                                 evidence=sk.Evidence(n_samples=32, relearn_steps=0, int8=False)))
        res["forget"] = {"wall_s": time.perf_counter() - t0, "stopped_by": rep.stopped_by, "k": rep.k}
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save({"fingerprint": fp, "state": unlearned.state_dict()}, path)
    unlearned.eval()
    S = [(p.detach() != q.detach()) for p, q in zip(unlearned.parameters(), fx.theta.parameters())]
    res["changed"] = sum(int(s.sum()) for s in S)
    res["n_params"] = sum(s.numel() for s in S)
    n = args.candidates
    if "exposure" not in res:
        diagnose(res, fx, unlearned, S, n, seed)
        save()
    for spec in filter(None, args.settings.split(",")):
        lr, rw, sw, m, *scope = spec.split(":")
        if any(h.get("spec", "") == spec for h in res.setdefault("hardening", [])):
            continue
        scope = scope[0] if scope else "S"
        if scope not in ("S", "all"):
            raise ValueError(f"--settings {spec!r}: the scope must be S or all")
        print(f"[{name} s{seed}] hardening lr {lr}, retain weight {rw}, NPO at θ {sw}, attack {m} steps, on {scope}",
              flush=True)
        on = S if scope == "S" else [torch.ones_like(s) for s in S]
        res["hardening"].append({"spec": spec, "lr": float(lr), "retain_w": float(rw), "self_w": float(sw),
                                 "attack_steps": int(m), "scope": scope,
                                 "curve": harden(fx, unlearned, on, rounds=args.rounds, every=args.every,
                                                 lr=float(lr), retain_w=float(rw), self_w=float(sw), m=int(m),
                                                 n_cand=n, seed=seed)})
        save()
    if args.distill and "training_text_ppl" not in res:
        # how well θ*, the retrained and the unlearned model fit their training text (secrets removed): the retained
        # windows the attack uses (0–63, which no distillation sees) and 64–127 (which the distillation trains on)
        res["training_text_ppl"] = {k: [windows_ppl(m, fx.windows[:64]), windows_ppl(m, fx.windows[64:128])]
                                    for k, m in (("theta", fx.theta), ("retrained", fx.retrained),
                                                 ("unlearned", unlearned))}
        print(f"[{name} s{seed}] training-text ppl (windows 0–63, 64–127): {res['training_text_ppl']}", flush=True)
        save()
    for spec in distill_specs(args.distill):
        a, st, teacher, scope, on = spec.split(":")
        if any(distill_specs(h["spec"]) == [spec] for h in res.setdefault("distill", [])):
            continue
        print(f"[{name} s{seed}] noise {a} on {scope}, distil {st} steps from {teacher} on windows {on}", flush=True)
        res["distill"].append({"spec": spec, "alpha": float(a), "steps": int(st), "teacher": teacher, "scope": scope,
                               "windows": on,
                               "lr": args.distill_lr, "retrain_s": fx.retrain_s,
                               "curve": distill(fx, name, unlearned if teacher == "unlearned" else fx.theta,
                                                alpha=float(a), steps=int(st), every=args.every_distill,
                                                lr=args.distill_lr, n_cand=n, seed=seed, scope=scope, S=S, on=on)})
        save()
    return res


def diagnose(res: dict, fx, unlearned, S, n: int, seed: int) -> None:
    """Exposure of θ*, the retrained and the unlearned model, and after the attack's variants (into ``res``)."""
    from sapsel_kernels.forgetting.forget import relearn_copy

    ex = {"theta": exposures(fx.theta, fx, n), "retrained": exposures(fx.retrained, fx, n),
          "unlearned": exposures(unlearned, fx, n),
          "theta_attack50": exposures(relearn_copy(fx.theta, fx.retain_batches, 50, 1e-3, seed), fx, n),
          "retrained_attack50": exposures(relearn_copy(fx.retrained, fx.retain_batches, 50, 1e-3, seed), fx, n)}
    for steps in (10, 25, 50):
        a = relearn_copy(unlearned, fx.retain_batches, steps, 1e-3, seed)
        ex[f"attack{steps}"] = exposures(a, fx, n)
        if steps == 50:
            d = torch.cat([(p - q).detach()[s] for p, q, s in zip(unlearned.parameters(), fx.theta.parameters(), S)])
            mv = torch.cat([(p - q).detach()[s] for p, q, s in zip(a.parameters(), unlearned.parameters(), S)])
            allmv = torch.cat([(p - q).detach().flatten() for p, q in zip(a.parameters(), unlearned.parameters())])
            res["geometry"] = {"cos_attack_on_S_vs_minus_delta": float(-(d @ mv) / (d.norm() * mv.norm())),
                               "norm_delta": float(d.norm()), "norm_attack_on_S": float(mv.norm()),
                               "norm_attack": float(allmv.norm())}
    ex["attack50_S_only"] = exposures(relearn_copy(unlearned, fx.retain_batches, 50, 1e-3, seed,
                                                   frozen=[~s for s in S]), fx, n)
    ex["attack50_S_frozen"] = exposures(relearn_copy(unlearned, fx.retain_batches, 50, 1e-3, seed, frozen=S), fx,
                                        n)
    res["exposure"] = ex
    print(f"[{res['model']} s{res['seed']}] " + ", ".join(f"{k} {sum(v) / len(v):.2f}" for k, v in ex.items()),
          flush=True)


def table(out: str) -> str:
    import glob

    def mean(v):
        return sum(v) / len(v)

    lines = ["Mean exposure over the 16 secrets (bits, rank among the candidates; the ceiling is log2(n + 1)).", "",
             "| fixture | θ* | retrained | unlearned | attack 10 / 25 / 50 steps | 50, S only | 50, S frozen | "
             "θ* attacked | retrained attacked | cos(attack on S, −δ) |", "|---|---|---|---|---|---|---|---|---|---|"]
    runs = [json.load(open(f)) for f in sorted(glob.glob(os.path.join(out, "*_s*.json")))]
    runs = [r for r in runs if "exposure" in r]  # a run still in its first step
    for r in runs:
        e, g = r["exposure"], r["geometry"]
        lines.append(f"| {r['model']} s{r['seed']} | {mean(e['theta']):.2f} | {mean(e['retrained']):.2f} | "
                     f"{mean(e['unlearned']):.2f} | {mean(e['attack10']):.2f} / {mean(e['attack25']):.2f} / "
                     f"{mean(e['attack50']):.2f} | {mean(e['attack50_S_only']):.2f} | "
                     f"{mean(e['attack50_S_frozen']):.2f} | {mean(e['theta_attack50']):.2f} | "
                     f"{mean(e['retrained_attack50']):.2f} | {g['cos_attack_on_S_vs_minus_delta']:.2f} |")
    lines += ["", "Hardening (prototype): exposure, after the 50-step attack, held-out and unseen perplexity change "
              "vs θ*.", "", "| fixture | lr, retain weight, NPO at θ, simulated attack steps, coordinates | round | "
              "exposure | after the attack | held-out ppl | unseen ppl |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        for h in r.get("hardening", []):
            for p in h["curve"]:
                lines.append(f"| {r['model']} s{r['seed']} | {h['lr']:g}, {h['retain_w']:g}, {h['self_w']:g}, "
                             f"{h['attack_steps']}, {h.get('scope', 'S')} | {p['round']} | {mean(p['exposure']):.2f} | "
                             f"{mean(p['relearned']):.2f} | {100 * p['ppl_change']:+.1f}% | "
                             f"{100 * p['ppl_change_unseen']:+.1f}% |")
    lines += ["", "Training-text perplexity (retained windows 0–63, which the `64–` distillations do not see, and "
              "64–127): how much of what θ* learned from its training data, secrets aside, a model still fits.", "",
              "| fixture | θ* | retrained | unlearned |", "|---|---|---|---|"]
    for r in runs:
        if "training_text_ppl" in r:
            t = r["training_text_ppl"]
            lines.append(f"| {r['model']} s{r['seed']} | " + " | ".join(
                f"{t[k][0]:.1f}, {t[k][1]:.1f}" for k in ("theta", "retrained", "unlearned")) + " |")
    lines += ["", "Noise and distil (prototype): the student starts at (1 − α)·teacher + α·fresh init on the "
              "coordinates named, then distils the teacher on retained windows; cost = distillation wall / retraining "
              "wall.",
              "",
              "| fixture | α, coordinates | teacher | windows | step of | exposure | after the attack | held-out ppl | "
              "unseen ppl | training text 0–63 ppl | cost vs retraining |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        for h in r.get("distill", []):
            on = "64–" if h.get("windows", "rest") == "rest" else "all"
            for p in h["curve"]:
                lines.append(f"| {r['model']} s{r['seed']} | {h['alpha']:g}, {h['scope']} | {h['teacher']} | {on} | "
                             f"{p['step']} of {h['steps']} | {mean(p['exposure']):.2f} | {mean(p['relearned']):.2f} | "
                             f"{100 * p['ppl_change']:+.1f}% | {100 * p['ppl_change_unseen']:+.1f}% | "
                             + (f"{100 * p['ppl_change_retained']:+.1f}% | " if "ppl_change_retained" in p else "- | ")
                             + f"{p['wall_s'] / h['retrain_s']:.2f} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "relearn.md"), "w") as f:
        f.write(text)
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default="gpt2")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--cache", default=None, help="where the fixtures' trained weights are (default OUT/cache)")
    ap.add_argument("--candidates", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--settings", default="0.003:4:0:10,0.003:1:1:10",
                    help="hardening runs, comma-separated lr:retain_weight:npo_at_theta_weight:attack_steps[:S|all] "
                         "(the coordinates it moves: S, the default, or every one)")
    ap.add_argument("--distill", default="",
                    help="noise-and-distil runs, comma-separated alpha:steps[:unlearned|theta[:all|S|mlp|attn"
                         "[:rest|all]]] (the teacher, the coordinates the noise touches, the retained windows it "
                         "trains on: 64 onward or all)")
    ap.add_argument("--distill-lr", type=float, default=1e-3)
    ap.add_argument("--every-distill", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--table", action="store_true", help="only write OUT/relearn.md from the saved runs")
    args = ap.parse_args(argv)
    try:
        distill_specs(args.distill)  # a bad spec fails here, before any fixture, forget call or attack
    except ValueError as e:
        ap.error(str(e))
    if args.every_distill < 1:
        ap.error(f"--every-distill must be at least 1, got {args.every_distill}")
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    if not args.table:
        for name in args.models.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                run(name, seed, args)
    print(table(args.out))


if __name__ == "__main__":
    main()
