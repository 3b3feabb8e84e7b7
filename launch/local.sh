#!/bin/bash
# launch/local.sh -- train dpbp with plain mpirun on this one machine.
#
# Usage:
#   launch/local.sh [-n P] CONFIG [dpbp.train options...]
#   e.g. launch/local.sh -n 4 configs/digits.toml --set train.steps=2000
#        DPBP_RUN_NAME=exp1 launch/local.sh configs/xor.toml
#
# Same arguments and behaviour as launch/slurm.sbatch, minus the scheduler:
#   * P ranks: -n P, else $DPBP_NP, else one rank per NUMA node (memory domain; usually a
#     socket), each with that node's cores as BLAS threads. Within one memory domain BLAS
#     threads beat extra ranks: every rank repeats the whole SGD update, and the Allreduce
#     through shared memory takes CPU time from the same cores. Measured on 2 cores (one
#     node), benchmark model, nine runs: 1 rank x 2 threads 7.96-10.21 ms per step, 2 ranks
#     x 1 thread 9.87-10.56 ms (python -m dpbp.bench, README "Performance").
#   * Runs `mpirun -n P python -m dpbp.train --config CONFIG --resume RUN_DIR [options]`
#     with DPBP_EXPECT_WORLD_SIZE=P, so a launch that does not form one P-rank MPI world
#     (e.g. an mpirun from another MPI than the one mpi4py was built with) fails loudly
#     with status 2 instead of training P independent copies.
#   * RUN_DIR: `--out DIR` if given among the options (turned into `--resume DIR`), else
#     $DPBP_RUN_DIR, else ${DPBP_RUNS:-runs}/${DPBP_RUN_NAME:-local-<config name>}.
#     The trainer starts fresh in RUN_DIR when it holds no checkpoint and otherwise resumes
#     from the newest valid one: running the same command again continues the run. Use
#     another --out / DPBP_RUN_NAME for a separate run.
#   * SIGTERM, SIGUSR1 or SIGINT (Ctrl-C) to this script: forwarded to the ranks as
#     SIGTERM/SIGUSR1; they stop at the next step boundary, write a checkpoint and exit 75
#     (EX_TEMPFAIL), and so does this script. There is nothing to requeue locally: run
#     the same command again to resume.
#   * Output goes to the terminal and is appended (never overwritten) to RUN_DIR/launch.log;
#     the trainer appends to RUN_DIR/metrics.jsonl.
#   * Oversubscription: MPICH's hydra mpirun (the mpich wheel) runs more ranks than cores
#     without any flag; with Open MPI's mpirun --oversubscribe is added when P > cores.
#   * BLAS/OpenMP threads per rank: 1 when P >= cores, else cores/P (rounded down), so
#     the ranks together never ask for more threads than there are cores. Values already
#     set in OMP_NUM_THREADS / OPENBLAS_NUM_THREADS / MKL_NUM_THREADS are kept.
#
# Environment knobs: DPBP_NP, DPBP_PYTHON (default python3), DPBP_MPIRUN (default mpirun),
# DPBP_HOME (repository root put on PYTHONPATH; default: the parent of this script's
# directory), DPBP_RUN_DIR, DPBP_RUNS, DPBP_RUN_NAME, DPBP_MPIRUN_ARGS (extra mpirun args).
# Exit status: the trainer's (0 done, 2 usage / wrong world size, 75 stopped after checkpoint).

# shellcheck disable=SC2012,SC2317 # ls of zero-padded names; functions run from traps
set -u
EX_TEMPFAIL=75
log() { echo "[local.sh $(date '+%F %T')] $*" >&2; }
die() { log "error: $*"; exit 2; }
usage="usage: launch/local.sh [-n P] CONFIG [dpbp.train options...]"

np=${DPBP_NP:-}
case ${1:-} in
    -n) [ $# -ge 2 ] || die "$usage"; np=$2; shift 2 ;;
    -n*) np=${1#-n}; shift ;;
    -h | --help) sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; exit 0 ;;
esac
[ $# -ge 1 ] || die "$usage"
cores=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)
if [ -z "$np" ]; then
    np=$(ls -d /sys/devices/system/node/node[0-9]* 2>/dev/null | wc -l)
    [ "$np" -ge 1 ] 2>/dev/null || np=1
fi
case $np in '' | *[!0-9]* | 0) die "-n needs a positive number of ranks, not '$np'" ;; esac

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
[ -f "$config" ] || die "config file '$config' not found"
if [ -z "$run_dir" ]; then
    name=$(basename "$config"); name=${name%.toml}
    run_dir=${DPBP_RUNS:-runs}/${DPBP_RUN_NAME:-local-$name}
fi

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
home=${DPBP_HOME:-$(dirname "$here")}
[ -d "$home/dpbp" ] && export PYTHONPATH="$home${PYTHONPATH:+:$PYTHONPATH}"

py=${DPBP_PYTHON:-python3}
command -v "$py" >/dev/null || die "python interpreter '$py' not found (set DPBP_PYTHON)"
mpirun=${DPBP_MPIRUN:-mpirun}
command -v "$mpirun" >/dev/null || die "'$mpirun' not found (pip install mpich, or set DPBP_MPIRUN)"

threads=1
[ "$np" -lt "$cores" ] && threads=$((cores / np))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$threads}
export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-$threads}
export MKL_NUM_THREADS=${MKL_NUM_THREADS:-$threads}
export DPBP_EXPECT_WORLD_SIZE=$np

launch=("$mpirun" -n "$np")
if [ "$np" -gt "$cores" ] && "$mpirun" --version 2>/dev/null | grep -qi 'open mpi'; then
    launch+=(--oversubscribe)
fi
# shellcheck disable=SC2206 # word splitting of extra mpirun args is intended
[ -n "${DPBP_MPIRUN_ARGS:-}" ] && launch+=($DPBP_MPIRUN_ARGS)

mkdir -p "$run_dir" || die "cannot create run directory $run_dir"
logfile=$run_dir/launch.log
exec > >(tee -a "$logfile") 2>&1
newest=$(ls -1 "$run_dir"/ckpt-*.npz 2>/dev/null | tail -n 1)
log "$np ranks on $cores cores, $OMP_NUM_THREADS BLAS thread(s) per rank; $(command -v "$mpirun"); python $py"
if [ -n "$newest" ]; then
    log "run dir $run_dir: resuming (newest checkpoint file: $newest)"
else
    log "run dir $run_dir: no checkpoint yet, fresh start"
fi

got_signal=""
step_pid=""
forward() {
    local sig=$1
    case $sig in INT | HUP) sig=TERM ;; esac # mpirun would just kill the ranks on these
    [ -n "$got_signal" ] || got_signal=$1
    if [ -n "$step_pid" ] && kill -0 "$step_pid" 2>/dev/null; then
        log "got SIG$1: asking the ranks to checkpoint and stop (SIG$sig)"
        kill -s "$sig" "$step_pid" 2>/dev/null
    fi
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
trap 'forward INT' INT
trap 'forward HUP' HUP

# In the background (so this shell takes the signals) and in its own session, so that a
# Ctrl-C in the terminal reaches only this script, which turns it into a checkpoint.
setsid "${launch[@]}" "$py" -m dpbp.train --config "$config" --resume "$run_dir" "${opts[@]}" </dev/null &
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

if [ "$rc" -eq 0 ]; then
    log "training finished"
elif [ "$rc" -eq "$EX_TEMPFAIL" ]; then
    log "stopped after writing a checkpoint; run the same command again to resume from $run_dir"
else
    log "trainer failed with status $rc"
fi
exit "$rc"
