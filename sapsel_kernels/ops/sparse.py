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
indices, offsets[i] the parameter's ParamSpace offset: no index copies); every tensor of one call lives on one device.

Every op validates its inputs completely on every backend before its first write: index tensors int64, 1-D,
contiguous, every entry in range and strictly ascending (sorted, no duplicates: the kernels write without atomics,
and optimizer state entry j belongs to one coordinate), plus list lengths, dtypes, shapes and devices of every tensor
and state buffer. Out-of-range entries raise IndexError, everything else ValueError (messages: see
``reference/sparse.py``); a rejected call leaves every tensor bit-identical. The fake kernels here check the metadata
part of that contract (so meta tensors and torch.compile tracing reject the same calls); the entry values cannot be
checked on fake tensors, the real kernel checks them when the compiled graph runs. The in-place ops bump the autograd
version counter of every tensor they mutate (``ops/_lib.py``), so a graph that saved one of them raises on backward.

Peak extra memory (k = number of selected entries, N = numel of ``flat``, n_i = numel of params[i]):

* sparse_gather: its k-entry output (plus a copy of flat if it is strided);
* sparse_scatter_add: its output, one copy of flat (N elements);
* the in-place ops and sam_grad_sqnorm: nothing on the C++ path (a contiguous copy of a strided params[i] for
  adaptive sam_grad_sqnorm); the reference and Triton paths hold ~3 bytes per index entry for the checks, and the
  reference gathers the selected values (a few k-entry temporaries); sam_grad_sqnorm(full=True) on the reference
  path works tensor by tensor with ~2 temporaries of n_i elements.
"""

import torch

from ..reference import sparse as ref
from ._lib import LIB, define_op


# ------------------------------------------------------------------------------------------------ functional ops
# The fakes check the metadata contract of reference/sparse.py (values=False: index values need real data).
def _gather_fake(flat, idx):
    ref.check_flat_args("sparse_gather", flat, idx, values=False)
    return flat.new_empty(idx.shape)


def _scatter_fake(flat, idx, vals):
    ref.check_flat_args("sparse_scatter_add", flat, idx, vals, values=False)
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
    ref.check_sqnorm_args(grads, params, idx, offsets, values=False)
    dev = grads[0].device if grads else torch.device("cpu")
    return torch.empty(len(grads), dtype=ref.sqnorm_out_dtype(grads), device=dev)


def _perturb_fake(params, grads, idx, offsets, saved, scale, eta, adaptive):
    ref.check_perturb_args(params, grads, idx, offsets, saved, values=False)


def _sgd_fake(params, grads, idx, offsets, momentum_buffers, saved, lr, momentum, dampening, weight_decay, nesterov,
              first, inv_scale):
    ref.check_sgd_args(params, grads, idx, offsets, momentum_buffers, saved, momentum, values=False)


def _adamw_fake(params, grads, idx, offsets, exp_avg, exp_avg_sq, saved, lr, beta1, beta2, eps, weight_decay, step,
                inv_scale):
    ref.check_adamw_args(params, grads, idx, offsets, exp_avg, exp_avg_sq, saved, step, values=False)


sam_grad_sqnorm = define_op(
    "sam_grad_sqnorm",
    "(Tensor[] grads, Tensor[] params, Tensor[] idx, int[] offsets, float eta, bool adaptive, bool full) -> Tensor",
    reference=ref.sam_grad_sqnorm_ref, fake=_sqnorm_fake, cpp="sam_grad_sqnorm_cpu", triton="sparse:sam_grad_sqnorm")

sam_perturb = define_op(
    "sam_perturb",
    "(Tensor(a!)[] params, Tensor[] grads, Tensor[] idx, int[] offsets, Tensor(b!)[] saved, float scale, float eta, "
    "bool adaptive) -> ()",
    reference=ref.sam_perturb_ref, fake=_perturb_fake, cpp="sam_perturb_cpu", triton="sparse:sam_perturb")

sparse_sgd_step = define_op(
    "sparse_sgd_step",
    "(Tensor(a!)[] params, Tensor[] grads, Tensor[] idx, int[] offsets, Tensor(b!)[] momentum_buffers, "
    "Tensor[] saved, float lr, float momentum, float dampening, float weight_decay, bool nesterov, bool first, "
    "float inv_scale) -> ()",
    reference=ref.sparse_sgd_step_ref, fake=_sgd_fake, cpp="sparse_sgd_step_cpu", triton="sparse:sparse_sgd_step")

sparse_adamw_step = define_op(
    "sparse_adamw_step",
    "(Tensor(a!)[] params, Tensor[] grads, Tensor[] idx, int[] offsets, Tensor(b!)[] exp_avg, "
    "Tensor(c!)[] exp_avg_sq, Tensor[] saved, float lr, float beta1, float beta2, float eps, float weight_decay, "
    "int step, float inv_scale) -> ()",
    reference=ref.sparse_adamw_step_ref, fake=_adamw_fake, cpp="sparse_adamw_step_cpu",
    triton="sparse:sparse_adamw_step")
