"""The CPU paths of the sapsel ops that this machine can run (the ``backend`` fixture of tests/conftest.py and the
tests that compare the paths with each other)."""

from sapsel_kernels import _backend
from sapsel_kernels._ext import ext_loaded


def available_cpu_backends():
    out = ["reference"]
    if ext_loaded():
        out.append("cpp")
    if _backend.triton_available() and _backend.triton_interpret():
        out.append("triton")
    return out
