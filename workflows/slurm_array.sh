#!/usr/bin/env bash
# Run qsmprep over a BIDS dataset as a SLURM array: one participant per task, each with its
# own work directory, in an Apptainer image built from the qsmprep Docker image.
#
#   apptainer build qsmprep.sif docker://qsmprep:latest        # or docker-daemon://qsmprep:latest
#   N=$(( $(wc -l < /data/bids/participants.tsv) - 1 ))
#   sbatch --array=1-"$N" workflows/slurm_array.sh /data/bids /data/derivatives/qsmprep
#
# GPU inference (--inversion adaptive-unet): add `#SBATCH --gres=gpu:1`, set QSMPREP_NV=--nv,
# and build the image with a CUDA PyTorch (see the Dockerfile).
#SBATCH --job-name=qsmprep
#SBATCH --cpus-per-task=4
#SBATCH --mem=16G
#SBATCH --time=01:00:00
#SBATCH --output=logs/qsmprep-%A_%a.out
set -euo pipefail

BIDS_DIR=${1:?usage: slurm_array.sh BIDS_DIR OUTPUT_DIR [qsmprep options...]}
OUT_DIR=${2:?usage: slurm_array.sh BIDS_DIR OUTPUT_DIR [qsmprep options...]}
shift 2
SIF=${QSMPREP_SIF:-qsmprep.sif}
WORK_ROOT=${QSMPREP_WORK:-${SLURM_TMPDIR:-/tmp}/qsmprep-work}
TASK=${SLURM_ARRAY_TASK_ID:?submit with sbatch --array}

# line TASK+1 of participants.tsv (line 1 is the header), first column
SUBJECT=$(awk -F'\t' -v n=$((TASK + 1)) 'NR == n { print $1 }' "$BIDS_DIR/participants.tsv")
[ -n "$SUBJECT" ] || { echo "no participant on line $((TASK + 1)) of participants.tsv" >&2; exit 18; }

WORK_DIR="$WORK_ROOT/${SUBJECT}"
mkdir -p "$WORK_DIR" "$OUT_DIR"
NTHREADS=${SLURM_CPUS_PER_TASK:-1}
MEM_GB=$(( ${SLURM_MEM_PER_NODE:-16384} / 1024 ))

# --cleanenv keeps the host's PYTHONPATH etc. out; bind only what the job needs.
apptainer run --cleanenv ${QSMPREP_NV:-} \
    -B "$BIDS_DIR:/bids:ro" -B "$OUT_DIR:/out" -B "$WORK_DIR:/work" \
    "$SIF" /bids /out participant \
    --participant-label "$SUBJECT" \
    -w /work --nprocs "$NTHREADS" --omp-nthreads "$NTHREADS" --mem-gb "$MEM_GB" \
    --skip-bids-validation "$@"
