#!/usr/bin/env bash
# Stand up / tear down a one-node SLURM cluster on 127.0.0.1.
#
# For CI (tests/test_slurm.py) and for trying `snakemake --profile slurm`
# without a real cluster. Uses Debian's slurm-wlm and munge (installed with
# apt-get when missing) and keeps every file it owns under one state
# directory: config, munge key and socket, PID files, spool and logs.
# Nothing outside it is touched except /etc/slurm/slurm.conf: `up` makes it a
# link to the generated config (jobs started by snakemake find the cluster only
# there) and refuses if that path belongs to anything else; `down` removes the
# link. Hence one local cluster at a time.
#
# Usage:
#   scripts/slurm-local.sh up     [--state-dir DIR]   start (idempotent), wait for an idle node
#   scripts/slurm-local.sh down   [--state-dir DIR] [--purge]   stop whatever is running
#   scripts/slurm-local.sh status [--state-dir DIR]   daemons and sinfo
#
# Environment: SRMAP_SLURM_STATE_DIR (default /tmp/srmap-slurm),
# SRMAP_SLURM_MEM_MB (node RealMemory; default 80% of MemTotal),
# SRMAP_SLURM_CPUS (default nproc), SRMAP_SLURM_CTLD_PORT / SRMAP_SLURM_SLURMD_PORT
# (default 6817 / 6818), SRMAP_SLURM_UP_TIMEOUT (seconds to wait for idle, default 90).
set -euo pipefail

PROG=slurm-local.sh
die() { echo "$PROG: $*" >&2; exit 1; }
log() { echo "$PROG: $*" >&2; }

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
}

# ---------------------------------------------------------------- arguments
[[ $# -ge 1 ]] || { usage >&2; exit 2; }
CMD=$1; shift
STATE_DIR=${SRMAP_SLURM_STATE_DIR:-/tmp/srmap-slurm}
PURGE=0
while [[ $# -gt 0 ]]; do
    case $1 in
        --state-dir) [[ $# -ge 2 ]] || die "--state-dir needs a directory"; STATE_DIR=$2; shift 2 ;;
        --state-dir=*) STATE_DIR=${1#*=}; shift ;;
        --purge) PURGE=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (expected --state-dir DIR or --purge)" ;;
    esac
done
case $CMD in up|down|status) ;; -h|--help|help) usage; exit 0 ;;
    *) die "unknown command '$CMD' (expected up, down or status)" ;; esac
[[ $STATE_DIR == /* ]] || STATE_DIR=$(pwd -P)/$STATE_DIR
# `down --purge` deletes STATE_DIR; refuse anything that could be a system dir.
[[ $STATE_DIR != / && $(dirname "$STATE_DIR") != / ]] \
    || die "--state-dir '$STATE_DIR' is too close to / (use e.g. /tmp/srmap-slurm)"

MARKER=$STATE_DIR/.srmap-slurm-state
CONF=$STATE_DIR/etc/slurm.conf
MUNGE_DIR=$STATE_DIR/munge
MUNGE_SOCKET=$MUNGE_DIR/munge.socket.2
RUN_DIR=$STATE_DIR/run
LOG_DIR=$STATE_DIR/log
NODE=$(hostname -s)
ETC_CONF=/etc/slurm/slurm.conf
# This script's own sinfo/squeue/scancel reach this state dir's cluster even
# while /etc/slurm/slurm.conf is not (yet) linked to it.
export SLURM_CONF=$CONF

# ------------------------------------------------------------ PID handling
# A daemon counts as ours only if its PID file names a live process whose
# executable is the expected binary, so a recycled PID is never signalled.
daemon_pid() {  # $1 = pidfile, $2 = binary path; prints the PID if alive
    local pidfile=$1 binary=$2 pid exe
    [[ -r $pidfile ]] || return 1
    pid=$(tr -dc '0-9' <"$pidfile")
    [[ -n $pid ]] || return 1
    exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
    [[ $exe == "$(readlink -f "$binary")" ]] || return 1
    echo "$pid"
}

stop_daemon() {  # $1 = name, $2 = pidfile, $3 = binary
    local name=$1 pidfile=$2 binary=$3 pid i
    if pid=$(daemon_pid "$pidfile" "$binary"); then
        log "stopping $name (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        # /proc/PID/exe vanishes at exit, even while an unreaped zombie remains.
        for i in $(seq 1 50); do
            readlink "/proc/$pid/exe" >/dev/null 2>&1 || break
            sleep 0.2
        done
        if readlink "/proc/$pid/exe" >/dev/null 2>&1; then
            log "$name (pid $pid) ignored SIGTERM for 10 s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$pidfile"
}

MUNGED=/usr/sbin/munged
SLURMCTLD=/usr/sbin/slurmctld
SLURMD=/usr/sbin/slurmd

# ------------------------------------------------------------------ install
ensure_packages() {
    local missing=0 b
    for b in "$MUNGED" "$SLURMCTLD" "$SLURMD" /usr/bin/sbatch /usr/bin/squeue /usr/bin/sinfo; do
        [[ -x $b ]] || missing=1
    done
    [[ $missing == 0 ]] && return 0
    command -v apt-get >/dev/null || die "slurm-wlm/munge are missing and apt-get is not available (Debian/Ubuntu only)"
    log "installing slurm-wlm and munge with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 \
        || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >&2 \
        || die "apt-get install slurm-wlm munge failed"
}

# ------------------------------------------------------------------- config
write_conf() {
    local cpus mem_mb tmp
    # nproc obeys OMP_NUM_THREADS, which callers often set to 1 for their own process.
    cpus=${SRMAP_SLURM_CPUS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}
    # slurmd drains a node whose RealMemory exceeds what it finds, so stay below it.
    mem_mb=${SRMAP_SLURM_MEM_MB:-$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.8}' /proc/meminfo)}
    [[ $cpus =~ ^[1-9][0-9]*$ ]] || die "SRMAP_SLURM_CPUS='$cpus' is not a positive integer"
    [[ $mem_mb =~ ^[1-9][0-9]*$ ]] || die "SRMAP_SLURM_MEM_MB='$mem_mb' is not a positive integer"
    tmp=$(mktemp "$CONF.XXXXXX")
    cat >"$tmp" <<EOF
# Generated by scripts/slurm-local.sh; rewritten on every \`up\`.
ClusterName=srmap-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=${SRMAP_SLURM_CTLD_PORT:-6817}
SlurmdPort=${SRMAP_SLURM_SLURMD_PORT:-6818}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Private munged socket so a system munged (if any) is never involved.
AuthInfo=socket=$MUNGE_SOCKET
# Container-safe plugins: no cgroups, no CPU binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
# No slurmdbd: sacct cannot work, so the snakemake plugin must poll squeue,
# which it trusts only if finished jobs stay visible for >= 3 x its
# init-seconds-before-status-checks (profiles/slurm uses 60 s); an hour keeps
# a whole demo run on record for tests/test_slurm.py and for debugging.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=3600
StateSaveLocation=$STATE_DIR/spool/ctld
SlurmdSpoolDir=$STATE_DIR/spool/slurmd
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# A job without --mem must not take the whole node.
DefMemPerCPU=1000
# Trust the CPUs/RealMemory below even if SRMAP_SLURM_* overrides exceed the
# hardware (no cgroups here, so nothing is enforced) instead of draining the node.
SlurmdParameters=config_overrides
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    if [[ -f $CONF ]] && cmp -s "$tmp" "$CONF"; then
        rm -f "$tmp"
        return 0
    fi
    if any_daemon_running; then
        rm -f "$tmp"
        die "the cluster in $STATE_DIR runs with other settings (CPUs, memory or ports changed); run '$PROG down' first"
    fi
    chmod 0644 "$tmp"
    mv -f "$tmp" "$CONF"
}

any_daemon_running() { state_running "$STATE_DIR"; }

state_running() {  # $1 = a state dir; true if any of its daemons is alive
    daemon_pid "$1/munge/munged.pid" "$MUNGED" >/dev/null \
        || daemon_pid "$1/run/slurmctld.pid" "$SLURMCTLD" >/dev/null \
        || daemon_pid "$1/run/slurmd.pid" "$SLURMD" >/dev/null
}

link_etc_conf() {
    # snakemake-executor-plugin-slurm-jobstep strips SLURM_CONF from the
    # environment of the srun it starts inside every job, so that srun finds the
    # cluster only through the default path: /etc/slurm/slurm.conf must be ours.
    local target other
    if [[ -L $ETC_CONF ]]; then
        target=$(readlink "$ETC_CONF")
        [[ $target == "$CONF" ]] && return 0
        other=$(dirname "$(dirname "$target")")
        if [[ -e $other/.srmap-slurm-state ]]; then
            state_running "$other" \
                && die "another local cluster is up (state dir $other); stop it first: $PROG down --state-dir $other"
        elif [[ -e $target ]]; then
            die "$ETC_CONF links to $target, which $PROG did not create; jobs would use that cluster (the jobstep plugin ignores SLURM_CONF), so remove the link or use that cluster"
        fi
        rm -f "$ETC_CONF"  # left over from a stopped or purged local cluster
    elif [[ -e $ETC_CONF ]]; then
        die "$ETC_CONF exists and was not written by $PROG; jobs would use that cluster (the jobstep plugin ignores SLURM_CONF), so move it away or use that cluster"
    fi
    mkdir -p "$(dirname "$ETC_CONF")"
    ln -s "$CONF" "$ETC_CONF"
}

# ------------------------------------------------------------------ daemons
start_munged() {
    if daemon_pid "$MUNGE_DIR/munged.pid" "$MUNGED" >/dev/null; then return 0; fi
    install -d -o munge -g munge -m 0755 "$MUNGE_DIR"
    runuser -u munge -- test -w "$MUNGE_DIR" \
        || die "user munge cannot reach $MUNGE_DIR: a parent directory is not world-searchable (mode 0700?); use a --state-dir such as /tmp/srmap-slurm"
    if [[ ! -s $MUNGE_DIR/munge.key ]]; then
        # A fresh random key per state dir; munged insists on owner-only access.
        head -c 1024 /dev/urandom >"$MUNGE_DIR/munge.key"
    fi
    chown munge:munge "$MUNGE_DIR/munge.key"
    chmod 0400 "$MUNGE_DIR/munge.key"
    log "starting munged"
    runuser -u munge -- "$MUNGED" \
        --socket="$MUNGE_SOCKET" --key-file="$MUNGE_DIR/munge.key" \
        --pid-file="$MUNGE_DIR/munged.pid" --log-file="$MUNGE_DIR/munged.log" \
        --seed-file="$MUNGE_DIR/munged.seed" \
        || die "munged failed to start; see $MUNGE_DIR/munged.log"
}

start_slurmctld() {
    if daemon_pid "$RUN_DIR/slurmctld.pid" "$SLURMCTLD" >/dev/null; then return 0; fi
    log "starting slurmctld"
    "$SLURMCTLD" -f "$CONF" -i || die "slurmctld failed to start; see $LOG_DIR/slurmctld.log"
}

start_slurmd() {
    if daemon_pid "$RUN_DIR/slurmd.pid" "$SLURMD" >/dev/null; then return 0; fi
    log "starting slurmd"
    "$SLURMD" -f "$CONF" -N "$NODE" || die "slurmd failed to start; see $LOG_DIR/slurmd.log"
}

node_state() {
    sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -n 1 | tr -d '*~#%$@!^-' || true
}

wait_idle() {
    local timeout=${SRMAP_SLURM_UP_TIMEOUT:-90} start state resumed=0
    start=$SECONDS
    while (( SECONDS - start < timeout )); do
        state=$(node_state)
        case $state in
            idle|mixed|allocated|completing) log "node $NODE is $state"; return 0 ;;
            drained|draining|down)
                if [[ $resumed == 0 ]]; then
                    # Left over from an unclean stop; the node itself is fine.
                    scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
                    resumed=1
                fi ;;
        esac
        sleep 1
    done
    log "node $NODE did not become idle within ${timeout}s (state: '${state:-unknown}'); last log lines:"
    tail -n 5 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 2>/dev/null || true
    die "cluster is not usable; see $LOG_DIR"
}

cmd_up() {
    [[ $(id -u) == 0 ]] || die "must run as root (it installs packages and starts munged/slurmctld/slurmd)"
    ensure_packages
    id munge >/dev/null 2>&1 || die "user 'munge' does not exist (is the munge package installed?)"
    if [[ -e $STATE_DIR && ! -e $MARKER && -n $(ls -A "$STATE_DIR" 2>/dev/null) ]]; then
        die "--state-dir '$STATE_DIR' exists and was not created by $PROG; choose an empty or new directory"
    fi
    mkdir -p "$STATE_DIR/etc" "$RUN_DIR" "$LOG_DIR" "$STATE_DIR/spool/ctld" "$STATE_DIR/spool/slurmd"
    chmod 0755 "$STATE_DIR"
    touch "$MARKER"
    write_conf
    link_etc_conf
    start_munged
    start_slurmctld
    start_slurmd
    wait_idle
    log "up; state in $STATE_DIR, config linked from $ETC_CONF"
}

cancel_jobs() {
    local ids i
    daemon_pid "$RUN_DIR/slurmctld.pid" "$SLURMCTLD" >/dev/null || return 0
    ids=$(squeue -h -o %i 2>/dev/null || true)
    [[ -n $ids ]] || return 0
    log "cancelling jobs: $(echo $ids)"
    # shellcheck disable=SC2086
    scancel $ids 2>/dev/null || true
    # Give slurmd time to kill the job steps before it is stopped itself.
    for i in $(seq 1 30); do
        [[ -z $(squeue -h -t RUNNING,COMPLETING -o %i 2>/dev/null || true) ]] && break
        sleep 0.5
    done
}

cmd_down() {
    if [[ ! -e $MARKER ]]; then
        log "nothing to stop in $STATE_DIR"
    else
        [[ $(id -u) == 0 ]] || die "must run as root to stop the daemons in $STATE_DIR"
        cancel_jobs
        stop_daemon slurmd "$RUN_DIR/slurmd.pid" "$SLURMD"
        stop_daemon slurmctld "$RUN_DIR/slurmctld.pid" "$SLURMCTLD"
        stop_daemon munged "$MUNGE_DIR/munged.pid" "$MUNGED"
    fi
    if [[ -L $ETC_CONF && $(readlink "$ETC_CONF") == "$CONF" ]]; then
        rm -f "$ETC_CONF"
    fi
    if [[ $PURGE == 1 && -e $MARKER ]]; then
        rm -rf "$STATE_DIR"
        log "removed $STATE_DIR"
    fi
    log "down"
}

cmd_status() {
    local name pidfile binary pid rc=0
    for spec in "munged:$MUNGE_DIR/munged.pid:$MUNGED" \
                "slurmctld:$RUN_DIR/slurmctld.pid:$SLURMCTLD" \
                "slurmd:$RUN_DIR/slurmd.pid:$SLURMD"; do
        IFS=: read -r name pidfile binary <<<"$spec"
        if pid=$(daemon_pid "$pidfile" "$binary"); then
            echo "$name: running (pid $pid)"
        else
            echo "$name: stopped"; rc=1
        fi
    done
    [[ $rc == 0 ]] && sinfo -N -l
    return $rc
}

case $CMD in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
esac
