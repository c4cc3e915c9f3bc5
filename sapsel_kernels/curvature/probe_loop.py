"""The sampling loop behind ``hessian_diag``'s stochastic estimators, "hutchinson" and "gauss_newton".

A run is a sequence of passes. A pass draws ``per_pass`` samples with probe indices p0 .. p0 + m - 1 (each sample a
function of (seed, probe index) and the data only), checks them, and folds them into float32 Welford accumulators
while Ctrl-C is held, so the accumulators never hold half a pass. The pass is the unit of accumulation, stopping
checks, progress and checkpoints; Ctrl-C drops only the pass in flight.

* :func:`hutchinson_products` / :func:`gnb_sums`: one pass of each estimator on this rank's batches;
* :class:`StopState`: the state of a :class:`~sapsel_kernels.StopRule` across passes (top-k turnover; rtol);
* :func:`save_checkpoint` / :func:`load_checkpoint`: the resumable state, validated on load;
* :func:`run_probe_loop`: the driver.

Data parallel (a :class:`~sapsel_kernels.estimators.Comm` over a process group): per pass every rank sums its own
batches' samples, one all_reduce(SUM) of the [m, N] sums (and of the batch count, in the agreement that tells every
rank whether some rank failed or was interrupted), division by the GLOBAL batch count; then every rank runs the
same Welford fold on the same bits, so accumulators, stopping decisions and checkpoints agree on every rank.
"""

import hashlib
import math
import logging
import os

import torch

from .. import ops  # noqa: F401  (registers torch.ops.sapsel.*)
from ..errors import check_finite
from .estimators import LOCAL, Comm, Estimate, FlatBuffers, Welford, defer_sigint
from .hvp import MODES, FallbackHVP, auto_hvp_order, default_vectorize, grad_params
from ..selection import resolve_k

log = logging.getLogger("sapsel_kernels.hessian")

# /3: ParamSpace.fingerprint hashes only exact integer sums (format 2's also held float sums, which depend on the
# thread count); a format-2 file is refused as "of another format", not as "the weights differ"
CHECKPOINT_FORMAT = "sapsel.hessian_checkpoint/3"


_HALF = (torch.float16, torch.bfloat16)


def sum_dtype(space) -> torch.dtype | None:
    """The dtype of the per-pass product sums of "hutchinson" (summed over batches and over ranks): None (each
    parameter's own dtype) unless a parameter is float16 / bfloat16, then float32 for every parameter (float64 if
    one is float64). A half-precision sum of B batch products would round at every addition (8 bits of mantissa
    in bfloat16); the HVPs themselves still run in the parameters' dtype."""
    if not any(d in _HALF for d in space.dtypes):
        return None
    return torch.float64 if torch.float64 in space.dtypes else torch.float32


def seed_for(seed: int, *parts) -> int:
    h = hashlib.blake2b(":".join(str(int(p)) for p in (seed, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


# ============================================================================================ passes
def hutchinson_products(engine: FallbackHVP, batches, space, zbuf: torch.Tensor, seed: int, p0: int, m: int,
                        out, flat: bool = True) -> tuple[list[torch.Tensor], list[torch.Tensor] | None, int]:
    """Per parameter, [m, *shape] SUM over ``batches`` of H_b z for the Rademacher probes p0 .. p0 + m - 1
    (returns the per-parameter tensors, the flat buffers behind them or None, and the number of batches).

    ``zbuf`` [per_pass, N] is refilled in place every pass (a fresh tensor per pass costs page faults comparable to
    the fill itself); the last, shorter pass uses its leading rows. ``out``: a callable returning the
    :class:`FlatBuffers` the sums are written into, called unless ``batches`` is a one-batch list and ``flat`` is
    False (a collective needs one flat buffer per dtype): then the HVP's own outputs are returned, no copy and no
    [per_pass, N] buffer. Sums are formed in the buffers' dtype (the parameter
    dtype, float32 for half-precision parameters: :func:`sum_dtype`) in batch order (h_1 + h_2 + ...), the same
    roundings as an out-of-place running sum.
    """
    z = zbuf[:m]
    torch.ops.sapsel.rademacher_fill(z, 0, p0, seed, True)
    tangents = [v if v.dtype == d else v.to(d) for v, d in zip(space.views(z).values(), space.dtypes)]
    if not flat and isinstance(batches, list) and len(batches) == 1:
        # The HVP's own outputs, no copy and no buffer: the fused fold reads them before zbuf is refilled, so an
        # output sharing storage with its tangent is fine.
        return engine(tangents, batches[0]), None, 1
    views, flats = out().views(m)
    nb = 0
    for b in batches:
        hz = engine(tangents, b)
        for v, h in zip(views, hz):
            if nb == 0:
                v.copy_(h)  # a copy: an HVP output may share storage with its tangent
            else:
                v.add_(h)
        del hz
        nb += 1
    if nb == 0:
        raise ValueError("the data yielded no batches")
    return views, flats, nb


# Elements per call of the fused fold when the accumulator keeps no M2 (``ProbeConfig(variance=False)``): the op still
# writes an M2, into one reused float32 scratch of this size (16 MiB) instead of an N-length vector.
_SCRATCH_CHUNK = 1 << 22


def add_products(acc: Welford, products: list[torch.Tensor], space, p0: int, seed: int) -> None:
    """Fold x = z (.) Hz for probes p0 .. p0 + m - 1 into ``acc`` (fused op: regenerates z, float32 Welford). Without
    M2 (``acc.m2 is None``) the op runs chunk by chunk with a scratch M2 whose values are dropped: the mean's bits
    are the same (the op updates mean and M2 elementwise)."""
    m = products[0].shape[0]
    if acc.m2 is None:
        scratch = getattr(acc, "scratch", None)
        if scratch is None:  # once per estimate, not per pass
            scratch = acc.scratch = torch.empty(min(_SCRATCH_CHUNK, max(space.numels)), dtype=torch.float32,
                                                device=acc.mean.device)
    for h, off, n in zip(products, space.offsets, space.numels):
        rows = h.reshape(m, n)
        if acc.m2 is not None:
            torch.ops.sapsel.hutchinson_accumulate_batched(acc.mean[off:off + n], acc.m2[off:off + n], rows,
                                                           off, p0, seed, acc.count)
            continue
        for a in range(0, n, _SCRATCH_CHUNK):
            b = min(n, a + _SCRATCH_CHUNK)
            part = rows[:, a:b] if m == 1 else rows[:, a:b].contiguous()
            torch.ops.sapsel.hutchinson_accumulate_batched(acc.mean[off + a:off + b], scratch[:b - a].zero_(), part,
                                                           off + a, p0, seed, acc.count)
    acc.count += m


def gnb_sums(model, output_fn, batches, space, seed: int, p0: int, m: int, out, batch0: int = 0,
             acc=None) -> int:
    """Write into ``out`` [m, N] (float32; float64 for float64 parameters) the SUM over ``batches`` of
    Gauss-Newton-Bartlett terms, formed per parameter tensor (no flat or float64 copy of a gradient): for sample s and
    batch b, labels y ~ softmax(logits) (generator keyed by (seed, s, batch0 + b): ``batch0`` is the global index
    of this rank's first batch), term B_b g_b (.) g_b with g_b the gradient of the mean cross-entropy at y and B_b
    the number of logit rows. Returns the number of batches.

    ``acc`` (a Welford accumulator; then ``out`` is None, m = 1 and ``batches`` holds one batch): the sample is
    folded straight into ``acc`` parameter by parameter, after every gradient was checked finite and with Ctrl-C
    held: no [1, N] sums (the bits of the ``out`` path, whose one-batch sum is the same tensor)."""
    if acc is not None:
        b = next(iter(batches))
        grads, rows = _gnb_gradients(model, output_fn, b, space, seed, p0, batch0)
        dtype = torch.float64 if torch.float64 in space.dtypes else torch.float32
        for x in grads:  # the squares as they will be folded (one tensor's temporary at a time): none is NaN/Inf
            if x is not None:
                x = x.reshape(-1).to(dtype)
                check_finite((x * x).mul_(rows), "hessian_diag: a Gauss-Newton sample",
                             suffix="the accumulators were not updated")

        def parts():
            for x, off, n, p in zip(grads, space.offsets, space.numels, space.params):
                if x is None:
                    yield off, torch.zeros(n, dtype=dtype, device=p.device)
                    continue
                x = x.reshape(-1).to(dtype)
                yield off, (x * x).mul_(rows)

        with defer_sigint():
            acc.add_parts(parts())
        return 1
    nb = 0
    for j, s in enumerate(range(p0, p0 + m)):
        nb = 0
        for bi, b in enumerate(batches):
            gs, rows = _gnb_gradients(model, output_fn, b, space, seed, s, batch0 + bi)
            for x, off, n in zip(gs, space.offsets, space.numels):  # per parameter: no flat copy of the gradient
                dst = out[j, off:off + n]
                if x is None:
                    if nb == 0:
                        dst.zero_()
                    continue
                x = x.reshape(-1).to(out.dtype)
                x = (x * x).mul_(rows)  # one tensor's temporary, rounded before the sum (not a fused addcmul): one
                dst.copy_(x) if nb == 0 else dst.add_(x)  # batch per rank on two ranks gives the same bits (a + b)
            del gs, x
            nb += 1
        if nb == 0:
            raise ValueError("the data yielded no batches")
    return nb


def _gnb_gradients(model, output_fn, b, space, seed: int, s: int, bidx: int):
    """Sample s's labels y ~ softmax(logits) for batch ``bidx`` (global index) and the gradient of the mean
    cross-entropy at y: (per-parameter gradients, the number of logit rows)."""
    with torch.enable_grad():
        logits = output_fn(model, b)
        if not isinstance(logits, torch.Tensor) or logits.dim() < 1:
            raise ValueError("output_fn(model, batch) must return logits [..., C]")
        if not logits.requires_grad:
            raise ValueError("output_fn's logits do not depend on the model's parameters (computed under "
                             "torch.no_grad() or detached?)")
        logits = logits.reshape(-1, logits.shape[-1])
        check_finite(logits.detach(), "hessian_diag(estimator='gauss_newton'): the logits of output_fn",
                     suffix="the accumulators were not updated")
        with torch.no_grad():
            probs = torch.softmax(logits.detach().to(torch.float64), dim=-1)
            gen = torch.Generator(device=probs.device).manual_seed(seed_for(seed, s, bidx))
            y = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        loss = torch.nn.functional.cross_entropy(logits, y)
        gs = grad_params(loss, space.params, "hessian_diag(estimator='gauss_newton'): a gradient")
    return gs, logits.shape[0]


# ============================================================================================ stopping rule
class StopState:
    """A :class:`~sapsel_kernels.StopRule` (or None) and its state across passes.

    ``update(acc)`` after each pass returns (reason or None, record). The record always holds ``probes`` and, from
    two samples on, ``rel_stderr`` = ||stderr||_2 / ||mean||_2 (the progress bar's "current stability"); with a
    top-k rule also ``turnover``, the fraction of the top-k set that changed since the previous pass. Reasons:
    ``"topk_stable"`` (turnover <= turnover_tol in ``patience`` consecutive passes) and ``"rtol"``; neither fires
    before ``min_probes``.
    """

    def __init__(self, rule, k: int | None, min_probes: int):
        self.rule, self.k, self.min_probes = rule, k, min_probes
        self.prev_top: torch.Tensor | None = None
        self.stable_passes = 0

    def update(self, acc: Welford) -> tuple[str | None, dict]:
        rec = {"probes": acc.count}
        stop = None
        if self.k is not None:
            top = torch.topk(acc.mean, self.k, largest=self.rule.largest, sorted=False).indices
            if self.prev_top is not None:
                mask = torch.zeros(acc.mean.numel(), dtype=torch.bool, device=acc.mean.device)
                mask[self.prev_top] = True
                turnover = 1.0 - int(mask[top].sum()) / self.k
                rec["turnover"] = turnover
                self.stable_passes = self.stable_passes + 1 if turnover <= self.rule.turnover_tol else 0
                if self.stable_passes >= self.rule.patience and acc.count >= self.min_probes:
                    stop = "topk_stable"
            self.prev_top = top
        if acc.count >= 2 and acc.m2 is not None:
            # ||stderr||_2 = sqrt(sum(M2) / ((n - 1) n)) (M2 >= 0): two reductions, no N-length temporary
            c = acc.count
            ss, nn = float(acc.m2.sum()), float(acc.mean.norm())
            if not (math.isfinite(ss) and math.isfinite(nn)):  # a float32 reduction overflowed: float64 chunks
                ss = sum(float(acc.m2[a:a + (1 << 20)].double().sum()) for a in range(0, acc.m2.numel(), 1 << 20))
                nn = math.sqrt(sum(float(torch.dot(x, x)) for x in
                                   (acc.mean[a:a + (1 << 20)].double() for a in range(0, acc.mean.numel(), 1 << 20))))
            rse = math.sqrt(max(ss, 0.0) / ((c - 1) * c)) / max(nn, 1e-30)
            rec["rel_stderr"] = rse
            rtol = None if self.rule is None else self.rule.rtol
            if rtol is not None and rse < rtol and acc.count >= self.min_probes and stop is None:
                stop = "rtol"
        return stop, rec

    def state_dict(self) -> dict:
        return {"prev_top": None if self.prev_top is None else self.prev_top.cpu(),
                "stable_passes": self.stable_passes}

    def load_state_dict(self, d: dict, device) -> None:
        self.prev_top = None if d["prev_top"] is None else d["prev_top"].to(device)
        self.stable_passes = d["stable_passes"]


# ============================================================================================ checkpoints
def save_checkpoint(path, state: dict) -> None:
    """Write ``state`` atomically (temporary file + rename: a crash never leaves a half-written checkpoint), with
    Ctrl-C held. Under a group only rank 0 calls it; ``state["world_size"]`` records the group's size."""
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    with defer_sigint():
        torch.save(dict(state, format=CHECKPOINT_FORMAT), tmp)
        os.replace(tmp, path)


def load_checkpoint(path, expect: dict, numel: int, world_size: int = 1) -> dict:
    """Read a checkpoint (``weights_only=True``: no pickled code runs) and check it can continue this run.

    ``expect``: the values that must match for the resumed run to equal the uninterrupted one bit for bit
    (ParamSpace signature, weight fingerprint, seed, estimator, per_pass, vectorize, top-k size and direction).
    ``world_size``: the processes of this run; a checkpoint written by a run over another number (a file without
    the key was written by one process) is refused, since the ranks' shards of the data would differ.
    Raises ValueError for an unreadable/corrupt file, another format, a mismatch (naming the key) or malformed
    contents.
    """
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle, zip and unpickler errors all mean "not a checkpoint"
        raise ValueError(f"{path}: cannot read a hessian_diag checkpoint ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}); delete it or resume=False") from exc
    if not isinstance(d, dict) or d.get("format") != CHECKPOINT_FORMAT:
        got = d.get("format") if isinstance(d, dict) else type(d).__name__
        raise ValueError(f"{path}: not a hessian_diag checkpoint of format {CHECKPOINT_FORMAT} (got {got!r})")
    missing = [k for k in (*expect, "mean", "m2", "count", "prev_top", "stable_passes", "history", "hvp")
               if k not in d]
    if missing:
        raise ValueError(f"{path}: corrupt hessian_diag checkpoint, missing {missing}")
    for key, mine in expect.items():
        if d[key] != mine:
            what = "the model's weights differ" if key == "fingerprint" else \
                "resuming would not reproduce the uninterrupted run"
            raise ValueError(f"checkpoint {path} has {key}={d[key]!r}, this run has {mine!r}: {what}")
    written_by = d.get("world_size", 1)
    if written_by != world_size:
        raise ValueError(f"checkpoint {path} was written by a run over {written_by} process(es) (world size "
                         f"{written_by}), this run has world size {world_size}: the ranks' shards of the data differ, "
                         "resume with the same world size and the same shards (or resume=False)")
    ok = all(isinstance(d[k], torch.Tensor) and d[k].dtype == torch.float32 and d[k].shape == (numel,)
             for k in ("mean", "m2"))
    ok = ok and isinstance(d["count"], int) and d["count"] >= 0 and isinstance(d["stable_passes"], int)
    top = d["prev_top"]
    ok = ok and (top is None or (isinstance(top, torch.Tensor) and top.dtype == torch.int64 and top.dim() == 1
                                 and (top.numel() == 0 or (int(top.min()) >= 0 and int(top.max()) < numel))))
    ok = ok and isinstance(d["history"], list) and d["hvp"] in (None, "auto", *MODES)
    if not ok:
        raise ValueError(f"{path}: corrupt hessian_diag checkpoint (accumulators, counters or top-k state malformed)")
    return d


# ============================================================================================ driver
def plan_probes(space, n_probes: int, probes, stop, estimator: str = "hutchinson",
                one_unvectorized_batch: bool = False, checkpoint=None) -> tuple[int, int, int, int | None]:
    """(max_probes, per_pass, min_probes, top-k size) from the budget base and the configs.

    Without a stopping rule, the default per_pass is 1 where more probes per pass would buy no speed, only memory
    (a [per_pass, N] probe buffer and per_pass x N products): for "gauss_newton" (every sample is its own forward and
    backward per batch) and for "hutchinson" with ``one_unvectorized_batch`` (a single batch whose gradient graph
    every probe reuses, HVPs one probe at a time: CPU rev_rev). With a stopping rule or a checkpoint per_pass stays
    as below: it sets how often the rule looks (``patience`` counts passes) and how often a checkpoint is written
    (``Checkpoint.every`` counts passes), and checkpoints written before this default keep resuming. per_pass never
    changes the estimate's bits (the fold is per probe)."""
    n = space.numel
    max_probes = n_probes if stop is None else (stop.max_probes if stop.max_probes is not None else 8 * n_probes)
    per_pass = probes.per_pass
    if per_pass is None and stop is None and checkpoint is None and \
            (estimator == "gauss_newton" or one_unvectorized_batch):
        per_pass = 1
    if per_pass is None:
        # Memory grows linearly with the probes per pass (z, Hz, and with vmapped HVPs per-probe activation
        # tangents) while the time per probe stops improving early: on CPUs 8 probes per vmapped pass measured
        # as fast per probe as 32 with ~1/4 of the peak memory (bench/test_bench_hessian.py); GPUs get 16.
        elem = max(torch.finfo(d).bits // 8 for d in space.dtypes)
        cap = max(1, probes.memory_cap_bytes // max(1, 6 * n * elem))  # z, Hz, ~4 gradient-sized intermediates
        per_pass = int(min(max_probes, 16 if space.device.type == "cuda" else 8, cap))
    min_probes = min(max_probes, 2 * per_pass)
    k = None
    if stop is not None:
        if stop.min_probes is not None:
            min_probes = stop.min_probes
        if stop.stable_k is not None:
            if stop.stable_k > n:
                raise ValueError(f"StopRule.stable_k must be in [1, {n}] (the number of parameters), "
                                 f"got {stop.stable_k}")
            k = stop.stable_k
        elif stop.stable_fraction is not None:
            k = resolve_k(n, fraction=stop.stable_fraction, what=" (StopRule.stable_fraction)")
    return max_probes, per_pass, min_probes, k


def _progress_bar(progress, total: int, initial: int, estimator: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, initial=initial, unit="probe", desc=f"hessian_diag[{estimator}]", leave=False,
                disable=(None if progress is None else not progress))


def _resume(path, expect: dict, hvp: str, acc: Welford, stopper: StopState, space, world: int) -> tuple[str, list]:
    """Restore ``acc`` and ``stopper`` from the checkpoint at ``path``; returns (the HVP mode to use, history)."""
    d = load_checkpoint(path, expect, space.numel, world)
    if d["hvp"] in MODES:
        if hvp != "auto" and hvp != d["hvp"]:
            raise ValueError(f"checkpoint {path} has hvp={d['hvp']!r}, this run has hvp={hvp!r}: resuming would "
                             "not reproduce the uninterrupted run")
        hvp = d["hvp"]  # the mode the interrupted run settled on
    acc.mean.copy_(d["mean"])
    acc.m2.copy_(d["m2"])
    acc.count = d["count"]
    stopper.load_state_dict(d, space.device)
    log.info("resumed from %s at probe %d", path, acc.count)
    return hvp, list(d["history"])


def _state_digest(acc: Welford, stopper: StopState) -> str:
    h = hashlib.sha1(str(acc.count).encode())
    for t in (acc.mean, acc.m2, stopper.prev_top):
        if t is not None:
            h.update(t.cpu().numpy().tobytes())
    h.update(str(stopper.stable_passes).encode())
    return h.hexdigest()


def _resume_all(comm: Comm, path, expect: dict, hvp: str, acc: Welford, stopper: StopState,
                space) -> tuple[str, list, bool]:
    """Every rank reads the checkpoint (when it exists); returns (hvp mode, history, resumed). Under a group the
    file must exist on every rank or on none, and every rank must have read the same state."""
    def local():
        if not os.path.exists(path):
            return (hvp, []), (0,)
        return _resume(path, expect, hvp, acc, stopper, space, comm.world), (1,)

    (mode, history), (found,) = comm.run(local, f"hessian_diag: resuming from {path}")
    if 0 < found < comm.world:
        raise ValueError(f"checkpoint {path} exists on {found} of {comm.world} ranks: every rank reads it on resume "
                         "(only rank 0 writes it), so it must be on a file system every rank sees")
    if found and comm.active:
        _, digests = comm.exchange(lambda: (None, _state_digest(acc, stopper)), f"hessian_diag: resuming from {path}")
        if len(set(digests)) > 1:
            raise ValueError(f"the ranks read different states from checkpoint {path} (a stale copy on some rank's "
                             "file system?): every rank must see the file rank 0 wrote")
    return mode, history, bool(found)


# the estimators this loop samples (hutchinson: Rademacher probes and HVPs; gauss_newton: labels from the model)
SAMPLED = ("hutchinson", "gauss_newton")


def _pass_fn(estimator, engine, model, output_fn, batches, space, seed, per_pass, acc, comm: Comm, batch0: int):
    """``one_pass(p0, m)``: draw samples p0 .. p0 + m - 1 on this rank's batches, check them, agree with the other
    ranks, sum them over the ranks, divide by the global batch count and fold them into ``acc`` with Ctrl-C held."""
    suffix = "the accumulators were not updated (is the loss finite at these parameters?)"
    if estimator not in SAMPLED:  # never fall through to another estimator's sampling
        raise NotImplementedError(f"the probe loop samples {SAMPLED}, not {estimator!r}")
    if estimator == "hutchinson":
        dt = space.dtypes[0] if all(d == space.dtypes[0] for d in space.dtypes) else torch.float32
        zbuf = torch.empty(per_pass, space.numel, dtype=dt, device=space.device)  # +-1: exact in any float dtype
        pbuf: list = []  # the [per_pass, N] sums, allocated on first need (several batches, or a group)

        def out():
            if not pbuf:
                pbuf.append(FlatBuffers(space, per_pass, dtype=sum_dtype(space)))
            return pbuf[0]
        what = "hessian_diag: a Hessian-vector product"

        def local(p0, m):
            views, flats, nb = hutchinson_products(engine, batches, space, zbuf, seed, p0, m, out, flat=comm.active)
            check_finite(views, what, suffix=suffix)
            return (views, flats), (nb,)

        def one_pass(p0, m):
            (views, flats), (nb,) = comm.run(lambda: local(p0, m), "hessian_diag(estimator='hutchinson')")
            with defer_sigint():
                comm.sum_(flats)
                if nb > 1:
                    for f in flats:
                        f.div_(nb)
                if comm.active:  # a sum over ranks can overflow where no rank's part did
                    check_finite(views, what + " (summed over the ranks)", suffix=suffix)
                add_products(acc, views, space, p0, seed)
    elif acc.m2 is None and not comm.active and per_pass == 1 and isinstance(batches, list) and len(batches) == 1:
        # the mean alone, one batch, one process: each sample folded straight into the mean, parameter by
        # parameter (no [1, N] sums: the loop users write holds no more), the same bits as the path below
        def one_pass(p0, m):
            gnb_sums(model, output_fn, batches, space, seed, p0, 1, None, batch0, acc=acc)
    else:
        sbuf = torch.empty(per_pass, space.numel, dtype=torch.float64 if torch.float64 in space.dtypes
                           else torch.float32, device=space.device)
        what = "hessian_diag: a Gauss-Newton sample"

        def local(p0, m):
            nb = gnb_sums(model, output_fn, batches, space, seed, p0, m, sbuf[:m], batch0)
            check_finite(sbuf[:m], what, suffix=suffix)
            return sbuf[:m], (nb,)

        def one_pass(p0, m):
            sums, (nb,) = comm.run(lambda: local(p0, m), "hessian_diag(estimator='gauss_newton')")
            with defer_sigint():
                comm.sum_([sums])
                if nb > 1:
                    sums.div_(nb)  # in place: sbuf is refilled by the next pass
                check_finite(sums, what, suffix=suffix)
                acc.add_rows(sums)  # converted to float32 chunk by chunk
    return one_pass


def run_probe_loop(model, loss, batches, space, estimator: str, *, n_probes: int, seed: int, hvp: str, probes,
                   stop, checkpoint, progress, output_fn, comm: Comm = LOCAL, batch0: int = 0) -> Estimate:
    """Sample until the budget or the stopping rule says stop; see ``hessian_diag`` for the arguments. ``comm``: the
    group (every rank calls this with its own batches, ``batch0`` the global index of its first batch)."""
    first = hvp if hvp in MODES else auto_hvp_order(space.device)[0]
    vec = probes.vectorize if probes.vectorize is not None else default_vectorize(space.device, first)
    one = not comm.active and isinstance(batches, list) and len(batches) == 1 and not vec
    max_probes, per_pass, min_probes, k = plan_probes(space, n_probes, probes, stop, estimator, one, checkpoint)
    acc = Welford(space.numel, space.device, variance=probes.variance)
    stopper = StopState(stop, k, min_probes)
    history: list[dict] = []
    info: dict = {"probes_per_pass": per_pass, "max_probes": max_probes, "min_probes": min_probes, "stable_k": k,
                  "variance": probes.variance}
    expect = {}
    if checkpoint is not None:
        expect = {"signature": space.signature, "fingerprint": space.fingerprint(), "seed": seed,
                  "estimator": estimator, "probes_per_pass": per_pass, "vectorize": probes.vectorize,
                  "stable_k": k, "largest": None if k is None else stop.largest}
        if checkpoint.resume:
            hvp, history, resumed = _resume_all(comm, checkpoint.path, expect, hvp, acc, stopper, space)
            if resumed:
                info["resumed_at"] = acc.count
    engine = None
    if estimator == "hutchinson":  # one batch: its gradient graph serves every pass
        engine = FallbackHVP(model, loss, space, hvp, probes.vectorize,
                             reuse_graph=isinstance(batches, list) and len(batches) == 1)
    one_pass = _pass_fn(estimator, engine, model, output_fn, batches, space, seed, per_pass, acc, comm, batch0)

    def save():
        if comm.rank != 0:
            return
        save_checkpoint(checkpoint.path, dict(expect, mean=acc.mean.cpu(), m2=acc.m2.cpu(), count=acc.count,
                                              history=history, hvp=None if engine is None else engine.mode,
                                              world_size=comm.world, **stopper.state_dict()))

    stopped_by, passes = None, 0
    bar = _progress_bar(progress, max_probes, acc.count, estimator)
    try:
        with comm.note_sigint():
            while acc.count < max_probes:
                m = min(per_pass, max_probes - acc.count)
                one_pass(acc.count, m)
                passes += 1
                reason, rec = stopper.update(acc)
                history.append(rec)
                if bar is not None:
                    bar.update(m)
                    bar.set_postfix({key: f"{v:.3g}" for key, v in rec.items() if key != "probes"}, refresh=False)
                if checkpoint is not None and passes % checkpoint.every == 0:
                    save()
                if reason is not None:
                    stopped_by = reason
                    break
            else:
                stopped_by = "n_probes" if stop is None else "max_probes"
    except KeyboardInterrupt:
        if acc.count == 0:
            raise
        log.warning("hessian_diag interrupted: keeping the estimate over the %d probes done", acc.count)
        stopped_by = "interrupted"
    finally:
        if bar is not None:
            bar.close()
    if checkpoint is not None:
        save()
    info.update(stopped_by=stopped_by, hvp=None if engine is None else engine.mode, history=history)
    if engine is not None and engine.vectorize is not None:
        info["vectorize"] = engine.vectorize  # False after a failed batched double backward, too
    if engine is not None and engine.fallback_reason:
        info["hvp_fallback_reason"] = engine.fallback_reason
    return Estimate(acc.mean, acc.m2, acc.count, info)
