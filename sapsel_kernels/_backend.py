"""Backend resolution: which implementation serves an op for a given device.

Every op has up to three implementations (see ``ops/_lib.py``):

* ``triton``    - Triton kernels; serve CUDA tensors, and CPU tensors when ``TRITON_INTERPRET=1`` (the interpreter,
  which is how CPU-only CI exercises the real kernel code);
* ``cpp``       - the C++/OpenMP extension; serves CPU tensors;
* ``reference`` - pure PyTorch; the oracle and the fallback on every device.

Default order: CUDA -> triton, reference. CPU -> triton (only under TRITON_INTERPRET=1), cpp, reference.
``SAPSEL_CPU_BACKEND`` / ``SAPSEL_CUDA_BACKEND`` (``auto`` or a backend name) move a backend to the front of the
order for that device; ``use_backend(name)`` forces one backend for every op (and raises if an op lacks it).
"""

import contextlib
import importlib.util
import os
import threading

BACKENDS = ("triton", "cpp", "reference")
_local = threading.local()


def triton_available() -> bool:
    """True when triton can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def forced_backend():
    return getattr(_local, "forced", None)


@contextlib.contextmanager
def use_backend(name: str):
    """Force every sapsel op called in this thread to run on backend ``name`` (errors if one lacks it)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    prev = forced_backend()
    _local.forced = name
    try:
        yield
    finally:
        _local.forced = prev


def default_order(device_type: str):
    if device_type == "cuda":
        order = ["triton", "reference"]
        pref = os.environ.get("SAPSEL_CUDA_BACKEND", "auto")
    else:
        order = (["triton"] if triton_interpret() else []) + ["cpp", "reference"]
        pref = os.environ.get("SAPSEL_CPU_BACKEND", "auto")
    if pref != "auto":
        if pref not in BACKENDS:
            raise ValueError(f"SAPSEL_{device_type.upper()}_BACKEND={pref!r}; expected auto or one of {BACKENDS}")
        order = [pref] + [b for b in order if b != pref]
    return order
