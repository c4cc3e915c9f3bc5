"""The op registry: backend order, forcing, and errors for unavailable backends."""

import pytest
import torch

import sapsel_kernels as sk
from sapsel_kernels import _backend
from sapsel_kernels.ops import REGISTRY, backend_table


def test_every_op_has_reference_and_a_schema():
    assert REGISTRY, "no ops registered"
    for name, e in REGISTRY.items():
        assert callable(e.reference), name
        assert hasattr(torch.ops.sapsel, name), name
        assert e.has("reference", "cpu") and e.has("reference", "cuda")


def test_default_order(monkeypatch):
    monkeypatch.setenv("SAPSEL_CPU_BACKEND", "auto")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _backend.default_order("cpu") == ["cpp", "reference"]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.default_order("cpu") == ["triton", "cpp", "reference"]
    monkeypatch.setenv("SAPSEL_CPU_BACKEND", "reference")
    assert _backend.default_order("cpu")[0] == "reference"
    monkeypatch.setenv("SAPSEL_CUDA_BACKEND", "auto")
    assert _backend.default_order("cuda") == ["triton", "reference"]
    monkeypatch.setenv("SAPSEL_CPU_BACKEND", "fast")
    with pytest.raises(ValueError, match="SAPSEL_CPU_BACKEND"):
        _backend.default_order("cpu")


def test_cpu_table_follows_the_environment(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("SAPSEL_CPU_BACKEND", "auto")
    for name, row in backend_table().items():
        e = REGISTRY[name]
        want = "cpp" if e.has("cpp", "cpu") else "reference"
        assert row["cpu"] == want, (name, row)
        # triton never serves CPU tensors without the interpreter
        assert not e.has("triton", "cpu")


def test_use_backend_forces_and_restores():
    name = next(iter(REGISTRY))
    e = REGISTRY[name]
    with sk.use_backend("reference"):
        assert e.backend_for("cpu") == "reference"
        with pytest.raises(ValueError, match="unknown backend"):
            with sk.use_backend("cuda-magic"):
                pass
    assert _backend.forced_backend() is None


def test_forcing_an_unavailable_backend_names_the_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    name = next(n for n, e in REGISTRY.items() if e.triton is not None)
    with sk.use_backend("triton"):
        with pytest.raises(RuntimeError, match=f"sapsel::{name}: backend 'triton' is not available for cpu"):
            REGISTRY[name].backend_for("cpu")


def test_mutated_arguments_come_from_the_schema():
    """Every ``Tensor(a!)`` argument (and only those) gets its version counter bumped by the op layer."""
    assert REGISTRY["sam_perturb"].mutates == ((0, "params"), (4, "saved"))
    assert REGISTRY["sparse_sgd_step"].mutates == ((0, "params"), (4, "momentum_buffers"))
    assert REGISTRY["sparse_adamw_step"].mutates == ((0, "params"), (4, "exp_avg"), (5, "exp_avg_sq"))
    assert REGISTRY["hutchinson_accumulate"].mutates == ((0, "mean"), (1, "m2"))
    assert REGISTRY["rademacher_fill"].mutates == ((0, "out"),)
    for name, e in REGISTRY.items():
        assert bool(e.mutates) == ("!" in e.schema), name
