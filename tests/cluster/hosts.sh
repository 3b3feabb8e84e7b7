#!/bin/bash
# tests/cluster/hosts.sh -- a throw-away Slurm cluster of N simulated hosts on this one machine (root only).
#
#   hosts.sh up N           N hosts + one Slurm cluster; returns when all N nodes are idle (no-op if up)
#   hosts.sh env            `export NAME=value` lines: then sbatch, squeue, scancel, scontrol, sinfo, srun
#                           in the calling shell address this cluster (SLURM_CONF + wrapper scripts on PATH)
#   hosts.sh exec K CMD...  run CMD in host K's network (and UTS, IPC) namespace
#   hosts.sh link K down|up cut or restore host K's link to the switch
#   hosts.sh shape K RATE|off  cap host K's link at RATE (tc tbf, e.g. 1gbit, 10gbit) both ways, or remove the cap
#   hosts.sh slurmd K kill|start  SIGKILL host K's slurmd (its job steps run on), or start it again (recorded)
#   hosts.sh down           stop everything `up` started (by recorded PID), delete the namespaces and links
#   hosts.sh status         print the state directory, the hosts and their processes (exit 1 if not up)
# Exit status: 0 done, 2 usage or failure, 3 the packages it needs (${PACKAGES[*]}) cannot be installed.
#
# Layout (P = $DPBP_CLUSTER_PREFIX, default "dpbp"; state in $DPBP_CLUSTER_DIR, default /tmp/dpbp-cluster):
#   netns P-sw : bridge P-br, switch ends P-v1..P-vN of the hosts' veths, and the controller host
#                "P-ctl" (10.211.7.1, slurmctld in its own UTS + mount namespace)
#   netns P-hK : eth0 = the other end of P-vK, 10.211.7.(10+K)/24; host "P-hK" with its own UTS, IPC,
#                mount (private /dev/shm, /etc/hosts bind-mounted from the state dir) and PID namespace
#                (hostinit.py is PID 1, slurmd -D its child). Separate IPC namespaces and /dev/shm are
#                what makes MPI (UCX) see separate machines and move the data over TCP on the veths.
#   Nothing gets an address in the root network namespace, and /etc, /run/munge and any other Slurm are
#   left alone: one private munged (socket in the state dir) serves all hosts through the shared filesystem.
# Why nsenter, not `ip netns exec`, for the daemons: the latter remounts /sys, which hides /sys/fs/cgroup,
# and slurmd then refuses to start. Every process started here is recorded in STATE/run/pids as
# "name pid starttime"; `down` signals exactly those (the start time guards against PID reuse), so a
# cluster left behind by a killed test run is still found and removed by `down` (or by the next `up`).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DIR=${DPBP_CLUSTER_DIR:-/tmp/dpbp-cluster}
PFX=${DPBP_CLUSTER_PREFIX:-dpbp}
NET=10.211.7
SW=$PFX-sw
BR=$PFX-br
CTL=$PFX-ctl
PIDS=$DIR/run/pids
CONF=$DIR/etc/slurm.conf
SBIN=/usr/sbin:/usr/bin:/sbin:/bin
PACKAGES=(slurmctld slurmd slurm-client munge iproute2 util-linux)
NEEDED=(slurmctld slurmd sbatch srun scontrol sinfo squeue scancel munged ip tc nsenter unshare setpriv)
CLIENTS=(sbatch squeue scancel scontrol sinfo srun salloc)
export PATH=$PATH:$SBIN

die() { echo "hosts.sh: $*" >&2; exit 2; }
cannot_install() { echo "hosts.sh: cannot install: $*" >&2; exit 3; }  # exit 3: tests skip, not fail
log() { echo "hosts.sh: $*" >&2; }
now() { date +%s.%N; }

[ ${#PFX} -le 8 ] && [[ $PFX =~ ^[a-z][a-z0-9]*$ ]] || die "DPBP_CLUSTER_PREFIX must be 1-8 lowercase letters/digits (interface names are at most 15 characters)"

# ------------------------------------------------------------------ processes, by recorded PID

starttime() { sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f20; }
record() { echo "$1 $2 $(starttime "$2")" >> "$PIDS"; }
# alive PID START: the process is running and is still the one we recorded (not a reused PID)
state() { sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1; }
alive() { [ -n "$1" ] && [ -n "${2:-}" ] && [ "$(starttime "$1")" = "$2" ] && [ "$(state "$1")" != Z ]; }
entries() { [ -f "$PIDS" ] && awk -v n="$1" '$1 ~ "^"n"$" {print $2, $3}' "$PIDS" || true; }
pid_of() { entries "$1" | tail -n 1 | cut -d' ' -f1; }
# signal every recorded process named like PATTERN, wait up to WAIT s, then SIGKILL what is left
stop() {
    local pattern=$1 sig=$2 wait=$3 pid st left
    while read -r pid st; do [ -n "$pid" ] && alive "$pid" "$st" && kill "-$sig" "$pid" 2>/dev/null || true; done < <(entries "$pattern")
    for _ in $(seq "$((wait * 20))"); do
        left=0
        while read -r pid st; do [ -n "$pid" ] && alive "$pid" "$st" && left=1; done < <(entries "$pattern")
        [ $left = 0 ] && return 0
        sleep 0.05
    done
    while read -r pid st; do [ -n "$pid" ] && alive "$pid" "$st" && kill -KILL "$pid" 2>/dev/null || true; done < <(entries "$pattern")
}
comm_of() { cat "/proc/$1/comm" 2>/dev/null || true; }
children() { awk '{print $1}' "/proc/$1/task/$1/children" 2>/dev/null || true; }

# ------------------------------------------------------------------ packages

install_missing() {
    local missing=() b
    for b in "${NEEDED[@]}"; do command -v "$b" >/dev/null || missing+=("$b"); done
    getent passwd munge >/dev/null || missing+=(munge-user)
    [ ${#missing[@]} = 0 ] && return 0
    command -v apt-get >/dev/null || cannot_install "missing ${missing[*]} and no apt-get to install ${PACKAGES[*]}"
    log "installing ${PACKAGES[*]} (missing: ${missing[*]})"
    DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 || cannot_install "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >&2 \
        || cannot_install "apt-get install ${PACKAGES[*]} failed"
    for b in "${NEEDED[@]}"; do command -v "$b" >/dev/null || cannot_install "still missing $b after installing ${PACKAGES[*]}"; done
}

# ------------------------------------------------------------------ state

nhosts() { [ -f "$DIR/run/nhosts" ] && cat "$DIR/run/nhosts" || echo 0; }
host_ns() { echo "$PFX-h$1"; }
check_k() {
    local n; n=$(nhosts)
    [[ ${1:-} =~ ^[0-9]+$ ]] && [ "$1" -ge 1 ] && [ "$1" -le "$n" ] || die "host '${1:-}' is not one of 1..$n (is the cluster up?)"
}
# all daemons of an `up` cluster still running?
is_up() {
    local n k pid st; n=$(nhosts)
    [ "$n" -ge 1 ] || return 1
    for name in munged slurmctld $(for k in $(seq "$n"); do echo "init.$k slurmd.$k"; done); do
        read -r pid st < <(entries "$name" | tail -n 1) || return 1
        alive "$pid" "$st" || return 1
    done
    [ -e "/run/netns/$SW" ] || return 1
}

# ------------------------------------------------------------------ up

write_files() {
    local n=$1 k
    mkdir -p "$DIR"/{etc,bin,log,run,state,munge}
    chmod 0755 "$DIR"
    rm -rf "$DIR/state" "$DIR/spool"; mkdir -p "$DIR/state"
    for k in $(seq "$n"); do mkdir -p "$DIR/spool/$PFX-h$k"; done
    printf '127.0.0.1\tlocalhost\n%s.1\t%s\n' "$NET" "$CTL" > "$DIR/etc/hosts"
    for k in $(seq "$n"); do printf '%s.%d\t%s\n' "$NET" $((10 + k)) "$PFX-h$k" >> "$DIR/etc/hosts"; done
    : > "$DIR/etc/plugstack.conf"
    {
        cat <<CONF
# written by tests/cluster/hosts.sh: $n simulated hosts in network namespaces $PFX-h1..$PFX-h$n
ClusterName=${PFX}cl
SlurmctldHost=$CTL($NET.1)
SlurmctldPort=6917
SlurmdPort=6918
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$DIR/etc/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=pmi2
EnforcePartLimits=ALL
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=300
SlurmdTimeout=${DPBP_CLUSTER_SLURMD_TIMEOUT:-30}
MessageTimeout=10
MailProg=/bin/true
CONF
        for k in $(seq "$n"); do
            echo "NodeName=$PFX-h$k NodeAddr=$NET.$((10 + k)) CPUs=${DPBP_CLUSTER_CPUS:-2} RealMemory=2000 State=UNKNOWN"
        done
        echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
    } > "$CONF"
    write_wrappers
}

# Client wrappers: inside one of the cluster's network namespaces (a job on a host) run the client as is;
# anywhere else enter the switch namespace, where the controller is (the root namespace has no route).
write_wrappers() {
    local c
    for c in "${CLIENTS[@]}"; do
        cat > "$DIR/bin/$c" <<EOF
#!/bin/bash
# written by tests/cluster/hosts.sh: $c against the cluster in $DIR
export SLURM_CONF=$CONF
me=\$(stat -L -c %i /proc/self/ns/net)
if grep -qx "\$me" $DIR/run/netns-inodes 2>/dev/null; then exec /usr/bin/$c "\$@"; fi
exec nsenter --net=/run/netns/$SW -- /usr/bin/$c "\$@"
EOF
        chmod 0755 "$DIR/bin/$c"
    done
}

# The controller's and hosts' mount namespaces start as copies of the root one, copies of /run/netns/*
# included: those would keep other people's network namespaces alive after they delete them, so unmount.
UNPIN='for m in $(awk '"'"'$5 ~ "^/run/netns/" {print $5}'"'"' /proc/self/mountinfo); do umount -l "$m" 2>/dev/null; done'

network_up() {
    local n=$1 k ns
    for ns in "$SW" $(for k in $(seq "$n"); do host_ns "$k"; done); do
        [ -e "/run/netns/$ns" ] && die "network namespace $ns exists but is not this cluster's (state $DIR); remove it or set DPBP_CLUSTER_PREFIX"
    done
    ip netns add "$SW"; echo "$SW" >> "$DIR/run/netns"
    ip -n "$SW" link set lo up
    ip -n "$SW" link add "$BR" type bridge
    ip -n "$SW" addr add "$NET.1/24" dev "$BR"
    ip -n "$SW" link set "$BR" up
    for k in $(seq "$n"); do
        ns=$(host_ns "$k")
        ip netns add "$ns"; echo "$ns" >> "$DIR/run/netns"
        ip -n "$SW" link add "$PFX-v$k" type veth peer name eth0 netns "$ns"
        ip -n "$SW" link set "$PFX-v$k" master "$BR"
        ip -n "$SW" link set "$PFX-v$k" up
        ip -n "$ns" addr add "$NET.$((10 + k))/24" dev eth0
        ip -n "$ns" link set lo up
        ip -n "$ns" link set eth0 up
    done
    for ns in $(cat "$DIR/run/netns"); do stat -L -c %i "/run/netns/$ns"; done > "$DIR/run/netns-inodes"
}

munge_up() {
    local m=$DIR/munge
    chown munge:munge "$m"; chmod 0755 "$m"  # munged wants o+x on its socket directory
    [ -s "$m/munge.key" ] || dd if=/dev/urandom of="$m/munge.key" bs=1024 count=1 status=none
    chown munge:munge "$m/munge.key"; chmod 0400 "$m/munge.key"
    rm -f "$m/munge.socket"
    setsid setpriv --reuid=munge --regid=munge --clear-groups -- munged --foreground \
        --socket="$m/munge.socket" --key-file="$m/munge.key" --log-file="$m/munged.log" \
        --pid-file="$m/munged.pid" --seed-file="$m/munged.seed" > "$DIR/log/munged.console" 2>&1 < /dev/null &
    record munged $!
    for _ in $(seq 200); do [ -S "$m/munge.socket" ] && return 0; sleep 0.025; done
    die "munged did not create its socket; see $DIR/log/munged.console"
}

ctl_up() {
    setsid nsenter --net="/run/netns/$SW" unshare --uts --mount --propagation private -- /bin/sh -c \
        "$UNPIN; hostname $CTL && mount --bind $DIR/etc/hosts /etc/hosts && exec slurmctld -D -i -f $CONF" \
        > "$DIR/log/slurmctld.console" 2>&1 < /dev/null &
    record slurmctld $!  # nsenter, unshare and sh exec: this PID becomes slurmctld
}

host_up() {
    local k=$1 ns u init sd PY
    # the init needs a real interpreter (not a pyenv shim): the system one, else whatever python3 is
    PY=$(command -v /usr/bin/python3 || python3 -c 'import sys; print(sys.executable)')
    ns=$(host_ns "$k")
    setsid nsenter --net="/run/netns/$ns" unshare --uts --mount --ipc --pid --fork --mount-proc --propagation private -- \
        /bin/sh -c "$UNPIN; hostname $ns && mount --bind $DIR/etc/hosts /etc/hosts \
                    && mount -t tmpfs -o size=2g,mode=1777 tmpfs /dev/shm \
                    && exec $PY $HERE/hostinit.py slurmd -D -f $CONF -N $ns" \
        >> "$DIR/log/host.$k.console" 2>&1 < /dev/null &
    u=$!; record "unshare.$k" "$u"
    init="" sd=""
    for _ in $(seq 400); do
        # sh (PID 1 of the new namespace) runs a few commands, then execs hostinit, which starts slurmd
        if [ -z "$init" ]; then
            init=$(children "$u")
            if [ -n "$init" ]; then record "init.$k" "$init"; fi
        fi
        if [ -n "$init" ] && [[ $(comm_of "$init") == python* ]]; then sd=$(children "$init"); fi
        if [ -n "$sd" ] && [ "$(comm_of "$sd")" = slurmd ]; then record "slurmd.$k" "$sd"; return 0; fi
        sleep 0.025
    done
    die "host $k: slurmd did not start; see $DIR/log/host.$k.console"
}

wait_idle() {
    local n=$1 states=""
    for _ in $(seq 1200); do
        states=$(SLURM_CONF=$CONF nsenter --net="/run/netns/$SW" sinfo -h -N -o '%N %T' 2>/dev/null | sort -u || true)
        [ "$(grep -c ' idle$' <<< "$states")" = "$n" ] && return 0
        sleep 0.05
    done
    die "not all $n nodes idle after 60 s: $states; logs in $DIR/log"
}

cmd_up() {
    local n=${1:-} t0 k
    [[ $n =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] && [ "$n" -le 50 ] || die "usage: hosts.sh up N (1 <= N <= 50)"
    [ "$(id -u)" = 0 ] || die "needs root (network namespaces, Slurm daemons)"
    if is_up; then
        [ "$(nhosts)" = "$n" ] && { log "already up with $n hosts ($DIR)"; return 0; }
        die "already up with $(nhosts) hosts, not $n: run hosts.sh down first"
    fi
    [ -s "$PIDS" ] || [ -s "$DIR/run/netns" ] && { log "removing a cluster left half-up in $DIR"; cmd_down; }
    install_missing
    t0=$(now)
    mkdir -p "$DIR/run"; : > "$PIDS"; : > "$DIR/run/netns"
    UP_DONE=0
    trap 'if [ "$UP_DONE" != 1 ]; then log "up failed: tearing down (logs kept in $DIR/log)"; cmd_down; fi' EXIT
    write_files "$n"
    network_up "$n"
    munge_up
    ctl_up
    for k in $(seq "$n"); do host_up "$k"; done
    echo "$n" > "$DIR/run/nhosts"
    wait_idle "$n"
    UP_DONE=1
    log "$n hosts idle after $(printf '%.2f' "$(echo "$(now) - $t0" | bc)") s (state $DIR)"
}

# ------------------------------------------------------------------ down

cmd_down() {
    local ns k
    # hosts first: SIGKILL to a host's PID 1 ends everything in its PID namespace (slurmd, steps, ranks)
    stop 'init[.][0-9]+' KILL 5
    stop 'unshare[.][0-9]+' TERM 5
    stop 'slurmd[.][0-9]+' KILL 1
    stop slurmctld TERM 5
    stop munged TERM 5
    for ns in $( [ -f "$DIR/run/netns" ] && tac "$DIR/run/netns"); do
        [ -e "/run/netns/$ns" ] && { ip netns del "$ns" || log "could not delete netns $ns"; }
    done
    rm -f "$PIDS" "$DIR/run/netns" "$DIR/run/netns-inodes" "$DIR/run/nhosts" "$DIR/munge/munge.socket"
}

# ------------------------------------------------------------------ the rest

cmd_env() {
    is_up || die "the cluster is not up (hosts.sh up N)"
    echo "export DPBP_CLUSTER_DIR=$DIR"
    echo "export DPBP_CLUSTER_PREFIX=$PFX"
    echo "export SLURM_CONF=$CONF"
    echo "export PATH=$DIR/bin:\$PATH"
}

cmd_exec() {
    local k=${1:-} init
    check_k "$k"; shift
    [ $# -ge 1 ] || die "usage: hosts.sh exec K CMD..."
    init=$(pid_of "init.$k")
    [ -n "$init" ] && [ -e "/proc/$init/ns/uts" ] || die "host $k is not running"
    exec nsenter --net="/run/netns/$(host_ns "$k")" --uts="/proc/$init/ns/uts" --ipc="/proc/$init/ns/ipc" -- "$@"
}

cmd_link() {
    local k=${1:-} how=${2:-}
    check_k "$k"
    [ "$how" = up ] || [ "$how" = down ] || die "usage: hosts.sh link K down|up"
    ip -n "$SW" link set "$PFX-v$k" "$how"
}

# tbf on both ends of host K's veth: eth0 in the host (what it sends) and P-vK in the switch (what it
# receives); tbf shapes egress only. No netem in this kernel, so latency cannot be added, only a rate cap.
# burst: 1 ms of the rate (at least 64 kB, what a 1 Gbit/s link needs not to drop GSO-sized packets).
cmd_shape() {
    local k=${1:-} rate=${2:-} bytes burst
    check_k "$k"
    [ -n "$rate" ] || die "usage: hosts.sh shape K RATE|off (RATE as tc writes it: 1gbit, 10gbit, 500mbit)"
    tc -n "$SW" qdisc del dev "$PFX-v$k" root 2>/dev/null || true
    tc -n "$(host_ns "$k")" qdisc del dev eth0 root 2>/dev/null || true
    [ "$rate" = off ] && return 0
    [[ $rate =~ ^([0-9]+)(k|m|g)bit$ ]] || die "RATE must look like 1gbit, 10gbit or 500mbit, not '$rate'"
    case ${BASH_REMATCH[2]} in k) bytes=$((BASH_REMATCH[1] * 125)) ;; m) bytes=$((BASH_REMATCH[1] * 125000)) ;;
                               g) bytes=$((BASH_REMATCH[1] * 125000000)) ;; esac
    burst=$((bytes / 1000)); [ "$burst" -ge 65536 ] || burst=65536
    tc -n "$SW" qdisc add dev "$PFX-v$k" root tbf rate "$rate" burst "$burst" latency 50ms
    tc -n "$(host_ns "$k")" qdisc add dev eth0 root tbf rate "$rate" burst "$burst" latency 50ms
}

# slurmd K kill: a dead slurmd (the node's job steps keep running, as on a real node); start: hostinit
# starts it again on SIGUSR1, and the new slurmd is recorded, so that `up`, `env` and `down` know it.
cmd_slurmd() {
    local k=${1:-} how=${2:-} pid st init sd=""
    check_k "$k"
    read -r pid st < <(entries "slurmd.$k" | tail -n 1) || true
    case $how in
        kill) alive "$pid" "$st" && kill -KILL "$pid"; return 0 ;;
        start) alive "$pid" "$st" && return 0 ;;
        *) die "usage: hosts.sh slurmd K kill|start" ;;
    esac
    init=$(pid_of "init.$k")
    kill -USR1 "$init" || die "host $k is not running"
    for _ in $(seq 200); do
        for c in $(children "$init"); do [ "$(comm_of "$c")" = slurmd ] && sd=$c; done
        if [ -n "$sd" ]; then  # the dead one's line replaced: run/pids lists what runs
            grep -v "^slurmd\.$k " "$PIDS" > "$PIDS.new" || true; mv "$PIDS.new" "$PIDS"
            record "slurmd.$k" "$sd"; return 0
        fi
        sleep 0.025
    done
    die "host $k: slurmd did not start again; see $DIR/log/host.$k.console"
}

cmd_status() {
    is_up || { echo "not up ($DIR)"; return 1; }
    echo "up: $(nhosts) hosts, state $DIR, prefix $PFX"
    cat "$PIDS"
    SLURM_CONF=$CONF nsenter --net="/run/netns/$SW" sinfo -N
}

case ${1:-} in
    up) shift; cmd_up "$@" ;;
    down) cmd_down ;;
    env) cmd_env ;;
    exec) shift; cmd_exec "$@" ;;
    link) shift; cmd_link "$@" ;;
    shape) shift; cmd_shape "$@" ;;
    slurmd) shift; cmd_slurmd "$@" ;;
    status) cmd_status ;;
    *) die "usage: hosts.sh up N | env | exec K CMD... | link K down|up | shape K RATE|off | slurmd K kill|start | down | status" ;;
esac; exit  # on the same line: bash has read the whole command before the file could change
