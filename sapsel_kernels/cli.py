"""Command line: ``sapsel info``, ``sapsel demo [--task labels|canary] [task options]`` and ``sapsel --version``.

Every argument is validated before any work starts: a bad value is an argparse usage error (exit code 2, one
``error:`` line naming the option) instead of a traceback minutes into a run. The demo tasks' own parsers
(``sapsel_kernels.demo.<task>.build_parser``) declare the validators of :mod:`sapsel_kernels._argtypes`, so
``python -m sapsel_kernels.demo.<task>`` and ``<task>.main([...])`` validate exactly like ``sapsel demo``.
"""

import argparse
import importlib
import os
import signal
import sys
from typing import Callable, List, Optional

DEMO_TASKS = ("labels", "canary")
DEFAULT_TASK = "labels"


def task_parser(task: str):
    """``(module, parser)`` of a demo task: ``sapsel_kernels.demo.<task>`` and its ``build_parser()``, which
    declares every option's validator (the CLI adds none)."""
    mod = importlib.import_module(f"sapsel_kernels.demo.{task}")
    return mod, mod.build_parser()


def _tasks_help(indent: str = "  ") -> str:
    parts = []
    for task in DEMO_TASKS:
        try:
            text = task_parser(task)[1].format_help().rstrip()
        except Exception as exc:  # help must not fail because one task cannot be imported here
            text = f"sapsel demo --task {task}: options unavailable ({type(exc).__name__}: {exc})"
        parts.append("\n".join(indent + line if line else line for line in text.splitlines()))
    return "\n\n".join(parts)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose epilog is computed when help is printed (the task parsers import torch-heavy
    modules; ``sapsel info`` must not pay for them)."""

    def __init__(self, *args, epilog_fn: Optional[Callable[[], str]] = None, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self._epilog_fn = epilog_fn

    def format_help(self) -> str:
        if self._epilog_fn is not None:
            self.epilog = self._epilog_fn()
        return super().format_help()


class _DemoHelp(argparse.Action):
    """``sapsel demo --help``: the demo usage and every task's options; ``--task T --help``: T's options only."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        task = getattr(namespace, "task", None)
        if task is not None:
            task_parser(task)[1].print_help()
        else:
            parser.print_help()
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="sapsel", description="sapsel-kernels command line",
                     epilog_fn=lambda: "demo tasks (sapsel demo --task TASK [options]):\n\n" + _tasks_help())
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="{info,demo}", parser_class=_Parser)
    p = sub.add_parser("info", help="versions, extension status and the backend that serves each op")
    p.add_argument("--cuda", action="store_true", help="also query the CUDA device (initialises CUDA)")
    p = sub.add_parser("demo", add_help=False, usage="sapsel demo [-h] [--task {labels,canary}] [task options]",
                       help=f"run an unlearning experiment: tasks {', '.join(DEMO_TASKS)} (sapsel demo --help "
                            "lists each task's options)",
                       description="Run an unlearning experiment. The options after --task are the task's own\n"
                                   "(listed below); all are validated before any training starts.",
                       epilog_fn=lambda: "tasks:\n\n" + _tasks_help())
    p.add_argument("-h", "--help", action=_DemoHelp, help="show this help (with --task T first: T's options only)")
    p.add_argument("--task", choices=DEMO_TASKS, default=None,
                   help=f"labels: label repair on scikit-learn digits; canary: credit-card canary on a char LM "
                        f"(default {DEFAULT_TASK})")
    return parser


def _info(args) -> int:
    import torch

    import sapsel_kernels as sk
    from sapsel_kernels import _backend
    from sapsel_kernels.ops import backend_table

    triton_version = "not installed"
    if _backend.triton_available():
        try:
            import triton

            triton_version = triton.__version__
        except Exception as exc:  # broken install
            triton_version = f"import failed: {exc}"
    print(f"sapsel-kernels {sk.__version__}")
    print(f"torch          {torch.__version__} (built with CUDA {torch.version.cuda})")
    print(f"triton         {triton_version} (TRITON_INTERPRET={int(_backend.triton_interpret())})")
    ext = "loaded" if sk.ext_loaded() else f"not loaded ({sk.ext_error()})"
    print(f"C++ extension  {ext}")
    if args.cuda:
        print(f"CUDA device    {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    table = backend_table()
    w = max([len("op")] + [len(n) for n in table])
    print()
    print(f"{'op':<{w}}  {'cpu':<10} {'cuda':<10}")
    print(f"{'-' * w}  {'-' * 10} {'-' * 10}")
    for name, b in table.items():
        print(f"{name:<{w}}  {b['cpu']:<10} {b['cuda']:<10}")
    return 0


def _demo(task: str, rest: List[str]) -> int:
    mod = importlib.import_module(f"sapsel_kernels.demo.{task}")
    return int(mod.main(rest) or 0)  # the task's main parses and validates first (usage errors: exit code 2)


def _main(argv: Optional[List[str]]) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.cmd == "info":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return _info(args)
    return _demo(args.task or DEFAULT_TASK, rest)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``sapsel`` console script; returns the exit code (argparse errors raise SystemExit(2)).

    A closed stdout (``sapsel info | head -1``) ends the command quietly with 128 + SIGPIPE = 141, the status a
    shell reports for a process stopped by SIGPIPE. Following the Python docs (signal module, "Note on SIGPIPE"),
    stdout is pointed at devnull so the interpreter's final flush cannot raise again.
    """
    try:
        try:
            return _main(argv)
        finally:
            # flush here, inside the handler, also when argparse exits (--help, --version, usage errors)
            sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + int(getattr(signal, "SIGPIPE", 13))


if __name__ == "__main__":
    sys.exit(main())
