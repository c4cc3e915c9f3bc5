"""Probe ops: Rademacher probes and the fused Hutchinson accumulation (see reference/probes.py for the contract).

* ``sapsel::rademacher_probe(Tensor like, int offset, int probe, int seed, bool batched=False) -> Tensor``
* ``sapsel::rademacher_fill(Tensor(a!) out, int offset, int probe, int seed, bool batched=False) -> ()``
  (the same values written in place, to reuse one probe buffer)
* ``sapsel::hutchinson_accumulate(Tensor(a!) mean, Tensor(b!) m2, Tensor hz, int offset, int probe, int seed,
  int count) -> ()``
* ``sapsel::hutchinson_accumulate_batched(...)`` same arguments, hz of shape [m, ...] holding probes probe..probe+m-1.
"""

import torch

from ..reference.probes import (
    check_accumulate_args,
    check_probe_args,
    hutchinson_accumulate_batched_ref,
    hutchinson_accumulate_ref,
    rademacher_fill_ref,
    rademacher_probe_ref,
)
from ._lib import define_op


# The fakes run the same argument checks as every backend (metadata and the int arguments: no data is needed).
def _probe_fake(like, offset, probe, seed, batched=False):
    check_probe_args(like, offset, probe, seed, batched, "rademacher_probe")
    return torch.empty_like(like, memory_format=torch.contiguous_format)


def _fill_fake(out, offset, probe, seed, batched=False):
    check_probe_args(out, offset, probe, seed, batched, "rademacher_fill")


def _acc_fake(mean, m2, hz, offset, probe, seed, count):
    check_accumulate_args("hutchinson_accumulate", mean, m2, hz, offset, probe, seed, count, batched=False)


def _acc_batched_fake(mean, m2, hz, offset, probe, seed, count):
    check_accumulate_args("hutchinson_accumulate_batched", mean, m2, hz, offset, probe, seed, count, batched=True)


rademacher_probe = define_op(
    "rademacher_probe", "(Tensor like, int offset, int probe, int seed, bool batched=False) -> Tensor",
    reference=rademacher_probe_ref, fake=_probe_fake, cpp="rademacher_probe_cpu", triton="probes:rademacher_probe")

rademacher_fill = define_op(
    "rademacher_fill", "(Tensor(a!) out, int offset, int probe, int seed, bool batched=False) -> ()",
    reference=rademacher_fill_ref, fake=_fill_fake, cpp="rademacher_fill_cpu", triton="probes:rademacher_fill")

hutchinson_accumulate = define_op(
    "hutchinson_accumulate",
    "(Tensor(a!) mean, Tensor(b!) m2, Tensor hz, int offset, int probe, int seed, int count) -> ()",
    reference=hutchinson_accumulate_ref, fake=_acc_fake, cpp="hutchinson_accumulate_cpu",
    triton="probes:hutchinson_accumulate")

hutchinson_accumulate_batched = define_op(
    "hutchinson_accumulate_batched",
    "(Tensor(a!) mean, Tensor(b!) m2, Tensor hz, int offset, int probe, int seed, int count) -> ()",
    reference=hutchinson_accumulate_batched_ref, fake=_acc_batched_fake, cpp="hutchinson_accumulate_batched_cpu",
    triton="probes:hutchinson_accumulate_batched")
