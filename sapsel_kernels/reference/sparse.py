"""Pure-PyTorch reference of the sparse ops: the CPU/CUDA fallback and the oracle for the C++ and Triton paths.

Conventions shared by every op here (and by csrc/sparse.cpp and kernels/sparse.py):

* ``idx`` tensors are int64, 1-D, ascending and unique, and index the *flattened* tensor they go with
  (a parameter's ``view(-1)`` or a flat ParamSpace vector). Callers validate; the ops do not re-check per element.
* The optimizer ops take ``idx[i]`` together with ``offsets[i]``: entry j addresses element ``idx[i][j] - offsets[i]``
  of ``params[i].view(-1)``. So ``idx[i]`` can be a slice (a view, no copy) of a Selection's global flat indices, with
  ``offsets[i]`` the ParamSpace offset of parameter i; the optimizers keep no index copy of their own.
* Arithmetic is done in the accumulation dtype ``acc(dtype)``: float64 for float64 tensors, float32 otherwise
  (float32, bfloat16, float16). Optimizer state (momentum, Adam moments) lives in that dtype; the saved copy of the
  selected weights (for the exact SAM restore) lives in the parameter's own dtype, so restoring is bit-exact.
* The list ops take one entry per parameter tensor (``params[i]``, ``grads[i]``, ``idx[i]``, state ``[i]``); an
  empty state list means "not used" (no momentum, no saved weights).
"""

from typing import List

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def sqnorm_out_dtype(grads: List[torch.Tensor]) -> torch.dtype:
    return torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32


# ------------------------------------------------------------------------------------------- functional gather/scatter
def sparse_gather_ref(flat: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """out[j] = flat[idx[j]]; flat 1-D, idx int64 [k] -> [k] in flat's dtype."""
    return flat.index_select(0, idx)


def sparse_scatter_add_ref(flat: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """out = flat (copy); out[idx[j]] += vals[j]. flat 1-D [n], idx int64 [k], vals [k] in flat's dtype."""
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
