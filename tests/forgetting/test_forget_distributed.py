"""``forget(..., group=)`` under torch.distributed (gloo, CPU, world 2): every rank passes the same model, text and
request; forget splits the windows (scoring, Z, Z̃, retain, held-out) over the ranks, computes one selection from
the group's scores and averages each step's gradient at S. The oracle is the same call in ONE process: the selection
must be identical, the steps and the search's decisions the same, the weights equal up to float32 summation order,
and the reported perplexities and exposures the same numbers.

Also: a rank that passes a different request makes every rank raise, with the model untouched; the objectives that
are not split raise before any model work.
"""

import os
import tempfile

import pytest
import torch

from tests.helpers.dist import run_world
from sapsel_kernels.demo import lm
from sapsel_kernels.forget import MeasureConfig, SelectConfig, TargetConfig, UpdateConfig
from sapsel_kernels.rules import Targeted

SECRET = lm.CANARY_SECRET
PREFIX = lm.CANARY_PREFIX
MEASURE = MeasureConfig(n_candidates=40, n_monitor=20, evidence=None, progress=False)


def _build(path):
    model, cc = lm.memorised_canary_lstm(6_000, 8, hidden=32, steps=150)
    torch.save({"state": model.state_dict(), "cc": cc}, path)


def _load(path):
    blob = torch.load(path, weights_only=False)
    cc = blob["cc"]
    model = lm.build_model("lstm", len(cc.vocab), embed=16, hidden=32)
    model.load_state_dict(blob["state"])
    return model, cc


OTHER = "4242 1717"  # a second secret, written into the text (never trained on: at a 5-bit target met from the start)


def _run(model, cc, group=None, *, seed=3, strategy="ssd", hessian_windows=16, rule=None, target=None,
         two_secrets=False, batch_size=8, **update):
    """forget on the fixture: 10 steps (a check every 5; or ``rule``), budget 0.05, 40 reported and 20 monitored
    candidates, no attacks, forget's target (or ``target``); ``update``: UpdateConfig fields beside the rule and the
    batches of 8 (or ``batch_size``). ``two_secrets``: OTHER written into the text twice and forgotten too."""
    from sapsel_kernels.forget import forget

    text, request = cc.text, {"secret": SECRET, "prefix": PREFIX}
    if two_secrets:
        cut = [text.index("\n", f * len(text) // 3) + 1 for f in (1, 2)]
        text = text[:cut[0]] + f"code {OTHER}\n" + text[cut[0]:cut[1]] + f"code {OTHER}\n" + text[cut[1]:]
        request = [request, {"secret": OTHER, "prefix": "code"}]
    rep = forget(model, cc.vocab, text, request, heldout=[cc.heldout], seed=seed,
                 select=SelectConfig(strategy=strategy, budget=0.05, hessian_windows=hessian_windows),
                 update=UpdateConfig(rule=rule or Targeted(steps=10, check_every=5), batch_size=batch_size, **update),
                 target=target or TargetConfig(), measure=MEASURE, group=group)
    s = rep.secrets[0]
    return {"flat": torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
            "k": rep.k, "steps": rep.cost["steps"], "stopped_by": rep.stopped_by,
            "decisions": [(h["step"], h.get("phase"), h.get("accepted"), round(h["lr"], 12)) for h in rep.history],
            "ppl": (rep.ppl_before, rep.ppl_after, rep.val_ppl_before, rep.val_ppl_after,
                    rep.utility["ppl_increase_hi"]),  # the bound from the all-reduced window sums
            "exposure": (s["exposure_before"], s["exposure_after"]), "n_gradients": rep.cost["n_gradients"],
            "scores": rep.scores.clone() if rep.scores is not None else None,
            "precondition": rep.rule["precondition"]}


def _ranked(rank, world, path, strategy, kw=None):
    import torch.distributed as dist

    model, cc = _load(path)
    return _run(model, cc, group=dist.group.WORLD, strategy=strategy, **(kw or {}))


@pytest.fixture(scope="module")
def trained():
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.pt")
        _build(path)
        yield path


# world 3 with batches of 8: uneven shares (3/3/2 rows of the steps' batches; the hessian strategy's 24 scoring
# windows go to the ranks as whole batches, ssd's rows unevenly): the case a plain per-rank mean gets wrong. The
# default NPO term is per token (its mean over the whole batch's secret tokens); per_token=False is the batch mean's
@pytest.mark.parametrize("strategy,world,kw", [("ssd", 2, {}), ("hessian", 2, {}), ("ssd", 3, {}),
                                               ("hessian", 3, {"hessian_windows": 24}),
                                               ("ssd", 3, {"per_token": False}),
                                               # the default preconditioner ("auto": fisher, each rank computes
                                               # it on the same windows) above; without it here
                                               ("ssd", 2, {"precondition": None}),
                                               # the focused term: each rank draws from its own shard of Z
                                               ("ssd", 3, {"focus": True}),
                                               # two secrets, one met from the start, one window per rank and
                                               # batch: every rank picks the same batches by the whole batches'
                                               # owners (a batch where only one rank's row is active included)
                                               ("ssd", 3, {"focus": True, "two_secrets": True,
                                                           "rule": Targeted(steps=10, check_every=2),
                                                           "target": TargetConfig(exposure=5.0), "batch_size": 3}),
                                               # the projected step: both gradients averaged before the projection
                                               ("ssd", 3, {"rule": Targeted(steps=10, check_every=5,
                                                                            project=True)}),
                                               # (a block over the budget and a failed projected repair: a
                                               # scenario found without the preconditioner)
                                               ("ssd", 2, {"rule": Targeted(steps=20, lr=3.0, check_every=5,
                                                                            repair_steps=5, project=True),
                                                           "target": TargetConfig(max_ppl_increase=0.005),
                                                           "precondition": None}),
                                               # a block over a tight budget and its (failed) repair, world 2
                                               ("ssd", 2, {"rule": Targeted(steps=20, lr=3.0, check_every=5,
                                                                            repair_steps=5),
                                                           "target": TargetConfig(max_ppl_increase=0.005)})])
def test_forget_group_equals_one_process(trained, strategy, world, kw):
    model, cc = _load(trained)
    one = _run(model, cc, strategy=strategy, **kw)
    ranks = run_world(_ranked, world, trained, strategy, kw)
    assert one["steps"] > 0
    # the default ("auto") ran the Fisher step wherever the per-token term (focus) did, on every rank alike
    auto = kw.get("precondition", "auto") == "auto" and kw.get("per_token") is not False
    assert one["precondition"] == ("fisher" if auto else None)
    assert all(r["precondition"] == one["precondition"] for r in ranks)
    if "rule" in kw and kw["rule"].repair_steps:
        assert ("repair", False) in [d[1:3] for d in one["decisions"]]
    for r in ranks:
        # one selection, from the group's scores: the same scores (summation order aside) and the same k
        assert r["k"] == one["k"]
        # (ssd's ratio F_Z / F_D amplifies the summation order's rounding where F_D is small: 1.5e-4 relative on one
        # score of 9653 on one of the project's machines; k, every decision and the weights must still agree, below)
        torch.testing.assert_close(r["scores"], one["scores"], rtol=1e-3, atol=1e-7)
        assert r["decisions"] == one["decisions"] and r["steps"] == one["steps"]
        assert r["stopped_by"] == one["stopped_by"]
        torch.testing.assert_close(r["flat"], one["flat"], rtol=1e-4, atol=1e-5)
        for a, b in zip(r["ppl"], one["ppl"]):  # (abs: the bound on the change, a difference, is ~1e-3)
            assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
        for a, b in zip(r["exposure"], one["exposure"]):
            assert a == pytest.approx(b, abs=1e-3)
        assert r["n_gradients"] == one["n_gradients"]  # the group's count is one process's
    # the replicas are bit-identical
    assert all(torch.equal(ranks[0]["flat"], r["flat"]) for r in ranks[1:])
    # and the selection moved the model (the comparison is not between two untouched copies)
    base, _ = _load(trained)
    flat0 = torch.cat([p.detach().reshape(-1) for p in base.parameters()])
    assert (one["flat"] != flat0).sum() > 0


def _refusals(rank, world, path):
    """On every rank: a request that differs on rank 1 (another seed), then the objectives that are not split and
    the removal stage (the same on both ranks): each raises ValueError on every rank, the model untouched."""
    import torch.distributed as dist

    model, cc = _load(path)
    before = [p.detach().clone() for p in model.parameters()]
    out = []
    from sapsel_kernels.forget import RemoveConfig

    for kw in (dict(seed=3 + rank), dict(objective="calibrated"), dict(retain_loss="kl"),
               dict(remove=RemoveConfig(steps=1))):
        try:
            _run(model, cc, group=dist.group.WORLD, **kw)
        except ValueError as e:
            out.append(str(e))
        else:
            out.append(None)
    same = all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    return out, same


def test_forget_group_refusals_raise_on_every_rank(trained):
    for msgs, same in run_world(_refusals, 2, trained):
        assert msgs[0] is not None and "different request" in msgs[0], msgs[0]
        for m in msgs[1:3]:
            assert m is not None and "supports objective='npo'" in m, m
        assert msgs[3] is not None and "one process only" in msgs[3], msgs[3]  # the removal stage is not split
        assert same


def test_forget_group_needs_a_process_group():
    from sapsel_kernels.forget import forget

    model = lm.build_model("lstm", 30, embed=8, hidden=8)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises((ValueError, TypeError), match="group"):
        forget(model, lambda t: [1, 2, 3], "some text 1234", "1234", group=object())
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def _uneven_hessian(rank, world, path):
    import torch.distributed as dist

    model, cc = _load(path)
    before = [p.detach().clone() for p in model.parameters()]
    try:
        _run(model, cc, group=dist.group.WORLD, strategy="hessian")  # 16 scoring windows in 2 batches of 8
    except ValueError as e:
        msg = str(e)
    else:
        msg = None
    return msg, all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_forget_group_refuses_scoring_batches_it_cannot_share_exactly(trained):
    """Two batches of 8 over 3 ranks: neither an even split of every batch nor a batch per rank: refused on every
    rank before any model work (a per-rank batch mean would weigh 3 and 2 rows alike)."""
    for msg, same in run_world(_uneven_hessian, 3, trained):
        assert msg is not None and "cannot be shared exactly over 3 ranks" in msg, msg
        assert same
