"""An outsider's check of a ``sapsel forget`` report: exposure measured again, independently, on the saved model.

For every secret in OUT/report.json this script finds the text the data holds before the secret (its own search,
from the secret's prefix), draws ``--candidates`` fresh candidates of the secret's null (seeds the run never used:
uniform strings of the format, or for emails and names the package's plausible-value generator, which only
defines the null), and scores ``prompt + candidate`` itself: its own tokenization, one sequence at a time, a
float64 log-softmax of the model's logits over the tokens after the longest common token prefix with the prompt.
Exposure = log2(n + 1) - log2(1 + #candidates more likely than the secret). It also decodes greedily from the
prompt and reports whether the first group of the secret comes out. No package scorer is called.

    python bench/forget_check.py --out OUT --data train.txt [--candidates 2000] [--sets 3]
"""

import argparse
import json
import math
import os
import random
import string

import torch


def data_prompt(text: str, prefix: str, secret: str) -> str:
    i = text.find(prefix + " " + secret)
    if i >= 0:
        return prefix + " "
    for sep in ("", ":", ": ", "  ", "\n"):
        if (prefix + sep + secret) in text:
            return prefix + sep
    j = text.find(secret)
    line = text[text.rfind("\n", 0, j) + 1:j]
    return line


def uniform_like(secret: str, n: int, rng: random.Random):
    out = set()
    while len(out) < n:
        c = "".join(rng.choice(string.digits) if ch.isdigit() else rng.choice(string.ascii_lowercase)
                    if ch.islower() else rng.choice(string.ascii_uppercase) if ch.isupper() else ch for ch in secret)
        if c != secret:
            out.add(c)
    return sorted(out)


@torch.no_grad()
def logprob(model, tok, prompt: str, conts):
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    fulls = [tok(prompt + c, add_special_tokens=False)["input_ids"] for c in conts]
    s = min(next((k for k, (a, b) in enumerate(zip(p_ids, f)) if a != b), min(len(p_ids), len(f))) for f in fulls)
    out = []
    for f in fulls:
        x = torch.tensor([f])
        lp = model(x).logits[0].double().log_softmax(-1)
        out.append(sum(float(lp[t - 1, f[t]]) for t in range(s, len(f))))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--candidates", type=int, default=2000)
    ap.add_argument("--sets", type=int, default=3)
    ap.add_argument("--model", default=None, help="measure this model folder instead of OUT (e.g. the original)")
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(a.model or a.out, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(a.out, local_files_only=True)
    rep = json.load(open(os.path.join(a.out, "report.json")))
    text = open(a.data, encoding="utf-8").read()
    from sapsel_kernels.decoys import kind_of, plausible  # the null's definition only

    for s in rep["secrets"]:
        secret = s["secret"]
        prompt = data_prompt(text, s["prefix"], secret)
        exps = []
        for k in range(a.sets):
            rng = random.Random(10_000 + k)
            kind = kind_of(secret)
            cands = plausible(secret, a.candidates, seed=90_000 + k, kind=kind) if kind != "format" else \
                uniform_like(secret, a.candidates, rng)
            scores = logprob(model, tok, prompt, [secret] + cands)
            K = sum(c > scores[0] for c in scores[1:])
            exps.append(math.log2(len(cands) + 1) - math.log2(K + 1))
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        for _ in range(12):
            nxt = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], 1)
        comp = tok.decode(ids[0])[len(prompt):]
        first = secret.split()[0] if " " in secret else secret[:4]
        print(json.dumps({"secret": secret, "prompt": prompt, "report_exposure_after": round(s["exposure_after"], 2),
                          "report_hi": round(s["exposure_hi_after"], 2), "independent": [round(e, 2) for e in exps],
                          "greedy": comp, "first_group_out": comp.strip().startswith(first),
                          "report_reached": s["reached"]}))


if __name__ == "__main__":
    main()
