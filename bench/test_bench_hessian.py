"""Hutchinson diag(H): ours vs the loop users write vs the dense probe matrix (curvlinops style).

    python -m pytest bench/test_bench_hessian.py --benchmark-only            # quick (< 2 min on 2 CPU cores)
    SAPSEL_BENCH_FULL=1 python -m pytest bench/test_bench_hessian.py --benchmark-only   # larger models

Groups ``hutchinson-<model>-m<m>`` (m in {8, 32} probes) on an MLP, a CNN with BatchNorm and a small causal
transformer. Providers:

* ``ours``         ``hessian_diag(..., hvp="auto")``, the defaults (CPU: reverse-over-reverse with the gradient graph
  reused, one double backward per probe; accelerators: forward-over-reverse vmapped over 16 probes per pass);
* ``ours_alt``     the other HVP mode, vmapped over the probes of a pass (CPU: forward-over-reverse);
* ``loop``         create_graph gradient, ``randint_like`` probes, one ``autograd.grad`` per probe, per-tensor
  multiply-add (PyHessian / pytorch-optimizer style);
* ``dense``        N x m Rademacher matrix, ``vmap(jvp(grad))`` over all m columns, mean of Z (.) HZ (curvlinops).

``extra_info``: ``probe_over_grad`` (time per probe / time per gradient), ``peak_mem_mb`` (peak extra tensor memory of
one call: the CUDA allocator peak on GPUs, the torch profiler's allocation timeline on CPUs), for ``ours`` also
``overhead_pct`` (probe generation + fused accumulation per pass as % of one batched HVP per pass). All providers
run under the math SDPA backend. A summary table (speed-up and memory vs dense) is written to
``bench/results/hessian_<device>.md`` and ``.json`` at the end of the module.
"""

import json
import os
import platform
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from tests.helpers.hessian_models import gradient_once, make, peak_memory_bytes, run_provider, timeit

import sapsel_kernels as sk
from sapsel_kernels.hvp import HVP

FULL = os.environ.get("SAPSEL_BENCH_FULL", "0") == "1"
DEVICE = os.environ.get("SAPSEL_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
MODELS = ["mlp", "cnn_bn", "transformer"]
PROBES = [8, 32]
PROVIDERS = ["ours", "ours_alt", "loop", "dense"]
ROUNDS = 5 if FULL else 2  # timed rounds after one warm-up; the table reports the minimum
RESULTS = {}


_MODEL_CACHE = {}


def _setup(name):
    if name not in _MODEL_CACHE:
        model, loss, batch = make(name, full=FULL, device=DEVICE)
        with sdpa_kernel(SDPBackend.MATH):
            tg = timeit(lambda: gradient_once(model, loss, batch), DEVICE, reps=7)
        _MODEL_CACHE[name] = (model, loss, batch, tg)
    return _MODEL_CACHE[name]


def _overhead(model, loss, batch, m):
    """(probe fill + fused accumulation) per pass / one batched HVP per pass, as hessian_diag runs them."""
    est = sk.hessian_diag(model, loss, batch, n_probes=m, progress=False)
    ppp = est.info["probes_per_pass"]
    space = sk.ParamSpace(model)
    z = torch.empty(ppp, space.numel, device=space.device)
    mean, m2 = torch.zeros(space.numel, device=space.device), torch.zeros(space.numel, device=space.device)
    torch.ops.sapsel.rademacher_fill(z, 0, 0, 0, True)
    tangents = list(space.views(z).values())
    hvp = HVP(model, loss, space, est.info["hvp"], vectorize=est.info["vectorize"], reuse_graph=True)
    hz = hvp(tangents, batch)

    def rng_acc():
        torch.ops.sapsel.rademacher_fill(z, 0, 0, 0, True)
        for h, off, n in zip(hz, space.offsets, space.numels):
            torch.ops.sapsel.hutchinson_accumulate_batched(mean[off:off + n], m2[off:off + n], h.reshape(ppp, n),
                                                           off, 0, 0, 0)

    t_ra = timeit(rng_acc, DEVICE, reps=5)
    t_hvp = timeit(lambda: hvp(tangents, batch), DEVICE, reps=2)
    return 100.0 * t_ra / t_hvp, t_ra, t_hvp, ppp


@pytest.mark.parametrize("m", PROBES)
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_hutchinson(benchmark, provider, name, m):
    model, loss, batch, t_grad = _setup(name)
    benchmark.group = f"hutchinson-{name}-m{m}"

    def run():
        return run_provider(provider, model, loss, batch, m)

    hvp_used = ""

    with sdpa_kernel(SDPBackend.MATH):
        est = run()  # warm-up (vmap/functorch caches, allocator)
        if provider.startswith("ours"):
            hvp_used = est.info["hvp"] + (" vmap" if est.info["vectorize"] else " per probe")

        def timed():
            out = run()
            if DEVICE.startswith("cuda"):
                torch.cuda.synchronize()
            return out

        benchmark.pedantic(timed, rounds=ROUNDS, iterations=1, warmup_rounds=0)
        peak_mb = peak_memory_bytes(run, DEVICE) / 2**20
        info = {"device": DEVICE, "threads": torch.get_num_threads(), "numel": sum(p.numel() for p in
                                                                                  model.parameters()),
                "grad_ms": t_grad * 1e3, "probe_over_grad": benchmark.stats.stats.min / m / t_grad,
                "peak_mem_mb": peak_mb, "hvp": hvp_used}
        if provider == "ours":
            pct, t_ra, t_hvp, ppp = _overhead(model, loss, batch, m)
            info.update(overhead_pct=pct, rng_acc_ms_per_pass=t_ra * 1e3, hvp_ms_per_pass=t_hvp * 1e3,
                        probes_per_pass=ppp)
    benchmark.extra_info.update(info)
    RESULTS[(name, m, provider)] = dict(info, seconds=benchmark.stats.stats.min)


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    if not RESULTS:
        return
    header = ("| model | m | provider | HVP | s (min) | probe/grad | peak MB | vs dense: speed-up | vs dense: memory | "
              "RNG+acc % of HVP |")
    rows, lines = [], [header, "|---|---|---|---|---|---|---|---|---|---|"]
    for (name, m, prov), r in sorted(RESULTS.items()):
        d = RESULTS.get((name, m, "dense"))
        sp = d["seconds"] / r["seconds"] if d else float("nan")
        mem = r["peak_mem_mb"] / d["peak_mem_mb"] if d and d["peak_mem_mb"] > 0 else float("nan")
        rows.append(dict(r, model=name, m=m, provider=prov, speedup_vs_dense=sp, mem_vs_dense=mem))
        oh = f"{r['overhead_pct']:.1f}" if "overhead_pct" in r else ""
        lines.append(f"| {name} | {m} | {prov} | {r['hvp']} | {r['seconds']:.4f} | {r['probe_over_grad']:.2f} | "
                     f"{r['peak_mem_mb']:.1f} | {sp:.2f}x | {mem:.2f}x | {oh} |")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    tag = f"{DEVICE.split(':')[0]}{'_full' if FULL else ''}"
    head = (f"Hutchinson benchmark on {platform.node()} ({DEVICE}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {'full' if FULL else 'quick'} sizes)\n\n")
    (out / f"hessian_{tag}.md").write_text(head + "\n".join(lines) + "\n")
    (out / f"hessian_{tag}.json").write_text(json.dumps(rows, indent=1))
    print("\n" + head + "\n".join(lines))
