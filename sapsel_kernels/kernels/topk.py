"""Exact top-k (radix select) in Triton: the CUDA implementation of ``sapsel::topk_select``.

Same contract as ``reference/topk.py`` (indices ascending int64, lowest index wins among ties, NaN/Inf -> error).

Algorithm (no sort of N, no (value, index) pairs, int64 offsets throughout):

1. Scores are read as raw bits and mapped to an unsigned key with the order of the values (sign-magnitude ->
   offset binary; -0.0 -> +0.0; smallest: the key is complemented).
2. Digit passes, most significant first (11/11/10 bits for 32-bit keys, 11/5 for 16-bit keys): ``_topk_hist_kernel``
   builds the histogram of the current digit over the elements whose higher digits equal the prefix found so far
   (a compare per element, an increment only for the matches). The host scans the tiny histogram (one device sync
   per pass) and fixes the digit of the k-th largest key T. The first pass also reveals NaN/Inf: their keys fill
   the bins whose sign+exponent bits are all ones or all zeros, which no finite value reaches.
3. ``_topk_count_kernel``: per program, the number of keys > T and == T. Exclusive cumsums (torch, on the device)
   give each program its output offset and its rank among the == T elements.
4. ``_topk_write_kernel``: each program writes the indices of its keys > T, and of its keys == T whose global rank
   among the ties is below the quota k - count(> T), in index order -> ascending output, lowest index wins.
"""

import torch
import triton
import triton.language as tl

from ..reference.topk import check_finite_ref, check_topk_args, empty_threshold

_DIGITS = {32: (11, 11, 10), 16: (11, 5)}
# sign + exponent bits of each dtype: NaN/Inf keys have these all ones (positive) or all zeros (negative)
_EXP_BITS = {torch.float32: 9, torch.bfloat16: 9, torch.float16: 6}
_INT_OF = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


@triton.jit
def _key(x_ptr, offs, mask, KEY_BITS: tl.constexpr, FLIP: tl.constexpr):
    """Order-preserving unsigned key (uint32 holding KEY_BITS bits) of the scores at int64 offsets ``offs``."""
    SIGN: tl.constexpr = 1 << (KEY_BITS - 1)
    ALL: tl.constexpr = (1 << KEY_BITS) - 1
    raw = tl.load(x_ptr + offs, mask=mask, other=0)
    if KEY_BITS == 32:
        b = raw.to(tl.uint32, bitcast=True)
    else:
        b = raw.to(tl.int32).to(tl.uint32, bitcast=True) & ALL
    b = tl.where(b == SIGN, 0, b)  # -0.0 -> +0.0
    key = tl.where((b & SIGN) != 0, b ^ ALL, b | SIGN)
    if FLIP:
        key = key ^ ALL
    return key


@triton.jit(do_not_specialize=["prefix"])
def _topk_hist_kernel(x_ptr, n, hist_ptr, prefix, PREFIX_SHIFT: tl.constexpr, DIGIT_SHIFT: tl.constexpr,
                      NBINS: tl.constexpr, HAS_PREFIX: tl.constexpr, KEY_BITS: tl.constexpr, FLIP: tl.constexpr,
                      BLOCK: tl.constexpr, TILES: tl.constexpr):
    # One program owns `TILES` consecutive tiles of BLOCK scores; grid = cdiv(n, BLOCK * tiles). Counts the digit
    # (key >> DIGIT_SHIFT) & (NBINS - 1) of the keys whose bits above PREFIX_SHIFT equal `prefix`, in an int32
    # per-program histogram (< 2^31 elements per program), then adds it into the int64 global histogram with one
    # atomic per bin. Out-of-range lanes are masked out of the histogram.
    pid = tl.program_id(0).to(tl.int64)
    base = pid * TILES * BLOCK
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    h = tl.zeros((NBINS,), dtype=tl.int32)
    for t in range(TILES):
        offs = base + t * BLOCK + lanes
        inb = offs < n
        key = _key(x_ptr, offs, inb, KEY_BITS, FLIP)
        m = inb
        if HAS_PREFIX:
            m = m & ((key >> PREFIX_SHIFT) == prefix.to(tl.uint32))
        digit = ((key >> DIGIT_SHIFT) & (NBINS - 1)).to(tl.int32)
        h += tl.histogram(digit, NBINS, mask=m)
    tl.atomic_add(hist_ptr + tl.arange(0, NBINS), h.to(tl.int64))


@triton.jit(do_not_specialize=["thr"])
def _topk_count_kernel(x_ptr, n, thr, gt_ptr, eq_ptr, KEY_BITS: tl.constexpr, FLIP: tl.constexpr,
                       BLOCK: tl.constexpr, TILES: tl.constexpr):
    # One program owns `TILES` consecutive tiles of BLOCK scores (same partition as the write kernel); it stores
    # its number of keys > thr and == thr (int64) at gt_ptr[pid], eq_ptr[pid]. Masked lanes count as neither.
    pid = tl.program_id(0).to(tl.int64)
    base = pid * TILES * BLOCK
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    t_key = thr.to(tl.uint32)
    gt = tl.zeros((BLOCK,), dtype=tl.int32)
    eq = tl.zeros((BLOCK,), dtype=tl.int32)
    for t in range(TILES):
        offs = base + t * BLOCK + lanes
        inb = offs < n
        key = _key(x_ptr, offs, inb, KEY_BITS, FLIP)
        gt += (inb & (key > t_key)).to(tl.int32)
        eq += (inb & (key == t_key)).to(tl.int32)
    tl.store(gt_ptr + pid, tl.sum(gt.to(tl.int64), axis=0))
    tl.store(eq_ptr + pid, tl.sum(eq.to(tl.int64), axis=0))


@triton.jit(do_not_specialize=["thr", "quota"])
def _topk_write_kernel(x_ptr, n, thr, quota, out_off_ptr, eq_before_ptr, out_ptr, KEY_BITS: tl.constexpr,
                       FLIP: tl.constexpr, BLOCK: tl.constexpr, TILES: tl.constexpr):
    # One program owns `TILES` consecutive tiles (as in the count kernel) and writes, in index order, the int64
    # indices of its keys > thr and of its keys == thr whose global rank among the ties is < quota, starting at
    # out_off_ptr[pid]. Positions come from an in-tile inclusive cumsum of the selection flags: no atomics, so the
    # output is ascending and deterministic.
    pid = tl.program_id(0).to(tl.int64)
    base = pid * TILES * BLOCK
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    t_key = thr.to(tl.uint32)
    pos0 = tl.load(out_off_ptr + pid)
    eq0 = tl.load(eq_before_ptr + pid)
    for t in range(TILES):
        offs = base + t * BLOCK + lanes
        inb = offs < n
        key = _key(x_ptr, offs, inb, KEY_BITS, FLIP)
        is_eq = inb & (key == t_key)
        eq_rank = eq0 + tl.cumsum(is_eq.to(tl.int64), axis=0) - 1
        sel = (inb & (key > t_key)) | (is_eq & (eq_rank < quota))
        pos = pos0 + tl.cumsum(sel.to(tl.int64), axis=0) - 1
        tl.store(out_ptr + pos, offs, mask=sel)
        pos0 += tl.sum(sel.to(tl.int64), axis=0)
        eq0 += tl.sum(is_eq.to(tl.int64), axis=0)


def _launch_shape(n: int, device: torch.device):
    """(BLOCK, tiles per program, grid): ~4 programs per SM on CUDA; small tiles for the CPU interpreter."""
    if device.type == "cuda":
        block = 2048
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        tiles = max(1, triton.cdiv(n, block * 4 * sms))
    else:  # interpreter: few, fat programs (each program costs ~1 ms of Python overhead)
        block = 1024
        tiles = max(1, triton.cdiv(n, block * 16))
    tiles = min(triton.next_power_of_2(tiles), (1 << 30) // block)  # a power of 2: few distinct compiles; < 2^31
    # elements per program, so the int32 per-program counters cannot overflow
    return block, tiles, triton.cdiv(n, block * tiles)


def _decode(key: int, key_bits: int, largest: bool, dtype: torch.dtype, device) -> torch.Tensor:
    """The score whose (possibly complemented) key is ``key``, as a 0-dim tensor of ``dtype``."""
    all_ones = (1 << key_bits) - 1
    sign = 1 << (key_bits - 1)
    if not largest:
        key ^= all_ones
    bits = key ^ sign if key & sign else key ^ all_ones
    if bits >= sign:  # to the signed integer with the same bits
        bits -= 1 << key_bits
    return torch.tensor(bits, dtype=_INT_OF[dtype]).view(dtype).to(device).reshape(())


def topk_select(scores: torch.Tensor, k: int, largest: bool = True):
    """Launcher: (indices int64 [k] ascending, threshold 0-dim). CUDA tensors (CPU under TRITON_INTERPRET=1)."""
    check_topk_args(scores, k)
    x = scores.contiguous()
    n = x.shape[0]
    dev = x.device
    if k == 0 or k == n:  # nothing to rank: just the NaN/Inf check and the trivial answer
        check_finite_ref(x)
        if k == 0:
            return torch.empty(0, dtype=torch.int64, device=dev), empty_threshold(x, largest)
        thr = x.min() if largest else x.max()
        thr = torch.where(thr == 0, torch.zeros_like(thr), thr)  # a ±0 tie reports +0.0
        return torch.arange(n, dtype=torch.int64, device=dev), thr.reshape(())
    key_bits = 32 if x.dtype == torch.float32 else 16
    bits = x.view(_INT_OF[x.dtype])
    block, tiles, grid = _launch_shape(n, dev)
    flip = not largest

    prefix, consumed, k_rem = 0, 0, k
    for p, width in enumerate(_DIGITS[key_bits]):
        nbins = 1 << width
        hist = torch.zeros(nbins, dtype=torch.int64, device=dev)
        _topk_hist_kernel[(grid,)](bits, n, hist, prefix, PREFIX_SHIFT=key_bits - consumed,
                                   DIGIT_SHIFT=key_bits - consumed - width, NBINS=nbins, HAS_PREFIX=p > 0,
                                   KEY_BITS=key_bits, FLIP=flip, BLOCK=block, TILES=tiles)
        h = hist.cpu()  # the one device sync of this pass (16 KB)
        if p == 0:
            e = _EXP_BITS[x.dtype]
            top = torch.arange(nbins) >> (width - e)
            if int(h[(top == 0) | (top == (1 << e) - 1)].sum()):
                check_finite_ref(x)  # raises, naming the first NaN/Inf position
        from_top = h.flip(0).cumsum(0)  # from_top[j] = count of digits >= nbins - 1 - j
        j = int(torch.searchsorted(from_top, torch.tensor(k_rem)))
        d = nbins - 1 - j
        k_rem -= int(from_top[j] - h[d])  # minus the elements with a larger digit: they are all selected
        prefix = (prefix << width) | d
        consumed += width
    thr_key = prefix  # the key of the k-th largest; k_rem = how many of the keys == thr_key are taken

    gt = torch.empty(grid, dtype=torch.int64, device=dev)
    eq = torch.empty(grid, dtype=torch.int64, device=dev)
    _topk_count_kernel[(grid,)](bits, n, thr_key, gt, eq, KEY_BITS=key_bits, FLIP=flip, BLOCK=block, TILES=tiles)
    quota = k_rem
    eq_before = torch.cumsum(eq, 0) - eq
    take = torch.clamp(quota - eq_before, min=0)
    take = torch.minimum(take, eq)
    cnt = gt + take
    out_off = torch.cumsum(cnt, 0) - cnt
    out = torch.empty(k, dtype=torch.int64, device=dev)
    _topk_write_kernel[(grid,)](bits, n, thr_key, quota, out_off, eq_before, out, KEY_BITS=key_bits,
                                FLIP=flip, BLOCK=block, TILES=tiles)
    return out, _decode(thr_key, key_bits, largest, x.dtype, dev)
