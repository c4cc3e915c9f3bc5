"""Pure-PyTorch reference of the sparse ops: the CPU/CUDA fallback and the oracle for the C++ and Triton paths.

Conventions shared by every op here (and by csrc/sparse.cpp and kernels/sparse.py):

* ``idx`` tensors are int64, 1-D, contiguous, strictly ascending (sorted, no duplicates), and index the *flattened*
  tensor they go with (a parameter's ``view(-1)`` or a flat ParamSpace vector). Every op checks all of it on every
  call, every entry included, before its first write (C++: ``validate_indices`` in csrc/sparse.cpp; reference and
  Triton: the ``check_*_args`` functions below; fake kernels: the same functions with ``values=False``). A rejected
  call raises and leaves every tensor untouched.
* The optimizer ops take ``idx[i]`` together with ``offsets[i]``: entry j addresses element ``idx[i][j] - offsets[i]``
  of ``params[i].view(-1)``. So ``idx[i]`` can be a slice (a view, no copy) of a Selection's global flat indices, with
  ``offsets[i]`` the ParamSpace offset of parameter i; the optimizers keep no index copy of their own.
* Arithmetic is done in the accumulation dtype ``acc(dtype)``: float64 for float64 tensors, float32 otherwise
  (float32, bfloat16, float16). Optimizer state (momentum, Adam moments) lives in that dtype; the saved copy of the
  selected weights (for the exact SAM restore) lives in the parameter's own dtype, so restoring is bit-exact.
* The list ops take one entry per parameter tensor (``params[i]``, ``grads[i]``, ``idx[i]``, state ``[i]``); an
  empty state list means "not used" (no momentum, no saved weights). All tensors of one call live on one device, and
  the parameters of an in-place op do not overlap in memory.

Errors (the same type, and for index values the same message, on every backend):

* ``IndexError``: ``"<op>: idx[i][j] = v is out of range [lo, hi) (params[i] has n elements at offset off)"``
  (functional ops: ``"<op>: idx[j] = v is out of range [0, n) (flat has n elements)"``);
* ``ValueError``: ``"<op>: idx[i] must be strictly ascending (sorted, no duplicates): idx[i][j] = v follows
  idx[i][j-1] = u"``; and any metadata problem: a non-int64 / non-1-D / non-contiguous index tensor, list lengths,
  dtypes, shapes and devices of the parameters, gradients and state buffers, a negative offset, ``step < 1``,
  overlapping parameters. The first bad entry (list order, then position) is the one reported.

Cost of the checks on these paths: one host sync per call (all lists folded into one flag), ~3 bytes of temporaries
per index entry.
"""

from typing import List, Sequence

import torch

INT64_MAX = 2**63 - 1
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def sqnorm_out_dtype(grads: List[torch.Tensor]) -> torch.dtype:
    return torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32


# ------------------------------------------------------------------------------------------------------ validation
def _req(cond, msg, exc=ValueError) -> None:
    """Raise ``exc(msg())`` unless ``cond``. A SymBool (fake tensors with dynamic shapes) goes to
    ``torch._check_with`` (what ``torch._check_value`` does: a deferred runtime assert where it cannot be decided);
    plain bools are decided here, without the symbolic-shapes (sympy) import torch._check_with pays on first use."""
    if cond is True:
        return
    if cond is False:
        raise exc(msg())
    torch._check_with(exc, cond, msg)


def _check_idx_meta(op: str, name: str, ix: torch.Tensor, device: torch.device) -> None:
    _req(isinstance(ix, torch.Tensor), lambda: f"{op}: {name} must be a tensor, got {type(ix).__name__}")
    _req(ix.dtype == torch.int64 and ix.dim() == 1,
         lambda: f"{op}: {name} must be a 1-D int64 tensor, got {ix.dtype} of shape {tuple(ix.shape)}")
    _req(ix.is_contiguous(), lambda: f"{op}: {name} must be contiguous")
    _req(ix.device == device, lambda: f"{op}: {name} is on {ix.device}, the other tensors on {device}")


def check_indices(idx: Sequence[torch.Tensor], numels: Sequence[int], offsets: Sequence[int], op: str, *,
                  target: str = "params", single: bool = False) -> None:
    """Every entry of every list in range and strictly ascending: ``offsets[i] <= idx[i][j] < offsets[i] +
    numels[i]`` and ``idx[i][j] > idx[i][j - 1]``. Metadata (dtype, 1-D, device, offsets) must be checked first.

    Torch reductions on the indices' device, all lists folded into one flag: one host sync when everything is valid;
    the error path then finds the first bad entry. ``single``: one list of a functional op, named ``idx`` (its
    entries ``idx[j]``) and addressing ``target`` (``flat``). Raises IndexError / ValueError as described above.
    """
    flags = []
    for ix, n, off in zip(idx, numels, offsets):
        if ix.numel() == 0:
            continue
        bad = (ix < off) | (ix >= off + n)
        if ix.numel() > 1:
            bad[1:] |= ix[1:] <= ix[:-1]
        flags.append(bad.any())
    if not flags or not bool(torch.stack(flags).any()):  # the one host sync
        return
    for i, (ix, n, off) in enumerate(zip(idx, numels, offsets)):
        if ix.numel() == 0:
            continue
        rng = (ix < off) | (ix >= off + n)
        order = torch.zeros_like(rng)
        order[1:] = ix[1:] <= ix[:-1]
        hits = (rng | order).nonzero()
        if hits.numel() == 0:
            continue
        j = int(hits[0, 0])
        name = "idx" if single else f"idx[{i}]"
        v = int(ix[j])
        if bool(rng[j]):
            if single:
                raise IndexError(f"{op}: {name}[{j}] = {v} is out of range [0, {n}) ({target} has {n} elements)")
            raise IndexError(f"{op}: {name}[{j}] = {v} is out of range [{off}, {off + n}) ({target}[{i}] has {n} "
                             f"elements at offset {off})")
        raise ValueError(f"{op}: {name} must be strictly ascending (sorted, no duplicates): {name}[{j}] = {v} follows "
                         f"{name}[{j - 1}] = {int(ix[j - 1])}")
    raise RuntimeError(f"{op}: internal error, an index list was flagged but no bad entry was found")


def check_disjoint(op: str, tensors: Sequence[torch.Tensor], what: str = "params") -> None:
    """The tensors an op writes in place must not share memory (real tensors only: needs data pointers)."""
    spans = sorted((t.data_ptr(), i) for i, t in enumerate(tensors) if t.numel())
    for (a, i), (b, j) in zip(spans, spans[1:]):
        if b < a + tensors[i].numel() * tensors[i].element_size():
            raise ValueError(f"{op}: {what}[{i}] and {what}[{j}] overlap in memory (the same tensor twice in one "
                             f"call?)")


def check_list_args(op: str, params, grads, idx, offsets, *, mutates: bool, states=(), values: bool = True) -> None:
    """The input contract of the list ops, checked completely before anything is written.

    ``states``: ``(name, tensors, acc)`` for each state list the call uses; ``tensors[i]`` must be a contiguous 1-D
    buffer with ``idx[i].numel()`` entries of ``acc_dtype(params[i].dtype)`` (``acc``) or ``params[i].dtype``.
    ``values=False`` (fake kernels): metadata only. Entry values and memory overlap need real data, so fake tensors
    (meta, torch.compile tracing) cannot check them; the real kernel does at run time.
    """
    p = len(params)
    _req(len(grads) == p and len(idx) == p and len(offsets) == p,
         lambda: f"{op}: params, grads, idx and offsets must have one entry per parameter tensor (got {p}, "
                 f"{len(grads)}, {len(idx)}, {len(offsets)})")
    dev = params[0].device if p else None
    for i in range(p):
        w, g, ix, off = params[i], grads[i], idx[i], offsets[i]
        _req(w.device == dev and g.device == dev,
             lambda: f"{op}: every tensor must be on one device, got params[{i}] on {w.device} and grads[{i}] on "
                     f"{g.device} (params[0] on {dev})")
        _req(w.dtype in FLOAT_DTYPES, lambda: f"{op}: params[{i}] must be float32/float64/float16/bfloat16, got "
                                              f"{w.dtype}")
        _req(not mutates or w.is_contiguous(), lambda: f"{op}: params[{i}] must be contiguous")
        _req(g.is_contiguous(), lambda: f"{op}: grads[{i}] must be contiguous")
        _req(g.dtype == w.dtype, lambda: f"{op}: grads[{i}] must match params[{i}] in dtype and size, got {g.dtype} "
                                         f"and {w.dtype}")
        _req(g.numel() == w.numel(), lambda: f"{op}: grads[{i}] must match params[{i}] in dtype and size, got "
                                             f"{tuple(g.shape)} and {tuple(w.shape)}")
        _check_idx_meta(op, f"idx[{i}]", ix, dev)
        _req(0 <= off <= INT64_MAX - w.numel(), lambda: f"{op}: offsets[{i}] = {off} must be >= 0 and offset + numel "
                                                        f"({w.numel()}) must fit in int64")
    for name, ts, acc in states:
        _req(len(ts) == p, lambda: f"{op}: {name} must have one entry per parameter tensor (got {len(ts)} for {p})")
        for i in range(p):
            s, k = ts[i], idx[i].numel()
            want = acc_dtype(params[i].dtype) if acc else params[i].dtype
            _req(s.device == dev, lambda: f"{op}: {name}[{i}] is on {s.device}, params on {dev}")
            _req(s.is_contiguous() and s.dim() == 1 and s.numel() == k,
                 lambda: f"{op}: {name}[{i}] must be contiguous 1-D with {k} entries (one per selected index), got "
                         f"shape {tuple(s.shape)}")
            _req(s.dtype == want, lambda: f"{op}: {name}[{i}] must have dtype {want}, got {s.dtype}")
    if values:
        if mutates:
            check_disjoint(op, params)
        check_indices(idx, [w.numel() for w in params], offsets, op)


def check_flat_args(op: str, flat, idx, vals=None, *, values: bool = True) -> None:
    """The input contract of sparse_gather / sparse_scatter_add (flat 1-D floating [n], idx [k] in [0, n), vals [k]
    in flat's dtype); ``values=False``: metadata only (fake kernels)."""
    _req(flat.dim() == 1, lambda: f"{op}: flat must be 1-D, got shape {tuple(flat.shape)}")
    _req(flat.dtype in FLOAT_DTYPES, lambda: f"{op}: flat must be float32/float64/float16/bfloat16, got {flat.dtype}")
    _check_idx_meta(op, "idx", idx, flat.device)
    if vals is not None:
        ok = vals.dim() == 1 and vals.numel() == idx.numel() and vals.dtype == flat.dtype
        _req(ok and vals.device == flat.device,
             lambda: f"{op}: vals must match flat's dtype and have one entry per index (1-D), got {vals.dtype} of "
                     f"shape {tuple(vals.shape)} on {vals.device} for {idx.numel()} indices")
    if values:
        check_indices([idx], [flat.shape[0]], [0], op, target="flat", single=True)


def check_sqnorm_args(grads, params, idx, offsets, *, values: bool = True) -> None:
    check_list_args("sam_grad_sqnorm", params, grads, idx, offsets, mutates=False, values=values)


def check_perturb_args(params, grads, idx, offsets, saved, *, values: bool = True) -> None:
    check_list_args("sam_perturb", params, grads, idx, offsets, mutates=True, states=[("saved", saved, False)],
                    values=values)


def check_sgd_args(params, grads, idx, offsets, momentum_buffers, saved, momentum: float, *,
                   values: bool = True) -> None:
    states = [("momentum_buffers", momentum_buffers, True)] if momentum != 0 else []
    if len(saved):
        states.append(("saved", saved, False))
    check_list_args("sparse_sgd_step", params, grads, idx, offsets, mutates=True, states=states, values=values)


def check_adamw_args(params, grads, idx, offsets, exp_avg, exp_avg_sq, saved, step: int, *,
                     values: bool = True) -> None:
    _req(step >= 1, lambda: f"sparse_adamw_step: step must be >= 1, got {step}")
    states = [("exp_avg", exp_avg, True), ("exp_avg_sq", exp_avg_sq, True)]
    if len(saved):
        states.append(("saved", saved, False))
    check_list_args("sparse_adamw_step", params, grads, idx, offsets, mutates=True, states=states, values=values)


# ------------------------------------------------------------------------------------------- functional gather/scatter
def sparse_gather_ref(flat: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """out[j] = flat[idx[j]]; flat 1-D, idx int64 [k] -> [k] in flat's dtype."""
    check_flat_args("sparse_gather", flat, idx)
    return flat.index_select(0, idx)


def sparse_scatter_add_ref(flat: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """out = flat (copy); out[idx[j]] += vals[j]. flat 1-D [n], idx int64 [k], vals [k] in flat's dtype."""
    check_flat_args("sparse_scatter_add", flat, idx, vals)
    return flat.index_add(0, idx, vals)


# ------------------------------------------------------------------------------------------------------ SAM: norm
def _local(ix: torch.Tensor, off: int) -> torch.Tensor:
    return ix - off if off else ix


def sam_grad_sqnorm_ref(grads: List[torch.Tensor], params: List[torch.Tensor], idx: List[torch.Tensor],
                        offsets: List[int], eta: float, adaptive: bool, full: bool) -> torch.Tensor:
    """Per-tensor partial sums s_i = sum_j (t_j g_j)^2, t = |w| + eta when ``adaptive`` else 1.

    j runs over ``idx[i]`` (``full=False``) or over the whole tensor (``full=True``, SSAM's unmasked norm; idx is
    ignored then). Returns a [P] tensor, float64 if any grad is float64 else float32. A NaN/Inf gradient makes its
    partial non-finite, which the optimizers use as their fused finite check.
    """
    check_sqnorm_args(grads, params, idx, offsets)
    out_dtype = sqnorm_out_dtype(grads)
    out = torch.zeros(len(grads), dtype=out_dtype, device=grads[0].device if grads else "cpu")
    for i, (g, w, ix, off) in enumerate(zip(grads, params, idx, offsets)):
        a = acc_dtype(g.dtype)
        gf = g.reshape(-1)
        wf = w.reshape(-1)
        if not full:
            ix = _local(ix, off)
            gf = gf.index_select(0, ix)
            wf = wf.index_select(0, ix)
        gf = gf.to(a)
        if adaptive:
            gf = gf * (wf.to(a).abs() + eta)
        out[i] = (gf * gf).sum().to(out_dtype)
    return out


# --------------------------------------------------------------------------------------------------- SAM: perturb
def sam_perturb_ref(params: List[torch.Tensor], grads: List[torch.Tensor], idx: List[torch.Tensor],
                    offsets: List[int], saved: List[torch.Tensor], scale: float, eta: float, adaptive: bool) -> None:
    """saved[i] = w[idx]; w[idx] += e with e = scale * g (SAM) or scale * (|w| + eta)^2 * g (ASAM).

    ``scale`` = rho / (||g_S|| + eps) (times the AMP inverse scale), computed by the caller.
    """
    check_perturb_args(params, grads, idx, offsets, saved)
    for w, g, ix, off, s in zip(params, grads, idx, offsets, saved):
        ix = _local(ix, off)
        a = acc_dtype(w.dtype)
        wf = w.view(-1)
        old = wf.index_select(0, ix)
        s.copy_(old)
        wa = old.to(a)
        e = g.reshape(-1).index_select(0, ix).to(a) * scale
        if adaptive:
            t = wa.abs() + eta
            e = e * (t * t)
        wf.index_copy_(0, ix, (wa + e).to(w.dtype))


# ------------------------------------------------------------------------------------------------- base steps
def _start(w: torch.Tensor, ix: torch.Tensor, saved: List[torch.Tensor], i: int, a: torch.dtype) -> torch.Tensor:
    # the SAM step starts from the saved (unperturbed) weights: restore and update in one write
    return (saved[i] if len(saved) else w.view(-1).index_select(0, ix)).to(a)


def sparse_sgd_step_ref(params: List[torch.Tensor], grads: List[torch.Tensor], idx: List[torch.Tensor],
                        offsets: List[int], momentum_buffers: List[torch.Tensor], saved: List[torch.Tensor],
                        lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool, first: bool,
                        inv_scale: float) -> None:
    """torch.optim.SGD on the selected coordinates: d = g*inv_scale + wd*w; buf = d (first) or
    momentum*buf + (1-dampening)*d; d = d + momentum*buf (nesterov) or buf; w[idx] = w0 - lr*d, where w0 is
    ``saved[i]`` when given (SAM restore fused with the step) else the current w[idx]."""
    check_sgd_args(params, grads, idx, offsets, momentum_buffers, saved, momentum)
    for i, (w, g, ix, off) in enumerate(zip(params, grads, idx, offsets)):
        ix = _local(ix, off)
        a = acc_dtype(w.dtype)
        w0 = _start(w, ix, saved, i, a)
        d = g.reshape(-1).index_select(0, ix).to(a)
        if inv_scale != 1.0:
            d = d * inv_scale
        if weight_decay != 0:
            d = d + weight_decay * w0
        if momentum != 0:
            buf = momentum_buffers[i]
            if first:
                buf.copy_(d)
            else:
                buf.mul_(momentum).add_(d, alpha=1 - dampening)
            d = d + momentum * buf if nesterov else buf
        w.view(-1).index_copy_(0, ix, (w0 - lr * d).to(w.dtype))


def sparse_adamw_step_ref(params: List[torch.Tensor], grads: List[torch.Tensor], idx: List[torch.Tensor],
                          offsets: List[int], exp_avg: List[torch.Tensor], exp_avg_sq: List[torch.Tensor],
                          saved: List[torch.Tensor], lr: float, beta1: float, beta2: float, eps: float,
                          weight_decay: float, step: int, inv_scale: float) -> None:
    """torch.optim.AdamW (amsgrad=False) on the selected coordinates, ``step`` = the 1-based step count after this
    update: w *= 1 - lr*wd; m += (1-b1)(g-m); v = b2 v + (1-b2) g^2; w -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)."""
    check_adamw_args(params, grads, idx, offsets, exp_avg, exp_avg_sq, saved, step)
    bc1 = 1 - beta1 ** step
    bc2_sqrt = (1 - beta2 ** step) ** 0.5
    step_size = lr / bc1
    for i, (w, g, ix, off, m, v) in enumerate(zip(params, grads, idx, offsets, exp_avg, exp_avg_sq)):
        ix = _local(ix, off)
        a = acc_dtype(w.dtype)
        w0 = _start(w, ix, saved, i, a)
        d = g.reshape(-1).index_select(0, ix).to(a)
        if inv_scale != 1.0:
            d = d * inv_scale
        w0 = w0 * (1 - lr * weight_decay)
        m.lerp_(d, 1 - beta1)
        v.mul_(beta2).addcmul_(d, d, value=1 - beta2)
        denom = v.sqrt() / bc2_sqrt + eps
        w.view(-1).index_copy_(0, ix, (w0 - step_size * m / denom).to(w.dtype))
