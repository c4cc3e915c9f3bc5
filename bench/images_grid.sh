#!/usr/bin/env bash
# The image-unlearning grid of docs/unlearning.md: 8 settings x 7 strategies x 3 budgets x 3 rules x SEEDS seeds.
# Two single-threaded processes (the machine has 2 cores), one run per seed each, then one merge.
# Usage: bash bench/images_grid.sh [SEEDS=5] [OUT=bench/results/images]
set -euo pipefail
SEEDS=${1:-5}
OUT=${2:-bench/results/images}
A=shapes/resnet/flips,shapes/resnet/backdoor
B=shapes/cnn/flips,shapes/cnn/backdoor,digits/cnn/flips,digits/cnn/backdoor,digits/resnet/flips,digits/resnet/backdoor
mkdir -p "$OUT/raw"
run() {  # group name, settings
  for ((s = 0; s < SEEDS; s++)); do
    python -m sapsel_kernels demo --task images --settings "$2" --seed "$s" --seeds 1 --threads 1 --no-progress \
      --out "$OUT/raw/$1_s$s" > "$OUT/raw/$1_s$s.log" 2>&1
  done
}
run A "$A" &
run B "$B" &
wait
python -m sapsel_kernels demo --task images --merge "$OUT"/raw/*/demo_images.json --out "$OUT"
