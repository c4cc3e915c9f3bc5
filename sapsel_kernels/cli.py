"""Command line: ``sapsel info`` and ``sapsel demo``."""

import argparse
import importlib
import sys


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


DEMO_TASKS = ("labels", "canary")


def _demo(args, rest) -> int:
    mod = importlib.import_module(f"sapsel_kernels.demo.{args.task}")
    return int(mod.main(rest) or 0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sapsel", description="sapsel-kernels command line")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("info", help="versions, extension status and the backend that serves each op")
    p.add_argument("--cuda", action="store_true", help="also query the CUDA device (initialises CUDA)")
    p = sub.add_parser("demo", help="run an unlearning experiment (sapsel demo --help for its options)",
                       add_help=False)
    p.add_argument("--task", choices=DEMO_TASKS, default="labels",
                   help="labels: label repair on scikit-learn digits; canary: credit-card canary on a char LM")
    args, rest = parser.parse_known_args(argv)
    if args.cmd == "info":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return _info(args)
    return _demo(args, rest)


if __name__ == "__main__":
    sys.exit(main())
