"""The finite-difference HVP (hvp="fd") against reverse-over-reverse on a GPT-2 built from config: relative error of
H v per step size and dtype, the bias of a Hutchinson estimate against the probes' own spread, and the cost per probe.

    python bench/hvp_fd_bias.py [--layers 2] [--embd 32] [--probes 16] [--device cuda]

The oracle is rev_rev in float64 on the same weights with eager attention. Prints a markdown table.
"""

import argparse
import time

import torch

import sapsel_kernels.hvp as H
from sapsel_kernels.space import ParamSpace


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--embd", type=int, default=32)
    ap.add_argument("--probes", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    import transformers

    torch.set_num_threads(1)
    kw = dict(vocab_size=50, n_positions=16, n_embd=args.embd, n_layer=args.layers, n_head=2, bos_token_id=0,
              eos_token_id=0, attn_implementation="eager")
    torch.manual_seed(0)
    m32 = transformers.GPT2LMHeadModel(transformers.GPT2Config(**kw)).eval().to(dev)
    m64 = transformers.GPT2LMHeadModel(transformers.GPT2Config(**kw)).double().eval().to(dev)
    m64.load_state_dict(m32.state_dict())
    ids = torch.randint(0, 50, (4, 12)).to(dev)

    def lm(m, b):
        return m(b, labels=b).loss

    sp32, sp64 = ParamSpace(m32), ParamSpace(m64)
    g = torch.Generator().manual_seed(1)
    V = [(torch.randint(0, 2, (args.probes, *p.shape), generator=g) * 2 - 1).float().to(dev) for p in sp32.params]

    def flat(parts, j):
        return torch.cat([t[j].reshape(-1).double() for t in parts])

    exact = H.HVP(m64, lm, sp64, "rev_rev", vectorize=False)([v.double() for v in V], ids)
    print(f"GPT-2 {args.layers} layers, n_embd {args.embd}: {sp32.numel} parameters, {args.probes} probes, "
          f"{dev}\n")
    print("| dtype | c (step / RMS weight) | relative error of H v (mean over probes) |")
    print("|---|---|---|")
    default = dict(H.FD_REL_STEP)
    for dt, model, sp, cs in ((torch.float32, m32, sp32, (1e-4, 3e-4, 5e-4, 1e-3, 3e-3, 1e-2)),
                              (torch.float64, m64, sp64, (3e-5, 1e-4, 3e-4, 1e-3))):
        for c in cs:
            H.FD_REL_STEP[dt] = c
            out = H.HVP(model, lm, sp, "fd")([v.to(dt) for v in V], ids)
            err = sum(float((flat(out, j) - flat(exact, j)).norm() / flat(exact, j).norm())
                      for j in range(args.probes)) / args.probes
            mark = " (default)" if c == default[dt] else ""
            print(f"| {str(dt).replace('torch.', '')} | {c:g}{mark} | {err:.1e} |")
        H.FD_REL_STEP[dt] = default[dt]
    # bias of the diagonal estimate vs the probes' spread (float32, the default step)
    fd = H.HVP(m32, lm, sp32, "fd")(V, ids)
    zs = torch.stack([flat(V, j) * flat(fd, j) for j in range(args.probes)])
    ze = torch.stack([flat(V, j) * flat(exact, j) for j in range(args.probes)])
    bias = float((zs.mean(0) - ze.mean(0)).norm())
    spread = float(ze.std(0).norm() / args.probes ** 0.5)
    print(f"\nHutchinson over {args.probes} probes (float32, default step): ‖mean(z⊙H_fd z) − mean(z⊙H z)‖ = "
          f"{bias:.2e}, the standard error of the exact-HVP estimate ‖std/√m‖ = {spread:.2e} "
          f"(ratio {bias / spread:.1e})")
    # cost per probe
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for mode in ("rev_rev", "fd"):
        eng = H.HVP(m32, lm, sp32, mode, vectorize=False)
        eng([v[:1] for v in V], ids)
        sync()
        t0 = time.perf_counter()
        eng(V, ids)
        sync()
        per = (time.perf_counter() - t0) / args.probes
        print(f"{mode}: {1e3 * per:.1f} ms per probe")
    sync()
    t0 = time.perf_counter()
    for _ in range(args.probes):
        H.gradient(m32, lm, sp32, ids)
    sync()
    print(f"one gradient: {1e3 * (time.perf_counter() - t0) / args.probes:.1f} ms")


if __name__ == "__main__":
    main()
