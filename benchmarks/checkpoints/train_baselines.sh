#!/usr/bin/env bash
# Trains the dense Fashion-MNIST baselines every benchmark starts from, and copies the best-on-validation
# weights here. Re-running resumes an interrupted run (each finished epoch is saved) and skips finished ones.
#   usage: bash benchmarks/checkpoints/train_baselines.sh [lenet5|lenet300|resnet20|vgg11 ...]
set -euo pipefail
cd "$(dirname "$0")"
PRUNEKIT=${PRUNEKIT:-../../.venv/bin/prunekit}
RUNS=${RUNS:-runs}

train() {  # name, then the prunekit train flags
  local name=$1; shift
  if [[ -f "$name.safetensors" ]]; then echo "$name: done"; return; fi
  local resume=()
  [[ -f "$RUNS/$name/train_state.pt" ]] && resume=(--resume)
  "$PRUNEKIT" train --data fashion-mnist --out "$RUNS/$name" --no-progress "${resume[@]}" "$@"
  cp "$RUNS/$name/model.safetensors" "$name.safetensors"
  cp "$RUNS/$name/history.json" "$name.history.json"
  cp "$RUNS/$name/training.png" "$name.training.png"
}

targets=("${@:-lenet5 lenet300 resnet20 vgg11}")
for t in ${targets[@]}; do
  case $t in
    lenet5)   train lenet5-fmnist   --model lenet5   --epochs 30 --lr 0.05 --weight-decay 5e-4 --seed 0 ;;
    lenet300) train lenet300-fmnist --model lenet300 --epochs 30 --lr 0.05 --weight-decay 5e-4 --augment none --seed 0 ;;
    resnet20) train resnet20-fmnist --model resnet20 --epochs 30 --lr 0.1  --weight-decay 5e-4 --seed 0 ;;
    vgg11)    train vgg11-fmnist    --model vgg11 --width 0.5 --epochs 20 --lr 0.05 --weight-decay 5e-4 --seed 0 ;;
    *) echo "unknown baseline $t (lenet5, lenet300, resnet20, vgg11)" >&2; exit 2 ;;
  esac
done
