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
from sapsel_kernels.forget import forget, perplexity


def relearn_steps(model, x, y, cands, cc, target, lr, max_steps=60, every=5):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    for step in range(0, max_steps + 1, every):
        m = measure.measure_secret(model, cc.vocab, cc.prefix, cc.secret, candidates=cands, context="\n",
                                   extraction=False)
        if m["exposure"] >= target:
            return step, m["exposure"]
        for _ in range(every):
            idx = torch.randint(0, len(x), (min(32, len(x)),), generator=g)
            model.train()
            loss = lm.lm_loss(model, (x[idx], y[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
    return None, m["exposure"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--setting", default="lstm:r4")
    p.add_argument("--strategies", default="hessian,random,last_layer,grad_abs,all")
    p.add_argument("--budgets", default="0.01,0.1")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    torch.set_num_threads(1)
    task = canary.CanaryTask([a.setting], steps=a.steps, n_candidates=1000)
    t0 = time.perf_counter()
    setup = task.prepare(a.seed, a.setting)
    train_s = setup.extra["train_s"]
    e, cc = setup.extra, setup.extra["corpus"]
    cands = random_candidates(1000, measure.format_of(cc.secret), seed=50_000 + a.seed, exclude=[cc.secret])
    held = cc.heldout[:len(cc.heldout) // 2]  # the demo's validation half; its test half is only reported

    def exposure(model):
        return measure.measure_secret(model, cc.vocab, cc.prefix, cc.secret, candidates=cands, context="\n")

    before, gold = exposure(setup.model), exposure(setup.gold)
    test = e["test"]
    ppl0, ppl_gold = perplexity(setup.model, test), perplexity(setup.gold, test)
    print(f"prepared in {time.perf_counter() - t0:.0f} s: before {before['exposure']:.1f} bits, gold "
          f"{gold['exposure']:.1f} bits, test ppl {ppl0:.3f} / gold {ppl_gold:.3f}", flush=True)
    za = setup.affected[0]
    lr = (canary.MODEL_CFG[a.setting.split(':')[0]])["lr"]
    gold_relearn = relearn_steps(copy.deepcopy(setup.gold), za[0], za[1], cands, cc, before["exposure"] - 2, lr)
    rows = []
    scores = {}
    for strategy in a.strategies.split(","):
        for budget in [float(b) for b in a.budgets.split(",")]:
            if strategy == "all" and budget != 1.0 and rows and any(r["strategy"] == "all" for r in rows):
                continue
            model = copy.deepcopy(setup.model)
            t1 = time.perf_counter()
            rep = forget(model, cc.vocab, cc.text, cc.secret, cc.prefix, cc.replacement, heldout=[held],
                         seq_len=task.seq_len, strategy=strategy, budget=1.0 if strategy == "all" else budget,
                         max_steps=a.max_steps, context="\n", seed=a.seed, scores=scores.get(strategy),
                         progress=False)
            wall = time.perf_counter() - t1
            if rep.scores is not None:
                scores[strategy] = rep.scores
            after = exposure(model)
            rl = relearn_steps(copy.deepcopy(model), za[0], za[1], cands, cc, before["exposure"] - 2, lr)
            row = {"strategy": strategy, "budget": 1.0 if strategy == "all" else budget, "k": rep.k,
                   "exposure_after": after["exposure"], "exposure_rank_after": after["exposure_rank"],
                   "extracted_after": bool(after["extracted"]), "test_ppl_change_pct": 100 * (
                       perplexity(model, test) / ppl0 - 1), "reached": rep.reached, "stopped_by": rep.stopped_by,
                   "steps": rep.cost["steps"], "wall_s": wall, "n_gradients": rep.cost["n_gradients"],
                   "n_hvps": rep.cost["n_hvps"], "relearn_steps": rl[0], "relearn_exposure": rl[1],
                   "cost_vs_retrain": wall / train_s}
            row["meets_targets"] = (row["exposure_after"] <= gold["exposure"] + 2 and not row["extracted_after"]
                                    and row["test_ppl_change_pct"] <= 5)
            rows.append(row)
            print(json.dumps(row), flush=True)
    payload = {"setting": a.setting, "seed": a.seed, "train_steps": a.steps, "train_s": train_s,
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
