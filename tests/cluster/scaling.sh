#!/bin/bash
# tests/cluster/scaling.sh OUTDIR [RATES...] -- the measurements of docs/performance.md#scaling-across-hosts
# on a cluster of 3 simulated hosts (tests/cluster/hosts.sh, root). For each link RATE (default: off
# 10gbit 1gbit; `off` = unshaped veth) it caps every host's link (hosts.sh shape), then runs as Slurm jobs:
#   ab-RATE.out        launch/alpha_beta.py on 2 hosts, 1 rank each (alpha and beta between hosts)
#   bench-RATE-PxQ.out python -m dpbp.bench on the 784-1024-1024-10 spec, P hosts x Q ranks (2x1 2x2 3x1),
#                      dpbp's step beside comm.bucket_mb=$BUCKET (default 4) overlap, interleaved repeats
#   bench-1x1.out      the same spec on one rank, one host: the compute time the model divides
# Uses the cluster named by DPBP_CLUSTER_PREFIX / DPBP_CLUSTER_DIR (brought up with 3 hosts if not up) and
# leaves it up; `hosts.sh down` stops it. BLAS: 1 thread per rank, OPENBLAS_CORETYPE/L2_SIZE unset.
# Knobs: REPEATS (default 6), BUCKET (MB, default 4), SHAPES (default "2x1 2x2 3x1"), AB=0 (skip the
# alpha/beta sweep and the 1x1 row), PY (default: the python3 on PATH).
# The bucket_mb sweep of docs/performance.md: for b in 1 2 8; do BUCKET=$b AB=0 SHAPES=2x1 scaling.sh DIR-b$b 1gbit; done
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
OUT=${1:?usage: scaling.sh OUTDIR [RATES...]}; shift
RATES=("${@:-off}"); [ $# -gt 0 ] || RATES=(off 10gbit 1gbit)
PY=${PY:-$(python3 -c 'import sys; print(sys.executable)')}
H=$HERE/hosts.sh
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
"$H" status >/dev/null 2>&1 || "$H" up 3
eval "$("$H" env)"
P=${DPBP_CLUSTER_PREFIX:-dpbp}

job() {  # job NAME SBATCH-OPTIONS... -- COMMAND...: run COMMAND under srun in a job, wait, keep its output
    local name=$1 opts=() id state; shift
    while [ "$1" != -- ]; do opts+=("$1"); shift; done; shift
    printf '#!/bin/bash\nexport OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1\nunset OPENBLAS_CORETYPE OPENBLAS_L2_SIZE\ncd %q\nexec %s\n' \
        "$REPO" "$(printf '%q ' "$@")" > "$OUT/$name.sh"
    id=$(sbatch --parsable "${opts[@]}" -o "$OUT/$name.out" "$OUT/$name.sh")
    for _ in $(seq 6000); do
        state=$(scontrol show job -o "$id" | grep -o 'JobState=[A-Z_]*' | cut -d= -f2)
        case $state in PENDING|RUNNING|CONFIGURING|COMPLETING) sleep 0.5 ;; *) break ;; esac
    done
    echo "$name: $state" >&2
}

BENCH=("$PY" -m dpbp.bench --spec 784-1024-1024-10 --no-reproducible --repeats "${REPEATS:-6}")
[ "${AB:-1}" = 0 ] || job bench-1x1 -N 1 -n 1 -w "$P-h1" -- "${BENCH[@]}" --threads 1
for rate in "${RATES[@]}"; do
    for k in 1 2 3; do "$H" shape "$k" "$rate"; done
    [ "${AB:-1}" = 0 ] || job "ab-$rate" -N 2 --ntasks-per-node=1 -w "$P-h1,$P-h2" -- srun --mpi=pmi2 "$PY" launch/alpha_beta.py --max-bytes 16777216 --seconds-per-size 0.5
    for shape in ${SHAPES:-2x1 2x2 3x1}; do
        job "bench-$rate-$shape" -N "${shape%x*}" --ntasks-per-node="${shape#*x}" -- \
            srun --mpi=pmi2 "${BENCH[@]}" --bucket-mb "${BUCKET:-4}"
    done
done
for k in 1 2 3; do "$H" shape "$k" off; done
