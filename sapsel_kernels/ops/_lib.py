"""The op-registration machinery every sapsel op goes through.

``define_op`` declares one ``torch.ops.sapsel.<name>`` op from a schema string and wires, in one place:

* a fake (meta) kernel, so ``torch.library.opcheck`` and ``torch.compile(fullgraph=True)`` work;
* CPU and CUDA dispatcher kernels that pick an implementation at call time (``_backend.default_order``):
  the Triton launcher, the C++ function from ``sapsel_kernels._C`` or the pure-PyTorch reference;
* an entry in the registry that ``sapsel info`` prints and tests use to call one path directly.

Triton launchers are given as ``"module:function"`` strings relative to ``sapsel_kernels.kernels`` and imported on
first use, so importing sapsel_kernels never imports triton and never initialises CUDA.
"""

import importlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .. import _backend
from .._ext import ext

LIB = torch.library.Library("sapsel", "DEF")
REGISTRY: "dict[str, OpEntry]" = {}


@dataclass
class OpEntry:
    name: str
    schema: str
    reference: Callable
    cpp: Optional[str] = None  # attribute of sapsel_kernels._C
    triton: Optional[str] = None  # "module:function" inside sapsel_kernels.kernels
    _triton_fn: Optional[Callable] = field(default=None, repr=False)

    # ---------------------------------------------------------------- implementations
    def has(self, backend: str, device_type: str) -> bool:
        if backend == "reference":
            return True
        if backend == "cpp":
            return device_type == "cpu" and self.cpp is not None and ext() is not None and hasattr(ext(), self.cpp)
        if backend == "triton":
            if self.triton is None or not _backend.triton_available():
                return False
            return device_type == "cuda" or (device_type == "cpu" and _backend.triton_interpret())
        raise ValueError(f"unknown backend {backend!r}")

    def fn(self, backend: str) -> Callable:
        if backend == "reference":
            return self.reference
        if backend == "cpp":
            return getattr(ext(), self.cpp)
        if self._triton_fn is None:
            mod, attr = self.triton.split(":")
            self._triton_fn = getattr(importlib.import_module(f"sapsel_kernels.kernels.{mod}"), attr)
        return self._triton_fn

    def backend_for(self, device_type: str) -> str:
        forced = _backend.forced_backend()
        if forced is not None:
            if not self.has(forced, device_type):
                raise RuntimeError(f"sapsel::{self.name}: backend {forced!r} is not available for {device_type} "
                                   f"tensors here (triton installed: {_backend.triton_available()}, "
                                   f"TRITON_INTERPRET={int(_backend.triton_interpret())}, C++ extension loaded: "
                                   f"{ext() is not None})")
            return forced
        for b in _backend.default_order(device_type):
            if self.has(b, device_type):
                return b
        return "reference"

    def __call__(self, device_type: str, *args, **kwargs):
        return self.fn(self.backend_for(device_type))(*args, **kwargs)


def define_op(name: str, schema: str, *, reference: Callable, fake: Callable, cpp: Optional[str] = None,
              triton: Optional[str] = None):
    """Declare ``sapsel::name`` with ``schema`` (the part after the name, e.g. ``"(Tensor x, int k) -> Tensor"``).

    ``reference``, the C++ function and the Triton launcher all take the op's arguments in schema order.
    The dispatcher picks the device (the dispatch key of the tensor arguments); mixed-device calls are rejected by
    the op's own input checks.
    """
    if name in REGISTRY:
        raise RuntimeError(f"sapsel::{name} is defined twice")
    LIB.define(f"{name}{schema}")
    entry = OpEntry(name=name, schema=schema, reference=reference, cpp=cpp, triton=triton)
    REGISTRY[name] = entry

    def _cpu(*args, **kwargs):
        return entry("cpu", *args, **kwargs)

    def _cuda(*args, **kwargs):
        return entry("cuda", *args, **kwargs)

    LIB.impl(name, _cpu, "CPU")
    LIB.impl(name, _cuda, "CUDA")
    torch.library.register_fake(f"sapsel::{name}", fake, lib=LIB)
    return getattr(torch.ops.sapsel, name)


def backend_table():
    """{op name: {"cpu": backend, "cuda": backend}} as they would be chosen now (CUDA is not initialised)."""
    return {name: {"cpu": e.backend_for("cpu"), "cuda": e.backend_for("cuda")} for name, e in sorted(REGISTRY.items())}
