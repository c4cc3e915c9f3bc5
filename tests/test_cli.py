"""The ``sapsel`` command line: every argument is validated before any work (usage error, exit code 2, within a few
seconds), help lists each demo task's options, ``--version``, and a closed stdout ends quietly.

No demo trains here: the grid runner and the tasks' ``prepare`` are replaced by functions that fail the test (for
invalid arguments) or stop the run at the first piece of work (for valid ones)."""

import os
import subprocess
import sys

import pytest

from sapsel_kernels import _argtypes as at
from sapsel_kernels import cli


class _Reached(Exception):
    """Raised by the stubbed grid runner: the command got past validation and started the work."""


class _Work(list):
    """The run_grid calls that got through (each a dict of its arguments); any work fails unless allow()ed."""

    allowed = False

    def allow(self):
        self.allowed = True
        return self


@pytest.fixture
def no_work(monkeypatch):
    """Training or grid work fails the test; after ``no_work.allow()`` run_grid records its call and stops."""
    from sapsel_kernels.demo import canary, common, labels

    work = _Work()

    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the arguments were validated")

    def run_grid(task, seeds, strategies, budgets, methods, **kwargs):
        if not work.allowed:
            forbidden()
        work.append({"task": task, "seeds": list(seeds), "strategies": list(strategies), "budgets": list(budgets),
                     "methods": list(methods), **kwargs})
        raise _Reached

    monkeypatch.setattr(common, "run_grid", run_grid)
    monkeypatch.setattr(labels.LabelsTask, "prepare", forbidden)
    monkeypatch.setattr(canary.CanaryTask, "prepare", forbidden)
    return work


def _usage_error(capsys, argv):
    with pytest.raises(SystemExit) as ei:
        cli.main(argv)
    err = capsys.readouterr().err
    assert ei.value.code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    assert err.lstrip().startswith("usage:"), err
    return errors[0]


@pytest.fixture
def a_file(tmp_path):
    p = tmp_path / "a_file"
    p.write_text("x")
    return p


LABELS_BAD = [
    (["--seed", "-1"], "--seed: must be an integer >= 0, got -1"),  # hessian_diag's seeds are >= 0
    (["--seed", "x"], "--seed: 'x' is not an integer"),
    (["--seeds", "0"], "--seeds: must be an integer >= 1, got 0"),
    (["--seeds", "-2"], "--seeds: must be an integer >= 1"),
    (["--probes", "0"], "--probes: must be an integer >= 1, got 0"),
    (["--threads", "0"], "--threads: must be an integer >= 1, got 0"),
    (["--threads", "two"], "--threads: 'two' is not an integer"),
    (["--epochs", "0"], "--epochs: must be an integer >= 1"),
    (["--budgets", "abc"], "--budgets: 'abc' is not a number"),
    (["--budgets", "0.01,abc"], "--budgets: item 2 of '0.01,abc': 'abc' is not a number"),
    (["--budgets", "0"], "--budgets: '0' is outside (0, 1]"),
    (["--budgets", "1.5"], "is outside (0, 1]"),
    (["--budgets", "nan"], "is not a finite number"),
    (["--budgets", "0.1,,1"], "--budgets: empty item 2"),
    (["--budgets", ","], "--budgets: expected a comma-separated list"),
    (["--budgets", "0.01,1e-2"], "--budgets: duplicate budget"),
    (["--rates", "0"], "--rates: '0' is outside (0, 1)"),
    (["--rates", "1"], "--rates: '1' is outside (0, 1)"),
    (["--strategies", "hessian,nope"], "--strategies: item 2 of 'hessian,nope': unknown strategy 'nope'"),
    (["--methods", "nope"], "--methods: unknown method 'nope'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
]

CANARY_BAD = [
    (["--seed", "-1"], "--seed: must be an integer >= 0, got -1"),
    (["--seeds", "0"], "--seeds: must be an integer >= 1"),
    (["--probes", "0"], "--probes: must be an integer >= 1"),
    (["--threads", "0"], "--threads: must be an integer >= 1"),
    (["--steps", "0"], "--steps: must be an integer >= 1"),
    (["--candidates", "0"], "--candidates: must be an integer >= 1"),
    (["--chars", "-1"], "--chars: must be an integer >= 0"),
    (["--seq-len", "1"], "--seq-len: must be an integer >= 2"),
    (["--seq-len", "500"], "--seq-len: the transformer takes at most 128 characters, got 500"),
    (["--settings", "lstm:8"], "--settings: setting 'lstm:8' must look like"),
    (["--settings", "lstm:r4,gru:r4"], "unknown model kind 'gru'"),
    (["--models", "gru", "--repeats", "4"], "--models: unknown model kind 'gru'"),
    (["--repeats", "0"], "--repeats: must be an integer >= 1"),
    (["--budgets", "abc"], "--budgets: 'abc' is not a number"),
    (["--strategies", "nope"], "--strategies: unknown strategy 'nope'"),
]


@pytest.mark.parametrize("args,msg", LABELS_BAD, ids=[" ".join(a) for a, _ in LABELS_BAD])
def test_labels_invalid_argument_is_a_fast_usage_error(capsys, no_work, tmp_path, args, msg):
    line = _usage_error(capsys, ["demo", "--task", "labels", "--out", str(tmp_path)] + args)
    assert msg in line
    assert line.startswith("sapsel demo --task labels: error:")


@pytest.mark.parametrize("args,msg", CANARY_BAD, ids=[" ".join(a) for a, _ in CANARY_BAD])
def test_canary_invalid_argument_is_a_fast_usage_error(capsys, no_work, tmp_path, args, msg):
    line = _usage_error(capsys, ["demo", "--task", "canary", "--out", str(tmp_path)] + args)
    assert msg in line
    assert line.startswith("sapsel demo --task canary: error:")


def test_default_task_is_labels_and_validated(capsys, no_work):
    assert "--seeds: must be an integer >= 1" in _usage_error(capsys, ["demo", "--seeds", "0"])


def test_unknown_task_and_info_extras(capsys):
    assert "--task: invalid choice: 'nope'" in _usage_error(capsys, ["demo", "--task", "nope"])
    assert "unrecognized arguments: --bogus" in _usage_error(capsys, ["info", "--bogus"])


@pytest.mark.parametrize("task", ["labels", "canary"])
def test_out_is_checked_before_any_work(capsys, no_work, a_file, task):
    # a file where the folder should be, and a folder below a file: both fail at once, nothing trains
    line = _usage_error(capsys, ["demo", "--task", task, "--quick", "--out", str(a_file)])
    assert "--out:" in line and "exists and is not a directory" in line
    line = _usage_error(capsys, ["demo", "--task", task, "--quick", "--out", str(a_file / "sub")])
    assert "--out:" in line and "is not a directory" in line


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write to any folder")
def test_out_in_a_read_only_folder(capsys, no_work, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        line = _usage_error(capsys, ["demo", "--quick", "--out", str(ro / "new")])
        assert "--out: cannot write to" in line
    finally:
        ro.chmod(0o700)


def test_valid_arguments_reach_the_work_unchanged(no_work, tmp_path):
    out = tmp_path / "new" / "sub"
    no_work.allow()
    with pytest.raises(_Reached):
        cli.main(["demo", "--task", "labels", "--quick", "--seed", "0", "--seeds", "2", "--probes", "1",
                  "--budgets", "0.01, 1", "--strategies", "hessian,all", "--out", str(out), "--no-progress"])
    (call,) = no_work
    assert call["seeds"] == [0, 1] and call["budgets"] == [0.01, 1.0] and call["strategies"] == ["hessian", "all"]
    assert call["score_kwargs"] == {"n_probes": 1}
    assert out.is_dir()  # created before the grid, so a run cannot end with nowhere to write


def test_usage_error_creates_nothing(capsys, no_work, tmp_path):
    _usage_error(capsys, ["demo", "--seeds", "0", "--out", str(tmp_path / "new")])
    assert not (tmp_path / "new").exists()


def test_canary_valid_arguments_reach_the_work(no_work, tmp_path):
    no_work.allow()
    with pytest.raises(_Reached):
        cli.main(["demo", "--task", "canary", "--quick", "--chars", "0", "--seq-len", "128", "--settings",
                  "lstm:r2,transformer:r4", "--seed", "0", "--out", str(tmp_path), "--no-progress"])
    (call,) = no_work
    assert call["seeds"] == [0]
    assert call["task"].settings == ["lstm:r2", "transformer:r4"] and call["task"].seq_len == 128
    assert call["task"].chars is None  # --chars 0 = the whole corpus, as documented


# ------------------------------------------------------------------ the demo modules on their own
def _module_usage_error(capsys, main, argv):
    """``<task>.main(argv)`` fails like ``sapsel demo``: exit code 2, usage + one error line, no traceback."""
    with pytest.raises(SystemExit) as ei:
        main(argv)
    err = capsys.readouterr().err
    assert ei.value.code == 2, err
    assert "Traceback" not in err and err.lstrip().startswith("usage:"), err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    return errors[0]


@pytest.mark.parametrize("task", ["labels", "canary"])
def test_demo_module_main_validates_before_any_work(capsys, no_work, tmp_path, a_file, task):
    from sapsel_kernels.demo import canary, labels

    main = {"labels": labels.main, "canary": canary.main}[task]
    prefix = f"sapsel demo --task {task}: error: argument "
    out = ["--out", str(tmp_path / "new")]
    assert _module_usage_error(capsys, main, out + ["--seeds", "0"]) == (
        prefix + "--seeds: must be an integer >= 1, got 0")
    assert _module_usage_error(capsys, main, out + ["--budgets", "abc"]) == (
        prefix + "--budgets: 'abc' is not a number")
    line = _module_usage_error(capsys, main, ["--quick", "--out", str(a_file / "sub")])
    assert line.startswith(prefix + "--out:") and "is not a directory" in line
    assert not (tmp_path / "new").exists()
    assert not no_work  # run_grid was never reached


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write to any folder")
@pytest.mark.parametrize("task", ["labels", "canary"])
def test_demo_module_main_rejects_a_read_only_out(capsys, no_work, tmp_path, task):
    from sapsel_kernels.demo import canary, labels

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        main = {"labels": labels.main, "canary": canary.main}[task]
        assert "--out: cannot write to" in _module_usage_error(capsys, main, ["--quick", "--out", str(ro / "new")])
    finally:
        ro.chmod(0o700)


def test_canary_seq_len_check_follows_the_settings(capsys, no_work, tmp_path):
    from sapsel_kernels.demo import canary

    line = _module_usage_error(capsys, canary.main, ["--seq-len", "129", "--models", "lstm,transformer",
                                                     "--out", str(tmp_path)])
    assert line.endswith("--seq-len: the transformer takes at most 128 characters, got 129")
    no_work.allow()
    with pytest.raises(_Reached):  # no transformer requested: any T >= 2 is fine
        canary.main(["--quick", "--seq-len", "500", "--out", str(tmp_path), "--no-progress"])
    assert no_work[0]["task"].seq_len == 500


def test_demo_module_as_a_process():
    r = subprocess.run([sys.executable, "-m", "sapsel_kernels.demo.labels", "--budgets", "abc"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "sapsel demo --task labels: error: argument --budgets: 'abc' is not a number")


def _option_strings(task):
    _, parser = cli.task_parser(task)
    return [s for a in parser._actions for s in a.option_strings if s not in ("-h", "--help")]


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["demo", "-h"]])
def test_help_lists_every_task_and_its_options(capsys, argv):
    with pytest.raises(SystemExit) as ei:
        cli.main(argv)
    out = capsys.readouterr().out
    assert ei.value.code == 0
    for task in cli.DEMO_TASKS:
        assert f"sapsel demo --task {task}" in out
        for opt in _option_strings(task):
            assert opt in out, (task, opt)


def test_task_help_shows_that_task(capsys):
    with pytest.raises(SystemExit) as ei:
        cli.main(["demo", "--task", "canary", "--help"])
    out = capsys.readouterr().out
    assert ei.value.code == 0
    assert out.startswith("usage: sapsel demo --task canary") and "--seq-len" in out and "--rates" not in out


def test_version(capsys):
    import sapsel_kernels as sk

    with pytest.raises(SystemExit) as ei:
        cli.main(["--version"])
    assert ei.value.code == 0
    assert capsys.readouterr().out.strip() == f"sapsel {sk.__version__}"


# ------------------------------------------------------------------ as a process
def _run(args, **kw):
    return subprocess.run([sys.executable, "-m", "sapsel_kernels", *args], capture_output=True, text=True,
                          timeout=120, **kw)


def test_process_usage_error_exit_code():
    r = _run(["demo", "--seeds", "0", "--no-progress"])
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "sapsel demo --task labels: error: argument --seeds: must be an integer >= 1, got 0")


def test_closed_stdout_is_not_a_traceback():
    # `sapsel info | head -1` where the reader is gone before the command writes: every write/flush raises EPIPE
    p = subprocess.Popen([sys.executable, "-m", "sapsel_kernels", "info"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()
    err = p.stderr.read().decode()
    p.wait(timeout=120)
    assert p.returncode in (0, 141), (p.returncode, err)
    assert "BrokenPipeError" not in err and "Traceback" not in err and "Exception ignored" not in err


class _ClosedPipe:
    """A stdout whose reader has gone: every write and flush raises BrokenPipeError; fileno() is a scratch file
    (main points it at devnull)."""

    def __init__(self, fd):
        self.fd = fd

    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        raise BrokenPipeError(32, "Broken pipe")

    def fileno(self):
        return self.fd


@pytest.mark.parametrize("argv", [["info"], ["--help"], ["--version"], ["demo", "--task", "canary", "--help"]])
def test_broken_pipe_in_process(monkeypatch, tmp_path, argv):
    # also the argparse paths that print and then raise SystemExit: the flush in main's handler catches those
    with open(tmp_path / "stdout", "w") as scratch:
        monkeypatch.setattr(sys, "stdout", _ClosedPipe(scratch.fileno()))
        assert cli.main(argv) == 141


# ------------------------------------------------------------------ the validators
def test_list_validators():
    assert at.budget_list(" 0.001, 0.01 ,1") == [0.001, 0.01, 1.0]
    assert at.rate_list("0.1,0.4") == [0.1, 0.4]
    assert at.positive_int_list("4,16") == [4, 16]
    assert at.choice_list(["a", "b"])("b,a") == ["b", "a"]
    for bad in ("inf", "-0.1", "0", "1.0000001", "0.5,0.5", "", "0.1,"):
        with pytest.raises(at.argparse.ArgumentTypeError):
            at.budget_list(bad)
    assert at.nonneg_int("0") == 0 and at.positive_int(" 3 ") == 3
    with pytest.raises(at.argparse.ArgumentTypeError, match="not an integer"):
        at.positive_int("1.5")


def test_output_dir_checks_without_creating(tmp_path, a_file):
    assert at.output_dir(str(tmp_path)) == str(tmp_path)
    target = tmp_path / "a" / "b"
    assert at.output_dir(str(target)) == str(target)
    assert not (tmp_path / "a").exists()
    assert os.listdir(tmp_path) == ["a_file"]  # the write probe leaves nothing behind
    for bad in (a_file, a_file / "x", ""):
        with pytest.raises(at.argparse.ArgumentTypeError):
            at.output_dir(str(bad))
