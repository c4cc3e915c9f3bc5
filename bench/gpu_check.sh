#!/usr/bin/env bash
# GPU check for sapsel-kernels: run on a CUDA machine (no network needed) from anywhere:
#
#     bench/gpu_check.sh DIR        # DIR defaults to bench/results/gpu-<date>
#
# Builds the C++ extension in place, prints `sapsel info`, runs the CUDA tests (Triton compiled for the GPU, not
# interpreted), the benchmarks, then the CPU suite, and writes everything to DIR: gpu_check.log (all output),
# env.txt, info.txt, tests*.txt / junit xml, bench_*.json, summary.txt (exit status of each step). Budget: < 8 min
# on one H100-class GPU; every step has its own timeout and a failing step does not stop the later ones.
#
# Layout: one delimited section per area. Append yours as
#     # ===== section: <area> (issue N) =====   ...   # ===== end section: <area> =====
# using `step NAME TIMEOUT_S CMD...` so that its status lands in summary.txt.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
DIR="${1:-bench/results/gpu-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
exec > >(tee -a "$DIR/gpu_check.log") 2>&1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_INTERPRET=0          # tests/conftest.py defaults it to 1 for CPU CI; here Triton runs on the GPU
export SAPSEL_REQUIRE_EXT=1
T0=$(date +%s)

BUDGET="${SAPSEL_GPU_CHECK_BUDGET:-470}"  # seconds for the whole script (< 8 min); steps get what is left

step() {  # step NAME TIMEOUT_S CMD... : run, log, record the status; never abort the script
  local name="$1" limit="$2"; shift 2
  local left=$((BUDGET - ($(date +%s) - T0)))
  if [ "$left" -lt 15 ]; then
    echo "$name skipped (budget of $BUDGET s spent)" | tee -a "$DIR/summary.txt"; return 0
  fi
  [ "$limit" -gt "$left" ] && limit="$left"
  echo; echo "===== [$(($(date +%s) - T0)) s] $name (limit $limit s): $*"
  timeout "$limit" "$@"
  local rc=$?
  echo "$name rc=$rc ($(($(date +%s) - T0)) s)" | tee -a "$DIR/summary.txt"
  return 0
}

# ===== section: common (issue 2) =====
: > "$DIR/summary.txt"
{
  date -u
  nvidia-smi || true
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  python -c "import torch; print('device', torch.cuda.get_device_name(0), 'threads', torch.get_num_threads())"
  git -C "$ROOT" log --oneline -1 2>/dev/null || true
} > "$DIR/env.txt" 2>&1
cat "$DIR/env.txt"
step build 180 env SAPSEL_BUILD_EXT=1 MAX_JOBS="$(nproc)" python setup.py build_ext --inplace -q
step info 60 bash -c "python -m sapsel_kernels info | tee '$DIR/info.txt'"
# The CUDA tests (marker gpu; slow ones included) first: they are what only this machine can check. The CPU suite,
# which CI already runs, comes last, with whatever budget is left.
step tests_gpu 200 python -m pytest tests -m gpu -q -rs --durations=15 -p no:cacheprovider \
  --junitxml="$DIR/tests_gpu.xml"
# ===== end section: common =====

# ===== section: topk (issue 2) =====
# (the CUDA topk tests, marked gpu, ran in the suite above: CUDA vs C++ bit-identical, int64 past 2^31, opcheck)
step bench_topk 150 env SAPSEL_BENCH_FULL=1 python -m pytest bench/test_bench_topk.py --benchmark-only -q \
  -p no:cacheprovider --benchmark-json="$DIR/bench_topk.json" --benchmark-columns=median,min,max,rounds
# ===== end section: topk =====

# ===== section: sparse (issue 4) =====
# (the CUDA sparse/SAM tests, marked gpu, ran in the suite above: Triton SparseSAM/ASAM vs the CPU reference, bf16
# round-to-nearest in scatter-add, int64 addressing past 2^31 in one fp16 parameter)
step bench_sam 100 env SAPSEL_BENCH_FULL=1 python -m pytest bench/test_bench_sam.py --benchmark-only -q \
  -p no:cacheprovider --benchmark-json="$DIR/bench_sam.json" --benchmark-columns=median,min,max,rounds
# ===== end section: sparse =====

# ===== section: hessian (issue 3) =====
# (the CUDA probe/Hutchinson tests, marked gpu, ran in the suite above: Triton probes + fused Welford bit-identical to
# the CPU reference incl. offsets past 2^31, and a CUDA hessian_diag against the CPU one)
step bench_hessian 150 env SAPSEL_BENCH_FULL=1 python -m pytest bench/test_bench_hessian.py --benchmark-only -q -s \
  -p no:cacheprovider --benchmark-json="$DIR/bench_hessian.json" --benchmark-columns=median,min,max,rounds
cp bench/results/hessian_cuda_full.md "$DIR/" 2>/dev/null || true
# ===== end section: hessian =====

# ===== section: distributed (issue 13) =====
# The distributed paths over a one-rank NCCL group on the GPU (estimate, select, unlearn, SAM under DDP, FSDP2
# optimizers / estimate / select) against group=None on the same device: NCCL's device buffers, which gloo never
# exercises. It takes seconds, so it runs before the long pipeline steps.
step nccl_world1 90 python -m bench.nccl_check nccl "$DIR/nccl_world1.json"
# ===== end section: distributed =====

# ===== section: pipeline (issue 12) =====
# The whole pipeline on CUDA, in gradient and model-size units: GPT-2 124M float32, then the 1.0B Llama-style model
# in bf16 with one probe (the tables land in DIR as pipeline_*.md / .json).
step bench_pipeline_gpt2 120 env SAPSEL_BENCH_PIPELINE=gpt2 SAPSEL_BENCH_OUT="$DIR" python -m pytest \
  bench/test_bench_pipeline.py --benchmark-only -q -p no:cacheprovider --benchmark-json="$DIR/bench_pipeline_gpt2.json"
step bench_pipeline_llama1b 150 env SAPSEL_BENCH_PIPELINE=llama1b SAPSEL_BENCH_DTYPE=bfloat16 SAPSEL_BENCH_PROBES=1 \
  SAPSEL_BENCH_CG=1 SAPSEL_BENCH_OUT="$DIR" python -m pytest bench/test_bench_pipeline.py --benchmark-only -q \
  -p no:cacheprovider --benchmark-json="$DIR/bench_pipeline_llama1b.json"
# ===== end section: pipeline =====

# ===== section: large models and images (issues 24, 25) =====
# hvp="fd" against rev_rev on CUDA (error per step size, bias vs the probes' spread, ms per probe), and the images
# demo's quick grid (CPU models; checks that the new second-order rule and the task run in this environment).
step hvp_fd_cuda 60 bash -c "python bench/hvp_fd_bias.py --device cuda | tee '$DIR/hvp_fd_bias_cuda.md'"
step images_quick 90 python -m sapsel_kernels demo --task images --quick --no-progress --out "$DIR/images_quick"
# forget on the GPT-2 124M configuration (trained on the GPU until it memorises a card number, then forgotten):
# wall time, GPU peak, the ratio to retraining (issue 24); the model is not cached between runs.
step forget_scale_cuda 150 python bench/forget_scale.py --device cuda --out "$DIR/forget_scale_cuda" \
  --cache "${TMPDIR:-/tmp}/sapsel_forget_scale_cuda_$$.pt"
# ===== end section: large models and images =====

# ===== section: tail (lead) =====
step tests_cpu 200 python -m pytest tests -m "not slow and not gpu" -q -p no:cacheprovider \
  --junitxml="$DIR/tests_cpu.xml"
# ===== end section: tail =====

echo; echo "done in $(($(date +%s) - T0)) s; results in $DIR"; cat "$DIR/summary.txt"
