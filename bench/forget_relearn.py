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

    python -m bench.forget_relearn --out bench/results/forget_relearn --models gpt2 --seeds 0

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

    if os.path.isfile(path):
        unlearned.load_state_dict(torch.load(path))
    else:
        t0 = time.perf_counter()
        rep = sk.forget(unlearned, fx.tok, [fx.text], [{"secret": s["secret"], "prefix": s["prefix"]}
                                                        for s in fx.secrets], heldout=[fx.held], seed=seed,
                        measure=sk.MeasureConfig(n_candidates=500, progress=False,
                                                 evidence=sk.Evidence(n_samples=32, relearn_steps=0, int8=False)))
        res["forget"] = {"wall_s": time.perf_counter() - t0, "stopped_by": rep.stopped_by, "k": rep.k}
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(unlearned.state_dict(), path)
    unlearned.eval()
    S = [(p.detach() != q.detach()) for p, q in zip(unlearned.parameters(), fx.theta.parameters())]
    res["changed"] = sum(int(s.sum()) for s in S)
    res["n_params"] = sum(s.numel() for s in S)
    n = args.candidates
    if "exposure" not in res:
        diagnose(res, fx, unlearned, S, n, seed)
        save()
    for spec in args.settings.split(","):
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
        for h in r["hardening"]:
            for p in h["curve"]:
                lines.append(f"| {r['model']} s{r['seed']} | {h['lr']:g}, {h['retain_w']:g}, {h['self_w']:g}, "
                             f"{h['attack_steps']}, {h.get('scope', 'S')} | {p['round']} | {mean(p['exposure']):.2f} | "
                             f"{mean(p['relearned']):.2f} | {100 * p['ppl_change']:+.1f}% | "
                             f"{100 * p['ppl_change_unseen']:+.1f}% |")
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
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--table", action="store_true", help="only write OUT/relearn.md from the saved runs")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    if not args.table:
        for name in args.models.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                run(name, seed, args)
    print(table(args.out))


if __name__ == "__main__":
    main()
