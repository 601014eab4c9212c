#!/usr/bin/env bash
# Retrain the shipped models on a CUDA GPU machine: the full recipe of models/README.md.
#
# Run it from the repository root on the GPU machine, with the data archive copied into the git-ignored .data/
# folder first:
#     cp ../shared/datasets/cifar10/cifar10-jpeg.tar.gz .data/        # path: see ../shared/datasets/README
#     bash scripts/gpu_train.sh                                        # MODELS=rapnet,sdn,static for all three
# The checkpoints and logs go to $OUT/gpu-w1 (evaluate them with rapnet-eval). About 8 minutes of H100 time for RAPNet
# alone (MODELS=rapnet: SDN and static do not depend on fusion_stride, so the shipped ones stay comparable),
# about the same for all three with --jobs 3 (one process per model).
set -euo pipefail
MODELS=${MODELS:-rapnet}
OUT=${OUT:-runs}
PY=${PY:-python3}
mkdir -p "$OUT/gpu-w1"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu-w1/gpu.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu-w1/gpu.txt"
"$PY" -m rapnet.train --data .data/cifar10-jpeg.tar.gz --cache-dir .data/cache --device cuda --width 1.0 \
    --batch-size 512 --epochs 75 --predictor-epochs 60 --models "$MODELS" \
    --jobs "$(tr ',' '\n' <<<"$MODELS" | wc -l)" --out "$OUT/gpu-w1" 2>&1 | tee "$OUT/gpu-w1/train.log"
