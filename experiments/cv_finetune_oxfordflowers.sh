#!/bin/sh
# ResNeXt fine-tuning on Oxford Flowers-102 (the paper's accuracy parity of wpipe,
# pipedream_2bw and data_parallel): cv_finetune_cifar.sh with DATASETS=flowers102 (same
# variables and arguments; see there). Runs as is on a CPU machine on a tiny generated
# Flowers-102 copy (random JPEGs and labels, cv.fixtures; verify_data false).
#
# Paper scale, one node of 8 GPUs (layout 2x4, 95 epochs), for each model:
#   NPROC_PER_NODE=8 DATA_DIR=/data PRETRAINED=resnext50_32x4d.pth \
#   CONFIG=network_conf/cv_finetune_resnext50_flowers.yaml sh experiments/cv_finetune_oxfordflowers.sh
#   (then PRETRAINED=resnext101_32x8d.pth CONFIG=network_conf/cv_finetune_resnext101_flowers.yaml)
# DATA_DIR holds flowers-102/{jpg/,imagelabels.mat,setid.mat}.
set -eu
DATASETS=flowers102 OUT=${OUT:-runs/cv_finetune_oxfordflowers} \
    exec sh "$(dirname "$0")/cv_finetune_cifar.sh" "$@"
