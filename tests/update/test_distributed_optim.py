"""Sparse optimizers under DistributedDataParallel (gloo, CPU): each rank steps on its shard of the batch; DDP
all-reduces (averages) the gradients of both SAM passes, so every replica takes the same step as one process on the
whole batch. Equal shards make the DDP average equal the full-batch mean gradient up to float summation order."""

import torch
import torch.distributed as dist
import torch.nn.functional as F

import sapsel_kernels as sk
from tests.helpers.dist import run_world

STEPS = 3


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)


def _selection(model):
    space = sk.ParamSpace(model)
    scores = torch.linspace(0, 1, space.numel).flip(0) * torch.arange(space.numel).remainder(7)
    return sk.select(scores, fraction=0.2, space=space)


def _train(model, make_opt, batches, step_fn):
    opt = make_opt(model)
    for x, y in batches:
        step_fn(model, opt, x, y)
    return opt


def _sam_step(model, opt, x, y):
    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)


def _plain_step(model, opt, x, y):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


OPTIMIZERS = {
    "sam_sgd": (lambda m, sel: sk.SparseSAM(m.parameters(), sel, lr=0.1, rho=0.05, momentum=0.9), _sam_step),
    "sam_adamw": (lambda m, sel: sk.SparseSAM(m.parameters(), sel, base="adamw", lr=0.01, rho=0.05), _sam_step),
    "sgd": (lambda m, sel: sk.SparseSGD(m.parameters(), sel, lr=0.1, momentum=0.9), _plain_step),
    "adamw": (lambda m, sel: sk.SparseAdamW(m.parameters(), sel, lr=0.01), _plain_step),
}


def _single(name):
    model = _model()
    sel = _selection(model)
    make, step = OPTIMIZERS[name]
    x, y = _data()
    _train(model, lambda m: make(m, sel), [(x, y)] * STEPS, step)
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _ddp_worker(rank, world):
    out = {}
    x, y = _data()
    per = x.shape[0] // world
    xs, ys = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
    for name, (make, step) in OPTIMIZERS.items():
        model = _model()
        sel = _selection(model)
        theta0 = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        # the selection is built on the plain module; the DDP wrapper holds the very same parameter tensors
        _train(ddp, lambda m: make(m, sel), [(xs, ys)] * STEPS, step)
        theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        outside = torch.ones_like(theta, dtype=torch.bool)
        outside[sel.indices] = False
        gathered = [torch.empty_like(theta) for _ in range(world)]
        dist.all_gather(gathered, theta)
        out[name] = {"theta": theta, "replicas_equal": all(torch.equal(g, theta) for g in gathered),
                     "outside_unchanged": torch.equal(theta[outside], theta0[outside])}
    return out


def test_sparse_optimizers_under_ddp_equal_one_process():
    results = run_world(_ddp_worker, 2)
    for name in OPTIMIZERS:
        ref = _single(name)
        for rank, res in enumerate(results):
            r = res[name]
            assert r["replicas_equal"], f"{name}: replicas diverged"
            assert r["outside_unchanged"], f"{name}: rank {rank} moved a coordinate outside S"
            # float64, 3 steps: the only difference is the order of the gradient sum (DDP's all-reduce of two halves)
            torch.testing.assert_close(r["theta"], ref, rtol=1e-12, atol=1e-12, msg=f"{name} rank {rank}")
            assert not torch.equal(r["theta"], _model_flat()), f"{name}: nothing moved"


def _model_flat():
    return torch.cat([p.detach().reshape(-1) for p in _model().parameters()])
