"""Fuzz: random index tensors, good and bad, fed to every sapsel op that takes indices, on every CPU backend.

Backends: the reference, the C++ extension and the Triton kernels through the interpreter (conftest.py sets
TRITON_INTERPRET=1 before triton is imported); a backend that is not available here is left out of the comparison.
Each case is generated once (seeded, so a failure names a reproducible case) and run on every backend from a fresh
deep copy of its tensors:

* a bad case (negative, below the offset, == n, huge, unsorted, duplicated, int32/float/bool dtype, 2-D, strided,
  a bad offset, a short state buffer, the same parameter twice) must raise the expected exception type with a
  message naming the op and the problem -- the same message on every backend for bad index values -- and leave every
  tensor (params, grads, state, saved, the indices themselves) bit-identical. The defect sits in the LAST tensor's
  list most of the time, after valid lists, so a half-applied update would show;
* a good case (random, boundary entries, empty lists, offsets near 2^62) must succeed, agree across backends, and
  touch nothing outside the selected entries (an all-empty call is a no-op).

Shapes are tiny: bad cases launch no kernel at all, and a good case costs a few interpreted Triton programs.
"""

import copy
import random
import zlib

import pytest
import torch
from tests.helpers.backends import available_cpu_backends

from sapsel_kernels import use_backend
from sapsel_kernels.reference.sparse import acc_dtype

OPS = torch.ops.sapsel
SIZES = [(7,), (3, 5), (9,)]  # three parameter tensors; idx[i] are global (offset) indices
INDEX_KINDS = {  # kind -> expected exception
    "negative": IndexError, "below_offset": IndexError, "off_by_one": IndexError, "huge_end": IndexError,
    "huge_middle": IndexError, "unsorted": ValueError, "duplicate": ValueError, "int32": ValueError,
    "float": ValueError, "bool": ValueError, "2d": ValueError, "strided": ValueError,
}
LIST_KINDS = {"negative_offset": ValueError, "overflow_offset": ValueError}
STATE_KINDS = {"short_state": ValueError}
MUTATING_KINDS = {"aliased_params": ValueError}
GOOD_KINDS = ("valid", "boundary", "empty_all", "empty_last", "far_offset")
REPS = 3  # random draws per bad kind and variant

# variant -> (functional?, mutates?, state lists it takes)
VARIANTS = {
    "sparse_gather": (True, False, ()),
    "sparse_scatter_add": (True, False, ()),
    "sam_grad_sqnorm": (False, False, ()),
    "sam_grad_sqnorm_full": (False, False, ()),
    "sam_perturb": (False, True, ("saved",)),
    "sparse_sgd_step": (False, True, ()),
    "sparse_sgd_step_momentum_saved": (False, True, ("bufs", "saved")),
    "sparse_adamw_step": (False, True, ("m", "v")),
    "sparse_adamw_step_saved": (False, True, ("m", "v", "saved")),
}
OP_NAME = {v: v.replace("_full", "").replace("_momentum_saved", "").replace("_step_saved", "_step") for v in VARIANTS}


def _call(variant, c):
    p, g, ix, off = c.get("params"), c.get("grads"), c["idx"], c.get("offsets")
    if variant == "sparse_gather":
        return OPS.sparse_gather(c["flat"], ix[0])
    if variant == "sparse_scatter_add":
        return OPS.sparse_scatter_add(c["flat"], ix[0], c["vals"])
    if variant.startswith("sam_grad_sqnorm"):
        return OPS.sam_grad_sqnorm(g, p, ix, off, 0.01, c["adaptive"], variant.endswith("full"))
    if variant == "sam_perturb":
        return OPS.sam_perturb(p, g, ix, off, c["saved"], 0.3, 0.01, c["adaptive"])
    if variant == "sparse_sgd_step":
        return OPS.sparse_sgd_step(p, g, ix, off, [], [], 0.1, 0.0, 0.0, 0.01, False, False, 1.0)
    if variant == "sparse_sgd_step_momentum_saved":
        return OPS.sparse_sgd_step(p, g, ix, off, c["bufs"], c["saved"], 0.1, 0.9, 0.1, 0.01, False, c["first"], 0.5)
    if variant == "sparse_adamw_step":
        return OPS.sparse_adamw_step(p, g, ix, off, c["m"], c["v"], [], 0.01, 0.9, 0.99, 1e-8, 0.1, 3, 1.0)
    if variant == "sparse_adamw_step_saved":
        return OPS.sparse_adamw_step(p, g, ix, off, c["m"], c["v"], c["saved"], 0.01, 0.9, 0.99, 1e-8, 0.1, 1, 2.0)
    raise AssertionError(variant)


# ------------------------------------------------------------------------------------------------ case generation
def _valid(rng, off, n, k=None):
    k = rng.randint(2, n) if k is None else k
    return [off + j for j in sorted(rng.sample(range(n), k))]


def _corrupt(rng, kind, off, n):
    """A bad index tensor for a tensor of n elements at offset off, and (expected position, value) of the first bad
    entry for the value kinds (None for the metadata kinds)."""
    v = _valid(rng, off, n)
    if kind == "negative":
        bad = rng.choice([-1, -(10**12), -(2**63)])
        return torch.tensor([bad] + v), (0, bad)
    if kind == "below_offset":
        return torch.tensor([off - 1] + v), (0, off - 1)
    if kind == "off_by_one":
        return torch.tensor(v + [off + n]), (len(v), off + n)
    if kind == "huge_end":
        bad = rng.choice([10**12, 2**63 - 1])
        return torch.tensor(v + [bad]), (len(v), bad)
    if kind == "huge_middle":  # the segfault of [0, 10**12, 1]: a huge entry followed by smaller, valid ones
        j = rng.randrange(0, len(v) - 1)
        return torch.tensor(v[: j + 1] + [10**12] + v[j + 1:]), (j + 1, 10**12)
    if kind == "unsorted":
        a, b = sorted(rng.sample(range(len(v)), 2))
        v[a], v[b] = v[b], v[a]
        return torch.tensor(v), (a + 1, v[a + 1])  # the first entry not above its predecessor (the new v[a])
    if kind == "duplicate":
        j = rng.randrange(len(v))
        return torch.tensor(v[: j + 1] + v[j:]), (j + 1, v[j])
    if kind == "int32":
        return torch.tensor(v, dtype=torch.int32), None
    if kind == "float":
        return torch.tensor(v, dtype=rng.choice([torch.float32, torch.float64])), None
    if kind == "bool":
        return torch.ones(len(v), dtype=torch.bool), None
    if kind == "2d":
        return torch.tensor(v).reshape(1, -1), None
    if kind == "strided":
        return torch.tensor([x for x in v for _ in (0, 1)])[::2], None
    raise AssertionError(kind)


def _make_case(variant, kind, seed):
    """(case dict, expected exception or None, expected message pattern or None, position of the bad list)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    functional, _, states = VARIANTS[variant]
    dtype = rng.choice([torch.float32, torch.float32, torch.float64, torch.bfloat16])
    op = OP_NAME[variant]
    expect = {**INDEX_KINDS, **LIST_KINDS, **STATE_KINDS, **MUTATING_KINDS}.get(kind)
    c = {"adaptive": rng.random() < 0.5, "first": rng.random() < 0.5}
    if functional:
        n = rng.randint(3, 40)
        c["flat"] = torch.randn(n, generator=gen).to(dtype)
        shapes, offs = [(n,)], [0]
    else:
        shapes, offs, o = list(SIZES), [], rng.randrange(0, 40)
        for s in shapes:
            offs.append(o)
            o += int(torch.Size(s).numel()) + rng.randrange(0, 10)
    numels = [int(torch.Size(s).numel()) for s in shapes]
    p = len(shapes)
    bad_at = p - 1 if rng.random() < 0.6 else rng.randrange(p)
    idx = [torch.tensor(_valid(rng, off, n), dtype=torch.int64) for off, n in zip(offs, numels)]
    where, msg = None, None
    if kind in INDEX_KINDS:
        idx[bad_at], where = _corrupt(rng, kind, offs[bad_at], numels[bad_at])
        if where is not None:
            j, val = where
            name = "idx" if functional else f"idx\\[{bad_at}\\]"
            entry = f"{name}\\[{j}\\]"
            if expect is IndexError:
                msg = f"^{op}: {entry} = {val} is out of range "
            else:
                msg = f"^{op}: {name} must be strictly ascending \\(sorted, no duplicates\\): {entry} = {val} follows "
        else:
            name = "idx" if functional else f"idx\\[{bad_at}\\]"
            what = "must be contiguous" if kind == "strided" else "must be a 1-D int64 tensor"
            msg = f"{op}: {name} {what}"
    elif kind == "boundary":  # first and last element of every tensor selected
        idx = [torch.tensor(sorted({off, off + n - 1} | set(_valid(rng, off, n, 1)))) for off, n in zip(offs, numels)]
    elif kind == "empty_all":
        idx = [torch.empty(0, dtype=torch.int64) for _ in idx]
    elif kind == "empty_last":
        idx[-1] = torch.empty(0, dtype=torch.int64)
    elif kind == "far_offset":  # valid global indices near 2^62: no overflow on any path
        far = 2**62 + rng.randrange(0, 1000)
        idx[-1] = idx[-1] - offs[-1] + far
        offs[-1] = far
    elif kind == "negative_offset":
        bad_at = p - 1
        offs[-1], idx[-1] = -1, idx[-1] - offs[-1] - 1
        msg = f"{op}: offsets\\[{bad_at}\\] = -1 must be >= 0"
    elif kind == "overflow_offset":
        bad_at = p - 1
        offs[-1] = 2**63 - 1
        idx[-1] = torch.full((1,), 2**63 - 1)
        msg = f"{op}: offsets\\[{bad_at}\\] = {2**63 - 1} must be >= 0 and offset \\+ numel"
    elif kind == "aliased_params":
        bad_at = p - 1
        shapes[-1], numels[-1] = shapes[0], numels[0]
        idx[-1] = torch.tensor(_valid(rng, offs[-1], numels[0]))
        msg = f"{op}: params\\[0\\] and params\\[{p - 1}\\] overlap in memory"
    c["idx"] = idx
    if functional:
        if variant == "sparse_scatter_add":
            c["vals"] = torch.randn(idx[0].numel(), generator=gen).to(dtype)
        return c, expect, msg, bad_at
    c["offsets"] = offs
    c["params"] = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    c["grads"] = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    if kind == "aliased_params":
        c["params"][-1] = c["params"][0]
    ks = [ix.numel() for ix in idx]
    a = acc_dtype(dtype)
    for st in states:
        if st == "saved":
            c["saved"] = [torch.randn(k, generator=gen).to(dtype) for k in ks]
        else:
            c[st] = [torch.rand(k, generator=gen).to(a) for k in ks]
    if kind == "short_state":
        st = rng.choice(states)
        bad_at = rng.randrange(p) if rng.random() < 0.4 else p - 1
        c[st][bad_at] = c[st][bad_at][:-1].clone()
        name = {"bufs": "momentum_buffers", "m": "exp_avg", "v": "exp_avg_sq"}.get(st, st)
        msg = f"{op}: {name}\\[{bad_at}\\] must be contiguous 1-D with {ks[bad_at]} entries"
    return c, expect, msg, bad_at


def _kinds(variant):
    functional, mutates, states = VARIANTS[variant]
    bad = dict(INDEX_KINDS)
    if not functional:
        bad.update(LIST_KINDS)
    if states:
        bad.update(STATE_KINDS)
    if mutates:
        bad.update(MUTATING_KINDS)
    good = [k for k in GOOD_KINDS if not (functional and k == "far_offset")]
    return [(k, r) for k in bad for r in range(REPS)] + [(k, 0) for k in good]


def _tensors(c):
    out = []
    for key in ("flat", "vals", "idx", "params", "grads", "saved", "bufs", "m", "v"):
        v = c.get(key)
        out.extend(v if isinstance(v, list) else [v] if v is not None else [])
    return out


def _backends():
    return [b for b in ("cpp", "reference", "triton") if b in available_cpu_backends()]


# ------------------------------------------------------------------------------------------------ the fuzz
CASE_COUNT = {v: len(_kinds(v)) for v in VARIANTS}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fuzz_indices(variant):
    backends = _backends()
    for kind, rep in _kinds(variant):
        seed = zlib.crc32(f"{variant}/{kind}/{rep}".encode())
        case, expect, msg, bad_at = _make_case(variant, kind, seed)
        label = f"{variant}/{kind}/seed={seed}" + (f"/bad list {bad_at}" if expect else "")
        before = _tensors(case)
        results = {}
        for be in backends:
            c = copy.deepcopy(case)
            with use_backend(be):
                if expect is not None:
                    with pytest.raises(expect, match=msg) as info:
                        _call(variant, c)
                    results[be] = str(info.value)
                else:
                    results[be] = (_call(variant, c), c)
            if expect is not None:  # nothing written, anywhere
                for t0, t1 in zip(before, _tensors(c)):
                    assert t0.dtype == t1.dtype and t0.shape == t1.shape and torch.equal(t0, t1), (label, be)
        if expect is not None:
            if msg is not None and msg.startswith("^"):  # bad index values: one message on every backend
                assert len(set(results.values())) == 1, (label, results)
            continue
        _check_good(variant, kind, case, results, label)


def _tol(dtype):
    # float32 accumulation on every path, but FMA contraction and summation order differ by a few ulps; bfloat16
    # results may differ by one bf16 ulp (the interpreter rounds float32 -> bfloat16 toward zero): ~1e-2 relative
    return dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)


def _check_good(variant, kind, case, results, label):
    outs = list(results.items())
    be0, (out0, c0) = outs[0]
    for be, (out, c) in outs[1:]:  # the backends agree
        if out is not None:
            assert out.dtype == out0.dtype and out.shape == out0.shape, (label, be)
            torch.testing.assert_close(out.double(), out0.double(), **_tol(out.dtype), msg=label)
        for t0, t1 in zip(_tensors(c0), _tensors(c)):
            torch.testing.assert_close(t1.double(), t0.double(), **_tol(t0.dtype), msg=f"{label} {be} vs {be0}")
    for be, (out, c) in outs:
        if "params" in c:  # only the selected entries of the parameters change
            for w0, w1, ix, off in zip(case["params"], c["params"], c["idx"], c["offsets"]):
                keep = torch.ones(w0.numel(), dtype=torch.bool)
                keep[ix - off] = False
                assert torch.equal(w0.reshape(-1)[keep], w1.reshape(-1)[keep]), (label, be)
        if kind == "empty_all":  # a no-op
            for t0, t1 in zip(_tensors(case), _tensors(c)):
                assert torch.equal(t0, t1), (label, be)
            if variant.startswith("sam_grad_sqnorm") and not variant.endswith("full"):
                assert not bool(out.any()), label
        if variant == "sparse_gather":
            assert torch.equal(out, case["flat"][case["idx"][0]]), (label, be)


def test_fuzz_case_count():
    """The fuzz above runs a few hundred cases per backend (kept here so a shrinking generator is noticed)."""
    assert 250 <= sum(CASE_COUNT.values()) <= 600, CASE_COUNT
