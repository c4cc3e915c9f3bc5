"""bench/forget_matrix.py's run keys: a saved run is found again (not rerun, not shadowed) under the settings it
recorded, whichever round wrote it; a setting added later keeps the old keys when it has its old value."""
import dataclasses
import glob
import json
import os

import pytest

fm = pytest.importorskip("bench.forget_matrix")
ROOT = os.path.join(os.path.dirname(__file__), "..", "bench", "results")


def test_saved_keys_are_their_settings_tags():
    files = sorted(glob.glob(os.path.join(ROOT, "forget_matrix*", "*.json")))
    assert files
    n = 0
    for fn in files:
        res = json.load(open(fn))
        for key, row in res.get("runs", {}).items():
            if key.count("/") == 1:  # the first round's "strategy/request": run_fixture appends the tag on load
                continue
            strategy, _, tag = key.split("/", 2)
            assert fm.tag_of(row["settings"], strategy) == tag, (fn, key)
            n += 1
    assert n >= 30


def test_new_settings_extend_the_tag_only_when_they_differ_from_their_old_value():
    old = {"budget": 0.05, "steps": 300, "objective": "npo", "per_token": True, "beta": 0.25, "rho": 0.0,
           "steer_margin": 0.6, "retain_loss": "ce"}
    base = fm.tag_of(old, "hessian_ratio")
    assert base == "b0.05-s300-npo-pt-beta0.25-rho0-m0.6"
    assert fm.tag_of({**old, "repair_steps": 0, "seq_len": 64}, "hessian_ratio") == base
    assert fm.tag_of({**old, "repair_steps": 0, "seq_len": 64, "polish_steps": 0}, "hessian_ratio") == base
    assert fm.tag_of({**old, "repair_steps": 10, "seq_len": 128}, "hessian_ratio") == base + "-rep10-T128"
    assert fm.tag_of({**old, "repair_steps": 10, "seq_len": 128, "polish_steps": 50}, "hessian_ratio") == \
        base + "-rep10-T128-pol50"
    assert fm.tag_of({**old, "budget": 0.01}, "all").startswith("b1-")


def test_focus_versions_have_their_own_keys():
    """The first focus version (flags from every check, True) and the fixed one (flags from kept checks, "kept")
    are different runs: a rerun of the fixed one must not overwrite the first one's record."""
    st = {"budget": 0.05, "steps": 300, "objective": "npo", "per_token": True, "beta": 0.25, "rho": 0.0,
          "steer_margin": 0.6, "retain_loss": "ce", "repair_steps": 10, "seq_len": 128, "project": True}
    first, kept = fm.tag_of({**st, "focus": True}, "hessian_ratio"), fm.tag_of({**st, "focus": "kept"}, "hessian_ratio")
    assert first.endswith("-T128-focus-proj") and kept.endswith("-T128-focusk-proj")
    assert fm.tag_of({**st, "focus": False}, "hessian_ratio").endswith("-T128-proj")
    assert "flags from kept checks" in fm.settings({"settings": {**st, "focus": "kept"}})
    assert "flags from kept checks" not in fm.settings({"settings": {**st, "focus": True}})


def test_fingerprint_tells_builds_apart():
    torch = pytest.importorskip("torch")
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    assert fm.fingerprint("t", "h", a) == fm.fingerprint("t", "h", b)  # equal weights, equal prints
    with torch.no_grad():
        b.weight[0, 0] = torch.nextafter(b.weight[0, 0], torch.tensor(9.0))  # one ulp
    assert fm.fingerprint("t", "h", a) != fm.fingerprint("t", "h", b)
    assert fm.fingerprint("t", "h", a) != fm.fingerprint("t", "h2", a)
    assert fm.fingerprint("t", "h", a) != fm.fingerprint("t2", "h", a)


def test_precondition_extends_the_key_only_when_set():
    st = {"budget": 0.05, "steps": 300, "objective": "npo", "per_token": True, "beta": 0.25, "rho": 0.0,
          "steer_margin": 0.6, "retain_loss": "ce", "repair_steps": 10, "seq_len": 128, "project": True}
    assert fm.tag_of({**st, "precondition": None}, "hessian_ratio") == fm.tag_of(st, "hessian_ratio")
    assert fm.tag_of({**st, "precondition": "fisher"}, "hessian_ratio").endswith("-proj-prefisher")


def test_figure_labels_tell_every_setting_apart():
    st = {"budget": 0.05, "steps": 300, "objective": "npo", "per_token": True, "beta": 0.25, "rho": 0.0,
          "steer_margin": 0.6, "retain_loss": "ce", "repair_steps": 10, "seq_len": 128, "polish_steps": 50,
          "project": True}
    labels = {fm.short_label("hessian_ratio", {"settings": {**st, **extra}})
              for extra in ({}, {"focus": True}, {"focus": "kept"}, {"focus": "kept", "precondition": "fisher"})}
    assert len(labels) == 4


def test_ppl_calibration_computes_z_and_coverage_from_the_recorded_errors(tmp_path):
    """Two synthetic runs: z from its definition, the coverage count, runs without the errors left out."""
    import math

    def run(rep, hi, uns, se_r, se_u, steer=0.7):
        return {"secrets": [{}] * 16, "report_ppl_change": rep, "report_ppl_change_hi": hi, "report_ppl_windows": 20,
                "ppl_change_unseen": uns, "report_ppl_se_log": se_r, "unseen_se_log": se_u,
                "settings": {"steer_margin": steer}}

    res = {"model": "m", "seed": 0, "runs": {
        "a/many/x": run(0.02, 0.05, 0.03, 0.01, 0.01), "b/many/x": run(0.02, 0.04, 0.06, 0.01, 0.02),
        "b/many/y": run(0.02, 0.04, 0.06, 0.01, 0.02, steer=0.6),  # the same run under another share: once
        "c/many/x": {"secrets": [{}], "report_ppl_change": 0.0, "ppl_change_unseen": 0.1}}}
    (tmp_path / "m_s0.json").write_text(json.dumps(res))
    md = fm.ppl_calibration(str(tmp_path))
    z1 = (math.log1p(0.03) - math.log1p(0.02)) / math.sqrt(2e-4)
    z2 = (math.log1p(0.06) - math.log1p(0.02)) / math.sqrt(5e-4)
    assert f"| {z1:+.2f} | yes |" in md and f"| {z2:+.2f} | **no** |" in md
    assert "1 of 2 bounds at or above" in md and "| c |" not in md and "| 60% |" not in md and "| 70% |" in md
    assert "1 run(s) identical to one listed counted once" in md
    sd = abs(z1 - z2) / math.sqrt(2)
    assert f"z mean {(z1 + z2) / 2:+.2f}, standard deviation {sd:.2f}" in md


def test_shipped_flags_record_the_package_defaults():
    """The bench's flags documented as "forget as shipped" give the settings the summary looks for, read from the
    package's defaults: if a default changes, this fails until the flags follow it."""
    a = fm.parser().parse_args(["--out", "x", *fm.SHIPPED_FLAGS.split()])
    st = fm.run_settings(a, a.strategies, 128)
    assert st == {**fm.shipped_settings(), "seq_len": 128}
    assert a.strategies == fm.config_strategy()
    a60 = fm.parser().parse_args(["--out", "x", *fm.SHIPPED_FLAGS.replace("--focus ", "").split()])
    assert fm.run_settings(a60, a60.strategies, 128) != st


def test_shipped_summary_finds_the_shipped_runs_and_labels_the_rest(tmp_path):
    """One fixture with the shipped 16-secret run (bound recorded), a random control only at another steering share
    and no one-secret run; one fixture without the shipped run; one fixture whose default window is another: its
    T128 runs are not the shipped ones."""
    want = fm.shipped_settings()

    def run(st, margins, extracted=0, **extra):
        ss = [{"margin": m, "extracted": i < extracted, "relearn_margin": 1.0 + i} for i, m in enumerate(margins)]
        return {"settings": st, "secrets": ss, "ppl_change_unseen": 0.031, "cost_vs_retrain": 2.5,
                "report_reached": False, "report_met": 15, "report_ppl_change": 0.02, **extra}

    st = {**want, "seq_len": 128}
    key = f"hessian_ratio/many/{fm.tag_of(st, 'hessian_ratio')}"
    other = {**st, "steer_margin": 0.6}
    rkey = f"random/many/{fm.tag_of(other, 'random')}"
    a = {"model": "m", "seed": 0, "fixture": {"n_params": 2e6, "default_window": 128},
         "runs": {key: run(st, [0.5] * 14 + [2.5, 0.0], report_ppl_change_hi=0.061),
                  rkey: run(other, [0.1] * 16, extracted=1)}}
    b = {"model": "m", "seed": 1, "fixture": {"n_params": 2e6, "default_window": 128},
         "runs": {f"hessian_ratio/many/{fm.tag_of(other, 'hessian_ratio')}": run(other, [0.0] * 16)}}
    c = {"model": "m", "seed": 2, "fixture": {"n_params": 2e6, "default_window": 64},
         "runs": {key: run(st, [0.0] * 16)}}
    for name, res in (("m_s0", a), ("m_s1", b), ("m_s2", c)):
        (tmp_path / f"{name}.json").write_text(json.dumps(res))
    md = fm.shipped(str(tmp_path))
    rows = {line.split(" | ")[0]: line for line in md.splitlines() if line.startswith("| m ")}
    assert rows["| m (2.0M) s0"].startswith("| m (2.0M) s0 | 15/16 (+2.5), 0 | +3.1% | 8.5 / 16.0 | 2.50x | "
                                            "exit 3, 15/16 (+2.0%; +6.1%) | 15/16, 1 extracted; +3.1%; 2.50x "
                                            "(steering 60%) | not run |")
    assert "not run with the shipped settings" in rows["| m (2.0M) s1"]
    a["runs"][key]["ppl_change_unseen"] = 0.0500053  # over the bar by a hair: said, not rounded away
    (tmp_path / "m_s0.json").write_text(json.dumps(a))
    assert "| +5.0% (over +5%: +5.0005%) |" in fm.shipped(str(tmp_path))
    assert "not run with the shipped settings" in rows["| m (2.0M) s2"]
    assert f"steering {100 * want['steer_margin']:.0f}%" in md


def test_the_shipped_figure_takes_every_strategy_at_the_shipped_settings_and_nothing_else(tmp_path):
    want = fm.shipped_settings()
    st = {**want, "seq_len": 128}

    def run(n_met):
        return {"settings": st, "ppl_change_unseen": 0.02,
                "secrets": [{"margin": 0.0 if i < n_met else 3.0, "extracted": False} for i in range(16)]}

    res = {"model": "m", "seed": 0, "fixture": {"n_params": 1, "default_window": 128}, "runs": {
        f"hessian_ratio/many/{fm.tag_of(st, 'hessian_ratio')}": run(16),
        f"all/many/{fm.tag_of(st, 'all')}": run(8),  # budget 1 in its key: still the shipped settings otherwise
        f"random/many/{fm.tag_of({**st, 'steer_margin': 0.6}, 'random')}": run(4),  # another share: left out
        f"random/one/{fm.tag_of(st, 'random')}": run(1)}}  # the one-secret request: left out
    (tmp_path / "m_s0.json").write_text(json.dumps(res))
    assert fm.shipped_by_strategy(str(tmp_path)) == {"m s0": {"hessian_ratio": (1.0, 2.0), "all": (0.5, 2.0)}}
    pytest.importorskip("matplotlib")
    fm.figure_shipped(str(tmp_path), str(tmp_path / "s.png"))
    assert (tmp_path / "s.png").stat().st_size > 1000


def test_selection_anatomy_runs_forget_as_the_matrix_ships_it_and_checks_its_fixtures_first(tmp_path):
    """bench/selection_anatomy.py's "as shipped" is the matrix's SHIPPED_FLAGS run (the window left to forget, which
    picks the same one on the fixtures), and an unknown fixture stops it before anything is trained or written."""
    an = pytest.importorskip("bench.selection_anatomy")
    a = fm.parser().parse_args(["--out", "x", *fm.SHIPPED_FLAGS.split()])
    mine = fm.forget_configs(an.shipped(), a.strategies, 500)
    theirs = fm.forget_configs(fm.run_settings(a, a.strategies, 128), a.strategies, 500)
    assert mine["select"] == theirs["select"] and mine["measure"] == theirs["measure"]
    assert mine["update"].seq_len is None and theirs["update"].seq_len == 128
    assert dataclasses.replace(mine["update"], seq_len=128) == theirs["update"]
    out = tmp_path / "anatomy"
    with pytest.raises(SystemExit, match="unknown fixture"):
        an.main(["--models", "gpt2,gpt3", "--out", str(out), "--cache", str(tmp_path / "cache")])
    assert not out.exists() and not (tmp_path / "cache").exists()
    assert [an.kind_of(n) for n in ("transformer.wte.weight", "lm_head.weight", "transformer.wpe.weight",
                                    "model.layers.0.input_layernorm.weight", "transformer.h.0.attn.c_attn.weight",
                                    "model.layers.1.mlp.up_proj.weight")] == \
        ["token embedding", "output head", "positions", "norms", "attention", "mlp"]
