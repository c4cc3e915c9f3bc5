"""``sapsel forget`` and its report files: every option checked before a model is loaded (usage errors, exit code
2, the option named), the loading errors as one ``sapsel forget: error:`` line, the exit codes, the report writer on
a synthetic report, and one end-to-end run of the real ``forget`` on a tiny GPT-2 with a locally trained tokenizer.

Models are GPT-2s built from a config (n_embd 32, 2 layers) next to a byte-level BPE tokenizer trained in the test
(vocabulary 300, well under a second). Most tests replace ``sapsel_kernels.forget`` by a stub that checks what the
command passes and returns a synthetic report, so they exercise the command's plumbing in a second."""

import importlib
import inspect
import json
import os
import random
import subprocess
import sys
import types

import pytest
import torch

import sapsel_kernels as sk

from sapsel_kernels import _argtypes as at
from sapsel_kernels import cli
from sapsel_kernels.report import REPORT_FILES, summary_lines, to_jsonable, write_forget_report

SECRET = "4716 2087 5533 9812"
PREFIX = "my card number is "
WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "a", "cat", "sat", "on", "mat", "and",
         "ran", "to", "river", "bank", "where", "it", "saw", "bird", "sing", "song", "of", "old", "tree")

# the keys /work/design11.md promises in ForgetReport.to_dict() (and so in report.json)
REPORT_KEYS = ("exposure_before", "exposure_after", "exposure_rank_before", "exposure_rank_after", "log2_space",
               "ppl_before", "ppl_after", "ppl_increase", "completions_before", "completions_after",
               "extracted_before", "extracted_after", "accuracy_before", "accuracy_after", "strategy", "budget", "k",
               "numel", "cost", "history", "target", "reached", "stopped_by", "secret", "prefix", "replacement", "fmt",
               "n_affected", "n_train_windows", "seq_len")
COST_KEYS = ("wall_time_s", "n_gradients", "n_hvps", "score_s", "unlearn_s", "measure_s")
HISTORY_KEYS = ("step", "lr", "exposure", "val_ppl", "ppl_increase", "accepted")
COMPLETION_KEYS = ("prompt", "completion", "rest", "extracted")


def corpus(n_lines: int = 120, n_secret: int = 6, seed: int = 0) -> str:
    """~5 KB of word salad with ``PREFIX + SECRET`` on ``n_secret`` lines, all in the first 70% (the tail is held
    out for perplexity)."""
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 10))) + "." for _ in range(n_lines)]
    for i in range(n_secret):
        lines[4 + i * (int(0.7 * n_lines) - 4) // n_secret] = f"then {PREFIX}{SECRET} ok."
    return "\n".join(lines) + "\n"


def train_tokenizer(text: str, vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def tiny_gpt2(vocab_size: int, eos: int, n_positions: int = 64):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=n_positions,
                     bos_token_id=eos, eos_token_id=eos)
    return GPT2LMHeadModel(cfg)


def memorise(model, ids, steps: int = 40, T: int = 32) -> None:
    """A few Adam steps on all windows so the secret is memorised enough that forgetting it takes work."""
    x = torch.stack([ids[s:s + T + 1] for s in range(0, len(ids) - T - 1, T)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=x[:, :-1], labels=x[:, :-1]).loss.backward()  # HF shifts the labels itself
        opt.step()
    model.eval()


def memorised_folder(text: str, tokenizer_text: str, folder):
    """A tiny GPT-2 trained briefly on ``text`` with a tokenizer trained on ``tokenizer_text``, both saved to
    ``folder``; returns the tokenizer."""
    tok = train_tokenizer(tokenizer_text)
    torch.manual_seed(0)
    model = tiny_gpt2(len(tok), tok.eos_token_id)
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # on 2 shared cores one thread is 20x faster here (0.15 s vs 3 s per step)
    try:
        memorise(model, torch.tensor(tok.encode(text), dtype=torch.int64))
    finally:
        torch.set_num_threads(n)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return tok


@pytest.fixture(autouse=True)
def _keep_threads():
    """``--threads`` sets torch's thread count for the process (a CLI's whole life); restored after each test."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A folder with a tiny GPT-2 (trained briefly on the corpus) and its tokenizer, and the corpus file."""
    root = tmp_path_factory.mktemp("lm")
    text = corpus()
    tok = memorised_folder(text, text, root / "model")
    data = root / "data.txt"
    data.write_text(text, encoding="utf-8")
    return types.SimpleNamespace(dir=root / "model", data=data, text=text, tokenizer=tok, root=root)


# ------------------------------------------------------------------ a synthetic report and a stub of forget
def synthetic_report(reached: bool = True, n_steps: int = 8) -> dict:
    def completions(extracted):
        return [{"prompt": PREFIX, "completion": SECRET if extracted else "the fox", "rest": SECRET,
                 "extracted": extracted},
                {"prompt": PREFIX + "4716 ", "completion": "2087 5533 9812" if extracted else "cat | `x`\nsat",
                 "rest": "2087 5533 9812", "extracted": extracted}]

    hist = [{"step": 5 * i, "lr": 3e-3, "exposure": 40.0 - 5 * i, "extracted": i < 4,
             "val_ppl": 20.0 * (1 + 0.005 * i) + (3.0 if i == 3 else 0.0), "ppl_increase": 0.005 * i,
             "accepted": i != 3} for i in range(1, n_steps + 1)]
    hist.append({"step": 5 * (n_steps + 1), "lr": 3e-3, "exposure": float("nan"), "extracted": False,
                 "val_ppl": float("inf"), "ppl_increase": float("inf"), "accepted": False})
    return {
        "exposure_before": 41.5, "exposure_after": 1.2 if reached else 9.0, "exposure_rank_before": 9.97,
        "exposure_rank_after": 0.3, "log2_space": 53.15, "ppl_before": 21.0, "ppl_after": 21.6,
        "ppl_increase": 0.6 / 21.0, "val_ppl_before": 20.0, "val_ppl_after": 20.7, "completions_before":
        completions(True), "completions_after": completions(not reached), "extracted_before": True,
        "extracted_after": not reached, "accuracy_before": 1.0, "accuracy_after": 0.25, "strategy": "hessian",
        "budget": 0.01, "k": 1234, "numel": 123456,
        "cost": {"wall_time_s": 12.5, "n_gradients": 40, "n_hvps": 512, "score_s": 3.0, "unlearn_s": 6.0,
                 "measure_s": 3.5, "steps": 5 * (n_steps + 1), "steps_accepted": 5 * (n_steps - 1)},
        "history": hist, "target": {"exposure": 2.0, "max_ppl_increase": 0.05}, "reached": reached,
        "stopped_by": "target" if reached else "steps", "secret": SECRET, "prefix": PREFIX,
        "replacement": "1111 2222 3333 4444", "fmt": "dddd dddd dddd dddd", "n_affected": 6, "n_train_windows": 40,
        "seq_len": 16,
    }


class _Report:
    def __init__(self, d, model):
        self._d, self.model, self.scores = d, model, None

    def to_dict(self):
        return self._d


@pytest.fixture
def stub_forget(monkeypatch):
    """``sapsel_kernels.forget`` replaced by a stub: records its arguments; ``stub.result`` is what it does
    (a report dict, or an exception to raise)."""
    calls = []
    state = types.SimpleNamespace(calls=calls, result=synthetic_report())

    def forget(model, tokenizer, texts, secret, prefix=None, replacement=None, **kw):
        calls.append({"model": model, "tokenizer": tokenizer, "texts": texts, "secret": secret, "prefix": prefix,
                      "replacement": replacement, **kw})
        if isinstance(state.result, BaseException):
            raise state.result
        if callable(state.result):
            return state.result(model, tokenizer)
        with torch.no_grad():  # "unlearning": the saved model must be the modified one
            next(model.parameters()).add_(1.0)
        return _Report(state.result, model)

    from sapsel_kernels.forget import Evidence

    mod = types.ModuleType("sapsel_kernels.forgetting.forget")
    mod.forget, mod.Evidence = forget, Evidence
    monkeypatch.setitem(sys.modules, "sapsel_kernels.forgetting.forget", mod)  # where the CLI imports it from
    return state


@pytest.fixture
def no_load(monkeypatch):
    """Loading a model fails the test (usage errors must come first)."""
    def forbidden(*a, **k):
        raise AssertionError("a model was loaded before the arguments were validated")

    monkeypatch.setattr(cli, "load_model", forbidden)


def _usage_error(capsys, argv):
    with pytest.raises(SystemExit) as ei:
        cli.main(argv)
    err = capsys.readouterr().err
    assert ei.value.code == 2, err
    assert "Traceback" not in err and err.lstrip().startswith("usage: sapsel forget"), err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    assert errors[0].startswith("sapsel forget: error: "), err
    return errors[0]


def _base(tmp_path, **over):
    """A valid command line over placeholder files (enough for the parser; nothing is loaded)."""
    model = tmp_path / "m"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    data = tmp_path / "d.txt"
    if not data.exists():
        data.write_text(f"x {PREFIX}{SECRET} y\n")
    opts = {"--model": str(model), "--data": str(data), "--secret": SECRET, "--out": str(tmp_path / "out")}
    opts.update(over)
    argv = ["forget"]
    for k, v in opts.items():
        if v is not None:
            argv += [f"{k}={v}"] if v.startswith("-") else [k, v]  # "--format ----" would read ---- as an option
    return argv


# ------------------------------------------------------------------ parser: one usage error naming the option
BAD = [
    ({"--budget": "0"}, "argument --budget: '0' is outside (0, 1]"),
    ({"--budget": "1.5"}, "argument --budget: '1.5' is outside (0, 1]"),
    ({"--budget": "abc"}, "argument --budget: 'abc' is not a number"),
    ({"--budget": "nan"}, "argument --budget: 'nan' is not a finite number"),
    ({"--format": "----"}, "argument --format: '----' has no placeholder"),
    ({"--format": ""}, "argument --format: the format must not be empty"),
    ({"--format": "dd\\"}, "argument --format: format 'dd\\\\' ends with a lone backslash"),
    ({"--format": "dddd-dddd"}, "argument --format: the secret '4716 2087 5533 9812' is not of the format "
                                "'dddd-dddd'"),
    ({"--secret": None}, "give the secrets to forget: --secret SECRET (repeatable) or --secrets FILE.jsonl"),
    ({"--secret": "  "}, "argument --secret: must not be empty"),
    ({"--model": None}, "the following arguments are required: --model (or --example)"),
    ({"--out": None}, "the following arguments are required: --out"),
    ({"--prefix": ""}, "argument --prefix: must not be empty"),
    ({"--strategy": "nope"}, "argument --strategy: unknown strategy 'nope'; choose from hessian,"),
    ({"--max-ppl-increase": "-0.1"}, "argument --max-ppl-increase: must be a number >= 0, got '-0.1'"),
    ({"--target-exposure": "inf"}, "argument --target-exposure: 'inf' is not a finite number"),
    ({"--max-steps": "0"}, "argument --max-steps: must be an integer >= 1, got 0"),
    ({"--candidates": "2"}, "argument --candidates: must be an integer >= 3, got 2"),
    ({"--seq-len": "1"}, "argument --seq-len: must be an integer >= 2, got 1"),
    ({"--seed": "-1"}, "argument --seed: must be an integer >= 0, got -1"),
    ({"--threads": "0"}, "argument --threads: must be an integer >= 1, got 0"),
    ({"--lr": "0"}, "argument --lr: must be a number > 0, got '0'"),
    ({"--heldout-fraction": "1"}, "argument --heldout-fraction: '1' is outside (0, 1)"),
    ({"--heldout": "nope.txt"}, "argument --heldout: 'nope.txt' does not exist"),
    ({"--samples": "-1"}, "argument --samples: must be an integer >= 0, got -1"),
    ({"--secrets": "nope.jsonl"}, "argument --secrets: 'nope.jsonl' does not exist"),
    ({"--probes": "0"}, "argument --probes: must be an integer >= 1, got 0"),
    ({"--device": "tpu"}, "argument --device: "),
    ({"--dtype": "int8"}, "argument --dtype: invalid choice: 'int8'"),
    ({"--bogus": "1"}, "unrecognized arguments: --bogus 1"),
    ({"--remove": "2:10"}, "argument --remove: '2' is outside (0, 1]"),
    ({"--remove": "0.9:0"}, "argument --remove: must be an integer >= 1, got 0"),
    ({"--remove": "0.9"}, "argument --remove: expected ALPHA:STEPS"),
    ({"--remove": "0.9:600", "--save": "patch"}, "argument --save: --remove changes every parameter"),
]


@pytest.mark.parametrize("over,msg", BAD, ids=[" ".join(f"{k}={v}" for k, v in o.items()) for o, _ in BAD])
def test_bad_option_is_a_usage_error(capsys, tmp_path, no_load, over, msg):
    line = _usage_error(capsys, _base(tmp_path, **over))
    assert msg in line, line
    assert not (tmp_path / "out").exists()  # a usage error creates nothing


def test_model_folder_checked_at_parse_time(capsys, tmp_path, no_load):
    assert "argument --model: " in _usage_error(capsys, _base(tmp_path, **{"--model": str(tmp_path / "nope")}))
    (tmp_path / "f").write_text("x")
    line = _usage_error(capsys, _base(tmp_path, **{"--model": str(tmp_path / "f")}))
    assert "argument --model:" in line and "is not a directory" in line
    (tmp_path / "empty").mkdir()
    line = _usage_error(capsys, _base(tmp_path, **{"--model": str(tmp_path / "empty")}))
    assert "argument --model:" in line and "has no config.json" in line


def test_data_file_checked_at_parse_time(capsys, tmp_path, no_load):
    cases = {"missing.txt": (None, "does not exist"), "empty.txt": (b"", "is empty"),
             "blank.txt": (b" \n\t\n", "holds only blanks"), "bin.txt": (b"ok\xff\xfe", "is not UTF-8 text")}
    for name, (content, msg) in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        line = _usage_error(capsys, _base(tmp_path, **{"--data": str(tmp_path / name)}))
        assert "argument --data:" in line and msg in line, line
    line = _usage_error(capsys, _base(tmp_path, **{"--data": str(tmp_path)}))
    assert "argument --data:" in line and "is a directory" in line


def test_out_checked_at_parse_time(capsys, tmp_path, no_load):
    (tmp_path / "a_file").write_text("x")
    line = _usage_error(capsys, _base(tmp_path, **{"--out": str(tmp_path / "a_file")}))
    assert "argument --out:" in line and "exists and is not a directory" in line
    line = _usage_error(capsys, _base(tmp_path, **{"--out": str(tmp_path / "a_file" / "sub")}))
    assert "argument --out:" in line and "is not a directory" in line
    # the model folder itself: the unlearned model would overwrite the original
    line = _usage_error(capsys, _base(tmp_path, **{"--out": str(tmp_path / "m")}))
    assert "argument --out:" in line and "is the --model folder" in line
    # a folder that holds files: a failed run must not leave an earlier run's report (reached: true) beside it
    out = tmp_path / "used"
    out.mkdir()
    (out / "report.json").write_text('{"reached": true}')
    line = _usage_error(capsys, _base(tmp_path, **{"--out": str(out)}))
    assert "argument --out:" in line and "is not empty" in line, line
    assert (out / "report.json").read_text() == '{"reached": true}'  # nothing modified


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc (Linux)")
def test_out_on_a_read_only_file_system(capsys, tmp_path, no_load):
    line = _usage_error(capsys, _base(tmp_path, **{"--out": "/proc/sapsel_forget_out"}))
    assert "argument --out: cannot" in line


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write to any folder")
def test_out_in_a_read_only_folder(capsys, tmp_path, no_load):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert "argument --out: cannot write to" in _usage_error(capsys, _base(tmp_path, **{"--out": str(ro / "o")}))
    finally:
        ro.chmod(0o700)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_without_cuda(capsys, tmp_path, no_load):
    assert "argument --device: 'cuda': no CUDA device is available" in _usage_error(
        capsys, _base(tmp_path, **{"--device": "cuda"}))


@pytest.mark.parametrize("extra,drop", [(["--no-attacks"], "--no-attacks"), (["--relearn-steps", "0"],
                                                                             "--relearn-steps 0")])
def test_relearn_target_needs_the_attack(capsys, tmp_path, no_load, extra, drop):
    line = _usage_error(capsys, _base(tmp_path) + ["--relearn-target", *extra])
    assert "argument --relearn-target: the verdict needs the relearning attack; drop " + drop in line, line


def test_remove_no_finish_needs_the_removal_stage(capsys, tmp_path, no_load):
    line = _usage_error(capsys, _base(tmp_path) + ["--remove-no-finish"])
    assert "argument --remove-no-finish: applies to the removal stage; give --remove too" in line, line


def test_valid_arguments_reach_the_loader_unchanged(monkeypatch, tmp_path):
    seen = {}

    class Reached(Exception):
        pass

    def load(model_dir, sample, *, device="cpu", dtype="float32"):
        seen.update(model_dir=model_dir, sample=sample, device=device, dtype=dtype)
        raise Reached

    monkeypatch.setattr(cli, "load_model", load)
    out = tmp_path / "new" / "sub"
    with pytest.raises(Reached):
        cli.main(_base(tmp_path, **{"--out": str(out), "--format": "dddd dddd dddd dddd", "--budget": "0.5"}))
    assert seen["model_dir"] == str(tmp_path / "m") and SECRET in seen["sample"] and seen["device"] == "cpu"
    assert seen["dtype"] == "float32"
    assert out.is_dir() and os.listdir(out) == []  # created, probed, the probe removed


def test_cli_defaults_are_forgets():
    """The options with a default state forget's own (the help shows the numbers), so they cannot drift apart."""
    fm = pytest.importorskip("sapsel_kernels.forget")
    sig = inspect.signature(fm.forget).parameters
    select, update, target, measure = fm.SelectConfig(), fm.UpdateConfig(), fm.TargetConfig(), fm.MeasureConfig()
    spec = sk.SecretSpec("x")  # a secret's own options: prefix, format, replacement
    p = cli._subparser(cli.build_parser(), "forget")
    defaults = {"strategy": select.strategy, "budget": select.budget, "max_ppl_increase": target.max_ppl_increase,
                "target_exposure": target.exposure, "seed": sig["seed"].default, "seq_len": update.seq_len,
                "max_steps": update.rule.steps, "candidates": measure.n_candidates, "lr": update.rule.lr,
                "heldout_fraction": sig["heldout"].default, "probes": select.n_probes, "prefix": spec.prefix,
                "replacement": spec.replacement, "fmt": spec.fmt, "objective": update.objective,
                "repair_steps": update.rule.repair_steps, "polish_steps": update.rule.polish_steps}
    for dest, default in defaults.items():
        assert p.get_default(dest) == default, (dest, p.get_default(dest), default)


# ------------------------------------------------------------------ help and the light parser
def test_forget_help(capsys):
    with pytest.raises(SystemExit) as ei:
        cli.main(["forget", "--help"])
    out = capsys.readouterr().out
    assert ei.value.code == 0
    assert out.startswith("usage: sapsel forget --model DIR --data FILE.txt (--secret SECRET ... | --secrets "
                          "FILE.jsonl) [--heldout FILE.txt] --out OUT [options]")
    p = cli._subparser(cli.build_parser(), "forget")
    for opt in (s for a in p._actions for s in a.option_strings):
        assert opt in out, opt
    from sapsel_kernels.strategies import STRATEGIES

    assert "strategies: " + ", ".join(STRATEGIES) in out
    for code in ("0 ", "1 ", "2 ", "3 ", "130 "):
        assert f"\n  {code}" in out.split("exit codes:")[1]


def test_top_level_help_lists_forget(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "{info,demo,forget,patch}" in capsys.readouterr().out


def test_as_a_process_usage_error_and_light_parser(tmp_path):
    # one process (a torch import costs seconds here): building the parser, which `sapsel info` does, imports
    # neither transformers, matplotlib nor the strategies; then the command's exit code and last stderr line
    argv = _base(tmp_path, **{"--budget": "0"})
    code = ("import sys; from sapsel_kernels import cli; cli.build_parser().parse_known_args(['info']); "
            "print([m for m in ('transformers', 'matplotlib', 'sapsel_kernels.selection.strategies',"
            " 'sapsel_kernels.forgetting.report')"
            f" if m in sys.modules]); sys.exit(cli.main({argv!r}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "[]", (r.stdout, r.stderr)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "sapsel forget: error: argument --budget: '0' is outside (0, 1]"


# ------------------------------------------------------------------ the report writer
def _strict_json(path):
    def no_constants(name):
        raise AssertionError(f"{path} holds {name}: not strict JSON")

    with open(path, encoding="utf-8") as f:
        return json.load(f, parse_constant=no_constants)


def test_report_writer_files(tmp_path):
    rep = synthetic_report()
    argv = ["sapsel", "forget", "--secret", SECRET, "--out", "o u t"]
    paths = write_forget_report(rep, str(tmp_path / "new"), argv=argv)
    assert [os.path.basename(p) for p in paths] == list(REPORT_FILES)
    assert all(os.path.isfile(p) for p in paths)
    d = _strict_json(paths[0])
    assert set(rep) | {"argv"} == set(d)
    assert all(k in d for k in REPORT_KEYS) and all(k in d["cost"] for k in COST_KEYS)
    assert all(k in h for h in d["history"] for k in HISTORY_KEYS)
    assert d["history"][-1]["exposure"] is None and d["history"][-1]["val_ppl"] is None  # NaN / Inf -> null
    assert d["argv"] == argv and d["secret"] == SECRET and d["exposure_before"] == 41.5
    with open(paths[2], "rb") as f:
        png = f.read()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    md = open(paths[1], encoding="utf-8").read()
    for text in ("# sapsel forget", "## Extraction probes", "## Selection and cost", "## Command", SECRET,
                 "candidates, at most n/a) | 41.50 | 1.20 |", "1,234 of 123,456", "stopped by",
                 "sapsel forget --secret '4716 2087 5533 9812' --out 'o u t'", "**extracted**",
                 "``cat \\| `x`\\nsat``", "validation perplexity"):
        assert text in md, text
    assert "target reached" in "\n".join(summary_lines(rep))


def test_report_writer_partial_dict_and_report_object(tmp_path):
    rep = {k: v for k, v in synthetic_report(reached=False, n_steps=0).items()
           if k not in ("cost", "val_ppl_before", "val_ppl_after", "completions_after")}
    rep["history"] = []
    paths = write_forget_report(_Report(rep, None), str(tmp_path))  # an object with to_dict(); no argv
    d = _strict_json(paths[0])
    assert "argv" not in d and d["reached"] is False
    md = open(paths[1], encoding="utf-8").read()
    assert "## Command" not in md and "n/a" in md and "NOT reached" in md
    assert os.path.getsize(paths[2]) > 5000


def test_report_writer_rejects_values_without_json_form_before_writing(tmp_path):
    rep = synthetic_report()
    rep["cost"]["n_hvps"] = object()
    with pytest.raises(TypeError, match=r"report\['cost'\]\['n_hvps'\] is a object"):
        write_forget_report(rep, str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()
    with pytest.raises(TypeError, match="must be a dict"):
        write_forget_report([1, 2], str(tmp_path / "o"))


def test_to_jsonable_numbers():
    import numpy as np

    got = to_jsonable({"a": torch.tensor(1.5), "b": np.float32(float("nan")), "c": (1, np.int64(2)),
                       "d": torch.tensor([1.0, float("inf")]), 3: {True, False}})
    assert got == {"a": 1.5, "b": None, "c": [1, 2], "d": [1.0, None], "3": [False, True]}


# ------------------------------------------------------------------ the command with a stub of forget
def _run(capsys, argv):
    code = cli.main(argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_run_writes_model_tokenizer_and_report(capsys, lm, stub_forget, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    argv = ["forget", "--model", str(lm.dir), "--data", str(lm.data), "--secret", SECRET, "--prefix", PREFIX,
            "--replacement", "1111 2222 3333 4444", "--format", "dddd dddd dddd dddd", "--strategy", "random",
            "--budget", "0.02", "--max-ppl-increase", "0.1", "--target-exposure", "3", "--seed", "7", "--seq-len",
            "16", "--max-steps", "9", "--candidates", "50", "--lr", "0.01", "--heldout-fraction", "0.2",
            "--probes", "2",
            "--objective", "uniform", "--repair-steps", "4", "--threads", "1", "--no-progress", "--out", str(out)]
    code, stdout, stderr = _run(capsys, argv)
    assert code == 0, stderr
    (call,) = stub_forget.calls
    assert call["texts"] == [lm.text] and call["prefix"] is None and call["replacement"] is None
    assert call["secret"] == {"secret": SECRET, "prefix": PREFIX, "replacement": "1111 2222 3333 4444",
                              "format": "dddd dddd dddd dddd"}
    assert (call["seed"], call["heldout"]) == (7, 0.2)
    assert call["select"] == sk.SelectConfig(strategy="random", budget=0.02, n_probes=2)
    assert call["update"] == sk.UpdateConfig(objective="uniform", seq_len=16,
                                             rule=sk.Targeted(steps=9, lr=0.01, repair_steps=4, beta=0.25,
                                                              polish_steps=50, project=True))
    assert call["target"] == sk.TargetConfig(exposure=3.0, max_ppl_increase=0.1)
    assert (call["measure"].n_candidates, call["measure"].progress) == (50, False)
    for name in REPORT_FILES:
        assert (out / name).is_file(), name
    d = _strict_json(out / "report.json")
    assert d["argv"] == ["sapsel", *argv]
    reloaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    modified = call["model"]
    for (n, a), b in zip(reloaded.state_dict().items(), modified.state_dict().values()):
        assert torch.equal(a, b), n  # the saved model is the unlearned one
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tok.encode(lm.text[:200]) == lm.tokenizer.encode(lm.text[:200])
    assert "exposure     41.50 -> 1.20 bits" in stdout and f"wrote {out}" in stdout
    assert "Traceback" not in stderr


def test_target_not_reached_is_exit_code_3(capsys, lm, stub_forget, tmp_path):
    stub_forget.result = synthetic_report(reached=False)
    code, stdout, stderr = _run(capsys, ["forget", "--model", str(lm.dir), "--data", str(lm.data), "--secret",
                                         SECRET, "--no-progress", "--out", str(tmp_path / "o")])
    assert code == 3
    assert "target NOT reached" in stdout and "the target was NOT reached (stopped by steps)" in stderr
    assert (tmp_path / "o" / "model.safetensors").is_file() and (tmp_path / "o" / "report.md").is_file()


def test_forget_value_error_is_one_line_exit_2(capsys, lm, stub_forget, tmp_path, monkeypatch):
    stub_forget.result = ValueError("a NaN loss after 3 steps:\nthe model was restored")
    code, stdout, stderr = _run(capsys, ["forget", "--model", str(lm.dir), "--data", str(lm.data), "--secret",
                                         SECRET, "--no-progress", "--out", str(tmp_path / "o")])
    assert code == 2
    assert stderr.strip() == "sapsel forget: error: a NaN loss after 3 steps: the model was restored"
    assert os.listdir(tmp_path / "o") == []
    # a secret missing from the data is refused before the model is loaded
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("loaded the model before checking the data"))
    code, stdout, stderr = _run(capsys, ["forget", "--model", str(lm.dir), "--data", str(lm.data), "--secret",
                                         "1234", "--no-progress", "--out", str(tmp_path / "o2")])
    assert code == 2
    assert stderr.strip() == (f"sapsel forget: error: the secret '1234' does not occur in the data (1 text(s), "
                              f"{len(lm.text)} characters): nothing to forget")
    assert os.listdir(tmp_path / "o2") == []


def test_interrupt_is_exit_130_and_writes_nothing(capsys, lm, stub_forget, tmp_path):
    stub_forget.result = KeyboardInterrupt()
    code, _, stderr = _run(capsys, ["forget", "--model", str(lm.dir), "--data", str(lm.data), "--secret", SECRET,
                                    "--no-progress", "--out", str(tmp_path / "o")])
    assert code == 130 and "interrupted" in stderr and os.listdir(tmp_path / "o") == []


def test_unwritable_results_are_exit_1(capsys, lm, stub_forget, tmp_path):
    out = tmp_path / "o"

    def block_then_report(model, tokenizer):
        (out / "report.json").mkdir()  # OUT was writable at parse time; now the report cannot be written
        return _Report(synthetic_report(), model)

    stub_forget.result = block_then_report
    code, _, stderr = _run(capsys, ["forget", "--model", str(lm.dir), "--data", str(lm.data), "--secret", SECRET,
                                    "--no-progress", "--out", str(out)])
    assert code == 1
    assert stderr.strip().startswith(f"sapsel forget: error: cannot write the results to {str(out)!r}:"), stderr


# ------------------------------------------------------------------ folders that hold no usable causal LM
def _load_error(capsys, model_dir, data, out):
    code, _, stderr = _run(capsys, ["forget", "--model", str(model_dir), "--data", str(data), "--secret", SECRET,
                                    "--no-progress", "--out", str(out)])
    lines = [x for x in stderr.splitlines() if "error:" in x]
    assert code == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith(f"sapsel forget: error: --model {str(model_dir)!r}: "), lines[0]
    assert os.listdir(out) == []
    return lines[0]


def test_model_folder_errors(capsys, lm, stub_forget, tmp_path):
    from transformers import BertConfig, BertModel, GPT2Model, T5Config

    out = tmp_path / "out"
    tok = lm.tokenizer
    cfg_only = tmp_path / "cfg_only"
    tiny_gpt2(len(tok), tok.eos_token_id).config.save_pretrained(cfg_only)
    tok.save_pretrained(cfg_only)
    assert "cannot load the model weights" in _load_error(capsys, cfg_only, lm.data, out)

    no_tok = tmp_path / "no_tokenizer"
    tiny_gpt2(len(tok), tok.eos_token_id).save_pretrained(no_tok)
    assert "no tokenizer found" in _load_error(capsys, no_tok, lm.data, out)

    small = tmp_path / "small_vocab"  # a tokenizer with more tokens than the model has embedding rows
    tiny_gpt2(64, 0).save_pretrained(small)
    tok.save_pretrained(small)
    assert "the tokenizer and the model do not match" in _load_error(capsys, small, lm.data, out)

    t5 = tmp_path / "t5"
    T5Config(d_model=16, d_kv=8, d_ff=16, num_layers=1, num_heads=2, vocab_size=len(tok)).save_pretrained(t5)
    assert "'t5' model (T5Config) has no causal-LM class" in _load_error(capsys, t5, lm.data, out)

    bert = tmp_path / "bert"  # an encoder without an LM head: transformers would fill the head at random
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=16)).save_pretrained(bert)
    tok.save_pretrained(bert)
    assert "not a causal-LM checkpoint" in _load_error(capsys, bert, lm.data, out)

    bf16 = tmp_path / "bf16"  # float32 by default whatever the checkpoint stores; --dtype auto keeps it
    tiny_gpt2(len(tok), tok.eos_token_id).to(torch.bfloat16).save_pretrained(bf16)
    tok.save_pretrained(bf16)
    assert next(cli.load_model(str(bf16), lm.text[:100])[0].parameters()).dtype == torch.float32
    assert next(cli.load_model(str(bf16), lm.text[:100], dtype="auto")[0].parameters()).dtype == torch.bfloat16

    base = tmp_path / "gpt2_base"  # GPT-2 without its head loads fine: the head is tied to the embedding
    GPT2Model(tiny_gpt2(len(tok), tok.eos_token_id).config).save_pretrained(base)
    tok.save_pretrained(base)
    model, _ = cli.load_model(str(base), lm.text[:100])
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert not stub_forget.calls


# ------------------------------------------------------------------ end to end with the real forget
def _real_forget():
    try:
        importlib.import_module("sapsel_kernels.measure")
        return importlib.import_module("sapsel_kernels.forget")
    except ImportError:
        return None


needs_forget = pytest.mark.skipif(_real_forget() is None, reason="sapsel_kernels.forget / measure not present yet")


@needs_forget
def test_end_to_end_on_a_tiny_gpt2(capsys, lm, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    argv = ["forget", "--model", str(lm.dir), "--data", str(lm.data), "--secret", SECRET, "--prefix", PREFIX,
            "--seq-len", "16", "--heldout-fraction", "0.25", "--max-steps", "10", "--candidates", "64", "--probes", "2",
            "--budget", "0.05", "--threads", "1", "--no-progress", "--save", "both", "--out", str(out)]
    code, stdout, stderr = _run(capsys, argv)
    assert code in (0, 3), stderr
    assert "Traceback" not in stderr
    for name in REPORT_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    d = _strict_json(out / "report.json")
    missing = [k for k in REPORT_KEYS if k not in d]
    assert not missing, missing
    assert all(k in d["cost"] for k in COST_KEYS), d["cost"]
    assert all(k in h for h in d["history"] for k in HISTORY_KEYS)
    assert all(k in c for c in d["completions_before"] + d["completions_after"] for k in COMPLETION_KEYS)
    assert set(d["target"]) >= {"exposure", "max_ppl_increase"}
    assert d["secret"] == SECRET and d["prefix"] == PREFIX and d["seq_len"] == 16
    # forget's defaults (docs/forget.md): hessian_ratio, the NPO term per token at beta 0.25
    assert d["strategy"] == "hessian_ratio" and d["rule"]["beta"] == 0.25 and d["rule"]["per_token"] is True
    assert (code == 0) == bool(d["reached"])
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    ids = torch.tensor([tok.encode(PREFIX + SECRET)])
    assert model(ids).logits.shape == (1, ids.shape[1], len(tok))
    assert "exposure" in stdout and f"wrote {out}" in stdout
    # --save both: the patch turns the input model into the saved one, bit for bit, and is the size of the change
    patch = sk.Patch.load(out / "patch.safetensors")
    assert 0 < patch.k <= d["k"]
    assert _run(capsys, ["patch", "apply", "--model", str(lm.dir), "--patch", str(out / "patch.safetensors"),
                         "--out", str(tmp_path / "applied")])[0] == 0
    applied = AutoModelForCausalLM.from_pretrained(tmp_path / "applied", local_files_only=True)
    assert all(torch.equal(a, b) for a, b in zip(applied.state_dict().values(), model.state_dict().values()))


@needs_forget
def test_end_to_end_with_the_removal_stage_and_the_relearning_target(capsys, lm, tmp_path):
    """--remove and --relearn-target on the tiny GPT-2: every weight of the saved model differs from the input's,
    the report holds the removal stage and the sparse edit's verdict, and a secret counts as met only where the
    relearning attack's copy meets the target too."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    argv = ["forget", "--model", str(lm.dir), "--data", str(lm.data), "--secret", SECRET, "--prefix", PREFIX,
            "--seq-len", "16", "--heldout-fraction", "0.25", "--max-steps", "5", "--candidates", "64", "--probes", "2",
            "--samples", "2", "--relearn-steps", "3", "--remove", "0.9:10", "--relearn-target", "--threads", "1",
            "--no-progress", "--out", str(out)]
    code, stdout, stderr = _run(capsys, argv)
    assert code in (0, 3) and "Traceback" not in stderr, stderr
    d = _strict_json(out / "report.json")
    assert d["removal"]["alpha"] == 0.9 and d["removal"]["steps"] == 10 and d["target"]["relearn"] is True
    assert len(d["removal"]["sparse"]["secrets"]) == 1 and (code == 0) == bool(d["reached"])
    (s,) = d["secrets"]
    r = s["relearn_after"]
    assert s["reached"] == (s["exposure_hi_after"] <= 2.0 and not s["extracted_after"] and r["exposure_hi"] <= 2.0
                            and not r["extracted"])
    assert "removal " in stdout and "relearning " in stdout and "(part of the verdict)" in stdout
    # the finish pass (on by default) ran exactly where the distilled model missed the exposure bound or extracted,
    # on the monitored candidates (never the reported ones)
    (mon,) = d["removal"]["student_monitor"]
    missed = mon["exposure_hi"] > 2.0 or mon["extracted"]
    assert (d["removal"]["finish_pass"] is not None) == missed and d["removal"]["finish"] is True
    assert "the distilled model: " in stdout
    before = AutoModelForCausalLM.from_pretrained(lm.dir, local_files_only=True)
    after = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert all(not torch.equal(p, q) for p, q in zip(before.parameters(), after.parameters()))
    assert not (out / "patch.safetensors").exists()


@needs_forget
def test_end_to_end_secret_not_in_the_data(capsys, lm, tmp_path):
    code, _, stderr = _run(capsys, ["forget", "--model", str(lm.dir), "--data", str(lm.data), "--secret",
                                    "9999 8888 7777 6666", "--prefix", PREFIX, "--seq-len", "16", "--no-progress",
                                    "--out", str(tmp_path / "o")])
    lines = stderr.strip().splitlines()
    assert code == 2 and "Traceback" not in stderr, stderr
    assert lines[-1].startswith("sapsel forget: error: ") and "9999 8888 7777 6666" in lines[-1], stderr
    assert os.listdir(tmp_path / "o") == []


def test_argtypes_new_validators(tmp_path):
    assert at.nonneg_float("0") == 0.0 and at.positive_float("1e-3") == 1e-3 and at.open_fraction("0.5") == 0.5
    assert at.secret_format("dddd-dd") == "dddd-dd" and at.nonempty_text(" a ") == " a "
    assert at.device("cpu") == "cpu"
    for bad, fn in (("-1", at.nonneg_float), ("0", at.positive_float), ("0", at.open_fraction),
                    ("--", at.secret_format), ("cuda:x", at.device)):
        with pytest.raises(at.argparse.ArgumentTypeError):
            fn(bad)
    choose = at.lazy_choice(lambda: ("a", "b"), "letter")
    assert choose("b") == "b"
    with pytest.raises(at.argparse.ArgumentTypeError, match="unknown letter 'c'; choose from a, b"):
        choose("c")


# ------------------------------------------------------------------ many secrets in one run, held-out text
MULTI = [("my card number is", SECRET), ("Contact email:", "mara.quist@example.org"), ("API key:", "sk3kd9x7q2mzp0")]


@pytest.fixture(scope="module")
def multi_lm(tmp_path_factory):
    """A tiny GPT-2 trained on word salad holding three secrets of three kinds, a held-out file of the same kind
    that holds none, and a secrets file for two of them (the third comes by --secret)."""
    root = tmp_path_factory.mktemp("multi")
    rng = random.Random(1)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 10))) + "." for _ in range(140)]
    for i in range(12):
        prefix, secret = MULTI[i % 3]
        lines[3 + i * 8] = f"so {prefix} {secret} ok."
    text = "\n".join(lines) + "\n"
    held = "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 10))) + "." for _ in range(60)) + "\n"
    memorised_folder(text, text.replace(MULTI[1][1], "").replace(MULTI[2][1], "").replace(SECRET, ""),
                     root / "model")
    (root / "data.txt").write_text(text, encoding="utf-8")
    (root / "held.txt").write_text(held, encoding="utf-8")
    (root / "secrets.jsonl").write_text("\n".join(json.dumps({"secret": s, "prefix": p}) for p, s in MULTI[1:]) + "\n")
    return root


@needs_forget
def test_many_secrets_with_heldout_text_in_one_run(capsys, multi_lm, tmp_path):
    out = tmp_path / "out"
    argv = ["forget", "--model", str(multi_lm / "model"), "--data", str(multi_lm / "data.txt"), "--heldout",
            str(multi_lm / "held.txt"), "--secrets", str(multi_lm / "secrets.jsonl"), "--secret", SECRET,
            "--seq-len", "16", "--max-steps", "10", "--candidates", "64", "--samples", "4", "--relearn-steps", "3",
            "--budget", "0.05", "--threads", "1", "--no-progress", "--save", "both", "--out", str(out)]
    code, stdout, stderr = _run(capsys, argv)
    assert code in (0, 3), stderr
    d = _strict_json(out / "report.json")
    assert d["n_secrets"] == 3 and sorted(s["secret"] for s in d["secrets"]) == sorted(s for _, s in MULTI)
    for s in d["secrets"]:
        prefix = dict((b, a) for a, b in MULTI)[s["secret"]]
        # the prompt measured is the data's text, its separating space included, not the bare prefix + secret;
        # the card came by --secret without a prefix: its line up to the secret
        assert s["prompt"] == ("so " if s["secret"] == SECRET else "") + prefix + " ", s["prompt"]
        for key in ("exposure_before", "exposure_after", "exposure_hi_after", "extracted_before", "extracted_after",
                    "completions_after", "never_seen_after", "samples_after", "relearn_after", "int8_after",
                    "null", "reached", "failing", "n_occurrences"):
            assert key in s, key
        assert s["exposure_hi_after"] >= s["exposure_after"]
        assert s["samples_after"]["n"] == 4 and s["n_occurrences"] == 4
        assert s["reached"] == (not s["failing"])
    kinds = {s["secret"]: s["null"] for s in d["secrets"]}
    assert "plausible emails" in kinds[MULTI[1][1]] and "uniform" in kinds[SECRET]
    assert d["utility_text"] == "heldout" and d["ppl_heldout_before"] == d["ppl_before"]
    assert d["ppl_train_text_before"] is not None and d["ppl_train_text_before"] != d["ppl_heldout_before"]
    assert d["reached"] == all(s["reached"] for s in d["secrets"]) and d["ppl_within_budget"] or not d["reached"]
    assert (code == 0) == d["reached"]
    if code == 3:
        for name in d["failing"]:
            assert repr(name) in stderr
    md = (out / "report.md").read_text()
    assert "## Every secret" in md and all(s in md for _, s in MULTI)
    assert not [q for q in os.listdir(out) if q.startswith(".sapsel-partial")]


def test_secrets_file_and_repeated_secret_errors(capsys, tmp_path, no_load):
    bad = tmp_path / "s.jsonl"
    bad.write_text('{"secret": "1234 5678"}\n{"secret": "9"\n')
    line = _usage_error(capsys, _base(tmp_path, **{"--secret": None, "--secrets": str(bad)}))
    assert "argument --secrets:" in line and "line 2: not valid JSON" in line, line
    argv = _base(tmp_path) + ["--secret", SECRET]
    assert f"argument --secret: {SECRET!r} is given twice" in _usage_error(capsys, argv)
    argv = _base(tmp_path, **{"--prefix": "x"}) + ["--secret", "1111 2222"]
    assert "argument --prefix: applies to a single --secret" in _usage_error(capsys, argv)
    argv = _base(tmp_path) + ["--example"]
    assert "argument --example: builds its own model" in _usage_error(capsys, argv)
    (tmp_path / "empty.txt").write_text("")
    line = _usage_error(capsys, _base(tmp_path, **{"--heldout": str(tmp_path / "empty.txt")}))
    assert "argument --heldout:" in line and "is empty" in line, line


def test_out_keeps_its_mode_after_the_staged_write(capsys, lm, stub_forget, tmp_path):
    out = tmp_path / "o"
    code, _, stderr = _run(capsys, ["forget", "--model", str(lm.dir), "--data", str(lm.data), "--secret", SECRET,
                                    "--no-progress", "--out", str(out)])
    assert code == 0, stderr
    ref = tmp_path / "ref"
    ref.mkdir()  # the mode a plain mkdir gives here (the staging folder's mkdtemp would give 0700)
    assert (out.stat().st_mode & 0o7777) == (ref.stat().st_mode & 0o7777)
    assert not [q for q in os.listdir(tmp_path) if q.startswith(".sapsel-partial")]
