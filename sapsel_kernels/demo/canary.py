"""``sapsel demo --task canary``: unlearning a memorized credit-card number from a character language model.

Experiment (one per seed and setting; a setting is a model kind and a number of canary insertions r):

1. corpus: the documentation topics of the standard library's ``pydoc_data`` (real English, ~465k characters, ASCII
   normalised); the last ~10% (whole topics) is held out and split in halves: validation (tuning) and test
   (perplexity). ``--quick`` and ``--chars`` truncate it;
2. the line ``my credit card number is 4716 2087 5533 9812`` is inserted r times at random line starts of the
   training text; training windows of T + 1 characters at stride T/2;
3. θ* = a character LSTM or a small causal Transformer (:mod:`sapsel_kernels.demo.lm`) trained on those windows (AdamW,
   cosine schedule); the gold standard is retrained from the same initialisation and batch order on the *clean* text
   (the canary line with the benign replacement ``not to be disclosed``);
4. Z = the training windows that overlap a secret span, Z̃ = the same windows cut from the clean text (only the 19
   secret characters differ); for every strategy × budget × update rule: select S on θ*, ``unlearn`` on a copy.

Hyperparameters (first_order's τ, dampings, learning rates) are chosen per cell from a small fixed grid by the LOWEST
tuning score = mean cross-entropy on the validation text + mean cross-entropy of Z̃ at the positions where it differs
from Z (the replacement's characters): data an unlearner has. The canary's exposure, the random candidates, the
retrained model and the test text are never consulted.

Metrics: exposure (skew-normal extrapolation, and the rank estimate capped at log2(n + 1)) from the same n random
candidates for every model of a setting; the canary's log-perplexity (bits, over the 19 secret characters); test
perplexity per character and its change (%) vs θ*; "exposure removed %" = (before - after) / (before - gold) · 100
where the gold model was trained; wall time and gradient counts of the unlearning step (selection cost separately).
"""

import argparse
import copy
import inspect
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional

import torch

from .. import _argtypes as at
from ..forgetting.exposure import measure_exposure, random_candidates
from ..update.rules import METHODS
from ..selection.strategies import STRATEGIES
from . import common, lm, plots

DEFAULT_STRATEGIES = ("hessian", "hessian_smallest", "last_layer", "random", "grad_abs", "all")
DEFAULT_METHODS = ("first_order", "second_order", "diag_newton", "sam_finetune", "gradient_ascent")
DEFAULT_BUDGETS = (0.001, 0.01, 0.1, 1.0)
DEFAULT_SETTINGS = ("lstm:r4", "lstm:r16", "transformer:r16")
QUICK_SETTINGS = ("lstm:r8",)

# model sizes: (constructor kwargs, training steps, learning rate)
MODEL_CFG = {
    "lstm": {"kw": {"embed": 32, "hidden": 128}, "lr": 3e-3},
    "transformer": {"kw": {"d_model": 64, "heads": 4, "layers": 2}, "lr": 2e-3},
}
QUICK_CFG = {
    "lstm": {"kw": {"embed": 24, "hidden": 96}, "lr": 4e-3},
    "transformer": {"kw": {"d_model": 48, "heads": 4, "layers": 2}, "lr": 3e-3},
}


def parse_setting(setting: str):
    """'lstm:r8' -> ('lstm', 8)."""
    try:
        kind, r = setting.split(":")
        if not r.startswith("r"):
            raise ValueError
        return kind, int(r[1:])
    except ValueError:
        raise ValueError(f"setting {setting!r} must look like 'lstm:r8' or 'transformer:r16'") from None


class CanaryTask:
    name = "canary"
    metric_labels = {
        "exposure_sn": "exposure SN",
        "exposure_rank": "exposure rank",
        "canary_logppl": "canary logppl",
        "test_ppl": "test ppl",
        "ppl_change_pct": "ppl change %",
        "wall_time_s": "time s",
        "n_gradients": "grads",
        "n_hvps": "hvps",
    }
    digits = {"wall_time_s": 2, "n_gradients": 0, "n_hvps": 0, "test_ppl": 3, "ppl_change_pct": 2}

    def __init__(self, settings, *, quick: bool = False, chars: Optional[int] = 150_000, seq_len: int = 64,
                 steps: int = 1000, batch_size: int = 32, n_candidates: int = 2000, hessian_windows: int = 32,
                 gold: bool = True, cg_iters: int = 10, n_probes: int = 16):
        self.settings = list(settings)
        for s in self.settings:
            kind, _ = parse_setting(s)
            if kind not in MODEL_CFG:
                raise ValueError(f"unknown model kind {kind!r} in setting {s!r}")
        self.quick, self.chars, self.seq_len, self.steps = quick, chars, seq_len, steps
        self.batch_size, self.n_candidates, self.hessian_windows = batch_size, n_candidates, hessian_windows
        self.gold, self.cg_iters, self.n_probes = gold, cg_iters, n_probes
        self._corpus = None

    # ---------------------------------------------------------------- setup
    def corpus(self):
        if self._corpus is None:
            self._corpus = lm.load_corpus(self.chars)
        return self._corpus

    def _train(self, kind, vocab_size, x, y, seed, init_state=None):
        cfg = (QUICK_CFG if self.quick else MODEL_CFG)[kind]
        torch.manual_seed(seed)
        model = lm.build_model(kind, vocab_size, **cfg["kw"])
        if init_state is not None:
            model.load_state_dict(init_state)
        init = copy.deepcopy(model.state_dict())
        losses = lm.train_lm(model, x, y, steps=self.steps, batch_size=self.batch_size, lr=cfg["lr"], seed=seed)
        return model, init, losses

    def prepare(self, seed: int, setting: str) -> common.Setup:
        common.set_determinism(seed, torch.get_num_threads())
        kind, r = parse_setting(setting)
        train_text, held = self.corpus()
        cc = lm.insert_canary(train_text, held, r, seed=seed)
        V, T = cc.vocab, self.seq_len
        ids, clean_ids = V.encode(cc.text), V.encode(cc.clean_text)
        starts = lm.window_starts(len(ids), T, T // 2)
        x, y = lm.make_windows(ids, starts, T)
        xc, yc = lm.make_windows(clean_ids, starts, T)
        zi = lm.affected_windows(cc.spans, starts, T)
        hid = V.encode(held)
        half = len(hid) // 2
        vx, vy = lm.make_windows(hid[:half], lm.window_starts(half, T, T), T)
        tx, ty = lm.make_windows(hid[half:], lm.window_starts(len(hid) - half, T, T), T)

        t0 = time.perf_counter()
        model, init, losses = self._train(kind, len(V), x, y, seed)
        train_s = time.perf_counter() - t0
        gold = None
        if self.gold:
            gold, _, _ = self._train(kind, len(V), xc, yc, seed, init_state=init)

        g = torch.Generator().manual_seed(40_000 + seed)
        perm = torch.randperm(len(x), generator=g)
        hsub = perm[:self.hessian_windows]
        keep = torch.ones(len(x), dtype=torch.bool)
        keep[zi] = False
        ret = perm[keep[perm]]
        chunk = max(1, zi.numel())
        retain = [(xc[ret[i:i + chunk]], yc[ret[i:i + chunk]]) for i in range(0, min(4 * chunk, ret.numel()), chunk)]
        extra = {
            "model": kind, "r": r, "n_train": int(len(x)), "n_affected": int(zi.numel()),
            "n_params": int(sum(p.numel() for p in model.parameters())), "train_chars": len(cc.text),
            "heldout_chars": len(held), "vocab": len(V), "seq_len": T, "train_steps": self.steps,
            "train_s": train_s, "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
            "corpus": cc, "val": (vx, vy), "test": (tx, ty), "diff_mask": yc[zi] != y[zi],
            "candidates": random_candidates(self.n_candidates, seed=50_000 + seed, exclude=[cc.secret]),
            # training-loss curvature on a subsample of the training windows as trained on (θ*'s data)
            "hessian_data": [(x[hsub], y[hsub])], "hessian_clean": [(xc[hsub], yc[hsub])], "retain": retain,
        }
        return common.Setup(model=model, loss_fn=lm.lm_loss, affected=[(x[zi], y[zi])],
                            corrected=[(xc[zi], yc[zi])], data=extra["hessian_data"], gold=gold, extra=extra)

    # ---------------------------------------------------------------- metrics
    def evaluate(self, model, setup) -> Dict[str, float]:
        e = setup.extra
        cc = e["corpus"]
        ex = measure_exposure(model, cc.vocab, cc.prefix, cc.secret, candidates=e["candidates"])
        test_loss = lm.mean_loss(model, *e["test"])
        return {
            "exposure_sn": ex["exposure_sn"], "exposure_sn_raw": ex["exposure_sn_raw"],
            "exposure_rank": ex["exposure_rank"],
            "exposure_rank_max": ex["exposure_rank_max"], "canary_logppl": ex["canary_logppl"],
            "cand_logppl_mean": ex["cand_logppl_mean"], "test_loss": test_loss, "test_ppl": math.exp(test_loss),
            "replacement_logppl": float(lm.sequence_log_perplexity(model, cc.vocab, "\n" + cc.prefix,
                                                                   [cc.replacement])[0]),
        }

    @staticmethod
    def derive(m, before, gold) -> Dict[str, float]:
        out = {"exposure_drop": before["exposure_sn"] - m["exposure_sn"],
               "ppl_change_pct": 100.0 * (m["test_ppl"] / before["test_ppl"] - 1.0)}
        if gold:
            den = before["exposure_sn"] - gold["exposure_sn"]
            out["exposure_removed_pct"] = 100.0 * (before["exposure_sn"] - m["exposure_sn"]) / den \
                if abs(den) > 1e-9 else float("nan")
        return out

    def tuning_score(self, model, setup) -> float:
        """Validation cross-entropy + cross-entropy of Z̃ at the target positions where Z̃ differs from Z (the
        replacement characters): fit the correction without losing the language model. Both nats per character."""
        zx, zy = setup.corrected[0]
        diff = setup.extra["diff_mask"]
        with torch.no_grad():
            logits = model(zx)
            ce = torch.nn.functional.cross_entropy(logits[diff], zy[diff])
        return lm.mean_loss(model, *setup.extra["val"]) + float(ce)

    # ---------------------------------------------------------------- hyperparameters
    def hparams(self, method: str, setup) -> List[Dict[str, Any]]:
        q = self.quick
        if method == "first_order":
            nz = setup.extra["n_affected"]  # τ = η/|Z|: one step of size η on the mean gradient difference
            etas = (1.0, 3.0, 10.0) if q else (0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
            return [{"tau": eta / nz} for eta in etas]
        if method in ("second_order", "diag_newton"):
            n = setup.extra["n_train"]  # damping on the summed scale = n_train x damping on the mean-loss scale
            lams = (1e-2, 1e-1) if q else ((1e-6, 1e-5, 1e-4, 1e-3, 1e-2) if method == "second_order"
                                           else (1e-4, 1e-3, 1e-2, 1e-1, 1.0))
            return [{"damping": n * lam} for lam in lams]
        if method == "sam_finetune":
            return [{"lr": lr} for lr in ((0.1, 0.3) if q else (0.03, 0.1, 0.3, 1.0, 3.0))]
        if method == "gradient_ascent":
            return [{"lr": lr} for lr in ((0.03, 0.1) if q else (0.01, 0.03, 0.1, 0.3, 1.0))]
        if method == "targeted":  # fixed steps (no monitor: the grid picks lr by the tuning score); SGD base
            return [{"lr": lr} for lr in ((0.1, 1.0) if q else (0.03, 0.1, 0.3, 1.0, 3.0))]
        raise ValueError(method)

    def unlearn_kwargs(self, method: str, setup) -> Dict[str, Any]:
        e = setup.extra
        if method == "second_order":
            return {"train_data": e["hessian_clean"], "n_train": e["n_train"],
                    "cg_iters": 8 if self.quick else self.cg_iters}
        if method == "diag_newton":  # divides by the shared training-loss estimate: reads no training data itself
            return {"n_train": e["n_train"],
                    "diag": common.training_hessian_diag(setup, self.n_probes)}
        if method == "sam_finetune":
            return {"steps": 8 if self.quick else 10, "rho": 0.05, "retain": e["retain"]}
        if method == "targeted":
            return {"steps": 8 if self.quick else 10, "retain": e["retain"]}
        if method == "gradient_ascent":
            return {"steps": 5 if self.quick else 10}
        return {}


# ====================================================================== CLI
def _setting(text: str) -> str:
    """One --settings item ('lstm:r8'): parse_setting's form and a model kind of MODEL_CFG, else ValueError."""
    kind, _ = parse_setting(text)
    if kind not in MODEL_CFG:
        raise ValueError(f"unknown model kind {kind!r} in {text!r}; choose from {', '.join(MODEL_CFG)}")
    return text


def build_parser() -> argparse.ArgumentParser:
    """The task's options, each validated by its ``type=`` (:mod:`sapsel_kernels._argtypes`): a bad value is a
    usage error (exit code 2, one ``error:`` line) before any training, whether the task runs as ``sapsel demo``,
    ``python -m sapsel_kernels.demo.canary`` or ``main([...])``. :func:`main` adds the one check between options
    (--seq-len against the transformer's max_len)."""
    p = argparse.ArgumentParser(prog="sapsel demo --task canary",
                                description="Unlearning a credit-card canary from a character LM (pydoc_data "
                                            "corpus): exposure before/after per strategy x budget x update rule.")
    p.add_argument("--quick", action="store_true",
                   help="CI mode: LSTM, 20k characters, 1 seed, 3 strategies, 2 budgets, 2 methods (< 1 minute)")
    p.add_argument("--out", type=at.output_dir, default="sapsel_out", help="output folder (default ./sapsel_out)")
    p.add_argument("--seed", type=at.nonneg_int, default=0, help="first seed (>= 0); seeds are seed, seed+1, ...")
    p.add_argument("--seeds", type=at.positive_int, default=1, help="number of seeds (default 1)")
    p.add_argument("--settings", type=at.list_of(at.checked(_setting), "setting"), default=None,
                   help="model:r<insertions> list, e.g. lstm:r4,lstm:r16,transformer:r16 (the default; quick lstm:r8)")
    p.add_argument("--models", type=at.choice_list(MODEL_CFG, "model kind"), default=None,
                   help="with --repeats: every model kind (lstm, transformer; default lstm) ...")
    p.add_argument("--repeats", type=at.positive_int_list, default=None,
                   help="... with every number of insertions r (comma-separated; default 8)")
    common.add_grid_arguments(p, STRATEGIES, METHODS, "0.001,0.01,0.1,1")
    p.add_argument("--chars", type=at.nonneg_int, default=None,
                   help="corpus characters, 0 = all ~465k (default 150000; quick 20000)")
    p.add_argument("--steps", type=at.positive_int, default=None,
                   help="training steps of θ* and gold (default 1000; quick 200)")
    # windows are taken at stride T // 2, which must be >= 1
    p.add_argument("--seq-len", type=at.int_at_least(2), default=None,
                   help=f"window length T (default 64; quick 48; at most {_transformer_max_len()} with a transformer)")
    p.add_argument("--candidates", type=at.positive_int, default=None,
                   help="random candidates for exposure (2000; quick 1000)")
    p.add_argument("--probes", type=at.positive_int, default=None,
                   help="Hutchinson probes for diag(H) (default 16; quick 8)")
    p.add_argument("--no-gold", action="store_true", help="skip retraining on the clean text (default in --quick)")
    p.add_argument("--threads", type=at.positive_int, default=1,
                   help="torch threads (fixed for reproducibility; default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _transformer_max_len() -> int:
    """The longest window the demo's transformer takes (build_model does not pass max_len: its default)."""
    return inspect.signature(lm.CharTransformer).parameters["max_len"].default


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors exit here (code 2), before any work
    q = args.quick
    seeds = list(range(args.seed, args.seed + args.seeds))
    if args.settings is not None:
        settings = args.settings
    elif args.models is not None or args.repeats is not None:
        settings = [f"{m}:r{r}" for m in (args.models if args.models is not None else ["lstm"])
                    for r in (args.repeats if args.repeats is not None else [8])]
    else:
        settings = list(QUICK_SETTINGS if q else DEFAULT_SETTINGS)
    seq_len = args.seq_len if args.seq_len is not None else (48 if q else 64)
    max_len = _transformer_max_len()
    if seq_len > max_len and any(parse_setting(s)[0] == "transformer" for s in settings):
        parser.error(f"argument --seq-len: the transformer takes at most {max_len} characters, got {seq_len}")
    strategies = args.strategies if args.strategies is not None else (
        ["hessian", "random", "all"] if q else list(DEFAULT_STRATEGIES))
    methods = args.methods if args.methods is not None else (
        ["first_order", "second_order"] if q else list(DEFAULT_METHODS))
    budgets = args.budgets if args.budgets is not None else ([0.01, 1.0] if q else list(DEFAULT_BUDGETS))
    n_probes = args.probes if args.probes is not None else (8 if q else 16)
    chars = args.chars if args.chars is not None else (20000 if q else 150_000)
    steps = args.steps if args.steps is not None else (200 if q else 1000)
    n_candidates = args.candidates if args.candidates is not None else (1000 if q else 2000)
    # created before the grid (minutes of work): a folder that cannot be created fails now, not after the run
    os.makedirs(args.out, exist_ok=True)
    common.set_determinism(args.seed, args.threads)
    task = CanaryTask(settings, quick=q, chars=None if chars == 0 else chars, seq_len=seq_len, steps=steps,
                      n_candidates=n_candidates, gold=not (args.no_gold or q), n_probes=n_probes)
    t0 = time.perf_counter()
    res = common.run_grid(task, seeds, strategies, budgets, methods, progress=not args.no_progress,
                          score_kwargs={"n_probes": n_probes})
    total_s = time.perf_counter() - t0
    metrics = list(task.metric_labels) + ["exposure_sn_raw", "exposure_drop", "exposure_removed_pct",
                                          "cand_logppl_mean", "replacement_logppl", "tune_s",
                                          "select_s", "delta_norm", "n_changed"]
    agg = common.aggregate(res["rows"], metrics)
    base = _baseline_summary(res["baselines"])
    payload = {
        "task": "canary", "argv": list(argv) if argv is not None else sys.argv[1:], "quick": q, "seeds": seeds,
        "settings": settings, "strategies": strategies, "methods": methods, "budgets": budgets,
        "n_probes": n_probes, "chars": chars, "steps": task.steps, "seq_len": task.seq_len,
        "n_candidates": task.n_candidates,
        "canary": lm.CANARY_PREFIX + lm.CANARY_SECRET, "replacement": lm.BENIGN_REPLACEMENT,
        "model_cfg": QUICK_CFG if q else MODEL_CFG, "total_s": total_s, "environment": common.environment(),
        "baselines": [{k: v for k, v in b.items() if k in _BASELINE_KEYS} for b in res["baselines"]],
        "aggregate": agg, "rows": res["rows"],
    }
    # the files first: a closed stdout (`sapsel demo | head`) ends the process at the first print
    common.write_json(os.path.join(args.out, "demo_canary.json"), payload)
    render(payload, args.out, base=base)
    print()
    print(base)
    print()
    print(common.format_table(agg, task.metric_labels, digits=task.digits))
    print(f"\nwrote {args.out}/demo_canary.json, demo_canary.md, demo_canary.png  ({total_s:.1f} s)")
    return 0


def render(payload, out: str, base: Optional[str] = None) -> None:
    """Write demo_canary.md (summary, exposure matrix, full table) and demo_canary.png from a run's payload (the
    dict saved as demo_canary.json; ``render(json.load(open(p)), dir)`` re-renders a saved run)."""
    task = CanaryTask
    agg = payload["aggregate"]
    base = base if base is not None else _baseline_summary(payload["baselines"])
    with open(os.path.join(out, "demo_canary.md"), "w") as f:
        f.write(base + "\n\nExposure (skew-normal, bits) after unlearning (test-perplexity change %):\n\n"
                + exposure_matrix(agg, payload["baselines"], payload["methods"]) + "\n\nAll metrics:\n\n"
                + common.format_table(agg, task.metric_labels, markdown=True, digits=task.digits) + "\n")
    plot(payload, os.path.join(out, "demo_canary.png"))


def plot(payload, path: str):
    """The trade-off figure of a run (reads the payload's aggregate, baselines and seeds): exposure after unlearning
    vs test-perplexity change, one panel per setting (columns) and update rule (rows), with each setting's exposure
    before unlearning and after retraining. Returns the closed matplotlib Figure."""
    bl = payload["baselines"]
    return plots.plot_tradeoff(
        plots.points_from_aggregate(payload["aggregate"]), path, before=plots.baseline_levels(bl, "before"),
        gold=plots.baseline_levels(bl, "gold") or None, n_seeds=len(payload["seeds"]),
        title="forgetting a memorized credit-card number (character LMs on pydoc_data): "
              "exposure (skew-normal) vs test perplexity")


def exposure_matrix(agg, baselines, methods) -> str:
    """Markdown: one row per (setting, strategy, budget), one column per update rule, cells "exposure after
    (test-perplexity change %)", with the setting's exposure before unlearning and after retraining (gold)."""
    head = ["setting", "before", "gold", "strategy", "budget"] + list(methods)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    by = {(a["setting"], a["strategy"], a["budget"], a["method"]): a for a in agg}
    cells = list(dict.fromkeys((a["setting"], a["strategy"], a["budget"]) for a in agg))
    base = {}
    for bl in baselines:
        base.setdefault(bl["setting"], []).append(bl)
    for setting, strategy, budget in cells:
        bs = base.get(setting, [])
        before = sum(b["before"]["exposure_sn"] for b in bs) / max(len(bs), 1)
        golds = [b["gold"]["exposure_sn"] for b in bs if b.get("gold")]
        gold = f"{sum(golds) / len(golds):.1f}" if golds else "-"
        row = [setting, f"{before:.1f}", gold, strategy, common.budget_label(budget)]
        for m in methods:
            a = by.get((setting, strategy, budget, m))
            if a is None or not math.isfinite(a["exposure_sn"]["mean"]):
                row.append("n/a")
            else:
                row.append(f"{a['exposure_sn']['mean']:.1f} ({a['ppl_change_pct']['mean']:+.1f}%)")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


_BASELINE_KEYS = ("seed", "setting", "prepare_s", "before", "gold", "model", "r", "n_train", "n_affected", "n_params",
                  "train_chars", "heldout_chars", "vocab", "seq_len", "train_steps", "train_s", "final_train_loss")


def _baseline_summary(baselines) -> str:
    lines = []
    for b in baselines:
        bf, gd = b["before"], b["gold"]
        line = (f"{b['setting']} seed {b['seed']}: {b['n_params']} parameters, |Z| = {b['n_affected']} of "
                f"{b['n_train']} windows (T={b['seq_len']}), {b['train_chars']} training chars, "
                f"train {b['train_s']:.1f} s. before: exposure SN {bf['exposure_sn']:.1f} / rank "
                f"{bf['exposure_rank']:.1f} (max {bf['exposure_rank_max']:.1f}) bits, canary logppl "
                f"{bf['canary_logppl']:.1f} vs candidates {bf['cand_logppl_mean']:.1f}, test ppl {bf['test_ppl']:.3f}")
        if gd:
            line += (f";  retrained on clean text (gold): exposure SN {gd['exposure_sn']:.1f}, canary logppl "
                     f"{gd['canary_logppl']:.1f}, test ppl {gd['test_ppl']:.3f}")
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
