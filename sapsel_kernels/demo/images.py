"""``sapsel demo --task images``: the paper's own setting, image classification with a CNN and a ResNet.

Settings ``dataset/model/task`` (one experiment per seed and setting):

* data sets, both installed offline:

  * ``digits``: the 1,797 real 8×8 digits of ``sklearn.datasets.load_digits``, 1 channel, split test 450 / validation
    250 / training 1,097 (as ``sapsel demo --task labels``);
  * ``shapes``: a CIFAR-like stand-in generated in code (:func:`make_shapes`): 3×16×16 colour images of 10 classes,
    5 shapes (disk, square, triangle, cross, ring) × 2 fills (solid, striped), random colours, positions, sizes,
    background colour and pixel noise; the colours are drawn independently of the class. Split test 600 /
    validation 300 / training 1,500;
* models: ``cnn``, two conv + BatchNorm layers and a linear classifier (:class:`SmallCNN`); ``resnet``, a stem and
  two residual blocks with BatchNorm, the second downsampling through a 1×1 projection, global average pooling
  (:class:`SmallResNet`);
* tasks:

  * ``flips`` (the paper's task): in every class a fraction 0.2 of the training labels goes to its partner class
    (0↔9, 1↔8, ...). Z = those points with the flipped labels, Z̃ = the same points with their true labels;
  * ``backdoor`` (Warnecke et al.'s feature setting): a 3×3 checkerboard patch in the bottom-right corner and the
    label 0 on 10% of the training set, drawn from the points of classes 1-9 (about 11% of those). Z = those
    points as trained on, Z̃ = the same points with the patch zeroed and the label kept (only the feature is
    corrected); success of the backdoor = the share of patched test images of classes 1-9 classified as 0;
  * ``fixed_backdoor`` (only with ``--settings``): the same backdoor with Z̃ = the patch zeroed AND the true
    label restored.

θ* is trained on the poisoned data (Adam, lr 3e-3, batch 64); the gold standard is retrained on the corrected data
with the same seed, initialisation, batch order and schedule, and its wall time is the "retraining" the cost ratio
divides by. Models are evaluated and unlearned in eval mode (BatchNorm uses its running statistics).

Hyperparameters (first_order's τ, second_order's damping, sam_finetune's lr) are chosen per cell from a small grid by
the LOWEST tuning score = mean cross-entropy over the validation split and Z̃ together: only what an unlearner
has. Metrics: test accuracy; affected-point accuracy under the corrected labels (flips) or backdoor success
(backdoor); how much of the gap to the retrained model each closes (restored %); agreement of test predictions with
the retrained model; relearning steps (full-batch SGD, lr 0.05, on Z as trained on until Z's accuracy under those
labels is back at θ*'s, counted up to ``RELEARN_CAP`` = 30); cost = (selection + unlearning seconds) / retraining
seconds. The training-loss scores (hessian, hessian_flat, hessian_ratio, last_layer, ssd) are estimated on 512
seeded training points with 8 Hutchinson probes; second_order's Hessian on 256 corrected training points.
"""

import argparse
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import _argtypes as at
from . import common
from .labels import accuracy, load_digits_split, mean_ce, poison_labels, relearn_steps

DATASETS = ("digits", "shapes")
MODELS = ("cnn", "resnet")
TASKS = ("flips", "backdoor")
SETTINGS = tuple(f"{d}/{m}/{t}" for d in DATASETS for m in MODELS for t in TASKS)  # the default grid
# fixed_backdoor: the backdoor with Z̃ = the patch zeroed AND the true label restored (by --settings only)
ALL_SETTINGS = SETTINGS + tuple(f"{d}/{m}/fixed_backdoor" for d in DATASETS for m in MODELS)
DEFAULT_STRATEGIES = ("hessian", "hessian_flat", "hessian_ratio", "ssd", "last_layer", "random", "all")
DEFAULT_METHODS = ("first_order", "second_order", "sam_finetune")
DEFAULT_BUDGETS = (0.001, 0.01, 0.05)
FLIP_RATE, BACKDOOR_RATE, TARGET = 0.2, 0.1, 0
RELEARN_CAP = 30  # relearning steps are counted up to this many
N_SHAPES = {"test": 600, "val": 300, "train": 1500}


# ====================================================================== data
def make_shapes(n: int, seed: int, size: int = 16):
    """``n`` seeded images (float32 [n, 3, size, size] in [0, 1]) and labels (int64 [n], 10 balanced classes).

    Class c = shape c % 5 (disk, square, triangle, cross, ring) with fill c // 5 (0 solid, 1 horizontal stripes of
    period 2). Per image: a random dark background colour, a random bright shape colour (independent of the class),
    centre jitter ±3 px, half-size 3.5-6 px, and Gaussian pixel noise (σ = 0.12)."""
    g = torch.Generator().manual_seed(40_000 + seed)
    y = torch.arange(n) % 10
    y = y[torch.randperm(n, generator=g)]
    r = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    c0 = (size - 1) / 2
    cy = c0 + (torch.rand(n, generator=g) * 6 - 3)
    cx = c0 + (torch.rand(n, generator=g) * 6 - 3)
    s = 3.5 + 2.5 * torch.rand(n, generator=g)
    dy = (yy[None] - cy[:, None, None]) / s[:, None, None]
    dx = (xx[None] - cx[:, None, None]) / s[:, None, None]
    rad = torch.sqrt(dx ** 2 + dy ** 2)
    shapes = torch.stack([
        rad <= 1.0,  # disk
        (dx.abs() <= 0.85) & (dy.abs() <= 0.85),  # square
        (dy <= 0.9) & (dy >= -0.9) & (dx.abs() <= (dy + 0.9) / 1.8),  # triangle, apex up
        ((dx.abs() <= 0.3) & (dy.abs() <= 1.0)) | ((dy.abs() <= 0.3) & (dx.abs() <= 1.0)),  # cross
        (rad <= 1.0) & (rad >= 0.55),  # ring
    ], 1)  # [n, 5, size, size]
    mask = shapes[torch.arange(n), y % 5].float()
    stripes = ((yy.long() // 2) % 2 == 0).float()[None]
    mask = torch.where((y // 5 == 1)[:, None, None], mask * stripes, mask)
    bg = 0.35 * torch.rand(n, 3, 1, 1, generator=g)
    fg = 0.55 + 0.45 * torch.rand(n, 3, 1, 1, generator=g)
    img = bg + (fg - bg) * mask[:, None]
    img = img + 0.12 * torch.randn(img.shape, generator=g)
    return img.clamp_(0, 1), y


def load_split(dataset: str, seed: int):
    """{"train" | "val" | "test": (x, y)} of ``dataset`` for ``seed``."""
    if dataset == "digits":
        return load_digits_split(seed)
    n = sum(N_SHAPES.values())
    x, y = make_shapes(n, seed)
    a, b = N_SHAPES["test"], N_SHAPES["test"] + N_SHAPES["val"]
    return {"test": (x[:a], y[:a]), "val": (x[a:b], y[a:b]), "train": (x[b:], y[b:])}


def add_patch(x: torch.Tensor, value: Optional[float] = None) -> torch.Tensor:
    """A copy of ``x`` [n, c, h, w] with the 3×3 bottom-right corner set to the checkerboard trigger (1, 0, 1, ...),
    or to ``value`` everywhere in it (0.0: the patch zeroed, Z̃ of the backdoor task)."""
    out = x.clone()
    if value is None:
        board = (torch.arange(3)[:, None] + torch.arange(3)[None]) % 2 == 0
        out[..., -3:, -3:] = board.to(x.dtype)
    else:
        out[..., -3:, -3:] = value
    return out


def poison(split, task: str, seed: int):
    """The training set as trained on, and Z's indices: (x_poisoned, y_poisoned, idx, x_corrected, y_corrected)."""
    x, y = split["train"]
    if task == "flips":  # the labels demo's poisoning (same seeded draw)
        yp, idx = poison_labels(y, FLIP_RATE, seed)
        return x, yp, idx, x, y
    g = torch.Generator().manual_seed(20_000 + seed)
    cand = torch.nonzero(y != TARGET).reshape(-1)
    k = int(round(BACKDOOR_RATE * len(y)))
    idx = torch.sort(cand[torch.randperm(cand.numel(), generator=g)[:k]]).values
    xp, yp = x.clone(), y.clone()
    xp[idx] = add_patch(x[idx])
    yp[idx] = TARGET
    xc = xp.clone()
    xc[idx] = add_patch(x[idx], 0.0)
    return xp, yp, idx, xc, (y if task == "fixed_backdoor" else yp)


# ====================================================================== models
class SmallCNN(nn.Module):
    """conv 3×3 (16) + BN + ReLU + max-pool, conv 3×3 (32) + BN + ReLU + max-pool, linear classifier ``fc``."""

    def __init__(self, channels: int, size: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32 * (size // 4) ** 2, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(x.flatten(1))


class Block(nn.Module):
    """A basic residual block: conv-BN-ReLU-conv-BN plus the input (a 1×1 conv + BN projection when the shape
    changes), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.proj = None
        if stride != 1 or cin != cout:
            self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + (x if self.proj is None else self.proj(x)))


class SmallResNet(nn.Module):
    """stem conv 3×3 (16) + BN + ReLU, Block(16, 16), Block(16, 32, stride 2), global average pool, ``fc``."""

    def __init__(self, channels: int, size: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.block1, self.block2 = Block(16, 16), Block(16, 32, 2)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(x.mean((2, 3)))


def build_model(name: str, x: torch.Tensor) -> nn.Module:
    return (SmallCNN if name == "cnn" else SmallResNet)(x.shape[1], x.shape[-1])


def loss_fn(model, batch):
    """Mean cross-entropy of a batch (x, y)."""
    x, y = batch
    return F.cross_entropy(model(x), y)


def train_model(name: str, x, y, seed: int, epochs: int, lr: float = 3e-3, batch_size: int = 64) -> nn.Module:
    """Adam from a seeded initialisation with a seeded batch order (the same for θ* and the gold standard)."""
    torch.manual_seed(seed)
    model = build_model(name, x)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            b = perm[i:i + batch_size]
            if b.numel() < 2:  # BatchNorm needs two points in train mode
                continue
            opt.zero_grad(set_to_none=True)
            loss_fn(model, (x[b], y[b])).backward()
            opt.step()
    model.eval()
    return model


@torch.no_grad()
def backdoor_success(model, x, y) -> float:
    """Share of patched images of classes other than TARGET classified as TARGET."""
    keep = y != TARGET
    return float((model(add_patch(x[keep])).argmax(1) == TARGET).float().mean())


# ====================================================================== the task
class ImagesTask:
    """Image unlearning: see the module docstring. ``settings``: "dataset/model/task" strings."""

    name = "images"
    metric_labels = {
        "test_acc": "test acc %",
        "affected_acc": "Z̃ acc %",
        "backdoor": "backdoor %",
        "restored_affected": "repaired %",
        "agreement": "agree %",
        "relearn_steps": "relearn",
        "cost_ratio": "cost / retrain",
    }
    digits = {"relearn_steps": 1, "cost_ratio": 3}

    def __init__(self, settings=SETTINGS, epochs: Optional[int] = None, quick: bool = False,
                 hessian_points: int = 256, score_points: int = 512, cg_iters: int = 10):
        self.settings = list(settings)
        self.epochs, self.quick = epochs, quick
        self.hessian_points, self.score_points, self.cg_iters = hessian_points, score_points, cg_iters

    def _epochs(self, dataset: str) -> int:
        if self.epochs is not None:
            return self.epochs
        return (10 if dataset == "digits" else 8) if self.quick else (30 if dataset == "digits" else 25)

    def prepare(self, seed: int, setting: str) -> common.Setup:
        dataset, arch, task = setting.split("/")
        common.set_determinism(seed, torch.get_num_threads())
        split = load_split(dataset, seed)
        xp, yp, idx, xc, yc = poison(split, task, seed)
        epochs = self._epochs(dataset)
        model = train_model(arch, xp, yp, seed, epochs)
        t0 = time.perf_counter()
        gold = train_model(arch, xc, yc, seed, epochs)
        retrain_s = time.perf_counter() - t0
        keep = torch.ones(len(xp), dtype=torch.bool)
        keep[idx] = False
        g = torch.Generator().manual_seed(30_000 + seed)
        hsub = torch.randperm(len(xc), generator=g)[:self.hessian_points]
        ssub = torch.randperm(len(xp), generator=g)[:self.score_points]  # the training-loss scores' points
        ret = torch.nonzero(keep).reshape(-1)
        ret = ret[torch.randperm(ret.numel(), generator=g)]
        chunk = max(1, idx.numel())
        retain = [(xp[ret[i:i + chunk]], yp[ret[i:i + chunk]]) for i in range(0, ret.numel() - chunk + 1, chunk)]
        extra = {
            "dataset": dataset, "arch": arch, "task": task, "n_train": int(len(xp)), "n_affected": int(idx.numel()),
            "n_params": int(sum(p.numel() for p in model.parameters())), "epochs": epochs, "retrain_s": retrain_s,
            "split": split, "hessian_data": [(xc[hsub], yc[hsub])], "retain": retain[:4],
        }
        return common.Setup(model=model, loss_fn=loss_fn, affected=[(xp[idx], yp[idx])],
                            corrected=[(xc[idx], yc[idx])], data=[(xp[ssub], yp[ssub])], gold=gold, extra=extra)

    def evaluate(self, model, setup) -> Dict[str, float]:
        e = setup.extra
        xte, yte = e["split"]["test"]
        (xz, yz), (xzt, yzt) = setup.affected[0], setup.corrected[0]
        with torch.no_grad():
            pred = model(xte).argmax(1)
            agree = float((pred == setup.gold(xte).argmax(1)).float().mean())
        if "poison_level" not in e:  # θ*'s accuracy on Z under the labels it was trained on
            e["poison_level"] = accuracy(setup.model, xz, yz)
        out = {
            "test_acc": 100 * float((pred == yte).float().mean()),
            "agreement": 100 * agree,
            "relearn_steps": float(relearn_steps(model, xz, yz, e["poison_level"], cap=RELEARN_CAP)),
        }
        if e["task"] == "flips":
            out["affected_acc"] = 100 * accuracy(model, xzt, yzt)
            out["backdoor"] = float("nan")
        else:
            out["affected_acc"] = 100 * accuracy(model, xzt, yzt)
            out["backdoor"] = 100 * backdoor_success(model, xte, yte)
        return out

    @staticmethod
    def derive(m, before, gold) -> Dict[str, float]:
        """restored_affected: the share of the gap to the retrained model closed, on Z̃'s accuracy (flips) or on the
        backdoor's success (backdoor)."""
        key = "affected_acc" if math.isnan(before["backdoor"]) else "backdoor"
        den = gold[key] - before[key]
        return {"restored_affected": 100.0 * (m[key] - before[key]) / den if abs(den) > 1e-9 else float("nan")}

    @staticmethod
    def selection_info(sel, setup) -> Dict[str, Any]:
        from ..space import ParamSpace

        per = ParamSpace(setup.model).split_indices(sel.indices.cpu())
        fc = sum(int(v.numel()) for n, v in per.items() if n.startswith("fc."))
        bn = sum(int(v.numel()) for n, v in per.items() if ".bn" in n or n.startswith("bn") or "stem.1" in n
                 or "proj.1" in n)
        return {"frac_last_layer": fc / max(sel.k, 1), "frac_batchnorm": bn / max(sel.k, 1)}

    def tuning_score(self, model, setup) -> float:
        """Mean cross-entropy over the validation points and Z̃ together (each point counts once). In the backdoor
        task Z̃ keeps the target label, so a score that weighted Z̃ as much as the validation set rewarded
        predicting the target everywhere (first_order picked a step with 25% test accuracy in a trial run)."""
        xva, yva = setup.extra["split"]["val"]
        xz, yz = setup.corrected[0]
        return (len(yva) * mean_ce(model, xva, yva) + len(yz) * mean_ce(model, xz, yz)) / (len(yva) + len(yz))

    def hparams(self, method: str, setup) -> List[Dict[str, Any]]:
        q = self.quick
        if method == "first_order":
            nz = setup.extra["n_affected"]
            return [{"tau": eta / nz} for eta in ((0.1, 1.0) if q else (0.03, 0.3, 3.0))]
        if method == "second_order":
            n = setup.extra["n_train"]
            return [{"damping": n * lam} for lam in ((1e-2,) if q else (1e-3, 1e-1))]
        if method == "sam_finetune":
            return [{"lr": lr} for lr in ((0.1,) if q else (0.1, 1.0))]
        raise ValueError(f"the images task runs first_order, second_order and sam_finetune, not {method!r}")

    def unlearn_kwargs(self, method: str, setup) -> Dict[str, Any]:
        e = setup.extra
        if method == "second_order":
            return {"train_data": e["hessian_data"], "n_train": e["n_train"],
                    "cg_iters": 5 if self.quick else self.cg_iters}
        if method == "sam_finetune":
            return {"steps": 5 if self.quick else 10, "rho": 0.05, "retain": e["retain"]}
        return {}


# ====================================================================== CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sapsel demo --task images",
                                description="Image unlearning (label flips, a backdoor) with a CNN and a ResNet: "
                                            "strategy x budget x rule grid.")
    p.add_argument("--quick", action="store_true",
                   help="a reduced grid for CI: 1 seed, digits/cnn/flips and digits/resnet/backdoor, 3 strategies, "
                        "1 budget, 2 rules, short training")
    p.add_argument("--out", type=at.output_dir, default="sapsel_out", help="output folder (default ./sapsel_out)")
    p.add_argument("--seed", type=at.nonneg_int, default=0, help="first seed (>= 0); seeds are seed, seed+1, ...")
    p.add_argument("--seeds", type=at.positive_int, default=None, help="number of seeds (default 5; --quick 1)")
    p.add_argument("--settings", type=at.choice_list(ALL_SETTINGS, "setting"), default=None,
                   help=f"comma-separated subset of {','.join(ALL_SETTINGS)} (default: the 8 without "
                        f"fixed_backdoor)")
    common.add_grid_arguments(p, ("hessian", "hessian_flat", "hessian_ratio", "hessian_smallest", "ssd",
                                  "last_layer", "random", "grad_abs", "all"), DEFAULT_METHODS, "0.001,0.01,0.05")
    p.add_argument("--epochs", type=at.positive_int, default=None,
                   help="training epochs of θ* and the gold standard (default digits 30, shapes 25; quick 10/8)")
    p.add_argument("--probes", type=at.positive_int, default=None,
                   help="Hutchinson probes for diag(H) (default 8; quick 4)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="no run: merge saved demo_images.json files (other seeds or settings) into --out")
    p.add_argument("--threads", type=at.positive_int, default=1, help="torch threads (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    q = args.quick
    seeds = list(range(args.seed, args.seed + (args.seeds if args.seeds is not None else (1 if q else 5))))
    settings = args.settings if args.settings is not None else (
        ["digits/cnn/flips", "digits/resnet/backdoor"] if q else list(SETTINGS))
    strategies = args.strategies if args.strategies is not None else (
        ["hessian", "hessian_flat", "random"] if q else list(DEFAULT_STRATEGIES))
    methods = args.methods if args.methods is not None else (
        ["first_order", "second_order"] if q else list(DEFAULT_METHODS))
    budgets = args.budgets if args.budgets is not None else ([0.01] if q else list(DEFAULT_BUDGETS))
    n_probes = args.probes if args.probes is not None else (4 if q else 8)
    os.makedirs(args.out, exist_ok=True)
    common.set_determinism(args.seed, args.threads)
    task = ImagesTask(settings=settings, epochs=args.epochs, quick=q)
    t0 = time.perf_counter()
    res = common.run_grid(task, seeds, strategies, budgets, methods, progress=not args.no_progress,
                          score_kwargs={"n_probes": n_probes})
    total_s = time.perf_counter() - t0
    retrain = {(b["seed"], b["setting"]): b["retrain_s"] for b in res["baselines"]}
    for r in res["rows"]:
        r["cost_ratio"] = (r["select_s"] + r["wall_time_s"]) / retrain[(r["seed"], r["setting"])]
    metrics = list(task.metric_labels) + ["tune_s", "select_s", "wall_time_s", "n_gradients", "n_hvps",
                                          "delta_norm", "n_changed", "frac_last_layer", "frac_batchnorm"]
    agg = common.aggregate(res["rows"], metrics)
    payload = {
        "task": "images", "argv": list(argv) if argv is not None else sys.argv[1:], "quick": q, "seeds": seeds,
        "settings": settings, "strategies": strategies, "methods": methods, "budgets": budgets,
        "n_probes": n_probes, "total_s": total_s, "environment": common.environment(),
        "baselines": [{k: v for k, v in b.items() if k in ("seed", "setting", "prepare_s", "before", "gold",
                                                            "n_train", "n_affected", "n_params", "epochs",
                                                            "retrain_s")} for b in res["baselines"]],
        "aggregate": agg, "rows": res["rows"],
    }
    common.write_json(os.path.join(args.out, "demo_images.json"), payload)
    render(payload, args.out)
    print()
    print(baseline_summary(payload["baselines"]))
    print()
    print(common.format_table(agg, task.metric_labels, digits=task.digits))
    print(f"\nwrote {args.out}/demo_images.json, demo_images.md, demo_images.png ({total_s:.1f} s)")
    return 0


def merge(paths: List[str], out: str) -> int:
    """Merge runs (each a saved demo_images.json of the same grid over other seeds or settings) into ``out``."""
    import json

    runs = []
    for p in paths:
        with open(p) as f:
            runs.append(json.load(f))
    for key in ("strategies", "methods", "budgets", "n_probes", "quick"):
        if len({json.dumps(r[key]) for r in runs}) != 1:
            raise SystemExit(f"sapsel demo --task images --merge: the runs differ in {key}")
    seen = [(b["seed"], b["setting"]) for r in runs for b in r["baselines"]]
    if len(seen) != len(set(seen)):
        dup = sorted({x for x in seen if seen.count(x) > 1})
        raise SystemExit(f"sapsel demo --task images --merge: seed and setting {dup[0]} appear in more than one run")
    rows = [row for r in runs for row in r["rows"]]
    metrics = list(ImagesTask.metric_labels) + ["tune_s", "select_s", "wall_time_s", "n_gradients", "n_hvps",
                                                "delta_norm", "n_changed", "frac_last_layer", "frac_batchnorm"]
    payload = dict(runs[0])
    payload.update(
        argv=["--merge", *paths, "--out", out], runs_argv=[r["argv"] for r in runs],
        seeds=sorted({s for r in runs for s in r["seeds"]}),
        settings=list(dict.fromkeys(s for setting in ALL_SETTINGS for r in runs for s in r["settings"]
                                    if s == setting)),
        total_s=sum(r["total_s"] for r in runs), baselines=[b for r in runs for b in r["baselines"]], rows=rows,
        aggregate=common.aggregate(sorted(rows, key=lambda r: (ALL_SETTINGS.index(r["setting"]), r["seed"])),
                                   metrics),
        merged_from=paths)
    os.makedirs(out, exist_ok=True)
    common.write_json(os.path.join(out, "demo_images.json"), payload)
    render(payload, out)
    print(f"merged {len(runs)} runs ({len(rows)} rows) into {out}/demo_images.json, demo_images.md, demo_images.png")
    return 0


def baseline_summary(baselines) -> str:
    """One line per setting: the poisoned and the retrained model (mean ± std over seeds)."""
    lines = []
    for setting in dict.fromkeys(b["setting"] for b in baselines):
        bs = [b for b in baselines if b["setting"] == setting]
        keys = ["test_acc", "affected_acc", "backdoor", "relearn_steps"]
        rows = [{"setting": setting, "method": "-", "strategy": "-", "budget": 0,
                 **{f"{w}_{m}": b[w][m] for w in ("before", "gold") for m in keys}, "retrain_s": b["retrain_s"]}
                for b in bs]
        a = common.aggregate(rows, [f"{w}_{m}" for w in ("before", "gold") for m in keys] + ["retrain_s"])[0]
        bd = (f", backdoor {common.fmt(a['before_backdoor'])}% -> retrained {common.fmt(a['gold_backdoor'])}%"
              if bs[0]["before"].get("backdoor") is not None and not math.isnan(bs[0]["before"]["backdoor"]) else "")
        lines.append(f"{setting}: |Z| = {bs[0]['n_affected']} of {bs[0]['n_train']}, {bs[0]['n_params']} parameters, "
                     f"{len(bs)} seed(s); poisoned: test {common.fmt(a['before_test_acc'])}%, Z̃ acc "
                     f"{common.fmt(a['before_affected_acc'])}%; retrained: test {common.fmt(a['gold_test_acc'])}%, "
                     f"Z̃ acc {common.fmt(a['gold_affected_acc'])}%{bd}; retraining "
                     f"{common.fmt(a['retrain_s'], 2)} s")
    return "\n".join(lines)


def render(payload: Dict[str, Any], out: str, stem: str = "demo_images") -> None:
    """<stem>.md (the baselines and the full table) and <stem>.png from a run's payload."""
    runs = "".join(f"\n- `sapsel demo --task images {' '.join(a)}`" for a in payload.get("runs_argv", []))
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write(f"command: `sapsel demo --task images {' '.join(payload['argv'])}`{runs}\n\n"
                + baseline_summary(payload["baselines"]).replace("\n", "\n\n") + "\n\n"
                + common.format_table(payload["aggregate"], ImagesTask.metric_labels, markdown=True,
                                      digits=ImagesTask.digits) + "\n")
    with open(os.path.join(out, f"{stem}_summary.md"), "w") as f:
        f.write(summary_markdown(payload) + "\n")
    plot(payload, os.path.join(out, f"{stem}.png"))
    budgets = [b for b in payload["budgets"] if b < 1.0]
    plot_glance(payload, os.path.join(out, f"{stem}_glance.png"), budget=0.01 if 0.01 in budgets else budgets[0])


def plot(payload: Dict[str, Any], path: str):
    """Per setting: test accuracy and the repaired metric (Z̃ accuracy for flips, backdoor success for the backdoor)
    vs budget, one line per strategy, with the poisoned and the retrained models' levels (means over seeds) as
    horizontal lines; the number of seeds in the title."""
    agg = [dict(a) for a in payload["aggregate"]]
    for a in agg:  # one "repair" panel per setting: the metric its task repairs
        a["repair"] = a["backdoor"] if a["setting"].endswith("backdoor") else a["affected_acc"]
    refs: Dict[str, Dict[str, Dict[float, str]]] = {}
    for setting in payload["settings"]:
        bs = [b for b in payload["baselines"] if b["setting"] == setting]
        key = "backdoor" if setting.endswith("backdoor") else "affected_acc"
        mean = lambda w, m: sum(float(b[w][m]) for b in bs) / len(bs)  # noqa: E731
        refs[setting] = {"test_acc": {mean("before", "test_acc"): "poisoned θ*",
                                      mean("gold", "test_acc"): "retrained"},
                         "repair": {mean("before", key): "poisoned θ*", mean("gold", key): "retrained"}}
    return common.plot_budget_curves(
        agg, {"test_acc": "test accuracy %", "repair": "Z̃ acc % (flips) /\nbackdoor success % (backdoor)"}, path,
        title=f"image unlearning, {len(payload['seeds'])} seed(s), mean ± std; reference lines: poisoned θ* and "
              f"retrained (means)", setting_hlines=refs, setting_fmt="{}")


def summary_markdown(payload: Dict[str, Any]) -> str:
    """Compact markdown per setting: rows strategies, columns rules; each cell the means over seeds of test accuracy
    and of the repaired metric at the budgets below 100% ("0.1% / 1% / 5%"), ``all`` at 100%; then, per rule and
    budget, the paired difference ``hessian`` − ``random`` and ``hessian_flat`` − ``random`` in repaired % (same
    seed), with how often the first was better; then the share of S in BatchNorm and in the classifier."""
    agg, rows = payload["aggregate"], payload["rows"]
    methods, n = payload["methods"], len(payload["seeds"])
    out = []
    for setting in payload["settings"]:
        sub = [a for a in agg if a["setting"] == setting]
        if not sub:
            continue
        budgets = sorted({a["budget"] for a in sub if a["strategy"] != "all"})
        strategies = list(dict.fromkeys(a["strategy"] for a in sub))
        bl = " / ".join(common.budget_label(b) for b in budgets)
        rep = "backdoor success % (lower is better)" if setting.endswith("backdoor") else "Z̃ accuracy %"
        key = "backdoor" if setting.endswith("backdoor") else "affected_acc"
        out.append(f"**{setting}**: test accuracy % ; {rep} (budgets {bl}; mean over {n} seeds)\n")
        out.append("| strategy | " + " | ".join(methods) + " |")
        out.append("|---|" + "---|" * len(methods))
        for st in strategies:
            cells = []
            for m in methods:
                vals = sorted(((a["budget"], a["test_acc"]["mean"], a[key]["mean"]) for a in sub
                               if a["strategy"] == st and a["method"] == m), key=lambda t: t[0])
                cells.append(" / ".join(f"{t:.0f}" for _, t, _ in vals) + " ; "
                             + " / ".join(f"{r:.0f}" for _, _, r in vals) if vals else "-")
            out.append(f"| {st}{' (100%)' if st == 'all' else ''} | " + " | ".join(cells) + " |")
        out.append("")
        by = {(r["seed"], r["method"], r["strategy"], r["budget"]): r for r in rows if r["setting"] == setting}
        for ref in ("hessian", "hessian_flat"):
            if not any(s == ref for (_, _, s, _) in by) or not any(s == "random" for (_, _, s, _) in by):
                continue
            out.append(f"paired `{ref}` − `random`, repaired % (mean ± std over seeds; wins of `{ref}`):\n")
            out.append("| rule | " + " | ".join(common.budget_label(b) for b in budgets) + " |")
            out.append("|---|" + "---|" * len(budgets))
            for m in methods:
                cells = []
                for b in budgets:
                    d = [by[(s, m, ref, b)]["restored_affected"] - by[(s, m, "random", b)]["restored_affected"]
                         for s in payload["seeds"] if (s, m, ref, b) in by and (s, m, "random", b) in by]
                    d = [v for v in d if v is not None and math.isfinite(v)]
                    if not d:
                        cells.append("-")
                        continue
                    mu = sum(d) / len(d)
                    sd = math.sqrt(sum((v - mu) ** 2 for v in d) / (len(d) - 1)) if len(d) > 1 else 0.0
                    cells.append(f"{mu:+.0f} ± {sd:.0f} ({sum(v > 0 for v in d)}/{len(d)})")
                out.append(f"| {m} | " + " | ".join(cells) + " |")
            out.append("")
        shares = []
        for st in strategies:
            if st == "all":
                continue
            v = [(a["frac_batchnorm"]["mean"], a["frac_last_layer"]["mean"]) for a in sub
                 if a["strategy"] == st and a["method"] == methods[0] and a["budget"] == 0.01]
            if v:
                shares.append(f"{st} {100 * v[0][0]:.0f}% / {100 * v[0][1]:.0f}%")
        out.append("share of S at 1% in BatchNorm / in the classifier: " + "; ".join(shares) + "\n")
    return "\n".join(out)


def plot_glance(payload: Dict[str, Any], path: str, budget: float = 0.01):
    """One panel per setting: every (strategy, rule) at ``budget`` (and ``all`` at 100%) as a point of test accuracy
    (x) against the repaired metric in % of the way from the poisoned model (0) to the retrained one (100) (y), means
    over seeds; the poisoned θ* and the retrained model as reference points and lines. Up and right is better; the
    retrained model sits at 100 on y. Returns the (closed) matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import strategy_styles

    agg = payload["aggregate"]
    settings = [s for s in payload["settings"] if any(a["setting"] == s for a in agg)]
    strategies = [s for s in dict.fromkeys(a["strategy"] for a in agg)]
    styles = strategy_styles(strategies)
    rule_colour = {"first_order": "tab:orange", "second_order": "tab:blue", "sam_finetune": "tab:green"}
    ncol = min(4, len(settings))
    nrow = (len(settings) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol, 3.3 * nrow + 0.9), squeeze=False, layout="constrained")
    for ax, setting in zip(axes.flat, settings):
        bs = [b for b in payload["baselines"] if b["setting"] == setting]
        before = sum(float(b["before"]["test_acc"]) for b in bs) / len(bs)
        gold = sum(float(b["gold"]["test_acc"]) for b in bs) / len(bs)
        ax.axhline(0, color="0.35", lw=1.0, zorder=1)
        ax.axhline(100, color="tab:green", lw=1.0, zorder=1)
        ax.axvline(before, color="0.35", lw=0.8, ls=":", zorder=1)
        ax.axvline(gold, color="tab:green", lw=0.8, ls=":", zorder=1)
        ax.scatter([before], [0], marker="*", s=160, color="0.35", zorder=4, label="poisoned θ*")
        ax.scatter([gold], [100], marker="*", s=160, color="tab:green", zorder=4, label="retrained")
        for a in agg:
            if a["setting"] != setting or not (a["budget"] == budget or a["strategy"] == "all"):
                continue
            x, y = a["test_acc"]["mean"], a["restored_affected"]["mean"]
            if x is None or y is None or not (math.isfinite(x) and math.isfinite(y)):
                continue
            marker, _ = styles[a["strategy"]]
            ax.scatter([x], [max(min(y, 150), -50)], marker=marker, s=38, zorder=3,
                       facecolor=rule_colour.get(a["method"], "k"), edgecolor="k", linewidth=0.4)
        ax.set_title(setting, fontsize=9)
        ax.set_xlabel("test accuracy %", fontsize=8)
        ax.set_ylabel("repaired % (0 = θ*, 100 = retrained)", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(settings):]:
        ax.axis("off")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="*", ls="", color="0.35", ms=11, label="poisoned θ*"),
               Line2D([], [], marker="*", ls="", color="tab:green", ms=11, label="retrained")]
    handles += [Line2D([], [], marker=styles[s][0], ls="", color="w", markeredgecolor="k", ms=7,
                       label=f"{s} (100%)" if s == "all" else s) for s in strategies]
    handles += [Line2D([], [], marker="o", ls="", color=c, markeredgecolor="k", ms=7, label=m)
                for m, c in rule_colour.items() if m in payload["methods"]]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    fig.suptitle(f"image unlearning at a {common.budget_label(budget)} budget: {len(payload['seeds'])} seed(s), "
                 f"means; repaired = Z̃ accuracy (flips) or backdoor success (backdoor), clipped to [-50, 150]",
                 fontsize=9)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


if __name__ == "__main__":
    sys.exit(main())
