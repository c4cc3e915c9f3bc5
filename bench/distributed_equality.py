"""Single process vs world sizes 2 and 4 (gloo, CPU): how far every distributed path lands from one process.

Runs the multi-process tests' own workers (``tests/*/test_distributed_*.py``) and reports, per path and world size,
max |distributed - one process| over the result (parameters after the update, or the score vector), relative to
max |one process| for the estimates, and whether the bits are identical. The tests assert tolerances; this script
writes the numbers: ``bench/results/distributed_equality.{md,json}``.

Run: ``python -m bench.distributed_equality`` (about 2 minutes on the 2-core machine).
"""

import json
import os
import platform
import time

import torch

import sapsel_kernels as sk
from tests.curvature import test_distributed_fsdp as tf
from tests.helpers.dist import run_world
from tests.update import test_distributed_optim as to
from tests.update import test_distributed_unlearn as tu

HERE = os.path.dirname(os.path.abspath(__file__))

ESTIMATORS = ("hutchinson", "gauss_newton", "squared_grad", "fisher", "grad_abs", "exact")


def _est_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _est_batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 5, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(8)]


def _est_kw(e):
    if e in ("hutchinson", "gauss_newton"):
        kw = {"n_probes": 8, "seed": 2}
        if e == "gauss_newton":
            kw["output_fn"] = lambda m, b: m(b[0])
        return kw
    return {}


def _ce(m, b):
    return torch.nn.functional.cross_entropy(m(b[0]), b[1])


def _hessian_worker(rank, world):
    import torch.distributed as dist

    b = _est_batches()
    per = len(b) // world
    mine = b[rank * per:(rank + 1) * per]
    out = {e: sk.hessian_diag(_est_model(), _ce, mine, e, group=dist.group.WORLD, **_est_kw(e)).mean
           for e in ESTIMATORS}
    # contiguous sharded select of the hutchinson scores, split 45% / 55%-like by rank
    scores = torch.randn(10_001, generator=torch.Generator().manual_seed(3))
    cuts = torch.linspace(0, scores.numel(), world + 1).long().tolist()
    out["select"] = sk.select(scores[cuts[rank]:cuts[rank + 1]], fraction=0.01, group=dist.group.WORLD,
                              gather=True).indices
    return out


def _diff(a, b, rel=False):
    d = float((a.double() - b.double()).abs().max())
    if rel:
        d /= max(float(b.double().abs().max()), 1e-300)
    return d, bool(torch.equal(a, b))


def main():
    rows = []
    t0 = time.perf_counter()
    ref_est = {e: sk.hessian_diag(_est_model(), _ce, _est_batches(), e, **_est_kw(e)).mean for e in ESTIMATORS}
    ref_sel = sk.select(torch.randn(10_001, generator=torch.Generator().manual_seed(3)), fraction=0.01).indices
    singles_u = {name: tu._single(name)[0] for name in tu.CASES}
    singles_o = {name: to._single(name) for name in to.OPTIMIZERS}
    singles_f = {name: tf._single(name)[0] for name in tf.OPTIMIZERS}
    plain = tf._model()
    ref_f = {"squared_grad": sk.hessian_diag(plain, tf._ce, tf._global_batches(), "squared_grad").mean,
             "grad_abs": sk.hessian_diag(plain, tf._ce, tf._global_batches(), "grad_abs").mean}
    for world in (2, 4):
        res = run_world(_hessian_worker, world)[0]
        for e in ESTIMATORS:
            d, same = _diff(res[e], ref_est[e], rel=True)
            rows.append(("hessian_diag(group=), replicated", e, world, d, same, "relative to max |value|"))
        rows.append(("select(group=), contiguous shards", "k = 1% of 10,001", world,
                     0.0 if torch.equal(res["select"], ref_sel) else float("nan"),
                     bool(torch.equal(res["select"], ref_sel)), "indices"))
        res = run_world(tu._worker, world, world == 2)
        for name in tu.CASES:
            worst = max(_diff(r[name]["theta"], singles_u[name])[0] for r in res)
            same = all(_diff(r[name]["theta"], singles_u[name])[1] for r in res)
            rows.append((f"unlearn(group=), {'DDP' if world == 2 else 'replicated'}", name, world, worst, same,
                         "float64 parameters"))
        oracle = tu._targeted_oracle(world, steps=4, lr=0.3, beta=2.0)
        rows.append((f"unlearn(group=), {'DDP' if world == 2 else 'replicated'}", "targeted (vs hand oracle)",
                     world, max(_diff(r["targeted"]["theta"], oracle)[0] for r in res),
                     all(_diff(r["targeted"]["theta"], oracle)[1] for r in res), "float64 parameters"))
        if world == 2:
            res = run_world(to._ddp_worker, world)
            for name in to.OPTIMIZERS:
                rows.append(("sparse optimizers under DDP", name, world,
                             max(_diff(r[name]["theta"], singles_o[name])[0] for r in res),
                             all(_diff(r[name]["theta"], singles_o[name])[1] for r in res), "float64, 3 steps"))
        res = run_world(tf._worker, world)
        for name in tf.OPTIMIZERS:
            rows.append(("sparse optimizers under FSDP2", name, world,
                         max(_diff(r[name]["theta"], singles_f[name])[0] for r in res),
                         all(_diff(r[name]["theta"], singles_f[name])[1] for r in res), "float64, 3 steps"))
        res = run_world(tf._estimate_worker, world)
        gnb = tf._gnb_oracle(world).float()
        for name in ("squared_grad", "grad_abs", "gauss_newton"):
            expect = {**ref_f, "gauss_newton": gnb}[name]
            ds = [_diff(r[name]["mean"], expect[r["where"]], rel=True) for r in res]
            rows.append(("hessian_diag on FSDP2", name + (" (vs hand oracle)" if name == "gauss_newton" else ""),
                         world, max(d for d, _ in ds), all(s for _, s in ds), "relative; float32 accumulators"))
        res = run_world(tf._select_worker, world)
        ok = True
        for key in res[0]:
            if isinstance(key, tuple):
                dtype, ties, k, largest = key
                full = tf._scores(sk.ParamSpace(tf._model()).numel, getattr(torch, dtype.split(".")[1]), ties)
                ok &= all(torch.equal(r[key]["indices"], sk.select(full, k, largest=largest).indices) for r in res)
        rows.append(("select(group=), FSDP2 shards", "3 dtypes x ties x 5 k x largest/smallest", world,
                     0.0 if ok else float("nan"), ok, "indices"))
    seconds = time.perf_counter() - t0
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    lines = ["# One process vs world sizes 2 and 4 (gloo, CPU)", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}. Command: "
             f"`python -m bench.distributed_equality` ({seconds:.0f} s). Every rank's result is compared with the "
             "single-process result on the concatenated data (the worst rank is shown); the workers are the "
             "multi-process tests' own.", "",
             "| path | case | world | max abs diff | bit-identical | unit |", "|---|---|---|---|---|---|"]
    for path, case, world, d, same, unit in rows:
        lines.append(f"| {path} | {case} | {world} | {d:.1e} | {'yes' if same else 'no'} | {unit} |")
    with open(os.path.join(HERE, "results", "distributed_equality.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(HERE, "results", "distributed_equality.json"), "w") as f:
        json.dump({"rows": rows, "seconds": seconds, "torch": torch.__version__}, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
