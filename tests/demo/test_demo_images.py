"""The images demo (`sapsel demo --task images`): its data, poisoning and models, and one `--quick` run end to end.

What is asserted is structure and the safety of the rules (no update wrecks the model), never the paper's claim,
which the demo measures (docs/unlearning.md)."""

import json
import math

import pytest
import torch

from sapsel_kernels.demo import common, images, labels

pytest.importorskip("sklearn")


def test_shapes_are_seeded_balanced_and_in_range():
    x, y = images.make_shapes(200, seed=3)
    x2, y2 = images.make_shapes(200, seed=3)
    x3, _ = images.make_shapes(200, seed=4)
    assert x.shape == (200, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x, x2) and torch.equal(y, y2) and not torch.equal(x, x3)
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    assert torch.bincount(y, minlength=10).tolist() == [20] * 10


def test_backdoor_poison_and_correction():
    split = images.load_split("digits", 0)
    xp, yp, idx, xc, yc = images.poison(split, "backdoor", 0)
    x, y = split["train"]
    assert idx.numel() == round(images.BACKDOOR_RATE * len(y)) and bool((y[idx] != images.TARGET).all())
    assert bool((yp[idx] == images.TARGET).all()) and torch.equal(yc, yp)  # Z̃ keeps the label: features only
    assert bool((xp[idx][..., -3:, -3:] == images.add_patch(x[idx])[..., -3:, -3:]).all())
    assert bool((xc[idx][..., -3:, -3:] == 0).all())
    rest = torch.ones(len(y), dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(xp[rest], x[rest]) and torch.equal(xc[rest], x[rest]) and torch.equal(yp[rest], y[rest])
    # fixed_backdoor: the same points, patch zeroed and the true labels restored
    _, ypf, idf, xcf, ycf = images.poison(split, "fixed_backdoor", 0)
    assert torch.equal(idf, idx) and torch.equal(ypf, yp) and torch.equal(ycf, y) and torch.equal(xcf, xc)
    assert "digits/cnn/fixed_backdoor" in images.ALL_SETTINGS and "digits/cnn/fixed_backdoor" not in images.SETTINGS
    _, yf, fidx, _, yfc = images.poison(split, "flips", 0)
    assert torch.equal(yf[fidx], labels.PAIR[y[fidx]]) and torch.equal(yfc, y)


@pytest.mark.parametrize("arch", images.MODELS)
@pytest.mark.parametrize("shape", [(1, 8), (3, 16)])
def test_models_have_batchnorm_and_the_right_output(arch, shape):
    c, s = shape
    m = images.build_model(arch, torch.zeros(2, c, s, s))
    assert m(torch.zeros(4, c, s, s)).shape == (4, 10)
    assert any(isinstance(mod, torch.nn.BatchNorm2d) for mod in m.modules())
    if arch == "resnet":
        assert m.block2.proj is not None and m.block1.proj is None


def test_images_quick_end_to_end(tmp_path):
    out = tmp_path / "run"
    assert images.main(["--quick", "--out", str(out), "--no-progress"]) == 0
    d = json.loads((out / "demo_images.json").read_text())
    assert (out / "demo_images.png").stat().st_size > 10_000 and (out / "demo_images.md").exists()
    assert d["settings"] == ["digits/cnn/flips", "digits/resnet/backdoor"]
    assert len(d["rows"]) == 2 * 3 * 2  # settings × strategies at 1% × rules
    base = {b["setting"]: b for b in d["baselines"]}
    for r in d["rows"]:
        before = base[r["setting"]]["before"]
        assert r["k"] == math.ceil(0.01 * base[r["setting"]]["n_params"])
        assert 0 <= r["test_acc"] <= 100 and r["cost_ratio"] > 0 and 0 <= r["relearn_steps"] <= images.RELEARN_CAP
        if r["method"] == "second_order":  # the safe rule never wrecks the model (the plain step did: 10%)
            assert r["info"]["accepted"] in (True, False) and r["test_acc"] > before["test_acc"] - 10, r
    bd = base["digits/resnet/backdoor"]
    # the backdoor works, and retraining removes it
    assert bd["before"]["backdoor"] > 50 and bd["gold"]["backdoor"] < 20
    # --merge: a second seed of the same grid aggregates to two seeds
    d2 = json.loads(json.dumps(d))
    for r in d2["rows"] + d2["baselines"]:
        r["seed"] = 1
    d2["seeds"] = [1]
    (tmp_path / "s1.json").write_text(json.dumps(d2))
    merged = tmp_path / "merged"
    assert images.main(["--merge", str(out / "demo_images.json"), str(tmp_path / "s1.json"), "--out",
                        str(merged)]) == 0
    m = json.loads((merged / "demo_images.json").read_text())
    assert m["seeds"] == [0, 1] and all(a["n_seeds"] == 2 for a in m["aggregate"])
    assert "2 seed(s)" in (merged / "demo_images.md").read_text()


def test_bad_options_are_usage_errors(capsys):
    for argv in (["--settings", "digits/vgg/flips"], ["--budgets", "0"], ["--methods", "diag_newton"]):
        with pytest.raises(SystemExit) as e:
            images.main(argv)
        assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_tuning_score_weights_points_not_sets():
    class M(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(len(x), 10)

    split = {"val": (torch.zeros(30, 1, 8, 8), torch.zeros(30).long())}
    setup = common.Setup(model=None, loss_fn=None, affected=None, corrected=[(torch.zeros(10, 1, 8, 8),
                                                                              torch.ones(10).long())],
                         data=None, extra={"split": split})
    assert images.ImagesTask().tuning_score(M(), setup) == pytest.approx(math.log(10))
