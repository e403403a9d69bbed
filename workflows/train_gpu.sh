#!/usr/bin/env bash
# Train the adaptive U-Net on one GPU within 15 minutes, with its plain baseline, and bring
# back weights, model cards, training curves and the side-information ablation.
#
#   workflows/train_gpu.sh OUT            # on a machine with one CUDA GPU (an H100: ~12 min)
#   workflows/train_gpu.sh OUT --dry-run  # the same steps on the CPU in about a minute
#
# Needs qsmprep installed with a CUDA build of PyTorch (the Dockerfile's GPU build, or
# `pip install torch` on the GPU machine, then `pip install -e .`). Nothing is downloaded.
#
# What it trains (docs/training.md, "Training on a GPU"): the paper's network, whose input
# is the local FIELD (--input-transform none), so the acquisition's voxel size and B0
# direction reach the network only through the adaptive layer; and the plain U-Net of the
# same size on the same data and budget. Each run gets a fixed share of the time budget
# (--finish-by) and writes its weights and card when the budget is spent, whatever step it
# reached; its checkpoint stays in OUT, so running the script again with a larger
# QSMPREP_STEPS continues the same runs (the data stream and schedule resume exactly).
#
# OUT/
#   adaptive/ plain/          model.pt, model.json (card), history.jsonl, checkpoint.pt
#   curves.png                training loss and validation NRMSE of both runs
#   ablation.json             validation NRMSE with the right and with wrong side information
#   train.log                 everything printed
#
# Environment: QSMPREP_MINUTES (total budget for the two runs, default 11),
# QSMPREP_STEPS (planned steps per run, default 3000), QSMPREP_WORKERS (data processes,
# default: CPUs - 2, at most 14).
set -euo pipefail

OUT=${1:?usage: train_gpu.sh OUT [--dry-run]}
DRY=${2:-}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/train.log") 2>&1

if [ "$DRY" = "--dry-run" ]; then
    # tiny network and patches, a few steps, CPU: checks the whole script quickly
    COMMON=(--device cpu --threads 1 --base-channels 4 --depth 3 --patch-size 16
            --batch-size 2 --steps 4 --val-every 2 --val-pairs 2 --checkpoint-every 2
            --restart-steps 2 --head-prob 0 --pool-size 1 --workers 0)
    HOURS=0.05
    PAIRS=4
else
    CPUS=$(nproc)
    WORKERS=${QSMPREP_WORKERS:-$(( CPUS > 16 ? 14 : (CPUS > 2 ? CPUS - 2 : 0) ))}
    MINUTES=${QSMPREP_MINUTES:-11}
    HOURS=$(python3 -c "print(${MINUTES} / 2 / 60)")
    # the paper's patch size, batch 8, one cosine cycle per planned run (ends at its low)
    STEPS=${QSMPREP_STEPS:-3000}
    COMMON=(--device cuda --patch-size 64 --batch-size 8 --workers "$WORKERS"
            --steps "$STEPS" --restart-steps "$STEPS" --restart-mult 1 --val-every 250
            --val-pairs 32 --checkpoint-every 250)
    PAIRS=64
fi

echo "== $(date -u +%FT%TZ) qsmprep-train on $(python3 -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU")')"
for RUN in adaptive plain; do
    FLAGS=()
    [ "$RUN" = plain ] && FLAGS=(--no-adaptive)
    qsmprep-train -v pretrain --out "$OUT/$RUN" --input-transform none "${COMMON[@]}" \
        "${FLAGS[@]}" --finish-by "$HOURS" --no-progress
done
qsmprep-train curves "$OUT/adaptive" "$OUT/plain" --out "$OUT/curves.png"
qsmprep-train ablate "$OUT/adaptive/model.pt" "$OUT/plain/model.pt" --out "$OUT/ablation.json" \
    "${COMMON[@]:0:2}" --pairs "$PAIRS"
echo "== $(date -u +%FT%TZ) done: $OUT"
