"""Sharded exact top-k over 2 gloo ranks: payload bytes and wall time, ours vs all-gather-everything.

Providers, side by side in one group per N (fp32 randn scores, k = 1% of N, shards of 45% / 55% of N):

* ``sharded``         ``sk.select(local, k, group=WORLD)``: each rank gets its part of the selection; one all_gather
                      of a descriptor, one all_reduce of a 2^11 / 2^11 / 2^10-bin int64 histogram per radix pass, one
                      all_gather of the per-rank tie counts;
* ``sharded_gather``  the same with ``gather=True`` (every rank also receives every rank's indices);
* ``naive``           what one writes without it: all_gather every rank's scores to every rank
                      (``shard_offsets`` + ``all_gather_varlen``) and run the single-process ``sk.select`` on the
                      concatenation (every rank then holds the full selection, like ``sharded_gather``).

Setup: this pytest process is rank 0 and a spawned process is rank 1 (gloo, file rendezvous, 1 intra-op thread each:
the 2-core machine has one core per rank). Before each timed call rank 0 broadcasts the provider to rank 1 in the
untimed ``setup`` of ``benchmark.pedantic``, so both ranks enter the same collectives; the time is rank 0's wall
time of the whole collective call.

extra_info: N, k, ``bytes``: rank 0's payload bytes of one call, counted by wrapping ``torch.distributed.all_reduce``
/ ``all_gather`` (all_reduce: the tensor; all_gather: the gathered output), ``ratio_naive_over_this`` (the naive
median / this provider's; the naive row of a group runs first).

Sizes: N = 1e6 (and 1e7 with ``SAPSEL_BENCH_FULL=1``; 1e5 only with ``SAPSEL_BENCH_QUICK=1``).
Run: ``python -m pytest bench/test_bench_distributed.py --benchmark-only``.
"""

import os
import tempfile
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sapsel_kernels as sk
from sapsel_kernels.distributed import all_gather_varlen, shard_offsets, topk_comm_bytes

if os.environ.get("SAPSEL_BENCH_QUICK") == "1":
    SIZES = [10**5]
else:
    SIZES = [10**6] + ([10**7] if os.environ.get("SAPSEL_BENCH_FULL") == "1" else [])
PROVIDERS = ["naive", "sharded", "sharded_gather"]  # naive first: the ratio needs it
FRACTION = 0.01
WORLD = 2
_MEDIANS = {}


_SHARDS = {}


def _shard(n: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s 45% / 55% part of N seeded randn scores (cached: the timed calls do not generate data)."""
    if (n, rank) not in _SHARDS:
        full = torch.randn(n, generator=torch.Generator().manual_seed(n))
        cut = n * 45 // 100
        _SHARDS.clear()
        _SHARDS[(n, 0)], _SHARDS[(n, 1)] = full[:cut].clone(), full[cut:].clone()
    return _SHARDS[(n, rank)]


def _call(provider: int, n: int, k: int):
    """The same call on both ranks: returns the indices this rank ends up holding."""
    local = _shard(n, dist.get_rank())
    if PROVIDERS[provider] == "naive":
        _, sizes = shard_offsets(local.numel())
        return sk.select(all_gather_varlen(local, sizes), k).indices
    return sk.select(local, k, group=dist.group.WORLD, gather=PROVIDERS[provider] == "sharded_gather").indices


def _command(provider: int, n: int, k: int) -> None:
    dist.broadcast(torch.tensor([provider, n, k], dtype=torch.int64), src=0)


def _peer(rank, init_file):
    """Rank 1: runs whatever rank 0 broadcasts until it broadcasts provider -1."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=120))
    try:
        while True:
            cmd = torch.empty(3, dtype=torch.int64)
            dist.broadcast(cmd, src=0)
            provider, n, k = cmd.tolist()
            if provider < 0:
                break
            _call(provider, n, k)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def world():
    """This process as rank 0 of a 2-rank gloo group with a spawned rank 1."""
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        ctx = mp.get_context("spawn")
        peer = ctx.Process(target=_peer, args=(1, init_file), daemon=True)
        peer.start()
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=WORLD,
                                timeout=timedelta(seconds=120))
        try:
            yield
        finally:
            _command(-1, 0, 0)
            dist.destroy_process_group()
            peer.join(timeout=60)
            torch.set_num_threads(threads)


class _Bytes:
    """Rank 0's payload bytes while active (all_reduce: the tensor; all_gather: the gathered output)."""

    def __enter__(self):
        self.n, self._ar, self._ag = 0, dist.all_reduce, dist.all_gather

        def all_reduce(t, *a, **kw):
            self.n += t.numel() * t.element_size()
            return self._ar(t, *a, **kw)

        def all_gather(out, t, *a, **kw):
            self.n += sum(o.numel() * o.element_size() for o in out)
            return self._ag(out, t, *a, **kw)

        dist.all_reduce, dist.all_gather = all_reduce, all_gather
        return self

    def __exit__(self, *exc):
        dist.all_reduce, dist.all_gather = self._ar, self._ag


@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"N={n:.0e}")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_sharded_select(benchmark, world, provider, n):
    k = sk.resolve_k(n, fraction=FRACTION)
    p = PROVIDERS.index(provider)
    benchmark.group = f"distributed topk N={n:.0e} k={k}"
    # one counted call (not timed), checked against the single-process select on the whole vector
    _command(p, n, k)
    with _Bytes() as counted:
        got = _call(p, n, k)
    whole = torch.cat([_shard(n, 0), _shard(n, 1)])
    want = sk.select(whole, k).indices
    assert torch.equal(got, want if provider != "sharded" else want[want < _shard(n, 0).numel()])
    if provider != "naive":
        counts = [int((want < n * 45 // 100).sum()), int((want >= n * 45 // 100).sum())]
        assert counted.n == topk_comm_bytes(torch.float32, WORLD, k, counts if provider == "sharded_gather" else None)

    def setup():  # untimed: tell rank 1 what to run, so that both ranks enter the same collectives
        _command(p, n, k)
        return (p, n, k), {}

    benchmark.pedantic(_call, setup=setup, rounds=15 if n <= 10**6 else 5, warmup_rounds=2)
    if benchmark.stats is None:  # --benchmark-disable: one untimed call
        return
    median = benchmark.stats.stats.median
    _MEDIANS[(provider, n)] = median
    base = _MEDIANS.get(("naive", n))
    benchmark.extra_info.update(N=n, k=k, world=WORLD, bytes=counted.n,
                                ratio_naive_over_this=None if base is None else base / median)
