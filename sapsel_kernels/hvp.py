"""Hessian-vector products of ``loss_fn(model, batch)`` with respect to a ParamSpace, several probes per call.

Two modes, both returning, for tangents V (one [m, *shape] tensor per parameter, row j = probe j), the products
H V in the same layout:

* ``"fwd_rev"`` (forward-over-reverse): ``torch.func.jvp`` of ``torch.func.grad`` of a ``functional_call`` of the
  model, ``vmap``-ed over the m probes. One forward + one backward pass carrying dual numbers.
* ``"rev_rev"`` (reverse-over-reverse): ``g = torch.autograd.grad(loss, params, create_graph=True)`` and then
  ``torch.autograd.grad(g, params, grad_outputs=V, is_grads_batched=True)`` (a loop over the probes with
  ``vectorize=False`` or when an op has no batching rule for its double backward). ``backward(create_graph=True)``
  is never used: it leaves a reference cycle between the parameters and their ``.grad`` graphs.

The caller is responsible for the model's mode (eval) and the attention backend (math); see ``hessian.py``.
"""

import logging
from collections.abc import Sequence

import torch

log = logging.getLogger("sapsel_kernels.hvp")

MODES = ("fwd_rev", "rev_rev")


class _LossModule(torch.nn.Module):
    """``forward(batch) = loss_fn(model, batch)``, so that ``functional_call`` can swap the model's parameters
    (keys ``"model.<name>"``) while ``loss_fn`` keeps calling the model as usual."""

    def __init__(self, model: torch.nn.Module, loss_fn):
        super().__init__()
        self.model = model
        object.__setattr__(self, "_loss_fn", loss_fn)  # not registered even if it is a Module

    def forward(self, batch):
        return self._loss_fn(self.model, batch)


def _zeros_like_batched(p: torch.Tensor, m: int) -> torch.Tensor:
    return torch.zeros((m, *p.shape), dtype=p.dtype, device=p.device)


class HVP:
    """H V for the Hessian of ``loss_fn(model, batch)`` w.r.t. ``space.params`` (one batch per call).

    ``__call__(tangents, batch)``: tangents is a list (ParamSpace order) of [m, *shape] tensors in each parameter's
    dtype; returns a list of [m, *shape] tensors, in the parameters' dtype. ``vectorize``: the m probes go through
    one vmapped HVP (True) or one HVP each (False).
    """

    def __init__(self, model: torch.nn.Module, loss_fn, space, mode: str = "fwd_rev", vectorize: bool = True,
                 reuse_graph: bool = False):
        if mode not in MODES:
            raise ValueError(f"HVP mode must be one of {MODES}, got {mode!r}")
        self.model, self.loss_fn, self.space, self.mode = model, loss_fn, space, mode
        self.vectorize = vectorize
        # rev_rev with a single batch: keep the create_graph gradient graph across calls, so each call costs one
        # (batched) double backward instead of forward + backward + double backward. Freed with this object.
        self.reuse_graph = reuse_graph
        self._graph = None
        self._wrapper = _LossModule(model, loss_fn)
        self._keys = ["model." + n for n in space.names]

    # ---------------------------------------------------------------------------------------------- fwd over rev
    def _fwd_rev(self, tangents: Sequence[torch.Tensor], batch) -> list[torch.Tensor]:
        primals = tuple(p.detach() for p in self.space.params)
        keys, wrapper = self._keys, self._wrapper

        def loss_of(ps):
            return torch.func.functional_call(wrapper, dict(zip(keys, ps)), (batch,), strict=False)

        grad_f = torch.func.grad(loss_of)

        def hvp_one(ts):
            return torch.func.jvp(grad_f, (primals,), (ts,))[1]

        m = tangents[0].shape[0]
        if m == 1 or not self.vectorize:
            rows = [hvp_one(tuple(t[j] for t in tangents)) for j in range(m)]
            return [torch.stack([r[k] for r in rows]) for k in range(len(primals))]
        return list(torch.func.vmap(hvp_one)(tuple(tangents)))

    # ---------------------------------------------------------------------------------------------- rev over rev
    def _rev_rev(self, tangents: Sequence[torch.Tensor], batch) -> list[torch.Tensor]:
        params = self.space.params
        m = tangents[0].shape[0]
        if self._graph is not None and self._graph[0] is batch:
            grads, live = self._graph[1], self._graph[2]
        else:
            with torch.enable_grad():
                loss = self.loss_fn(self.model, batch)
                grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            # A gradient that does not depend on the parameters (None, or outside the graph) contributes H_i. = 0.
            live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
            if self.reuse_graph:
                self._graph = (batch, grads, live)
        keep = self.reuse_graph
        if not live:
            return [_zeros_like_batched(p, m) for p in params]
        outs = [grads[i] for i in live]
        res = None
        if m > 1 and self.vectorize:
            try:
                res = torch.autograd.grad(outs, params, grad_outputs=[tangents[i] for i in live],
                                          is_grads_batched=True, allow_unused=True, retain_graph=True)
            except RuntimeError as exc:  # an op without a batching rule for its double backward
                log.warning("batched reverse-over-reverse HVP failed (%s); looping over the %d probes instead",
                            str(exc).splitlines()[0], m)
                self.vectorize = False
        if res is None:
            rows = []
            for j in range(m):
                rows.append(torch.autograd.grad(outs, params, grad_outputs=[tangents[i][j] for i in live],
                                                allow_unused=True, retain_graph=keep or j < m - 1))
            res = [None if rows[0][k] is None else torch.stack([r[k] for r in rows]) for k in range(len(params))]
        return [_zeros_like_batched(p, m) if h is None else h.detach() for h, p in zip(res, params)]

    def __call__(self, tangents: Sequence[torch.Tensor], batch) -> list[torch.Tensor]:
        if self.mode == "fwd_rev":
            return self._fwd_rev(tangents, batch)
        return self._rev_rev(tangents, batch)


def gradient(model, loss_fn, space, batch) -> list[torch.Tensor]:
    """Plain gradient of loss_fn(model, batch) w.r.t. space.params (zeros for unused parameters), detached."""
    with torch.enable_grad():
        loss = loss_fn(model, batch)
        gs = torch.autograd.grad(loss, space.params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(gs, space.params)]
