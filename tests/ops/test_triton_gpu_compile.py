"""Every Triton kernel compiles for a real GPU (sm_80 via ptxas; no GPU needed), under the specialisations the
runtime launcher applies.

The interpreter (how CI runs the kernels) never specialises arguments, but the GPU launcher does: an int argument
equal to 1 becomes a compile-time constant (``constexpr``), on which tensor methods such as ``.to()`` do not exist.
That bug class (seed 1, probe 1, a radix prefix of 1, AdamW step 1, ...) is invisible on CPU, so each kernel is
compiled here with every specialisable int argument (a) as a runtime i32/i64 and (b) equal to 1.
"""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

_SCRIPT = r'''
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
try:
    target = GPUTarget("cuda", 80, 32)
except Exception as exc:
    print("SKIP", exc); sys.exit(0)
from sapsel_kernels.kernels import philox, probes, sparse, topk

F32, I64, U32, I32, I16 = "*fp32", "*i64", "*u32", "*i32", "*i16"
# kernel -> ({runtime param: type ('int' = an int scalar, 'fp32' = a float scalar, or a pointer type)}, constexprs)
KERNELS = {
    philox._rademacher_kernel: ({"out_ptr": F32, "n": "int", "offset": "int", "probe": "int", "seed_lo": "int",
                                 "seed_hi": "int"}, {"GROUPS": 8}),
    probes._rademacher_probe_kernel: ({"out_ptr": F32, "n": "int", "offset": "int", "probe": "int",
                                       "seed_lo": "int", "seed_hi": "int"}, {"GROUPS": probes.GROUPS}),
    probes._hutchinson_accumulate_kernel: ({"mean_ptr": F32, "m2_ptr": F32, "hz_ptr": "*bf16", "inv_ptr": F32,
                                            "n": "int", "offset": "int", "probe": "int", "seed_lo": "int",
                                            "seed_hi": "int"}, {"M": 2, "GROUPS": probes.GROUPS}),
    sparse._sparse_gather_kernel: ({"flat_ptr": F32, "idx_ptr": I64, "out_ptr": F32, "k": "int"}, {"BLOCK": 1024}),
    sparse._sparse_scatter_add_kernel: ({"out_ptr": F32, "idx_ptr": I64, "vals_ptr": F32, "k": "int"},
                                        {"ACC": "float32", "BLOCK": 1024}),
    sparse._sam_grad_sqnorm_kernel: ({"g_ptr": F32, "w_ptr": F32, "idx_ptr": I64, "off": "int", "part_ptr": F32,
                                      "n": "int", "eta": "fp32"},
                                     {"ADAPTIVE": True, "FULL": False, "ACC": "float32", "BLOCK": 1024}),
    sparse._sam_perturb_kernel: ({"w_ptr": F32, "g_ptr": F32, "idx_ptr": I64, "off": "int", "saved_ptr": F32,
                                  "k": "int", "scale": "fp32", "eta": "fp32"},
                                 {"ADAPTIVE": True, "ACC": "float32", "BLOCK": 1024}),
    sparse._sparse_sgd_step_kernel: ({"w_ptr": F32, "g_ptr": F32, "idx_ptr": I64, "off": "int", "buf_ptr": F32,
                                      "saved_ptr": F32, "k": "int", "lr": "fp32", "momentum": "fp32",
                                      "dampening": "fp32", "weight_decay": "fp32", "inv_scale": "fp32"},
                                     {"HAS_MOM": True, "FIRST": False, "NESTEROV": True, "HAS_SAVED": True,
                                      "HAS_WD": True, "ACC": "float32", "BLOCK": 1024}),
    sparse._sparse_adamw_step_kernel: ({"w_ptr": F32, "g_ptr": F32, "idx_ptr": I64, "off": "int", "m_ptr": F32,
                                        "v_ptr": F32, "saved_ptr": F32, "k": "int", "decay": "fp32",
                                        "beta1": "fp32", "beta2": "fp32", "eps": "fp32", "step_size": "fp32",
                                        "bc2_sqrt": "fp32", "inv_scale": "fp32"},
                                       {"HAS_SAVED": True, "ACC": "float32", "BLOCK": 1024}),
    topk._topk_hist_kernel: ({"x_ptr": I32, "n": "int", "hist_ptr": I64, "prefix": "int"},
                             {"PREFIX_SHIFT": 21, "DIGIT_SHIFT": 10, "NBINS": 2048, "HAS_PREFIX": True,
                              "KEY_BITS": 32, "FLIP": False, "BLOCK": 2048, "TILES": 2}),
    topk._topk_count_kernel: ({"x_ptr": I16, "n": "int", "thr": "int", "gt_ptr": I64, "eq_ptr": I64},
                              {"KEY_BITS": 16, "FLIP": True, "BLOCK": 2048, "TILES": 2}),
    topk._topk_write_kernel: ({"x_ptr": I32, "n": "int", "thr": "int", "quota": "int", "out_off_ptr": I64,
                               "eq_before_ptr": I64, "out_ptr": I64},
                              {"KEY_BITS": 32, "FLIP": False, "BLOCK": 2048, "TILES": 2}),
}
import triton.language as tl
failures = []
for fn, (rt, cx) in KERNELS.items():
    params = [p.name for p in fn.params]
    missing = set(params) - set(rt) - set(cx)
    assert not missing, (fn.__name__, missing)
    nospec = {p.name for p in fn.params if p.do_not_specialize}
    for variant in ("i32", "i64", "ones"):
        sig, consts = {}, {k: (getattr(tl, v) if isinstance(v, str) else v) for k, v in cx.items()}
        for name in params:
            if name in cx:
                sig[name] = "constexpr"
            elif rt[name] == "int":
                if variant == "ones" and name not in nospec:
                    sig[name] = "constexpr"
                    consts[name] = 1
                else:
                    sig[name] = "i32" if variant == "i32" else "i64"
            else:
                sig[name] = rt[name]
        try:
            triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target)
        except Exception as exc:
            failures.append(f"{fn.__name__} [{variant}]: {type(exc).__name__}: {str(exc).splitlines()[-1][:300]}")
print("KERNELS", len(KERNELS))
print("FAILURES", len(failures))
for f in failures:
    print(f)
'''


def test_every_kernel_compiles_for_gpu_under_launcher_specialisation():
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, check=False,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    if out.stdout.startswith("SKIP"):
        pytest.skip(f"cannot compile for CUDA here: {out.stdout.strip()}")
    assert "FAILURES 0" in out.stdout, out.stdout
