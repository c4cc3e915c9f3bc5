"""Benchmark-suite setup (``python -m pytest bench --benchmark-only``).

* Triton's interpreter must not be active here: benchmarks time the real backends (C++ on CPU, Triton on CUDA).
* The machine description in the JSON output (``--benchmark-json``) gets the facts needed to compare runs: torch and
  triton versions, CPU threads, whether the C++ extension loaded, the GPU name, and the backend serving each op.
"""

import os

if os.environ.pop("TRITON_INTERPRET", None) == "1":
    print("bench/conftest.py: unset TRITON_INTERPRET=1 (benchmarks time the compiled kernels)")

import importlib.util

import torch

import sapsel_kernels as sk


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch"] = torch.__version__
    machine_info["triton"] = (importlib.util.find_spec("triton") and __import__("triton").__version__) or None
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["sapsel_ext_loaded"] = sk.ext_loaded()
    machine_info["sapsel_backends"] = sk.ops.backend_table()
    machine_info["cuda_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    try:
        machine_info["loadavg_at_start"] = os.getloadavg()
    except OSError:
        pass
