"""Bytes communicated per phase of the pipeline over 2 gloo ranks: ours against what a user would otherwise run.

One spawned world of 2 CPU ranks (gloo, file rendezvous, 1 intra-op thread each) runs every phase on an MLP of
N = 1,054,211 float32 parameters (k = 1%, 64 points per rank and batch) and counts rank 0's payload bytes by
wrapping the ``torch.distributed`` functions the package and FSDP2 call (all_reduce: the tensor; all_gather /
all_gather_single: the gathered output; reduce_scatter_single: the input; broadcast: the tensor; the object
collectives: their pickled size times the world size). DDP's reducer runs in C++, so its traffic is counted by a
DDP communication hook that adds up the bucket sizes before running the default all-reduce.

| phase | ours | alternative |
|---|---|---|
| estimate: ``hessian_diag(group=)``, Hutchinson m = 4 | per pass: flags + 4 x N | none: DDP has no double backward |
| select over FSDP2 shards, ``select(group=)`` | histograms | all_gather every score, then ``select`` |
| ``unlearn`` first_order, ``group=`` | G_S: k values + flags | all-reduce the whole G (N values) |
| ``unlearn`` targeted, 5 steps, ``group=`` | k values per step + flags | the same loop under DDP (N per backward) |
| one SparseSAM step under DDP | DDP's own (both passes) | dense SAM under DDP: the same |
| one SparseAdamW step under FSDP2 | + 8 bytes (the NaN verdict) | FSDP2's own all-gather / reduce-scatter |

The time is one round of the whole world (spawn and every phase): the table is about bytes, which do not depend on
the machine. Results: ``bench/results/distributed_phases.{md,json}`` (written by the test).
Run: ``python -m pytest bench/test_bench_distributed_phases.py --benchmark-only``.
"""

import inspect
import json
import os
import pickle
import platform
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import sapsel_kernels as sk

WORLD = 2
FRACTION = 0.01
RESULTS = os.path.join(os.path.dirname(__file__), "results")
_COUNTED = ("all_reduce", "all_gather", "all_gather_single", "reduce_scatter_single", "broadcast",
            "all_gather_object", "broadcast_object_list")


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.Tanh(), torch.nn.Linear(1024, 768),
                               torch.nn.Tanh(), torch.nn.Linear(768, 3))


def _batch(rank, i=0):
    g = torch.Generator().manual_seed(100 * i + rank)
    return torch.randn(64, 256, generator=g), torch.randint(0, 3, (64,), generator=g)


def _ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


class _Bytes:
    """Payload bytes of this rank's collectives while active, by function (see the module docstring)."""

    def __enter__(self):
        self.by = {}
        self._orig = {name: getattr(dist, name) for name in _COUNTED}

        def counted(name, fn):
            sig = inspect.signature(fn)

            def wrapper(*args, **kw):
                a = sig.bind(*args, **kw).arguments
                if name in ("all_reduce", "broadcast"):
                    n = a["tensor"].numel() * a["tensor"].element_size()
                elif name == "all_gather":
                    n = sum(o.numel() * o.element_size() for o in a["tensor_list"])
                elif name == "all_gather_single":
                    n = a["output_tensor"].numel() * a["output_tensor"].element_size()
                elif name == "reduce_scatter_single":
                    n = a["input"].numel() * a["input"].element_size()
                elif name == "all_gather_object":
                    n = len(pickle.dumps(a["obj"])) * len(a["object_list"])
                else:  # broadcast_object_list
                    n = sum(len(pickle.dumps(o)) for o in a["object_list"])
                self.by[name] = self.by.get(name, 0) + n
                return fn(*args, **kw)
            return wrapper

        for name, fn in self._orig.items():
            setattr(dist, name, counted(name, fn))
        return self

    def __exit__(self, *exc):
        for name, fn in self._orig.items():
            setattr(dist, name, fn)

    @property
    def total(self) -> int:
        return sum(self.by.values())


def _ddp(model):
    """DDP with a comm hook that counts the bucket bytes (its reducer's all-reduce is C++, not dist.all_reduce)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    ddp = torch.nn.parallel.DistributedDataParallel(model)
    ddp.bucket_bytes = 0

    def hook(state, bucket):
        ddp.bucket_bytes += bucket.buffer().numel() * bucket.buffer().element_size()
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, hook)
    return ddp


def _fsdp(model):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    for i in (0, 2, 4):
        fully_shard(model[i], mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _phases(rank):
    group = dist.group.WORLD
    rows = []

    def row(phase, ours, alternative, alt_name, note="", context=False):
        rows.append({"phase": phase, "ours_bytes": int(ours), "alternative": alt_name,
                     "alternative_bytes": None if alternative is None else int(alternative), "note": note,
                     "context": context})

    model = _model()
    space = sk.ParamSpace(model)
    n = space.numel
    data = [_batch(rank)]
    with _Bytes() as b:
        est = sk.hessian_diag(model, _ce, data, n_probes=4, seed=0, group=group)
    row("estimate: hessian_diag(group=), Hutchinson m=4", b.total, None, "none (DDP has no double backward)",
        f"N = {n:,}: the {est.n_probes} probes' products (4 x N float32) all-reduced, plus the agreement")
    sel = sk.select(est.mean, fraction=FRACTION, space=space)  # replicated scores: a local select, no traffic
    k = sel.k

    # select over FSDP2 shards: ours vs all-gathering every score
    fmodel = _fsdp(_model())
    fspace = sk.ParamSpace(fmodel)
    with _Bytes() as b:
        fest = sk.hessian_diag(fmodel, _ce, data, "squared_grad")
    fsdp_own = b.by.get("all_gather_single", 0) + b.by.get("reduce_scatter_single", 0)
    row("estimate: hessian_diag on FSDP2, squared_grad, 1 batch", b.total - fsdp_own, fsdp_own,
        "FSDP2's own all-gathers and reduce-scatters of that backward", "context, not an alternative", True)
    with _Bytes() as b:
        sk.select(fest.mean, fraction=FRACTION, space=fspace, group=group)
    from sapsel_kernels.distributed import all_gather_varlen, shard_offsets

    with _Bytes() as naive:
        _, sizes = shard_offsets(fest.mean.numel())
        sk.select(all_gather_varlen(fest.mean, sizes), fraction=FRACTION)
    row("select k=1% over FSDP2 shards", b.total, naive.total, "all_gather every score + select")

    # unlearn first_order: G_S (k values) vs all-reducing the whole G
    z, zt = _batch(rank, 1), (_batch(rank, 1)[0], (_batch(rank, 1)[1] + 1) % 3)
    with _Bytes() as b:
        sk.unlearn(_model(), _ce, z, zt, sel, sk.FirstOrder(tau=1e-3), group=group)
    with _Bytes() as naive:
        from sapsel_kernels.rules import summed_gradient

        m = _model()
        g1, _, _ = summed_gradient(sk.ParamSpace(m), m, _ce, [zt])
        g0, _, _ = summed_gradient(sk.ParamSpace(m), m, _ce, [z])
        dist.all_reduce(g1 - g0, group=group)
    row("unlearn first_order, group=", b.total, naive.total, "all-reduce the whole G", f"k = {k:,}")

    # targeted, 5 steps: the gradient at S per step vs the same loop under DDP
    steps = 5
    with _Bytes() as b:
        sk.unlearn(_model(), _ce, z, zt, sel, sk.Targeted(steps=steps, lr=0.01), group=group)
    ddp = _ddp(_model())
    opt = sk.SparseSGD(ddp.module, sel, lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        (_ce(ddp, zt) - _ce(ddp, z)).backward()
        opt.step()
    row(f"unlearn targeted, {steps} steps, group=", b.total, ddp.bucket_bytes, "the loop under DDP")

    # one SparseSAM step under DDP: both passes all-reduced by DDP; the sparse optimizer adds nothing
    ddp = _ddp(_model())
    opt = sk.SparseSAM(ddp.module, sel, lr=0.01, rho=0.05)
    with _Bytes() as b:  # DDP's hook calls dist.all_reduce: counted here too
        def closure():
            loss = _ce(ddp, zt)
            loss.backward()
            return loss
        opt.step(closure)
    added = b.total - ddp.bucket_bytes
    ddp = _ddp(_model())
    dense = torch.optim.SGD(ddp.parameters(), lr=0.01)
    for _ in range(2):  # dense SAM: two backward passes, each all-reduced
        dense.zero_grad()
        _ce(ddp, zt).backward()
    dense.step()
    row("one SparseSAM step under DDP", b.total, ddp.bucket_bytes, "dense SAM under DDP",
        f"DDP's own all-reduce of both passes; the sparse optimizer adds {added} bytes")

    # one SparseAdamW step under FSDP2: the optimizer adds the NaN verdict
    fmodel = _fsdp(_model())
    opt = sk.SparseAdamW(fmodel, sel, lr=0.01)
    with _Bytes() as own:
        _ce(fmodel, zt).backward()
    with _Bytes() as b:
        opt.step()
    row("one SparseAdamW step under FSDP2", b.total, own.total, "FSDP2's own forward + backward of the step",
        f"context, not an alternative; k_local = {opt.k_local:,} of k = {opt.k:,} (state {opt.state_bytes():,} "
        "bytes: O(k / world))", True)
    return rows


def _entry(rank, init_file, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=300))
    try:
        t0 = time.perf_counter()
        rows = _phases(rank)
        if rank == 0:
            with open(out, "w") as f:
                json.dump({"rows": rows, "seconds": time.perf_counter() - t0}, f)
    finally:
        dist.destroy_process_group()


def _run_world():
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        mp.start_processes(_entry, args=(os.path.join(tmp, "rendezvous"), out), nprocs=WORLD, join=True,
                           start_method="spawn")
        with open(out) as f:
            return json.load(f)


def _write(result):
    os.makedirs(RESULTS, exist_ok=True)
    cmd = "python -m pytest bench/test_bench_distributed_phases.py --benchmark-only"
    lines = ["# Bytes communicated per phase, 2 gloo ranks", "",
             f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, gloo over "
             f"loopback, 2 ranks with 1 intra-op thread each. Model: an MLP of N = "
             f"{sk.ParamSpace(_model()).numel:,} float32 parameters, k = 1%, 64 points per rank and batch. Bytes: "
             "rank 0's payload (see the bench's docstring for how each collective is counted). "
             f"Command: `{cmd}`.", "",
             "| phase | ours, bytes / rank | alternative | its bytes / rank | alternative / ours | note |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        alt = r["alternative_bytes"]
        ratio = f"{alt / r['ours_bytes']:,.1f}x" if alt and r["ours_bytes"] and not r["context"] else "-"
        lines.append(f"| {r['phase']} | {r['ours_bytes']:,} | {r['alternative']} | "
                     f"{'-' if alt is None else f'{alt:,}'} | {ratio} | {r['note']} |")
    with open(os.path.join(RESULTS, "distributed_phases.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(RESULTS, "distributed_phases.json"), "w") as f:
        json.dump({**result, "command": cmd, "torch": torch.__version__}, f, indent=1)


def test_bytes_per_phase(benchmark):
    benchmark.group = "distributed phases (2 ranks)"
    result = benchmark.pedantic(_run_world, rounds=1, iterations=1)
    benchmark.extra_info["rows"] = result["rows"]
    _write(result)
    by = {r["phase"].split(",")[0]: r for r in result["rows"]}
    # the sparse phases send less than their alternatives
    assert by["unlearn first_order"]["ours_bytes"] < by["unlearn first_order"]["alternative_bytes"]
    assert by["select k=1% over FSDP2 shards"]["ours_bytes"] < by["select k=1% over FSDP2 shards"][
        "alternative_bytes"]
