"""The whole pipeline on a Hugging Face model: every phase in gradient units and model-size units, side by side with
what a user would otherwise run.

    python -m pytest bench/test_bench_pipeline.py --benchmark-only                       # tiny GPT-2 (seconds)
    SAPSEL_BENCH_PIPELINE=gpt2 python -m pytest bench/test_bench_pipeline.py --benchmark-only     # GPT-2 124M
    SAPSEL_BENCH_PIPELINE=llama1b python -m pytest bench/test_bench_pipeline.py --benchmark-only  # Llama-style 1.0B
    SAPSEL_BENCH_DTYPE=bfloat16 ...                                                        # bf16 weights

Models are built from config with random weights (no download): ``gpt2`` = ``GPT2Config()`` (124.4M parameters,
tied head), ``llama1b`` = a ``LlamaConfig`` of 1.03B parameters (hidden 2048, 20 layers, MLP 5632, 32 heads, 4 KV
heads, vocabulary 32000, untied head), ``tiny`` = a 2-layer GPT-2 for a smoke run. One batch of
``SAPSEL_BENCH_BATCH`` x ``SAPSEL_BENCH_SEQ`` random tokens (default 2 x 64), eager attention, eval mode. Each
phase runs once per provider (after one warm-up gradient at setup); on a shared machine interference only adds time.

Phases and providers (``ours`` = this package, the others what a user would write or install):

* ``estimate`` (m = ``SAPSEL_BENCH_PROBES`` probes, default 4): ``ours`` ``hessian_diag`` (defaults); ``ours_lean``
  the same with ``ProbeConfig(variance=False)`` (the mean alone); ``loop`` the
  create_graph loop (``tests.helpers.hessian_models.loop_hutchinson``); ``curvlinops``
  ``hutchinson_diag(HessianLinearOperator, m)`` (PyPI ``curvlinops-for-pytorch``; skipped when not installed or
  when its m x N probe matrix and products cannot fit in RAM); ``ours_ckpt`` ``hessian_diag`` with HF gradient
  checkpointing (non-reentrant).
* ``estimate_grad``: ``ours`` ``hessian_diag(estimator="squared_grad")`` on the batch, ``ours_ckpt`` the same
  with HF gradient checkpointing (what checkpointing saves for a gradient-only estimate).
* ``select`` 1 %: ``ours`` ``sk.select``; ``topk`` ``torch.topk(sorted=False)``.
* ``first_order``, ``second_order`` (``cg_iters`` = ``SAPSEL_BENCH_CG``, default 2, tolerance 0 so every step
  runs), ``diag_newton`` (``diag`` given), ``sam_finetune`` and ``gradient_ascent`` (``SAPSEL_BENCH_STEPS`` steps,
  default 2): ``ours`` ``sk.unlearn``; ``dense`` the same update written with dense masked tensors.
* ``sam_step``: ``ours`` one ``SparseSAM`` step on S; ``dense`` one masked SAM step (two gradients, dense
  perturbation and masked SGD).
* ``unit``: ``gradient`` (one forward + backward, all parameters) and ``hvp`` (one create_graph gradient + one
  double backward): the units the ratios are expressed in.

``extra_info`` per test: ``per_gradient`` (time / one gradient), ``per_target`` (time / the work the phase needs:
first_order 2 gradients, second_order 2 gradients + cg HVPs, sam_step 2 gradients, ...), ``peak_extra_model``
(peak extra memory / model bytes: on CPU the process's peak RSS over the RSS before the call, after glibc
``malloc_trim``; on CUDA the allocator peak over the allocation before). A table is written to
``bench/results/pipeline_<model>_<dtype>_<device>[_b<batch>x<seq>][_<phases>].{md,json}`` at the end of the module
(``SAPSEL_BENCH_OUT`` for another folder). ``SAPSEL_BENCH_PHASES`` runs a subset (the units always run);
``SAPSEL_BENCH_PROVIDERS`` a subset of providers; ``SAPSEL_BENCH_ROUNDS`` the rounds per test (default 3 for
``tiny``, else 1).
"""

import ctypes
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.hessian_models import loop_hutchinson

import sapsel_kernels as sk

transformers = pytest.importorskip("transformers")

MODEL = os.environ.get("SAPSEL_BENCH_PIPELINE", "tiny")
DTYPE = getattr(torch, os.environ.get("SAPSEL_BENCH_DTYPE", "float32"))
DEVICE = os.environ.get("SAPSEL_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
BATCH = int(os.environ.get("SAPSEL_BENCH_BATCH", "2"))
SEQ = int(os.environ.get("SAPSEL_BENCH_SEQ", "64"))
PROBES = int(os.environ.get("SAPSEL_BENCH_PROBES", "4"))
CG = int(os.environ.get("SAPSEL_BENCH_CG", "2"))
STEPS = int(os.environ.get("SAPSEL_BENCH_STEPS", "2"))
PHASES = os.environ.get("SAPSEL_BENCH_PHASES", "")  # comma-separated subset, empty = all
FRACTION = 0.01
ROUNDS = int(os.environ.get("SAPSEL_BENCH_ROUNDS", "3" if MODEL == "tiny" else "1"))  # the table keeps the minimum
RESULTS = {}


PROVIDERS = os.environ.get("SAPSEL_BENCH_PROVIDERS", "")  # comma-separated subset of providers, empty = all


def _wanted(phase):
    return not PHASES or phase in PHASES.split(",")


@pytest.fixture(autouse=True)
def _provider_filter(request):
    prov = getattr(request.node, "callspec", None) and request.node.callspec.params.get("provider")
    if PROVIDERS and request.node.name.split("[")[0] != "test_unit" and prov not in PROVIDERS.split(","):
        pytest.skip("provider not selected")


# ------------------------------------------------------------------------------------------------ the model
def _build():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if MODEL == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(attn_implementation="eager"))
    elif MODEL == "llama1b":
        cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=20, num_attention_heads=32,
                          num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
                          tie_word_embeddings=False, attn_implementation="eager")
        model = LlamaForCausalLM(cfg)
    elif MODEL == "tiny":
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=128,
                                           attn_implementation="eager"))
    else:
        raise ValueError(f"SAPSEL_BENCH_PIPELINE must be tiny, gpt2 or llama1b, got {MODEL!r}")
    model = model.to(device=DEVICE, dtype=DTYPE).eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    z = torch.randint(0, vocab, (BATCH, SEQ), generator=g).to(DEVICE)
    zt = z.clone()
    zt[:, SEQ // 2:] = torch.randint(0, vocab, (BATCH, SEQ - SEQ // 2), generator=g).to(DEVICE)
    return model, z, zt


def lm_loss(model, ids):
    return model(input_ids=ids, labels=ids, use_cache=False).loss


_STATE = {}


def _state():
    if not _STATE:
        model, z, zt = _build()
        space = sk.ParamSpace(model)
        n = space.numel
        k = max(1, int(FRACTION * n))
        _STATE.update(model=model, z=z, zt=zt, space=space, n=n, k=k,
                      model_bytes=sum(p.numel() * p.element_size() for p in space.params))
        _grad(model, z)  # warm-up: first-call costs (allocator, lazy initialisation) are not charged to a phase
        _hvp_once(model, z)
        RESULTS["meta"] = dict(model=MODEL, dtype=str(DTYPE).replace("torch.", ""), device=DEVICE, numel=n, k=k,
                               batch=[BATCH, SEQ], probes=PROBES, cg_iters=CG, steps=STEPS,
                               model_bytes=_STATE["model_bytes"],
                               torch=torch.__version__, threads=torch.get_num_threads(),
                               loadavg_at_start=os.getloadavg(),
                               cpu=platform.processor() or platform.machine(),
                               gpu=torch.cuda.get_device_name(0) if DEVICE.startswith("cuda") else None)
    return _STATE


def _sel(st):
    """Scores, S and the dense providers' masks, built on first use (after the estimate phases: at 1B parameters
    the N float32 scores and N bools would otherwise sit beside every estimate's peak)."""
    if "sel" not in st:
        space, n, k = st["space"], st["n"], st["k"]
        g = torch.Generator(device="cpu").manual_seed(2)
        scores = torch.randn(n, generator=g).abs_().to(DEVICE)  # |N(0,1)|: the shape of a diag(H) magnitude
        sel = sk.select(scores, k=k, space=space)
        mask = [torch.zeros_like(p, dtype=torch.bool) for p in space.params]
        local = space.split_indices(sel.indices)
        for i, name in enumerate(space.names):
            if name in local:
                mask[i].view(-1)[local[name]] = True
        st.update(scores=scores, sel=sel, mask=mask)
    return st


def _grad(model, ids):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(lm_loss(model, ids), params)


def _hvp_once(model, ids):
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.autograd.grad(lm_loss(model, ids), params, create_graph=True)
    v = [torch.randint_like(p, high=2) * 2 - 1 for p in params]
    return torch.autograd.grad(g, params, grad_outputs=v)


# ------------------------------------------------------------------------------------------------ measuring
def _sync():
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def _time_only(fn):
    _sync()
    t = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t


_LIBC = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None


def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(field)


class _Peak:
    """Peak extra memory of one call: CUDA allocator peak, or on Linux CPUs peak RSS (VmHWM, reset through
    /proc/self/clear_refs) over the RSS before the call, after gc and malloc_trim so freed heap pages are returned."""

    def start(self):
        gc.collect()
        if DEVICE.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        if _LIBC is not None:
            _LIBC.malloc_trim(0)
        self.base = _rss_kib("VmRSS:") * 1024
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def stop(self):
        if DEVICE.startswith("cuda"):
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return _rss_kib("VmHWM:") * 1024 - self.base


def _units():
    """(one gradient, one HVP) in seconds: test_unit's measurements (same conditions as every phase)."""
    unit = RESULTS.get("unit", {})
    st = _state()
    if "gradient" not in unit:
        unit["gradient"] = dict(time_s=_time_only(lambda: _grad(st["model"], st["z"])))
    if "hvp" not in unit:
        unit["hvp"] = dict(time_s=_time_only(lambda: _hvp_once(st["model"], st["z"])))
    RESULTS["unit"] = unit
    return unit["gradient"]["time_s"], unit["hvp"]["time_s"]


def _run(benchmark, phase, provider, fn, target=None, restore=None):
    """Time fn (minimum over ROUNDS) and its peak extra memory (maximum); ``target``: (gradients, HVPs) the phase
    needs, for ``per_target``."""
    st = _state()
    peak = _Peak()
    out = {}

    def setup():
        if restore is not None:
            restore()
        peak.start()

    def call():
        fn()
        _sync()
        out["peak"] = peak.stop()

    peaks = []

    def call_all():
        call()
        peaks.append(out["peak"])

    benchmark.pedantic(call_all, setup=setup, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    t = benchmark.stats.stats.min
    tg, th = _units()
    row = dict(time_s=t, per_gradient=t / tg, peak_extra_bytes=max(peaks),
               peak_extra_model=max(peaks) / st["model_bytes"])
    if target is not None:
        row["target"] = f"{target[0]} gradients + {target[1]} HVPs" if target[0] and target[1] else \
            f"{target[1]} HVPs" if target[1] else f"{target[0]} gradients"
        row["target_units"] = list(target)
        row["per_target"] = t / (target[0] * tg + target[1] * th)
    benchmark.extra_info.update(row)
    RESULTS.setdefault(phase, {})[provider] = row
    _write_table()
    if restore is not None:
        restore()


# ------------------------------------------------------------------------------------------------ units
@pytest.mark.parametrize("provider", ["gradient", "hvp"])
def test_unit(benchmark, provider):
    st = _state()
    benchmark.group = f"pipeline-{MODEL}-unit"
    fn = (lambda: _grad(st["model"], st["z"])) if provider == "gradient" else (lambda: _hvp_once(st["model"], st["z"]))
    RESULTS.setdefault("unit", {}).pop(provider, None)
    _run(benchmark, "unit", provider, fn)


# ------------------------------------------------------------------------------------------------ estimate
def _curvlinops_fits(st):
    need = 3 * PROBES * st["n"] * 4 + 4 * st["model_bytes"]  # probes, products, their einsum; graph and gradients
    if DEVICE.startswith("cuda"):
        return need < torch.cuda.get_device_properties(0).total_memory
    return need < os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@pytest.mark.parametrize("provider", ["ours", "ours_lean", "loop", "curvlinops", "ours_ckpt"])
def test_estimate(benchmark, provider):
    if not _wanted("estimate"):
        pytest.skip("phase not selected")
    st = _state()
    model, z, space = st["model"], st["z"], st["space"]
    benchmark.group = f"pipeline-{MODEL}-estimate-m{PROBES}"
    if provider == "ours":
        fn = lambda: sk.hessian_diag(model, lm_loss, [z], n_probes=PROBES, space=space, progress=False)  # noqa: E731
    elif provider == "ours_lean":  # the running mean alone (no M2): no stderr, one N float32 less
        fn = lambda: sk.hessian_diag(model, lm_loss, [z], n_probes=PROBES, space=space, progress=False,  # noqa: E731
                                     probes=sk.ProbeConfig(variance=False))
    elif provider == "ours_ckpt":
        if not hasattr(model, "gradient_checkpointing_enable"):
            pytest.skip("not a Hugging Face model")

        def fn():
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            try:
                return sk.hessian_diag(model, lm_loss, [z], n_probes=PROBES, space=space, progress=False)
            finally:
                model.gradient_checkpointing_disable()
    elif provider == "loop":
        fn = lambda: loop_hutchinson(model, lm_loss, z, PROBES)  # noqa: E731
    else:
        try:
            from curvlinops import HessianLinearOperator
            from curvlinops.diagonal.hutchinson import hutchinson_diag
        except ImportError:
            pytest.skip("curvlinops-for-pytorch is not installed")
        if not _curvlinops_fits(st):
            RESULTS.setdefault("estimate", {})["curvlinops"] = dict(skipped="m x N probe matrix + products > memory")
            pytest.skip("curvlinops' m x N probe matrix and its products do not fit in memory")
        vocab = model.config.vocab_size

        class Logits(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, ids):
                return self.m(input_ids=ids, use_cache=False).logits[:, :-1].reshape(-1, vocab)

        wrapper = Logits(model)
        params = [p for p in model.parameters() if p.requires_grad]
        data = [(z, z[:, 1:].reshape(-1))]

        def fn():
            op = HessianLinearOperator(wrapper, torch.nn.CrossEntropyLoss(), params, data,
                                       check_deterministic=False, batch_size_fn=lambda x: x.shape[0])
            return hutchinson_diag(op, PROBES)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        _run(benchmark, "estimate", provider, fn, target=(0, PROBES))


@pytest.mark.parametrize("provider", ["ours", "ours_ckpt"])
def test_estimate_gradient(benchmark, provider):
    """The gradient-only estimate (squared_grad over one batch) with and without HF gradient checkpointing: what
    checkpointing saves where it can (an HVP keeps every recomputed activation for its second backward)."""
    if not _wanted("estimate_grad"):
        pytest.skip("phase not selected")
    st = _state()
    model, z, space = st["model"], st["z"], st["space"]
    benchmark.group = f"pipeline-{MODEL}-estimate_grad"

    def fn():
        if provider == "ours_ckpt":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        try:
            return sk.hessian_diag(model, lm_loss, [z], estimator="squared_grad", space=space, progress=False)
        finally:
            model.gradient_checkpointing_disable()
    _run(benchmark, "estimate_grad", provider, fn, target=(1, 0))


# ------------------------------------------------------------------------------------------------ select
@pytest.mark.parametrize("provider", ["ours", "topk"])
def test_select(benchmark, provider):
    if not _wanted("select"):
        pytest.skip("phase not selected")
    st = _sel(_state())
    benchmark.group = f"pipeline-{MODEL}-select"
    scores, k = st["scores"], st["k"]
    fn = (lambda: sk.select(scores, k=k)) if provider == "ours" else (lambda: torch.topk(scores, k, sorted=False))
    _run(benchmark, "select", provider, fn)


# ------------------------------------------------------------------------------------------------ rules
def _dense_grad_diff(model, z, zt):
    gz = _grad(model, zt)
    go = _grad(model, z)
    return [(a - b) * BATCH for a, b in zip(gz, go)]


def _dense_first_order(st, tau=1e-3):
    model, mask = st["model"], st["mask"]
    g = _dense_grad_diff(model, st["z"], st["zt"])
    with torch.no_grad():
        for p, gi, mi in zip(model.parameters(), g, mask):
            p.sub_(tau * gi * mi)


def _dense_second_order(st, iters, lam):
    """CG on (H_SS + lam I) x = G_S with masked dense vectors; one double backward per step on the reused graph."""
    model, mask, z = st["model"], st["mask"], st["z"]
    params = list(model.parameters())
    b = [gi * mi for gi, mi in zip(_dense_grad_diff(model, z, st["zt"]), mask)]
    gr = torch.autograd.grad(lm_loss(model, z) * BATCH, params, create_graph=True)

    def hv(v):
        h = torch.autograd.grad(gr, params, grad_outputs=v, retain_graph=True)
        return [(hi + lam * vi) * mi for hi, vi, mi in zip(h, v, mask)]

    dot = lambda a, c: sum((ai * ci).sum() for ai, ci in zip(a, c))  # noqa: E731
    x = [torch.zeros_like(p) for p in params]
    r = [bi.clone() for bi in b]
    p_ = [ri.clone() for ri in r]
    rr = dot(r, r)
    for _ in range(iters):
        ap = hv(p_)
        alpha = rr / dot(p_, ap)
        x = [xi + alpha * pi for xi, pi in zip(x, p_)]
        r = [ri - alpha * ai for ri, ai in zip(r, ap)]
        rr_new = dot(r, r)
        p_ = [ri + (rr_new / rr) * pi for ri, pi in zip(r, p_)]
        rr = rr_new
    with torch.no_grad():
        for p, xi in zip(params, x):
            p.sub_(xi)


def _dense_sam_step(model, ids, mask, lr=1e-2, rho=0.05):
    params = list(model.parameters())
    g = torch.autograd.grad(lm_loss(model, ids), params)
    gm = [gi * mi for gi, mi in zip(g, mask)]
    norm = torch.sqrt(sum((x.float() ** 2).sum() for x in gm))
    e = [rho * x / (norm + 1e-12) for x in gm]
    with torch.no_grad():
        for p, ei in zip(params, e):
            p.add_(ei)
    g2 = torch.autograd.grad(lm_loss(model, ids), params)
    with torch.no_grad():
        for p, ei, gi, mi in zip(params, e, g2, mask):
            p.sub_(ei)
            p.sub_(lr * gi * mi)


def _dense_ascent(st, steps, lr=1e-2):
    model, mask = st["model"], st["mask"]
    for _ in range(steps):
        params = list(model.parameters())
        loss = lm_loss(model, st["zt"]) - lm_loss(model, st["z"])
        g = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, gi, mi in zip(params, g, mask):
                p.sub_(lr * gi * mi)


RULES = ["first_order", "second_order", "diag_newton", "sam_finetune", "gradient_ascent"]


@pytest.mark.parametrize("provider", ["ours", "dense"])
@pytest.mark.parametrize("rule", RULES)
def test_rule(benchmark, rule, provider):
    if not _wanted(rule):
        pytest.skip("phase not selected")
    st = _sel(_state())
    model, z, zt, sel, space = st["model"], st["z"], st["zt"], st["sel"], st["space"]
    benchmark.group = f"pipeline-{MODEL}-{rule}"
    lam = 0.01 * BATCH
    diag = st["scores"]
    if rule == "first_order":
        target = (2, 0)
        ours = lambda: sk.unlearn(model, lm_loss, z, zt, sel, sk.FirstOrder(tau=1e-3), space=space)  # noqa: E731
        dense = lambda: _dense_first_order(st)  # noqa: E731
    elif rule == "second_order":
        target = (2, CG)
        # the plain Newton step (no trust region, no ratio test): the same computation as the dense provider
        ours = lambda: sk.unlearn(model, lm_loss, z, zt, sel, sk.SecondOrder(  # noqa: E731
            cg_iters=CG, cg_tol=0.0, damping=lam, trust_radius=None, min_ratio=None), train_data=[z], space=space)
        dense = lambda: _dense_second_order(st, CG, lam)  # noqa: E731
    elif rule == "diag_newton":
        target = (2, 0)
        ours = lambda: sk.unlearn(model, lm_loss, z, zt, sel, sk.DiagNewton(diag=diag, damping=lam),  # noqa: E731
                                  n_train=BATCH, space=space)

        def dense():
            g = _dense_grad_diff(model, z, zt)
            with torch.no_grad():
                for p, gi, mi, d in zip(model.parameters(), g, st["mask"], space.views(diag).values()):
                    p.sub_(gi * mi / (BATCH * d.clamp_min(0) + lam))
    elif rule == "sam_finetune":
        target = (2 * STEPS, 0)
        ours = lambda: sk.unlearn(model, lm_loss, z, zt, sel, sk.SAMFinetune(steps=STEPS), space=space)  # noqa: E731

        def dense():
            for _ in range(STEPS):
                _dense_sam_step(model, zt, st["mask"])
    else:
        target = (2 * STEPS, 0)
        ours = lambda: sk.unlearn(model, lm_loss, z, zt, sel, sk.GradientAscent(steps=STEPS),  # noqa: E731
                                  space=space)
        dense = lambda: _dense_ascent(st, STEPS)  # noqa: E731
    coords = sk.rules.Coords(space, sel)  # every provider changes S only (the dense ones through the mask)
    theta = coords.snapshot()

    def restore():
        coords.restore(theta)
        for p in model.parameters():
            p.grad = None
    _run(benchmark, rule, provider, ours if provider == "ours" else dense, target=target, restore=restore)


# ------------------------------------------------------------------------------------------------ SAM step
@pytest.mark.parametrize("provider", ["ours", "dense"])
def test_sam_step(benchmark, provider):
    if not _wanted("sam_step"):
        pytest.skip("phase not selected")
    st = _sel(_state())
    model, zt, sel, space = st["model"], st["zt"], st["sel"], st["space"]
    benchmark.group = f"pipeline-{MODEL}-sam_step"
    coords = sk.rules.Coords(space, sel)
    theta = coords.snapshot()
    if provider == "ours":
        opt = sk.SparseSAM(space, sel, lr=1e-2, rho=0.05)

        def fn():
            def closure():
                loss = lm_loss(model, zt)
                loss.backward()
                return loss
            opt.step(closure)
            opt.zero_grad(set_to_none=True)
    else:
        fn = lambda: _dense_sam_step(model, zt, st["mask"])  # noqa: E731

    def restore():
        coords.restore(theta)
        for p in model.parameters():
            p.grad = None
    _run(benchmark, "sam_step", provider, fn, target=(2, 0), restore=restore)


# ------------------------------------------------------------------------------------------------ the table
def _fmt_bytes(b):
    return f"{b / 2**30:.2f} GiB" if abs(b) >= 2**30 else f"{b / 2**20:.0f} MiB"


@pytest.fixture(scope="module", autouse=True)
def _table_at_end():
    yield
    _write_table()


def _write_table():
    """Write the table (after every test: a run killed midway, e.g. by the OOM killer, keeps what it measured)."""
    if "meta" not in RESULTS:
        return
    meta = RESULTS["meta"]
    tg = RESULTS.get("unit", {}).get("gradient", {}).get("time_s", float("nan"))
    th = RESULTS.get("unit", {}).get("hvp", {}).get("time_s", float("nan"))
    meta["loadavg_at_end"] = os.getloadavg()  # (at the last test written)
    for phase, rows in RESULTS.items():  # the ratios against the final unit measurements
        for r in rows.values() if phase != "meta" else ():
            if "time_s" in r:
                r["per_gradient"] = r["time_s"] / tg
                if "target_units" in r:
                    a, b = r["target_units"]
                    r["per_target"] = r["time_s"] / (a * tg + b * th)
    out = Path(os.environ.get("SAPSEL_BENCH_OUT", Path(__file__).parent / "results"))
    out.mkdir(exist_ok=True)
    stem = f"pipeline_{meta['model']}_{meta['dtype']}_{DEVICE.split(':')[0]}"
    if SEQ != 64 or BATCH != 2:
        stem += f"_b{BATCH}x{SEQ}"
    if PHASES:
        stem += "_" + PHASES.replace(",", "+")
    if PROVIDERS:
        stem += "_" + PROVIDERS.replace(",", "+")
    cmd = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("SAPSEL_BENCH_"))
    meta["command"] = f"{cmd} python -m pytest bench/test_bench_pipeline.py --benchmark-only".strip()
    (out / f"{stem}.json").write_text(json.dumps(RESULTS, indent=1))
    lines = [f"# Pipeline benchmark: {meta['model']} ({meta['numel']:,} parameters, {meta['dtype']}, {DEVICE})", "",
             f"`{meta['command']}`; batch {meta['batch'][0]} x {meta['batch'][1]}, "
             f"m = {meta['probes']} probes, k = 1% ({meta['k']:,}), CG {meta['cg_iters']} steps, "
             f"{meta['steps']} steps for the iterative rules, minimum of {ROUNDS} round(s); "
             f"torch {meta['torch']}, {meta['threads']} threads, "
             f"{meta['gpu'] or meta['cpu']}, load average {meta['loadavg_at_start'][0]:.1f} at the start and "
             f"{meta['loadavg_at_end'][0]:.1f} at the end. One gradient = {tg:.3f} s; model = "
             f"{_fmt_bytes(meta['model_bytes'])}.", "",
             "| phase | provider | time | ÷ one gradient | the work it needs | ÷ that work | peak extra memory "
             "| ÷ model bytes |",
             "|---|---|---|---|---|---|---|---|"]
    for phase, rows in RESULTS.items():
        if phase == "meta":
            continue
        for prov, r in rows.items():
            if "skipped" in r:
                lines.append(f"| {phase} | {prov} | skipped: {r['skipped']} | | | | | |")
                continue
            if "peak_extra_bytes" not in r:  # a unit timed by _units() before its own test ran
                lines.append(f"| {phase} | {prov} | {r['time_s']:.3f} s | {r['per_gradient']:.2f} | | | | |")
                continue
            tgt = f"{r['per_target']:.2f}" if "per_target" in r else ""
            lines.append(f"| {phase} | {prov} | {r['time_s']:.3f} s | {r['per_gradient']:.2f} | "
                         f"{r.get('target', '')} | {tgt} | "
                         f"{_fmt_bytes(r['peak_extra_bytes'])} | {r['peak_extra_model']:.2f} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
