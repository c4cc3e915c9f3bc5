"""``sapsel demo --task labels``: label repair on scikit-learn's bundled digits with a small CNN.

Experiment (one per seed and poisoning rate):

1. data: the 1,797 real 8×8 digits of ``sklearn.datasets.load_digits`` (no download), pixels / 16, float32;
   a seeded split into test (450), validation (250) and training (the remaining 1,097) points;
2. poisoning: in every class c, a fraction ``rate`` of its training points gets the label of its partner class
   (0↔9, 1↔8, 2↔7, 3↔6, 4↔5). Z = those points with the flipped labels, Z̃ = the same points with the true labels;
3. the poisoned model θ* is trained on the poisoned labels (Adam, lr 3e-3, batch 64, 40 epochs); the gold standard
   is retrained from scratch on the corrected labels with the same seed, initialisation, batch order and schedule;
4. for every strategy × budget × method: select S on θ*, unlearn on a copy, measure.

Hyperparameters (first_order's τ, the dampings, the learning rates) are chosen per cell from a small fixed grid by
the LOWEST tuning score = mean cross-entropy on the held-out validation split + mean cross-entropy on Z̃: only data an
unlearner has; the retrained model and the test split are never consulted.

Metrics: test accuracy; accuracy on the affected points w.r.t. the corrected labels; accuracy restored % on both,
(after − before)/(retrained − before)·100; agreement of test predictions with the retrained model; relearning
robustness (full-batch SGD steps, lr 0.05, all parameters, on Z with the poisoned labels until the accuracy on Z
w.r.t. the poisoned labels is back at the poisoned model's level, capped at 100); wall time and gradient counts.
"""

import argparse
import copy
import os
import sys
import time
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

from .. import _argtypes as at
from ..update.rules import METHODS
from ..selection.strategies import STRATEGIES
from . import common

# the committed results' five rules; "targeted" (the iterative forgetting rule of sapsel forget) runs with --methods
DEFAULT_METHODS = tuple(m for m in METHODS if m != "targeted")
PAIR = torch.tensor([9, 8, 7, 6, 5, 4, 3, 2, 1, 0])  # c -> its partner class
N_TEST, N_VAL = 450, 250
DEFAULT_STRATEGIES = ("hessian", "hessian_smallest", "hessian_affected", "hessian_corrected", "last_layer",
                      "random", "grad_abs", "ssd", "all")
DEFAULT_BUDGETS = (0.001, 0.01, 0.05, 1.0)


# ====================================================================== data and model
def load_digits_split(seed: int):
    """Real digits as float32 (N, 1, 8, 8) in [0, 1] and int64 labels, split by a seeded permutation.
    Returns {"train": (x, y), "val": (x, y), "test": (x, y)}."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(10_000 + seed))
    te, va, tr = perm[:N_TEST], perm[N_TEST:N_TEST + N_VAL], perm[N_TEST + N_VAL:]
    return {"train": (x[tr], y[tr]), "val": (x[va], y[va]), "test": (x[te], y[te])}


class DigitsCNN(torch.nn.Module):
    """3 conv layers + a linear classifier, 7,178 parameters (the classifier ``fc`` holds 1,290 = 18%)."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, padding=1)
        self.conv3 = torch.nn.Conv2d(16, 32, 3, padding=1)
        self.fc = torch.nn.Linear(32 * 2 * 2, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # 8x8 -> 4x4
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)  # 4x4 -> 2x2
        return self.fc(x.flatten(1))


def loss_fn(model, batch):
    """Mean cross-entropy of a batch (x, y)."""
    x, y = batch
    return F.cross_entropy(model(x), y)


def train_model(x, y, seed: int, epochs: int = 40, lr: float = 3e-3, batch_size: int = 64) -> DigitsCNN:
    """Adam from a seeded initialisation with a seeded batch order: the same seed gives the same init and the same
    sequence of minibatch index sets whatever the labels (the gold standard differs from θ* only by the labels)."""
    torch.manual_seed(seed)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            b = perm[i:i + batch_size]
            opt.zero_grad(set_to_none=True)
            loss_fn(model, (x[b], y[b])).backward()
            opt.step()
    model.eval()
    return model


def poison_labels(y: torch.Tensor, rate: float, seed: int):
    """Flip round(rate · n_c) seeded-random training labels of every class c to PAIR[c].
    Returns (poisoned labels, int64 indices of the flipped points, ascending)."""
    g = torch.Generator().manual_seed(20_000 + seed)
    picked = []
    for c in range(10):
        members = torch.nonzero(y == c).reshape(-1)
        n = int(round(rate * members.numel()))
        picked.append(members[torch.randperm(members.numel(), generator=g)[:n]])
    idx = torch.sort(torch.cat(picked)).values
    yp = y.clone()
    yp[idx] = PAIR[y[idx]]
    return yp, idx


@torch.no_grad()
def accuracy(model, x, y) -> float:
    return float((model(x).argmax(1) == y).float().mean()) if len(y) else float("nan")


@torch.no_grad()
def mean_ce(model, x, y) -> float:
    return float(F.cross_entropy(model(x), y))


def relearn_steps(model, x, y_poison, level: float, lr: float = 0.05, cap: int = 100) -> int:
    """Full-batch SGD steps (all parameters, on a copy) on the poisoned points until their accuracy w.r.t. the
    poisoned labels is ≥ ``level``; 0 if it already is; ``cap`` if never within the cap."""
    if accuracy(model, x, y_poison) >= level:
        return 0
    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=lr)
    for step in range(1, cap + 1):
        opt.zero_grad(set_to_none=True)
        loss_fn(m, (x, y_poison)).backward()
        opt.step()
        if accuracy(m, x, y_poison) >= level:
            return step
    return cap


# ====================================================================== the task
class LabelsTask:
    """Label repair on digits: see the module docstring. ``settings`` are the poisoning rates."""

    name = "labels"
    metric_labels = {
        "restored_test": "restored test %",
        "restored_affected": "restored Z %",
        "test_acc": "test acc %",
        "affected_acc": "Z acc %",
        "agreement": "agree %",
        "relearn_steps": "relearn",
        "wall_time_s": "time s",
        "n_gradients": "grads",
        "n_hvps": "hvps",
    }
    digits = {"wall_time_s": 3, "n_gradients": 0, "n_hvps": 0, "relearn_steps": 1}
    plot_metrics = {"restored_test": "test accuracy restored %", "restored_affected": "Z accuracy restored %"}

    def __init__(self, rates=(0.2,), epochs: int = 40, quick: bool = False, hessian_points: int = 512,
                 cg_iters: int = 30):
        self.settings = [float(r) for r in rates]
        self.epochs, self.quick = epochs, quick
        self.hessian_points, self.cg_iters = hessian_points, cg_iters

    # ---------------------------------------------------------------- setup
    def prepare(self, seed: int, rate: float) -> common.Setup:
        common.set_determinism(seed, torch.get_num_threads())
        split = load_digits_split(seed)
        xtr, ytr = split["train"]
        yp, idx = poison_labels(ytr, rate, seed)
        model = train_model(xtr, yp, seed, epochs=self.epochs)
        gold = train_model(xtr, ytr, seed, epochs=self.epochs)
        xz = xtr[idx]
        keep = torch.ones(len(xtr), dtype=torch.bool)
        keep[idx] = False
        g = torch.Generator().manual_seed(30_000 + seed)
        # the corrected training data for the second-order HVPs: a fixed subsample (the full set rescaled to n_train)
        hsub = torch.randperm(len(xtr), generator=g)[:self.hessian_points]
        # retained (unaffected) points for sam_finetune: chunks of |Z| points, cycled
        ret = torch.nonzero(keep).reshape(-1)
        ret = ret[torch.randperm(ret.numel(), generator=g)]
        chunk = max(1, idx.numel())
        retain = [(xtr[ret[i:i + chunk]], ytr[ret[i:i + chunk]]) for i in range(0, ret.numel() - chunk + 1, chunk)]
        extra = {
            "rate": rate, "n_train": int(len(xtr)), "n_affected": int(idx.numel()), "n_params": int(
                sum(p.numel() for p in model.parameters())),
            "split": split, "poisoned_labels": yp, "affected_idx": idx,
            "hessian_data": [(xtr[hsub], ytr[hsub])], "retain": retain[:4],
        }
        return common.Setup(model=model, loss_fn=loss_fn, affected=[(xz, yp[idx])], corrected=[(xz, ytr[idx])],
                            data=[(xtr, yp)], gold=gold, extra=extra)

    # ---------------------------------------------------------------- metrics
    def evaluate(self, model, setup) -> Dict[str, float]:
        e = setup.extra
        xte, yte = e["split"]["test"]
        xz, yz_true = setup.corrected[0]
        yz_poison = setup.affected[0][1]
        with torch.no_grad():
            pred = model(xte).argmax(1)
            agree = float((pred == setup.gold(xte).argmax(1)).float().mean()) if setup.gold is not None else None
        if "poison_level" not in e:  # the poisoned model's own accuracy on Z w.r.t. the poisoned labels
            e["poison_level"] = accuracy(setup.model, xz, yz_poison)
        return {
            "test_acc": 100 * float((pred == yte).float().mean()),
            "affected_acc": 100 * accuracy(model, xz, yz_true),
            "poison_acc": 100 * accuracy(model, xz, yz_poison),
            "agreement": 100 * agree if agree is not None else float("nan"),
            "relearn_steps": float(relearn_steps(model, xz, yz_poison, e["poison_level"])),
        }

    @staticmethod
    def derive(m, before, gold) -> Dict[str, float]:
        def restored(key):
            den = gold[key] - before[key]
            return 100.0 * (m[key] - before[key]) / den if abs(den) > 1e-9 else float("nan")

        return {"restored_test": restored("test_acc"), "restored_affected": restored("affected_acc")}

    @staticmethod
    def selection_info(sel, setup) -> Dict[str, Any]:
        """Where S lies: its share in the classifier ``fc`` (the last layer) and per layer counts."""
        from ..space import ParamSpace

        per = ParamSpace(setup.model).split_indices(sel.indices.cpu())
        counts: Dict[str, int] = {}
        for name, local in per.items():
            layer = name.rsplit(".", 1)[0]
            counts[layer] = counts.get(layer, 0) + int(local.numel())
        return {"frac_last_layer": counts.get("fc", 0) / max(sel.k, 1), "layer_counts": counts}

    def tuning_score(self, model, setup) -> float:
        xva, yva = setup.extra["split"]["val"]
        xz, yz = setup.corrected[0]
        return mean_ce(model, xva, yva) + mean_ce(model, xz, yz)

    # ---------------------------------------------------------------- hyperparameters
    def hparams(self, method: str, setup) -> List[Dict[str, Any]]:
        q = self.quick
        if method == "first_order":
            # τ on the summed-gradient scale: τ = η/|Z| is one gradient step of size η on the mean gradient
            nz = setup.extra["n_affected"]
            etas = (0.1, 1.0, 10.0) if q else (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
            return [{"tau": eta / nz} for eta in etas]
        if method in ("second_order", "diag_newton"):
            n = setup.extra["n_train"]  # damping on the summed scale = n_train × damping on the mean scale
            if method == "second_order":
                lams = (1e-3, 1e-2, 1e-1) if q else (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
            else:
                lams = (1e-1, 1.0) if q else (1e-3, 1e-2, 1e-1, 1.0, 10.0)
            return [{"damping": n * lam} for lam in lams]
        if method == "sam_finetune":
            return [{"lr": lr} for lr in ((0.03, 0.3) if q else (0.03, 0.1, 0.3, 1.0, 3.0))]
        if method == "gradient_ascent":
            return [{"lr": lr} for lr in ((0.01, 0.1) if q else (0.003, 0.01, 0.03, 0.1, 0.3))]
        if method == "targeted":  # fixed steps (no monitor: the grid picks lr by the tuning score); SGD base
            return [{"lr": lr} for lr in ((0.1, 1.0) if q else (0.03, 0.1, 0.3, 1.0, 3.0))]
        raise ValueError(method)

    def unlearn_kwargs(self, method: str, setup) -> Dict[str, Any]:
        e = setup.extra
        if method == "second_order":
            return {"train_data": e["hessian_data"], "n_train": e["n_train"],
                    "cg_iters": 10 if self.quick else self.cg_iters}
        if method == "diag_newton":  # divides by the shared training-loss estimate: reads no training data itself
            return {"n_train": e["n_train"],
                    "diag": common.training_hessian_diag(setup, getattr(self, "n_probes", 32))}
        if method == "sam_finetune":
            return {"steps": 10 if self.quick else 20, "rho": 0.05, "retain": e["retain"]}
        if method == "targeted":
            return {"steps": 10 if self.quick else 20, "retain": e["retain"]}
        if method == "gradient_ascent":
            return {"steps": 5 if self.quick else 10}
        return {}


# ====================================================================== CLI
def build_parser() -> argparse.ArgumentParser:
    """The task's options, each validated by its ``type=`` (:mod:`sapsel_kernels._argtypes`): a bad value is a
    usage error (exit code 2, one ``error:`` line) before any training, whether the task runs as ``sapsel demo``,
    ``python -m sapsel_kernels.demo.labels`` or ``main([...])``."""
    p = argparse.ArgumentParser(prog="sapsel demo --task labels",
                                description="Label repair on scikit-learn digits: strategy x budget x method grid.")
    p.add_argument("--quick", action="store_true", help="a reduced grid (1 seed, 4 strategies, 2 budgets, 3 methods)")
    p.add_argument("--out", type=at.output_dir, default="sapsel_out", help="output folder (default ./sapsel_out)")
    p.add_argument("--seed", type=at.nonneg_int, default=0, help="first seed (>= 0); seeds are seed, seed+1, ...")
    p.add_argument("--seeds", type=at.positive_int, default=None, help="number of seeds (default 3; --quick 1)")
    p.add_argument("--rates", type=at.rate_list, default=None,
                   help="poisoning rates in (0, 1), comma-separated (default 0.2; --quick 0.2)")
    common.add_grid_arguments(p, STRATEGIES, METHODS, "0.001,0.01,0.05,1")
    p.add_argument("--epochs", type=at.positive_int, default=40, help="training epochs of θ* and of the gold standard")
    p.add_argument("--probes", type=at.positive_int, default=None,
                   help="Hutchinson probes for diag(H) (default 32; quick 8)")
    p.add_argument("--threads", type=at.positive_int, default=1,
                   help="torch threads (fixed for reproducibility; default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)  # usage errors exit here (code 2), before any work
    q = args.quick
    seeds = list(range(args.seed, args.seed + (args.seeds if args.seeds is not None else (1 if q else 3))))
    rates = args.rates if args.rates is not None else [0.2]
    strategies = args.strategies if args.strategies is not None else (
        ["hessian", "last_layer", "random", "all"] if q else list(DEFAULT_STRATEGIES))
    methods = args.methods if args.methods is not None else (
        ["first_order", "second_order", "sam_finetune"] if q else list(DEFAULT_METHODS))
    budgets = args.budgets if args.budgets is not None else ([0.01, 1.0] if q else list(DEFAULT_BUDGETS))
    n_probes = args.probes if args.probes is not None else (8 if q else 32)
    # created before the grid (minutes of work): a folder that cannot be created fails now, not after the run
    os.makedirs(args.out, exist_ok=True)
    common.set_determinism(args.seed, args.threads)
    task = LabelsTask(rates=rates, epochs=args.epochs, quick=q)
    task.n_probes = n_probes
    t0 = time.perf_counter()
    res = common.run_grid(task, seeds, strategies, budgets, methods, progress=not args.no_progress,
                          score_kwargs={"n_probes": n_probes})
    total_s = time.perf_counter() - t0
    metrics = list(task.metric_labels) + ["poison_acc", "tune_s", "select_s", "delta_norm", "n_changed",
                                          "frac_last_layer"]
    agg = common.aggregate(res["rows"], metrics)
    base = _baseline_summary(res["baselines"])
    payload = {
        "task": "labels", "argv": list(argv) if argv is not None else sys.argv[1:], "quick": q, "seeds": seeds,
        "rates": rates, "strategies": strategies, "methods": methods, "budgets": budgets, "n_probes": n_probes,
        "epochs": args.epochs, "total_s": total_s, "environment": common.environment(),
        "baselines": [{k: v for k, v in b.items() if k in ("seed", "setting", "prepare_s", "before", "gold",
                                                            "rate", "n_train", "n_affected", "n_params")}
                      for b in res["baselines"]],
        "aggregate": agg, "rows": res["rows"],
    }
    # the files first: a closed stdout (`sapsel demo | head`) ends the process at the first print
    common.write_json(os.path.join(args.out, "demo_labels.json"), payload)
    render(payload, args.out, base=base)
    print()
    print(base)
    print()
    print(common.format_table(agg, task.metric_labels, digits=task.digits))
    print(f"\nwrote {args.out}/demo_labels.json, demo_labels.md, demo_labels_summary.md, demo_labels.png "
          f"({total_s:.1f} s)")
    return 0


# 0% = the poisoned model's accuracy, 100% = the retrained model's (LabelsTask.derive)
RESTORED_REFS = {0.0: "0% = poisoned model (θ*)", 100.0: "100% = retrained (gold)"}


def render(payload: Dict[str, Any], out: str, stem: str = "demo_labels", base: Optional[str] = None) -> None:
    """Write <stem>.md (full table), <stem>_summary.md and <stem>.png from a run's payload (the dict saved as
    demo_labels.json; ``render(json.load(open(p)), dir)`` re-renders a saved run)."""
    task = LabelsTask
    agg = payload["aggregate"]
    base = base if base is not None else _baseline_summary(payload["baselines"])
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write(base + "\n\n" + common.format_table(agg, task.metric_labels, markdown=True, digits=task.digits)
                + "\n")
    with open(os.path.join(out, f"{stem}_summary.md"), "w") as f:
        f.write(base + "\n\n" + summary_markdown(payload) + "\n")
    plot(payload, os.path.join(out, f"{stem}.png"))


def plot(payload: Dict[str, Any], path: str):
    """The budget curves of a run (reads ``payload["aggregate"]`` and ``payload["seeds"]``): restored test and Z
    accuracy vs budget, with the 0% (poisoned) and 100% (retrained) levels. Returns the closed matplotlib Figure."""
    return common.plot_budget_curves(
        payload["aggregate"], LabelsTask.plot_metrics, path,
        title=f"label repair on digits, {len(payload['seeds'])} seed(s), mean ± std",
        hlines={m: RESTORED_REFS for m in ("restored_test", "restored_affected")}, setting_fmt="poisoning rate {:g}")


def summary_markdown(payload: Dict[str, Any]) -> str:
    """Compact markdown for the README: per metric, strategy rows × method columns, each cell the means at the
    budgets below 100% ("0.1% / 1% / 5%"), the ``all`` row at 100%; then the cost of each selection strategy and
    of each method (means over seeds and cells)."""
    agg, methods = payload["aggregate"], payload["methods"]
    out = []
    for rate in payload["rates"]:
        sub = [a for a in agg if a["setting"] == rate]
        budgets = sorted({a["budget"] for a in sub if a["strategy"] != "all"})
        strategies = list(dict.fromkeys(a["strategy"] for a in sub))
        for metric, label in (("restored_test", "test accuracy restored %"),
                              ("restored_affected", "affected-point accuracy restored %"),
                              ("agreement", "agreement with the retrained model %"),
                              ("relearn_steps", "relearning steps (higher = more robust)")):
            bl = " / ".join(common.budget_label(b) for b in budgets)
            out.append(f"**{label}** (rate {rate:g}; cells: budget {bl}; mean over {len(payload['seeds'])} seeds)\n")
            out.append("| strategy | " + " | ".join(methods) + " |")
            out.append("|---|" + "---|" * len(methods))
            for st in strategies:
                cells = []
                for m in methods:
                    vals = sorted(((a["budget"], a[metric]["mean"]) for a in sub
                                   if a["strategy"] == st and a["method"] == m), key=lambda t: t[0])
                    cells.append(" / ".join(f"{v:.0f}" if metric != "relearn_steps" else f"{v:.1f}"
                                            for _, v in vals) or "-")
                name = f"{st} (100%)" if st == "all" else st
                out.append(f"| {name} | " + " | ".join(cells) + " |")
            out.append("")
        rows = [r for r in payload["rows"] if r["setting"] == rate]
        out += _paired_lines(rows, methods, budgets, len(payload["seeds"]))
        out.append("**share of S in the classifier layer `fc`** (18% of all parameters; mean over seeds)\n")
        out.append("| strategy | " + " | ".join(common.budget_label(b) for b in budgets) + " |")
        out.append("|---|" + "---|" * len(budgets))
        for st in strategies:
            if st == "all":
                continue
            vals = []
            for b in budgets:
                rs = [r["frac_last_layer"] for r in rows if r["strategy"] == st and r["budget"] == b
                      and r["method"] == methods[0] and "frac_last_layer" in r]
                vals.append(f"{100 * sum(rs) / len(rs):.0f}%" if rs else "-")
            out.append(f"| {st} | " + " | ".join(vals) + " |")
        out.append("")
        out.append("**cost of selection** (once per seed, shared by every budget and method)\n")
        out.append("| strategy | seconds | per-point gradients | per-point HVPs |")
        out.append("|---|---|---|---|")
        for st in strategies:
            rs = [r for r in rows if r["strategy"] == st]
            n = len(rs)
            sg, sh = sum(r["select_gradients"] for r in rs) / n, sum(r["select_hvps"] for r in rs) / n
            out.append(f"| {st} | {sum(r['select_s'] for r in rs) / n:.2f} | {sg:.0f} | {sh:.0f} |")
        out.append("")
        out.append("**cost of one unlearning call** (the chosen hyperparameter; mean over strategies, budgets < 100%, "
                   "and seeds; tuning runs every candidate)\n")
        out.append("| method | seconds | per-point gradients | per-point HVPs | candidates tried: seconds |")
        out.append("|---|---|---|---|---|")
        for m in methods:
            rs = [r for r in rows if r["method"] == m and r["budget"] < 1.0]
            n = max(len(rs), 1)
            out.append(f"| {m} | {sum(r['wall_time_s'] for r in rs) / n:.3f} | "
                       f"{sum(r['n_gradients'] for r in rs) / n:.0f} | {sum(r['n_hvps'] for r in rs) / n:.0f} | "
                       f"{sum(r['tune_s'] for r in rs) / n:.2f} |")
        out.append("")
    return "\n".join(out)


def _paired_lines(rows, methods, budgets, n_seeds, ref="hessian") -> List[str]:
    """Paired (same seed, method, budget) differences ``ref`` − competitor in test and Z accuracy restored %:
    mean ± sample std over the pairs, and how often ``ref`` was strictly better. ``all`` is compared at 100%."""
    by = {(r["seed"], r["method"], r["strategy"], r["budget"]): r for r in rows}
    comps = [s for s in dict.fromkeys(r["strategy"] for r in rows) if s != ref]
    if not any(r["strategy"] == ref for r in rows) or not comps:
        return []
    out = [f"**paired comparison: `{ref}` minus each strategy** (restored test % / restored Z %, mean ± std over "
           f"{len(methods)} methods × {n_seeds} seeds; wins = pairs where `{ref}` is strictly better)\n",
           "| vs | " + " | ".join(common.budget_label(b) for b in budgets) + " |",
           "|---|" + "---|" * len(budgets)]
    for c in comps:
        cells = []
        for b in budgets:
            d_t, d_z = [], []
            for (seed, m, s, bb), r in by.items():
                if s != ref or bb != b:
                    continue
                o = by.get((seed, m, c, 1.0 if c == "all" else b))
                if o is None:
                    continue
                d_t.append(r["restored_test"] - o["restored_test"])
                d_z.append(r["restored_affected"] - o["restored_affected"])
            if not d_t:
                cells.append("-")
                continue
            ms = [common.aggregate([{"setting": 0, "method": 0, "strategy": 0, "budget": 0, "v": v} for v in d],
                                   ["v"])[0]["v"] for d in (d_t, d_z)]
            wins = sum(v > 0 for v in d_t)
            cells.append(f"{ms[0]['mean']:+.0f} ± {ms[0]['std']:.0f} / {ms[1]['mean']:+.0f} ± {ms[1]['std']:.0f} "
                         f"({wins}/{len(d_t)} wins)")
        out.append(f"| {c}{' (100%)' if c == 'all' else ''} | " + " | ".join(cells) + " |")
    out.append("")
    return out


def _baseline_summary(baselines) -> str:
    lines = []
    for rate in dict.fromkeys(b["setting"] for b in baselines):
        bs = [b for b in baselines if b["setting"] == rate]
        agg = common.aggregate([{"setting": rate, "method": "-", "strategy": "-", "budget": 0,
                                 **{f"{w}_{m}": b[w][m] for w in ("before", "gold") for m in b["before"]}}
                                for b in bs], [f"{w}_{m}" for w in ("before", "gold")
                                               for m in ("test_acc", "affected_acc", "relearn_steps")])[0]
        lines.append(f"rate {rate:g}: |Z| = {bs[0]['n_affected']} of {bs[0]['n_train']} training points, "
                     f"{bs[0]['n_params']} parameters, {len(bs)} seed(s). "
                     f"poisoned model: test {common.fmt(agg['before_test_acc'])}%, Z acc "
                     f"{common.fmt(agg['before_affected_acc'])}%;  retrained (gold): test "
                     f"{common.fmt(agg['gold_test_acc'])}%, Z acc {common.fmt(agg['gold_affected_acc'])}%, "
                     f"relearn {common.fmt(agg['gold_relearn_steps'])} steps")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
