#!/bin/bash
# launch/pbs.sh -- train dpbp on a PBS/Torque allocation, preemptible and self-resubmitting.
#
# Usage (from the repository root, or set DPBP_HOME):
#   Torque:   qsub -l nodes=2:ppn=4,walltime=1:00:00 -F "CONFIG [dpbp.train options...]" launch/pbs.sh
#   PBS Pro:  qsub -l select=2:ncpus=4:mpiprocs=4 -l walltime=1:00:00 \
#                  -v DPBP_ARGS="CONFIG [dpbp.train options...]" launch/pbs.sh
#   e.g.      qsub -l nodes=1:ppn=8,walltime=0:30:00 -F "configs/digits.toml --set train.steps=20000" launch/pbs.sh
# (PBS Pro's qsub passes no arguments to a script, hence DPBP_ARGS, split like a shell line.)
#
# Same arguments and behaviour as launch/slurm.sbatch:
#   * P = number of lines of $PBS_NODEFILE (one per MPI slot; $DPBP_NP overrides). Runs
#     `mpirun -n P -machinefile $PBS_NODEFILE python -m dpbp.train --config CONFIG --resume RUN_DIR
#     [options]` (-machinefile is understood by MPICH's hydra and by Open MPI), with
#     DPBP_EXPECT_WORLD_SIZE=P so a launch that does not form one P-rank world exits with status 2.
#   * RUN_DIR: `--out DIR` among the options (turned into `--resume DIR`), else $DPBP_RUN_DIR, else
#     ${DPBP_RUNS:-runs}/${DPBP_RUN_NAME:-<numeric part of $PBS_JOBID>}, relative to $PBS_O_WORKDIR.
#     The trainer starts fresh there without a checkpoint and otherwise resumes from the newest
#     valid one. The arguments are saved in RUN_DIR/launch.args, so a job started again with only
#     DPBP_RUN_DIR (as the resubmission below does) continues with the same ones.
#   * Warning before the time limit: PBS has no advance signal (at walltime it sends SIGTERM and
#     SIGKILL kill_delay seconds later, often too soon for a checkpoint), so this script reads
#     Resource_List.walltime with qstat and sends itself SIGUSR1 ${DPBP_WARN_SECONDS:-120} s
#     before it. On SIGUSR1 it forwards the signal to the ranks, which stop at the next step
#     boundary, write a checkpoint and exit 75 (EX_TEMPFAIL); then it resubmits itself with the
#     same resources (-W depend=afterany on this job, DPBP_RUN_DIR set), and the new job resumes.
#     DPBP_REQUEUE=0: checkpoint and stop only.
#   * SIGTERM (qdel, preemption, walltime) is forwarded to the ranks as well: they checkpoint if
#     kill_delay leaves them the time, and the job ends with status 75 without resubmitting.
#   * Output: PBS writes dpbp.o<JOBID> per job; everything is also appended (never overwritten)
#     to RUN_DIR/launch.log across restarts, and the trainer appends to RUN_DIR/metrics.jsonl.
#   * BLAS/OpenMP threads per rank: $NCPUS / mpiprocs on PBS Pro, else 1, unless
#     OMP_NUM_THREADS / OPENBLAS_NUM_THREADS / MKL_NUM_THREADS are set.
#
# Environment knobs: DPBP_ARGS, DPBP_NP, DPBP_PYTHON (default python3), DPBP_MPIRUN (default
# mpirun), DPBP_HOME (repository root, put on PYTHONPATH; default $PBS_O_WORKDIR), DPBP_RUN_DIR,
# DPBP_RUNS, DPBP_RUN_NAME, DPBP_REQUEUE (default 1), DPBP_WARN_SECONDS (default 120).
# Exit status: the trainer's (0 done, 2 usage / wrong world size, 75 stopped after checkpoint).
#
#PBS -N dpbp
#PBS -r y
#PBS -j oe

# shellcheck disable=SC2012,SC2317 # ls of zero-padded names; functions run from traps
set -u
EX_TEMPFAIL=75
log() { echo "[pbs.sh $(date '+%F %T') job ${PBS_JOBID:-?}] $*" >&2; }
die() { log "error: $*"; exit 2; }

[ -n "${PBS_JOBID:-}" ] || die "not inside a PBS job; submit with qsub (see the top of $0)"
cd "${PBS_O_WORKDIR:-.}" || die "cannot cd to PBS_O_WORKDIR=${PBS_O_WORKDIR:-}"

if [ $# -eq 0 ] && [ -n "${DPBP_ARGS:-}" ]; then
    eval "set -- $DPBP_ARGS"
fi
if [ $# -eq 0 ] && [ -n "${DPBP_RUN_DIR:-}" ] && [ -f "$DPBP_RUN_DIR/launch.args" ]; then
    saved=()
    while IFS= read -r -d '' a; do saved+=("$a"); done <"$DPBP_RUN_DIR/launch.args"
    set -- "${saved[@]}"
    log "arguments from $DPBP_RUN_DIR/launch.args: $*"
fi
[ $# -ge 1 ] || die "no CONFIG given: qsub -F \"CONFIG [options]\" (Torque) or -v DPBP_ARGS=\"CONFIG [options]\" (PBS Pro)"

config=$1
shift
run_dir=${DPBP_RUN_DIR:-}
opts=()
while [ $# -gt 0 ]; do
    case $1 in
        --out) [ $# -ge 2 ] || die "--out needs a directory"; run_dir=$2; shift 2 ;;
        --out=*) run_dir=${1#--out=}; shift ;;
        --resume | --resume=*) die "do not pass --resume: the run directory is resumed automatically (use --out DIR)" ;;
        --set) [ $# -ge 2 ] || die "--set needs key=value"; opts+=("$1" "$2"); shift 2 ;;
        *) opts+=("$1"); shift ;;
    esac
done
[ -f "$config" ] || die "config file '$config' not found (relative to $(pwd))"
[ -n "$run_dir" ] || run_dir=${DPBP_RUNS:-runs}/${DPBP_RUN_NAME:-${PBS_JOBID%%.*}}
mkdir -p "$run_dir" || die "cannot create run directory $run_dir"
run_dir=$(cd "$run_dir" && pwd)
config=$(cd "$(dirname "$config")" && pwd)/$(basename "$config")
printf '%s\0' "$config" "${opts[@]}" >"$run_dir/launch.args"

exec > >(tee -a "$run_dir/launch.log") 2>&1

home=${DPBP_HOME:-${PBS_O_WORKDIR:-$(pwd)}}
[ -d "$home/dpbp" ] && export PYTHONPATH="$home${PYTHONPATH:+:$PYTHONPATH}"
py=${DPBP_PYTHON:-python3}
command -v "$py" >/dev/null || die "python interpreter '$py' not found (set DPBP_PYTHON)"
mpirun=${DPBP_MPIRUN:-mpirun}
command -v "$mpirun" >/dev/null || die "'$mpirun' not found (load your MPI module or set DPBP_MPIRUN)"

np=${DPBP_NP:-}
if [ -z "$np" ] && [ -n "${PBS_NODEFILE:-}" ] && [ -f "$PBS_NODEFILE" ]; then np=$(grep -c . "$PBS_NODEFILE"); fi
[ -n "$np" ] || np=${PBS_NP:-${NCPUS:-1}}
case $np in '' | *[!0-9]* | 0) die "cannot tell the number of ranks (set DPBP_NP)" ;; esac

threads=1
if [ -n "${NCPUS:-}" ] && [ -n "${MPIPROCS:-}" ] && [ "${MPIPROCS:-0}" -gt 0 ]; then
    threads=$((NCPUS / MPIPROCS)); [ "$threads" -ge 1 ] || threads=1
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$threads}
export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-$threads}
export MKL_NUM_THREADS=${MKL_NUM_THREADS:-$threads}
export DPBP_EXPECT_WORLD_SIZE=$np

launch=("$mpirun" -n "$np")
[ -n "${PBS_NODEFILE:-}" ] && [ -f "$PBS_NODEFILE" ] && launch+=(-machinefile "$PBS_NODEFILE")

newest=$(ls -1 "$run_dir"/ckpt-*.npz 2>/dev/null | tail -n 1)
log "$np ranks, $OMP_NUM_THREADS BLAS thread(s) per rank; $(command -v "$mpirun"); python $py"
if [ -n "$newest" ]; then
    log "run dir $run_dir: resuming (newest checkpoint file: $newest)"
else
    log "run dir $run_dir: no checkpoint yet, fresh start"
fi

# --- the warning timer ---------------------------------------------------------------
to_seconds() { # [[HH:]MM:]SS -> seconds
    local IFS=: total=0 part
    for part in $1; do total=$((total * 60 + 10#$part)); done
    echo "$total"
}
qstat_field() { qstat -f "$PBS_JOBID" 2>/dev/null | tr -d '\n\t' | sed 's/    */ /g' | grep -o "$1 = [^ ]*" | head -n 1 | sed 's/.* = //'; }
timer_pid=""
walltime=$(qstat_field Resource_List.walltime)
if [ -n "$walltime" ]; then
    used=$(qstat_field resources_used.walltime)
    left=$(($(to_seconds "$walltime") - $(to_seconds "${used:-0}") - ${DPBP_WARN_SECONDS:-120}))
    [ "$left" -ge 1 ] || left=1
    log "walltime $walltime: checkpointing and resubmitting in $left s"
    (
        trap 'kill "$sp" 2>/dev/null; exit 0' TERM
        sleep "$left" &
        sp=$!
        wait "$sp" && kill -USR1 $$
    ) &
    timer_pid=$!
else
    log "no walltime found with qstat: no warning timer"
fi

# --- run the ranks in the background so that this shell takes the signals ------------
got_signal=""
step_pid=""
forward() {
    local sig=$1
    [ -n "$got_signal" ] || got_signal=$sig
    if [ -n "$step_pid" ] && kill -0 "$step_pid" 2>/dev/null; then
        log "got SIG$sig: forwarding it to the ranks (they checkpoint and exit $EX_TEMPFAIL)"
        kill -s "$sig" "$step_pid" 2>/dev/null
    fi
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
trap 'forward TERM' INT

"${launch[@]}" "$py" -m dpbp.train --config "$config" --resume "$run_dir" "${opts[@]}" </dev/null &
step_pid=$!
while :; do
    wait "$step_pid"
    rc=$?
    if [ "$rc" -le 128 ] || ! kill -0 "$step_pid" 2>/dev/null; then
        if [ "$rc" -gt 128 ]; then wait "$step_pid" 2>/dev/null; r2=$?; [ "$r2" -eq 127 ] || rc=$r2; fi
        break
    fi
done
step_pid=""
[ -n "$timer_pid" ] && kill "$timer_pid" 2>/dev/null

resubmit() {
    local script=$home/launch/pbs.sh res=() v
    v=$(qstat_field Resource_List.walltime) && [ -n "$v" ] && res+=(-l "walltime=$v")
    v=$(qstat_field Resource_List.nodes) && [ -n "$v" ] && res+=(-l "nodes=$v")
    v=$(qstat_field Resource_List.select) && [ -n "$v" ] && res+=(-l "select=$v")
    v=$(qstat_field Resource_List.place) && [ -n "$v" ] && res+=(-l "place=$v")
    [ -n "${PBS_QUEUE:-}" ] && res+=(-q "$PBS_QUEUE")
    qsub -N "${PBS_JOBNAME:-dpbp}" "${res[@]}" -W "depend=afterany:$PBS_JOBID" \
        -v "DPBP_RUN_DIR=$run_dir,DPBP_HOME=$home,DPBP_PYTHON=$py,DPBP_MPIRUN=$mpirun" "$script"
}

if [ "$rc" -eq 0 ]; then
    log "training finished"
elif [ "$rc" -eq "$EX_TEMPFAIL" ]; then
    if [ "$got_signal" = USR1 ] && [ "${DPBP_REQUEUE:-1}" != 0 ]; then
        if new=$(resubmit); then
            log "checkpoint written before the walltime: resubmitted as job $new, which resumes from $run_dir"
        else
            log "error: resubmission failed; resubmit by hand: qsub -v DPBP_RUN_DIR=$run_dir launch/pbs.sh"
        fi
    else
        log "stopped after writing a checkpoint${got_signal:+ (SIG$got_signal)}; resubmit with -v DPBP_RUN_DIR=$run_dir to resume"
    fi
else
    log "trainer failed with status $rc"
fi
exit "$rc"
