#!/usr/bin/env bash
# Retrain and re-evaluate the two shipped reference models (robustkit:mnist_smallcnn_standard and
# robustkit:mnist_smallcnn_robust) from scratch on full MNIST, then ship them into
# robustkit/assets/models/ with their model cards (train/ship_model.py).
#
# Recipes (SmallCNN, TRADES' MNIST network; 59,000 training images, the last 1,000 held out):
#   standard: natural training, SGD lr 0.01 momentum 0.9, batch 128, 8 epochs (lr x0.1 at 6),
#             the last epoch shipped.
#   robust:   PGD-AT at L-inf eps 0.3, 10 steps of eps/4 from a uniform start, SGD lr 0.01
#             momentum 0.9, batch 128, 18 epochs with lr x0.1 at epochs 13 and 16; best.pt by
#             held-out PGD-20. About 2 hours on 2 idle CPU cores (6-7 min per epoch).
# Evaluation (on the float16 weights that ship): clean and PGD-40 on all 10,000 test images,
# AutoAttack standard on the first 500, with robustkit's checks.
#
# Usage: bash experiments/mnist_reference_models.sh [DATA_ROOT] [OUT]   (repository root)
# Resumable: rerun the same command after an interruption (trainer.resume=auto, evaluate state).
set -euo pipefail
DATA=${1:-../shared/data}
OUT=${2:-runs/reference}
RK=${RK:-robustkit}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

timed() {  # timed NAME cmd...: wall and CPU seconds of the command into $OUT/NAME.time.json
  local name=$1; shift
  local t0; t0=$(date +%s.%N)
  /usr/bin/time -f '{"wall_s": %e, "cpu_s": %U, "sys_s": %S}' -o "$OUT/$name.time.json" "$@"
  echo "$name: $(cat "$OUT/$name.time.json") (started $t0)"
}

mkdir -p "$OUT"
timed standard $RK train -c configs/train/mnist_natural.yaml --data-root "$DATA" \
  name=mnist_smallcnn_standard trainer.epochs=8 optim.milestones=[6] \
  trainer.out_dir="$OUT/standard" trainer.resume=auto log.progress=false
timed robust $RK train -c configs/train/mnist_pgd_at.yaml --data-root "$DATA" \
  name=mnist_smallcnn_robust objective.params.steps=10 objective.params.alpha=0.075 \
  trainer.epochs=18 optim.milestones=[13,16] trainer.eval_steps=20 \
  trainer.out_dir="$OUT/robust" trainer.resume=auto log.progress=false

# standard: the last epoch (best.pt follows held-out PGD accuracy, ~0 for a natural model);
# robust: best.pt, the epoch with the best held-out PGD-20 accuracy (Rice et al. 2020).
for m in standard robust; do
  name=mnist_smallcnn_$m
  ckpt="$OUT/$m/best.pt"; [ $m = standard ] && ckpt="$OUT/$m/last.pt"
  python train/ship_model.py "$name" --checkpoint "$ckpt" --export-only
  ev() { $RK evaluate --model "robustkit:$name" --no-progress "$@"; }
  ev --dataset mnist --data-root "$DATA" --attacks clean,pgd40 --out "$OUT/$m/eval_pgd40"
  ev --dataset mnist --data-root "$DATA" --n-examples 500 --attacks clean,autoattack \
    --out "$OUT/$m/eval_aa500"
  # the shipped MNIST test sample (the first 1,000 test images): what tests/test_reference_models.py
  # re-measures from a fresh clone
  ev --dataset sample-mnist --attacks clean --out "$OUT/$m/eval_sample_clean"
  ev --dataset sample-mnist --n-examples 100 --attacks clean,pgd10 --out "$OUT/$m/eval_sample_pgd10"
  python train/ship_model.py "$name" --checkpoint "$ckpt" --train-log "$OUT/$m.time.json" \
    --command "bash experiments/mnist_reference_models.sh $DATA $OUT" \
    --eval "clean_pgd40_10k=$OUT/$m/eval_pgd40" --eval "autoattack_first500=$OUT/$m/eval_aa500" \
    --eval "sample_clean=$OUT/$m/eval_sample_clean" \
    --eval "sample_pgd10_first100=$OUT/$m/eval_sample_pgd10"
done
