"""Figures shared by the demos: the privacy/utility trade-off of unlearning (what a secret's exposure costs in test
perplexity), one marker per strategy × budget × update rule.

matplotlib is imported inside the functions (Agg backend), so importing this module costs nothing.
"""

import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

# one look per strategy name across every figure of the package (the hessian strategies in the warm colours)
STRATEGY_STYLE = {
    "hessian": ("o", "tab:red"),
    "hessian_smallest": ("v", "tab:orange"),
    "hessian_affected": ("^", "tab:brown"),
    "hessian_corrected": ("<", "tab:pink"),
    "hessian_ratio": ("p", "darkgoldenrod"),
    "last_layer": ("s", "tab:blue"),
    "random": ("D", "tab:gray"),
    "grad_abs": ("P", "tab:purple"),
    "ssd": ("X", "tab:cyan"),
    "fisher": ("X", "tab:cyan"),
    "all": ("*", "black"),
}
_FALLBACK_MARKERS = ("h", "p", "d", "8", ">", "H")
_FALLBACK_COLOURS = ("tab:olive", "tab:green", "darkblue", "darkred", "teal", "goldenrod")
POINT_KEYS = ("setting", "strategy", "budget", "method", "exposure", "exposure_std", "ppl_change_pct",
              "ppl_change_std")

Level = Union[float, Tuple[float, float], None]


def strategy_styles(strategies: Sequence[str]) -> Dict[str, Tuple[str, str]]:
    """{strategy: (marker, colour)}: the fixed :data:`STRATEGY_STYLE` for the package's names, unused fallbacks for
    any other name (in order)."""
    out, j = {}, 0
    for s in strategies:
        if s in STRATEGY_STYLE:
            out[s] = STRATEGY_STYLE[s]
        else:
            out[s] = (_FALLBACK_MARKERS[j % len(_FALLBACK_MARKERS)], _FALLBACK_COLOURS[j % len(_FALLBACK_COLOURS)])
            j += 1
    return out


def _num(v) -> float:
    """A JSON value as a float: None (how ``common.write_json`` stores NaN) -> NaN."""
    return float("nan") if v is None else float(v)


def points_from_aggregate(agg: Sequence[Mapping[str, Any]], *, exposure: str = "exposure_sn",
                          ppl: str = "ppl_change_pct") -> List[Dict[str, Any]]:
    """:func:`plot_tradeoff`'s points from ``common.aggregate`` rows (each metric a {"mean", "std"} dict): the
    ``exposure`` metric on y and the ``ppl`` metric on x. A missing metric raises KeyError naming it."""
    out = []
    for a in agg:
        for key in (exposure, ppl):
            if key not in a:
                raise KeyError(f"aggregate row {a.get('setting')}/{a.get('strategy')}/{a.get('method')} has no "
                               f"metric {key!r}")
        ex, pp = a[exposure] or {}, a[ppl] or {}
        out.append({"setting": a["setting"], "strategy": a["strategy"], "budget": float(a["budget"]),
                    "method": a["method"], "exposure": _num(ex.get("mean")), "exposure_std": _num(ex.get("std")),
                    "ppl_change_pct": _num(pp.get("mean")), "ppl_change_std": _num(pp.get("std"))})
    return out


def baseline_levels(baselines: Sequence[Mapping[str, Any]], which: str, key: str = "exposure_sn"
                    ) -> Dict[Any, Tuple[float, float]]:
    """{setting: (mean, sample std)} over seeds of ``baseline[which][key]`` (``which`` = "before" or "gold");
    settings whose baselines lack it (no gold model trained) are left out."""
    vals: Dict[Any, List[float]] = {}
    for b in baselines:
        d = b.get(which) or {}
        if d.get(key) is not None and math.isfinite(float(d[key])):
            vals.setdefault(b["setting"], []).append(float(d[key]))
    out = {}
    for s, v in vals.items():
        m = sum(v) / len(v)
        out[s] = (m, math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0)
    return out


def _level(levels, setting) -> Tuple[float, float]:
    """(mean, std) of a reference level given as a float, a (mean, std) pair or a {setting: either} mapping."""
    v = levels.get(setting) if isinstance(levels, Mapping) else levels
    if v is None:
        return float("nan"), 0.0
    if isinstance(v, (tuple, list)):
        return float(v[0]), float(v[1])
    return float(v), 0.0


def _budget_text(b: float) -> str:
    return "100%" if b >= 1.0 else f"{100 * b:g}%"


def plot_tradeoff(points: Sequence[Mapping[str, Any]], path: str, *,
                  before: Union[Mapping[Any, Level], Level],
                  gold: Union[Mapping[Any, Level], Level] = None,
                  title: str = "", n_seeds: int = 1, by_method: str = "rows",
                  xlabel: str = "test perplexity change (%)",
                  ylabel: str = "exposure after unlearning (bits)",
                  before_label: str = "before unlearning (θ*)", gold_label: str = "retrained without it (gold)",
                  connect: bool = True, x_limit: Optional[float] = None, gold_margin: Optional[float] = None,
                  dpi: int = 110):
    """Scatter exposure after unlearning (y) against the test-perplexity change (x) and save a PNG at ``path``.

    ``points``: dicts with the keys of :data:`POINT_KEYS` (``setting``, ``strategy``, ``budget`` (fraction in (0, 1]),
    ``method``, ``exposure``, ``exposure_std``, ``ppl_change_pct``, ``ppl_change_std``; floats, NaN or None for a
    missing value: such a point is left out). One panel per setting (columns); with several update rules
    (``method``), ``by_method="rows"`` gives one panel row per rule and ``"colour"`` one panel per setting with
    colour = rule. Marker shape = strategy (colour = strategy too in the "rows" layout), marker size = budget
    (larger = more parameters); ``connect`` joins a strategy's budgets in order with a thin line.

    ``before`` / ``gold``: the exposure of θ* and of the retrained model, each a float, a (mean, std) pair, or a
    mapping {setting: either} (a setting missing from the mapping, or None, draws no line): dashed / dotted
    horizontal lines, ±std bands when std > 0. A vertical line marks 0% perplexity change. ``n_seeds`` is written
    on the figure; when > 1 every point gets ±std error bars in both directions (``*_std``). ``x_limit`` (e.g. 5.0)
    draws the perplexity budget as a vertical red line; ``gold_margin`` (e.g. 2.0) the target "gold + margin" as a
    green dash-dot line per setting: a point left of the one and below the other meets both.

    Raises ValueError for no points, a point without one of the keys or with a budget outside (0, 1], ``n_seeds``
    < 1 or an unknown ``by_method``;
    OSError if ``path`` cannot be written. The parent folder is created. Returns the (closed) matplotlib Figure,
    for inspection."""
    pts = list(points)
    if not pts:
        raise ValueError("plot_tradeoff: no points to plot")
    for p in pts:
        missing = [k for k in POINT_KEYS if k not in p]
        if missing:
            raise ValueError(f"plot_tradeoff: point {dict(p)!r} lacks the key(s) {missing}")
        b = p["budget"]
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 < float(b) <= 1.0:
            raise ValueError(f"plot_tradeoff: budget must be a fraction in (0, 1], got {b!r} in point {dict(p)!r}")
    if by_method not in ("rows", "colour"):
        raise ValueError(f"plot_tradeoff: by_method must be 'rows' or 'colour', got {by_method!r}")
    if int(n_seeds) < 1:
        raise ValueError(f"plot_tradeoff: n_seeds must be >= 1, got {n_seeds!r}")
    for name, v in (("x_limit", x_limit), ("gold_margin", gold_margin)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise ValueError(f"plot_tradeoff: {name} must be a finite number or None, got {v!r}")
    if gold_margin is not None and gold is None:
        raise ValueError("plot_tradeoff: gold_margin needs gold")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    settings = list(dict.fromkeys(p["setting"] for p in pts))
    methods = list(dict.fromkeys(p["method"] for p in pts))
    strategies = list(dict.fromkeys(p["strategy"] for p in pts))
    styles = strategy_styles(strategies)
    budgets = sorted({float(p["budget"]) for p in pts})
    # marker area grows geometrically with the budget's rank, 14 -> 180 pt² (four budgets: ×2.35 per step)
    sizes = {b: 14.0 * 13.0 ** (i / max(len(budgets) - 1, 1)) for i, b in enumerate(budgets)}
    cmap = plt.get_cmap("tab10")
    method_colour = {m: cmap(i % 10) for i, m in enumerate(methods)}
    rows = methods if by_method == "rows" and len(methods) > 1 else [None]
    by_strategy = rows != [None] or len(methods) == 1  # colour = strategy, else colour = update rule
    nrow, ncol = len(rows), len(settings)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.7 * ncol + 0.6, 2.6 * nrow + 1.2), squeeze=False, sharey="col",
                             layout="constrained")
    err = int(n_seeds) > 1

    for r, row_method in enumerate(rows):
        for c, setting in enumerate(settings):
            ax = axes[r][c]
            sub = [p for p in pts if p["setting"] == setting and (row_method is None or p["method"] == row_method)]
            for method in ([row_method] if row_method is not None else methods):
                for strat in strategies:
                    cur = sorted((p for p in sub if p["method"] == method and p["strategy"] == strat),
                                 key=lambda p: float(p["budget"]))
                    cur = [p for p in cur if math.isfinite(_num(p["exposure"])) and
                           math.isfinite(_num(p["ppl_change_pct"]))]
                    if not cur:
                        continue
                    marker, colour = styles[strat]
                    if not by_strategy:
                        colour = method_colour[method]
                    xs = [_num(p["ppl_change_pct"]) for p in cur]
                    ys = [_num(p["exposure"]) for p in cur]
                    if connect and len(cur) > 1:
                        ax.plot(xs, ys, color=colour, lw=0.8, alpha=0.35, zorder=2)
                    if err:
                        xe = [_num(p["ppl_change_std"]) for p in cur]
                        ye = [_num(p["exposure_std"]) for p in cur]
                        ax.errorbar(xs, ys, xerr=[v if math.isfinite(v) else 0.0 for v in xe],
                                    yerr=[v if math.isfinite(v) else 0.0 for v in ye], fmt="none", ecolor=colour,
                                    elinewidth=0.7, alpha=0.45, zorder=2)
                    ax.scatter(xs, ys, s=[sizes[float(p["budget"])] for p in cur], marker=marker, c=[colour],
                               edgecolors="white", linewidths=0.5, zorder=3)
            head = []
            for levels, style, name in ((before, dict(color="black", ls="--"), "θ*"),
                                        (gold, dict(color="tab:green", ls=":"), "gold")):
                m, s = _level(levels, setting) if levels is not None else (float("nan"), 0.0)
                if not math.isfinite(m):
                    continue
                ax.axhline(m, lw=1.2, zorder=1, **style)
                if s > 0:
                    ax.axhspan(m - s, m + s, color=style["color"], alpha=0.08, lw=0, zorder=0)
                head.append(f"{name} {m:.1f}" + (f" ± {s:.1f}" if s > 0 else ""))
                if name == "gold" and gold_margin is not None:
                    ax.axhline(m + gold_margin, color="tab:green", ls="-.", lw=1.0, zorder=1)
            ax.axvline(0.0, color="0.45", lw=0.8, zorder=1)
            if x_limit is not None:
                ax.axvline(float(x_limit), color="tab:red", ls="-", lw=0.9, alpha=0.7, zorder=1)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
            if r == 0:
                ax.set_title(f"{setting}" + (f"  ({', '.join(head)})" if head else ""), fontsize=9)
            if c == 0:
                ax.set_ylabel(f"{row_method}\n{ylabel}" if row_method is not None else ylabel, fontsize=8)
            if r == nrow - 1:
                ax.set_xlabel(xlabel, fontsize=8)

    handles = [Line2D([], [], ls="", marker=styles[s][0], color=styles[s][1] if by_strategy else "0.3", ms=7,
                      label=s) for s in strategies]
    handles += [Line2D([], [], ls="", marker="o", color="0.55", ms=math.sqrt(sizes[b]),
                       label=f"budget {_budget_text(b)}") for b in budgets]
    if not by_strategy:
        handles += [Line2D([], [], ls="", marker="s", color=method_colour[m], ms=7, label=m) for m in methods]
    handles += [Line2D([], [], color="black", ls="--", lw=1.2, label=before_label)]
    if gold is not None:
        handles += [Line2D([], [], color="tab:green", ls=":", lw=1.2, label=gold_label)]
    if gold_margin is not None:
        handles += [Line2D([], [], color="tab:green", ls="-.", lw=1.0, label=f"target: gold + {gold_margin:g}")]
    if x_limit is not None:
        handles += [Line2D([], [], color="tab:red", lw=0.9, label=f"perplexity limit {x_limit:g}%")]
    # about 1.9 inches per legend column at fontsize 8 (the longest labels are ~25 characters)
    ncol = max(1, min(len(handles), 6, int(fig.get_figwidth() / 1.9)))
    fig.legend(handles=handles, loc="outside lower center", ncol=ncol, fontsize=8, frameon=False)
    n = int(n_seeds)
    seeds = f"{n} seed{'s' if n > 1 else ''}" + (": mean ± std over seeds" if err else " (no error bars)")
    fig.suptitle(f"{title}\n{seeds}" if title else seeds, fontsize=10)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return fig
