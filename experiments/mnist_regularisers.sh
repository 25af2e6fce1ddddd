#!/usr/bin/env bash
# Issue #12's MNIST experiment (b): SNS vs PGD-AT, and SAGR vs JR vs IGR vs natural, SmallCNN at
# L-inf eps 0.3, same epoch budget, each judged by `robustkit evaluate` (clean and PGD-40 on all
# 10,000 test images; AutoAttack standard on the first 500, with the gradient-masking checks:
# a gradient regulariser is judged by AutoAttack only), then (a): the neuron sensitivity of every
# model (`robustkit sensitivity`, white-box PGD-20 on each, first 1,000 test images, bootstrap CIs).
#
# Configs: configs/train/mnist_{natural,pgd_at,sns,igr,jr,sagr}.yaml (TRADES' MNIST recipe);
# overridden only to fit 2 CPU cores: EPOCHS epochs (default 3) and, for the attacked objectives,
# 10 attack steps of eps/4 instead of 40 of 0.01 (as experiments/mnist_smallcnn.sh).
# One torch thread per run; two runs side by side. Resumable: rerun the same command.
#
# Usage: bash experiments/mnist_regularisers.sh [DATA_ROOT] [OUT]     (from the repository root)
set -euo pipefail
DATA=${1:-../shared/data}
OUT=${2:-runs/exp_regularisers}
EPOCHS=${EPOCHS:-3}
RK=${RK:-robustkit}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"

train() {  # train NAME [overrides ...]: wall/CPU seconds into $OUT/NAME.time.json
  local name=$1; shift
  /usr/bin/time -f '{"wall_s": %e, "cpu_s": %U, "sys_s": %S}' -o "$OUT/$name.time.json" \
    $RK train -c "configs/train/mnist_$name.yaml" --data-root "$DATA" \
    trainer.epochs="$EPOCHS" trainer.out_dir="$OUT/$name" trainer.resume=auto \
    log.progress=false "$@"
}

evaluate() {  # evaluate NAME: the last epoch's weights
  local name=$1
  $RK evaluate --model small_cnn --checkpoint "$OUT/$name/last.pt" --dataset mnist \
    --data-root "$DATA" --attacks clean,pgd40 --name "$name" --out "$OUT/$name/eval_pgd40" \
    --no-progress
  $RK evaluate --model small_cnn --checkpoint "$OUT/$name/last.pt" --dataset mnist \
    --data-root "$DATA" --n-examples 500 --attacks clean,pgd40,autoattack --aa-version standard \
    --name "$name" --out "$OUT/$name/eval_aa500" --no-progress
}

K10=(objective.params.steps=10 objective.params.alpha=0.075)
train igr & train jr
wait
train sagr & train natural
wait
train sns "${K10[@]}" & train pgd_at "${K10[@]}"
wait
for name in natural igr jr sagr pgd_at sns; do evaluate "$name"; done

# (a) neuron sensitivity: every model on its own white-box x', and the shipped reference pair
models=()
for name in natural igr jr sagr pgd_at sns; do
  models+=(--model small_cnn --checkpoint "$OUT/$name/last.pt" --name "$name")
done
$RK sensitivity "${models[@]}" --model robustkit:mnist_smallcnn_standard \
  --model robustkit:mnist_smallcnn_robust --dataset mnist --data-root "$DATA" \
  --n-examples 1000 --out "$OUT/sensitivity" --no-progress
