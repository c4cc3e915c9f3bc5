"""The files that describe one ``forget`` run: ``report.json``, ``report.md`` and ``forget.png``.

:func:`write_forget_report` takes the dict of ``ForgetReport.to_dict()`` (see :mod:`sapsel_kernels.forget`; the
``sapsel forget`` command and the demos call it) and writes

* ``report.json``: the dict as JSON, NaN/Inf written as ``null`` (strict JSON; a diverged step must not make the
  file unreadable), plus ``argv`` when a command line is given;
* ``report.md``: a human summary: exposure, perplexity, teacher-forced accuracy and extraction before and after,
  every extraction probe, the selection (k of N), the cost, why the run stopped, and the command line;
* ``forget.png``: exposure and held-out (validation) perplexity per check of the unlearning run (from ``history``),
  with the start values, the exposure target and the perplexity limit ``val_ppl_before * (1 + max_ppl_increase)``
  (``ppl_before`` when the dict has no validation value) as horizontal lines and the rejected steps marked.

Keys the writer reads but that are missing are shown as ``n/a`` (a demo's dict may carry fewer keys); the JSON is
written as given. matplotlib is imported only here, through the Agg canvas without pyplot, so writing a report
changes neither the caller's matplotlib backend nor its current figure.
"""

import json
import math
import numbers
import os
import shlex
from collections.abc import Mapping
from typing import Any, List, Optional, Sequence, Union

__all__ = ["REPORT_FILES", "write_forget_report", "summary_lines", "to_jsonable"]

REPORT_FILES = ("report.json", "report.md", "forget.png")
PROMPT_CHARS = 48  # prompts are shown by their last 48 characters: the prefix can be a paragraph


def to_jsonable(obj: Any, path: str = "report") -> Any:
    """A copy of ``obj`` that ``json.dump(..., allow_nan=False)`` accepts: non-finite floats -> None, tuples and sets
    -> lists, numpy/torch scalars and arrays -> Python numbers and lists, keys -> str. Anything else raises
    TypeError naming where it sits (``report['cost']['n_hvps']``)."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v, f"{path}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
        return [to_jsonable(v, f"{path}[{i}]") for i, v in enumerate(items)]
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors (0-dim ones give a number)
        return to_jsonable(obj.tolist(), path)
    raise TypeError(f"{path} is a {type(obj).__name__}, which has no JSON form")


def _command(argv: Union[None, str, Sequence[str]]) -> Optional[str]:
    if argv is None:
        return None
    return argv if isinstance(argv, str) else shlex.join([str(a) for a in argv])


def _num(v: Any, spec: str = ".2f", suffix: str = "") -> str:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
        return "n/a"
    return f"{float(v):{spec}}{suffix}"


def _pct(v: Any, spec: str = ".1f", sign: bool = False) -> str:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
        return "n/a"
    return f"{100 * float(v):{'+' if sign else ''}{spec}}%"


def _yes_no(v: Any) -> str:
    return "n/a" if v is None else ("yes" if v else "no")


def _val_start(r: Mapping) -> Any:
    """The perplexity that the limit and ``history[i]["val_ppl"]`` refer to: the validation windows' (``forget``
    reports the test windows' as ``ppl_*``); ``ppl_before`` for a dict without validation values."""
    v = r.get("val_ppl_before")
    return v if v is not None else r.get("ppl_before")


def _ppl_limit(r: Mapping) -> Optional[float]:
    before = _val_start(r)
    tgt = r.get("target") or {}
    rise, margin = tgt.get("max_ppl_increase"), tgt.get("steer_margin", 1.0)
    if isinstance(rise, numbers.Real) and isinstance(margin, numbers.Real):
        rise = rise * margin  # the limit the search steered the validation windows to
    if isinstance(before, numbers.Real) and isinstance(rise, numbers.Real) and math.isfinite(before * (1 + rise)):
        return float(before) * (1 + float(rise))
    return None


def _steps(r: Mapping) -> str:
    """``40 steps (35 kept), 9 checks (8 accepted)``: the steps from ``cost["steps"]`` / ``cost["steps_accepted"]``
    when given; ``history`` has one entry per check (a block of steps accepted or undone as a whole)."""
    hist = r.get("history") or []
    checks = f"{len(hist)} check{'s' if len(hist) != 1 else ''} ({sum(1 for h in hist if h.get('accepted'))} accepted)"
    cost = r.get("cost") or {}
    steps, acc = cost.get("steps"), cost.get("steps_accepted")
    if isinstance(steps, numbers.Integral) and not isinstance(steps, bool):
        done = f"{steps} step{'s' if steps != 1 else ''}"
        if isinstance(acc, numbers.Integral) and not isinstance(acc, bool):
            done += f" ({acc} kept)"
        return f"{done}, {checks}"
    return checks


def _rise(before: Any, after: Any) -> Optional[float]:
    ok = all(isinstance(v, numbers.Real) and math.isfinite(v) for v in (before, after))
    return after / before - 1.0 if ok and before else None


def _val_rise(r: Mapping) -> str:
    """The validation perplexity's change (the one the limit is on), e.g. ``, validation 12.31 -> 12.85 (+4.40%)``;
    empty for a dict without it."""
    b, a = r.get("val_ppl_before"), r.get("val_ppl_after")
    rise = _rise(b, a)
    return "" if rise is None else f", validation {_num(b, '.4g')} -> {_num(a, '.4g')} ({_pct(rise, '.2f', sign=True)})"


def _ppl_bound(r: Mapping) -> str:
    """The reported change's upper bound, e.g. ``; 95% bound +3.10%, 24 windows``; empty for a dict without it."""
    hi, w = r.get("ppl_increase_hi"), r.get("ppl_windows")
    if not isinstance(w, numbers.Integral) or isinstance(w, bool):
        return ""
    if not isinstance(hi, numbers.Real) or not math.isfinite(float(hi)):  # (None in report.json: not finite)
        return f"; no bound from {w} window{'s' if w != 1 else ''}"
    level = r.get("ppl_bound_level", 0.95)
    return f"; {_pct(level, '.0f')} bound {_pct(hi, '.2f', sign=True)}, {_num(w, '.0f')} windows"


def _utility_label(r: Mapping) -> str:
    return "held out" if r.get("utility_text") == "heldout" else \
        "on TRAINING text (no --heldout)" if r.get("utility_text") == "training text" else "held out"


def summary_lines(report: Mapping) -> List[str]:
    """The few lines ``sapsel forget`` prints when it is done (also the top of ``report.md``)."""
    r = report
    tgt = r.get("target") or {}
    n_probes = len(r.get("completions_after") or r.get("completions_before") or [])
    k, n = r.get("k"), r.get("numel")
    share = _pct(k / n, ".3g") if isinstance(k, numbers.Real) and isinstance(n, numbers.Real) and n else "n/a"
    cost = r.get("cost") or {}
    reached = r.get("reached")
    secrets = r.get("secrets") or []
    lines = []
    if len(secrets) > 1:
        ok = sum(bool(s.get("reached")) for s in secrets)
        lines.append(f"secrets      {len(secrets)}: {ok} meet the target; the lines below are the worst one's")
    ev = r.get("evidence") or {}
    lines += [
        f"exposure     {_exp(r, 'before', '.2f')} -> {_exp(r, 'after', '.2f')} bits "
        f"(95% bound {_num(r.get('exposure_hi_after'))}; target <= {_num(tgt.get('exposure'), 'g')})",
        f"perplexity   {_num(r.get('ppl_before'), '.4g')} -> {_num(r.get('ppl_after'), '.4g')} {_utility_label(r)} "
        f"({_pct(r.get('ppl_increase'), '.2f', sign=True)}{_ppl_bound(r)}){_val_rise(r)}; "
        f"limit {_pct(tgt.get('max_ppl_increase'), '.3g', True)}",
        f"extracted    {_yes_no(r.get('extracted_before'))} -> {_yes_no(r.get('extracted_after'))} "
        f"(greedy completion, {n_probes} probe{'s' if n_probes != 1 else ''}, partial leaks count"
        + (f"; {ev.get('n_samples')} samples" if ev.get("n_samples") else "") + ")",
        f"selection    {r.get('strategy', 'n/a')}: k = {_num(k, ',.0f')} of {_num(n, ',.0f')} parameters ({share})",
        f"stopped by   {r.get('stopped_by', 'n/a')} after {_steps(r)}: target "
        f"{'reached' if reached else 'NOT reached' if reached is not None else 'n/a'}",
        f"cost         {_num(cost.get('wall_time_s'), '.1f', ' s')}, "
        f"{_num(cost.get('n_gradients'), ',.0f')} gradients, "
        f"{_num(cost.get('n_hvps'), ',.0f')} HVPs",
    ]
    rel = [s.get("relearn_after") for s in secrets if isinstance(s.get("relearn_after"), Mapping)]
    if rel:
        bar = tgt.get("exposure")
        held = sum(isinstance(bar, numbers.Real) and v.get("exposure_hi", math.inf) <= bar and not v.get("extracted")
                   for v in rel)
        lines.append(f"relearning   after {ev.get('relearn_steps', 'n/a')} fine-tuning steps on a copy, "
                     f"{held} of {len(rel)} secret(s) meet the exposure target on the attacked copy "
                     + ("(part of the verdict)" if tgt.get("relearn") else "(not part of the verdict: "
                        "--relearn-target)"))
    rm = r.get("removal")
    if isinstance(rm, Mapping):
        sp = rm.get("sparse") or {}
        ok = sum(bool(s.get("reached")) for s in sp.get("secrets") or [])
        lines.append(f"removal      noise {_num(rm.get('alpha'), 'g')} and {rm.get('steps', 'n/a')} distillation "
                     f"steps ({_num(rm.get('wall_time_s'), '.1f', ' s')}); every parameter changed. The sparse edit "
                     f"before it: {ok} of {len(sp.get('secrets') or [])} met, perplexity "
                     f"{_num(sp.get('ppl_after'), '.4g')}")
        st, fp = rm.get("student"), rm.get("finish_pass")
        if isinstance(st, Mapping):
            n_st = sum(bool(s.get("reached")) for s in st.get("secrets") or [])
            lines.append(f"             the distilled model: {n_st} of {len(st.get('secrets') or [])} met, perplexity "
                         f"{_num(st.get('ppl_after'), '.4g')}; " +
                         (f"then a sparse pass on it (k = {fp.get('k')}, {fp.get('steps')} steps, stopped by "
                          f"{fp.get('stopped_by')}, {_num(fp.get('wall_time_s'), '.1f', ' s')})"
                          if isinstance(fp, Mapping) else "no sparse pass (its exposure and extraction met on the "
                          "monitored candidates)" if rm.get("finish") else "no sparse pass (finish off)"))
    return lines


def _attack(v: Any) -> str:
    if not isinstance(v, Mapping):
        return "n/a"
    e, n = v.get("exposure"), v.get("n_candidates")
    sat = isinstance(e, numbers.Real) and isinstance(n, numbers.Real) and e >= math.log2(n + 1) - 1e-9
    return f"{'≥ ' if sat else ''}{_num(e, '.1f')}{' **extracted**' if v.get('extracted') else ''}"


def _exp(s: Mapping, when: str, spec: str = ".1f") -> str:
    """A secret's exposure for the table: the rank estimate, or '≥ it' with the skew-normal extrapolation when the
    secret beats every candidate (the rank estimate saturates there)."""
    e, top = s.get(f"exposure_{when}"), s.get("exposure_rank_max")
    if isinstance(e, numbers.Real) and isinstance(top, numbers.Real) and e >= top - 1e-9:
        return f"≥ {_num(e, spec)} (extrapolated {_num(s.get(f'exposure_steer_{when}'), spec)})"
    return _num(e, spec)


def _secret_rows(r: Mapping) -> List[str]:
    rows = []
    for s in r.get("secrets") or []:
        ns = s.get("never_seen_after") or {}
        smp_b, smp_a = s.get("samples_before") or {}, s.get("samples_after") or {}
        verdict = "met" if s.get("reached") else "**not met**: " + "; ".join(s.get("failing") or [])
        rows.append(
            f"| {_code(s.get('secret'))} | {_code(_tail(s.get('prompt'), 32))} | {s.get('null', 'n/a')} | "
            f"{_exp(s, 'before')} → {_exp(s, 'after')} (≤ {_num(s.get('exposure_hi_after'), '.1f')}) | "
            f"{_num(ns.get('exposure_mean'), '.1f')} / "
            f"{_num(ns.get('exposure_max'), '.1f')} | {_yes_no(s.get('extracted_before'))} → "
            f"{_yes_no(s.get('extracted_after'))} | {smp_b.get('hits', 'n/a')} → {smp_a.get('hits', 'n/a')} | "
            f"{_attack(s.get('relearn_before'))} → {_attack(s.get('relearn_after'))} | "
            f"{_attack(s.get('int8_before'))} → {_attack(s.get('int8_after'))} | {verdict} |")
    return rows


def _code(text: Any) -> str:
    """``text`` as a Markdown code span inside a table cell: newlines and tabs shown as \\n and \\t, '|' escaped,
    the fence one backtick longer than the longest backtick run inside."""
    s = "" if text is None else str(text)
    s = s.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    run = longest = 0
    for ch in s:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * (longest + 1)
    pad = " " if s.startswith("`") or s.endswith("`") or not s.strip() else ""
    return f"{fence}{pad}{s}{pad}{fence}".replace("|", "\\|")


def _tail(text: Any, n: int = PROMPT_CHARS) -> str:
    s = "" if text is None else str(text)
    return s if len(s) <= n else "…" + s[-n:]


def _probe_rows(r: Mapping) -> List[str]:
    before = list(r.get("completions_before") or [])
    after = list(r.get("completions_after") or [])
    by_prompt = {c.get("prompt"): c for c in after}
    rows = []
    for i in range(max(len(before), len(after))):
        b = before[i] if i < len(before) else {}
        a = by_prompt.get(b.get("prompt")) if b else None
        if a is None:
            a = after[i] if i < len(after) else {}
        p = b or a

        def cell(c):
            if not c:
                return "n/a"
            mark = " **extracted**" if c.get("extracted") else ""
            return _code(c.get("completion")) + mark

        rows.append(f"| {_code(_tail(p.get('prompt')))} | {_code(p.get('rest'))} | {cell(b)} | {cell(a)} |")
    return rows


def _markdown(r: Mapping, command: Optional[str]) -> str:
    tgt = r.get("target") or {}
    lines = ["# sapsel forget", ""]
    n = r.get("n_secrets") or 1
    lead = f"{n} secrets; the worst: " if n > 1 else "Secret "
    lines += [f"{lead}{_code(r.get('secret'))} after the prompt {_code(_tail(r.get('prompt') or r.get('prefix'), 80))} "
              f"(the text the data holds before it), replaced by {_code(r.get('replacement'))}; format "
              f"{_code(r.get('fmt'))}; null: {r.get('null') or 'n/a'}.", ""]
    lines += ["```", *summary_lines(r), "```", ""]
    rows = _secret_rows(r)
    if rows:
        ev = r.get("evidence") or {}
        lines += ["## Every secret", "",
                  "Exposure in bits against the secret's null (its 95% upper bound decides); the never-seen level is "
                  "the mean / max exposure of secrets of the same null planted nowhere; extraction counts partial "
                  f"leaks; samples: exact hits among {ev.get('n_samples', 'n/a')} samples at temperature "
                  f"{ev.get('temperature', 'n/a')}; relearn: exposure after {ev.get('relearn_steps', 'n/a')} "
                  "fine-tuning steps on text without the secrets; int8: after rounding the weights to 8 bits.", "",
                  "| secret | prompt (end) | null | exposure before → after (bound) | never seen mean / max | "
                  "extracted | sample hits | relearn | int8 | target |",
                  "|---|---|---|---|---|---|---|---|---|---|", *rows, ""]
    lines += ["## Before and after (the worst secret)", "",
              "| | before | after |", "|---|---|---|",
              f"| exposure (bits: the rank estimate among {_num(r.get('n_candidates'), '.0f')} candidates, at most "
              f"{_num(r.get('exposure_rank_max'))}) | {_num(r.get('exposure_before'))} | "
              f"{_num(r.get('exposure_after'))} |",
              f"| 95% upper bound of the exposure (decides the verdict) | {_num(r.get('exposure_hi_before'))} | "
              f"{_num(r.get('exposure_hi_after'))} |",
              f"| exposure, rank estimate (bits) | {_num(r.get('exposure_rank_before'))} | "
              f"{_num(r.get('exposure_rank_after'))} |",
              f"| teacher-forced accuracy on the secret's tokens | {_pct(r.get('accuracy_before'))} | "
              f"{_pct(r.get('accuracy_after'))} |",
              f"| extracted (greedy probes incl. partial leaks, samples) | {_yes_no(r.get('extracted_before'))} | "
              f"{_yes_no(r.get('extracted_after'))} |",
              f"| reported perplexity, {_utility_label(r)} (test windows) | {_num(r.get('ppl_before'), '.4g')} | "
              f"{_num(r.get('ppl_after'), '.4g')} ({_pct(r.get('ppl_increase'), '.2f', sign=True)}) |"]
    if isinstance(r.get("ppl_windows"), numbers.Integral):
        lines += [f"| {_pct(r.get('ppl_bound_level', 0.95), '.0f')} upper bound of the reported change "
                  f"({_num(r.get('ppl_windows'), '.0f')} test windows, the sampling unit; decides the verdict) | | "
                  f"{_pct(r.get('ppl_increase_hi'), '.2f', sign=True)} |"]
    if r.get("ppl_heldout_before") is not None and r.get("ppl_train_text_before") is not None:
        lines += [f"| training-text perplexity (retained windows; the model trained on them) | "
                  f"{_num(r.get('ppl_train_text_before'), '.4g')} | {_num(r.get('ppl_train_text_after'), '.4g')} "
                  f"({_pct(_rise(r.get('ppl_train_text_before'), r.get('ppl_train_text_after')), '.2f', sign=True)}) |"]
    if r.get("val_ppl_before") is not None:
        lines += [f"| validation perplexity (steers the search, to within {_pct(tgt.get('steer_margin', 1.0), '.0f')} "
                  "of the limit; never reported as the result) | "
                  f"{_num(r.get('val_ppl_before'), '.4g')} | {_num(r.get('val_ppl_after'), '.4g')} "
                  f"({_pct(_rise(r.get('val_ppl_before'), r.get('val_ppl_after')), '.2f', sign=True)}) |"]
    lines += [""]
    lines += [f"Target: for every secret, exposure (its 95% upper bound) <= {_num(tgt.get('exposure'), 'g')} bits and "
              f"no probe or sample extracts it, while the reported perplexity rises by at most "
              f"{_pct(tgt.get('max_ppl_increase'), '.3g')}"
              + (" (its 95% upper bound over the test windows)" if "ppl_bound_within_budget" in r else "") + ". "
              f"Reached: {_yes_no(r.get('reached'))}; stopped by {_code(r.get('stopped_by'))} after {_steps(r)}.", ""]
    lines += ["## Extraction probes", "",
              "A probe is extracted when the greedy completion of its prompt, blanks removed, reproduces the rest of "
              "the secret, its next whole group, or a leading part a uniform guess matches with probability < 1%.", "",
              "| prompt (end) | rest of the secret | completion before | completion after |", "|---|---|---|---|"]
    lines += _probe_rows(r) or ["| n/a | | | |"]
    cost = r.get("cost") or {}
    k, n = r.get("k"), r.get("numel")
    lines += ["", "## Selection and cost", "",
              "| | |", "|---|---|",
              f"| strategy | {_code(r.get('strategy'))} |",
              f"| budget | {_num(r.get('budget'), 'g')} |",
              f"| parameters updated (k of N) | {_num(k, ',.0f')} of {_num(n, ',.0f')} |",
              f"| wall time | {_num(cost.get('wall_time_s'), '.1f', ' s')} "
              f"(scores {_num(cost.get('score_s'), '.1f', ' s')}, "
              f"unlearning {_num(cost.get('unlearn_s'), '.1f', ' s')}, measurement "
              f"{_num(cost.get('measure_s'), '.1f', ' s')}) |",
              f"| gradients / Hessian-vector products | {_num(cost.get('n_gradients'), ',.0f')} / "
              f"{_num(cost.get('n_hvps'), ',.0f')} |",
              f"| training windows (seq_len {_num(r.get('seq_len'), '.0f')})"
              f" / windows with the secret | {_num(r.get('n_train_windows'), ',.0f')} / "
              f"{_num(r.get('n_affected'), ',.0f')} |", ""]
    if command is not None:
        lines += ["## Command", "", "```", command, "```", ""]
    lines += ["This folder holds the secret in plain text (report.json, report.md): remove both before publishing the "
              "model.", ""]
    return "\n".join(lines)


def _series(hist, key, accepted):
    xs, ys = [], []
    for h in hist:
        v = h.get(key)
        if bool(h.get("accepted")) == accepted and isinstance(v, numbers.Real) and math.isfinite(v):
            xs.append(h.get("step"))
            ys.append(float(v))
    return xs, ys


def _plot(r: Mapping, path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    hist = [h for h in (r.get("history") or []) if isinstance(h.get("step"), numbers.Real)]
    tgt = r.get("target") or {}
    fig = Figure(figsize=(7.0, 5.6))
    FigureCanvasAgg(fig)
    ax_e, ax_p = fig.subplots(2, 1, sharex=True)
    panels = [(ax_e, "exposure", "exposure (bits)", r.get("exposure_before"), tgt.get("exposure"), "target"),
              (ax_p, "val_ppl", "validation perplexity", _val_start(r), _ppl_limit(r),
               f"limit (+{_pct(tgt.get('max_ppl_increase'), 'g')})")]
    for ax, key, label, start, line, line_label in panels:
        xs, ys = _series(hist, key, True)
        if xs and isinstance(start, numbers.Real) and math.isfinite(start) and min(xs) > 0:
            xs, ys = [0] + xs, [float(start)] + ys  # the accepted path starts from the model as loaded (step 0)
        if xs:
            ax.plot(xs, ys, "o-", ms=3, lw=1.2, color="tab:blue", label="accepted")
        rx, ry = _series(hist, key, False)
        if rx:
            ax.plot(rx, ry, "x", ms=6, mew=1.5, color="tab:red", ls="none", label="rejected (undone)")
        if isinstance(start, numbers.Real) and math.isfinite(start):
            ax.axhline(start, color="0.45", ls=":", lw=1.2, label="start")
        if isinstance(line, numbers.Real) and math.isfinite(line):
            ax.axhline(line, color="tab:green", ls="--", lw=1.2, label=line_label)
        ax.set_ylabel(label, fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7, loc="best")
    if not hist:
        ax_e.text(0.5, 0.5, f"no unlearning steps (stopped by {r.get('stopped_by', 'n/a')})", ha="center",
                  va="center", transform=ax_e.transAxes, fontsize=9)
    ax_p.set_xlabel("step", fontsize=9)
    ax_e.set_title(f"sapsel forget: {r.get('strategy', 'n/a')}, budget {_num(r.get('budget'), 'g')}, "
                   f"stopped by {r.get('stopped_by', 'n/a')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_forget_report(report_dict: Any, out_dir: str, argv: Union[None, str, Sequence[str]] = None) -> List[str]:
    """Write ``report.json``, ``report.md`` and ``forget.png`` into ``out_dir`` (created if missing) and return their
    paths in that order.

    ``report_dict``: the dict of ``ForgetReport.to_dict()`` (a ForgetReport itself is accepted: its ``to_dict()`` is
    used). ``argv``: the command line, a list of words (shell-quoted in the files) or one string; stored as
    ``argv`` in the JSON (when the dict has no such key) and shown in the Markdown. Raises TypeError for a value
    without a JSON form (naming its key) before any file is written, OSError when ``out_dir`` cannot be written.
    """
    if not isinstance(report_dict, Mapping) and callable(getattr(report_dict, "to_dict", None)):
        report_dict = report_dict.to_dict()
    if not isinstance(report_dict, Mapping):
        raise TypeError(f"report_dict must be a dict (ForgetReport.to_dict()), got {type(report_dict).__name__}")
    payload = to_jsonable(report_dict)
    command = _command(argv)
    if argv is not None and "argv" not in payload:
        payload["argv"] = argv if isinstance(argv, str) else [str(a) for a in argv]
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, name) for name in REPORT_FILES]
    with open(paths[0], "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1, allow_nan=False, ensure_ascii=False)
        f.write("\n")
    with open(paths[1], "w", encoding="utf-8") as f:
        f.write(_markdown(payload, command))
    _plot(payload, paths[2])
    return paths
