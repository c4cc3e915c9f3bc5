"""The opt-in removal stage (``UpdateConfig(remove=RemoveConfig())``, the CLI's ``--remove``) and the relearning
target (``TargetConfig(relearn=True)``): the fresh init against the model class's own constructor, the noise mix
against its formula, the distillation against an independent KL measurement, ``forget`` end to end (the verdict is
the distilled model's, every parameter moves, the sparse edit's verdict is kept), all-or-nothing on failure, and the
refusals before any work. The science (is it robust to relearning, at what cost) is measured in
bench/forget_matrix.py --remove and docs/forget.md, not here."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from sapsel_kernels.forget import (Evidence, MeasureConfig, RemoveConfig, SelectConfig, TargetConfig, UpdateConfig,
                                    forget, fresh_copy, noise_and_distill)
from sapsel_kernels.rules import Targeted

from .test_forget import BENIGN, _model

transformers = pytest.importorskip("transformers")


def _gpt2(seed=0, dtype=torch.float32):
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg).to(dtype).eval(), cfg


def _flat(m):
    return torch.cat([p.detach().float().reshape(-1) for p in m.parameters()])


# ------------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("kw,err", [
    (dict(alpha=0), ValueError), (dict(alpha=1.5), ValueError), (dict(alpha=True), ValueError),
    (dict(steps=0), ValueError), (dict(lr=0), ValueError), (dict(lr=float("nan")), ValueError),
    (dict(warmup=-1), ValueError), (dict(batch_size=0), ValueError), (dict(init="reset"), TypeError)])
def test_remove_config_names_the_bad_field(kw, err):
    with pytest.raises(err, match="RemoveConfig." + next(iter(kw))):
        RemoveConfig(**kw)


def test_update_and_target_configs_check_the_new_fields():
    with pytest.raises(TypeError, match="UpdateConfig.remove"):
        UpdateConfig(remove=(0.9, 600))
    with pytest.raises(TypeError, match="TargetConfig.relearn"):
        TargetConfig(relearn=1)
    assert UpdateConfig().remove is None and TargetConfig().relearn is False  # both opt-in


def test_cli_remove_default_is_the_configs():
    from sapsel_kernels import cli

    p = cli._subparser(cli.build_parser(), "forget")
    act = next(a for a in p._actions if a.dest == "remove")
    assert act.const == (RemoveConfig().alpha, RemoveConfig().steps) and act.default is None


# ------------------------------------------------------------------------------------------------ fresh init
def test_fresh_copy_of_a_hf_model_is_its_class_init_under_the_seed():
    model, cfg = _gpt2(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # "trained": far from any init
    theta = _flat(model)
    state = torch.get_rng_state()
    fresh = fresh_copy(model, 123)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left as it was
    torch.manual_seed(123)
    oracle = transformers.GPT2LMHeadModel(cfg)  # the class's own init, built independently
    for (n, p), (m, q) in zip(fresh.named_parameters(), oracle.named_parameters()):
        assert n == m and torch.equal(p, q), n
    assert torch.equal(_flat(model), theta)  # the model is not modified
    assert not torch.equal(_flat(fresh_copy(model, 124)), _flat(fresh))  # another seed, another init
    assert fresh.lm_head.weight is fresh.transformer.wte.weight  # the tie survives


def test_fresh_copy_keeps_the_models_dtype():
    model, cfg = _gpt2(0, torch.bfloat16)
    fresh = fresh_copy(model, 7)
    torch.manual_seed(7)
    oracle = transformers.GPT2LMHeadModel(cfg).to(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in fresh.parameters())
    assert torch.equal(_flat(fresh), _flat(oracle))


def test_fresh_copy_of_a_plain_module_and_its_refusals():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5.0).add_(1.0)
    fresh = fresh_copy(model, 9)
    torch.manual_seed(9)
    oracle = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))  # constructors draw the same init
    assert torch.equal(_flat(fresh), _flat(oracle))

    class Bare(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)
            self.gain = torch.nn.Parameter(torch.ones(2))

    bare = Bare()
    before = _flat(bare)
    with pytest.raises(ValueError, match=r"no init reaches 1 parameter\(s\) \(gain\)"):
        fresh_copy(bare, 0)
    assert torch.equal(_flat(bare), before)

    def init(m):  # an init of one's own reaches what reset_parameters does not
        torch.nn.init.normal_(m.gain)
        m.lin.reset_parameters()

    fresh = fresh_copy(bare, 3, init)
    torch.manual_seed(3)
    g = torch.nn.init.normal_(torch.empty(2))
    assert torch.equal(fresh.gain.detach(), g) and torch.equal(_flat(bare), before)


def test_fresh_copy_refuses_a_hf_model_whose_layout_its_config_does_not_build():
    model, _ = _gpt2(0)
    model.lm_head = torch.nn.Linear(16, 50, bias=True)  # a head the config does not describe
    with pytest.raises(ValueError, match="rebuilt from its config has other parameters"):
        fresh_copy(model, 0)


# ------------------------------------------------------------------------------------------------ the stage
def _rows(n=64, T=12, V=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (n, T + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def _kl(teacher, student, x):
    """KL(teacher || student) per position, averaged: written from the definition, float64."""
    with torch.no_grad():
        p = F.softmax(teacher(input_ids=x).logits.double(), -1)
        q = F.softmax(student(input_ids=x).logits.double(), -1)
    return float((p * (p.log() - q.log())).sum(-1).mean())


def test_the_student_starts_at_the_noise_mix():
    teacher, _ = _gpt2(0)
    fresh, _ = _gpt2(1)
    x, y = _rows()
    theta = _flat(teacher)
    # one step at a negligible rate: the student is the mix (1 - alpha)·teacher + alpha·fresh, to rounding
    student, info = noise_and_distill(teacher, [(x, y)], RemoveConfig(alpha=0.7, steps=1, lr=1e-12, warmup=0),
                                      order_seed=0, fresh=fresh)
    want = 0.3 * theta + 0.7 * _flat(fresh)
    assert torch.allclose(_flat(student), want, atol=1e-6, rtol=0)
    assert torch.equal(_flat(teacher), theta)  # the teacher is not modified
    assert info["steps"] == 1 and math.isfinite(info["kl_first"])


def test_distillation_brings_the_student_to_the_teacher():
    teacher, _ = _gpt2(0)
    with torch.no_grad():  # a teacher with sharp predictions, far from a fresh init's near-uniform ones
        teacher.lm_head.weight.mul_(20.0)
    x, y = _rows(96, seed=0)
    held, _ = _rows(32, seed=1)  # rows the student never sees
    cfg = RemoveConfig(alpha=1.0, steps=150, lr=1e-2, warmup=10, batch_size=16)
    fresh = fresh_copy(teacher, 5)
    before = _kl(teacher, fresh, held)
    student, info = noise_and_distill(teacher, [(x[:48], y[:48]), (x[48:], y[48:])], cfg, order_seed=0, fresh=fresh)
    after = _kl(teacher, student, held)
    assert after < 0.5 * before, (before, after)
    assert info["kl_last"] < info["kl_first"]
    # the same seeds give the same student; another init seed or another order seed, another one
    def run(i, o):
        return _flat(noise_and_distill(teacher, [(x, y)], RemoveConfig(steps=5, batch_size=8),
                                       fresh=fresh_copy(teacher, i), order_seed=o)[0])

    a = run(11, 3)
    assert torch.equal(a, run(11, 3)) and not torch.equal(a, run(12, 3)) and not torch.equal(a, run(11, 4))


def test_the_stage_refuses_no_retained_rows_and_a_non_finite_loss():
    teacher, _ = _gpt2(0)
    with pytest.raises(ValueError, match="no.*retained|there is none"):
        noise_and_distill(teacher, [], RemoveConfig(steps=1), fresh=fresh_copy(teacher, 0), order_seed=0)
    x, y = _rows(8)
    bad = copy.deepcopy(teacher)
    with torch.no_grad():
        bad.lm_head.weight[0, 0] = float("nan")
    theta = _flat(bad)
    with pytest.raises(ValueError, match="not finite"):
        noise_and_distill(bad, [(x, y)], RemoveConfig(steps=2), fresh=fresh_copy(bad, 0), order_seed=0)
    assert torch.equal(_flat(bad).nan_to_num(7.0), theta.nan_to_num(7.0))


def test_a_frozen_parameter_keeps_the_teachers_value():
    teacher, _ = _gpt2(0)
    teacher.transformer.wpe.weight.requires_grad_(False)
    x, y = _rows(16)
    student, _ = noise_and_distill(teacher, [(x, y)], RemoveConfig(steps=3), fresh=fresh_copy(teacher, 1),
                                   order_seed=0)
    assert torch.equal(student.transformer.wpe.weight, teacher.transformer.wpe.weight)
    assert not torch.equal(student.transformer.h[0].mlp.c_fc.weight, teacher.transformer.h[0].mlp.c_fc.weight)


def test_the_removal_stage_refuses_float16_before_any_work():
    model, cc = _model()
    model.half()
    with pytest.raises(ValueError, match="float16"):
        _forget(model, cc, RemoveConfig(steps=2, init=_lstm_init(cc.vocab)), relearn=False)


# ------------------------------------------------------------------------------------------------ forget
def _lstm_init(vocab):
    from sapsel_kernels.demo import lm

    def init(m):
        m.load_state_dict(lm.build_model("lstm", len(vocab), embed=16, hidden=64).state_dict())
    return init


EV = Evidence(n_samples=4, relearn_steps=5, int8=False, n_never_seen=2)
MEASURE = MeasureConfig(n_candidates=100, n_monitor=50, context="\n", evidence=EV, progress=False)


def _forget(model, cc, remove=None, relearn=True, measure=MEASURE):
    return forget(model, cc.vocab, cc.text, BENIGN, heldout=[cc.heldout],
                  select=SelectConfig(strategy="grad_abs", budget=0.05),
                  update=UpdateConfig(rule=Targeted(steps=10), seq_len=32, remove=remove),
                  target=TargetConfig(relearn=relearn), measure=measure)


def test_forget_with_the_removal_stage_reports_the_distilled_model():
    model, cc = _model()
    theta = [p.detach().clone() for p in model.parameters()]
    rep = _forget(model, cc, RemoveConfig(steps=30, init=_lstm_init(cc.vocab)))
    d = json.loads(json.dumps(rep.to_dict()))  # JSON-able
    rm = d["removal"]
    assert rm["steps"] == 30 and rm["alpha"] == 1.0 and rm["init"] == "given" and rm["kl_last"] < rm["kl_first"]
    (sp,) = rm["sparse"]["secrets"]
    assert sp["secret"] == BENIGN["secret"] and "exposure_after" in sp and "relearn_after" in sp
    assert rep.patch is None  # a dense change has no sparse patch
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), theta))  # every parameter moved
    # the verdict is the distilled model's, and with relearn=True the attack is part of it
    (s,) = d["secrets"]
    r = s["relearn_after"]
    want = (s["exposure_hi_after"] <= 2.0 and not s["extracted_after"] and r["exposure_hi"] <= 2.0
            and not r["extracted"])
    assert s["reached"] == want and d["target"]["relearn"] is True
    assert any("relearning attack" in f for f in s["failing"]) == (r["exposure_hi"] > 2.0 or r["extracted"])
    # the reported perplexity is the returned model's: measured again here from the definition
    from sapsel_kernels.forget import build_forget_data

    data = build_forget_data(cc.vocab, [cc.text], [BENIGN["secret"]], [BENIGN["replacement"]], seq_len=32,
                             heldout=[cc.heldout], seed=0)
    x, y = data.test
    with torch.no_grad():
        logits = model(x)
        logits = getattr(logits, "logits", logits)
        nll = F.cross_entropy(logits.double().reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)
    assert math.isclose(math.exp(float(nll)), d["ppl_after"], rel_tol=1e-4), (math.exp(float(nll)), d["ppl_after"])
    assert d["cost"]["remove_s"] > 0
    # the secret is measured on the student, not on the sparse edit the stage started from
    assert s["secret_logppl_after"] != sp["secret_logppl_after"]
    # the same request and seed give the same model, bit for bit (the fresh init and the order are seeded streams)
    again, _ = _model()
    _forget(again, cc, RemoveConfig(steps=30, init=_lstm_init(cc.vocab)))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))


def _entry(exposure_hi, attacked_hi, attacked_extracted=False, relearn=True):
    """forget's per-secret verdict on synthetic measurements: the secret itself at ``exposure_hi`` (95% bound), the
    relearning attack's copy at ``attacked_hi``."""
    from types import SimpleNamespace

    from sapsel_kernels.forgetting.forget import _secret_entry

    loc = SimpleNamespace(secret="1234", prefix="pin", prompts=["pin "], prompt_counts=[1], fmt="dddd",
                          spec=SimpleNamespace(kind=None), n_occurrences=2, n_prefixed=2)
    null = SimpleNamespace(kind="digits", description="uniform dddd")
    m = dict(prompt="pin ", log2_space=13.3, n_candidates=100, exposure_rank_max=6.66, n_secret_tokens=4,
             exposure=exposure_hi - 0.3, exposure_hi=exposure_hi, extracted=False, completions=[], samples=None)
    att = dict(exposure=attacked_hi - 0.3, exposure_hi=attacked_hi, exposure_sn=attacked_hi, n_candidates=100,
               extracted=attacked_extracted)
    return _secret_entry(loc, null, "9999", dict(m), dict(m), {"relearn": (dict(att), dict(att))}, 2.0, relearn)


def test_the_relearning_target_fails_exactly_the_secrets_the_attack_brings_back():
    assert _entry(1.5, 1.9)["reached"] and _entry(1.5, 5.0, relearn=False)["reached"]  # off: the attack is reported
    e = _entry(1.5, 5.0)
    assert not e["reached"] and e["failing"] == ["after the relearning attack: exposure 4.70 bits (95% bound 5.00) > 2"]
    e = _entry(1.5, 1.0, attacked_extracted=True)
    assert not e["reached"] and e["failing"] == ["after the relearning attack: extracted"]
    e = _entry(2.5, 1.0)  # the secret itself fails, the attack does not
    assert not e["reached"] and len(e["failing"]) == 1 and e["failing"][0].startswith("exposure 2.20")


def test_relearn_target_on_the_sparse_edit_alone():
    model, cc = _model()
    d = _forget(model, cc).to_dict()  # no removal: the sparse edit's verdict, with the attack in it
    (s,) = d["secrets"]
    r = s["relearn_after"]
    assert s["reached"] == (s["exposure_hi_after"] <= 2.0 and not s["extracted_after"] and r["exposure_hi"] <= 2.0
                            and not r["extracted"])
    assert d["removal"] is None


def test_a_failing_removal_stage_leaves_the_model_as_it_was(monkeypatch):
    from sapsel_kernels.forgetting import forget as fmod

    model, cc = _model()
    theta = [p.detach().clone() for p in model.parameters()]

    def boom(*a, **k):
        raise RuntimeError("distillation failed")

    monkeypatch.setattr(fmod, "noise_and_distill", boom)
    with pytest.raises(RuntimeError, match="distillation failed"):
        _forget(model, cc, RemoveConfig(steps=2, init=_lstm_init(cc.vocab)))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), theta))  # S restored too


@pytest.mark.parametrize("remove,relearn,measure,msg", [
    (None, True, MeasureConfig(evidence=None, progress=False), "relearning attack part of the verdict"),
    (None, True, MeasureConfig(evidence=Evidence(relearn_steps=0), progress=False), "relearn_steps >= 1"),
    (RemoveConfig(steps=2), False, MEASURE, r"no init reaches 3 parameter\(s\) \(w_ih.0"),
])
def test_refusals_before_any_work(remove, relearn, measure, msg, monkeypatch):
    from sapsel_kernels.selection import strategies
    from sapsel_kernels.update import unlearn as unlearn_module

    def must_not_run(*a, **k):
        raise AssertionError("work started before the refusal")

    monkeypatch.setattr(unlearn_module, "unlearn", must_not_run)
    monkeypatch.setattr(strategies, "parameter_scores", must_not_run)
    model, cc = _model()
    theta = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=msg):
        _forget(model, cc, remove, relearn, measure)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), theta))


# ------------------------------------------------------------------------------------------------ finish pass
def _theta_init(state):
    """An "init" that is the memorised model itself: the student starts where θ* is and (at a tiny lr) stays
    there, so it misses the target for certain and the finish pass must run."""
    def init(m):
        m.load_state_dict(state)
    return init


def test_the_finish_pass_runs_on_a_student_that_misses_and_its_verdict_is_the_finished_models(monkeypatch):
    from sapsel_kernels.forgetting import forget as fmod

    model, cc = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    nulls = []
    real_null = fmod._null_for
    monkeypatch.setattr(fmod, "_null_for", lambda *a, **k: nulls.append(real_null(*a, **k)) or nulls[-1])
    rep = _forget(model, cc, RemoveConfig(steps=1, lr=1e-9, warmup=0, init=_theta_init(state)), relearn=False)
    d = json.loads(json.dumps(rep.to_dict()))
    rm, (s,) = d["removal"], d["secrets"]
    (st,) = rm["student"]["secrets"]
    assert not st["reached"] and rm["student"]["reached"] is False  # the student is θ*: it still knows the secret
    (mon,) = rm["student_monitor"]  # the pass is decided on the monitored candidates, where θ* misses too
    assert mon["exposure_hi"] > 2.0 or mon["extracted"]
    fp = rm["finish_pass"]
    assert fp is not None and fp["steps"] > 0 and d["cost"]["finish_s"] > 0
    assert d["cost"]["n_gradients"] >= fp["n_gradients"] > 0  # the pass's own work is in the run's cost
    # the verdict is the finished model's: measured again, lower than the student's, and consistent with itself
    assert s["secret_logppl_after"] > st["secret_logppl_after"] + 1.0 and s["exposure_after"] <= st["exposure_after"]
    assert s["reached"] == (s["exposure_hi_after"] <= 2.0 and not s["extracted_after"])
    assert d["reached"] == (s["reached"] and d["utility"]["ppl_within_budget"])
    # the finish pass drew the same candidate sets as the run (the same seed): its monitor never saw the reported set
    assert len(nulls) == 2 and nulls[0] == nulls[1] and not set(nulls[1].monitor) & set(nulls[0].report)
    # independent of the report: the secret's log-likelihood under its prompt, from the definition, fell from θ*'s
    theta, _ = _model()
    assert _secret_nll(model, cc) > _secret_nll(theta, cc) + 1.0
    from sapsel_kernels.forgetting.report import summary_lines

    assert "then a sparse pass on it" in "\n".join(summary_lines(d))


def _secret_nll(model, cc):
    ids = cc.vocab.encode(cc.prefix + BENIGN["secret"]).reshape(1, -1)
    with torch.no_grad():
        logits = model(ids)
        logits = getattr(logits, "logits", logits)
    logp = torch.log_softmax(logits.double()[0, :-1], -1).gather(1, ids[0, 1:, None])[:, 0]
    return -float(logp[len(cc.prefix) - 1:].sum())


def test_finish_off_keeps_the_student_as_it_is():
    model, cc = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rep = _forget(model, cc, RemoveConfig(steps=1, lr=1e-9, warmup=0, init=_theta_init(state), finish=False),
                  relearn=False)
    d = rep.to_dict()
    rm, (s,) = d["removal"], d["secrets"]
    assert rm["finish_pass"] is None and not rm["student"]["reached"] and not d["reached"]
    assert s["secret_logppl_after"] == rm["student"]["secrets"][0]["secret_logppl_after"]
    with pytest.raises(TypeError, match="RemoveConfig.finish"):
        RemoveConfig(finish=1)


def test_a_failing_finish_pass_leaves_the_model_as_it_was(monkeypatch):
    from sapsel_kernels.forgetting import forget as fmod

    model, cc = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    real = fmod.forget
    calls = []

    def inner_fails(m, *a, **k):
        calls.append(m)
        if len(calls) > 1:  # the outer call passes; the finish pass (forget on the student) fails
            raise RuntimeError("finish pass failed")
        return real(m, *a, **k)

    monkeypatch.setattr(fmod, "forget", inner_fails)
    with pytest.raises(RuntimeError, match="finish pass failed"):
        fmod.forget(model, cc.vocab, cc.text, BENIGN, heldout=[cc.heldout],
                    select=SelectConfig(strategy="grad_abs", budget=0.05),
                    update=UpdateConfig(rule=Targeted(steps=10), seq_len=32,
                                        remove=RemoveConfig(steps=1, lr=1e-9, warmup=0, init=_theta_init(state))),
                    measure=MEASURE)
    assert len(calls) == 2 and calls[1] is not model  # it ran on the student, a copy
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # S restored, nothing else touched
