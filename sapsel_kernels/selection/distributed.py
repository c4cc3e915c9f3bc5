"""torch.distributed helpers: exact top-k over scores sharded across ranks, and the small collectives it is built on.

Layout ("contiguous shards"). The global flat score vector of N = sum_r n_r elements is the concatenation of the
ranks' local tensors in group-rank order: rank r holds flat positions [start_r, start_r + n_r), start_0 = 0,
start_{r+1} = start_r + n_r. A rank may hold nothing (n_r = 0). Each rank passes only its local tensor; the starts
come from one all_gather of the n_r.

Layout ("FSDP2 shards"). With ``space=ParamSpace(model)`` of a ``fully_shard`` model (DTensor parameters split by
rows of dim 0), each rank passes the scores of ITS shards: a dict name -> tensor or a list in space order (each a
DTensor sharded like its parameter, or the local shard itself), or the flat concatenation of its shards in space
order (:class:`ShardLayout`). The ranks' ranges interleave in the global index space; within a rank local order is
global order. The selection is the same set, threshold and tie rule (lowest global index) as above.

``select_sharded`` (reached through ``sapsel_kernels.select(..., group=...)``) is bit-identical to the single-process
``select`` on the concatenated scores: same indices, same threshold, for every dtype, k and tie pattern. It runs the
radix select of ``csrc/topk.cpp`` with the histograms summed across ranks: the keys are the reference's
order-preserving integer image of the floats (``reference.topk.signed_key``: -0.0 == +0.0, complemented for
``largest=False``), the digit schedule is the kernels' (fp32 11/11/10 bits, 16-bit floats 11/5; float64, which the
single-process path ranks by sorting, 11/11/11/11/10/10), and every pass does ONE all_reduce of the 2^w-bin int64
histogram, after which every rank derives the same digit.

Communication, payload bytes per rank (all_reduce: the tensor; all_gather: the gathered output), W = world size:
    12 x 8 x W      the descriptor all_gather (sizes, dtype, k, largest, ... and each rank's first NaN/Inf)
  + sum_p 2^w_p x 8 the histograms: 40,960 bytes for fp32 (3 passes), 16,640 for 16-bit floats (2048 + 32 bins)
  + 2 x 8 x W       the per-rank (ties, count above T) all_gather
  + 8 x W x max_r c_r   only with gather=True: the indices, padded to the largest rank's count c_r
  + FSDP2 layout only, and only when the threshold's ties are split (some taken, some not): one all_reduce of an
    int64 histogram per 11-bit digit of the global flat index (ceil(log2(N) / 11) passes, at most 16,384 bytes
    each) and one 8 x W all_gather of the ties each rank takes
k = 0 sends only the descriptor. The payload does not depend on N (the naive all_gather of every score sends
W x max_r n_r x dtype bytes).

Small helpers other modules may use (each one collective at most, documented below): ``rank_and_world``,
``comm_device`` (where small buffers go: CUDA for NCCL, CPU for gloo), ``all_gather_int64`` (a small int64
descriptor from every rank), ``shard_offsets`` (start_r and every n_r of the layout), ``all_gather_varlen``
(concatenate per-rank 1-D tensors of known, uneven lengths).

Every rank reaches the same collectives before any error is raised, so bad input fails on EVERY rank and never
hangs: arguments are validated locally, the outcome travels in the descriptor, and each rank then raises (the
failing rank its own exception, the others the same exception type naming it).
"""

import hashlib
import struct
import sys
from collections.abc import Sequence

import torch
import torch.distributed as dist

from ..errors import NonFiniteError
from ..reference.topk import empty_threshold, signed_key
from .selection_core import Selection, resolve_k, topk_flat
from ..space import ParamSpace

__all__ = ["ShardedSelection", "select_sharded", "rank_and_world", "comm_device", "all_gather_int64",
           "shard_offsets", "all_gather_varlen", "DIGIT_WIDTHS", "topk_comm_bytes", "ShardLayout", "dtensor_rows"]

# digit schedule by key width, most significant first (the C++/Triton kernels' for 32 and 16 bits)
DIGIT_WIDTHS = {32: (11, 11, 10), 16: (11, 5), 64: (11, 11, 11, 11, 10, 10)}
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # descriptor code = position
_KEY_BITS = {torch.float32: 32, torch.float16: 16, torch.bfloat16: 16, torch.float64: 64}
_INT_OF = {32: torch.int32, 16: torch.int16, 64: torch.int64}
_EXC = {1: ValueError, 2: TypeError, 3: NotImplementedError, 4: RuntimeError}  # descriptor error code -> type
_DEVICE_TYPES = ("cpu", "cuda")
# descriptor fields (int64 each)
(_N, _ERR, _DTYPE, _LARGEST, _K, _FRAC, _GATHER, _DEV, _BAD, _BADVAL, _SPACE_N, _SPACE_SIG) = range(12)
_DESC_LEN = 12


# ---------------------------------------------------------------------------------------------------- small helpers
def rank_and_world(group=None) -> tuple[int, int]:
    """(rank of this process in ``group``, size of ``group``); ``group=None`` is the default group.

    Raises RuntimeError when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("sapsel_kernels.distributed: torch.distributed is not initialised "
                           "(call torch.distributed.init_process_group first, e.g. under torchrun)")
    return dist.get_rank(group), dist.get_world_size(group)


def comm_device(group=None, like: torch.device | None = None) -> torch.device:
    """The device on which ``group``'s backend takes small collective buffers: the current CUDA device for NCCL,
    the CPU for gloo, else ``like`` (the data's device; CPU when None)."""
    backend = str(dist.get_backend(group)).lower()
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo":
        return torch.device("cpu")
    return torch.device(like) if like is not None else torch.device("cpu")


def all_gather_int64(values: Sequence[int], group=None, device: torch.device | None = None) -> torch.Tensor:
    """Every rank's small int64 vector ``values`` (the same length on every rank): ONE all_gather.

    Returns a CPU int64 tensor [world, len(values)], row r = rank r's values. Bytes received per rank:
    world x len(values) x 8. ``device``: where the buffers live for the collective (default ``comm_device``)."""
    _, world = rank_and_world(group)
    dev = device if device is not None else comm_device(group)
    mine = torch.tensor(list(values), dtype=torch.int64, device=dev)
    out = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(out, mine, group=group)
    return torch.stack(out).cpu()


def shard_offsets(n_local: int, group=None, device: torch.device | None = None) -> tuple[int, list[int]]:
    """(start_r, [n_0, ..., n_{W-1}]) of the contiguous-shard layout (rank r holds [start_r, start_r + n_r) of the
    flat index space, ranks in order): one all_gather of n_r (W x 8 bytes received)."""
    rank, _ = rank_and_world(group)
    sizes = [int(v) for v in all_gather_int64([int(n_local)], group, device)[:, 0]]
    return sum(sizes[:rank]), sizes


def all_gather_varlen(t: torch.Tensor, counts: Sequence[int], group=None) -> torch.Tensor:
    """The concatenation, in rank order, of every rank's 1-D tensor ``t`` where rank r holds ``counts[r]``
    elements (the counts must be known on every rank). ONE all_gather of the tensors zero-padded to max(counts)
    (W x max(counts) x itemsize bytes received); no collective when every count is 0. Returns a tensor on
    ``t.device``, dtype of ``t``, of sum(counts) elements. A rank whose ``t`` does not match ``counts[rank]`` raises
    ValueError before the collective (the other ranks then wait in it until the group's timeout: pass counts that
    came from a collective, as ``select_sharded`` does)."""
    rank, world = rank_and_world(group)
    if t.dim() != 1 or t.numel() != counts[rank]:
        raise ValueError(f"all_gather_varlen: rank {rank} holds {tuple(t.shape)} but counts[{rank}] = {counts[rank]}")
    m = max(counts)
    if m == 0:
        return t.new_empty(0)
    dev = comm_device(group, t.device)
    buf = torch.zeros(m, dtype=t.dtype, device=dev)
    buf[:t.numel()] = t.to(dev)
    out = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(out, buf, group=group)
    return torch.cat([o[:c] for o, c in zip(out, counts)]).to(t.device)


def topk_comm_bytes(dtype: torch.dtype, world: int, k: int, gather_counts: Sequence[int] | None = None) -> int:
    """Exact payload bytes per rank of one ``select_sharded`` call (see the module docstring for the definition):
    descriptor + histograms + tie counts (+ the padded index gather when ``gather_counts`` is given)."""
    b = _DESC_LEN * 8 * world
    if k == 0:
        return b
    b += sum(1 << w for w in DIGIT_WIDTHS[_KEY_BITS[dtype]]) * 8 + 2 * 8 * world
    if gather_counts is not None and max(gather_counts) > 0:
        b += 8 * world * max(gather_counts)
    return b


# ---------------------------------------------------------------------------------------------------- FSDP2 layout
def dtensor_rows(p, what: str = "parameter") -> tuple[int, int, int]:
    """(r0, r1, row) of an FSDP2 (``fully_shard``) parameter on this rank: it holds rows [r0, r1) of dim 0 (``row``
    elements each), so its local shard is flat positions [r0 * row, r1 * row) of the full parameter. FSDP2 splits
    dim 0 like ``torch.chunk`` (ceil(d0 / W) rows per rank, the last ranks possibly fewer or none). Anything else
    (another placement, a 2-D mesh, a padded or uneven local shard) raises NotImplementedError naming it."""
    from torch.distributed.tensor import Shard

    mesh, pl = p.device_mesh, tuple(p.placements)
    if mesh.ndim != 1 or len(pl) != 1 or not isinstance(pl[0], Shard) or pl[0].dim != 0 or p.dim() == 0:
        raise NotImplementedError(f"{what}: only FSDP2 fully_shard's layout (placements (Shard(dim=0),) on a 1-D "
                                  f"mesh) is supported, got placements {pl} on a {mesh.ndim}-D mesh, shape "
                                  f"{tuple(p.shape)}")
    d0, world, rank = p.shape[0], mesh.size(), mesh.get_local_rank()
    c = -(-d0 // world)
    r0 = min(rank * c, d0)
    r1 = min(r0 + c, d0)
    row = 1
    for n in p.shape[1:]:
        row *= n
    local = p.to_local()
    if tuple(local.shape) != (r1 - r0, *p.shape[1:]):
        raise NotImplementedError(f"{what}: the local shard has shape {tuple(local.shape)}, expected "
                                  f"{(r1 - r0, *p.shape[1:])} (rows {r0}:{r1} of a torch.chunk split over {world})")
    return r0, r1, row


class ShardLayout:
    """Where this rank's FSDP2 shards lie in the global flat index space of a ParamSpace of DTensor parameters.

    Parameter i's local shard is the global flat range ``[lo_i, hi_i)`` (rows [r0, r1) of dim 0, see
    :func:`dtensor_rows`); the rank's LOCAL flat vector is the concatenation of its shards in space order, so the
    map local position -> global index is strictly increasing. ``bounds``: [(lo_i, hi_i)]; ``local_starts``: the
    local position of each shard; ``local_numel``; ``group``: the mesh's process group (every parameter on one
    mesh, else NotImplementedError). Built locally (no collective); O(P)."""

    def __init__(self, space: ParamSpace, what: str = "sapsel_kernels"):
        self.space = space
        self.bounds: list[tuple[int, int]] = []
        self.local_starts: list[int] = []
        mesh = None
        pos = 0
        for name, p, off in zip(space.names, space.params, space.offsets):
            if not is_dtensor(p):
                raise NotImplementedError(f"{what}: parameter {name!r} is a plain tensor among FSDP2 (DTensor) "
                                          "parameters; shard every parameter with fully_shard")
            r0, r1, row = dtensor_rows(p, f"{what}: parameter {name!r}")
            if mesh is None:
                mesh = p.device_mesh
            elif p.device_mesh != mesh:
                raise NotImplementedError(f"{what}: parameter {name!r} lives on another device mesh")
            self.bounds.append((off + r0 * row, off + r1 * row))
            self.local_starts.append(pos)
            pos += (r1 - r0) * row
        self.local_numel = pos
        self.group = mesh.get_group()
        self._lo = torch.tensor([b[0] for b in self.bounds], dtype=torch.int64)
        self._starts = torch.tensor(self.local_starts, dtype=torch.int64)

    @staticmethod
    def of(space: ParamSpace, what: str = "sapsel_kernels") -> "ShardLayout | None":
        """The layout when the space holds DTensor parameters, else None."""
        return ShardLayout(space, what) if any(is_dtensor(p) for p in space.params) else None

    def to_global(self, local: torch.Tensor) -> torch.Tensor:
        """Global flat indices of local positions (int64, any order): O(len) plus one searchsorted."""
        local = local.to(torch.int64)
        starts = self._starts.to(local.device)
        seg = torch.searchsorted(starts, local, right=True) - 1
        return local - starts[seg] + self._lo.to(local.device)[seg]



# ---------------------------------------------------------------------------------------------------- the result
class ShardedSelection(Selection):
    """A :class:`Selection` made by ``select(..., group=...)`` over contiguous shards.

    * ``indices``: int64 ascending GLOBAL flat indices. ``gather=False``: this rank's part of the selection only
      (the selected positions inside [shard_start, shard_start + shard_numel)); ``gather=True``: the full selection,
      identical on every rank and to the single-process ``select`` on the concatenated scores.
    * ``shard_indices``: this rank's part as GLOBAL flat indices (``indices`` itself when not gathered);
      ``local_indices``: the same as positions into this rank's local score tensor (``shard_indices - shard_start``).
    * ``numel``: the global N; ``threshold``: the global k-th selected score (+inf / -inf for k = 0), the same on
      every rank; ``global_k``: the global k; ``k`` / ``len()``: the number of indices held (= ``global_k`` only
      when gathered); ``shard_counts``: every rank's number of selected indices; ``rank``, ``world_size``,
      ``shard_start``, ``shard_numel``; ``gathered``; ``layout``: "contiguous" or "fsdp2". Under the FSDP2 layout
      ``local_indices`` are positions in this rank's LOCAL flat vector (its shards in space order, see
      :class:`ShardLayout`), ``shard_start`` is 0 and ``shard_numel`` the local length.
    """

    def __init__(self, indices, numel, threshold=None, *, shard_indices, shard_start, shard_numel, shard_counts,
                 rank, world_size, gathered, local_positions=None, layout=None, **meta):
        super().__init__(indices, numel, threshold, **meta)
        self.layout = layout  # "contiguous", or "fsdp2" (the rank's FSDP2 shards of each parameter)
        self._local_positions = local_positions
        self.shard_indices = shard_indices
        self.shard_start = int(shard_start)
        self.shard_numel = int(shard_numel)
        self.shard_counts = tuple(int(c) for c in shard_counts)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.gathered = bool(gathered)

    @property
    def global_k(self) -> int:
        return sum(self.shard_counts)

    @property
    def local_indices(self) -> torch.Tensor:
        if self._local_positions is not None:
            return self._local_positions
        return self.shard_indices - self.shard_start

    def __repr__(self) -> str:
        part = "gathered" if self.gathered else f"rank {self.rank}'s part: {self.k:,}"
        return (f"ShardedSelection(k={self.global_k:,} of {self.numel:,} ({part}), rank {self.rank}/"
                f"{self.world_size}, shard [{self.shard_start:,}, {self.shard_start + self.shard_numel:,}), "
                f"threshold={self.threshold.item()})")

    def _copy_meta(self, indices, threshold) -> "ShardedSelection":
        shard = indices if not self.gathered else self.shard_indices.to(indices.device)
        out = ShardedSelection(indices, self.numel, threshold, shard_indices=shard, shard_start=self.shard_start,
                               shard_numel=self.shard_numel, shard_counts=self.shard_counts, rank=self.rank,
                               world_size=self.world_size, gathered=self.gathered,
                               local_positions=self._local_positions, layout=self.layout,
                               space_signature=self.space_signature, largest=self.largest, scope=self.scope)
        out._names, out._refs = self._names, self._refs
        return out


# ---------------------------------------------------------------------------------------------------- the select
def is_dtensor(t) -> bool:
    # a DTensor exists only once torch.distributed.tensor is imported; importing it here would cost ~1 s per rank
    mod = sys.modules.get("torch.distributed.tensor")
    cls = getattr(mod, "DTensor", None) if mod is not None else None
    return cls is not None and isinstance(t, cls)


def _local_checks(scores, k, fraction, scope, space, gather) -> None:
    """The checks one rank can make alone (the rest need every rank's descriptor)."""
    if scope == "per_layer":
        raise NotImplementedError("select(group=...): scope='per_layer' is not implemented for sharded scores (a "
                                  "shard boundary may cut a parameter tensor); use scope='global'")
    if scope != "global":
        raise ValueError(f"select: scope must be 'global' or 'per_layer', got {scope!r}")
    if is_dtensor(scores):
        raise NotImplementedError("select(group=...): a single DTensor of scores is not supported; pass the "
                                  "per-parameter FSDP2 score shards (a dict or list) with space=ParamSpace(the "
                                  "fully_shard model), or each rank's contiguous range as a plain tensor")
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"select(group=...): scores must be this rank's flat score tensor, got "
                        f"{type(scores).__name__} (per-parameter dicts/lists need space= over an FSDP2 model)")
    if scores.dtype not in _DTYPES:
        raise TypeError(f"select: scores must be float32, float16, bfloat16 or float64, got {scores.dtype}")
    if isinstance(k, int) and not isinstance(k, bool) and k < 0:
        raise ValueError(f"k must be >= 0, got k={k}")
    resolve_k(1 << 62, k=k, fraction=fraction)  # both/neither, types, fraction range; k <= N once N is known
    if not isinstance(gather, bool):
        raise TypeError(f"select: gather must be a bool, got {type(gather).__name__}")
    if space is not None and not isinstance(space, ParamSpace):
        raise TypeError(f"select: space must be a ParamSpace, got {type(space).__name__}")


def _fsdp_local_scores(scores, layout: ShardLayout) -> torch.Tensor:
    """This rank's local flat score vector under the FSDP2 layout, from per-parameter shards (a dict name -> tensor
    in any order, or a list in space order; each a DTensor sharded like its parameter or its local shard) or from a
    flat tensor of ``layout.local_numel`` elements."""
    space = layout.space
    if isinstance(scores, dict):
        missing = [n for n in space.names if n not in scores]
        extra = [n for n in scores if n not in set(space.names)]
        if missing or extra:
            raise ValueError(f"select(group=...): FSDP2 score dict does not match the space (missing {missing[:3]}, "
                             f"unknown {extra[:3]})")
        scores = [scores[n] for n in space.names]
    if isinstance(scores, (list, tuple)):
        if len(scores) != len(space):
            raise ValueError(f"select(group=...): {len(scores)} FSDP2 score tensors for {len(space)} parameters")
        parts = []
        for name, t, (lo, hi) in zip(space.names, scores, layout.bounds):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"select(group=...): the score of {name!r} is a {type(t).__name__}, not a tensor")
            loc = t.to_local() if is_dtensor(t) else t
            if loc.numel() != hi - lo:
                raise ValueError(f"select(group=...): the score shard of {name!r} has {loc.numel()} elements, this "
                                 f"rank's shard of the parameter {hi - lo}")
            parts.append(loc.detach().reshape(-1))
        dts = {q.dtype for q in parts}
        if len(dts) > 1:
            raise TypeError(f"select(group=...): the FSDP2 score shards have several dtypes {sorted(map(str, dts))}")
        return torch.cat(parts)
    if isinstance(scores, torch.Tensor) and not is_dtensor(scores) and scores.numel() != layout.local_numel:
        raise ValueError(f"select(group=...): {scores.numel()} local scores, but this rank's FSDP2 shards of the "
                         f"space hold {layout.local_numel} elements")
    return scores


def _ties_taken(key, prefix_key: int, bits: int, layout: ShardLayout, k_rem: int, n: int, group, cdev) -> int:
    """How many of this rank's ties (score key == the threshold's) are among the ``k_rem`` lowest GLOBAL flat
    indices of every rank's ties: a radix select, lowest first, over the indices' bits (11-bit digits, one
    all_reduce of the int64 histogram per digit; global indices are distinct, so the last digit decides exactly)."""
    t = prefix_key - (1 << (bits - 1))  # the threshold's unsigned key -> the signed key image
    gidx = layout.to_global((key == t).nonzero().reshape(-1))
    width_total = max(1, (n - 1).bit_length())
    taken, consumed = 0, 0
    while consumed < width_total:
        w = min(11, width_total - consumed)
        shift = width_total - consumed - w
        digits = (gidx >> shift) & ((1 << w) - 1)
        hist = torch.bincount(digits, minlength=1 << w)
        g = hist.to(cdev, copy=True)
        dist.all_reduce(g, group=group)
        cum = g.cpu().cumsum(0)
        d = int(torch.searchsorted(cum, k_rem))  # the first digit from the bottom where the count reaches k_rem
        below = int(cum[d]) - int(g[d])
        k_rem -= below
        taken += int(hist[:d].sum())
        gidx = gidx[digits == d]
        consumed += w
    return taken + int(gidx.numel())  # the last digit leaves the one index that completes k (on one rank)


def _f64_bits(v: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(v)))[0]


def _f64_of(b: int) -> float:
    return struct.unpack("<d", struct.pack("<q", int(b)))[0]


def _first_nonfinite(flat: torch.Tensor) -> int:
    """Position of the first NaN/Inf of ``flat`` or -1. A finite sum proves every element finite (one reduction,
    ~10x cheaper than isfinite(x).all() on CPU); the element pass runs only when the sum is not finite. 16-bit
    scores are summed in fp32, which cannot overflow (65504 x 2^64 < 3.4e38)."""
    if flat.numel() == 0:
        return -1
    if bool(torch.isfinite(flat.sum(dtype=torch.float64 if flat.dtype == torch.float64 else torch.float32))):
        return -1
    bad = ~torch.isfinite(flat)
    return int(bad.nonzero()[0, 0]) if bool(bad.any()) else -1


def _descriptor(scores, k, fraction, largest, space, gather, err, layout=None) -> list[int]:
    d = [0] * _DESC_LEN
    if err is not None:
        d[_ERR] = (3 if isinstance(err, NotImplementedError) else 2 if isinstance(err, TypeError)
                   else 1 if isinstance(err, ValueError) else 4)
        return d
    flat = scores.detach().reshape(-1)
    d[_N] = flat.numel()
    d[_DTYPE] = _DTYPES.index(flat.dtype)
    d[_LARGEST] = int(bool(largest))
    d[_K] = -1 if k is None else int(k)
    d[_FRAC] = -1 if fraction is None else _f64_bits(fraction)
    d[_GATHER] = int(gather)
    d[_DEV] = _DEVICE_TYPES.index(flat.device.type) if flat.device.type in _DEVICE_TYPES else 99
    d[_BAD], d[_BADVAL] = -1, 0
    i = _first_nonfinite(flat)
    if i >= 0:  # FSDP2: the global flat index at once (contiguous shards: local, offset once the sizes are known)
        g = i if layout is None else int(layout.to_global(torch.tensor([i]))[0])
        d[_BAD], d[_BADVAL] = g, _f64_bits(flat[i].item())
    d[_SPACE_N] = -1 if space is None else space.numel
    d[_SPACE_SIG] = -1 if space is None else int(hashlib.sha1(space.signature.encode()).hexdigest()[:15], 16)
    return d


def _check_descriptors(rows, rank, local_err, space, fsdp: bool = False) -> tuple[int, list[int]]:
    """Raise the same error on every rank for inconsistent or bad input; returns (N, sizes)."""
    world = len(rows)
    bad = [r for r in range(world) if rows[r][_ERR]]
    if bad:
        if local_err is not None:
            raise local_err
        cls = _EXC[rows[bad[0]][_ERR]]
        raise cls(f"select(group=...): rank(s) {bad} of {world} rejected their arguments ({cls.__name__}); "
                  f"see rank {bad[0]}'s error for the cause")

    def differ(field, what, fmt=str, cls=ValueError):
        vals = [rows[r][field] for r in range(world)]
        if len(set(vals)) > 1:
            per = ", ".join(f"rank {r}: {fmt(v)}" for r, v in enumerate(vals))
            raise cls(f"select(group=...): {what} differs across ranks ({per}); every rank must pass the same")

    differ(_DTYPE, "the score dtype", lambda c: str(_DTYPES[c]), TypeError)
    differ(_DEV, "the device type", lambda c: _DEVICE_TYPES[c] if c < len(_DEVICE_TYPES) else "other")
    differ(_LARGEST, "largest", lambda v: str(bool(v)))
    differ(_K, "k", lambda v: "None" if v < 0 else str(v))
    differ(_FRAC, "fraction", lambda v: "None" if v == -1 else repr(_f64_of(v)))
    differ(_GATHER, "gather", lambda v: str(bool(v)))
    differ(_SPACE_SIG, "space (signature)", lambda v: "None" if v < 0 else f"{v:015x}")
    sizes = [rows[r][_N] for r in range(world)]
    n = sum(sizes)
    if n == 0:
        raise ValueError(f"select: no scores on any of the {world} ranks (empty input)")
    sn = rows[0][_SPACE_N]
    if sn >= 0 and sn != n:
        raise ValueError(f"select(group=...): the ranks hold {n} scores in total but the space has {sn}; "
                         "space= must be the GLOBAL parameter space")
    for r in range(world):
        if rows[r][_BAD] >= 0:
            g = rows[r][_BAD] + (0 if fsdp else sum(sizes[:r]))
            where = space.describe_position(g) if space is not None else f"flat index {g}"
            raise NonFiniteError(f"select: score {_f64_of(rows[r][_BADVAL])} at {where} (on rank {r}) is not "
                                 "finite; NaN/Inf scores cannot be ranked (check the score estimate, e.g. for "
                                 "overflow)")
    return n, sizes


def _threshold(prefix: int, bits: int, largest: bool, dtype, device) -> torch.Tensor:
    """The score whose key is ``prefix``: the inverse of ``signed_key`` (a ±0 threshold comes back as +0.0)."""
    s = prefix - (1 << (bits - 1))  # unsigned key image -> signed key
    if not largest:
        s = ~s
    b = s if s >= 0 else s ^ ((1 << (bits - 1)) - 1)
    return torch.tensor(b, dtype=_INT_OF[bits]).view(dtype).to(device)


def select_sharded(scores: torch.Tensor, k: int | None = None, fraction: float | None = None, largest: bool = True,
                   scope: str = "global", space: ParamSpace | None = None, *, group=None,
                   gather: bool = False) -> ShardedSelection:
    """Exact global top-k over scores sharded across the ranks of ``group``: contiguous ranges, or FSDP2 shards.

    Collective: every rank of ``group`` (None: the default group) must call it with the same arguments except its
    own ``scores``. See :func:`sapsel_kernels.select` (``group=``) for the public contract; this is its
    implementation.

    Args:
        scores: this rank's part of the flat score vector (any shape, flattened row-major; may be empty): positions
            [start_r, start_r + n_r) of the global vector, ranks in order. float32 / float16 / bfloat16 / float64,
            the same dtype and device type on every rank. With ``space`` over FSDP2 (DTensor) parameters: the scores
            of this rank's shards instead (a dict / list of per-parameter DTensors or local shards, or their flat
            concatenation; module docstring). A single DTensor raises NotImplementedError.
        k / fraction: the global budget, ``resolve_k(N, ...)`` over N = sum of the ranks' sizes.
        largest: select the largest (True) or smallest scores. scope: "global" only ("per_layer":
            NotImplementedError). space: None or the GLOBAL ParamSpace (numel N), for messages and the signature.
        gather: also all-gather the indices so that every rank holds the full selection.

    Returns:
        :class:`ShardedSelection`: ``indices`` = this rank's part (gather=False) or the full selection (gather=True),
        int64 ascending GLOBAL flat indices; threshold = the global k-th selected score (+inf / -inf for k = 0).

    Raises (on EVERY rank, after the same collectives, so nothing hangs): NonFiniteError (NaN/Inf on any rank,
    naming the global flat index and the rank), TypeError (dtypes differ across ranks or are unsupported, non-tensor
    scores), ValueError (k/fraction/largest/gather/space differ across ranks, k > N, no scores at all),
    NotImplementedError (a single DTensor, per_layer, a DTensor layout other than FSDP2's). A rank whose own
    arguments are bad (or whose local preparation fails: RuntimeError) raises its exception; the others raise the
    same type naming it.

    Cost per rank: 1 + passes + 1 collectives (+1 with gather): see the module docstring for the bytes. Local work:
    a finite check (one sum), the key image, one histogram pass over all local keys, the later passes over the keys
    that match the prefix, and one single-process select. Peak extra memory: 13 bytes per local fp32 score, 7 per 16-bit
    score (process peak RSS measured at n_r = 1e7: the temporaries of the key image) + the output (8 bytes per
    index held).
    """
    rank, world = rank_and_world(group)
    err, layout = None, None
    try:
        if isinstance(space, ParamSpace):
            layout = ShardLayout.of(space, "select(group=...)")
        if layout is not None:
            if dist.get_world_size(layout.group) != world:
                raise ValueError(f"select(group=...): the space's FSDP2 mesh has {dist.get_world_size(layout.group)} "
                                 f"ranks, the group {world}")
            scores = _fsdp_local_scores(scores, layout)
        _local_checks(scores, k, fraction, scope, space, gather)
    except Exception as e:  # noqa: BLE001 - any local failure travels in the descriptor: every rank raises
        err = e
    like = scores.device if isinstance(scores, torch.Tensor) else None
    cdev = comm_device(group, like)
    desc = _descriptor(scores, k, fraction, largest, space, gather, err, layout)
    rows = all_gather_int64(desc, group, cdev).tolist()
    n, sizes = _check_descriptors(rows, rank, err, space, fsdp=layout is not None)
    kk = resolve_k(n, k=k, fraction=fraction)

    flat = scores.detach().reshape(-1).contiguous()
    start = sum(sizes[:rank]) if layout is None else 0
    sig = space.signature if space is not None else None
    meta = dict(space_signature=sig, largest=largest, scope="global", space=space)
    meta["layout"] = "contiguous" if layout is None else "fsdp2"
    if kk == 0:
        none = torch.empty(0, dtype=torch.int64, device=flat.device)
        return ShardedSelection(none, n, empty_threshold(flat, largest), shard_indices=none, shard_start=start,
                                shard_numel=flat.numel(), shard_counts=[0] * world, rank=rank, world_size=world,
                                gathered=gather, local_positions=none if layout is not None else None, **meta)

    bits = _KEY_BITS[flat.dtype]
    key = signed_key(flat)  # order-preserving signed integer image, -0.0 -> +0.0
    if not largest:
        key = ~key  # exact order reversal (~a = -a - 1); equal values stay equal
    # The kernels' unsigned key is this signed key with the top bit flipped: a digit is a shift and a mask of it
    # (the mask drops the arithmetic shift's sign extension), and the top digit also flips its top bit.
    cand = key  # the keys that match the prefix found so far (all of them before the first pass)
    prefix, consumed, k_rem, above_local = 0, 0, kk, 0
    for width in DIGIT_WIDTHS[bits]:
        nb = 1 << width
        digits = cand >> (bits - consumed - width)
        digits &= nb - 1
        if consumed == 0:
            digits ^= nb >> 1
        local = torch.bincount(digits, minlength=nb)  # int64 [2^width]: only keys matching the prefix are in cand
        glob = local.to(cdev, copy=True)
        dist.all_reduce(glob, group=group)
        g = glob.cpu()
        from_top = g.flip(0).cumsum(0)
        j = int(torch.searchsorted(from_top, k_rem))  # first bin from the top where the count reaches k_rem
        d = nb - 1 - j
        k_rem -= int(from_top[j]) - int(g[d])
        above_local += int(local[d + 1:].sum())
        cand = cand[digits == d]  # later passes read only the keys with this digit too
        prefix = (prefix << width) | d
        consumed += width
    del digits
    # k_rem ties of the threshold key T are taken, lowest GLOBAL index first: rank r after the ties of ranks < r
    counts = all_gather_int64([cand.numel(), above_local], group, cdev).tolist()
    if layout is None or k_rem in (0, sum(c[0] for c in counts)):  # (FSDP2: no tie or every tie taken)
        takes = [max(0, min(c[0], k_rem - sum(t[0] for t in counts[:r]))) for r, c in enumerate(counts)]
    else:
        # FSDP2: the ranks' ties interleave in the global index space; the k_rem lowest global indices among them
        # are found by a radix select over the indices (one histogram all_reduce per 11-bit digit)
        mine_ties = _ties_taken(key, prefix, bits, layout, k_rem, n, group, cdev)
        takes = [int(v) for v in all_gather_int64([mine_ties], group, cdev)[:, 0]]
    selected = [c[1] + t for c, t in zip(counts, takes)]
    if sum(selected) != kk:
        raise RuntimeError(f"select(group=...): internal error, selected {sum(selected)} of k={kk}")
    del cand, key
    # this rank's part = its keys > T and its first takes[rank] keys == T = its local top-selected[rank] under the
    # same lowest-index tie rule: the package's single-process op writes exactly that set (fused, ascending)
    local = topk_flat(flat, selected[rank], largest, None, start)[0]
    # FSDP2: local order is global order (ShardLayout), so the rank's first ties are its lowest global indices
    mine = local + start if layout is None else layout.to_global(local)
    thr = _threshold(prefix, bits, largest, flat.dtype, flat.device)
    full = all_gather_varlen(mine, selected, group) if gather else mine
    if gather and layout is not None:
        full = full.sort().values  # the ranks' parts interleave
    return ShardedSelection(full, n, thr, shard_indices=mine, shard_start=start, shard_numel=flat.numel(),
                            shard_counts=selected, rank=rank, world_size=world, gathered=gather,
                            local_positions=local if layout is not None else None, **meta)
