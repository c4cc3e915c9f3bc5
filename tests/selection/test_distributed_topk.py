"""Distributed (sharded) ``select(..., group=...)``: bit-identical to the single-process select, errors on every rank.

ONE spawned 4-rank gloo world runs every check (a spawn costs 4-9 s here, a subgroup milliseconds): world size 1
on each rank's own group, world size 2 on the pairs {0, 1} and {2, 3}, world size 4 on all. Each rank builds the same
global score vectors from a seed, passes its contiguous shard and compares its result bit for bit with ``select``
on the whole vector; the ranks return their findings and the tests below assert on them. Score kinds: heavy ties
with both zeros ("ties"), randn, bit patterns 1.0 + [0, 64) ulps that only the last digit pass separates ("close"),
one constant; every dtype, largest True/False, k in {0, 1, N/100, N/2, N}, uneven shards with empty ones.
"""

import pytest
import torch
import torch.distributed as dist
from tests.helpers.dist import run_world

import sapsel_kernels as sk
from sapsel_kernels.distributed import ShardedSelection, shard_offsets, topk_comm_bytes

N = 2000
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INT_OF = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
# shard sizes per world size: uneven, with empty shards (the ranges are contiguous, in rank order)
LAYOUTS = {1: [[N]], 2: [[700, 1300], [0, N]], 4: [[500, 0, 1100, 400], [0, N, 0, 0], [0, 0, 0, N]]}


def _scores(kind: str, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":  # 7 values and both zeros: huge tie groups that straddle the shard boundaries
        x = (torch.randint(-3, 4, (N,), generator=g).float() / 2).to(dtype)
        x[torch.randint(0, N, (N // 5,), generator=g)] = -0.0
        return x
    if kind == "const":
        return torch.full((N,), 0.25, dtype=dtype)
    if kind == "close":  # bit patterns 1.0 + [0, 64) ulps and their negatives: only the last digit pass separates them
        one = torch.tensor(1.0, dtype=dtype).view(INT_OF[dtype]).item()
        b = (one + torch.randint(0, 64, (N,), generator=g)).to(INT_OF[dtype]).view(dtype)
        return torch.where(torch.rand(N, generator=g) < 0.5, -b, b)
    return torch.randn(N, generator=g).to(dtype)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                     b.reshape(-1).view(torch.uint8))


def _shard(x, sizes, rank):
    start = sum(sizes[:rank])
    return x[start:start + sizes[rank]].clone(), start


def _outcome(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - recorded and asserted by the parent
        return type(e).__name__, str(e)
    return None


class _Counter:
    """Payload bytes of this rank's collectives (all_reduce: the tensor; all_gather: the gathered output)."""

    def __init__(self):
        self.bytes = 0
        self._orig = {}

    def __enter__(self):
        def all_reduce(t, *a, **kw):
            self.bytes += t.numel() * t.element_size()
            return self._orig["all_reduce"](t, *a, **kw)

        def all_gather(out, t, *a, **kw):
            self.bytes += sum(o.numel() * o.element_size() for o in out)
            return self._orig["all_gather"](out, t, *a, **kw)

        for name, f in (("all_reduce", all_reduce), ("all_gather", all_gather)):
            self._orig[name] = getattr(dist, name)
            setattr(dist, name, f)
        return self

    def __exit__(self, *exc):
        for name, f in self._orig.items():
            setattr(dist, name, f)


KS = (0, 1, N // 100, N // 2, N)
KINDS = ("ties", "randn", "close", "const")


def _matrix(grp, kinds, layouts, bad):
    """Every (kind, dtype, largest, k) against select() on the whole vector; the shard layout cycles through
    ``layouts`` and gather alternates. Appends a tag to ``bad`` per mismatch; returns the number of calls."""
    rank, world = dist.get_rank(grp), dist.get_world_size(grp)
    n_calls = 0
    for ki, kind in enumerate(kinds):
        for di, dtype in enumerate(DTYPES):
            x = _scores(kind, dtype, 10 * ki + di)
            for li, largest in enumerate((True, False)):
                sizes = layouts[(ki + di + li) % len(layouts)]
                mine, start = _shard(x, sizes, rank)
                for i, k in enumerate(KS):
                    want = sk.select(x, k, largest=largest)
                    gather = (i + di + li) % 2 == 0
                    got = sk.select(mine, k, largest=largest, group=grp, gather=gather)
                    n_calls += 1
                    lo = int(torch.searchsorted(want.indices, start))
                    hi = int(torch.searchsorted(want.indices, start + sizes[rank]))
                    part = want.indices[lo:hi]
                    ok = (isinstance(got, ShardedSelection) and got.numel == N and got.global_k == k
                          and _same_bits(got.threshold, want.threshold)
                          and torch.equal(got.shard_indices, part)
                          and torch.equal(got.local_indices, part - start)
                          and got.shard_start == start and got.shard_numel == sizes[rank]
                          and torch.equal(got.indices, want.indices if gather else part)
                          and got.indices.dtype == torch.int64 and got.largest == largest)
                    if not ok:
                        bad.append(f"world {world}: {kind} {dtype} sizes={sizes} largest={largest} k={k} "
                                   f"gather={gather}")
    return n_calls


def _extras(grp, bad):
    """fraction (the one budget rule over the GLOBAL N), float64, requires_grad, a 2-D non-contiguous shard,
    as_selection / .to()."""
    rank, world = dist.get_rank(grp), dist.get_world_size(grp)
    x = _scores("randn", torch.float64, 99)
    mine, start = _shard(x, LAYOUTS[world][0], rank)
    for largest in (True, False):
        want = sk.select(x, fraction=0.013, largest=largest)
        got = sk.select(mine.requires_grad_(largest), fraction=0.013, largest=largest, group=grp, gather=True)
        if not (torch.equal(got.indices, want.indices) and _same_bits(got.threshold, want.threshold)):
            bad.append(f"world {world}: float64 fraction largest={largest}")
    x2 = torch.randn(world * 40, 30, generator=torch.Generator().manual_seed(5))[:, ::2]
    want = sk.select(x2.reshape(-1), 77)
    got = sk.select(x2[rank * 40:(rank + 1) * 40], 77, group=grp, gather=True)
    if not torch.equal(got.indices, want.indices):
        bad.append(f"world {world}: 2-D non-contiguous shard")
    moved = sk.as_selection(got, sk.ParamSpace({"w": torch.zeros(x2.numel(), requires_grad=True)})).to("cpu")
    if not (isinstance(moved, ShardedSelection) and torch.equal(moved.shard_indices, got.shard_indices)
            and moved.shard_counts == got.shard_counts):
        bad.append(f"world {world}: ShardedSelection through as_selection / .to")


def _comm(grp, bad):
    """Counted payload bytes of select() and shard_offsets() next to the formula."""
    rank, world = dist.get_rank(grp), dist.get_world_size(grp)
    comm = {}
    for dtype in (torch.float32, torch.bfloat16):
        mine, _ = _shard(_scores("randn", dtype, 7), LAYOUTS[world][-1], rank)
        for gather in (False, True):
            for k in (0, 20):
                with _Counter() as c:
                    got = sk.select(mine, k, group=grp, gather=gather)
                comm[(str(dtype), gather, k)] = (c.bytes, topk_comm_bytes(dtype, world, k, got.shard_counts
                                                                            if gather else None))
    with _Counter() as c:
        start, sizes = shard_offsets(rank * 3, grp)
    comm["shard_offsets"] = (c.bytes, 8 * world)
    if (start, sizes) != (sum(3 * r for r in range(rank)), [3 * r for r in range(world)]):
        bad.append(f"world {world}: shard_offsets {start} {sizes}")
    return comm


def _errors(grp, bad):
    """Bad input: (exception type, message) per case on this rank; each case reaches the same collectives."""
    rank, world = dist.get_rank(grp), dist.get_world_size(grp)
    x = _scores("randn", torch.float32, 11)
    mine, start = _shard(x, LAYOUTS[world][0], rank)
    last = world - 1
    errors = {}
    errors["dtype_mismatch"] = _outcome(lambda: sk.select(mine.half() if rank else mine, 5, group=grp))
    errors["int_one_rank"] = _outcome(lambda: sk.select(mine.int() if rank == 0 else mine, 5, group=grp))
    errors["list_one_rank"] = _outcome(lambda: sk.select([mine] if rank == 1 else mine, 5, group=grp))
    errors["k_too_big"] = _outcome(lambda: sk.select(mine, N + 1, group=grp))
    errors["k_negative"] = _outcome(lambda: sk.select(mine, -1, group=grp))
    errors["largest_mismatch"] = _outcome(lambda: sk.select(mine, 5, largest=rank == 0, group=grp))
    errors["k_mismatch"] = _outcome(lambda: sk.select(mine, 5 + rank, group=grp))
    errors["k_vs_fraction"] = _outcome(lambda: sk.select(mine, *((5, None) if rank else (None, 0.1)), group=grp))
    errors["gather_mismatch"] = _outcome(lambda: sk.select(mine, 5, group=grp, gather=rank == 0))
    errors["per_layer"] = _outcome(lambda: sk.select(mine, 5, scope="per_layer", group=grp))
    errors["all_empty"] = _outcome(lambda: sk.select(mine[:0], 0, group=grp))
    nan = mine.clone()
    if rank == last:
        nan[3] = float("nan")
    errors["nan_last_rank"] = _outcome(lambda: sk.select(nan, 0, group=grp))  # k = 0 checks too
    space = sk.ParamSpace({"a": torch.zeros(N - 40, requires_grad=True), "b": torch.zeros(4, 10, requires_grad=True)})
    inf = mine.clone()
    if rank == last:
        inf[-1] = float("-inf")  # global flat index N - 1 = b[3, 9]
    errors["inf_space"] = _outcome(lambda: sk.select(inf, 5, space=space, group=grp))
    errors["space_too_small"] = _outcome(lambda: sk.select(mine, 5, space=sk.ParamSpace(
        {"a": torch.zeros(N - 1, requires_grad=True)}), group=grp))
    got = sk.select(mine, 9, group=grp, gather=True)  # the group is still in step after all of that
    if not torch.equal(got.indices, sk.select(x, 9).indices):
        bad.append(f"world {world}: select after the error cases")
    return errors


def _all_checks(rank, world):
    """One 4-rank spawn covers worlds 1, 2 and 4 through subgroups (a spawn costs seconds, a group milliseconds)."""
    assert world == 4
    singles = [dist.new_group([r]) for r in range(4)]  # every rank creates every group, in the same order
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    out = {w: {"bad": [], "n_calls": 0, "comm": {}, "errors": {}} for w in (1, 2, 4)}
    # world 1: each rank alone, one score kind each (the four run side by side)
    r1 = out[1]
    r1["n_calls"] = _matrix(singles[rank], [KINDS[rank]], LAYOUTS[1], r1["bad"])
    r1["comm"] = _comm(singles[rank], r1["bad"])
    _extras(singles[rank], r1["bad"])
    # world 2: the pairs {0, 1} and {2, 3} run side by side, on different score kinds
    r2, pair = out[2], pairs[rank // 2]
    r2["n_calls"] = _matrix(pair, KINDS[:2] if rank < 2 else KINDS[2:], LAYOUTS[2], r2["bad"])
    if rank < 2:
        r2["errors"] = _errors(pair, r2["bad"])
    else:
        r2["comm"] = _comm(pair, r2["bad"])
        _extras(pair, r2["bad"])
    dist.barrier()
    # world 4: heavy ties with ±0 straddling the shards (the other kinds ran at worlds 1 and 2; 4 ranks on 2 cores
    # make every collective slow)
    world_grp = dist.group.WORLD
    r4 = out[4]
    r4["n_calls"] = _matrix(world_grp, ["ties"], LAYOUTS[4], r4["bad"])
    r4["comm"] = _comm(world_grp, r4["bad"])
    _extras(world_grp, r4["bad"])
    r4["errors"] = _errors(world_grp, r4["bad"])
    return out


@pytest.fixture(scope="module")
def ranks():
    """The 4 ranks' findings, {world size: {...}} each (one spawn for the whole module)."""
    return run_world(_all_checks, 4)


WORLDS = pytest.mark.parametrize("w", [1, 2, 4], ids=lambda w: f"world{w}")


@WORLDS
def test_bit_identical_to_single_process(ranks, w):
    for rank, res in enumerate(ranks):
        assert res[w]["n_calls"] == (2 if w == 2 else 1) * len(DTYPES) * 2 * len(KS)
        assert res[w]["bad"] == [], f"rank {rank}: {res[w]['bad'][:10]}"


@WORLDS
def test_communication_bytes_match_the_formula(ranks, w):
    measured = [res[w]["comm"] for res in ranks if res[w]["comm"]]
    assert len(measured) == (2 if w == 2 else 4)
    for comm in measured:
        for what, (counted, formula) in comm.items():
            assert counted == formula, what
        # fp32: 3 passes of 2^11 + 2^11 + 2^10 int64 bins; bf16 2^11 + 2^5; plus 12 + 2 int64 per rank
        assert comm[(str(torch.float32), False, 20)][0] == (2048 + 2048 + 1024) * 8 + (12 + 2) * 8 * w
        assert comm[(str(torch.bfloat16), False, 20)][0] == (2048 + 32) * 8 + (12 + 2) * 8 * w
        assert comm[(str(torch.float32), False, 0)][0] == 12 * 8 * w


EXPECTED = {  # case -> (exception type on every rank, a piece of the message on the ranks that did not cause it)
    "dtype_mismatch": ("TypeError", "dtype differs across ranks"),
    "int_one_rank": ("TypeError", "rank(s) [0]"),
    "list_one_rank": ("TypeError", "rank(s) [1]"),
    "k_too_big": ("ValueError", f"k must be in [0, {N}]"),
    "k_negative": ("ValueError", "k must be >= 0"),
    "largest_mismatch": ("ValueError", "largest differs across ranks"),
    "k_mismatch": ("ValueError", "k differs across ranks"),
    "k_vs_fraction": ("ValueError", "differs across ranks"),
    "gather_mismatch": ("ValueError", "gather differs across ranks"),
    "per_layer": ("NotImplementedError", "per_layer"),
    "all_empty": ("ValueError", "no scores on any"),
    "nan_last_rank": ("NonFiniteError", "is not finite"),
    "inf_space": ("NonFiniteError", f"b[3, 9] (flat index {N - 1})"),
    "space_too_small": ("ValueError", "GLOBAL parameter space"),
}


@pytest.mark.parametrize("w", [2, 4], ids=lambda w: f"world{w}")
def test_bad_input_raises_on_every_rank(ranks, w):
    results = [res[w]["errors"] for res in ranks[:w]]  # world 2: the pair {0, 1}
    for case, (etype, piece) in EXPECTED.items():
        for rank, errors in enumerate(results):
            got = errors[case]
            assert got is not None, f"{case}: rank {rank} raised nothing"
            assert got[0] == etype, f"{case}: rank {rank} raised {got}"
            if case in ("int_one_rank", "list_one_rank") and f"[{rank}]" in piece:
                assert "select" in got[1]  # the failing rank raises its own, specific message
            else:
                assert piece in got[1], f"{case}: rank {rank}: {got[1]}"
    # the NaN message names the GLOBAL flat index and the rank holding it
    start = sum(LAYOUTS[w][0][:-1])
    assert f"flat index {start + 3} (on rank {w - 1})" in results[0]["nan_last_rank"][1]


def test_group_arguments_without_a_world():
    with pytest.raises(ValueError, match="gather=True needs group="):
        sk.select(torch.randn(10), 3, gather=True)
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="not initialised"):
            sk.select(torch.randn(10), 3, group=object())


def test_dtensor_scores_are_not_supported(tmp_path):
    """FSDP2 shards (DTensor) raise NotImplementedError. In this process, over a 1-rank group: importing
    torch.distributed.tensor costs ~1 s of CPU, too much to pay in every spawned rank (the path that makes every rank
    raise is the one the bad-argument cases above exercise)."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        dt = distribute_tensor(torch.zeros(8), DeviceMesh.from_group(dist.group.WORLD, "cpu"), [Shard(0)])
        with pytest.raises(NotImplementedError, match="DTensor"):
            sk.select(dt, 1, group=dist.group.WORLD)
    finally:
        dist.destroy_process_group()
    assert not dist.is_initialized()
