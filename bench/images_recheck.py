"""An outsider's re-measurement of `sapsel demo --task images` cells: the metrics recomputed from their definitions
by code written here (the trigger drawn again from its description, accuracies by argmax), on models rebuilt from
the seed, never through the task's ``evaluate``.

1. Grid seed 0 (digits/cnn/flips and digits/cnn/backdoor; hessian and random at 1%; first_order and sam_finetune with
   the hyperparameters the grid chose): the recomputed test accuracy, Z̃ accuracy and backdoor success must equal the
   committed rows of bench/results/images/demo_images.json (second_order is left out there: its ratio test was
   refined after the grid ran).
2. Seed 7, which the grid never ran, with second_order too: the recomputed metrics against the task's own.

    python bench/images_recheck.py [--grid bench/results/images/demo_images.json]
"""

import argparse
import copy
import json

import torch

import sapsel_kernels as sk
from sapsel_kernels.demo import common, images


def trigger(x: torch.Tensor) -> torch.Tensor:
    """The documented trigger, drawn again: a 3×3 checkerboard (1 where row + column is even) in the bottom-right
    corner of every channel."""
    out = x.clone()
    h, w = x.shape[-2:]
    for i in range(3):
        for j in range(3):
            out[..., h - 3 + i, w - 3 + j] = 1.0 if (i + j) % 2 == 0 else 0.0
    return out


@torch.no_grad()
def metrics(model, setup, task: str):
    xte, yte = setup.extra["split"]["test"]
    xzt, yzt = setup.corrected[0]
    pred = model(xte).argmax(1)
    out = {"test_acc": 100.0 * (pred == yte).double().mean().item(),
           "affected_acc": 100.0 * (model(xzt).argmax(1) == yzt).double().mean().item()}
    if task != "flips":
        others = yte != 0
        out["backdoor"] = 100.0 * (model(trigger(xte[others])).argmax(1) == 0).double().mean().item()
    return out


def run_cell(setup, strategy, method, hp, seed, task_obj, scores):
    model = copy.deepcopy(setup.model)
    if strategy == "random":
        sel = sk.select_parameters(model, "random", 0.01, seed=seed)
    else:
        sel = sk.select_parameters(model, strategy, 0.01, scores=scores)
    config, call = common.method_call(method, **task_obj.unlearn_kwargs(method, setup), **hp)
    sk.unlearn(model, setup.loss_fn, setup.affected, setup.corrected, sel, method=config, **call)
    return model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", default="bench/results/images/demo_images.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    grid = json.load(open(args.grid))
    rows = {(r["setting"], r["seed"], r["strategy"], r["budget"], r["method"]): r for r in grid["rows"]}
    worst = 0.0
    for seed, methods in ((0, ("first_order", "sam_finetune")), (7, ("first_order", "second_order", "sam_finetune"))):
        for setting in ("digits/cnn/flips", "digits/cnn/backdoor"):
            task = setting.split("/")[2]
            t = images.ImagesTask(settings=[setting])
            setup = t.prepare(seed, setting)
            scores, _ = sk.parameter_scores(setup.model, "hessian", loss_fn=setup.loss_fn, data=setup.data,
                                            seed=seed, n_probes=grid["n_probes"])
            for strategy in ("hessian", "random"):
                for method in methods:
                    ref = rows.get((setting, seed, strategy, 0.01, method))
                    hp = ref["hparams"] if ref is not None else t.hparams(method, setup)[0]
                    if hp is None:  # every candidate diverged in the grid: the row is the unrepaired model
                        print(f"seed {seed} {setting} {strategy} {method}: no candidate kept in the grid, skipped")
                        continue
                    model = run_cell(setup, strategy, method, hp, seed, t, scores)
                    mine = metrics(model, setup, task)
                    theirs = ref if ref is not None else t.evaluate(model, setup)
                    diff = max(abs(mine[k] - float(theirs[k])) for k in mine)
                    worst = max(worst, diff)
                    src = "committed row" if ref is not None else "task.evaluate"
                    pairs = ", ".join(f"{k} {mine[k]:.2f} vs {float(theirs[k]):.2f}" for k in mine)
                    print(f"seed {seed} {setting} {strategy} {method} {hp}: {pairs} ({src}; max diff {diff:.1e})")
    print(f"largest difference: {worst:.2e} percentage points")


if __name__ == "__main__":
    main()
