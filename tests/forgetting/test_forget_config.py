"""``forget``'s configuration (sapsel_kernels/forgetting/config.py): the signature, the deprecation shim of the
earlier flat keywords, the configs' own checks, the named seed streams, and that forget.py draws every random number
from a named stream (a static check of its source). No model is trained: a small untrained character LSTM and a few
steps are enough for the one run that is compared."""

import ast
import contextlib
import inspect
import math
import os
import random
import subprocess
import sys
import warnings

import pytest
import torch

import sapsel_kernels as sk
from sapsel_kernels.demo import lm
from sapsel_kernels.forgetting import forget as forget_module
from sapsel_kernels.forgetting.config import (FORGET_BETA, FORGET_POLISH, FORGET_PROJECT, FORGET_REPAIR,
                                              FORGET_SEQ_CAP, SEED_STREAMS, Evidence,
                                              MeasureConfig, SelectConfig, TargetConfig, UpdateConfig,
                                              configs_from_keywords, stream_seed)
from sapsel_kernels.rules import Targeted

SECRET = lm.CANARY_SECRET
PREFIX = lm.CANARY_PREFIX
TIMING = ("wall_time_s", "score_s", "unlearn_s", "monitor_s", "measure_s", "attack_s")  # cost fields in seconds


@pytest.fixture(scope="module")
def cc():
    """The canary corpus, small: about 2.9k training characters with the card number 4 times."""
    train, held = lm.load_corpus(3000)
    return lm.insert_canary(train, held, 4)


@contextlib.contextmanager
def _errors_first():
    """A refused old-keyword call raises before it warns: a FutureWarning here would be an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        yield


def _tiny(cc):
    """A fresh untrained character LSTM (1.6k parameters), the same weights at every call."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return lm.build_model("lstm", len(cc.vocab), embed=8, hidden=16)


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _comparable(rep):
    d = rep.to_dict()
    d["cost"] = {k: v for k, v in d["cost"].items() if k not in TIMING}
    return d


# ------------------------------------------------------------------------------------------------ the signature
def test_forget_signature_is_small():
    params = inspect.signature(sk.forget).parameters
    assert len(params) <= 12, list(params)
    assert sk.forget is forget_module.forget
    assert (sk.SelectConfig, sk.UpdateConfig, sk.TargetConfig, sk.MeasureConfig, sk.Targeted) == (
        SelectConfig, UpdateConfig, TargetConfig, MeasureConfig, Targeted)


# ------------------------------------------------------------------------------------------------ the shim
def test_deprecated_keywords_warn_and_give_the_same_report_as_the_configs(cc):
    """The earlier flat keywords (a FutureWarning naming every config they belong to) and the same request in config
    objects: the same report (timings aside) and bit-identical weights. Untrained model, target 0 bits (never met):
    all 6 steps run, so the weights do move."""
    old_model, new_model = _tiny(cc), _tiny(cc)
    theta0 = _flat(old_model)
    with pytest.warns(FutureWarning) as caught:
        old = sk.forget(old_model, cc.vocab, cc.text, SECRET, prefix=PREFIX, heldout=[cc.heldout], seed=5,
                        strategy="random", budget=0.05, max_steps=6, lr=0.5, check_every=2, seq_len=16,
                        target_exposure=0.0, max_ppl_increase=1.0, n_candidates=20, n_monitor=10, evidence=None,
                        progress=False)
    (w,) = [w for w in caught if issubclass(w.category, FutureWarning)]
    for name in ("select=SelectConfig(", "update=UpdateConfig(", "target=TargetConfig(", "measure=MeasureConfig(",
                 "SecretSpec", "max_steps", "prefix"):
        assert name in str(w.message), (name, str(w.message))
    assert w.filename == __file__  # the warning points at the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        new = sk.forget(new_model, cc.vocab, cc.text, {"secret": SECRET, "prefix": PREFIX}, heldout=[cc.heldout],
                        seed=5, select=SelectConfig(strategy="random", budget=0.05),
                        update=UpdateConfig(rule=Targeted(steps=6, lr=0.5, check_every=2, beta=FORGET_BETA,
                                                          repair_steps=FORGET_REPAIR, polish_steps=FORGET_POLISH,
                                                          project=FORGET_PROJECT),
                                            seq_len=16),
                        target=TargetConfig(exposure=0.0, max_ppl_increase=1.0),
                        measure=MeasureConfig(n_candidates=20, n_monitor=10, evidence=None, progress=False))
    assert new.cost["steps"] == 6 and not torch.equal(_flat(new_model), theta0)
    assert torch.equal(_flat(old_model), _flat(new_model))
    assert _comparable(old) == _comparable(new)
    assert (old.strategy, old.budget, old.rule["steps"], old.rule["lr"], old.rule["check_every"]) == (
        "random", 0.05, 6, 0.5, 2)


def _steps_on_tiny(cc, steps: int, field: str, **update):
    """forget on the tiny untrained LSTM: ``steps`` fixed steps (a check every 2, a target never met, any perplexity
    accepted), 5% random: (the weights after, the report's ``rule[field]``)."""
    model = _tiny(cc)
    rep = sk.forget(model, cc.vocab, cc.text, {"secret": SECRET, "prefix": PREFIX}, heldout=[cc.heldout], seed=5,
                    select=SelectConfig(strategy="random", budget=0.05),
                    update=UpdateConfig(rule=Targeted(steps=steps, lr=0.5, check_every=2), seq_len=16, **update),
                    target=TargetConfig(exposure=0.0, max_ppl_increase=1.0),
                    measure=MeasureConfig(n_candidates=20, n_monitor=10, evidence=None, progress=False))
    return _flat(model), rep.rule[field]


def test_per_token_default_is_per_token_for_npo_only(cc):
    """UpdateConfig(per_token=None), the default: npo runs its per-token term (the same weights, bit for bit, as
    per_token=True, and not those of per_token=False), and calibrated, which has no per-token form, runs as it did."""
    def run(**update):
        return _steps_on_tiny(cc, 4, "per_token", **update)

    assert UpdateConfig().per_token is None
    default, on, off = run(), run(per_token=True), run(per_token=False)
    assert default[1] is True and on[1] is True and off[1] is False
    assert torch.equal(default[0], on[0]) and not torch.equal(default[0], off[0])
    assert run(objective="calibrated")[1] is False
    with pytest.raises(ValueError, match="per_token applies"):
        run(objective="calibrated", per_token=True)


@pytest.mark.parametrize("keywords,rule", [
    (dict(max_steps=7), Targeted(steps=7, lr=0.1, check_every=5, lr_max=100.0, repair_steps=10, polish_steps=50,
                                 beta=0.25, project=True)),
    (dict(lr=0.5, repair_steps=3), Targeted(steps=300, lr=0.5, check_every=5, lr_max=100.0, repair_steps=3,
                                            polish_steps=50, beta=0.25, project=True)),
    (dict(lr=250.0, check_every=2), Targeted(steps=300, lr=250.0, check_every=2, lr_max=250.0, repair_steps=10,
                                             polish_steps=50, beta=0.25, project=True)),
])
def test_deprecated_step_keywords_build_the_documented_rule(keywords, rule):
    """max_steps=M, lr=L, check_every=C, repair_steps=R == Targeted(steps=M, lr=L, check_every=C,
    lr_max=max(100, L), repair_steps=R, beta=0.25), with the old defaults 300 / 0.1 / 5 and forget's defaults
    for beta (FORGET_BETA, 0.25), the repair steps (FORGET_REPAIR, 10), the polish steps (FORGET_POLISH, 50) and the
    projected steps (FORGET_PROJECT, True)."""
    none = dict(select=None, update=None, target=None, measure=None)
    with pytest.warns(FutureWarning, match="UpdateConfig"):
        secret, cfgs = configs_from_keywords(SECRET, none, keywords)
    assert secret == SECRET
    assert cfgs["update"] == UpdateConfig(rule=rule)
    assert (cfgs["select"], cfgs["target"], cfgs["measure"]) == (SelectConfig(), TargetConfig(), MeasureConfig())
    # forget's default: 300 steps, beta 0.25, 10 repair steps, 50 polish steps, projected; Targeted's other defaults
    assert UpdateConfig().rule == Targeted(steps=300, beta=0.25, repair_steps=10, polish_steps=50, project=True)
    assert (FORGET_BETA, FORGET_REPAIR, FORGET_POLISH, FORGET_PROJECT, FORGET_SEQ_CAP) == (0.25, 10, 50, True, 256)


def test_deprecated_secret_keywords_go_into_the_secret():
    none = dict(select=None, update=None, target=None, measure=None)
    with pytest.warns(FutureWarning, match="the secret as a dict or SecretSpec"):
        secret, cfgs = configs_from_keywords(SECRET, none, dict(prefix=PREFIX, replacement="r", fmt="dddd"))
    assert secret == {"secret": SECRET, "prefix": PREFIX, "replacement": "r", "format": "dddd"}
    assert cfgs == {"select": SelectConfig(), "update": UpdateConfig(), "target": TargetConfig(),
                    "measure": MeasureConfig()}
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        assert configs_from_keywords(SECRET, none, {}) == (SECRET, cfgs)  # no keyword: no warning


def test_a_keyword_with_its_config_is_refused(cc):
    model = _tiny(cc)
    theta0 = _flat(model)
    cases = [
        (dict(strategy="random", select=SelectConfig()), "strategy given both as a keyword and inside select="),
        (dict(lr=0.5, update=UpdateConfig()), "lr given both as a keyword and inside update="),
        (dict(target_exposure=1.0, target=TargetConfig()),
         "target_exposure given both as a keyword and inside target="),
        (dict(evidence=None, measure=MeasureConfig()), "evidence given both as a keyword and inside measure="),
        # as before the configs: a repair_steps that differs from the rule's
        (dict(repair_steps=5, rule=Targeted(repair_steps=2)), r"repair_steps=5 conflicts with rule.repair_steps=2"),
    ]
    for kw, match in cases:
        with _errors_first(), pytest.raises(ValueError, match=match):
            sk.forget(model, cc.vocab, cc.text, SECRET, heldout=[cc.heldout], **kw)
    # a list of secrets carries its prefixes per secret (was tests/forgetting/test_forget.py's "per secret" case)
    with _errors_first(), pytest.raises(ValueError, match="per secret"):
        sk.forget(model, cc.vocab, cc.text, [SECRET], prefix=PREFIX, heldout=[cc.heldout])
    with _errors_first(), pytest.raises(ValueError, match="prefix is empty"):
        sk.forget(model, cc.vocab, cc.text, SECRET, prefix="", heldout=[cc.heldout])
    assert torch.equal(_flat(model), theta0)


def test_the_old_rule_keyword_keeps_its_old_meaning():
    """rule=None was the old default; with rule=R the rule held the step settings (max_steps / lr / check_every were
    ignored, now with a warning) and a repair_steps of 0 or the rule's own was accepted."""
    none = {"select": None, "update": None, "target": None, "measure": None}
    with pytest.warns(FutureWarning):
        _, cfgs = configs_from_keywords(SECRET, dict(none), {"rule": None, "lr": 0.3})
    assert cfgs["update"].rule == Targeted(steps=300, lr=0.3, check_every=5, lr_max=100.0, beta=FORGET_BETA,
                                           repair_steps=FORGET_REPAIR, polish_steps=FORGET_POLISH,
                                           project=FORGET_PROJECT)
    rule = Targeted(steps=7, lr=0.2, repair_steps=2)
    for rep in (0, 2):
        with pytest.warns(FutureWarning):
            _, cfgs = configs_from_keywords(SECRET, dict(none), {"rule": rule, "repair_steps": rep})
        assert cfgs["update"].rule is rule
    with pytest.warns(UserWarning, match="lr, max_steps ignored: rule= is given"), pytest.warns(FutureWarning):
        _, cfgs = configs_from_keywords(SECRET, dict(none), {"rule": rule, "max_steps": 50, "lr": 9.0})
    assert cfgs["update"].rule is rule


def test_a_rule_with_its_own_step_scale_is_refused():
    with pytest.raises(ValueError, match="forget sets the rule's step_scale itself"):
        UpdateConfig(rule=Targeted(step_scale=torch.ones(3)))


def test_balance_changes_a_request_of_unequal_secrets_only(cc):
    """UpdateConfig(balance=True): a request whose secrets have different numbers of windows runs on the balanced
    windows (the report says so, and the weights differ from the default, balance=False); a one-secret request has
    nothing to balance and runs bit for bit as without it. A non-bool is refused."""
    other = "4242 1717"
    i = cc.text.index("\n", len(cc.text) // 2) + 1
    text = cc.text[:i] + f"code {other}\n" + cc.text[i:]

    def run(secrets, **update):
        model = _tiny(cc)
        rep = sk.forget(model, cc.vocab, text, secrets, heldout=[cc.heldout], seed=5,
                        select=SelectConfig(strategy="random", budget=0.05),
                        update=UpdateConfig(rule=Targeted(steps=4, lr=0.5, check_every=2), seq_len=16, **update),
                        target=TargetConfig(exposure=0.0, max_ppl_increase=1.0),
                        measure=MeasureConfig(n_candidates=20, n_monitor=10, evidence=None, progress=False))
        return _flat(model), rep.rule["balanced"]

    two = [{"secret": SECRET, "prefix": PREFIX}, {"secret": other, "prefix": "code"}]
    assert UpdateConfig().balance is False
    seen = {}
    real, real_data = forget_module.shard_batches, forget_module.build_forget_data

    def spy(batches, comm, what):  # the Z (affected) and Z̃ (corrected) batches the rule runs on (the first call
        seen.setdefault(what, torch.cat([b[0] for b in batches]))  # of each: focus shards Z's owners after Z)
        return real(batches, comm, what)

    def spy_data(*args, **kwargs):
        seen["data"] = real_data(*args, **kwargs)
        return seen["data"]

    forget_module.shard_batches, forget_module.build_forget_data = spy, spy_data
    try:
        on, b_on = run(two, balance=True)
    finally:
        forget_module.shard_batches, forget_module.build_forget_data = real, real_data
    off, b_off = run(two)
    assert b_on is True and b_off is False and not torch.equal(on, off)
    # balanced: each secret in about as many Z windows as the other, and every (Z, Z̃) row pair the rule runs on is
    # a pair of the data (the same window), not two windows shuffled apart
    z, zt, d = seen["affected"], seen["corrected"], seen["data"]
    assert len(z) == len(zt) > len(d.affected[0])
    per = [sum(k in d.owners[j] for x in z for j in range(len(d.owners)) if torch.equal(d.affected[0][j], x))
           for k in (0, 1)]
    assert min(per) > 0 and abs(per[0] - per[1]) <= 0.5 * max(per), per
    pairs = {(tuple(x.tolist()), tuple(c.tolist())) for x, c in zip(d.affected[0], d.corrected[0])}
    assert all((tuple(x.tolist()), tuple(c.tolist())) in pairs for x, c in zip(z, zt))
    (on, b_on), (off, b_off) = run([two[0]], balance=True), run([two[0]])
    assert b_on is False and b_off is False and torch.equal(on, off)
    with pytest.raises(TypeError, match="balance must be a bool"):
        UpdateConfig(balance=1)


def test_focus_runs_the_per_token_term_and_is_refused_elsewhere_before_any_change(cc):
    """UpdateConfig(focus=True): with one secret every Z batch holds an active token, so the focused term takes the
    batches in the rule's own order and masks nothing: without repair steps (which advance the rule's cycle but not
    the term's) the weights are bit for bit those of focus=False, and the report says focus. The default (None) is
    focus where the term is per token: the weights of focus=True and the report's focus True; with per_token=False
    or an objective without a per-token term it is off (no error). Refused, before the model is touched: a
    non-bool, focus=True with per_token=False or with an objective without a per-token term."""
    def run(**update):
        return _steps_on_tiny(cc, 6, "focus", **update)

    assert UpdateConfig().focus is None
    # (the default preconditioner, "auto", follows focus: pinned off here to compare the terms alone)
    (on, f_on), (off, f_off) = run(focus=True, precondition=None), run(focus=False, precondition=None)
    assert f_on is True and f_off is False and torch.equal(on, off)
    (default, f_def), (on_auto, _) = run(), run(focus=True)
    assert f_def is True and torch.equal(default, on_auto)
    assert not torch.equal(on, _flat(_tiny(cc)))  # the run did move the weights
    assert run(per_token=False)[1] is False and run(objective="calibrated")[1] is False
    with pytest.raises(TypeError, match="focus must be None or a bool"):
        UpdateConfig(focus=1)
    for bad, match in (({"per_token": False}, "focus applies to the per-token forget term only"),
                       ({"objective": "uniform"}, "focus applies to the per-token forget term only")):
        model = _tiny(cc)
        theta0 = _flat(model)
        with pytest.raises(ValueError, match=match):
            sk.forget(model, cc.vocab, cc.text, {"secret": SECRET, "prefix": PREFIX}, heldout=[cc.heldout],
                      update=UpdateConfig(focus=True, seq_len=16, **bad),
                      measure=MeasureConfig(n_candidates=20, n_monitor=10, evidence=None, progress=False))
        assert torch.equal(_flat(model), theta0)


def test_the_relearning_copy_is_the_same_for_the_same_seed_with_dropout():
    """relearn_copy trains in train mode: dropout draws from the global RNG, forked and seeded with the stream's
    seed, so two copies agree bit for bit and the caller's RNG state is not consumed."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(11, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 11))
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randint(0, 11, (2, 6), generator=g), torch.randint(0, 11, (2, 6), generator=g))
               for _ in range(3)]
    state = torch.random.get_rng_state()
    a = forget_module.relearn_copy(model, batches, 5, 1e-2, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = forget_module.relearn_copy(model, batches, 5, 1e-2, seed=7)
    c = forget_module.relearn_copy(model, batches, 5, 1e-2, seed=8)
    assert torch.equal(_flat(a), _flat(b))
    assert not torch.equal(_flat(a), _flat(c))


def test_the_relearning_copy_with_frozen_coordinates_moves_only_the_others():
    """relearn_copy(frozen=masks): the masked coordinates keep their values bit for bit, every other one moves as
    the attack moves it; all-False masks are the unconfined attack, all-True ones leave the copy unchanged; masks of
    the wrong shape or dtype are refused before anything runs."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(11, 8), torch.nn.Linear(8, 11))
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randint(0, 11, (2, 6), generator=g), torch.randint(0, 11, (2, 6), generator=g))
               for _ in range(3)]
    masks = [torch.rand(p.shape, generator=g) < 0.3 for p in model.parameters()]
    a = forget_module.relearn_copy(model, batches, 6, 1e-2, seed=7, frozen=masks)
    for p, q, m in zip(a.parameters(), model.parameters(), masks):
        assert torch.equal(p.detach()[m], q.detach()[m])
        assert bool((p.detach()[~m] != q.detach()[~m]).all())
    free = forget_module.relearn_copy(model, batches, 6, 1e-2, seed=7)
    none = forget_module.relearn_copy(model, batches, 6, 1e-2, seed=7,
                                      frozen=[torch.zeros_like(m) for m in masks])
    assert torch.equal(_flat(free), _flat(none))
    assert not torch.equal(_flat(free), _flat(a))
    every = forget_module.relearn_copy(model, batches, 6, 1e-2, seed=7, frozen=[torch.ones_like(m) for m in masks])
    assert torch.equal(_flat(every), _flat(model))
    class Untouchable:  # a bad mask is refused before the first step reads a batch
        def __len__(self):
            return 1

        def __getitem__(self, i):
            raise RuntimeError("a batch was read")

    bad_shapes = [masks[0], torch.zeros(5, dtype=torch.bool)] + masks[2:]
    for bad in (masks[:1], [m.float() for m in masks], [m.t() for m in masks], bad_shapes,
                [m.tolist() for m in masks]):
        with pytest.raises(ValueError, match="frozen must hold one bool mask"):
            forget_module.relearn_copy(model, Untouchable(), 6, 1e-2, seed=7, frozen=bad)


def test_unknown_keywords_wrong_config_types_and_positional_prefix_are_type_errors(cc):
    model = _tiny(cc)
    theta0 = _flat(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # refused before any deprecation warning
        with pytest.raises(TypeError, match="unexpected keyword argument 'n_steps'"):
            sk.forget(model, cc.vocab, cc.text, SECRET, n_steps=3)
        with pytest.raises(TypeError, match="unexpected keyword argument 'n_steps'"):
            sk.forget(model, cc.vocab, cc.text, SECRET, n_steps=3, budget=0.1)
        for kw, name in ((dict(select={"strategy": "random"}), "SelectConfig"),
                         (dict(update=Targeted()), "UpdateConfig"), (dict(target=0.05), "TargetConfig"),
                         (dict(measure=Evidence()), "MeasureConfig")):
            with pytest.raises(TypeError, match=f"{next(iter(kw))}= must be a sapsel_kernels.{name} or None"):
                sk.forget(model, cc.vocab, cc.text, SECRET, **kw)
        with pytest.raises(TypeError, match="positional"):  # prefix and replacement were the 5th and 6th
            sk.forget(model, cc.vocab, cc.text, SECRET, PREFIX)
        with pytest.raises(TypeError, match="positional"):
            sk.forget(model, cc.vocab, cc.text, SECRET, PREFIX, lm.BENIGN_REPLACEMENT)
    assert torch.equal(_flat(model), theta0)


# ------------------------------------------------------------------------------------------------ the configs' checks
BAD = [
    (SelectConfig, dict(strategy="nope"), ValueError, "unknown selection strategy 'nope'"),
    (SelectConfig, dict(budget="0.1"), TypeError, r"SelectConfig\.budget"),
    (SelectConfig, dict(budget=True), TypeError, r"SelectConfig\.budget"),
    (SelectConfig, dict(hessian_windows=0), ValueError, r"SelectConfig\.hessian_windows"),
    (SelectConfig, dict(n_probes=1.5), ValueError, r"SelectConfig\.n_probes"),
    (SelectConfig, dict(scores=torch.zeros(2, 3)), TypeError, r"SelectConfig\.scores"),
    (UpdateConfig, dict(objective=3), TypeError, r"UpdateConfig\.objective"),
    (UpdateConfig, dict(rule="targeted"), TypeError, r"UpdateConfig\.rule"),
    (UpdateConfig, dict(seq_len=1), ValueError, r"UpdateConfig\.seq_len"),
    (UpdateConfig, dict(batch_size=0), ValueError, r"UpdateConfig\.batch_size"),
    (UpdateConfig, dict(retain_loss="mse"), ValueError, r"UpdateConfig\.retain_loss"),
    (UpdateConfig, dict(retain_windows=-1), ValueError, r"UpdateConfig\.retain_windows"),
    (UpdateConfig, dict(per_token=1), TypeError, r"UpdateConfig\.per_token"),
    (UpdateConfig, dict(decoys=-1), ValueError, r"UpdateConfig\.decoys"),
    (UpdateConfig, dict(decoys=True), ValueError, r"UpdateConfig\.decoys"),
    (TargetConfig, dict(exposure=-0.5), ValueError, r"TargetConfig\.exposure"),
    (TargetConfig, dict(exposure=math.inf), ValueError, r"TargetConfig\.exposure"),
    (TargetConfig, dict(max_ppl_increase=-1), ValueError, r"TargetConfig\.max_ppl_increase"),
    (TargetConfig, dict(max_ppl_increase=math.nan), ValueError, r"TargetConfig\.max_ppl_increase"),
    (TargetConfig, dict(max_ppl_increase="5%"), ValueError, r"TargetConfig\.max_ppl_increase"),
    (MeasureConfig, dict(n_candidates=2), ValueError, r"MeasureConfig\.n_candidates"),
    (MeasureConfig, dict(n_monitor=2), ValueError, r"MeasureConfig\.n_monitor"),
    (MeasureConfig, dict(context=None), TypeError, r"MeasureConfig\.context"),
    (MeasureConfig, dict(evidence={"n_samples": 0}), TypeError, r"MeasureConfig\.evidence"),
    (MeasureConfig, dict(progress=1), TypeError, r"MeasureConfig\.progress"),
    (Evidence, dict(n_samples=-1), ValueError, r"Evidence\.n_samples"),
    (Evidence, dict(relearn_lr=0.0), ValueError, r"Evidence\.relearn_lr"),
    (Evidence, dict(int8=1), TypeError, r"Evidence\.int8"),
]


@pytest.mark.parametrize("cls,kw,exc,match", BAD, ids=[f"{c.__name__}-{next(iter(k))}" for c, k, _, _ in BAD])
def test_a_config_checks_its_fields_when_built(cls, kw, exc, match):
    with pytest.raises(exc, match=match):
        cls(**kw)


def test_configs_are_frozen_and_their_defaults_build():
    for cls in (SelectConfig, UpdateConfig, TargetConfig, MeasureConfig, Evidence):
        c = cls()
        with pytest.raises(AttributeError):
            setattr(c, next(iter(c.__dataclass_fields__)), None)
    assert SelectConfig(budget=-1).budget == -1  # a budget is checked against the model's N, by forget


# ------------------------------------------------------------------------------------------------ the seed streams
HASHED = ("replacement", "report", "monitor", "never_seen", "samples", "relearn", "objective", "balance", "remove")
THE_SEED = ("windows", "scoring", "strategy", "uniform_order")  # the seed itself


def _documented(stream, seed, i=0):
    return random.Random(f"sapsel:{stream}:{seed}:{i}").getrandbits(31)


def test_stream_seeds_follow_their_documented_definition():
    assert set(SEED_STREAMS) == {*HASHED, *THE_SEED, "uniform_decoys"}
    for seed in (0, 1, 3, 12345, 2**40 + 7):
        for name in SEED_STREAMS:
            assert type(stream_seed(seed, name)) is int, name
        for name in HASHED:
            assert SEED_STREAMS[name][0] == "hashed"
            for i in (0, 1, 2, 1_000_003 * 2 + 5):
                got = stream_seed(seed, name, i)
                assert got == _documented(name, seed, i) and 0 <= got < 2**31, (name, seed, i)
                assert stream_seed(seed, name, i) == got  # stable within the run
        hashed = [stream_seed(seed, name) for name in HASHED]
        assert len(set(hashed)) == len(HASHED), hashed  # independent streams for the same seed
        assert len({stream_seed(seed, "report", i) for i in range(50)}) == 50  # and per index
        for name in THE_SEED:
            assert stream_seed(seed, name) == seed, name
        assert stream_seed(seed, "uniform_decoys") == seed + 70_000
    assert stream_seed(3, "report") != stream_seed(4, "report")


def test_stream_seeds_are_the_same_in_another_process_with_another_hash_seed():
    """A str seed is hashed by random.Random with SHA-512, not Python's randomised str hash."""
    code = ("from sapsel_kernels.forgetting.config import SEED_STREAMS, stream_seed\n"
            "print([stream_seed(s, n, i) for s in (0, 7) for n in sorted(SEED_STREAMS) for i in "
            "((0, 3) if SEED_STREAMS[n][0] == 'hashed' else (0,))])")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": root}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    here = [stream_seed(s, n, i) for s in (0, 7) for n in sorted(SEED_STREAMS)
            for i in ((0, 3) if SEED_STREAMS[n][0] == "hashed" else (0,))]
    assert out.strip() == str(here)


def test_stream_seed_refuses_unknown_streams_and_indices_of_unhashed_ones():
    with pytest.raises(ValueError, match="unknown seed stream 'nope'"):
        stream_seed(0, "nope")
    with pytest.raises(ValueError, match="unknown seed stream"):
        stream_seed(0, "Report")
    for name in (*THE_SEED, "uniform_decoys"):
        with pytest.raises(ValueError, match="has no index"):
            stream_seed(0, name, 1)
        assert stream_seed(4, name, 0) == stream_seed(4, name)


# ------------------------------------------------------------------------------------------------ forget.py's draws
FORGET_PY = inspect.getsourcefile(forget_module)
GENERATORS = ("manual_seed", "Random")  # torch.Generator().manual_seed(s), torch.manual_seed(s), random.Random(s)
# where the bare seed is read and every random draw of it: the forget pipeline, the nulls and the objectives
SEED_READERS = ("forget", "_null_for", "_npo", "_calibrated", "_uniform")


def _called(call):
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None


def _is_stream_seed(node):
    return isinstance(node, ast.Call) and _called(node) == "stream_seed"


def _argument(call, fn: ast.FunctionDef, param: str):
    """The expression ``call`` passes for ``fn``'s parameter ``param`` (None: not passed, the default is used)."""
    for k in call.keywords:
        if k.arg == param:
            return k.value
    names = [a.arg for a in fn.args.posonlyargs + fn.args.args]
    i = names.index(param) if param in names else None
    return call.args[i] if i is not None and i < len(call.args) else None


def seed_violations(source: str):
    """Where forget.py's source seeds a random generator, or passes a seed, with anything but a named stream
    (``stream_seed(...)``): a list of (line, what) (empty: none). The rules:

    1. every ``manual_seed(x)`` / ``Random(x)`` call: ``x`` is a ``stream_seed(...)`` call, or a parameter of the
       function that holds the call, and then every call of that function in the file passes a ``stream_seed(...)``
       call for that parameter (and the file calls it at least once);
    2. inside ``SEED_READERS``, every ``seed=`` keyword and every ``{"seed": ...}`` entry is a ``stream_seed(...)``
       call or a name bound to one, except ``ObjectiveRequest(seed=seed)`` (the objectives read ``req.seed``, rule 3);
    3. inside ``SEED_READERS``, the bare seed (a name ``seed`` or ``req.seed``) is read only as the first argument of
       ``stream_seed``, in the request ``forget`` compares over a group's ranks (``_agree``), as ``_null_for``'s
       ``seed`` (its draws are checked here too), as ``ObjectiveRequest``'s ``seed``, or bound to the name ``seed``
       (whose reads are then checked).
    """
    tree = ast.parse(source)
    parent = {c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
    funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    out = []

    def enclosing(node):
        while node in parent:
            node = parent[node]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                return node
        return None

    # 1. the generators
    relayed = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _called(node) in GENERATORS:
            arg = node.args[0] if node.args else None
            fn = enclosing(node)
            params = {a.arg for a in fn.args.args + fn.args.kwonlyargs} if fn is not None else set()
            if _is_stream_seed(arg):
                continue
            if isinstance(arg, ast.Name) and isinstance(fn, ast.FunctionDef) and arg.id in params \
                    and fn.name in funcs:
                relayed.add((fn.name, arg.id))
            else:
                out.append((node.lineno, f"{_called(node)}() seeded by {ast.unparse(arg) if arg else 'nothing'}"))
    for name, param in sorted(relayed):
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and _called(n) == name]
        if not calls:
            out.append((funcs[name].lineno, f"{name}() seeds a generator with its parameter {param!r} and is not "
                                            "called in the file"))
        for c in calls:
            a = _argument(c, funcs[name], param)
            if not _is_stream_seed(a):
                out.append((c.lineno, f"{name}({param}={ast.unparse(a) if a is not None else 'its default'})"))

    # 2. and 3. inside the functions that read the seed
    for fname in SEED_READERS:
        fn = funcs[fname]
        streamed = {t.id for n in ast.walk(fn) if isinstance(n, ast.Assign) and _is_stream_seed(n.value)
                    for t in n.targets if isinstance(t, ast.Name)}

        def fine(value):
            return _is_stream_seed(value) or isinstance(value, ast.Name) and value.id in streamed

        for node in ast.walk(fn):
            if isinstance(node, ast.Call):
                for k in node.keywords:
                    # ObjectiveRequest relays it to the objectives' builders; forget itself (the removal stage's
                    # finish pass) draws its streams from it by name, as this check enforces on forget
                    if k.arg == "seed" and not fine(k.value) and not (
                            _called(node) == "ObjectiveRequest"
                            or _called(node) == "forget" and isinstance(k.value, ast.Name) and k.value.id == "seed"):
                        out.append((node.lineno, f"{_called(node)}(seed={ast.unparse(k.value)})"))
            if isinstance(node, ast.Dict):
                for k, v in zip(node.keys, node.values):
                    if isinstance(k, ast.Constant) and k.value == "seed" and not fine(v):
                        out.append((node.lineno, f"{{'seed': {ast.unparse(v)}}}"))
            bare = (isinstance(node, ast.Name) and node.id == "seed" and isinstance(node.ctx, ast.Load)
                    or isinstance(node, ast.Attribute) and node.attr == "seed" and isinstance(node.ctx, ast.Load))
            if not bare:
                continue
            up = parent[node]
            if isinstance(up, ast.Call) and _called(up) == "stream_seed" and up.args and up.args[0] is node:
                continue
            if isinstance(up, (ast.List, ast.Tuple)) and isinstance(parent[up], ast.Call) \
                    and _called(parent[up]) == "_agree":
                continue
            if isinstance(up, ast.Call) and _called(up) == "_null_for" and node in up.args \
                    and _argument(up, funcs["_null_for"], "seed") is node:
                continue
            if isinstance(up, ast.keyword) and up.arg == "seed" and _called(parent[up]) in ("ObjectiveRequest",
                                                                                              "forget"):
                continue
            if fname != "forget" and isinstance(node, ast.Attribute):  # located, nulls, seed = ..., req.seed
                value = up if isinstance(up, ast.Assign) else parent[up] if isinstance(up, ast.Tuple) else None
                if isinstance(value, ast.Assign) and len(value.targets) == 1:
                    target = value.targets[0]
                    names = target.elts if isinstance(target, ast.Tuple) and isinstance(up, ast.Tuple) else [target]
                    pos = up.elts.index(node) if isinstance(up, ast.Tuple) else 0
                    if pos < len(names) and isinstance(names[pos], ast.Name) and names[pos].id == "seed":
                        continue
            out.append((node.lineno, f"the bare seed read in {fname}(): {ast.unparse(up)[:80]}"))
    return out


def _source():
    with open(FORGET_PY, encoding="utf-8") as f:
        return f.read()


def test_forget_draws_every_random_number_from_a_named_stream():
    source = _source()
    assert seed_violations(source) == []
    tree = ast.parse(source)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    # the check is not vacuous: the generators and the seeds it looks at are there
    assert sum(_called(c) in GENERATORS for c in calls) >= 4
    assert sum(_is_stream_seed(c) for c in calls) >= 12
    funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    seeded = [k for n in ast.walk(funcs["forget"]) if isinstance(n, ast.Call) for k in n.keywords if k.arg == "seed"]
    assert len(seeded) >= 5


def _without(source: bytes, call: ast.Call) -> str:
    """``source`` with ``call`` (a ``stream_seed(seed, ...)`` call) replaced by its first argument, the bare seed."""
    starts = [0]
    for line in source.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    a = starts[call.lineno - 1] + call.col_offset  # ast offsets are UTF-8 byte offsets
    b = starts[call.end_lineno - 1] + call.end_col_offset
    arg = call.args[0]
    first = source[starts[arg.lineno - 1] + arg.col_offset:starts[arg.end_lineno - 1] + arg.end_col_offset]
    return (source[:a] + first + source[b:]).decode("utf-8")


def test_the_stream_check_finds_every_stream_seed_turned_back_into_the_bare_seed():
    """Mutation check of the test above: each ``stream_seed(x, ...)`` call of forget.py, one at a time, replaced by
    ``x`` (the seed used bare, as before the streams were named) is reported."""
    source = _source()
    raw = source.encode("utf-8")
    stream_calls = [n for n in ast.walk(ast.parse(source)) if _is_stream_seed(n)]
    assert len(stream_calls) >= 12
    for call in stream_calls:
        mutated = _without(raw, call)
        assert mutated.count("stream_seed(") == source.count("stream_seed(") - 1
        assert seed_violations(mutated), f"line {call.lineno}: {ast.unparse(call)} -> the bare seed, not reported"
    # a generator seeded by a constant, or by a parameter that no caller fills with a stream
    for old, new in (('manual_seed(stream_seed(seed, "uniform_order"))', "manual_seed(0)"),
                     ("torch.Generator().manual_seed(seed)", "torch.Generator().manual_seed(steps)")):
        assert source.count(old) == 1, old
        assert seed_violations(source.replace(old, new)), new


# ------------------------------------------------------------------------------------------- precondition="fisher"
def test_retain_fisher_scale_against_a_loop_written_from_its_definition(cc):
    """s_i ∝ 1 / (F_i + mean F) on S, mean 1; F = the mean over the retained windows of the squared per-window
    gradient of the mean token loss. The oracle: one backward per window on a copy, float64, read at S by flat
    index (no Coords)."""
    from sapsel_kernels.rules import Coords
    from sapsel_kernels.selection import as_selection
    from sapsel_kernels.space import ParamSpace

    model = _tiny(cc)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, len(cc.vocab), (5, 12), generator=g)
    y = torch.randint(0, len(cc.vocab), (5, 12), generator=g)
    space = ParamSpace(model)
    idx = torch.sort(torch.randperm(space.numel, generator=g)[:40]).values
    coords = Coords(space, as_selection(idx, space))
    grads_before = [p.grad for p in model.parameters()]
    scale, used = forget_module.retain_fisher_scale(model, coords, (x, y), n_windows=4)
    assert used == 4 and all(p.grad is None for p in model.parameters()) and grads_before == [None] * len(grads_before)

    oracle = lm.build_model("lstm", len(cc.vocab), embed=8, hidden=16).double()
    oracle.load_state_dict(model.state_dict())
    fisher = torch.zeros(len(idx), dtype=torch.float64)
    for i in range(4):
        oracle.zero_grad()
        logits = oracle(x[i:i + 1])
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[i]).backward()
        flat = torch.cat([p.grad.reshape(-1) for p in oracle.parameters()])
        fisher += flat[idx] ** 2
    fisher /= 4
    expect = 1.0 / (fisher + fisher.mean())
    expect /= expect.mean()
    torch.testing.assert_close(scale.double(), expect, rtol=2e-4, atol=1e-6)
    assert float(scale.mean()) == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ValueError, match="needs retained windows"):
        forget_module.retain_fisher_scale(model, coords, (x[:0], y[:0]), n_windows=4)


def test_precondition_is_checked_when_the_config_is_built():
    assert UpdateConfig(precondition="fisher").precondition == "fisher"
    assert UpdateConfig().precondition == "auto"
    with pytest.raises(ValueError, match="precondition must be 'auto', None or 'fisher'"):
        UpdateConfig(precondition="adam")
    with pytest.raises(ValueError, match="base='sgd'"):
        UpdateConfig(precondition="fisher", rule=Targeted(base="adamw"))
    UpdateConfig(rule=Targeted(base="adamw"))  # "auto" is never refused: it resolves to none there


def test_forget_with_precondition_runs_and_counts_its_gradients(cc):
    """The step differs from the plain one (the scale is used) and its gradients are counted. The default, "auto",
    is "fisher" bit for bit with an SGD rule and the per-token term (focus), and none with AdamW (where the scale
    does not apply) or the batch mean's term (not measured with it); the report says which ran."""
    reps, weights = {}, {}
    for pre, base, per_token in ((None, "sgd", None), ("fisher", "sgd", None), ("auto", "sgd", None),
                                 ("auto", "adamw", None), (None, "adamw", None), ("auto", "sgd", False)):
        model = _tiny(cc)
        reps[pre, base, per_token] = sk.forget(model, cc.vocab, cc.text, {"secret": SECRET, "prefix": PREFIX},
                                    heldout=[cc.heldout], select=SelectConfig(budget=0.05, hessian_windows=4),
                                    update=UpdateConfig(rule=Targeted(steps=4, check_every=2, base=base), seq_len=24,
                                                        precondition=pre, per_token=per_token),
                                    target=TargetConfig(exposure=0.0),
                                    measure=MeasureConfig(n_candidates=20, n_monitor=10, evidence=None,
                                                          progress=False))
        weights[pre, base, per_token] = _flat(model)
    w = {k[:2]: v for k, v in weights.items() if k[2] is None}
    r = {k[:2]: v for k, v in reps.items() if k[2] is None}
    assert not torch.equal(w[None, "sgd"], w["fisher", "sgd"])
    assert r["fisher", "sgd"].cost["n_gradients"] > r[None, "sgd"].cost["n_gradients"]
    assert torch.equal(w["auto", "sgd"], w["fisher", "sgd"])
    assert r["auto", "sgd"].rule["precondition"] == "fisher" and r[None, "sgd"].rule["precondition"] is None
    assert torch.equal(w["auto", "adamw"], w[None, "adamw"])
    assert r["auto", "adamw"].rule["precondition"] is None
    assert reps["auto", "sgd", False].rule["precondition"] is None  # no focus (batch-mean npo): as measured, none


def test_a_diverged_perplexity_is_infinite_not_an_overflow_error():
    """A finite mean cross-entropy beyond exp's range (~709.78 nats) is an infinite perplexity (over any budget, so
    the search undoes the block), not an OverflowError that ends forget (bench/forget_matrix.py hit it)."""
    class Wrong(torch.nn.Module):
        def __init__(self, margin):
            super().__init__()
            self.margin = margin
            self.unused = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))

        def forward(self, x):  # every target token gets logit -margin, every other token 0
            return torch.nn.functional.one_hot(x, 5).double() * -self.margin + 0 * self.unused

    x = torch.randint(0, 5, (3, 4), generator=torch.Generator().manual_seed(0))
    assert forget_module.perplexity(Wrong(2000.0), (x, x)) == math.inf
    expect = math.exp(10.0 + math.log(4 + math.exp(-10.0)))  # CE = log(4 + e^-10) + 10 per token
    assert forget_module.perplexity(Wrong(10.0), (x, x)) == pytest.approx(expect, rel=1e-6)  # float32 loss
