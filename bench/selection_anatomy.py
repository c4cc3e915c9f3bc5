"""Where each strategy's S lies on issue 22's fixtures, and a causal check of why the flat reading failed on GPT-2 s0.

For a fixture of :mod:`bench.forget_matrix` (``--models``, seed ``--seed``; trained here or loaded from ``--cache``,
its fingerprint checked against the stored matrix's), per strategy: the selection ``forget`` makes at 5% (its own
scores, from one ``forget`` call with one step, and ``select_parameters`` called as ``forget`` calls it):

* the share of S per kind of tensor (token embedding / output head / positions / attention / MLP / norms);
* in the vocabulary-sized matrices: how many selected coordinates lie in rows of tokens that the training text
  never contains ("unused": a byte-level BPE keeps all 256 bytes, most of which plain text never has), and how many
  in rows of the secrets' tokens;
* ``gz_share``: the share of the secrets' squared gradient on S (the outsider's loss: each ``"PREFIX SECRET"`` line,
  mean token loss, averaged over the 16 secrets, at θ*).

With ``--drop-unused``: ``hessian_flat`` run as shipped otherwise (the matrix's ``SHIPPED_FLAGS``), its scores with
every coordinate in an unused token's row put below all others, and scored by the outsider as in the matrix
(500 candidates, greedy and sampled extraction, unseen text, the 50-step relearning attack).

    python -m bench.selection_anatomy --models gpt2,llama --out bench/results/selection_anatomy \
        --cache CACHE [--drop-unused gpt2] [--seed 1]

Writes ``OUT/anatomy.json``, one entry per fixture, and with ``--drop-unused``
``OUT/<model>_s<seed>_flat_drop_unused.json``. ``--exact-unused gpt2``: the exact diag H on the unused tokens' rows of
the tied matrix, from the definition without the package (:func:`exact_unused_diag`), to
``OUT/<model>_s<seed>_exact_unused_diag.json``.
"""

import argparse
import copy
import dataclasses
import json
import os
import sys
import time

import torch

STRATEGIES = ("hessian_flat", "hessian_ratio", "hessian", "random")
TRAIN_STEPS = {"gpt2": 1200, "llama": 1200, "gpt2_10m": 600}  # the matrix's --train-steps per model
STORED = os.path.join(os.path.dirname(__file__), "results", "forget_matrix_v4")


def shipped(**overrides):
    """The settings dict of forget as shipped (read from the package: ``bench.forget_matrix.shipped_settings``), its
    window forget's own default, with ``overrides`` (e.g. one step to see the selection)."""
    from bench import forget_matrix as fm

    return {**fm.shipped_settings(), "seq_len": None, **overrides}


def fixture(name, seed, cache):
    from bench import forget_matrix as fm

    fx = fm.load_fixture(name, seed, cache, TRAIN_STEPS[name])
    stored = json.load(open(os.path.join(STORED, f"{name}_s{seed}.json")))["fixture"]
    fp = fm.fingerprint(fx.text, fx.held, fx.theta, fx.retrained)
    if fp != stored["fingerprint"]:
        raise SystemExit(f"{name} s{seed}: this build's fingerprint {fp} is not the stored matrix's "
                         f"{stored['fingerprint']}: its numbers would not be about the same model")
    ids, _ = fm.line_starts(fx.tok, fx.text)
    used = torch.zeros(len(fx.tok), dtype=torch.bool)
    used[ids.unique()] = True
    return fx, stored, used


def secrets_gradient_sq(fx):
    """[N] float64: the squared mean gradient of the secrets' lines at θ* (the outsider's loss)."""
    from sapsel_kernels.space import ParamSpace

    m = copy.deepcopy(fx.theta)
    m.zero_grad()
    for s in fx.secrets:
        x = torch.tensor([fx.tok(f"{s['prefix']} {s['secret']}")["input_ids"]])
        (m(x, labels=x).loss / len(fx.secrets)).backward()
    return ParamSpace(m).gather("grad").double() ** 2


def request(fx):
    return [{"secret": s["secret"], "prefix": s["prefix"]} for s in fx.secrets]


def selection(fx, strategy, seed):
    """forget's own S at 5% (ascending flat indices) and its scores (None for ``random``): the scores from one
    ``forget`` call of one step (its report's), then ``select_parameters`` called as ``forget`` calls it."""
    import sapsel_kernels as sk
    from bench import forget_matrix as fm
    from sapsel_kernels.forgetting.config import stream_seed
    from sapsel_kernels.selection.strategies import STRATEGY_REGISTRY, select_parameters, strategy_arguments
    from sapsel_kernels.space import ParamSpace

    scores, k = None, None
    if STRATEGY_REGISTRY[strategy].score is not None:
        cfg = fm.forget_configs(shipped(steps=1, repair_steps=0, polish_steps=0), strategy, 50)
        rep = sk.forget(copy.deepcopy(fx.theta), fx.tok, [fx.text], request(fx), heldout=[fx.held], seed=seed, **cfg)
        scores, k = rep.scores, rep.k
    kw = {"seed": stream_seed(seed, "strategy")} if "seed" in strategy_arguments(strategy, scores=scores is not None) \
        else {}
    sel = select_parameters(fx.theta, strategy, shipped()["budget"], space=ParamSpace(fx.theta), scores=scores, **kw)
    if k is not None and sel.k != k:
        raise AssertionError(f"{strategy}: {sel.k} selected here, forget's report says k = {k}")
    return sel.indices, scores


def kind_of(name):
    for key, kind in (("wte", "token embedding"), ("embed_tokens", "token embedding"), ("lm_head", "output head"),
                      ("wpe", "positions"), ("ln", "norms"), ("norm", "norms"), ("attn", "attention")):
        if key in name:
            return kind
    return "mlp"


def anatomy(name, seed, cache):
    from sapsel_kernels.space import ParamSpace

    fx, _, used = fixture(name, seed, cache)
    sec_tokens = set()
    for s in fx.secrets:
        sec_tokens |= set(fx.tok(f"{s['prefix']} {s['secret']}\n")["input_ids"])
    gz = secrets_gradient_sq(fx)
    space = ParamSpace(fx.theta)
    params = dict(fx.theta.named_parameters())
    res = {"vocab": len(fx.tok), "unused_tokens": int((~used).sum()), "secret_tokens": len(sec_tokens),
           "n_params": sum(p.numel() for p in params.values()), "strategies": {}}
    for strategy in STRATEGIES:
        idx, _ = selection(fx, strategy, seed)
        kinds, rows = {}, {}
        for n, v in space.split_indices(idx).items():
            if not v.numel():
                continue
            kinds[kind_of(n)] = kinds.get(kind_of(n), 0) + int(v.numel())
            p = params[n]
            if p.dim() == 2 and p.shape[0] == len(fx.tok):
                r = v // p.shape[1]
                rows[n] = {"selected": int(v.numel()), "in_unused_token_rows": int((~used[r]).sum()),
                           "in_secret_token_rows": int(sum(int(i) in sec_tokens for i in r.tolist())),
                           "distinct_rows": int(r.unique().numel())}
        res["strategies"][strategy] = {"k": int(idx.numel()), "by_kind": kinds, "vocab_rows": rows,
                                       "gz_share": float(gz[idx].sum() / gz.sum())}
        print(name, strategy, json.dumps(res["strategies"][strategy]), flush=True)
    return res


def drop_unused(name, seed, cache):
    """hessian_flat as shipped, with the unused tokens' rows out of S; scored as the matrix scores a run."""
    import sapsel_kernels as sk
    from bench import forget_matrix as fm
    from sapsel_kernels.space import ParamSpace

    fx, base, used = fixture(name, seed, cache)
    scores = selection(fx, "hessian_flat", seed)[1].clone()
    space = ParamSpace(fx.theta)
    below, dropped = float(scores.min()) - 1.0, 0
    for n, p in fx.theta.named_parameters():
        if p.dim() == 2 and p.shape[0] == len(fx.tok):
            a, b = space.range_of(n)
            scores[a:b].view(p.shape)[~used] = below
            dropped += int((~used).sum()) * p.shape[1]
    cfg = fm.forget_configs(shipped(), "hessian_flat", 500)
    cfg["select"] = dataclasses.replace(cfg["select"], scores=scores)
    model = copy.deepcopy(fx.theta)
    t0 = time.perf_counter()
    rep = sk.forget(model, fx.tok, [fx.text], request(fx), heldout=[fx.held], seed=seed, **cfg)
    wall = time.perf_counter() - t0
    d = rep.to_dict()
    after = fm.outsider(model, fx.tok, fx.secrets, 500)
    rel = fm.outsider(fm.relearned(model, fx.retain_batches, 50, seed), fx.tok, fx.secrets, 500)
    sampled = [bool((e.get("samples_after") or {}).get("hits")) for e in d["secrets"]]
    margins = [a["exposure"] - r["exposure"] for a, r in zip(after, base["retrained"])]
    rmargins = [a["exposure"] - r["exposure"] for a, r in zip(rel, base["retrained_relearned"])]
    extracted = [a["extracted"] or s for a, s in zip(after, sampled)]
    return {"fixture": f"{name}_s{seed}", "dropped_coordinates": dropped, "k": d["k"],
            "met": sum(m <= 2.0 and not e for m, e in zip(margins, extracted)), "worst_margin": max(margins),
            "margins": margins, "extracted": sum(extracted),
            "ppl_change_unseen": fm.ppl(model, fx.tok, fx.unseen) / base["ppl_theta_unseen"] - 1.0,
            "stopped_by": d["stopped_by"], "steps": d["cost"]["steps"],
            "own_met": sum(bool(e["reached"]) for e in d["secrets"]), "own_reached": d["reached"],
            "report_ppl_change": d["ppl_after"] / d["ppl_before"] - 1.0,
            "relearn_margin_mean": sum(rmargins) / len(rmargins), "wall_s": wall,
            "cost_vs_retrain": wall / base["retrain_s"]}


def exact_unused_diag(name, seed, cache):
    """Written from the definition, not with the package: the exact diag of the training loss's Hessian on the rows
    of the tied token matrix whose tokens the text never has (tokenised whole here, not by the matrix's lines). For
    such a token v, z_v = w_v·h with h independent of w_v, so d²L/dw_vj² = mean_t p_vt (1 − p_vt) h_tj² (h after the
    final norm; the first 64 windows of 128 tokens). Beside it the same sum on the used rows: their output role only,
    a lower bound of their diagonal."""
    fx, _, _ = fixture(name, seed, cache)
    ids = torch.tensor(fx.tok(fx.text)["input_ids"])
    used = torch.zeros(len(fx.tok), dtype=torch.bool)
    used[ids.unique()] = True
    w = ids[: (len(ids) // 128) * 128].view(-1, 128)[:64]
    with torch.no_grad():
        out = fx.theta(w, output_hidden_states=True)
        h = out.hidden_states[-1].double().reshape(-1, out.hidden_states[-1].shape[-1])
        p = out.logits.double().softmax(-1).reshape(-1, len(fx.tok))
    diag = (p * (1 - p)).T @ (h ** 2) / h.shape[0]
    return {"unused_tokens": int((~used).sum()), "unused_rows_mean": float(diag[~used].mean()),
            "unused_rows_max": float(diag[~used].max()), "used_rows_output_part_mean": float(diag[used].mean()),
            "used_rows_output_part_median": float(diag[used].median())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="gpt2,llama")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--cache", required=True, help="where the fixtures' trained weights are (or go)")
    ap.add_argument("--drop-unused", default="", help="fixtures (comma list) to run the flat reading on without "
                                                      "the unused tokens' rows")
    ap.add_argument("--exact-unused", default="", help="fixtures (comma list, tied heads) to compute the exact diag H "
                                                      "on the unused tokens' rows for, from the definition")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    names = [m for m in a.models.split(",") if m]
    exact = [m for m in a.exact_unused.split(",") if m]
    bad = [m for m in names + exact + [m for m in a.drop_unused.split(",") if m] if m not in TRAIN_STEPS]
    if bad:  # before anything is trained or written
        raise SystemExit(f"unknown fixture(s) {bad}; known: {sorted(TRAIN_STEPS)}")
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "anatomy.json")
    res = json.load(open(path)) if os.path.isfile(path) else {}
    for name in names:
        res[f"{name}_s{a.seed}"] = anatomy(name, a.seed, a.cache)
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
    for name in [m for m in a.drop_unused.split(",") if m]:
        r = drop_unused(name, a.seed, a.cache)
        print(json.dumps(r), flush=True)
        with open(os.path.join(a.out, f"{name}_s{a.seed}_flat_drop_unused.json"), "w") as f:
            json.dump(r, f, indent=1)
    for name in exact:
        r = exact_unused_diag(name, a.seed, a.cache)
        print(name, json.dumps(r), flush=True)
        with open(os.path.join(a.out, f"{name}_s{a.seed}_exact_unused_diag.json"), "w") as f:
            json.dump(r, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
