#!/usr/bin/env bash
# The README's MNIST experiment: SmallCNN at L-inf eps 0.3, natural vs PGD-AT vs TRADES vs SRD-DAT
# under the same epoch budget, each evaluated by `robustkit evaluate` (clean and PGD-40 on all
# 10,000 test images; AutoAttack standard on the first 500).
#
# The configs are configs/train/mnist_*.yaml (TRADES' MNIST recipe: SGD lr 0.01, momentum 0.9,
# batch 128); only the length and the attack budget are overridden to fit 2 CPU cores:
#   EPOCHS epochs (default 3) instead of 100, and 10 attack steps of eps/4 instead of 40 of 0.01
#   (SRD-DAT: k_max 10, step_ratio 1/4, so alpha_i = eps_i/4 and 0.075 at eps_hi).
# One torch thread per run (OMP_NUM_THREADS=1), so two runs share the 2 cores: TRADES and SRD-DAT
# ran side by side, then PGD-AT and natural.
#
# Usage: bash experiments/mnist_smallcnn.sh [DATA_ROOT] [OUT]     (from the repository root)
set -euo pipefail
DATA=${1:-../shared/data}
OUT=${2:-runs/exp_mnist}
EPOCHS=${EPOCHS:-3}
RK=${RK:-robustkit}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

train() {  # train NAME [overrides ...]
  local name=$1; shift
  $RK train -c "configs/train/mnist_$name.yaml" --data-root "$DATA" \
    trainer.epochs="$EPOCHS" trainer.out_dir="$OUT/$name" log.progress=false "$@"
}

evaluate() {  # evaluate NAME
  local name=$1
  $RK evaluate --model small_cnn --checkpoint "$OUT/$name/last.pt" --dataset mnist \
    --data-root "$DATA" --attacks clean,pgd40 --name "$name" --out "$OUT/$name/eval_pgd40" \
    --no-progress
  $RK evaluate --model small_cnn --checkpoint "$OUT/$name/last.pt" --dataset mnist \
    --data-root "$DATA" --n-examples 500 --attacks clean,autoattack --aa-version standard \
    --name "$name" --out "$OUT/$name/eval_aa500" --no-progress
}

K10=(objective.params.steps=10 objective.params.alpha=0.075)
train trades "${K10[@]}" & train srd_dat objective.params.k_max=10 objective.params.step_ratio=0.25
wait
train pgd_at "${K10[@]}" & train natural
wait
for name in natural pgd_at trades srd_dat; do evaluate "$name"; done
