"""Sparse ops on the selected coordinates: functional gather / scatter-add (with autograd) and the fused masked-SAM
and sparse-optimizer kernels.

Functional (differentiable, out of place):

* ``sparse_gather(Tensor flat, Tensor idx) -> Tensor``: ``flat[idx]``; backward scatters the cotangent.
* ``sparse_scatter_add(Tensor flat, Tensor idx, Tensor vals) -> Tensor``: ``flat`` with ``vals`` added at ``idx``;
  differentiable w.r.t. ``flat`` (identity) and ``vals`` (gather of the cotangent).

Optimizer kernels (in place on the parameters and state; one list entry per parameter tensor; see
``reference/sparse.py`` for the exact formulas):

* ``sam_grad_sqnorm(Tensor[] grads, Tensor[] params, Tensor[] idx, int[] offsets, float eta, bool adaptive,
  bool full) -> Tensor``
* ``sam_perturb(Tensor(a!)[] params, Tensor[] grads, Tensor[] idx, int[] offsets, Tensor(b!)[] saved, float scale,
  float eta, bool adaptive) -> ()``
* ``sparse_sgd_step(Tensor(a!)[] params, Tensor[] grads, Tensor[] idx, int[] offsets,
  Tensor(b!)[] momentum_buffers, Tensor[] saved, float lr, float momentum, float dampening, float weight_decay,
  bool nesterov, bool first, float inv_scale) -> ()``
* ``sparse_adamw_step(Tensor(a!)[] params, Tensor[] grads, Tensor[] idx, int[] offsets, Tensor(b!)[] exp_avg,
  Tensor(c!)[] exp_avg_sq, Tensor[] saved, float lr, float beta1, float beta2, float eps, float weight_decay,
  int step, float inv_scale) -> ()``

``idx[i] - offsets[i]`` addresses ``params[i].view(-1)`` (idx[i] may be a view of a Selection's global flat
indices, offsets[i] the parameter's ParamSpace offset: no index copies). Index tensors are int64, ascending and
unique (the callers - ``sapsel_kernels.sparse`` and ``sapsel_kernels.optim`` - validate them once); every tensor of
one call lives on one device.
"""

import torch

from ..reference import sparse as ref
from ._lib import LIB, define_op


def _check_flat_idx(flat, idx, vals=None):
    if flat.dim() != 1:
        raise ValueError(f"sparse ops: flat must be 1-D, got shape {tuple(flat.shape)}")
    if idx.dtype != torch.int64 or idx.dim() != 1:
        raise ValueError(f"sparse ops: idx must be a 1-D int64 tensor, got {idx.dtype} of shape {tuple(idx.shape)}")
    if idx.device != flat.device:
        raise ValueError(f"sparse ops: idx is on {idx.device}, flat on {flat.device}")
    if vals is not None:
        if vals.shape != idx.shape:
            raise ValueError(f"sparse ops: vals must have shape {tuple(idx.shape)}, got {tuple(vals.shape)}")
        if vals.dtype != flat.dtype or vals.device != flat.device:
            raise ValueError(f"sparse ops: vals ({vals.dtype}, {vals.device}) must match flat ({flat.dtype}, "
                             f"{flat.device})")


# ------------------------------------------------------------------------------------------------ functional ops
def _gather_fake(flat, idx):
    _check_flat_idx(flat, idx)
    return flat.new_empty(idx.shape)


def _scatter_fake(flat, idx, vals):
    _check_flat_idx(flat, idx, vals)
    return torch.empty_like(flat)


sparse_gather = define_op("sparse_gather", "(Tensor flat, Tensor idx) -> Tensor", reference=ref.sparse_gather_ref,
                          fake=_gather_fake, cpp="sparse_gather_cpu", triton="sparse:sparse_gather")
sparse_scatter_add = define_op("sparse_scatter_add", "(Tensor flat, Tensor idx, Tensor vals) -> Tensor",
                               reference=ref.sparse_scatter_add_ref, fake=_scatter_fake, cpp="sparse_scatter_add_cpu",
                               triton="sparse:sparse_scatter_add")


def _gather_setup(ctx, inputs, output):
    flat, idx = inputs
    ctx.save_for_backward(idx)
    ctx.n = flat.shape[0]


def _gather_backward(ctx, grad):
    (idx,) = ctx.saved_tensors
    zeros = grad.new_zeros(ctx.n)
    return torch.ops.sapsel.sparse_scatter_add(zeros, idx, grad.contiguous()), None


def _scatter_setup(ctx, inputs, output):
    _, idx, _ = inputs
    ctx.save_for_backward(idx)


def _scatter_backward(ctx, grad):
    (idx,) = ctx.saved_tensors
    return grad, None, torch.ops.sapsel.sparse_gather(grad.contiguous(), idx)


torch.library.register_autograd("sapsel::sparse_gather", _gather_backward, setup_context=_gather_setup, lib=LIB)
torch.library.register_autograd("sapsel::sparse_scatter_add", _scatter_backward, setup_context=_scatter_setup,
                                lib=LIB)


# ------------------------------------------------------------------------------------------------ optimizer kernels
def _sqnorm_fake(grads, params, idx, offsets, eta, adaptive, full):
    if not (len(grads) == len(params) == len(idx) == len(offsets)):
        raise ValueError("sam_grad_sqnorm: grads, params, idx and offsets must have one entry per parameter tensor")
    dev = grads[0].device if grads else torch.device("cpu")
    return torch.empty(len(grads), dtype=ref.sqnorm_out_dtype(grads), device=dev)


def _none_fake(*args):
    return None


sam_grad_sqnorm = define_op(
    "sam_grad_sqnorm",
    "(Tensor[] grads, Tensor[] params, Tensor[] idx, int[] offsets, float eta, bool adaptive, bool full) -> Tensor",
    reference=ref.sam_grad_sqnorm_ref, fake=_sqnorm_fake, cpp="sam_grad_sqnorm_cpu", triton="sparse:sam_grad_sqnorm")

sam_perturb = define_op(
    "sam_perturb",
    "(Tensor(a!)[] params, Tensor[] grads, Tensor[] idx, int[] offsets, Tensor(b!)[] saved, float scale, float eta, "
    "bool adaptive) -> ()",
    reference=ref.sam_perturb_ref, fake=_none_fake, cpp="sam_perturb_cpu", triton="sparse:sam_perturb")

sparse_sgd_step = define_op(
    "sparse_sgd_step",
    "(Tensor(a!)[] params, Tensor[] grads, Tensor[] idx, int[] offsets, Tensor(b!)[] momentum_buffers, "
    "Tensor[] saved, float lr, float momentum, float dampening, float weight_decay, bool nesterov, bool first, "
    "float inv_scale) -> ()",
    reference=ref.sparse_sgd_step_ref, fake=_none_fake, cpp="sparse_sgd_step_cpu", triton="sparse:sparse_sgd_step")

sparse_adamw_step = define_op(
    "sparse_adamw_step",
    "(Tensor(a!)[] params, Tensor[] grads, Tensor[] idx, int[] offsets, Tensor(b!)[] exp_avg, "
    "Tensor(c!)[] exp_avg_sq, Tensor[] saved, float lr, float beta1, float beta2, float eps, float weight_decay, "
    "int step, float inv_scale) -> ()",
    reference=ref.sparse_adamw_step_ref, fake=_none_fake, cpp="sparse_adamw_step_cpu",
    triton="sparse:sparse_adamw_step")
