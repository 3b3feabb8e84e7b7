#!/bin/bash
# launch/local.sh -- train dpbp with plain mpirun on this one machine.
#
# Usage:
#   launch/local.sh [-n P] CONFIG [dpbp.train options...]
#   e.g. launch/local.sh -n 4 configs/digits.toml --set train.steps=2000
#        DPBP_RUN_NAME=exp1 launch/local.sh configs/xor.toml
#
# The run directory, resuming, signals, exit status and BLAS threads are those of
# `python -m dpbp.launch --help`, shared with launch/slurm.sbatch and launch/pbs.sh. Local here:
#   * P ranks: -n P, else $DPBP_NP, else one rank per NUMA node (memory domain, usually a socket),
#     each with its cores as BLAS threads: within one memory domain BLAS threads beat extra ranks
#     (every rank repeats the whole SGD update, and the Allreduce through shared memory takes CPU
#     time from the same cores); README "Ranks per node and BLAS threads per rank".
#   * RUN_DIR defaults to runs/local-<config name>: the same command again continues the run.
#   * mpirun runs in a session of its own, so a Ctrl-C reaches only the launcher: the ranks
#     checkpoint and stop with status 75 (a second Ctrl-C stops them at once).
#   * Output goes to the terminal and is appended to RUN_DIR/launch.log.
#   * With Open MPI's mpirun, --oversubscribe is added when P > cores (MPICH's hydra needs none).
# Knobs: DPBP_NP, DPBP_PYTHON (default python3), DPBP_MPIRUN (default mpirun), DPBP_MPIRUN_ARGS
# (extra mpirun arguments), DPBP_HOME (a checkout put on PYTHONPATH; default: this script's
# parent directory), DPBP_RUN_DIR, DPBP_RUNS, DPBP_RUN_NAME.

# shellcheck disable=SC2012 # ls of NUMA node directories
set -u
die() { echo "[local.sh $(date '+%F %T')] error: $*" >&2; exit 2; }
usage="usage: launch/local.sh [-n P] CONFIG [dpbp.train options...]"

np=${DPBP_NP:-}
case ${1:-} in
    -n) [ $# -ge 2 ] || die "$usage"; np=$2; shift 2 ;;
    -n*) np=${1#-n}; shift ;;
    -h | --help) sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; exit 0 ;;
esac
if [ -z "$np" ]; then
    np=$(ls -d /sys/devices/system/node/node[0-9]* 2>/dev/null | wc -l)
    [ "$np" -ge 1 ] 2>/dev/null || np=1
fi

home=${DPBP_HOME:-$(dirname "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)")}
[ -d "$home/dpbp" ] && export PYTHONPATH="$home${PYTHONPATH:+:$PYTHONPATH}"
py=${DPBP_PYTHON:-python3}
command -v "$py" >/dev/null || die "python interpreter '$py' not found (set DPBP_PYTHON)"
"$py" -c 'import dpbp' 2>/dev/null || die "$py cannot import dpbp: pip install it there, or set DPBP_HOME or DPBP_PYTHON"

mpirun=${DPBP_MPIRUN:-mpirun}
launch=("$mpirun" -n "$np")
cores=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)
if [ "$np" -gt "$cores" ] 2>/dev/null && "$mpirun" --version 2>/dev/null | grep -qi 'open mpi'; then
    launch+=(--oversubscribe)
fi
# shellcheck disable=SC2206 # word splitting of extra mpirun args is intended
[ -n "${DPBP_MPIRUN_ARGS:-}" ] && launch+=($DPBP_MPIRUN_ARGS)

exec "$py" -m dpbp.launch --name local.sh --np "$np" --run-name 'local-{config}' --tee --new-session \
    --usage "$usage" -- "${launch[@]}" -- "$@"
