"""The demos' figures: the exposure / perplexity trade-off plot and the labels budget curves (log x, markers exactly at
the budgets). Synthetic inputs only: no model is trained here."""

import json
import math

import pytest

pytest.importorskip("matplotlib")

from sapsel_kernels.demo import canary, labels, plots  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"
BUDGETS = (0.001, 0.01, 0.05)


def _points(n_seeds):
    pts = []
    for si, setting in enumerate(("lstm:r4", "transformer:r16")):
        for mi, method in enumerate(("first_order", "second_order")):
            for ti, strategy in enumerate(("hessian", "random", "my_strategy")):
                for bi, b in enumerate(BUDGETS):
                    pts.append({"setting": setting, "strategy": strategy, "budget": b, "method": method,
                                "exposure": 20.0 - 3 * bi - ti + si, "exposure_std": 1.5 if n_seeds > 1 else 0.0,
                                "ppl_change_pct": 2.0 * bi + mi - 0.5 * ti,
                                "ppl_change_std": 0.4 if n_seeds > 1 else 0.0})
            pts.append({"setting": setting, "strategy": "all", "budget": 1.0, "method": method, "exposure": 1.0,
                        "exposure_std": 0.0, "ppl_change_pct": 12.0, "ppl_change_std": 0.0})
    pts[0]["exposure"] = None  # a missing value (NaN in the JSON) is left out, not an error
    return pts


@pytest.mark.parametrize("n_seeds", [1, 3])
@pytest.mark.parametrize("by_method", ["rows", "colour"])
def test_plot_tradeoff_writes_png(tmp_path, n_seeds, by_method):
    path = tmp_path / "sub" / "tradeoff.png"
    before = {"lstm:r4": (17.6, 0.8 if n_seeds > 1 else 0.0), "transformer:r16": 47.2}
    fig = plots.plot_tradeoff(_points(n_seeds), str(path), before=before, gold={"lstm:r4": 0.9}, title="t",
                              n_seeds=n_seeds, by_method=by_method)
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > 10_000
    axes = fig.axes
    assert len(axes) == (4 if by_method == "rows" else 2)  # settings x rules, or settings with colour = rule
    ax = axes[0]
    xy = [([float(v) for v in line.get_xdata()], [float(v) for v in line.get_ydata()]) for line in ax.get_lines()]
    assert ([0.0, 0.0], [0.0, 1.0]) in xy  # the vertical line at 0% perplexity change (axes coordinates in y)
    assert ([0.0, 1.0], [17.6, 17.6]) in xy and ([0.0, 1.0], [0.9, 0.9]) in xy  # before and gold of the setting
    texts = fig.texts + ([fig._suptitle] if fig._suptitle is not None else [])
    assert any(f"{n_seeds} seed" in t.get_text() for t in texts)
    has_bars = any(type(c).__name__ == "LineCollection" for a in axes for c in a.collections)
    assert has_bars == (n_seeds > 1)


def test_plot_tradeoff_limit_and_target_lines(tmp_path):
    fig = plots.plot_tradeoff(_points(1), str(tmp_path / "t.png"), before=17.6, gold={"lstm:r4": 0.9}, x_limit=5.0,
                              gold_margin=2.0)
    ax = fig.axes[0]
    xy = [([float(v) for v in line.get_xdata()], [float(v) for v in line.get_ydata()]) for line in ax.get_lines()]
    assert ([5.0, 5.0], [0.0, 1.0]) in xy and ([0.0, 1.0], [2.9, 2.9]) in xy
    labels_ = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    assert "target: gold + 2" in labels_ and "perplexity limit 5%" in labels_
    # the second setting has no gold: no target line there
    assert not any(y == [0.9 + 2.0] * 2 for _, y in
                   ([list(map(float, ln.get_xdata())), list(map(float, ln.get_ydata()))] for ln in fig.axes[1].lines))


def test_plot_tradeoff_rejects_bad_input(tmp_path):
    p = str(tmp_path / "x.png")
    with pytest.raises(ValueError, match="no points"):
        plots.plot_tradeoff([], p, before=1.0)
    bad = _points(1)[1:2]
    del bad[0]["ppl_change_std"]
    with pytest.raises(ValueError, match="ppl_change_std"):
        plots.plot_tradeoff(bad, p, before=1.0)
    with pytest.raises(ValueError, match="budget"):
        plots.plot_tradeoff([dict(_points(1)[1], budget=5)], p, before=1.0)
    with pytest.raises(ValueError, match="by_method"):
        plots.plot_tradeoff(_points(1), p, before=1.0, by_method="columns")
    with pytest.raises(ValueError, match="n_seeds"):
        plots.plot_tradeoff(_points(1), p, before=1.0, n_seeds=0)
    with pytest.raises(ValueError, match="x_limit"):
        plots.plot_tradeoff(_points(1), p, before=1.0, x_limit=float("nan"))
    with pytest.raises(ValueError, match="gold_margin needs gold"):
        plots.plot_tradeoff(_points(1), p, before=1.0, gold_margin=2.0)


def test_points_and_levels_from_a_canary_payload(tmp_path):
    agg = [{"setting": "lstm:r4", "method": "first_order", "strategy": "hessian", "budget": 0.01, "n_seeds": 2,
            "k": 9, "exposure_sn": {"mean": 5.0, "std": 1.0}, "ppl_change_pct": {"mean": None, "std": None}}]
    (p,) = plots.points_from_aggregate(agg)
    assert p["exposure"] == 5.0 and p["exposure_std"] == 1.0 and math.isnan(p["ppl_change_pct"])
    with pytest.raises(KeyError, match="test_ppl"):
        plots.points_from_aggregate(agg, ppl="test_ppl")
    bl = [{"setting": "a", "before": {"exposure_sn": 10.0}, "gold": {}},
          {"setting": "a", "before": {"exposure_sn": 12.0}, "gold": {}}]
    assert plots.baseline_levels(bl, "before") == {"a": (11.0, pytest.approx(math.sqrt(2)))}
    assert plots.baseline_levels(bl, "gold") == {}
    # canary.plot on the JSON form of a payload (no gold model: no gold line)
    agg[0]["ppl_change_pct"] = {"mean": 3.0, "std": 0.5}
    payload = json.loads(json.dumps({"aggregate": agg, "baselines": bl, "seeds": [0, 1]}))
    payload["baselines"][0]["setting"] = payload["baselines"][1]["setting"] = "lstm:r4"
    fig = canary.plot(payload, str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG
    assert "2 seeds" in fig._suptitle.get_text()


def test_labels_plot_log_axis_markers_at_the_budgets(tmp_path):
    agg = []
    for method in ("first_order", "sam_finetune"):
        for strategy in ("hessian", "random", "last_layer"):
            for b in BUDGETS:  # identical values for two strategies: they must stay at the same x, not be shifted
                v = 10.0 if strategy != "last_layer" else 30.0
                agg.append({"setting": 0.2, "method": method, "strategy": strategy, "budget": b, "k": 1,
                            "restored_test": {"mean": v, "std": 2.0}, "restored_affected": {"mean": v, "std": 0.0}})
        agg.append({"setting": 0.2, "method": method, "strategy": "all", "budget": 1.0, "k": 1,
                    "restored_test": {"mean": 60.0, "std": 1.0}, "restored_affected": {"mean": 70.0, "std": 1.0}})
    fig = labels.plot({"aggregate": agg, "seeds": [0, 1, 2]}, str(tmp_path / "l.png"))
    assert (tmp_path / "l.png").read_bytes()[:8] == PNG
    assert len(fig.axes) == 4
    want = [100 * b for b in BUDGETS]
    for ax in fig.axes:
        assert ax.get_xscale() == "log"
        curves = {c.get_label(): c.lines[0] for c in ax.containers}  # errorbar containers: (data line, caps, bars)
        assert set(curves) == {"hessian", "random", "last_layer"}
        for line in curves.values():
            assert [float(x) for x in line.get_xdata()] == want  # exactly the budgets (%), no offsets
        flat = {float(line.get_ydata()[0]) for line in ax.get_lines() if line.get_label().startswith(("0%", "100%"))}
        assert flat == {0.0, 100.0}  # the 0% (poisoned) and 100% (retrained) reference levels
