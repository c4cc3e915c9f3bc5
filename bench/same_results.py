"""Same seed, same results, across a refactor: a fingerprint of ``sapsel demo --quick`` and of three ``forget`` runs
(ssd, hessian, random on a character LSTM that memorised a card number), to compare two checkouts.

    # in each checkout (PYTHONPATH=<checkout> to import that checkout's package):
    python bench/same_results.py --out /tmp/fp_new.json
    python bench/same_results.py --compare /tmp/fp_old.json /tmp/fp_new.json

The fingerprint holds the demo's JSON without its timings and environment, and per forget run the report without
its cost (wall times) and a sha1 of the weights' bytes.
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile

import torch

_VOLATILE = ("time", "wall", "seconds", "argv", "machine", "version", "date", "environment", "loadavg")


def _volatile(key: str) -> bool:
    return any(s in key for s in _VOLATILE) or key.endswith("_s")


def _strip(x):
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if not _volatile(k)}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    return x


def fingerprint() -> dict:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "sapsel_kernels", "demo", "--quick", "--no-progress", "--out", tmp],
                       check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        with open(os.path.join(tmp, "demo_labels.json")) as f:
            demo = _strip(json.load(f))
    import importlib.util

    from sapsel_kernels.demo import lm
    from sapsel_kernels.forget import forget
    from sapsel_kernels.rules import Targeted

    configs = importlib.import_module("sapsel_kernels.forgetting.config") \
        if importlib.util.find_spec("sapsel_kernels.forgetting") is not None \
        and importlib.util.find_spec("sapsel_kernels.forgetting.config") is not None else None

    if hasattr(lm, "memorised_canary_lstm"):
        model, cc = lm.memorised_canary_lstm(6_000, 8, hidden=32, steps=150)
    else:  # a checkout from before the helper (the comparison's baseline): the same recipe, spelled out
        torch.manual_seed(0)
        train, held = lm.load_corpus(6_000)
        cc = lm.insert_canary(train, held, 8, seed=0)
        ids = cc.vocab.encode(cc.text)
        x, y = lm.make_windows(ids, lm.window_starts(len(ids), 32, 16), 32)
        model = lm.build_model("lstm", len(cc.vocab), embed=16, hidden=32)
        lm.train_lm(model, x, y, steps=150, batch_size=32, lr=1e-2, seed=0)
    runs = {}
    for strategy in ("ssd", "hessian", "random"):
        m = lm.build_model("lstm", len(cc.vocab), embed=16, hidden=32)
        m.load_state_dict(model.state_dict())
        if configs is not None:
            rep = forget(m, cc.vocab, cc.text, {"secret": lm.CANARY_SECRET, "prefix": lm.CANARY_PREFIX},
                         heldout=[cc.heldout], seed=5, select=configs.SelectConfig(strategy=strategy),
                         update=configs.UpdateConfig(rule=Targeted(steps=20)),
                         measure=configs.MeasureConfig(n_candidates=200, n_monitor=40, progress=False))
        else:  # a checkout from before the config objects: the same request as flat keywords
            rep = forget(m, cc.vocab, cc.text, lm.CANARY_SECRET, lm.CANARY_PREFIX, heldout=[cc.heldout],
                         strategy=strategy, max_steps=20, n_candidates=200, n_monitor=40, progress=False, seed=5)
        d = rep.to_dict()
        d.pop("cost", None)
        flat = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
        runs[strategy] = {"report": json.loads(json.dumps(d, default=str)),
                          "weight_bits": hashlib.sha1(flat.numpy().tobytes()).hexdigest()}
    return {"demo_quick": demo, "forget": runs}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out")
    ap.add_argument("--compare", nargs=2)
    a = ap.parse_args(argv)
    if a.compare:
        x, y = (json.load(open(p)) for p in a.compare)
        same_demo = x["demo_quick"] == y["demo_quick"]
        print(f"demo --quick: {'identical' if same_demo else 'DIFFERENT'}")
        ok = same_demo
        for s in x["forget"]:
            r = x["forget"][s]["report"] == y["forget"][s]["report"]
            w = x["forget"][s]["weight_bits"] == y["forget"][s]["weight_bits"]
            print(f"forget {s}: report {'identical' if r else 'DIFFERENT'}, "
                  f"weights {'bit-identical' if w else 'DIFFERENT'}")
            ok = ok and r and w
        return 0 if ok else 1
    with open(a.out, "w") as f:
        json.dump(fingerprint(), f, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
