"""Estimate error vs number of probes on a tiny float64 MLP with a known Hessian (README table).

    python bench/hessian_error_vs_probes.py

For m probes: relative error ||mean - diag(H)|| / ||diag(H)||, the predicted error from the exact variance
(sqrt(sum_i sum_{j!=i} H_ij^2 / m) / ||diag(H)||), the reported one (||stderr|| / ||diag(H)||), and the overlap of
the top-10% set with the exact top-10% set.
"""

import torch
import torch.nn.functional as F
from torch import nn

import sapsel_kernels as sk


def main():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    g = torch.Generator().manual_seed(1)
    data = (torch.randn(64, 8, generator=g, dtype=torch.float64), torch.randint(0, 4, (64,), generator=g))

    def ce(m, b):
        return F.cross_entropy(m(b[0]), b[1])

    flat0 = sk.ParamSpace(model).gather(dtype=torch.float64)
    H = torch.func.hessian(lambda flat: ce(lambda x: _call(model, flat, x), data))(flat0)
    d = torch.diagonal(H)
    var1 = (H ** 2).sum(1) - d ** 2
    k = max(1, d.numel() // 10)
    top = set(torch.topk(d, k).indices.tolist())
    print(f"N = {d.numel()} parameters, top-10% = {k}")
    print("| probes m | rel. error | predicted sqrt(sum var/m) | reported (stderr) | top-10% overlap |")
    print("|---|---|---|---|---|")
    for m in (1, 4, 16, 64, 256, 1024):
        est = sk.hessian_diag(model, ce, data, n_probes=m, seed=0, progress=False)
        err = float((est.mean.double() - d).norm() / d.norm())
        pred = float((var1.sum() / m).sqrt() / d.norm())
        rep = float(est.stderr.double().norm() / d.norm()) if m > 1 else float("nan")
        ov = len(top & set(torch.topk(est.mean, k).indices.tolist())) / k
        print(f"| {m} | {err:.3f} | {pred:.3f} | {rep:.3f} | {ov:.2f} |")


def _call(model, flat, x):
    space = sk.ParamSpace(model)
    ps = {n: flat[o:o + c].view(s) for n, o, c, s in zip(space.names, space.offsets, space.numels, space.shapes)}
    return torch.func.functional_call(model, ps, (x,))


if __name__ == "__main__":
    main()
