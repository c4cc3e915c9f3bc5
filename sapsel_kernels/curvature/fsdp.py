"""Gradient-only curvature estimates of an FSDP2 (``fully_shard``) model: ``hessian_diag`` on DTensor parameters.

FSDP2 keeps every parameter as row shards (DTensor, ``Shard(0)``); its backward reduce-scatters the gradient, so
each rank receives only its rows of the gradient averaged over the ranks. ``torch.autograd.grad`` with respect to
the sharded parameters does not work ("appears to not have been used in the graph") and double backward needs the
freed unsharded parameters, so HVP estimators cannot run; the gradient-only ones run on ``loss.backward()`` here:

* ``"squared_grad"``: mean over batches of g_b (.) g_b;
* ``"grad_abs"``: |mean over batches of g_b|;
* ``"gauss_newton"`` (Gauss-Newton-Bartlett, needs ``output_fn``): mean over label samples s and batches b of
  B_b g_b(y) (.) g_b(y), y ~ softmax(logits) drawn per rank's rows with the generator keyed by
  (seed, s, b * W + rank).

A BATCH here is a global batch, as in FSDP training: batch b is every rank's b-th batch together, and g_b is the
gradient of the mean loss over all of its points (each rank's loss is weighted by its share of the points before
the backward, so unequal shards are exact; this relies on FSDP2's default gradient division, the mean over the
ranks). Every rank must hold the same number of batches. The estimate is SHARDED like the parameters: ``mean`` and
``m2`` are this rank's local flat vector (its shards in ParamSpace order, :class:`distributed.ShardLayout`), and
``sk.select(est.mean, ..., space=est.space, group=...)`` selects over it without gathering anything.

Communication: FSDP2's own all-gathers and reduce-scatters of every backward, plus one all_reduce of one int64 per
backward (the global point or row count: per batch, and for gauss_newton per batch and label sample) and the
agreement collectives of ``hessian_diag``. Per-point Fisher
(``"fisher"``) is not available under FSDP2: the reduce-scatter sums the ranks' per-point gradients before they can
be squared. An exception on one rank inside the loop leaves the others waiting in FSDP2's next collective until the
process group's timeout; NaN gradients are agreed on after the loop, so every rank raises.
"""

import torch
import torch.distributed as dist

from ..data import batch_size
from ..errors import check_finite
from .estimators import Comm, Estimate, Welford

__all__ = ["FSDP_ESTIMATORS", "fsdp_estimate"]

FSDP_ESTIMATORS = ("squared_grad", "grad_abs", "gauss_newton")


def _global_count(n: int, comm: Comm) -> int:
    t = torch.tensor([int(n)], dtype=torch.int64, device=comm.device)
    dist.all_reduce(t, group=comm.group)
    return int(t)


def _local_grads(space) -> list:
    """Each parameter's local gradient shard (zeros when the parameter got no gradient), then ``.grad`` cleared."""
    out = []
    for p in space.params:
        g = p.grad
        out.append(torch.zeros_like(p.to_local()) if g is None else g.to_local().detach())
        p.grad = None
    return out


def _named(space, layout):
    """``where(j)`` for a position j of this rank's local flat vector: the parameter and the global flat index."""
    def where(j: int) -> str:
        g = int(layout.to_global(torch.tensor([j]))[0])
        return f"{space.describe_position(g)} (this rank's shard)"
    return where


def _check(tensors, what: str, where) -> None:
    """check_finite of per-parameter local shards, naming the global position."""
    flat = torch.cat([t.reshape(-1) for t in tensors]) if isinstance(tensors, list) else tensors
    check_finite(flat, what, suffix="is the loss finite at these parameters?", where=where)


def _backward(loss: torch.Tensor, n_mine: int, n_all: int, world: int) -> None:
    # FSDP2 divides the reduce-scatter by the world size: weighting this rank's mean loss by W n_r / n gives the
    # gradient of the mean over all n points of the global batch
    (loss * (world * n_mine / n_all)).backward()


def fsdp_estimate(model, loss, batches, space, layout, estimator: str, comm: Comm, *, n_probes: int, seed: int,
                  output_fn=None) -> Estimate:
    """The estimate of ``estimator`` (see the module doc) over this rank's shards: (mean, m2, count, info)."""
    from .probe_loop import seed_for

    starts = layout.local_starts
    n_local = layout.local_numel
    dev = space.device
    dt = torch.float64 if torch.float64 in space.dtypes else torch.float32
    where = _named(space, layout)
    # the caller's gradients, handed back untouched: of EVERY parameter of the model, since loss.backward() also
    # accumulates into trainable parameters outside ``space``
    everything = list({id(p): p for p in [*model.parameters(), *space.params]}.values())
    saved = [p.grad for p in everything]
    for p in everything:
        p.grad = None
    try:
        if estimator == "squared_grad":
            acc = Welford(n_local, dev)

            def local():
                bad = None  # a NaN is raised after the loop: every rank must run the same collectives
                for b in batches:
                    n_mine = batch_size(b)
                    n_all = _global_count(n_mine, comm)
                    with torch.enable_grad():
                        _backward(loss(model, b), n_mine, n_all, comm.world)
                    g = _local_grads(space)
                    try:
                        _check(g, "hessian_diag (FSDP2): a gradient shard", where)
                        acc.add_squares(g, starts)
                    except ValueError as e:
                        bad = bad or e
                    del g
                if bad is not None:
                    raise bad
                return None, (acc.count,)

            comm.run(local, "hessian_diag(estimator='squared_grad', FSDP2)")
            return Estimate(acc.mean, acc.m2, acc.count, {"batches": acc.count, "layout": "fsdp2"})
        if estimator == "grad_abs":
            total = torch.zeros(n_local, dtype=dt, device=dev)

            def local():
                nb = 0
                for b in batches:
                    n_mine = batch_size(b)
                    n_all = _global_count(n_mine, comm)
                    with torch.enable_grad():
                        _backward(loss(model, b), n_mine, n_all, comm.world)
                    for x, a in zip(_local_grads(space), starts):
                        total[a:a + x.numel()].add_(x.reshape(-1).to(dt))
                    nb += 1
                _check(total, "hessian_diag (FSDP2): the gradient sum", where)  # NaN/Inf propagate into the sum
                return None, (nb,)

            _, (nb,) = comm.run(local, "hessian_diag(estimator='grad_abs', FSDP2)")
            nb //= comm.world  # comm.run sums the counts over the ranks; every rank ran the same batches
            mean = total.div_(max(nb, 1)).abs_().to(torch.float32)
            return Estimate(mean, torch.zeros_like(mean), 1, {"batches": nb, "layout": "fsdp2"})
        # gauss_newton
        acc = Welford(n_local, dev)
        sample = torch.zeros(n_local, dtype=dt, device=dev)

        def local():
            nb, bad = 0, None
            for s in range(n_probes):
                sample.zero_()
                nb = 0
                for bi, b in enumerate(batches):
                    with torch.enable_grad():
                        logits = output_fn(model, b)
                        logits = logits.reshape(-1, logits.shape[-1])
                        rows = logits.shape[0]
                        rows_all = _global_count(rows, comm)
                        with torch.no_grad():
                            # NaN logits: sample from uniform probabilities so every rank keeps running the same
                            # collectives; the NaN reaches the gradient and the sample, and raises after the loop
                            probs = torch.softmax(logits.detach().to(torch.float64), dim=-1).nan_to_num(1.0)
                            gen = torch.Generator(device=probs.device).manual_seed(
                                seed_for(seed, s, bi * comm.world + comm.rank))
                            y = torch.multinomial(probs, 1, generator=gen).squeeze(1)
                        _backward(torch.nn.functional.cross_entropy(logits, y), rows, rows_all, comm.world)
                    g = _local_grads(space)
                    for x, a in zip(g, starts):
                        x = x.reshape(-1).to(dt)
                        sample[a:a + x.numel()].add_((x * x).mul_(rows_all))
                    del g
                    nb += 1
                if bad is None:
                    try:
                        _check(sample, "hessian_diag (FSDP2): a Gauss-Newton sample", where)
                        acc.add(sample / max(nb, 1))
                    except ValueError as e:
                        bad = e
            if bad is not None:
                raise bad
            return None, (nb,)

        _, (nb,) = comm.run(local, "hessian_diag(estimator='gauss_newton', FSDP2)")
        return Estimate(acc.mean, acc.m2, acc.count, {"batches": nb // comm.world, "layout": "fsdp2"})
    finally:
        for p, g in zip(everything, saved):
            p.grad = g
