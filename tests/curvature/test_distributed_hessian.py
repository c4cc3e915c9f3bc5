"""Data-parallel ``hessian_diag(group=...)`` on gloo CPU process groups of 4, 2 and 1 ranks (tests/helpers/dist.py).

Spawning a world costs 4-9 s here (and every rank pays ~3 s of torch / torch._dynamo imports), so ONE spawned world
of 4 ranks makes every check (world size 2 on subgroups, 1 on singleton groups) and returns the results; the tests
assert on them. Data: GLOBAL batches of 6 points, rank r of W holding the contiguous block r * B / W ..
(r + 1) * B / W - 1 (the order the equality with one process holds for); the single-process references are computed
on ranks 2 and 3 (one thread, the same process setup as the ranks) while ranks 0 and 1 run the pair-only checks.
"""

import math
import os
import signal

import pytest
import torch
import torch.distributed as dist
from tests.helpers.dist import run_world

import sapsel_kernels as sk
from sapsel_kernels import Checkpoint, ProbeConfig, StopRule, hessian_diag

ESTIMATORS = ("hutchinson", "gauss_newton", "squared_grad", "fisher", "grad_abs", "exact")
ce = torch.nn.CrossEntropyLoss()

# max |diff| / max |value| of world 2 and 4 vs one process over the concatenated batches, per estimator (measured
# on this MLP: at most 2.2e-7, a couple of float32 ulps of the largest score); 4x headroom for other BLAS builds
REL_TOL = 1e-6


def _model(hidden: int = 8, seed: int = 0, bn: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(5, hidden)] + ([torch.nn.BatchNorm1d(hidden)] if bn else []) + \
        [torch.nn.Tanh(), torch.nn.Linear(hidden, 3)]
    model = torch.nn.Sequential(*layers)
    if bn:  # non-trivial running statistics
        with torch.no_grad():
            model[1].running_mean.uniform_(-0.5, 0.5)
            model[1].running_var.uniform_(0.5, 1.5)
    return model


def _batches(n: int, seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 5, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(n)]


def _shard(batches: list, rank: int, world: int) -> list:
    per = len(batches) // world
    return batches[rank * per:(rank + 1) * per]


def _out(m, b):
    return m(b[0])


def _kw(estimator: str) -> dict:
    if estimator == "hutchinson":
        return dict(n_probes=12, seed=3, probes=ProbeConfig(per_pass=5))
    if estimator == "gauss_newton":
        return dict(n_probes=12, seed=3, probes=ProbeConfig(per_pass=5), output_fn=_out)
    return {}


def _all(model, data, group) -> dict:
    out = {}
    for e in ESTIMATORS:
        est = hessian_diag(model, ce, data, e, group=group, **_kw(e))
        out[e] = (est.mean, est.m2, est.n_probes, est.info.get("stopped_by"), est.info.get("world_size"))
    return out


def _catch(fn):
    try:
        return ("ok", fn())
    except BaseException as exc:  # noqa: BLE001 - KeyboardInterrupt included: it is a result here
        return (type(exc).__name__, str(exc))


_STOP = dict(n_probes=8, seed=5, probes=ProbeConfig(per_pass=4),
             stop=StopRule(rtol=0.55, stable_k=10, turnover_tol=0.2))


def _equality(rank: int, world: int, group, res: dict) -> None:
    """Every estimator over 8 global batches and over one batch per rank; the stop rule's decision."""
    model = _model()
    for n_global in (8, world):
        res[f"dist{n_global}"] = _all(model, _shard(_batches(n_global), rank, world), group)
    est = hessian_diag(model, ce, _shard(_batches(8), rank, world), group=group, **_STOP)
    res["stop"] = (est.mean, est.n_probes, est.info["stopped_by"], est.info["history"])


def _references(which: tuple, res: dict) -> None:
    """Single-process estimates over the concatenated batches (computed on ranks 2 and 3 while 0 and 1 work)."""
    for n_global in which:
        res[f"ref{n_global}"] = _all(_model(), _batches(n_global), None)
    if 8 in which:
        ref = hessian_diag(_model(), ce, _batches(8), **_STOP)
        res["stop_ref"] = (ref.mean, ref.n_probes, ref.info["stopped_by"], ref.info["history"])


def _world1(rank: int, world: int, group, res: dict) -> None:
    """A group of one rank gives the bits of group=None."""
    model, data = _model(), _shard(_batches(8), rank, 2)
    mine, plain = _all(model, data, group), _all(model, data, None)
    res["world1"] = {e: all(torch.equal(a, b) for a, b in zip(mine[e][:2], plain[e][:2])) and
                     mine[e][2] == plain[e][2] and mine[e][4] == 1 for e in ESTIMATORS}


def _ddp(rank: int, world: int, group, res: dict) -> None:
    """A DDP-wrapped model is estimated through model.module: same bits as the plain replicated module."""
    model, data = _model(), _shard(_batches(8), rank, world)
    ddp = torch.nn.parallel.DistributedDataParallel(_model(), process_group=group)
    out = {}
    for name, kw in (("rev_rev", dict(hvp="rev_rev")), ("fwd_rev", dict(hvp="fwd_rev"))):
        a = hessian_diag(model, ce, data, n_probes=8, seed=2, group=group, **kw)
        b = hessian_diag(ddp, ce, data, n_probes=8, seed=2, group=group, **kw)
        out[name] = torch.equal(a.mean, b.mean) and torch.equal(a.m2, b.m2)
    for e in ("fisher", "gauss_newton"):  # functional_call over the module; output_fn gets the module
        a = hessian_diag(model, ce, data, e, group=group, **_kw(e))
        b = hessian_diag(ddp, ce, data, e, group=group, space=sk.ParamSpace(ddp), **_kw(e))  # module.* names
        out[e] = torch.equal(a.mean, b.mean) and b.space.names == sk.ParamSpace(model).names
    out["no_grads"] = all(p.grad is None for p in ddp.parameters())
    res["ddp"] = out


def _checkpoints(rank: int, world: int, group, res: dict, tmp: str) -> None:
    model, data = _model(), _shard(_batches(8), rank, world)
    kw = dict(seed=4, probes=ProbeConfig(per_pass=4), group=group)
    own = os.path.join(tmp, f"own{rank}.ckpt")  # a path per rank: only rank 0 writes
    hessian_diag(model, ce, data, n_probes=8, checkpoint=Checkpoint(own), **kw)
    res["own_exists"] = os.path.exists(own)
    res["own_resume"] = _catch(lambda: hessian_diag(model, ce, data, n_probes=16,
                                                    checkpoint=Checkpoint(own, resume=True), **kw))
    shared = os.path.join(tmp, "shared.ckpt")
    full = hessian_diag(model, ce, data, n_probes=16, **kw)
    part = hessian_diag(model, ce, data, n_probes=8, checkpoint=Checkpoint(shared), **kw)
    done = hessian_diag(model, ce, data, n_probes=16, checkpoint=Checkpoint(shared, resume=True), **kw)
    res["resume"] = (part.n_probes, done.n_probes, done.info.get("resumed_at"),
                     torch.equal(done.mean, full.mean) and torch.equal(done.m2, full.m2))
    single = os.path.join(tmp, "single.ckpt")
    if rank == 0:
        hessian_diag(model, ce, data, n_probes=8, seed=4, probes=ProbeConfig(per_pass=4), checkpoint=Checkpoint(single))
    dist.barrier(group=group)
    res["world_size_refused"] = _catch(lambda: hessian_diag(model, ce, data, n_probes=16,
                                                            checkpoint=Checkpoint(single, resume=True), **kw))


def _errors(rank: int, world: int, group, res: dict) -> None:
    """Bad input raises on EVERY rank (no hang); the group stays usable afterwards."""
    data, model = _shard(_batches(8), rank, world), _model()
    err = {}

    def run(name, fn):
        err[name] = _catch(fn)

    run("seed", lambda: hessian_diag(model, ce, data, n_probes=8, seed=rank, group=group))
    run("n_probes", lambda: hessian_diag(model, ce, data, n_probes=8 + rank, group=group))
    run("estimator", lambda: hessian_diag(model, ce, data, "hutchinson" if rank == 0 else "squared_grad",
                                          group=group))
    run("params", lambda: hessian_diag(_model(hidden=8 + rank), ce, data, n_probes=8, group=group))
    moved = _model()
    if rank == 1:
        with torch.no_grad():
            moved[0].weight[0, 0] += 1e-3
    run("weights", lambda: hessian_diag(moved, ce, data, n_probes=8, group=group))
    bn = _model(bn=True)
    if rank == 1:
        bn[1].running_mean += 0.1  # BatchNorm statistics that drifted apart (DDP without broadcast_buffers)
    run("buffers", lambda: hessian_diag(bn, ce, data, "grad_abs", group=group))
    run("empty", lambda: hessian_diag(model, ce, [] if rank == 1 else data, n_probes=8, group=group))
    run("bad_arg", lambda: hessian_diag(model, ce, data, n_probes=0 if rank == 1 else 8, group=group))
    run("type", lambda: hessian_diag(model, ce, data, group="world"))

    def failing(what, at, on_rank, base=lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1])):
        calls = {"n": 0}

        def loss(m, b):
            calls["n"] += 1
            if rank == on_rank and calls["n"] >= at:
                if what == "nan":
                    return base(m, b) * float("nan")
                if what == "raise":
                    raise RuntimeError("boom in loss_fn")
                if what == "sigint" and calls["n"] == at:
                    os.kill(os.getpid(), signal.SIGINT)
                if what == "interrupt":
                    raise KeyboardInterrupt
            return base(m, b)

        return loss

    # 4 batches per rank, rev_rev: loss_fn runs 4 times per pass of 4 probes; call 5 is in the second pass
    hkw = dict(n_probes=16, probes=ProbeConfig(per_pass=4), group=group)
    run("nan_mid_pass", lambda: hessian_diag(model, failing("nan", 5, 1), data, **hkw))
    run("nan_squared_grad", lambda: hessian_diag(model, failing("nan", 3, 1), data, "squared_grad", group=group))
    run("raise_gauss_newton", lambda: hessian_diag(model, ce, data, "gauss_newton", group=group, n_probes=8,
                                                   output_fn=failing("raise", 6, 0, base=_out)))
    run("raise_fisher", lambda: hessian_diag(model, failing("raise", 1, 1), data, "fisher", group=group))

    def summary(est):
        return (est.n_probes, est.info["stopped_by"], est.mean)

    # Ctrl-C: a real SIGINT on rank 1 in pass 3 is noted and every rank stops after the same pass; a
    # KeyboardInterrupt raised inside a pass on rank 0 the same
    # a process started in the background by a non-interactive shell (`cmd &`) inherits SIGINT ignored, and then
    # hessian_diag rightly leaves the disposition alone: give this worker Python's own handler, as a terminal would
    signal.signal(signal.SIGINT, signal.default_int_handler)
    run("sigint", lambda: summary(hessian_diag(model, failing("sigint", 9, 1), data, **hkw)))
    run("interrupt", lambda: summary(hessian_diag(model, failing("interrupt", 5, 0), data, **hkw)))
    run("interrupt_fisher", lambda: hessian_diag(model, failing("interrupt", 2, 0), data, "fisher", group=group))
    run("after", lambda: hessian_diag(model, ce, data, n_probes=8, group=group).n_probes)
    res["errors"] = err


def _fsdp(world: int):
    """FSDP2 (fully_shard: DTensor parameters): HVP estimators are refused with a ValueError on every rank (the
    gradient-only ones run sharded: tests/curvature/test_distributed_fsdp.py)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _model()
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    return hessian_diag(model, ce, _batches(1), "hutchinson", n_probes=2, group=dist.group.WORLD)


def _worlds(rank, world, tmp):
    """One spawned world of 4: world size 4 on WORLD, world size 2 on the pair {0, 1} (DDP, checkpoints and errors
    too), world size 1 on singleton groups; meanwhile ranks 2 and 3 compute the single-process references."""
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group, in the same order
    singles = [dist.new_group([r]) for r in range(world)]
    out = {"w4": {}, "w2": {}}
    _equality(rank, world, dist.group.WORLD, out["w4"])
    out["fsdp"] = _catch(lambda: _fsdp(world))
    pair, prank = pairs[rank // 2], rank % 2
    if rank < 2:
        _equality(prank, 2, pair, out["w2"])
        _world1(rank, 1, singles[rank], out)
        _ddp(prank, 2, pair, out)
        _checkpoints(prank, 2, pair, out, tmp)
        _errors(prank, 2, pair, out)
    else:
        _references((8,) if rank == 2 else (4, 2), out)
    return out


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    return run_world(_worlds, 4, str(tmp)), tmp


def _rel(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    diff = float((a - b).abs().max())
    return diff, diff / max(float(b.abs().max()), 1e-30)


def _check_equality(results: list, refs: dict, world: int) -> dict:
    """Ranks bit-identical to each other; rank 0 vs one process at float-rounding level; the table of diffs."""
    table = {}
    for n_global in (8, world):
        for e in ESTIMATORS:
            ref, mine = refs[f"ref{n_global}"][e], results[0][f"dist{n_global}"][e]
            for r in results[1:]:  # the same bits on every rank
                other = r[f"dist{n_global}"][e]
                assert torch.equal(other[0], mine[0]) and torch.equal(other[1], mine[1]), (world, e)
            assert mine[2] == ref[2] and mine[3] == ref[3] and mine[4] == world, (world, e, mine[2:], ref[2:])
            d_mean, r_mean = _rel(mine[0], ref[0])
            d_m2, r_m2 = _rel(mine[1], ref[1]) if e not in ("grad_abs", "exact") else (0.0, 0.0)
            table[(n_global // world, e)] = (d_mean, r_mean, d_m2, r_m2)
            assert r_mean <= REL_TOL and r_m2 <= REL_TOL, (world, n_global, e, table[(n_global // world, e)])
    stop = [r["stop"] for r in results]
    ref = refs["stop_ref"]
    for s in stop[1:]:  # the same decision on every rank, from the same accumulators
        assert s[1:3] == stop[0][1:3] and s[3] == stop[0][3] and torch.equal(s[0], stop[0][0])
    assert stop[0][1:3] == ref[1:3], (stop[0][1:3], ref[1:3])
    assert stop[0][2] in ("rtol", "topk_stable") and stop[0][1] < _STOP["n_probes"] * 8
    for a, b in zip(stop[0][3], ref[3]):
        assert a.keys() == b.keys() and all(math.isclose(a[k], b[k], rel_tol=1e-4, abs_tol=1e-9) for k in a)
    return table


def _print_table(table: dict, world: int) -> None:
    for (per_rank, e), (d_mean, r_mean, d_m2, r_m2) in sorted(table.items()):
        print(f"world {world}, {per_rank} batch(es)/rank, {e:13s}: mean max|d| {d_mean:.3g} rel {r_mean:.3g}; "
              f"M2 max|d| {d_m2:.3g} rel {r_m2:.3g}")


def _refs(results: list) -> dict:
    return {**results[2], **results[3]}


def test_world_4_equals_one_process(worlds):
    results, _ = worlds
    _print_table(_check_equality([r["w4"] for r in results], _refs(results), 4), 4)


def test_world_2_equals_one_process(worlds):
    results, _ = worlds
    w2 = [r["w2"] for r in results]
    table = _check_equality(w2[:2], _refs(results), 2)
    _print_table(table, 2)
    # one batch per rank, two ranks: a + b == b + a, so the sums (and everything after them) are the same bits
    for e in ("hutchinson", "gauss_newton", "grad_abs", "exact"):
        assert table[(1, e)][0] == 0.0 and table[(1, e)][2] == 0.0, e


def test_world_1_group_is_bit_identical_to_no_group(worlds):
    results, _ = worlds
    for r in results[:2]:
        assert r["world1"] == {e: True for e in ESTIMATORS}, r["world1"]


def test_ddp_model_is_estimated_through_its_module(worlds):
    results, _ = worlds
    for r in results[:2]:
        assert r["ddp"] == {"rev_rev": True, "fwd_rev": True, "fisher": True, "gauss_newton": True,
                            "no_grads": True}, r["ddp"]


def test_checkpoints_rank_0_writes_world_size_recorded(worlds):
    results, tmp = worlds
    results = results[:2]
    assert [r["own_exists"] for r in results] == [True, False]
    for r in results:
        kind, msg = r["own_resume"]  # a file seen by one rank only is refused on every rank
        assert kind == "ValueError" and "exists on 1 of 2 ranks" in msg, msg
        assert r["resume"] == (8, 16, 8, True)
        kind, msg = r["world_size_refused"]
        assert kind == "ValueError" and "world size 1" in msg and "world size 2" in msg, msg
    with pytest.raises(ValueError, match="world size 2.*this run has world size 1"):
        hessian_diag(_model(), ce, _batches(4), n_probes=16, seed=4, probes=ProbeConfig(per_pass=4),
                     checkpoint=Checkpoint(tmp / "shared.ckpt", resume=True))


def test_bad_input_raises_on_every_rank(worlds):
    results, _ = worlds
    e0, e1 = results[0]["errors"], results[1]["errors"]
    for name, needle in (("seed", "seed (rank 0: 0, rank 1: 1)"), ("n_probes", "n_probes (rank 0: 8, rank 1: 9)"),
                         ("estimator", "estimator (rank 0: 'hutchinson', rank 1: 'squared_grad')"),
                         ("params", "number of trainable parameters (rank 0: 75, rank 1: 84)"),
                         ("weights", "weights (ParamSpace.fingerprint)"), ("buffers", "buffers")):
        assert e0[name] == e1[name], (name, e0[name], e1[name])  # the same ValueError on every rank
        assert e0[name][0] == "ValueError" and needle in e0[name][1], (name, e0[name])
    assert "the ranks disagree" in e0["weights"][1] and "estimator" not in e0["weights"][1]
    # a local error: that rank raises its own exception, the others a ValueError naming the rank and the error
    for name, bad, kind, needle in (("empty", 1, "ValueError", "empty list"), ("bad_arg", 1, "ValueError", "n_probes"),
                                    ("nan_mid_pass", 1, "NonFiniteError", "NaN"),
                                    ("nan_squared_grad", 1, "NonFiniteError", "NaN"),
                                    ("raise_gauss_newton", 0, "RuntimeError", "boom"),
                                    ("raise_fisher", 1, "RuntimeError", "boom")):
        own, other = results[bad]["errors"][name], results[1 - bad]["errors"][name]
        assert own[0] == kind and needle in own[1], (name, own)
        assert other[0] == "ValueError" and f"rank {bad} of 2 failed ({kind}: " in other[1] and needle in other[1], \
            (name, other)
    assert e0["type"][0] == e1["type"][0] == "TypeError" and "ProcessGroup" in e0["type"][1]
    assert e0["after"] == e1["after"] == ("ok", 8)  # the group still works


def test_ctrl_c_stops_every_rank_after_the_same_pass(worlds):
    results, _ = worlds
    e0, e1 = results[0]["errors"], results[1]["errors"]
    for name, n in (("sigint", 8), ("interrupt", 4)):  # the same count and bits on every rank
        assert e0[name][0] == e1[name][0] == "ok", (name, e0[name], e1[name])
        assert e0[name][1][:2] == e1[name][1][:2] == (n, "interrupted"), (name, e0[name][1][:2], e1[name][1][:2])
        assert torch.equal(e0[name][1][2], e1[name][1][2])
    assert e0["interrupt_fisher"][0] == e1["interrupt_fisher"][0] == "AgreedInterrupt"  # a KeyboardInterrupt


def test_sharded_parameters_are_refused(worlds):
    results, _ = worlds
    for r in results:
        assert r["fsdp"][0] == "ValueError" and "FSDP2" in r["fsdp"][1], r["fsdp"]


def test_group_argument_without_process_group():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="init_process_group"):
        hessian_diag(_model(), ce, _batches(1), group=object())


def _lean_worker(rank: int, world: int) -> dict:
    """Every estimator with ProbeConfig(variance=False) under a group of 2: the mean alone is merged over the
    ranks (Comm.merge without M2: one all_reduce per chunk) and must be the bits of the full estimate's mean, which
    the tests above hold equal to one process."""
    group = dist.group.WORLD
    model, data = _model(), _shard(_batches(8), rank, world)
    out = {}
    for e in ESTIMATORS:
        kw = _kw(e)
        if e in ("hutchinson", "gauss_newton"):
            lean_probes = ProbeConfig(**{**(kw["probes"].__dict__ if "probes" in kw else {}), "variance": False})
            lean_kw = {**kw, "probes": lean_probes}
        else:
            lean_kw = {**kw, "probes": ProbeConfig(variance=False)}
        full = hessian_diag(model, ce, data, e, group=group, **kw)
        lean = hessian_diag(model, ce, data, e, group=group, **lean_kw)
        out[e] = (torch.equal(full.mean, lean.mean), lean.m2 is None)
    return out


def test_without_variance_every_estimator_merges_the_same_mean():
    for r in run_world(_lean_worker, 2):
        assert r == {e: (True, True) for e in ESTIMATORS}, r
