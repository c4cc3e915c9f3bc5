"""``forget`` on a 124M-parameter GPT-2, trained here until it memorises a card number: wall time, peak memory, and
the ratio to retraining.

The model is the GPT-2 124M configuration (12 layers, 768 wide, 12 heads, 1024 positions, vocabulary 50,257: the
rows past the locally trained byte-level BPE's 768 symbols are never the target of a training token, as in a
padded vocabulary). It is trained from scratch, here, on pydoc text (``--chars`` characters) with one card number
planted ``--repeats`` times after its prefix, on windows of ``--seq`` tokens that start at a line start, until
greedy decoding of the prefix reproduces the card (checked every ``--check`` steps; then ``--extra`` more steps).
Retraining is priced as what it would be: the same recipe, the same number of steps, at the measured time per
step.

Then ``forget`` (the defaults when it was measured, pinned here: ssd, 1%, the batch mean's NPO term at beta 1,
steering to 80%; the measurement sizes below) removes the card, with
held-out pydoc text for the utility check. Peak memory is the process's peak resident set (VmHWM) during the
``forget`` call, after resetting it (``/proc/self/clear_refs``), beside the resident set with the model loaded.

    python bench/forget_scale.py --out bench/results/forget_scale

Results: ``forget_scale.json`` and ``forget_scale.md`` in ``--out``; ``--cache`` keeps the trained model so that a
second run skips training.
"""

import argparse
import json
import os
import platform
import random
import sys
import time

import torch
import torch.nn.functional as F


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def build_data(chars: int, held_chars: int, repeats: int, seed: int):
    from sapsel_kernels.demo.lm import cut_text, load_corpus
    from sapsel_kernels.forget_example import make_secrets, tokenize_scrubbed

    train_full, held_full = load_corpus()
    base, held = cut_text(train_full, chars), cut_text(held_full, held_chars)
    card = make_secrets(seed)[0]
    rng = random.Random(seed)
    lines = base.splitlines(keepends=True)
    for pos in sorted(rng.sample(range(len(lines) + 1), repeats), reverse=True):
        lines.insert(pos, f"{card['prefix']} {card['secret']}\n")
    text = "".join(lines)
    tok, enc, ids = tokenize_scrubbed(text, [card])
    return text, held, card, tok, enc, ids


def make_model(seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def greedy(model, tok, prefix: str, n_chars: int) -> str:
    from sapsel_kernels.forget_example import greedy_completion

    return greedy_completion(model, tok, prefix, n_chars)


def train_until_memorised(model, tok, text, enc, ids, card, a):
    from sapsel_kernels.forget_example import line_start_windows

    T = a.seq
    starts = line_start_windows(enc.offsets, text, len(ids), T)
    gen = torch.Generator().manual_seed(a.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.1)
    target = " " + card["secret"]
    step_times, log = [], []
    memorised_at = None
    model.train()
    k = 0
    while k < a.max_train_steps:
        lr = a.lr * min(1.0, (k + 1) / 20)
        for g in opt.param_groups:
            g["lr"] = lr
        t0 = time.perf_counter()
        pick = starts[torch.randint(len(starts), (a.batch,), generator=gen)]
        x = torch.stack([ids[s:s + T] for s in pick.tolist()]).to(a.device)
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if a.device != "cpu":
            torch.cuda.synchronize()
        step_times.append(time.perf_counter() - t0)
        k += 1
        if k % a.check == 0:
            model.eval()
            got = greedy(model, tok, card["prefix"], len(target))
            model.train()
            hit = got == target
            log.append({"step": k, "loss": float(loss), "greedy": got, "extracted": hit})
            print(f"  train step {k}: loss {float(loss):.3f}, greedy {got!r}", flush=True)
            if hit and memorised_at is None:
                memorised_at = k
            if memorised_at is not None and k >= memorised_at + a.extra:
                break
    model.eval()
    return {"steps": k, "memorised_at": memorised_at, "step_s_mean": sum(step_times) / len(step_times),
            "step_s_median": sorted(step_times)[len(step_times) // 2], "train_s": sum(step_times), "log": log}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--cache", default="/tmp/forget_scale_gpt2_124m.pt")
    ap.add_argument("--chars", type=int, default=12_000)
    ap.add_argument("--held-chars", type=int, default=6_000)
    ap.add_argument("--repeats", type=int, default=16)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--check", type=int, default=25)
    ap.add_argument("--extra", type=int, default=25)
    ap.add_argument("--max-train-steps", type=int, default=600)
    ap.add_argument("--forget-steps", type=int, default=60)
    ap.add_argument("--n-candidates", type=int, default=500)
    ap.add_argument("--n-monitor", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--save", default=None, help="also save the original and the unlearned model, the tokenizer, the "
                    "report and the training text here, for bench/forget_check.py (an independent measurement)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    from sapsel_kernels.forget import Evidence, MeasureConfig, SelectConfig, UpdateConfig, forget
    from sapsel_kernels.forgetting import forget as forget_module
    from sapsel_kernels.rules import Targeted

    forget_module.STEER_MARGIN = 0.8  # the defaults when docs/scale.md was measured (0.7 since)
    text, held, card, tok, enc, ids = build_data(a.chars, a.held_chars, a.repeats, a.seed)
    model = make_model(a.seed).to(a.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.1f}M parameters, {len(ids)} training tokens, BPE of {len(tok)} symbols", flush=True)
    if os.path.exists(a.cache):
        blob = torch.load(a.cache, weights_only=False, map_location=a.device)
        model.load_state_dict(blob["state"])
        training = blob["training"]
        print(f"loaded the trained model from {a.cache}", flush=True)
    else:
        training = train_until_memorised(model, tok, text, enc, ids, card, a)
        torch.save({"state": model.state_dict(), "training": training}, a.cache)
    if training["memorised_at"] is None:
        print("the model did not memorise the card within --max-train-steps; raise it", file=sys.stderr)
        return 2
    model.eval()
    if a.save:
        os.makedirs(os.path.join(a.save, "original"), exist_ok=True)
        model.save_pretrained(os.path.join(a.save, "original"))
        with open(os.path.join(a.save, "train.txt"), "w", encoding="utf-8") as f:
            f.write(text)
    rss_model = rss_kib("VmRSS")
    peak_reset = reset_peak()
    if a.device != "cpu":
        torch.cuda.reset_peak_memory_stats()
        gpu_base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    rep = forget(model, tok, [text], {"secret": card["secret"], "prefix": card["prefix"]}, heldout=[held], seed=a.seed,
                 # the settings docs/scale.md measured (the defaults then: ssd, 1%, the batch mean's NPO, beta 1,
                 # steering to 80%)
                 select=SelectConfig(strategy="ssd", budget=0.01, hessian_windows=16),
                 update=UpdateConfig(rule=Targeted(steps=a.forget_steps, beta=1.0), seq_len=a.seq, batch_size=4,
                                     per_token=False, precondition=None),
                 measure=MeasureConfig(n_candidates=a.n_candidates, n_monitor=a.n_monitor,
                                       evidence=Evidence(n_samples=16, relearn_steps=20), progress=False))
    wall = time.perf_counter() - t0
    peak = rss_kib("VmHWM")
    if a.save:  # the folder forget_check.py reads: model, tokenizer, report.json
        model.save_pretrained(a.save)
        tok.save_pretrained(a.save)
        with open(os.path.join(a.save, "report.json"), "w") as f:
            json.dump(rep.to_dict(), f, default=str)
    gpu_peak_extra = (torch.cuda.max_memory_allocated() - gpu_base) / 2**30 if a.device != "cpu" else None
    retrain_s = training["steps"] * training["step_s_median"]
    s = rep.secrets[0]
    row = {"n_parameters": n_params, "training": {k: v for k, v in training.items() if k != "log"},
           "training_log": training["log"], "forget_wall_s": wall, "cost": rep.cost,
           "rss_model_gib": rss_model / 2**20, "peak_rss_gib": peak / 2**20, "peak_reset": peak_reset,
           "peak_extra_gib": (peak - rss_model) / 2**20, "retrain_s": retrain_s, "ratio_to_retraining":
           wall / retrain_s, "reached": rep.reached, "stopped_by": rep.stopped_by, "k": rep.k,
           "exposure_before": s["exposure_before"], "exposure_after": s["exposure_after"],
           "extracted_before": s["extracted_before"], "extracted_after": s["extracted_after"],
           "ppl_increase": rep.ppl_increase, "utility": rep.utility, "device": a.device,
           "gpu_peak_extra_gib": gpu_peak_extra}
    meta = {"argv": ["python", "bench/forget_scale.py", *(argv if argv is not None else sys.argv[1:])],
            "machine": (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
                        f"{torch.__version__}, {a.threads} thread(s)"
                        + (f", {torch.cuda.get_device_name(0)}" if a.device != "cpu" else ""))}
    with open(os.path.join(a.out, "forget_scale.json"), "w") as f:
        json.dump({"meta": meta, "row": row}, f, indent=1, default=str)
    c = rep.cost
    md = [f"GPT-2 124M configuration ({n_params / 1e6:.1f}M parameters), float32, trained here from scratch on "
          f"{len(ids)} tokens until greedy decoding reproduced the card (step {training['memorised_at']}; "
          f"{training['steps']} steps of {a.batch}x{a.seq} tokens, median {training['step_s_median']:.2f} s/step).",
          "",
          "| phase | wall (s) |", "|---|---|",
          f"| forget, total | {wall:.0f} |",
          f"| scoring (ssd) | {c['score_s']:.0f} |",
          f"| unlearning steps (monitor included) | {c['unlearn_s']:.0f} |",
          f"| of which the monitor | {c['monitor_s']:.0f} |",
          f"| reported measurement | {c['measure_s']:.0f} |",
          f"| attacks (relearning, int8) | {c['attack_s']:.0f} |",
          "",
          f"- Retraining, priced: {training['steps']} steps x {training['step_s_median']:.2f} s = {retrain_s:.0f} s; "
          f"forget / retraining = **{wall / retrain_s:.2f}x**.",
          f"- Peak resident memory during forget: {peak / 2**20:.2f} GiB (model loaded: {rss_model / 2**20:.2f} GiB; "
          f"extra {(peak - rss_model) / 2**20:.2f} GiB; peak reset: {peak_reset})"
          + (f"; GPU: {gpu_peak_extra:.2f} GiB allocated beyond the model." if gpu_peak_extra is not None else "."),
          f"- Steps {c['steps']} ({rep.stopped_by}), k = {rep.k}; exposure {s['exposure_before']:.1f} -> "
          f"{s['exposure_after']:.1f} bits; extracted before {bool(s['extracted_before'])}, after "
          f"{bool(s['extracted_after'])}; held-out perplexity {100 * rep.ppl_increase:+.1f}%; reached: "
          f"{rep.reached}.",
          f"- After {20} relearning steps on the retained text: exposure "
          f"{(s.get('relearn_after') or {}).get('exposure', float('nan')):.1f} bits, extracted "
          f"{(s.get('relearn_after') or {}).get('extracted')} (before unlearning: "
          f"{(s.get('relearn_before') or {}).get('exposure', float('nan')):.1f} bits).",
          "", f"{meta['machine']}; command: `{' '.join(meta['argv'])}`"]
    with open(os.path.join(a.out, "forget_scale.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
