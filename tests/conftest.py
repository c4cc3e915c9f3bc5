"""Test-suite setup.

* ``TRITON_INTERPRET=1`` is set before anything imports triton, so the Triton kernels run on CPU tensors through the
  interpreter when a test asks for them (``use_backend("triton")`` or the ``backend`` fixture).
* The default CPU backend for the rest of the suite is the C++ extension (``SAPSEL_CPU_BACKEND=cpp``; it falls back
  to the reference where the extension is missing, and ``test_ext_built`` fails in CI where it must be present),
  so model-level tests do not run every op through the slow interpreter.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("SAPSEL_CPU_BACKEND", "cpp")

import pytest  # noqa: E402
import torch  # noqa: E402

from sapsel_kernels import _backend  # noqa: E402
from tests.helpers.backends import available_cpu_backends  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(params=["reference", "cpp", "triton"])
def backend(request):
    """Each CPU path in turn; a path that is not available here is skipped (and test_ext_built catches a missing
    extension in CI)."""
    if request.param not in available_cpu_backends():
        pytest.skip(f"backend {request.param} not available on this machine")
    with _backend.use_backend(request.param):
        yield request.param


def pytest_report_header(config):
    return f"sapsel CPU backends available: {available_cpu_backends()}"
