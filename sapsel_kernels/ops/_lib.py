"""The op-registration machinery every sapsel op goes through.

``define_op`` declares one ``torch.ops.sapsel.<name>`` op from a schema string and wires, in one place:

* a fake (meta) kernel, so ``torch.library.opcheck`` and ``torch.compile(fullgraph=True)`` work;
* CPU and CUDA dispatcher kernels that pick an implementation at call time (``_backend.default_order``):
  the Triton launcher, the C++ function from ``sapsel_kernels._C`` or the pure-PyTorch reference;
* an entry in the registry that ``sapsel info`` prints and tests use to call one path directly;
* the autograd version-counter bump of every argument the schema marks as written (``Tensor(a!)``), after the
  backend returns: the kernels write through data pointers (C++, Triton) or below the autograd keys, so without it a
  graph that saved a mutated tensor would silently backpropagate through stale values (torch.optim's in-place steps
  bump it the same way).

Triton launchers are given as ``"module:function"`` strings relative to ``sapsel_kernels.kernels`` and imported on
first use, so importing sapsel_kernels never imports triton and never initialises CUDA.
"""

import importlib
from dataclasses import dataclass, field
from typing import Callable, Optional, Tuple

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
    mutates: Tuple[Tuple[int, str], ...] = ()  # (position, name) of the arguments the schema marks as written
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
        out = self.fn(self.backend_for(device_type))(*args, **kwargs)
        if self.mutates:  # only reached when the backend returned: a rejected call wrote nothing
            torch.autograd.graph.increment_version(list(self.mutated(args, kwargs)))
        return out

    def mutated(self, args, kwargs):
        """The tensors this call writes (the ``Tensor(a!)`` / ``Tensor(a!)[]`` arguments), lists flattened."""
        for pos, name in self.mutates:
            a = args[pos] if pos < len(args) else kwargs.get(name)
            if isinstance(a, torch.Tensor):
                yield a
            elif isinstance(a, (list, tuple)):
                yield from (t for t in a if isinstance(t, torch.Tensor))


def _mutated_args(name: str, schema: str) -> Tuple[Tuple[int, str], ...]:
    parsed = torch._C.parse_schema(f"sapsel::{name}{schema}")
    return tuple((i, a.name) for i, a in enumerate(parsed.arguments) if a.alias_info is not None and
                 a.alias_info.is_write)


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
    entry = OpEntry(name=name, schema=schema, reference=reference, cpp=cpp, triton=triton,
                    mutates=_mutated_args(name, schema))
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
