#!/usr/bin/env bash
# Issue #13's CIFAR-10 saliency experiment: a standard and a PGD-AT CifarCNN trained on the same
# CIFAR-10 subset (the 4,000 training images of shared/data: 3,500 to train, the last 500 held
# out), then `robustkit inspect` of both next to the full-data standard ResNet-18 shipped in
# pyautoattack, on the first N test images (default 200), x' = white-box PGD-20 at 8/255.
#
# Budget for 2 CPU cores: CifarCNN (2.3 M parameters) rather than a ResNet, EPOCHS epochs
# (default 15) with a cosine schedule, PGD-5 (alpha 2/255) training attack. Same epochs, data,
# augmentation and schedule for both models: only the objective differs.
# Resumable: rerun the same command.
#
# Usage: bash experiments/cifar10_saliency.sh [DATA_ROOT] [OUT]     (from the repository root)
set -euo pipefail
DATA=${1:-../shared/data}
OUT=${2:-runs/cifar10_saliency}
EPOCHS=${EPOCHS:-15}
N=${N:-200}
PYTHON=${PYTHON:-python}
RK=${RK:-"$PYTHON -m robustkit"}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"

train() {  # train OBJECTIVE [overrides ...]
  local name=$1; shift
  [ -f "$OUT/$name/last.pt" ] && grep -q "\"epoch\": $EPOCHS\b" "$OUT/$name/metrics.jsonl" 2>/dev/null \
    && return 0
  $RK train -c "configs/train/cifar10_$name.yaml" --data-root "$DATA" model.name=cifar_cnn \
    data.holdout=500 data.num_workers=0 optim.schedule=cosine optim.lr=0.05 \
    trainer.epochs="$EPOCHS" trainer.eval_every=5 trainer.out_dir="$OUT/$name" \
    trainer.resume=auto log.progress=false "$@"
}
train natural
train pgd_at objective.params.steps=5

for name in natural pgd_at; do
  [ -f "$OUT/$name/eval/results.json" ] || $RK evaluate --model cifar_cnn \
    --checkpoint "$OUT/$name/last.pt" --dataset cifar10 --data-root "$DATA" \
    --attacks clean,pgd20 --name "cifar_cnn_$name" --out "$OUT/$name/eval" --no-progress
done

# The table in docs/experiments.md explains the true label (the default then); inspect now
# explains the predicted class by default: TARGET=predicted for that.
TARGET=${TARGET:-true}
$RK inspect --dataset cifar10 --data-root "$DATA" --n-examples "$N" \
  --model cifar_cnn --checkpoint "$OUT/natural/last.pt" --name cifar_cnn_standard \
  --model cifar_cnn --checkpoint "$OUT/pgd_at/last.pt" --name cifar_cnn_pgd_at \
  --model "$($PYTHON -c 'import robustkit.testing as t; print(t.__file__)'):pyautoattack_resnet18" \
  --name resnet18_standard_full_data \
  --explainers gradient,smoothgrad,adaptgrad --faithfulness --target "$TARGET" --out "$OUT/inspect" --no-progress
