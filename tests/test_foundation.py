"""Package foundation: import hygiene, extension status, the Philox probe stream, the CLI."""

import os
import subprocess
import sys

import pytest
import torch

import sapsel_kernels as sk
from sapsel_kernels.reference.philox import philox4x32_10, rademacher_ref


def _run_py(code, env_extra=None):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_import_does_not_init_cuda_or_import_triton():
    code = (
        "import sys, torch\n"
        "import sapsel_kernels as sk\n"
        "sk.ops.backend_table()\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised by import'\n"
        "assert 'triton' not in sys.modules, 'triton imported eagerly'\n"
        "print('ok')\n"
    )
    r = _run_py(code)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


@pytest.mark.parametrize("first", ["sk.ForgetReport", "import sapsel_kernels.forget",
                                   "from sapsel_kernels.forget import ForgetReport", "import sapsel_kernels.unlearn",
                                   "sk.UnlearnReport"])
def test_public_functions_are_not_shadowed_by_their_modules(first):
    """``sk.forget`` and ``sk.unlearn`` are functions whatever was imported first (loading a submodule binds the
    package attribute of its name to the module); and no documented name is a module."""
    code = (
        "import types\n"
        "import sapsel_kernels as sk\n"
        f"{first}\n"
        "assert callable(sk.forget) and not isinstance(sk.forget, types.ModuleType), type(sk.forget)\n"
        "assert callable(sk.unlearn) and not isinstance(sk.unlearn, types.ModuleType), type(sk.unlearn)\n"
        "import sapsel_kernels._argtypes, sapsel_kernels.cli, sapsel_kernels.measure, sapsel_kernels.strategies\n"
        "bad = [n for n in dir(sk) if not n.startswith('_') and n in sk._LAZY\n"
        "       and isinstance(getattr(sk, n), types.ModuleType)]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    r = _run_py(code)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_import_without_extension(tmp_path):
    # Hide the compiled module: the package must still import and serve CPU ops with the reference.
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'sapsel_kernels._C': raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import sapsel_kernels as sk\n"
        "assert not sk.ext_loaded()\n"
        "t = sk.ops.backend_table()\n"
        "assert all(v['cpu'] == 'reference' for v in t.values()), t\n"
        "print('ok')\n"
    )
    r = _run_py(code)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_ext_built():
    """CI builds the extension (SAPSEL_REQUIRE_EXT=1): a silent fallback to the reference would hide a broken build."""
    if os.environ.get("SAPSEL_REQUIRE_EXT") == "1":
        assert sk.ext_loaded(), sk.ext_error()
    elif not sk.ext_loaded():
        pytest.skip(f"extension not built here: {sk.ext_error()}")


def test_philox_known_answers():
    # Random123 known-answer vectors for Philox4x32-10.
    z = torch.zeros(1, dtype=torch.int64)
    f = torch.full((1,), 0xFFFFFFFF, dtype=torch.int64)
    assert [int(w) for w in philox4x32_10(z, z, z, z, 0, 0)] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert [int(w) for w in philox4x32_10(f, f, f, f, 0xFFFFFFFF, 0xFFFFFFFF)] == [
        0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


CASES = [(1000, 0, 0, 0), (777, 5, 3, 2**40 + 7), (300, 2**33 + 100, 1, 12345), (1, 127, 2**32 - 1, 2**63 - 1)]


@pytest.mark.parametrize("n,offset,probe,seed", CASES)
def test_rademacher_bit_identical_across_paths(n, offset, probe, seed):
    from tests.helpers.backends import available_cpu_backends

    ref = rademacher_ref(n, offset, probe, seed)
    if "cpp" in available_cpu_backends():
        assert torch.equal(sk._ext.ext().rademacher_cpu(n, offset, probe, seed), ref)
    if "triton" in available_cpu_backends():
        from sapsel_kernels.kernels.philox import rademacher

        assert torch.equal(rademacher(n, offset, probe, seed, device="cpu"), ref)


def test_rademacher_layout_independent():
    full = rademacher_ref(5000, 0, 4, 99)
    # any sub-range gives the same values as the same positions of the full range
    for off, n in [(0, 1), (123, 1000), (4999, 1), (128, 128), (1, 4998)]:
        assert torch.equal(rademacher_ref(n, off, 4, 99), full[off:off + n])


def test_rademacher_distribution():
    # values in {-1, +1}; P(+1) = 1/2: the count of +1 among n is Binomial(n, 1/2), z-score bound 5.
    n = 1 << 20
    z = rademacher_ref(n, 0, 0, 2024)
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    plus = int((z > 0).sum())
    zscore = (plus - n / 2) / (n / 4) ** 0.5
    assert abs(zscore) < 5, zscore
    # different probes / seeds are different streams (agreement ~ Binomial(n, 1/2) too)
    for other in (rademacher_ref(n, 0, 1, 2024), rademacher_ref(n, 0, 0, 2025)):
        agree = int((other == z).sum())
        assert abs((agree - n / 2) / (n / 4) ** 0.5) < 5
    # neighbouring lanes are uncorrelated: lag-1 agreement is also Binomial(n-1, 1/2)
    agree = int((z[1:] == z[:-1]).sum())
    assert abs((agree - (n - 1) / 2) / ((n - 1) / 4) ** 0.5) < 5


def test_bad_seed_probe():
    with pytest.raises(ValueError, match="seed"):
        rademacher_ref(10, 0, 0, -1)
    with pytest.raises(ValueError, match="probe"):
        rademacher_ref(10, 0, 2**32, 0)


def test_cli_info():
    r = subprocess.run([sys.executable, "-m", "sapsel_kernels", "info"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "torch" in out and "C++ extension" in out
    for name in sk.ops.REGISTRY:
        assert name in out
