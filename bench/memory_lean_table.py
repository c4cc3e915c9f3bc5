"""Peak extra memory of every ``hessian_diag`` estimator with ``ProbeConfig(variance=False)``, beside the default and
the loop users write (the loops and the measure of ``tests/curvature/test_memory_contracts.py``: the torch profiler's
allocation timeline, tensor memory only), in units of N float32 on its 1.6M-parameter MLP.

    python -m bench.memory_lean_table    (from the repository root)
"""


import torch

import sapsel_kernels as sk
from sapsel_kernels import estimators
from tests.curvature import test_memory_contracts as t
from tests.helpers.hessian_models import loop_hutchinson


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Tanh(), torch.nn.Linear(1024, 1024),
                                torch.nn.Tanh(), torch.nn.Linear(1024, 10))
    x, y = torch.randn(8, 512), torch.randint(0, 10, (8,))
    batches = [(x, y), (x, y.flip(0))]
    n4 = 4 * sk.ParamSpace(model).numel
    estimators._FOLD_CHUNK = 1 << 14
    estimators._FISHER_CHUNK_BYTES = 1  # one point per vmap call: the size fisher takes from ~22M parameters on
    lean = sk.ProbeConfig(variance=False)
    gn = dict(estimator="gauss_newton", n_probes=3, progress=False, output_fn=lambda m, b: m(b[0]))
    rows = [("grad_abs", dict(estimator="grad_abs"), batches, lambda: t._loop_sum_of_gradients(model, batches)),
            ("squared_grad", dict(estimator="squared_grad"), batches,
             lambda: t._loop_squared_gradients(model, batches)),
            ("fisher", dict(estimator="fisher"), batches, lambda: t._loop_fisher(model, batches)),
            ("gauss_newton, one batch", gn, batches[:1], lambda: t._loop_gauss_newton(model, batches[0], 3)),
            ("gauss_newton, two batches", gn, batches, None),
            ("hutchinson (4 probes, one batch)", dict(n_probes=4), batches[:1],
             lambda: loop_hutchinson(model, t.ce, batches[0], 4))]
    print("| estimator | default | variance=False | the loop users write |\n|---|---|---|---|")
    for name, kw, data, loop in rows:
        kw = {"progress": False, **kw}
        full = t.peak_bytes(lambda: sk.hessian_diag(model, t.ce, data, **kw))
        ours = t.peak_bytes(lambda: sk.hessian_diag(model, t.ce, data, probes=lean, **kw))
        theirs = f"{t.peak_bytes(loop) / n4:.2f} N" if loop is not None else "n/a"
        print(f"| {name} | {full / n4:.2f} N | {ours / n4:.2f} N | {theirs} |")


if __name__ == "__main__":
    main()
