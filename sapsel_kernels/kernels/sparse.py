"""Triton kernels of the sparse ops (see ``ops/sparse.py`` for the contracts, ``reference/sparse.py`` for the
formulas). Every optimizer kernel works on one parameter tensor (flattened) and its ascending indices, entry j
addressing element ``idx[j] - off`` (idx may be a view of a Selection's global indices); the launchers loop over the
tensors of a call (one launch per tensor: O(number of tensors) host work, never O(k)).

Shared layout: one program owns BLOCK consecutive entries j of the index list (grid = cdiv(k, BLOCK)); offsets are
int64 (``program_id(0).to(tl.int64)``), so tensors past 2^31 elements are addressed correctly; ``j < k`` masks the
tail. Arithmetic in ACC (float32, float64 for float64 tensors); stores cast back to the tensor's dtype.

The kernels trust their indices (no bounds masks: a mask would hide a bad index instead of reporting it); every
launcher first runs the shared validator of ``reference/sparse.py`` (``check_*_args``: metadata, every index in range
and strictly ascending, one host sync), so nothing is launched for a bad call.
"""

import torch
import triton
import triton.language as tl

from ..reference.sparse import (
    acc_dtype,
    check_adamw_args,
    check_flat_args,
    check_perturb_args,
    check_sgd_args,
    check_sqnorm_args,
    sqnorm_out_dtype,
)

BLOCK = 1024


def _tl_acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


# ---------------------------------------------------------------------------------------------- gather / scatter
@triton.jit
def _sparse_gather_kernel(flat_ptr, idx_ptr, out_ptr, k, BLOCK: tl.constexpr):
    # One program: BLOCK output entries; out[j] = flat[idx[j]]. No arithmetic.
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = j < k
    ix = tl.load(idx_ptr + j, mask=m, other=0)
    tl.store(out_ptr + j, tl.load(flat_ptr + ix, mask=m), mask=m)


@triton.jit
def _sparse_scatter_add_kernel(out_ptr, idx_ptr, vals_ptr, k, ACC: tl.constexpr, BLOCK: tl.constexpr):
    # One program: BLOCK index entries; out[idx[j]] += vals[j] (out is a copy of flat). Indices are unique, so
    # programs never write the same element (no atomics). Sum in float32 (float64 for float64), one rounding.
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = j < k
    ix = tl.load(idx_ptr + j, mask=m, other=0)
    o = tl.load(out_ptr + ix, mask=m, other=0)
    v = tl.load(vals_ptr + j, mask=m, other=0)
    tl.store(out_ptr + ix, (o.to(ACC) + v.to(ACC)).to(out_ptr.dtype.element_ty), mask=m)


def sparse_gather(flat: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    check_flat_args("sparse_gather", flat, idx)
    out = torch.empty(idx.shape, dtype=flat.dtype, device=flat.device)
    k = idx.numel()
    if k:
        _sparse_gather_kernel[(triton.cdiv(k, BLOCK),)](flat.contiguous(), idx, out, k, BLOCK=BLOCK)
    return out


def sparse_scatter_add(flat: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    check_flat_args("sparse_scatter_add", flat, idx, vals)
    out = flat.clone(memory_format=torch.contiguous_format)
    k = idx.numel()
    if k:
        _sparse_scatter_add_kernel[(triton.cdiv(k, BLOCK),)](out, idx, vals.contiguous(), k,
                                                                 ACC=_tl_acc(flat.dtype), BLOCK=BLOCK)
    return out


# ---------------------------------------------------------------------------------------------- SAM norm
@triton.jit
def _sam_grad_sqnorm_kernel(g_ptr, w_ptr, idx_ptr, off, part_ptr, n, eta, ADAPTIVE: tl.constexpr, FULL: tl.constexpr,
                            ACC: tl.constexpr, BLOCK: tl.constexpr):
    # One program: BLOCK entries (of idx, or of the whole tensor when FULL); writes its partial sum of (t*g)^2 to
    # part[pid] (deterministic: the host sums the partials; no atomics). Masked lanes contribute 0.
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = j < n
    if FULL:
        pos = j
    else:
        pos = tl.load(idx_ptr + j, mask=m, other=off) - off
    g = tl.load(g_ptr + pos, mask=m, other=0).to(ACC)
    if ADAPTIVE:
        w = tl.load(w_ptr + pos, mask=m, other=0).to(ACC)
        g = g * (tl.abs(w) + eta)
    tl.store(part_ptr + tl.program_id(0), tl.sum(g * g, axis=0))


def sam_grad_sqnorm(grads, params, idx, offsets, eta: float, adaptive: bool, full: bool) -> torch.Tensor:
    check_sqnorm_args(grads, params, idx, offsets)
    out_dtype = sqnorm_out_dtype(grads)
    dev = grads[0].device if grads else torch.device("cpu")
    out = torch.zeros(len(grads), dtype=out_dtype, device=dev)
    for i, (g, w, ix, off) in enumerate(zip(grads, params, idx, offsets)):
        n = g.numel() if full else ix.numel()
        if n == 0:
            continue
        a = acc_dtype(g.dtype)
        nb = triton.cdiv(n, BLOCK)
        part = torch.empty(nb, dtype=a, device=dev)
        _sam_grad_sqnorm_kernel[(nb,)](g, w.contiguous(), ix if ix.numel() else g, off, part, n, eta,
                                       ADAPTIVE=adaptive, FULL=full, ACC=_tl_acc(g.dtype), BLOCK=BLOCK)
        out[i] = part.sum().to(out_dtype)
    return out


# ---------------------------------------------------------------------------------------------- SAM perturb
@triton.jit
def _sam_perturb_kernel(w_ptr, g_ptr, idx_ptr, off, saved_ptr, k, scale, eta, ADAPTIVE: tl.constexpr, ACC: tl.constexpr,
                        BLOCK: tl.constexpr):
    # One program: BLOCK selected entries; saved[j] = w[idx[j]] (bit copy), w[idx[j]] += scale * (t^2) * g.
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = j < k
    ix = tl.load(idx_ptr + j, mask=m, other=off) - off
    w = tl.load(w_ptr + ix, mask=m, other=0)
    tl.store(saved_ptr + j, w, mask=m)
    wa = w.to(ACC)
    e = tl.load(g_ptr + ix, mask=m, other=0).to(ACC) * scale
    if ADAPTIVE:
        t = tl.abs(wa) + eta
        e = e * (t * t)
    tl.store(w_ptr + ix, (wa + e).to(w_ptr.dtype.element_ty), mask=m)


def sam_perturb(params, grads, idx, offsets, saved, scale: float, eta: float, adaptive: bool) -> None:
    check_perturb_args(params, grads, idx, offsets, saved)
    for w, g, ix, off, s in zip(params, grads, idx, offsets, saved):
        k = ix.numel()
        if k:
            _sam_perturb_kernel[(triton.cdiv(k, BLOCK),)](w, g, ix, off, s, k, scale, eta,
                                                          ADAPTIVE=adaptive, ACC=_tl_acc(w.dtype), BLOCK=BLOCK)


# ---------------------------------------------------------------------------------------------- SGD step
@triton.jit
def _sparse_sgd_step_kernel(w_ptr, g_ptr, idx_ptr, off, buf_ptr, saved_ptr, k, lr, momentum, dampening, weight_decay,
                            inv_scale, HAS_MOM: tl.constexpr, FIRST: tl.constexpr, NESTEROV: tl.constexpr,
                            HAS_SAVED: tl.constexpr, HAS_WD: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    # One program: BLOCK selected entries; torch.optim.SGD's update on them, starting from saved[j] (SAM: restore
    # fused with the step) or w[idx[j]]; momentum buffer entry j updated in place (ACC dtype).
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = j < k
    ix = tl.load(idx_ptr + j, mask=m, other=off) - off
    if HAS_SAVED:
        w0 = tl.load(saved_ptr + j, mask=m, other=0).to(ACC)
    else:
        w0 = tl.load(w_ptr + ix, mask=m, other=0).to(ACC)
    d = tl.load(g_ptr + ix, mask=m, other=0).to(ACC) * inv_scale
    if HAS_WD:
        d = d + weight_decay * w0
    if HAS_MOM:
        if FIRST:
            buf = d
        else:
            buf = tl.load(buf_ptr + j, mask=m, other=0) * momentum + (1.0 - dampening) * d
        tl.store(buf_ptr + j, buf, mask=m)
        if NESTEROV:
            d = d + momentum * buf
        else:
            d = buf
    tl.store(w_ptr + ix, (w0 - lr * d).to(w_ptr.dtype.element_ty), mask=m)


def sparse_sgd_step(params, grads, idx, offsets, momentum_buffers, saved, lr: float, momentum: float, dampening: float,
                    weight_decay: float, nesterov: bool, first: bool, inv_scale: float) -> None:
    check_sgd_args(params, grads, idx, offsets, momentum_buffers, saved, momentum)
    has_mom = momentum != 0
    for i, (w, g, ix, off) in enumerate(zip(params, grads, idx, offsets)):
        k = ix.numel()
        if not k:
            continue
        buf = momentum_buffers[i] if has_mom else w
        sv = saved[i] if len(saved) else w
        _sparse_sgd_step_kernel[(triton.cdiv(k, BLOCK),)](
            w, g, ix, off, buf, sv, k, lr, momentum, dampening, weight_decay, inv_scale, HAS_MOM=has_mom,
            FIRST=first, NESTEROV=nesterov, HAS_SAVED=len(saved) > 0, HAS_WD=weight_decay != 0,
            ACC=_tl_acc(w.dtype), BLOCK=BLOCK)


# ---------------------------------------------------------------------------------------------- AdamW step
@triton.jit
def _sparse_adamw_step_kernel(w_ptr, g_ptr, idx_ptr, off, m_ptr, v_ptr, saved_ptr, k, decay, beta1, beta2, eps,
                              step_size, bc2_sqrt, inv_scale, HAS_SAVED: tl.constexpr, ACC: tl.constexpr,
                              BLOCK: tl.constexpr):
    # One program: BLOCK selected entries; torch.optim.AdamW's update (decoupled decay = w*(1 - lr*wd), bias
    # corrections folded into step_size and bc2_sqrt on the host); moments updated in place (ACC dtype).
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    msk = j < k
    ix = tl.load(idx_ptr + j, mask=msk, other=off) - off
    if HAS_SAVED:
        w0 = tl.load(saved_ptr + j, mask=msk, other=0).to(ACC)
    else:
        w0 = tl.load(w_ptr + ix, mask=msk, other=0).to(ACC)
    d = tl.load(g_ptr + ix, mask=msk, other=0).to(ACC) * inv_scale
    w0 = w0 * decay
    m = tl.load(m_ptr + j, mask=msk, other=0)
    v = tl.load(v_ptr + j, mask=msk, other=0)
    m = m + (1.0 - beta1) * (d - m)
    v = v * beta2 + (1.0 - beta2) * d * d
    tl.store(m_ptr + j, m, mask=msk)
    tl.store(v_ptr + j, v, mask=msk)
    denom = tl.sqrt(v) / bc2_sqrt + eps
    tl.store(w_ptr + ix, (w0 - step_size * m / denom).to(w_ptr.dtype.element_ty), mask=msk)


def sparse_adamw_step(params, grads, idx, offsets, exp_avg, exp_avg_sq, saved, lr: float, beta1: float, beta2: float,
                      eps: float, weight_decay: float, step: int, inv_scale: float) -> None:
    check_adamw_args(params, grads, idx, offsets, exp_avg, exp_avg_sq, saved, step)
    step_size = lr / (1 - beta1 ** step)
    bc2_sqrt = (1 - beta2 ** step) ** 0.5
    decay = 1 - lr * weight_decay
    for i, (w, g, ix, off) in enumerate(zip(params, grads, idx, offsets)):
        k = ix.numel()
        if not k:
            continue
        sv = saved[i] if len(saved) else w
        _sparse_adamw_step_kernel[(triton.cdiv(k, BLOCK),)](
            w, g, ix, off, exp_avg[i], exp_avg_sq[i], sv, k, decay, beta1, beta2, eps, step_size, bc2_sqrt,
            inv_scale, HAS_SAVED=len(saved) > 0, ACC=_tl_acc(w.dtype), BLOCK=BLOCK)
