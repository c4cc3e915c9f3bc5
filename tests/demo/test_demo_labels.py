"""The labels demo: data/poisoning/metric building blocks, the harness's aggregation, and one `sapsel demo --quick`
run end to end (structure + basic sanity: unlearning raises the affected points' accuracy over the poisoned model).
The paper's claim (Hessian-selected parameters beat the alternatives) is measured by the demo, never asserted here."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from sapsel_kernels.demo import common, labels



@pytest.mark.parametrize("task_name", ["labels", "canary"])
@pytest.mark.parametrize("quick", [True, False])
def test_task_hyperparameters_are_method_configs(task_name, quick):
    # every candidate of every task/method splits into a valid method config plus unlearn's own keyword arguments
    from sapsel_kernels.demo import canary
    from sapsel_kernels.rules import METHODS
    from sapsel_kernels.strategies import STRATEGIES

    task = labels.LabelsTask(quick=quick) if task_name == "labels" else canary.CanaryTask(["lstm:r8"], quick=quick)
    mod = labels if task_name == "labels" else canary
    assert set(mod.DEFAULT_STRATEGIES) <= set(STRATEGIES) and "fisher" not in mod.DEFAULT_STRATEGIES
    extra = {"n_affected": 5, "n_train": 100, "hessian_data": [], "hessian_clean": [], "retain": [],
             "score_cache": {"hessian": (torch.zeros(3), {})}}
    setup = common.Setup(model=None, loss_fn=None, affected=None, corrected=None, data=None, extra=extra)
    for method in METHODS:
        hps = task.hparams(method, setup)
        assert hps
        for hp in hps:
            cfg, call = common.method_call(method, **task.unlearn_kwargs(method, setup), **hp)
            assert cfg.name == method and set(call) <= set(common.UNLEARN_KWARGS)
            # only arguments the method reads (unlearn raises on the others)
            train_args = {"train_data", "n_train"} & set(call)
            if cfg.train_use() is None:
                assert not train_args, (method, sorted(call))
            elif cfg.train_use() == "n_train":  # DiagNewton(diag=...): n_train or train_data, not both
                assert len(train_args) == 1, (method, sorted(call))
    with pytest.raises(TypeError):
        common.method_call("first_order", damping=1.0)


def test_tuning_discards_only_diverged_candidates(monkeypatch):
    # a NaN/Inf candidate (NonFiniteError) is counted as failed; any other ValueError (a bad argument or config) is a
    # bug and propagates instead of being counted as a diverged candidate
    from sapsel_kernels.errors import NonFiniteError

    class Task:
        def unlearn_kwargs(self, method, setup):
            return {}

        def hparams(self, method, setup):
            return [{"tau": 0.1}, {"tau": 0.2}]

        def tuning_score(self, model, setup):
            return 0.0

        def evaluate(self, model, setup):
            return {}

    model = torch.nn.Linear(2, 2)
    setup = common.Setup(model=model, loss_fn=None, affected=None, corrected=None, data=None)

    def diverged(*a, **kw):
        raise NonFiniteError("unlearn: G contains NaN/Inf")

    monkeypatch.setattr(common, "unlearn", diverged)
    row = common._run_cell(Task(), setup, model, model.state_dict(), None, "first_order")
    assert row["n_failed"] == 2 and row["hparams"] is None

    def misconfigured(*a, **kw):
        raise ValueError("n_train applies only to the methods ('second_order', 'diag_newton')")

    monkeypatch.setattr(common, "unlearn", misconfigured)
    with pytest.raises(ValueError, match="applies only"):
        common._run_cell(Task(), setup, model, model.state_dict(), None, "first_order")


def test_digits_split_is_real_and_disjoint():
    s = labels.load_digits_split(0)
    sizes = {k: len(v[1]) for k, v in s.items()}
    assert sizes == {"test": 450, "val": 250, "train": 1797 - 700}
    x = torch.cat([s[k][0] for k in s]).flatten(1)
    assert torch.unique(x, dim=0).shape[0] > 1700  # real images, (almost) no duplicates across splits
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0 and x.dtype == torch.float32
    assert sorted(torch.unique(s["train"][1]).tolist()) == list(range(10))


@pytest.mark.parametrize("rate", [0.1, 0.3])
def test_poison_labels_flips_pairs_at_rate(rate):
    y = labels.load_digits_split(1)["train"][1]
    yp, idx = labels.poison_labels(y, rate, seed=1)
    changed = torch.nonzero(yp != y).reshape(-1)
    assert torch.equal(changed, idx)
    assert torch.equal(yp[idx], 9 - y[idx])  # 0<->9, 1<->8, 2<->7, 3<->6, 4<->5
    for c in range(10):
        n_c = int((y == c).sum())
        assert int((y[idx] == c).sum()) == round(rate * n_c)
    yp2, idx2 = labels.poison_labels(y, rate, seed=1)
    assert torch.equal(yp, yp2) and torch.equal(idx, idx2)


def test_training_is_deterministic_and_cnn_size():
    torch.set_num_threads(1)
    s = labels.load_digits_split(0)
    x, y = s["train"][0][:200], s["train"][1][:200]
    a = labels.train_model(x, y, seed=5, epochs=2)
    b = labels.train_model(x, y, seed=5, epochs=2)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert sum(p.numel() for p in a.parameters()) == 7178
    assert a.fc.weight.numel() + a.fc.bias.numel() == 1290


def test_relearn_steps_and_restored_formula():
    torch.manual_seed(0)
    model = labels.DigitsCNN().eval()
    x = torch.rand(30, 1, 8, 8)
    y = model(x).argmax(1)
    assert labels.relearn_steps(model, x, y, level=1.0) == 0  # already at the level
    y2 = (y + 1) % 10
    steps = labels.relearn_steps(model, x, y2, level=0.5, lr=0.5, cap=7)
    assert 1 <= steps <= 7
    d = labels.LabelsTask.derive({"test_acc": 95.0, "affected_acc": 60.0}, {"test_acc": 90.0, "affected_acc": 50.0},
                                 {"test_acc": 100.0, "affected_acc": 100.0})
    assert d == {"restored_test": 50.0, "restored_affected": 20.0}


def test_aggregate_mean_std_and_table():
    rows = [{"setting": 0.2, "method": "m", "strategy": "s", "budget": 0.01, "k": 3, "x": v} for v in (1.0, 2.0, 6.0)]
    agg = common.aggregate(rows, ["x"])
    assert len(agg) == 1 and agg[0]["n_seeds"] == 3
    assert agg[0]["x"]["mean"] == pytest.approx(3.0)
    assert agg[0]["x"]["std"] == pytest.approx(math.sqrt(7.0))  # sample std of 1, 2, 6
    table = common.format_table(agg, {"x": "X"})
    assert "3.0 ± 2.6" in table and "1%" in table
    assert common.grid_cells(["hessian", "all"], [0.01, 1.0]) == [("hessian", 0.01), ("all", 1.0)]


def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the demo runs on the default CPU path (C++ or reference), not the interpreter
    cmd = [sys.executable, "-m", "sapsel_kernels", "demo", "--quick", "--out", str(out), "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "restored test %" in r.stdout
    for f in ("demo_labels.json", "demo_labels.md", "demo_labels.png"):
        assert (out / f).stat().st_size > 0
    assert (out / "demo_labels.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.loads((out / "demo_labels.json").read_text())
    cells = common.grid_cells(res["strategies"], res["budgets"])
    assert len(res["rows"]) == len(cells) * len(res["methods"]) * len(res["seeds"]) * len(res["rates"])
    assert len(res["aggregate"]) == len(cells) * len(res["methods"]) * len(res["rates"])
    (base,) = res["baselines"]
    before, gold = base["before"], base["gold"]
    # the poisoning worked and the gold standard repairs it
    assert gold["affected_acc"] > before["affected_acc"] + 20 and gold["test_acc"] > before["test_acc"]
    n_params = base["n_params"]
    for row in res["rows"]:
        for key in ("test_acc", "affected_acc", "agreement", "relearn_steps", "restored_test", "restored_affected",
                    "wall_time_s", "n_gradients", "hparams", "k", "n_changed"):
            assert key in row, key
        assert row["n_changed"] <= row["k"] <= n_params
        assert row["n_gradients"] > 0
    # basic sanity, not the paper's claim: updating every parameter repairs part of the poisoning for each method
    for row in res["rows"]:
        if row["strategy"] == "all":
            assert row["affected_acc"] > before["affected_acc"], row
