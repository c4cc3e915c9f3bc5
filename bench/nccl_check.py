"""The distributed paths over a one-rank NCCL group on a CUDA device, against ``group=None`` on the same device.

A group of one rank must give one process's result: the data-parallel estimate (``hessian_diag(group=)``, bits),
the sharded select (indices), ``select_parameters(group=)``, ``unlearn(group=)`` (first_order and targeted), a
SparseSAM step under DDP, and under FSDP2 (``fully_shard`` on a one-rank mesh) the sparse AdamW steps, the
squared_grad estimate and the select over shards. This exercises NCCL's device buffers (flags, histograms, k-value
all_reduces) that gloo never sees.

Run from the repository root: ``python -m bench.nccl_check [nccl|gloo] [OUT.json]`` (gloo on the CPU is the dry
run CI can do). Exits 1 when a check fails; prints one JSON line per check.
"""

import json
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.nn.functional as F

import sapsel_kernels as sk


def _model(dev):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3)).to(dev)


def _data(dev, i=0):
    g = torch.Generator().manual_seed(i)
    return torch.randn(32, 16, generator=g).to(dev), torch.randint(0, 3, (32,), generator=g).to(dev)


def _ce(m, b):
    return F.cross_entropy(m(b[0]), b[1])


def _flat(model):
    return torch.cat([(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().reshape(-1)
                      for p in model.parameters()])


def _checks(dev, group):
    out = {}
    batches = [_data(dev, i) for i in range(3)]
    a = sk.hessian_diag(_model(dev), _ce, batches, n_probes=8, seed=1, group=group)
    b = sk.hessian_diag(_model(dev), _ce, batches, n_probes=8, seed=1)
    out["hessian_diag"] = torch.equal(a.mean, b.mean) and torch.equal(a.m2, b.m2)
    sel_a = sk.select(a.mean, fraction=0.05, group=group, gather=True)
    sel = sk.select(b.mean, fraction=0.05)
    out["select"] = torch.equal(sel_a.indices, sel.indices)
    z, zt = _data(dev, 7), (_data(dev, 7)[0], (_data(dev, 7)[1] + 1) % 3)
    for strategy, kw in (("grad_abs", {"affected": z}), ("hessian", {"data": batches, "n_probes": 4})):
        sa = sk.select_parameters(_model(dev), strategy, 0.05, loss_fn=_ce, group=group, **kw)
        sb = sk.select_parameters(_model(dev), strategy, 0.05, loss_fn=_ce, **kw)
        out[f"select_parameters_{strategy}"] = torch.equal(sa.indices, sb.indices)
    for name, method in (("first_order", sk.FirstOrder(tau=0.01)), ("targeted", sk.Targeted(steps=3, lr=0.05))):
        m1, m2 = _model(dev), _model(dev)
        sk.unlearn(m1, _ce, z, zt, sel, method, group=group)
        sk.unlearn(m2, _ce, z, zt, sel, method)
        out[f"unlearn_{name}"] = torch.equal(_flat(m1), _flat(m2)) and not torch.equal(_flat(m1), _flat(_model(dev)))
    ddp = torch.nn.parallel.DistributedDataParallel(_model(dev), process_group=group)
    plain = _model(dev)
    for m in (ddp, plain):
        opt = sk.SparseSAM(m.module if m is ddp else m, sel, lr=0.1, rho=0.05)

        def closure(m=m):
            loss = _ce(m, zt)
            loss.backward()
            return loss
        opt.step(closure)
    out["sam_under_ddp"] = torch.equal(_flat(ddp.module), _flat(plain))
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(dev.type, (1,))
    fm = _model(dev)
    fully_shard(fm, mesh=mesh)
    plain = _model(dev)
    for m in (fm, plain):
        opt = sk.SparseAdamW(m, sel, lr=0.01)
        for _ in range(2):
            opt.zero_grad()
            _ce(m, zt).backward()
            opt.step()
    out["fsdp2_sparse_adamw"] = torch.equal(_flat(fm), _flat(plain))
    fm = _model(dev)
    fully_shard(fm, mesh=mesh)
    fe = sk.hessian_diag(fm, _ce, batches, "squared_grad")
    pe = sk.hessian_diag(_model(dev), _ce, batches, "squared_grad")
    out["fsdp2_squared_grad"] = torch.allclose(fe.mean, pe.mean, rtol=1e-5, atol=0)
    fs = sk.select(fe.mean, fraction=0.05, space=sk.ParamSpace(fm), group=group, gather=True)
    out["fsdp2_select"] = torch.equal(fs.indices, sk.select(fe.mean.clone(), fraction=0.05).indices)
    return out


def main():
    backend = sys.argv[1] if len(sys.argv) > 1 else "nccl"
    dev = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group(backend, init_method=f"file://{tmp}/rendezvous", rank=0, world_size=1,
                                **({"device_id": dev} if dev.type == "cuda" else {}))
        try:
            out = _checks(dev, dist.group.WORLD)
        finally:
            dist.destroy_process_group()
    out = {"backend": backend, "device": str(torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"),
           "torch": torch.__version__, **out}
    print(json.dumps(out))
    if len(sys.argv) > 2:
        with open(sys.argv[2], "w") as f:
            json.dump(out, f, indent=1)
    failed = [k for k, v in out.items() if v is False]
    if failed:
        print("FAILED:", failed)
        sys.exit(1)


if __name__ == "__main__":
    main()
