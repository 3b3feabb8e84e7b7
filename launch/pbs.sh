#!/bin/bash
# launch/pbs.sh -- train dpbp on a PBS/Torque allocation, preemptible and self-resubmitting.
#
# Usage (from the directory CONFIG is relative to; dpbp installed, or DPBP_HOME a checkout):
#   Torque:   qsub -l nodes=2:ppn=4,walltime=1:00:00 -F "CONFIG [dpbp.train options...]" launch/pbs.sh
#   PBS Pro:  qsub -l select=2:ncpus=4:mpiprocs=4 -l walltime=1:00:00 \
#                  -v DPBP_ARGS="CONFIG [dpbp.train options...]" launch/pbs.sh
# (PBS Pro's qsub passes no arguments to a script, hence DPBP_ARGS, split like a shell line.)
#
# The run directory, resuming, signals, exit status and BLAS threads are those of
# `python -m dpbp.launch --help`, shared with launch/local.sh and launch/slurm.sbatch. PBS's own here:
#   * P = lines of $PBS_NODEFILE (one per MPI slot; DPBP_NP overrides), started with `mpirun -n P
#     -machinefile $PBS_NODEFILE` (MPICH's hydra and Open MPI both read it). BLAS threads per rank:
#     NCPUS / MPIPROCS (PBS Pro), else 1.
#   * RUN_DIR defaults to runs/<number of $PBS_JOBID> under $PBS_O_WORKDIR. The arguments are saved
#     in RUN_DIR/launch.args, so a job given only DPBP_RUN_DIR (the resubmission) continues with them.
#   * PBS sends no warning before the walltime (SIGTERM, SIGKILL kill_delay later), so the launcher
#     sends itself SIGUSR1 DPBP_WARN_SECONDS (120) s before the Resource_List.walltime that qstat
#     reports. After that checkpoint the job resubmits itself: qsub, same resources, -W
#     depend=afterany on this job, DPBP_RUN_DIR set (DPBP_REQUEUE=0: stop only). SIGTERM (qdel,
#     preemption): checkpoint if kill_delay allows, exit 75, no resubmission.
#   * Output: PBS's dpbp.o<JOBID>, and appended to RUN_DIR/launch.log across restarts.
# Knobs: DPBP_ARGS, DPBP_NP, DPBP_PYTHON (default python3), DPBP_MPIRUN (default mpirun), DPBP_HOME
# (default $PBS_O_WORKDIR, used if it holds dpbp/), DPBP_RUN_DIR, DPBP_RUNS, DPBP_RUN_NAME,
# DPBP_REQUEUE, DPBP_WARN_SECONDS.
#
#PBS -N dpbp
#PBS -r y
#PBS -j oe

set -u
log() { echo "[pbs.sh $(date '+%F %T') job ${PBS_JOBID:-?}] $*" >&2; }
die() { log "error: $*"; exit 2; }
[ -n "${PBS_JOBID:-}" ] || die "not inside a PBS job; submit with qsub (see the top of $0)"
cd "${PBS_O_WORKDIR:-.}" || die "cannot cd to PBS_O_WORKDIR=${PBS_O_WORKDIR:-}"
if [ $# -eq 0 ] && [ -n "${DPBP_ARGS:-}" ]; then eval "set -- $DPBP_ARGS"; fi

export DPBP_HOME=${DPBP_HOME:-$(pwd)} DPBP_PYTHON=${DPBP_PYTHON:-python3} DPBP_MPIRUN=${DPBP_MPIRUN:-mpirun}
[ -d "$DPBP_HOME/dpbp" ] && export PYTHONPATH="$DPBP_HOME${PYTHONPATH:+:$PYTHONPATH}"
command -v "$DPBP_PYTHON" >/dev/null || die "python interpreter '$DPBP_PYTHON' not found (set DPBP_PYTHON)"
"$DPBP_PYTHON" -c 'import dpbp' 2>/dev/null || die "$DPBP_PYTHON cannot import dpbp: pip install it there, or set DPBP_HOME"
# What the resubmission submits: this script as PBS runs it (its spooled copy), else the checkout's.
DPBP_PBS_SCRIPT=$0; [ -f "$0" ] || DPBP_PBS_SCRIPT=$DPBP_HOME/launch/pbs.sh; export DPBP_PBS_SCRIPT

np=${DPBP_NP:-}
if [ -z "$np" ] && [ -f "${PBS_NODEFILE:-}" ]; then np=$(grep -c . "$PBS_NODEFILE"); fi
launch=("$DPBP_MPIRUN" -n "${np:=${PBS_NP:-${NCPUS:-1}}}")
if [ -f "${PBS_NODEFILE:-}" ]; then launch+=(-machinefile "$PBS_NODEFILE"); fi

qstat_field() { qstat -f "$PBS_JOBID" 2>/dev/null | tr -d '\n\t' | sed 's/    */ /g' | grep -o "$1 = [^ ]*" | head -n 1 | sed 's/.* = //'; }
seconds() { local IFS=: total=0 part; for part in $1; do total=$((total * 60 + 10#$part)); done; echo "$total"; }
warn=()
walltime=$(qstat_field Resource_List.walltime)
if [ -n "$walltime" ]; then
    used=$(qstat_field resources_used.walltime)
    warn=(--warn-after "$(($(seconds "$walltime") - $(seconds "${used:-0}") - ${DPBP_WARN_SECONDS:-120}))")
else
    log "no walltime found with qstat: no time-limit warning"
fi
resubmit() { # run by dpbp.launch after the warning's checkpoint, with DPBP_RUN_DIR set
    local res=() v k
    for k in walltime nodes select place; do v=$(qstat_field "Resource_List.$k") && [ -n "$v" ] && res+=(-l "$k=$v"); done
    [ -n "${PBS_QUEUE:-}" ] && res+=(-q "$PBS_QUEUE")
    new=$(qsub -N "${PBS_JOBNAME:-dpbp}" "${res[@]}" -W "depend=afterany:$PBS_JOBID" -v \
        "DPBP_RUN_DIR=$DPBP_RUN_DIR,DPBP_HOME=$DPBP_HOME,DPBP_PYTHON=$DPBP_PYTHON,DPBP_MPIRUN=$DPBP_MPIRUN" \
        "$DPBP_PBS_SCRIPT") && echo "resubmitted as job $new, which resumes from $DPBP_RUN_DIR"
}
export -f qstat_field resubmit

exec "$DPBP_PYTHON" -m dpbp.launch --name pbs.sh --tag "job $PBS_JOBID" --np "$np" --cores "${NCPUS:-1}" \
    --ranks-per-node "${MPIPROCS:-${NCPUS:-1}}" --run-name "${PBS_JOBID%%.*}" --tee --save-args \
    --requeue resubmit "${warn[@]}" \
    --usage 'no CONFIG given: qsub -F "CONFIG [options]" (Torque) or -v DPBP_ARGS="CONFIG [options]" (PBS Pro)' \
    -- "${launch[@]}" -- "$@"
