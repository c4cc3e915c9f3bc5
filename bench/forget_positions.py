"""Where on the context does unlearning cost perplexity? One ``forget`` request over a matrix fixture's 16 secrets
(:mod:`bench.forget_matrix`, its cached θ* and retrained model), then the outsider's perplexity on the whole held-out
text in windows of the models' context (128 tokens), split by position: targets 1-63 and 64-127.

Found with it: forget's windows were min(64, context) tokens, so the search steered on, and the retained text
protected, positions 1-63 only; on the GPT-2 seed-0 fixture the round-2 default showed +3.0% where it steered,
+1.2% at positions 1-63 and +10.4% at positions 64-127 (docs/forget.md, third round).

    python -m bench.forget_positions --model gpt2 --seed 0 \
        --cache bench/results/forget_matrix_v3/cache/gpt2_s0_1200.pt --seq-len 128 --repair-steps 10 \
        --out bench/results/forget_matrix_v3/positions/gpt2_s0_T128_rep10.json

``--cache``: the file :func:`bench.forget_matrix.run_fixture` writes (OUT/cache/<model>_s<seed>_<train steps>.pt,
not committed). The request: hessian_ratio at 5%, per-token NPO at β 0.25, 300 steps, ``--seq-len`` (default:
forget's window) and ``--repair-steps`` (default 0, the setting before the third round; forget's default is now
10). The perplexity is measured on the held-out text ``forget`` was given (half of its windows steered the search),
by position; bench/forget_matrix.py's third round adds an unseen text. Writes the report's validation / test
perplexity change, the outsider's by position, each secret's exposure margin over the retrained model and the
search's history.
"""

import argparse
import copy
import json
import math
import time

import torch
import torch.nn.functional as F

from bench import forget_matrix as fm


@torch.no_grad()
def by_position(model, tok, text: str) -> dict:
    """exp(mean cross-entropy) over non-overlapping windows of fm.T tokens: all targets, targets 1-63, 64-127."""
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)
    n = len(ids) // fm.T
    x = ids[: n * fm.T].view(n, fm.T)
    ce = F.cross_entropy(model(input_ids=x).logits[:, :-1].transpose(1, 2), x[:, 1:], reduction="none")
    return {"all": math.exp(ce.mean()), "targets_1_63": math.exp(ce[:, :63].mean()),
            "targets_64_127": math.exp(ce[:, 63:].mean())}


def main(argv=None):
    import sapsel_kernels as sk

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, choices=sorted(fm.MODELS))
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seq-len", type=int, default=None, help="UpdateConfig(seq_len=) (default: forget's)")
    ap.add_argument("--repair-steps", type=int, default=0, help="Targeted(repair_steps=)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    train_text, held, _ = fm.docstring_corpus()
    secrets = fm.make_secrets(a.seed)
    text = fm.plant(train_text, secrets, a.seed)
    scrubbed = text
    for s in secrets:
        scrubbed = scrubbed.replace(f"{s['prefix']} {s['secret']}\n", "")
    tok = fm.tokenizer_for(fm.MODELS[a.model]["kind"], scrubbed, held)
    theta = fm.build_model(a.model, len(tok), a.seed)
    saved = torch.load(a.cache)
    theta.load_state_dict(saved["theta"])
    theta.eval()
    retrained = copy.deepcopy(theta)
    retrained.load_state_dict(saved["retrained"])
    retrained.eval()
    before = by_position(theta, tok, held)
    model = copy.deepcopy(theta)
    t0 = time.perf_counter()
    rep = sk.forget(model, tok, [text], [{"secret": s["secret"], "prefix": s["prefix"]} for s in secrets],
                    heldout=[held], seed=a.seed, select=sk.SelectConfig(strategy="hessian_ratio", budget=0.05),
                    update=sk.UpdateConfig(seq_len=a.seq_len, per_token=True, focus=False, precondition=None,
                                           rule=sk.Targeted(steps=a.steps, beta=0.25, repair_steps=a.repair_steps)),
                    measure=sk.MeasureConfig(n_candidates=500, progress=False,
                                             evidence=sk.Evidence(n_samples=32, relearn_steps=0, int8=False)))
    wall = time.perf_counter() - t0
    after = by_position(model, tok, held)
    out_after, out_base = fm.outsider(model, tok, secrets, 500), fm.outsider(retrained, tok, secrets, 500)
    d = rep.to_dict()
    res = {"settings": {"model": a.model, "seed": a.seed, "seq_len": d["seq_len"], "repair_steps": a.repair_steps,
                        "steps": a.steps, "strategy": "hessian_ratio", "budget": 0.05, "beta": 0.25,
                        "per_token": True},
           "wall_s": wall, "stopped_by": d["stopped_by"], "steps_run": d["cost"]["steps"],
           "met": sum(x["exposure"] - b["exposure"] <= 2.0 and not x["extracted"]
                      for x, b in zip(out_after, out_base)),
           "val_ppl_change": d["val_ppl_after"] / d["val_ppl_before"] - 1.0,
           "test_ppl_change": d["ppl_after"] / d["ppl_before"] - 1.0,
           "outsider_ppl_change": {k: after[k] / before[k] - 1.0 for k in before},
           "margins": [x["exposure"] - b["exposure"] for x, b in zip(out_after, out_base)],
           "extracted": [x["extracted"] for x in out_after], "history": d["history"]}
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps({k: v for k, v in res.items() if k not in ("history", "margins", "extracted")}))


if __name__ == "__main__":
    main()
