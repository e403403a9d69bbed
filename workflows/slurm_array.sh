#!/usr/bin/env bash
# Run qsmprep over a BIDS dataset as a SLURM job array: one participant per array task, each
# with its own work directory, in an Apptainer image (docs/usage.md, "SLURM").
#
#   workflows/slurm_array.sh submit BIDS_DIR OUTPUT_DIR [qsmprep options...]
#       lists the participants, creates the log folder and submits the array (sbatch
#       --array=1-N); extra sbatch options go in QSMPREP_SBATCH_ARGS
#   workflows/slurm_array.sh count BIDS_DIR
#       prints the number of participants (N)
#   sbatch --array=1-N workflows/slurm_array.sh BIDS_DIR OUTPUT_DIR [qsmprep options...]
#       what each array task runs: participant number SLURM_ARRAY_TASK_ID (from 1)
#
# Participants: the participant_id column of BIDS_DIR/participants.tsv, or, without that
# file, the sub-* folders of BIDS_DIR (sorted).
# Resources: --nprocs/--omp-nthreads from SLURM_CPUS_PER_TASK; --mem (MB) from
# SLURM_MEM_PER_NODE, or SLURM_MEM_PER_CPU x CPUs, or SLURM_MEM_PER_GPU x GPUs; none when
# SLURM sets no memory (qsmprep then uses its default).
# Environment:
#   QSMPREP_SIF        the image (default: qsmprep.sif)
#   QSMPREP_APPTAINER  apptainer or singularity (default: apptainer)
#   QSMPREP_NV         --nv for the GPU (with #SBATCH --gres=gpu:1 and a CUDA image)
#   QSMPREP_BIND       more bind mounts, comma-separated (e.g. /scratch/plugins)
#   QSMPREP_WORK       root of the work directories (default: ${TMPDIR:-/tmp}/qsmprep-work);
#                      each participant works in QSMPREP_WORK/sub-<label>
#   QSMPREP_KEEP_WORK  on-failure (default: delete a participant's work directory when
#                      qsmprep succeeds, keep it with its crash files when it fails, so that
#                      a rerun resumes), always, or never
#   QSMPREP_LOGS       log folder for submit (default: logs)
#SBATCH --job-name=qsmprep
#SBATCH --cpus-per-task=4
#SBATCH --mem=16G
#SBATCH --time=01:00:00
set -euo pipefail

usage() {
    sed -n '4,10p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 64
}

# participant labels (without sub-), one a line
participants() {
    local bids=$1 tsv=$1/participants.tsv
    if [[ -f $tsv ]]; then
        # the participant_id column; CRLF, blank lines and a missing final newline are fine
        awk -F'\t' '
            { sub(/\r$/, "") }
            NR == 1 { for (i = 1; i <= NF; i++) if ($i == "participant_id") col = i; next }
            col && $col != "" { sub(/^sub-/, "", $col); print $col }
            END { if (!col) { print FILENAME ": no participant_id column" > "/dev/stderr"; exit 65 } }
        ' "$tsv"
    else
        local d
        for d in "$bids"/sub-*/; do
            [[ -d $d ]] || continue
            d=${d%/}
            echo "${d##*/sub-}"
        done
    fi
}

count() {
    local n
    n=$(participants "$1" | wc -l)
    echo $((n))
}

# memory for qsmprep in MB from the SLURM variables; empty when SLURM sets none
memory_mb() {
    local cpus=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}} mb=''
    if [[ -n ${SLURM_MEM_PER_NODE:-} ]]; then
        mb=$SLURM_MEM_PER_NODE
    elif [[ -n ${SLURM_MEM_PER_CPU:-} ]]; then
        mb=$((SLURM_MEM_PER_CPU * cpus))
    elif [[ -n ${SLURM_MEM_PER_GPU:-} ]]; then
        mb=$((SLURM_MEM_PER_GPU * ${SLURM_GPUS_ON_NODE:-1}))
    fi
    if [[ -n $mb ]] && ((mb > 0)); then echo "$mb"; fi
}

case ${1:-} in
count)
    [[ $# -eq 2 && -d $2 ]] || usage
    count "$2"
    exit 0
    ;;
submit)
    [[ $# -ge 3 && -d $2 ]] || usage
    shift
    n=$(count "$1")
    if ((n == 0)); then
        echo "slurm_array.sh: no participants in $1 (participants.tsv or sub-* folders)" >&2
        exit 18
    fi
    logs=${QSMPREP_LOGS:-logs}
    mkdir -p "$logs"
    # shellcheck disable=SC2086  # QSMPREP_SBATCH_ARGS holds several options
    exec sbatch --array="1-$n" --output="$logs/qsmprep-%A_%a.out" ${QSMPREP_SBATCH_ARGS:-} \
        "$0" "$@"
    ;;
esac

[[ $# -ge 2 ]] || usage
BIDS_DIR=$(cd "$1" && pwd)
mkdir -p "$2"
OUT_DIR=$(cd "$2" && pwd)
shift 2
TASK=${SLURM_ARRAY_TASK_ID:?submit with sbatch --array=1-N (or: slurm_array.sh submit ...)}

SUBJECT=$(participants "$BIDS_DIR" | sed -n "${TASK}p")
if [[ -z $SUBJECT ]]; then
    echo "slurm_array.sh: no participant number $TASK in $BIDS_DIR ($(count "$BIDS_DIR") found)" >&2
    exit 18
fi

WORK_DIR=${QSMPREP_WORK:-${TMPDIR:-/tmp}/qsmprep-work}/sub-$SUBJECT
KEEP=${QSMPREP_KEEP_WORK:-on-failure}
case $KEEP in on-failure | always | never) ;; *)
    echo "slurm_array.sh: QSMPREP_KEEP_WORK must be on-failure, always or never, not $KEEP" >&2
    exit 64
    ;;
esac
mkdir -p "$WORK_DIR"
NTHREADS=${SLURM_CPUS_PER_TASK:-1}
MEM_MB=$(memory_mb)
binds=("-B" "$BIDS_DIR:/bids:ro" "-B" "$OUT_DIR:/out" "-B" "$WORK_DIR:/work")
if [[ -n ${QSMPREP_BIND:-} ]]; then binds+=("-B" "$QSMPREP_BIND"); fi

echo "slurm_array.sh: sub-$SUBJECT (task $TASK) with $NTHREADS CPU(s), ${MEM_MB:-default} MB," \
    "work in $WORK_DIR" >&2
# --cleanenv keeps the host's PYTHONPATH etc. out of the container; only the binds get in.
rc=0
# shellcheck disable=SC2086  # QSMPREP_NV is empty or --nv
"${QSMPREP_APPTAINER:-apptainer}" run --cleanenv ${QSMPREP_NV:-} "${binds[@]}" \
    "${QSMPREP_SIF:-qsmprep.sif}" /bids /out participant \
    --participant-label "$SUBJECT" -w /work --nprocs "$NTHREADS" --omp-nthreads "$NTHREADS" \
    ${MEM_MB:+--mem "$MEM_MB"} --skip-bids-validation "$@" || rc=$?

if [[ $KEEP == never || ($KEEP == on-failure && $rc -eq 0) ]]; then
    rm -rf "$WORK_DIR"
else
    echo "slurm_array.sh: work directory kept: $WORK_DIR" >&2
fi
exit "$rc"
