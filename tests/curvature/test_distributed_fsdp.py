"""FSDP2 (``fully_shard``: every parameter a DTensor split by rows over the ranks), gloo on CPU, world sizes 2 and 4.

* The sparse optimizers (SparseSGD, SparseAdamW, SparseSAM with an SGD or AdamW base) update the selected
  coordinates of each rank's LOCAL shard: after 3 steps on each rank's shard of the batch the full parameters
  (``full_tensor()``) equal one process on the whole batch (FSDP2 averages the gradients in its reduce-scatter;
  float64, so within 1e-12), and the optimizer state is O(k / world): the ranks' states add up to one process's.
* A NaN in one rank's shard raises on every rank and nothing is modified anywhere.
The shapes make the shards uneven and, at world size 4, leave one rank without rows of a parameter.
"""

import pytest
import torch
import torch.nn.functional as F

import sapsel_kernels as sk
from tests.helpers.dist import run_world
from tests.update.test_distributed_optim import STEPS, _data, _plain_step, _sam_step  # the same 8-point batch

TOL = dict(rtol=1e-12, atol=1e-12)

# the model itself is passed (fully_shard replaces the Parameter objects but keeps the names the selection knows)
OPTIMIZERS = {
    "sam_sgd": (lambda m, sel: sk.SparseSAM(m, sel, lr=0.1, rho=0.05, momentum=0.9), _sam_step),
    "sam_adamw": (lambda m, sel: sk.SparseSAM(m, sel, base="adamw", lr=0.01, rho=0.05), _sam_step),
    "sgd": (lambda m, sel: sk.SparseSGD(m, sel, lr=0.1, momentum=0.9), _plain_step),
    "adamw": (lambda m, sel: sk.SparseAdamW(m, sel, lr=0.01), _plain_step),
}


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()


def _selection(model):
    space = sk.ParamSpace(model)
    scores = torch.linspace(0, 1, space.numel, dtype=torch.float64).flip(0) * \
        torch.arange(space.numel).remainder(5)
    return sk.select(scores, fraction=0.3, space=space)


def _shard(model, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _full(model):
    return torch.cat([p.full_tensor().reshape(-1) for p in model.parameters()])


def _single(name):
    model = _model()
    sel = _selection(model)
    make, step = OPTIMIZERS[name]
    opt = make(model, sel)
    x, y = _data()
    for _ in range(STEPS):
        step(model, opt, x, y)
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), opt.state_bytes()


def _worker(rank, world):
    x, y = _data()
    per = x.shape[0] // world
    xs, ys = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
    out = {}
    for name, (make, step) in OPTIMIZERS.items():
        model = _model()
        sel = _selection(model)  # global flat indices, made on the unsharded model (the same on every rank)
        theta0 = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
        _shard(model, world)
        opt = make(model, sel)
        for _ in range(STEPS):
            step(model, opt, xs, ys)
        theta = _full(model)
        outside = torch.ones_like(theta, dtype=torch.bool)
        outside[sel.indices] = False
        out[name] = {"theta": theta, "outside_unchanged": torch.equal(theta[outside], theta0[outside]),
                     "state_bytes": opt.state_bytes(), "k_local": opt.k_local, "k": opt.k}
        if name == "adamw":  # a per-rank state_dict: reloading it into this rank's optimizer is fine
            sd = opt.state_dict()
            opt.load_state_dict(sd)
            out["adamw_state_dict"] = sd
    # a NaN gradient in one rank's shard: every rank raises, no shard moves
    model = _shard(_model(), world)
    before = _full(model)
    opt = sk.SparseSGD(model, _selection(_model()), lr=0.1)
    loss = F.cross_entropy(model(xs), ys)
    loss.backward()
    if rank == world - 1:
        for p in model.parameters():
            p.grad.to_local().fill_(float("nan"))
    try:
        opt.step()
        out["nan"] = None
    except Exception as e:  # noqa: BLE001 - reported to the test
        out["nan"] = (type(e).__name__, str(e))
    out["nan_untouched"] = torch.equal(_full(model), before)
    return out


def _check(results, world):
    for name in OPTIMIZERS:
        ref, ref_bytes = _single(name)
        for rank, res in enumerate(results):
            r = res[name]
            assert r["outside_unchanged"], f"{name}: rank {rank} moved a coordinate outside S"
            torch.testing.assert_close(r["theta"], ref, **TOL, msg=f"{name} rank {rank} world {world}")
        # O(k / world): the shards' selected coordinates partition S, and so does the state
        assert sum(res[name]["k_local"] for res in results) == results[0][name]["k"], name
        assert sum(res[name]["state_bytes"] for res in results) == ref_bytes, name
        assert max(res[name]["k_local"] for res in results) < results[0][name]["k"], name
    # a shard's state_dict does not load anywhere else: one process, or another rank
    plain = OPTIMIZERS["adamw"][0](_model(), _selection(_model()))
    with pytest.raises(ValueError, match=f"rank 0 of an FSDP2 world of {world}"):
        plain.load_state_dict(results[0]["adamw_state_dict"])
    for rank, res in enumerate(results):
        assert res["nan"] is not None and res["nan"][0] == "NonFiniteError", (rank, res["nan"])
        if rank != world - 1:
            assert f"rank {world - 1}" in res["nan"][1], res["nan"]
        assert res["nan_untouched"], rank


def test_sparse_optimizers_under_fsdp2_world2():
    _check(run_world(_worker, 2), 2)


def test_sparse_optimizers_under_fsdp2_world4():
    _check(run_world(_worker, 4), 4)


# ---------------------------------------------------------------------------------------------- select over shards
SELECT_KS = (1, 7, 30, 60)  # N = 6 * 7 + 7 + 7 * 3 + 3 = 73, and k = N


def _scores(numel, dtype, ties):
    g = torch.Generator().manual_seed(11)
    if ties:  # 4 distinct values: every threshold is a tie shared by several ranks' shards
        return torch.randint(0, 4, (numel,), generator=g).to(dtype) - 1.5
    return torch.randn(numel, generator=g, dtype=torch.float64).to(dtype)


def _local_rows(full, space, model):
    """Per parameter, this rank's rows of the flat global score vector (shaped like the local shard)."""
    from sapsel_kernels.distributed import dtensor_rows

    out = []
    for p, off in zip(model.parameters(), space.offsets):
        r0, r1, row = dtensor_rows(p)
        out.append(full[off + r0 * row:off + r1 * row].reshape(p.to_local().shape))
    return out


def _select_worker(rank, world):
    import torch.distributed as dist

    group = dist.group.WORLD
    model = _shard(_model(), world)
    space = sk.ParamSpace(model)
    out = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for ties in (False, True):
            full = _scores(space.numel, dtype, ties)
            mine = _local_rows(full, space, model)
            for k in SELECT_KS + (space.numel,):
                k = min(k, space.numel)
                for largest in (True, False):
                    sel = sk.select(mine, k, largest=largest, space=space, group=group, gather=True)
                    part = sk.select(dict(zip(space.names, mine)), k, largest=largest, space=space, group=group)
                    flat_local = torch.cat([t.reshape(-1) for t in mine])
                    out[(str(dtype), ties, k, largest)] = {
                        "indices": sel.indices, "threshold": sel.threshold.double().item(),
                        "part": part.indices, "counts": part.shard_counts, "layout": part.layout,
                        # the local positions address this rank's flat shard vector at the same scores
                        "local_ok": torch.equal(flat_local[part.local_indices], full[part.indices])}
    # the optimizer takes this rank's part directly (no gathered index list): the same step as the full selection
    x, y = _data()
    per = x.shape[0] // world
    xs, ys = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
    thetas = []
    for use_part in (False, True):
        model = _shard(_model(), world)
        space = sk.ParamSpace(model)
        full = _scores(space.numel, torch.float32, True)
        sel = sk.select(_local_rows(full, space, model), 20, space=space, group=group, gather=not use_part)
        opt = sk.SparseAdamW(model, sel, lr=0.05)
        for _ in range(2):
            _plain_step(model, opt, xs, ys)
        thetas.append(_full(model))
        out[f"k_local_{use_part}"] = opt.k_local
    out["part_step_equal"] = torch.equal(thetas[0], thetas[1])
    # a NaN in the last rank's shard: every rank raises, naming the GLOBAL position (the shards interleave)
    from sapsel_kernels.distributed import ShardLayout

    model = _shard(_model(), world)
    space = sk.ParamSpace(model)
    local = torch.cat([t.reshape(-1) for t in _local_rows(_scores(space.numel, torch.float32, False), space, model)])
    layout = ShardLayout(space)
    bad = int(layout.to_global(torch.tensor([0]))[0]) if rank == world - 1 else -1  # its first row of 0.weight
    if rank == world - 1:
        local[0] = float("nan")
    try:
        sk.select(local, 5, space=space, group=group)
        out["nan"] = None
    except Exception as e:  # noqa: BLE001 - reported to the test
        out["nan"] = (type(e).__name__, str(e))
    out["nan_where"] = [int(v) for v in all_gather_int(bad, group)]
    return out


def all_gather_int(v, group):
    import torch.distributed as dist

    out = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, torch.tensor([v], dtype=torch.int64), group=group)
    return [int(o) for o in out]


def _check_select(results, world):
    space = sk.ParamSpace(_model())
    for key in results[0]:
        if not isinstance(key, tuple):
            continue
        dtype, ties, k, largest = key
        full = _scores(space.numel, getattr(torch, dtype.split(".")[1]), ties)
        ref = sk.select(full, k, largest=largest)
        parts = []
        for rank, res in enumerate(results):
            r = res[key]
            assert torch.equal(r["indices"], ref.indices), (key, rank)
            assert r["threshold"] == ref.threshold.double().item(), (key, rank)
            assert r["layout"] == "fsdp2" and r["local_ok"], (key, rank)
            assert r["counts"] == results[0][key]["counts"] and r["counts"][rank] == r["part"].numel()
            parts.append(r["part"])
        assert torch.equal(torch.cat(parts).sort().values, ref.indices), key
    for res in results:
        assert res["part_step_equal"] and res["k_local_True"] == res["k_local_False"]
        g = max(res["nan_where"])
        assert res["nan"][0] == "NonFiniteError" and space.describe_position(g) in res["nan"][1], (res["nan"], g)


def test_select_over_fsdp2_shards_world2():
    _check_select(run_world(_select_worker, 2), 2)


def test_select_over_fsdp2_shards_world4():
    _check_select(run_world(_select_worker, 4), 4)


# ---------------------------------------------------------------------------------------------- gradient-only estimates
GNB_PROBES, GNB_SEED = 3, 7


def _global_batches():
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(9, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (9,), generator=g))
            for _ in range(3)]


def _part(batch, rank, world):
    """Rank r's part of a global batch: torch.tensor_split, so the parts are uneven (9 points)."""
    return tuple(t.tensor_split(world)[rank] for t in batch)


def _ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def _logits(model, batch):
    return model(batch[0])


def _gnb_oracle(world):
    """Gauss-Newton-Bartlett by hand on one process, with the documented per-rank label rule: for sample s and global
    batch b, rank r's rows draw y ~ softmax(logits) from the generator keyed (seed, s, b * W + r); the term is
    B g (.) g with g the gradient of the mean cross-entropy over the B rows of the global batch."""
    from sapsel_kernels.probe_loop import seed_for

    model = _model()
    params = list(model.parameters())
    samples = []
    for s in range(GNB_PROBES):
        acc = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
        for bi, batch in enumerate(_global_batches()):
            total, rows = 0.0, batch[0].shape[0]
            for r in range(world):
                x, _ = _part(batch, r, world)
                logits = model(x)
                gen = torch.Generator().manual_seed(seed_for(GNB_SEED, s, bi * world + r))
                y = torch.multinomial(torch.softmax(logits.detach(), -1), 1, generator=gen).squeeze(1)
                total = total + F.cross_entropy(logits, y, reduction="sum")
            g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(total / rows, params)])
            acc += rows * g * g
        samples.append(acc / 3)
    return torch.stack(samples).mean(0)


def _estimate_worker(rank, world):
    import torch.distributed as dist

    group = dist.group.WORLD
    model = _shard(_model(), world)
    space = sk.ParamSpace(model)
    from sapsel_kernels.distributed import ShardLayout

    layout = ShardLayout(space)
    where = layout.to_global(torch.arange(layout.local_numel))  # the global index of each local position
    mine = [_part(b, rank, world) for b in _global_batches()]
    out = {"where": where}
    for est_name in ("squared_grad", "grad_abs", "gauss_newton"):
        kw = dict(n_probes=GNB_PROBES, seed=GNB_SEED, output_fn=_logits) if est_name == "gauss_newton" else {}
        est = sk.hessian_diag(model, _ce, mine, est_name, **kw)  # group: the model's mesh
        sel = sk.select(est.mean, fraction=0.2, space=est.space, group=group, gather=True)
        full = torch.zeros(space.numel, dtype=torch.float32)
        full[where] = est.mean
        dist.all_reduce(full, group=group)  # the gathered estimate (every position owned by exactly one rank)
        out[est_name] = {"mean": est.mean, "n": est.n_probes, "sel": sel.indices,
                         "sel_ref": sk.select(full, fraction=0.2).indices, "views": est.views()["0.weight"].shape,
                         "grads_untouched": all(p.grad is None for p in model.parameters())}
    errors = {}
    for key, fn in (("hutchinson", lambda: sk.hessian_diag(model, _ce, mine, n_probes=2)),
                    ("fisher", lambda: sk.hessian_diag(model, _ce, mine, "fisher")),
                    ("batches", lambda: sk.hessian_diag(model, _ce, mine[:2] if rank == 1 else mine,
                                                        "squared_grad"))):
        try:
            fn()
            errors[key] = None
        except Exception as e:  # noqa: BLE001 - reported to the test
            errors[key] = (type(e).__name__, str(e))
    out["errors"] = errors
    return out


def _check_estimates(results, world):
    plain = _model()
    ref = {"squared_grad": sk.hessian_diag(plain, _ce, _global_batches(), "squared_grad"),
           "grad_abs": sk.hessian_diag(plain, _ce, _global_batches(), "grad_abs")}
    gnb = _gnb_oracle(world).float()
    for rank, res in enumerate(results):
        w = res["where"]
        for name in ("squared_grad", "grad_abs", "gauss_newton"):
            r = res[name]
            expect = gnb[w] if name == "gauss_newton" else ref[name].mean[w]
            # float32 accumulators on both sides; the float64 gradients differ only in summation order
            torch.testing.assert_close(r["mean"], expect, rtol=2e-6, atol=1e-9, msg=f"{name} rank {rank}")
            assert r["n"] == (GNB_PROBES if name == "gauss_newton" else ref[name].n_probes), name
            assert torch.equal(r["sel"], r["sel_ref"]) and r["grads_untouched"], name
        e = res["errors"]
        assert e["hutchinson"][0] == "ValueError" and "FSDP2" in e["hutchinson"][1], e
        assert e["fisher"][0] == "ValueError" and "per-point" in e["fisher"][1], e
        assert e["batches"][0] == "ValueError" and "number of batches" in e["batches"][1], e


def test_gradient_estimators_under_fsdp2_world2():
    _check_estimates(run_world(_estimate_worker, 2), 2)


def test_gradient_estimators_under_fsdp2_world4():
    _check_estimates(run_world(_estimate_worker, 4), 4)


def test_nccl_check_script_dry_run_on_gloo():
    """bench/nccl_check.py (the GPU machine's NCCL world-1 check) runs its checks over gloo on the CPU and passes:
    a group of one rank gives group=None's result on every path."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
    run = subprocess.run([sys.executable, "-m", "bench.nccl_check", "gloo"], cwd=root, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["backend"] == "gloo" and all(v for k, v in out.items() if isinstance(v, bool)), out
