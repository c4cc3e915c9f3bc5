"""Issue 11 measurement: ``forget`` on the canary demo's character LSTM (the setting of docs/canary.md), with the
retrained model as the gold standard and every strategy at equal budget.

    python bench/forget_canary.py --setting lstm:r4 --budgets 0.01,0.1 --out bench/results/forget_canary_lstm_r4

Trains θ* and the gold model exactly as ``sapsel demo --task canary`` does (same corpus, seed, steps), then for each
strategy x budget runs ``sapsel_kernels.forget`` on a copy of θ* (target 2 bits, +5% validation perplexity budget)
and measures exposure on the same 1000 candidates for θ*, gold and every result; relearning: fine-tunes the
forgotten model and the gold model on the original secret windows (AdamW, the training lr) and counts the steps until
exposure is back within 2 bits of θ*'s. Writes forget_canary.json and forget_canary.md.
"""

import argparse
import copy
import json
import os
import sys
import time

import torch

from sapsel_kernels import measure
from sapsel_kernels.demo import canary, lm
from sapsel_kernels.exposure import random_candidates
from sapsel_kernels.forget import (MeasureConfig, SelectConfig, TargetConfig, UpdateConfig, build_forget_data, forget,
                                    lm_loss, perplexity)
from sapsel_kernels.rules import Targeted


class _Logits(torch.nn.Module):
    """A Hugging Face causal LM seen as ``ids -> logits`` (for the demo's training loop); shares its parameters."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(x, use_cache=False).logits


def prepare_gpt2(r: int, steps: int, seed: int, seq_len: int = 64):
    """A Hugging Face GPT-2 (2 layers, d = 64, a 512-token byte-level BPE trained on the CLEAN text: a tokenizer
    trained with the secret would make the secret itself a few tokens and inflate exposure) trained from config on
    the canary corpus with the card number r times; gold = the same initialisation and batch order on the clean text."""
    import tokenizers
    import transformers

    train, held = lm.load_corpus(150_000)
    cc = lm.insert_canary(train, held, r, seed=seed)
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.train_from_iterator([cc.clean_text], tokenizers.trainers.BpeTrainer(
        vocab_size=512, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok)
    cfg = transformers.GPT2Config(vocab_size=fast.vocab_size, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                                  bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)

    def windows(text):
        ids = torch.tensor(fast(text, add_special_tokens=False)["input_ids"])
        return lm.make_windows(ids, lm.window_starts(len(ids), seq_len, seq_len // 2), seq_len)

    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(cfg)
    init = copy.deepcopy(model.state_dict())
    t0 = time.perf_counter()
    lm.train_lm(_Logits(model), *windows(cc.text), steps=steps, batch_size=32, lr=2e-3, seed=seed)
    train_s = time.perf_counter() - t0
    gold = transformers.GPT2LMHeadModel(cfg)
    gold.load_state_dict(init)
    lm.train_lm(_Logits(gold), *windows(cc.clean_text), steps=steps, batch_size=32, lr=2e-3, seed=seed)
    hid = fast(held, add_special_tokens=False)["input_ids"]
    half = len(hid) // 2
    t = torch.tensor(hid[half:])
    test = lm.make_windows(t, lm.window_starts(len(t), seq_len, seq_len), seq_len)
    return {"model": model.eval(), "gold": gold.eval(), "tokenizer": fast, "cc": cc, "test": test,
            "train_s": train_s, "seq_len": seq_len, "lr": 2e-3, "heldout": fast.decode(hid[:half]),
            "n_params": sum(p.numel() for p in model.parameters())}


def prepare_char(setting: str, steps: int, seed: int):
    task = canary.CanaryTask([setting], steps=steps, n_candidates=1000)
    setup = task.prepare(seed, setting)
    cc = setup.extra["corpus"]
    return {"model": setup.model, "gold": setup.gold, "tokenizer": cc.vocab, "cc": cc, "test": setup.extra["test"],
            "train_s": setup.extra["train_s"], "seq_len": task.seq_len,
            "lr": canary.MODEL_CFG[setting.split(":")[0]]["lr"],
            # the demo's validation half; its test half is only reported
            "heldout": cc.heldout[:len(cc.heldout) // 2], "n_params": setup.extra["n_params"]}


RELEARN_MAX = 60  # relearning steps at most (None in the results: not back within them)


def relearn_steps(model, tokenizer, x, y, cands, cc, target, lr, max_steps=RELEARN_MAX, every=5):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    for step in range(0, max_steps + 1, every):
        m = measure.measure_secret(model, tokenizer, cc.prefix, cc.secret, candidates=cands, context="\n",
                                   extraction=False)
        if m["exposure"] >= target:
            return step, m["exposure"]
        for _ in range(every):
            idx = torch.randint(0, len(x), (min(32, len(x)),), generator=g)
            loss = lm_loss(model, (x[idx], y[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
    return None, m["exposure"]


def _method(run):
    """The update rule's label for a saved run: its validation budget and repair steps (from its argv)."""
    argv = run.get("argv", [])

    def opt(name, default):
        return argv[argv.index(name) + 1] if name in argv else default

    rep, val = int(opt("--repair-steps", 0)), float(opt("--max-ppl-increase", 0.05))
    return f"targeted, {100 * val:g}% val" + (f", {rep} repair steps, {opt('--max-steps', 300)} steps" if rep else "")


def render(dirs, path):
    """From saved runs: one trade-off figure at ``path`` (exposure after vs test-perplexity change, a panel per
    setting, a panel row per update rule; the runs of one cell with different seeds averaged, mean ± std, and the
    number of seeds written on the figure) and ``forget_canary_summary.md`` beside it (per cell: mean ± std over
    seeds of exposure and test-perplexity change, how many seeds meet every target, cost and relearning)."""
    from sapsel_kernels.demo.plots import plot_tradeoff

    cells, levels = {}, {}
    for d in dirs:
        with open(os.path.join(d, "forget_canary.json")) as f:
            run = json.load(f)
        s, m = run["setting"], _method(run)
        levels.setdefault(s, {}).setdefault(run["seed"], run)
        for r in run["rows"]:
            cells.setdefault((s, m, r["strategy"], r["budget"]), {})[run["seed"]] = r

    def mean_std(xs):
        t = torch.tensor([float(x) for x in xs], dtype=torch.float64)
        return float(t.mean()), (float(t.std()) if len(xs) > 1 else 0.0)

    points = []
    for (s, m, strategy, budget), by_seed in cells.items():
        (em, es), (pm, ps) = (mean_std([r[key] for r in by_seed.values()])
                              for key in ("exposure_after", "test_ppl_change_pct"))
        points.append({"setting": s, "strategy": strategy, "budget": budget, "method": m, "exposure": em,
                       "exposure_std": es, "ppl_change_pct": pm, "ppl_change_std": ps})
    before = {s: mean_std([r["before"]["exposure"] for r in lv.values()]) for s, lv in levels.items()}
    gold = {s: mean_std([r["gold"]["exposure"] for r in lv.values()]) for s, lv in levels.items()}
    n = sorted({len(v) for v in cells.values()})
    plot_tradeoff(points, path, before=before, gold=gold, n_seeds=max(n), x_limit=5.0, gold_margin=2.0,
                  title="forget(): target 2 bits" + ("" if len(n) == 1 else f" ({n[0]}-{n[-1]} seeds per point)"))

    def pm_(xs, fmt):
        mu, sd = mean_std(xs)
        return format(mu, fmt) + (f" ± {format(sd, fmt.lstrip('+'))}" if len(xs) > 1 else "")

    def relearn(xs):  # None: not back within RELEARN_MAX steps (counted as that many, marked >=)
        v = pm_([RELEARN_MAX if x is None else x for x in xs], ".0f")
        return (">=" + v) if None in xs else v

    lines = ["# forget on the canary demo: every run, averaged over seeds", "",
             "Mean ± std over the seeds listed; 'meets' counts the seeds where exposure <= that seed's gold + 2 bits, "
             "no probe extracts and the test-perplexity change is <= 5%. Commands: each run's forget_canary.md.", ""]
    for s, lv in levels.items():
        lines.append(f"- {s}: seeds {sorted(lv)}; θ* {pm_([r['before']['exposure'] for r in lv.values()], '.1f')} "
                     f"bits, gold {pm_([r['gold']['exposure'] for r in lv.values()], '.1f')} bits; relearning the "
                     f"gold model: {relearn([r['gold_relearn_steps'] for r in lv.values()])} steps")
    lines += ["", "| setting | rule | strategy | budget | seeds | exposure after | test ppl % | meets | steps | "
              "x retrain time | relearn steps |", "|" + "---|" * 11]
    for (s, m, strategy, budget), by_seed in sorted(cells.items(), key=lambda kv: kv[0][:2]):
        rs = list(by_seed.values())
        lines.append(f"| {s} | {m} | {strategy} | {budget:g} | {len(rs)} | "
                     f"{pm_([r['exposure_after'] for r in rs], '.1f')} | "
                     f"{pm_([r['test_ppl_change_pct'] for r in rs], '+.1f')} | "
                     f"{sum(bool(r['meets_targets']) for r in rs)}/{len(rs)} | "
                     f"{pm_([r['steps'] for r in rs], '.0f')} | "
                     f"{pm_([r['cost_vs_retrain'] for r in rs], '.2f')} | "
                     f"{relearn([r['relearn_steps'] for r in rs])} |")
    with open(os.path.join(os.path.dirname(path) or ".", "forget_canary_summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--render", nargs="+", default=None, help="only draw --out/forget_canary.png from these run dirs")
    p.add_argument("--setting", default="lstm:r4")
    p.add_argument("--strategies", default="hessian,random,last_layer,grad_abs,all")
    p.add_argument("--budgets", default="0.01,0.1")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--objective", default="npo", choices=("npo", "uniform"), help="UpdateConfig(objective=...)")
    p.add_argument("--max-ppl-increase", type=float, default=0.05, help="TargetConfig(max_ppl_increase=...)")
    p.add_argument("--decoys", type=int, default=0, help="UpdateConfig(decoys=...) (objective uniform)")
    p.add_argument("--correct-weight", type=float, default=1.0, help="the Targeted rule's weight of L(Z̃)")
    p.add_argument("--rho", type=float, default=0.0, help="the Targeted rule's SAM radius on S (0: no SAM)")
    p.add_argument("--repair-steps", type=int, default=0, help="Targeted(repair_steps=...)")
    p.add_argument("--cache", default=None, help="a file for the trained θ* and gold models (reused when present)")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    if a.render:
        render(a.render, os.path.join(a.out, "forget_canary.png"))
        return
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    if a.cache and os.path.exists(a.cache):
        prep = torch.load(a.cache, weights_only=False)  # our own file, written below
    else:
        prep = (prepare_gpt2(int(a.setting.split(":r")[1]), a.steps, a.seed) if a.setting.startswith("gpt2")
                else prepare_char(a.setting, a.steps, a.seed))
        if a.cache:
            torch.save(prep, a.cache)
    train_s, cc, tok, T = prep["train_s"], prep["cc"], prep["tokenizer"], prep["seq_len"]
    cands = random_candidates(1000, measure.format_of(cc.secret), seed=50_000 + a.seed,
                              exclude=[cc.secret, cc.replacement])
    held = prep["heldout"]

    def exposure(model):
        return measure.measure_secret(model, tok, cc.prefix, cc.secret, candidates=cands, context="\n")

    before, gold = exposure(prep["model"]), exposure(prep["gold"])
    test = prep["test"]
    ppl0, ppl_gold = perplexity(prep["model"], test), perplexity(prep["gold"], test)
    print(f"prepared in {time.perf_counter() - t0:.0f} s ({prep['n_params']} parameters): before "
          f"{before['exposure']:.1f} bits, gold {gold['exposure']:.1f} bits, test ppl {ppl0:.3f} / gold "
          f"{ppl_gold:.3f}", flush=True)
    za = build_forget_data(tok, [cc.text], cc.secret, cc.replacement, seq_len=T, heldout=[held]).affected
    lr = prep["lr"]
    gold_relearn = relearn_steps(copy.deepcopy(prep["gold"]), tok, za[0], za[1], cands, cc, before["exposure"] - 2,
                                 lr)
    rows = []
    scores = {}
    for strategy in a.strategies.split(","):
        for budget in [float(b) for b in a.budgets.split(",")]:
            if strategy == "all" and budget != 1.0 and rows and any(r["strategy"] == "all" for r in rows):
                continue
            model = copy.deepcopy(prep["model"])
            t1 = time.perf_counter()
            rule = Targeted(steps=a.max_steps, lr=0.1, check_every=5, lr_max=100.0, correct_weight=a.correct_weight,
                            rho=a.rho, repair_steps=a.repair_steps)
            rep = forget(model, tok, cc.text,
                         {"secret": cc.secret, "prefix": cc.prefix, "replacement": cc.replacement},
                         heldout=[held], seed=a.seed,
                         select=SelectConfig(strategy=strategy, budget=1.0 if strategy == "all" else budget,
                                             scores=scores.get(strategy)),
                         # focus and the Fisher step pinned off: the settings its stored results were measured with
                         update=UpdateConfig(objective=a.objective, rule=rule, seq_len=T, decoys=a.decoys,
                                             focus=False, precondition=None),
                         target=TargetConfig(max_ppl_increase=a.max_ppl_increase),
                         measure=MeasureConfig(context="\n", progress=False))
            wall = time.perf_counter() - t1
            if rep.scores is not None:
                scores[strategy] = rep.scores
            after = exposure(model)
            rl = relearn_steps(copy.deepcopy(model), tok, za[0], za[1], cands, cc, before["exposure"] - 2, lr)
            row = {"strategy": strategy, "budget": 1.0 if strategy == "all" else budget, "k": rep.k,
                   "exposure_after": after["exposure"], "exposure_rank_after": after["exposure_rank"],
                   "extracted_after": bool(after["extracted"]), "test_ppl_change_pct": 100 * (
                       perplexity(model, test) / ppl0 - 1), "reached": rep.reached, "stopped_by": rep.stopped_by,
                   "steps": rep.cost["steps"], "wall_s": wall, "n_gradients": rep.cost["n_gradients"],
                   "n_hvps": rep.cost["n_hvps"], "relearn_steps": rl[0], "relearn_exposure": rl[1],
                   "cost_vs_retrain": wall / train_s}
            row["meets_targets"] = (row["exposure_after"] <= gold["exposure"] + 2 and not row["extracted_after"]
                                    and row["test_ppl_change_pct"] <= 5)
            print(json.dumps(row), flush=True)
            row["history"] = [dict(h) for h in rep.history]  # one entry per check: where repairs succeed or not
            rows.append(row)
            write(a, prep, before, gold, ppl0, ppl_gold, gold_relearn, train_s, rows)  # after every row


def write(a, prep, before, gold, ppl0, ppl_gold, gold_relearn, train_s, rows):
    """forget_canary.json (rows with their search history) and forget_canary.md, rewritten after every row."""
    payload = {"setting": a.setting, "seed": a.seed, "n_params": prep["n_params"], "train_steps": a.steps,
               "train_s": train_s,
               "before": {k: before[k] for k in ("exposure", "exposure_rank", "extracted")},
               "gold": {k: gold[k] for k in ("exposure", "exposure_rank", "extracted")},
               "test_ppl_before": ppl0, "test_ppl_gold": ppl_gold, "gold_relearn_steps": gold_relearn[0],
               "rows": rows, "argv": sys.argv[1:], "torch_threads": 1,
               "machine": "project CPU machine (2 cores, shared), torch " + torch.__version__}
    with open(os.path.join(a.out, "forget_canary.json"), "w") as f:
        json.dump(payload, f, indent=1)
    lines = [f"# forget on the canary demo ({a.setting}, seed {a.seed})", "",
             f"θ*: exposure {before['exposure']:.1f} bits, test ppl {ppl0:.3f}; retrained (gold): "
             f"{gold['exposure']:.1f} bits, test ppl {ppl_gold:.3f}; relearning the gold model to within 2 bits of "
             f"θ*: {gold_relearn[0]} steps. Targets: exposure <= gold + 2 = {gold['exposure'] + 2:.1f}, no extraction,"
             " test ppl change <= 5%.", "",
             "| strategy | budget | k | exposure after | extracted | test ppl % | steps | stopped by | time s | "
             "x retrain time | relearn steps | meets targets |", "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['strategy']} | {r['budget']:g} | {r['k']} | {r['exposure_after']:.1f} | "
                     f"{r['extracted_after']} | {r['test_ppl_change_pct']:+.2f} | {r['steps']} | {r['stopped_by']} | "
                     f"{r['wall_s']:.1f} | {r['cost_vs_retrain']:.2f} | {r['relearn_steps']} | {r['meets_targets']} |")
    lines += ["", f"Command: `python bench/forget_canary.py {' '.join(sys.argv[1:])}`"]
    with open(os.path.join(a.out, "forget_canary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
