#!/usr/bin/env bash
# Train a CIFAR-10 set (SDN, static, then RAPNet distilled from the static network, as the shipped set is) on a
# CUDA GPU with a larger recipe than the shipped CPU one (models/README.md): width 1.0, 75 epochs, batch 512.
#
# Run it from the repository root on the GPU machine, with the data archive copied into the git-ignored .data/
# folder first:
#     cp ../shared/datasets/cifar10/cifar10-jpeg.tar.gz .data/        # path: see ../shared/datasets/README.md
#     bash scripts/gpu_train.sh                                        # OUT=runs by default
# Checkpoints and logs go to $OUT/gpu-w1 (evaluate them with rapnet-eval --checkpoint $OUT/gpu-w1/rapnet.pt).
set -euo pipefail
OUT=${OUT:-runs}/gpu-w1
PY=${PY:-python3}
COMMON=(--data .data/cifar10-jpeg.tar.gz --cache-dir .data/cache --device cuda --width 1.0 --batch-size 512
        --epochs 75 --predictor-epochs 60 --out "$OUT")
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"
"$PY" -m rapnet.train "${COMMON[@]}" --models sdn,static --jobs 2 2>&1 | tee "$OUT/train-baselines.log"
"$PY" -m rapnet.train "${COMMON[@]}" --models rapnet --teacher "$OUT/static.pt" 2>&1 | tee "$OUT/train-rapnet.log"
