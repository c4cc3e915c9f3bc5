"""The generic experiment harness behind ``sapsel demo``: a grid strategy × budget × method × seed over a task.

A *task* (labels, canary, ...) supplies the model, data and metrics; this module runs the grid, tunes each method's
step-size-like hyperparameter without looking at the gold standard, aggregates over seeds and writes the table, the
JSON and the plot. A task is any object with:

* ``name`` (str) and ``settings`` (list of hashable settings, e.g. poisoning rates; one experiment per setting);
* ``prepare(seed, setting) -> Setup``: train the model to be repaired and the gold standard (retrained model);
* ``evaluate(model, setup) -> dict[str, float]``: raw metrics of a model (may use the gold model and test data);
* ``derive(metrics, before, gold) -> dict[str, float]``: metrics relative to the unrepaired model and the gold
  standard (e.g. accuracy restored %), given the raw metrics of the model, the unrepaired model and the gold model;
* ``tuning_score(model, setup) -> float``: LOWER is better; used to pick hyperparameters; must not use the gold
  model or the test data (only what an unlearner has: held-out validation data, Z, Z̃);
* ``hparams(method, setup) -> list[dict]``: candidate hyperparameters (one is chosen per cell) and
  ``unlearn_kwargs(method, setup) -> dict``: fixed ones. Together they hold the method config's fields (tau,
  damping, steps, ...; see :mod:`sapsel_kernels.rules`) and ``unlearn``'s own keyword arguments (``UNLEARN_KWARGS``:
  train_data, n_train, ...); :func:`method_call` splits them;
* optional ``selection_info(selection, setup) -> dict``: extra columns describing S (e.g. where it lies);
* ``metric_labels``: ordered {metric key: column header} for the printed table; optional ``plot_metrics``: the
  metric keys a task plots against the budget with :func:`plot_budget_curves` (one panel row each).
"""

import copy
import json
import math
import os
import platform
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from ..errors import NonFiniteError
from ..update.rules import as_method
from ..selection.strategies import HESSIAN_STRATEGIES, parameter_scores, select_parameters, strategy_arguments
from ..update.unlearn import unlearn

SCORE_KEY = {"hessian_smallest": "hessian", "last_layer": "hessian"}
UNLEARN_KWARGS = ("train_data", "n_train", "space", "estimation_mode")


def method_call(method: str, **kw):
    """(method config, unlearn keyword arguments) from a method name and a flat dict of both kinds of arguments; a key
    that is neither raises TypeError (the config's)."""
    call = {k: kw.pop(k) for k in UNLEARN_KWARGS if k in kw}
    return as_method(method, **kw), call


@dataclass
class Setup:
    """Everything one (seed, setting) experiment needs. ``model`` is the trained model to repair (θ*), never
    modified by the harness (each candidate runs on a copy)."""

    model: torch.nn.Module
    loss_fn: Callable
    affected: Any  # Z (batches, as trained on)
    corrected: Any  # Z̃
    data: Any  # the training data as trained on (for training-loss scores)
    gold: Optional[torch.nn.Module] = None  # retrained on the corrected data
    extra: Dict[str, Any] = field(default_factory=dict)


def add_grid_arguments(p, strategies: Sequence[str], methods: Sequence[str], default_budgets: str) -> None:
    """The grid options both demo tasks share: --strategies, --methods, --budgets (validated by their types)."""
    from .. import _argtypes as at

    p.add_argument("--strategies", type=at.choice_list(strategies, "strategy"), default=None,
                   help=f"comma-separated subset of {','.join(strategies)}")
    p.add_argument("--methods", type=at.choice_list(methods, "method"), default=None,
                   help=f"comma-separated subset of {','.join(methods)}")
    p.add_argument("--budgets", type=at.budget_list, default=None,
                   help=f"fractions in (0, 1], comma-separated (default {default_budgets})")


def set_determinism(seed: int, threads: int = 1) -> None:
    """Fix torch's thread count (results can depend on it through reduction order) and every RNG."""
    torch.set_num_threads(int(threads))
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # numpy is optional
        pass


def budget_label(b: float) -> str:
    return "100%" if b >= 1.0 else f"{100 * b:g}%"


def grid_cells(strategies: Sequence[str], budgets: Sequence[float]) -> List[tuple]:
    """(strategy, budget) pairs: every non-``all`` strategy at every budget < 1, and ``all`` once at 100%
    (at 100% every strategy selects every parameter, so it is run once)."""
    cells = []
    for s in strategies:
        if s == "all":
            continue
        cells += [(s, b) for b in budgets if b < 1.0]
    if "all" in strategies or any(b >= 1.0 for b in budgets):
        cells.append(("all", 1.0))
    return cells


def run_grid(task, seeds: Sequence[int], strategies: Sequence[str], budgets: Sequence[float],
             methods: Sequence[str], progress: bool = True, score_kwargs: Optional[Dict[str, Any]] = None,
             log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run the whole grid; returns {"rows": [...], "baselines": [...]} (one row per seed/setting/strategy/budget/
    method; one baseline per seed/setting with the unrepaired and gold models' metrics).

    Each strategy gets the setup's inputs it reads (``strategy_arguments``: loss_fn, data, affected, corrected,
    seed); ``score_kwargs`` (n_probes, hessian_diag's keyword arguments) go to the strategies in
    ``HESSIAN_STRATEGIES`` only."""
    from tqdm.auto import tqdm

    cells = grid_cells(strategies, budgets)
    settings = list(getattr(task, "settings", [None]))
    total = len(seeds) * len(settings) * len(cells) * len(methods)
    bar = tqdm(total=total, desc=f"sapsel demo {task.name}", disable=not progress, unit="run")
    rows, baselines = [], []
    score_kwargs = dict(score_kwargs or {})
    for seed in seeds:
        for setting in settings:
            t0 = time.perf_counter()
            setup = task.prepare(seed, setting)
            prep_s = time.perf_counter() - t0
            before = task.evaluate(setup.model, setup)
            gold = task.evaluate(setup.gold, setup) if setup.gold is not None else {}
            baselines.append({"seed": seed, "setting": setting, "prepare_s": prep_s, "before": before, "gold": gold,
                              **{k: v for k, v in setup.extra.items() if _jsonable(v)}})
            state0 = copy.deepcopy(setup.model.state_dict())
            work = copy.deepcopy(setup.model)
            # shared with the task (e.g. diag_newton reuses the "hessian" estimate); dropped after the setting
            score_cache: Dict[str, Any] = setup.extra.setdefault("score_cache", {})
            for strategy, budget in cells:
                # ---- selection (scores once per strategy, reused for every budget)
                # hessian, hessian_smallest and last_layer all rank by the same training-loss diag(H) estimate
                key = SCORE_KEY.get(strategy, strategy)
                if key not in score_cache and key not in ("all", "random"):
                    inputs = {"loss_fn": setup.loss_fn, "data": setup.data, "affected": setup.affected,
                              "corrected": setup.corrected, "seed": seed}
                    reads = strategy_arguments(key)
                    score_cache[key] = parameter_scores(
                        setup.model, key, **{k: v for k, v in inputs.items() if k in reads},
                        **(score_kwargs if key in HESSIAN_STRATEGIES else {}))
                scores, score_cost = score_cache.get(key, (None, {"wall_time_s": 0.0, "n_gradients": 0,
                                                                  "n_hvps": 0}))
                t1 = time.perf_counter()
                reads = strategy_arguments(strategy, scores=scores is not None)
                sel = select_parameters(setup.model, strategy, budget,
                                        **{k: v for k, v in {"scores": scores, "seed": seed}.items() if k in reads})
                sel_s = score_cost["wall_time_s"] + (time.perf_counter() - t1)
                sel_info = task.selection_info(sel, setup) if hasattr(task, "selection_info") else {}
                for method in methods:
                    bar.set_postfix_str(f"seed={seed} {setting} {strategy} {budget_label(budget)} {method}")
                    row = _run_cell(task, setup, work, state0, sel, method)
                    after = row.pop("_metrics")
                    row.update(seed=seed, setting=setting, strategy=strategy, budget=budget, k=int(sel.k),
                               select_s=sel_s, select_gradients=score_cost["n_gradients"],
                               select_hvps=score_cost["n_hvps"], **sel_info, **after,
                               **task.derive(after, before, gold))
                    rows.append(row)
                    bar.update(1)
            setup.extra.pop("score_cache", None)
    bar.close()
    return {"rows": rows, "baselines": baselines}


def training_hessian_diag(setup, n_probes: int) -> torch.Tensor:
    """The training-loss diag(H) estimate of this setting, the one the ``hessian`` strategies rank by: computed once
    per setting and shared through ``setup.extra["score_cache"]`` (its cost is reported once, as their selection
    cost), so ``diag_newton`` divides by the same estimate instead of paying for another."""
    cache = setup.extra.setdefault("score_cache", {})
    if "hessian" not in cache:
        cache["hessian"] = parameter_scores(setup.model, "hessian", loss_fn=setup.loss_fn, data=setup.data,
                                            n_probes=n_probes)
    return cache["hessian"][0]


def _run_cell(task, setup, work, state0, sel, method) -> Dict[str, Any]:
    """Try every candidate hyperparameter on a fresh copy of θ*, keep the one with the lowest tuning score."""
    fixed = task.unlearn_kwargs(method, setup)
    best = None
    t0 = time.perf_counter()
    n_failed = 0
    for hp in task.hparams(method, setup):
        work.load_state_dict(state0)
        config, call = method_call(method, **fixed, **hp)
        try:
            rep = unlearn(work, setup.loss_fn, setup.affected, setup.corrected, sel, method=config, **call)
        except NonFiniteError:
            # the candidate diverged (NaN/Inf): discarded, the model untouched; any other error (a bad argument or
            # config) is a bug of the task and propagates
            n_failed += 1
            continue
        score = float(task.tuning_score(work, setup))
        if not math.isfinite(score):
            n_failed += 1
            continue
        if best is None or score < best[0]:
            best = (score, hp, rep, copy.deepcopy(work.state_dict()))
    tune_s = time.perf_counter() - t0
    if best is None:  # every candidate diverged: report the unrepaired model
        work.load_state_dict(state0)
        metrics = task.evaluate(work, setup)
        return {"method": method, "hparams": None, "tuning_score": float("nan"), "tune_s": tune_s,
                "n_failed": n_failed, "wall_time_s": 0.0, "n_gradients": 0, "n_hvps": 0, "delta_norm": 0.0,
                "n_changed": 0, "info": {}, "_metrics": metrics}
    score, hp, rep, state = best
    work.load_state_dict(state)
    metrics = task.evaluate(work, setup)
    return {"method": method, "hparams": hp, "tuning_score": score, "tune_s": tune_s, "n_failed": n_failed,
            "wall_time_s": rep.wall_time_s, "n_gradients": rep.n_gradients, "n_hvps": rep.n_hvps,
            "delta_norm": rep.delta_norm, "n_changed": rep.n_changed,
            "info": {k: v for k, v in rep.info.items() if _jsonable(v)}, "_metrics": metrics}


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


# ====================================================================== aggregation and output
def aggregate(rows: List[Dict[str, Any]], metrics: Sequence[str],
              keys: Sequence[str] = ("setting", "method", "strategy", "budget")) -> List[Dict[str, Any]]:
    """Group rows by ``keys``; for each metric, mean and sample std over the group (seeds). Keeps first-seen order."""
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = []
    for key, rs in groups.items():
        a = dict(zip(keys, key))
        a["n_seeds"] = len(rs)
        a["k"] = rs[0].get("k")
        for m in metrics:
            vals = [float(r[m]) for r in rs if r.get(m) is not None and math.isfinite(float(r[m]))]
            n = len(vals)
            mean = sum(vals) / n if n else float("nan")
            std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0 if n else float("nan")
            a[m] = {"mean": mean, "std": std}
        out.append(a)
    return out


def fmt(ms: Dict[str, float], digits: int = 1) -> str:
    if ms is None or not math.isfinite(ms["mean"]):
        return "n/a"
    return f"{ms['mean']:.{digits}f} ± {ms['std']:.{digits}f}"


def format_table(agg: List[Dict[str, Any]], columns: Dict[str, str], markdown: bool = False,
                 digits: Optional[Dict[str, int]] = None) -> str:
    """Aligned text (or markdown) table: setting, method, strategy, budget, k, then ``columns`` as mean ± std."""
    digits = digits or {}
    head = ["setting", "method", "strategy", "budget", "k"] + list(columns.values())
    body = []
    for a in agg:
        body.append([str(a["setting"]), a["method"], a["strategy"], budget_label(a["budget"]), str(a["k"])]
                    + [fmt(a.get(m), digits.get(m, 1)) for m in columns])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)
    w = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w[i]) for i, h in enumerate(head)), "  ".join("-" * x for x in w)]
    lines += ["  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in body]
    return "\n".join(lines)


def environment() -> Dict[str, Any]:
    env = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
           "processor": platform.processor(), "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    try:
        env["loadavg_1m_5m_15m"] = list(os.getloadavg())
    except OSError:
        pass
    return env


def write_json(path: str, payload: Dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def clean(o):  # NaN/Inf -> null; floats to 7 significant digits (float32 results; keeps the file small)
        if isinstance(o, float):
            return float(f"{o:.7g}") if math.isfinite(o) else None
        if isinstance(o, dict):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o

    with open(path, "w") as f:
        json.dump(clean(payload), f, indent=1, allow_nan=False)


def plot_budget_curves(agg: List[Dict[str, Any]], metrics: Dict[str, str], path: str, title: str = "",
                       hlines: Optional[Dict[str, Dict[float, str]]] = None, setting_fmt: str = "{}",
                       setting_hlines: Optional[Dict[Any, Dict[str, Dict[float, str]]]] = None):
    """One panel per (metric row, method column): metric vs budget (%, log x axis, each marker exactly at its
    budget), one line per strategy with ±std bars, told apart by marker, colour and line style where they overlap;
    ``all`` (100%) as a thick dashed horizontal line. Several settings are drawn as separate figure rows.

    ``hlines``: {metric: {y: legend label}} reference levels drawn as thin horizontal lines in that metric's panels
    (e.g. 0% and 100% of a "% restored" metric); ``setting_hlines``: {setting: {metric: {y: label}}}, levels that
    differ per setting (e.g. the poisoned and the retrained models' accuracy); a label keeps one colour in every
    panel. ``setting_fmt`` formats a setting in the row labels. The parent
    folder of ``path`` is created. Returns the (closed) matplotlib Figure, for inspection."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import strategy_styles

    hlines = hlines or {}
    settings = list(dict.fromkeys(a["setting"] for a in agg))
    methods = list(dict.fromkeys(a["method"] for a in agg))
    strategies = [s for s in dict.fromkeys(a["strategy"] for a in agg) if s != "all"]
    styles = strategy_styles(strategies)
    # four dash patterns cycled: two strategies on the same values still show as one line of alternating dashes
    dashes = ["-", (0, (5, 2)), (0, (1, 1.5)), (0, (6, 2, 1, 2))]
    ref_colours = ["0.35", "tab:green", "tab:blue", "tab:olive"]
    ref_colour: Dict[str, str] = {}  # reference label -> its colour, the same in every panel
    nrow = len(metrics) * len(settings)
    fig, axes = plt.subplots(nrow, len(methods), figsize=(3.3 * len(methods), 2.8 * nrow + 0.5), squeeze=False,
                             sharex=True, layout="constrained")
    budgets = sorted({a["budget"] for a in agg if a["budget"] < 1.0})
    for si, setting in enumerate(settings):
        for mi, (metric, label) in enumerate(metrics.items()):
            r = si * len(metrics) + mi
            for c, method in enumerate(methods):
                ax = axes[r][c]
                sub = [a for a in agg if a["setting"] == setting and a["method"] == method]
                levels = {**hlines.get(metric, {}), **(setting_hlines or {}).get(setting, {}).get(metric, {})}
                for y, text in sorted(levels.items()):
                    colour = ref_colour.setdefault(text, ref_colours[len(ref_colour) % len(ref_colours)])
                    ax.axhline(y, color=colour, lw=1.0, zorder=1, label=text)
                for j, strat in enumerate(strategies):
                    pts = sorted(((a["budget"], a[metric]) for a in sub if a["strategy"] == strat
                                  and a[metric] is not None and a[metric]["mean"] is not None),
                                 key=lambda t: t[0])
                    if not pts:
                        continue
                    marker, colour = styles[strat]
                    eb = ax.errorbar([100 * b for b, _ in pts], [m["mean"] for _, m in pts],
                                     yerr=[m["std"] or 0.0 for _, m in pts], marker=marker, ms=4.5, lw=1.1,
                                     ls=dashes[j % len(dashes)], capsize=2, elinewidth=0.7, color=colour,
                                     mfc="none" if j % 2 else colour, label=strat, zorder=3)
                    for part in (*eb[1], *eb[2]):  # faint bars: nine strategies share each budget's x
                        part.set_alpha(0.4)
                allp = [a[metric] for a in sub if a["strategy"] == "all" and a[metric] is not None]
                if allp and allp[0]["mean"] is not None:
                    ax.axhline(allp[0]["mean"], color="k", ls=(0, (6, 3)), lw=1.6, zorder=2, label="all (100%)")
                ax.set_xscale("log")
                if budgets:
                    ax.set_xticks([100 * t for t in budgets])
                    ax.set_xticklabels([f"{100 * t:g}" for t in budgets])
                    ax.minorticks_off()
                    # a third of a decade of margin so that the end markers and their error bars are not cut
                    ax.set_xlim(100 * budgets[0] / 1.6, 100 * budgets[-1] * 1.6)
                ax.grid(alpha=0.3)
                if r == 0:
                    ax.set_title(method, fontsize=9)
                if c == 0:
                    row = f"{label}\n{setting_fmt.format(setting)}" if len(settings) > 1 else label
                    ax.set_ylabel(row, fontsize=8)
                if r == nrow - 1:
                    ax.set_xlabel("budget (% of parameters)", fontsize=8)
                ax.tick_params(labelsize=7)
    by_label = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            by_label.setdefault(lab, h)
    fig.legend(list(by_label.values()), list(by_label.keys()), loc="outside lower center",
               ncol=min(len(by_label), 6), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig
