"""Probe ops: Rademacher probes and the fused Hutchinson accumulation, on every CPU backend.

Oracles: ``rademacher_ref`` (Philox known answers in test_foundation.py) for the probe values; a float64 two-pass
mean / sum of squared deviations for the Welford state; the reference path for bit-identity.
"""

import pytest
import torch

from sapsel_kernels import use_backend as sk_backend
from sapsel_kernels.reference.philox import rademacher_ref
from sapsel_kernels.reference.probes import hutchinson_accumulate_batched_ref, hutchinson_accumulate_ref

OPS = torch.ops.sapsel
# (n, offset, probe, seed): ragged ends, offsets past 2^32 (int64 group counters), the last probe index, a large seed
CASES = [(300, 5, 3, 7), (1000, 2**33 + 100, 1, 12345), (1, 127, 2**32 - 4, 2**63 - 1), (2048, 0, 0, 0)]
HZ_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("n,offset,probe,seed", CASES)
def test_probe_op_matches_philox_stream(backend, n, offset, probe, seed):
    like = torch.empty(3, n, dtype=torch.float64)
    z = OPS.rademacher_probe(like, offset, probe, seed, True)
    assert z.dtype == torch.float64 and z.shape == like.shape
    for j in range(3):
        assert torch.equal(z[j], rademacher_ref(n, offset, probe + j, seed, dtype=torch.float64))
    # in place, into a reused float32 buffer and into a strided float64 view
    buf = torch.full((3, n), 7.0)
    OPS.rademacher_fill(buf, offset, probe, seed, True)
    assert torch.equal(buf, z.float())
    strided = torch.zeros(n, 3, dtype=torch.float64).T
    OPS.rademacher_fill(strided, offset, probe, seed, True)
    assert torch.equal(strided, z)
    # unbatched, shaped like a parameter
    w = torch.empty(n, 1, dtype=torch.bfloat16)
    z = OPS.rademacher_probe(w, offset, probe, seed)
    assert torch.equal(z.float().view(-1), rademacher_ref(n, offset, probe, seed))


def test_probe_op_distribution(backend):
    # +-1 only and balanced: #(+1) among n is Binomial(n, 1/2); |z-score| < 5 (a fixed seed: not flaky).
    n = 4096 if backend == "triton" else 1 << 18
    z = OPS.rademacher_probe(torch.empty(2, n), 0, 11, 5, True)
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    for row in z:
        plus = int((row > 0).sum())
        assert abs((plus - n / 2) / (n / 4) ** 0.5) < 5
    assert not torch.equal(z[0], z[1])


def _state(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g), torch.rand(n, generator=g) * 3


@pytest.mark.parametrize("dtype", HZ_DTYPES)
@pytest.mark.parametrize("n,offset,probe,seed", CASES)
def test_accumulate_bit_identical_to_reference(backend, dtype, n, offset, probe, seed):
    hz = torch.randn(4, n).to(dtype)
    mean, m2 = _state(n)
    want_mean, want_m2 = mean.clone(), m2.clone()
    hutchinson_accumulate_batched_ref(want_mean, want_m2, hz, offset, probe, seed, 7)
    OPS.hutchinson_accumulate_batched(mean, m2, hz, offset, probe, seed, 7)
    assert torch.equal(mean, want_mean) and torch.equal(m2, want_m2)
    # single-probe op, fed row by row with increasing counts: the same bits (batched == sequential)
    mean1, m21 = _state(n)
    for j in range(4):
        OPS.hutchinson_accumulate(mean1, m21, hz[j], offset, probe + j, seed, 7 + j)
    assert torch.equal(mean1, want_mean) and torch.equal(m21, want_m2)


def test_accumulate_layout_independent(backend):
    # one flat call == per-slice calls at their global offsets (slices not aligned to the 128-element groups)
    n, m = 1500, 3
    hz = torch.randn(m, n, dtype=torch.float64)
    mean, m2 = torch.zeros(n), torch.zeros(n)
    OPS.hutchinson_accumulate_batched(mean, m2, hz, 0, 2, 9, 0)
    mean_s, m2_s = torch.zeros(n), torch.zeros(n)
    for a, b in [(0, 7), (7, 300), (300, 301), (301, 1500)]:
        OPS.hutchinson_accumulate_batched(mean_s[a:b], m2_s[a:b], hz[:, a:b].contiguous(), a, 2, 9, 0)
    assert torch.equal(mean, mean_s) and torch.equal(m2, m2_s)


def test_accumulate_is_welford_of_z_times_hz(backend):
    # From an empty state, m samples give mean = (1/m) sum x and m2 = sum (x - mean)^2 with x = z * Hz
    # (float64 two-pass oracle; float32 Welford error is a few ulps of the values: rtol 1e-5).
    n, m = 700, 6
    hz = torch.randn(m, n, dtype=torch.float64) * torch.logspace(-3, 3, n, dtype=torch.float64)
    mean, m2 = torch.zeros(n), torch.zeros(n)
    OPS.hutchinson_accumulate_batched(mean, m2, hz, 40, 0, 3, 0)
    z = torch.stack([rademacher_ref(n, 40, j, 3, dtype=torch.float64) for j in range(m)])
    x = z * hz.float().double()
    torch.testing.assert_close(mean.double(), x.mean(0), rtol=1e-5, atol=0)
    torch.testing.assert_close(m2.double(), ((x - x.mean(0)) ** 2).sum(0), rtol=1e-5, atol=1e-6 * float(x.abs().max()))


@pytest.mark.parametrize("bad,match", [
    (dict(mean=torch.zeros(10, dtype=torch.float64)), "float32"),
    (dict(hz=torch.zeros(2, 11)), "elements"),
    (dict(hz=torch.zeros(2, 10, dtype=torch.int32)), "hz must be"),
    (dict(count=-1), "count"),
    (dict(offset=-3), "offset"),
    (dict(probe=2**32 - 1), "probe"),
    (dict(seed=-1), "seed"),
    (dict(m2=torch.zeros(20)[::2]), "contiguous"),
    (dict(offset=2**62), "offset"),  # offset + numel past the global index range: int64 overflow in the kernels
    (dict(count=2**63 - 1), "count"),
])
def test_accumulate_bad_input_raises_before_writing(backend, bad, match):
    args = dict(mean=torch.ones(10), m2=torch.ones(10), hz=torch.randn(2, 10), offset=0, probe=0, seed=0, count=0)
    args.update(bad)
    before = (args["mean"].clone(), args["m2"].clone())
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        OPS.hutchinson_accumulate_batched(args["mean"], args["m2"], args["hz"], args["offset"], args["probe"],
                                          args["seed"], args["count"])
    assert torch.equal(args["mean"], before[0]) and torch.equal(args["m2"], before[1])


@pytest.mark.parametrize("bad,exc,match", [
    (dict(offset=-1), ValueError, "offset"),
    (dict(offset=2**63 - 5), ValueError, "offset"),
    (dict(out=torch.zeros(3, 10, dtype=torch.int32)), TypeError, "floating"),
    (dict(out=torch.zeros(()), batched=True), ValueError, "leading probe dimension"),
    (dict(probe=2**32 - 2), ValueError, "probe"),
    (dict(seed=-5), ValueError, "seed"),
])
def test_fill_bad_input_raises_before_writing(backend, bad, exc, match):
    args = dict(out=torch.full((3, 10), 7.0), offset=0, probe=0, seed=0, batched=True)
    args.update(bad)
    before = args["out"].clone()
    with pytest.raises(exc, match=match):
        OPS.rademacher_fill(args["out"], args["offset"], args["probe"], args["seed"], args["batched"])
    assert torch.equal(args["out"], before)
    if "out" not in bad:
        with pytest.raises(exc, match=match):
            OPS.rademacher_probe(args["out"], args["offset"], args["probe"], args["seed"], args["batched"])


def test_inplace_probe_ops_bump_version_counters(backend):
    """A graph that saved the buffer an op writes raises on backward (as after any in-place torch op)."""
    out = torch.zeros(2, 50, requires_grad=True)
    y = (out * out).sum()
    with torch.no_grad():
        OPS.rademacher_fill(out, 0, 0, 1, True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
    mean, m2 = torch.zeros(50), torch.zeros(50)
    v0, v1 = mean._version, m2._version
    OPS.hutchinson_accumulate(mean, m2, torch.randn(50), 0, 0, 1, 0)
    assert mean._version > v0 and m2._version > v1
    v0, v1 = mean._version, m2._version
    OPS.hutchinson_accumulate_batched(mean, m2, torch.randn(3, 50), 0, 1, 1, 1)
    assert mean._version > v0 and m2._version > v1


def test_meta_tensors_get_the_argument_checks():
    meta = torch.empty(3, 10, device="meta")
    assert OPS.rademacher_probe(meta, 0, 0, 1, True).shape == (3, 10)
    with pytest.raises(ValueError, match="offset"):
        OPS.rademacher_fill(meta, -1, 0, 1, True)
    with pytest.raises(TypeError, match="float32"):
        OPS.hutchinson_accumulate(meta[0].double(), meta[0], meta[0], 0, 0, 1, 0)


def test_reference_single_and_batched_agree_on_empty():
    mean, m2 = torch.zeros(0), torch.zeros(0)
    hutchinson_accumulate_ref(mean, m2, torch.zeros(0), 0, 0, 0, 0)
    hutchinson_accumulate_batched_ref(mean, m2, torch.zeros(3, 0), 0, 0, 0, 0)
    assert mean.numel() == 0


def test_opcheck():
    hz = torch.randn(3, 200)
    torch.library.opcheck(OPS.rademacher_probe.default, (hz, 5, 1, 2, True))
    torch.library.opcheck(OPS.rademacher_probe.default, (torch.empty(4, 5, dtype=torch.float64), 0, 0, 1))
    torch.library.opcheck(OPS.rademacher_fill.default, (torch.empty(3, 200), 5, 1, 2, True))
    torch.library.opcheck(OPS.hutchinson_accumulate.default, (torch.zeros(200), torch.zeros(200), hz[0], 3, 0, 1, 0))
    torch.library.opcheck(OPS.hutchinson_accumulate_batched.default,
                          (torch.zeros(200), torch.zeros(200), hz.to(torch.bfloat16), 3, 0, 1, 4))


# ---------------------------------------------------------------------------------------------------- CUDA (Triton)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", HZ_DTYPES)
def test_cuda_bit_identical_to_cpu(dtype):
    """Triton on the GPU (fp fusion off) gives the CPU reference's bits: probes and Welford state."""
    for n, offset, probe, seed in CASES + [(3_000_001, 2**31 + 5, 9, 77)]:
        hz = torch.randn(5, n).to(dtype)
        mean, m2 = _state(n)
        want_mean, want_m2 = mean.clone(), m2.clone()
        hutchinson_accumulate_batched_ref(want_mean, want_m2, hz, offset, probe, seed, 3)
        mc, vc = mean.cuda(), m2.cuda()
        OPS.hutchinson_accumulate_batched(mc, vc, hz.cuda(), offset, probe, seed, 3)
        assert torch.equal(mc.cpu(), want_mean) and torch.equal(vc.cpu(), want_m2), (n, offset)
        z = torch.empty(5, n, device="cuda")
        OPS.rademacher_fill(z, offset, probe, seed, True)
        assert torch.equal(z[4].cpu(), rademacher_ref(n, offset, probe + 4, seed))


_COMPILE_SCRIPT = r"""
import sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sapsel_kernels.kernels import probes as K
sig = {"mean_ptr": "*fp32", "m2_ptr": "*fp32", "hz_ptr": "*bf16", "inv_ptr": "*fp32", "n": "i64", "offset": "i64",
       "probe": "i64", "seed_lo": "i64", "seed_hi": "i64", "M": "constexpr", "GROUPS": "constexpr"}
src = ASTSource(fn=K._hutchinson_accumulate_kernel, signature=sig, constexprs={"M": 2, "GROUPS": K.GROUPS})
try:
    fused = triton.compile(src, target=GPUTarget("cuda", 80, 32), options={})
except Exception as exc:
    print("SKIP", type(exc).__name__, exc)
    sys.exit(0)
ours = triton.compile(src, target=GPUTarget("cuda", 80, 32), options=K._launch_opts(torch.device("cuda")))
print("fused_has_fma", "fma.rn.f32" in fused.asm["ptx"])
print("ours_has_fma", "fma.rn.f32" in ours.asm["ptx"])
print("ours_has_cubin", "cubin" in ours.asm)
psig = {"out_ptr": "*fp32", "n": "i64", "offset": "i64", "probe": "i64", "seed_lo": "i64", "seed_hi": "i64",
        "GROUPS": "constexpr"}
probe = triton.compile(ASTSource(fn=K._rademacher_probe_kernel, signature=psig, constexprs={"GROUPS": K.GROUPS}),
                       target=GPUTarget("cuda", 80, 32))
print("probe_has_cubin", "cubin" in probe.asm)
"""


def test_triton_kernels_compile_for_gpu_without_fma():
    """The GPU build of the accumulation kernel (compiled for sm_80 in a subprocess without the interpreter; no GPU
    needed) contains no fused multiply-add: with Triton's default fp fusion it would (``mean + delta * inv`` -> fma)
    and its bits would differ from the C++ / reference paths. Skipped where Triton's CUDA backend cannot compile."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, check=False,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    if out.stdout.startswith("SKIP"):
        pytest.skip(f"cannot compile for CUDA here: {out.stdout.strip()}")
    assert "fused_has_fma True" in out.stdout  # the hazard is real
    assert "ours_has_fma False" in out.stdout and "ours_has_cubin True" in out.stdout
    assert "probe_has_cubin True" in out.stdout


@pytest.mark.slow
def test_large_slices_bit_identical_cpp_vs_reference():
    """Millions of elements at offsets past 2^31 and 2^32, many threads' chunks: C++ == reference, bit for bit."""
    from tests.helpers.backends import available_cpu_backends

    if "cpp" not in available_cpu_backends():
        pytest.skip("C++ extension not built")
    for n, offset in [(3_000_001, 2**31 - 1000), (2_500_000, 2**32 + 77)]:
        hz = torch.randn(3, n, dtype=torch.bfloat16)
        mean, m2 = _state(n, seed=4)
        want = (mean.clone(), m2.clone())
        with sk_backend("reference"):
            OPS.hutchinson_accumulate_batched(want[0], want[1], hz, offset, 5, 99, 11)
        with sk_backend("cpp"):
            OPS.hutchinson_accumulate_batched(mean, m2, hz, offset, 5, 99, 11)
            z = OPS.rademacher_probe(torch.empty(2, n), offset, 5, 99, True)
        assert torch.equal(mean, want[0]) and torch.equal(m2, want[1])
        assert torch.equal(z[1], rademacher_ref(n, offset, 6, 99))
