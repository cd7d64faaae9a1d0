#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine (Debian's slurm-wlm and munge), for tests and benchmarks.
#
#   scripts/slurm-local.sh install   # apt-get install slurm-wlm munge (root)
#   scripts/slurm-local.sh start     # start munged (unless one answers already), slurmctld, slurmd; wait for idle
#   scripts/slurm-local.sh status    # exit 0 when the cluster answers
#   scripts/slurm-local.sh stop      # stop exactly what `start` started (the PIDs it recorded)
#   scripts/slurm-local.sh env       # prints `export SLURM_CONF=...` for clients (eval "$(... env)")
#
# Everything lives in $SLURM_LOCAL_DIR (default /tmp/rft-bench-slurm): slurm.conf, state, spool, logs, pid files.
# Clients find the cluster through SLURM_CONF; /etc/slurm/slurm.conf is linked to ours only when absent
# (and unlinked by `stop`), so a machine's own Slurm setup is never touched.
# Facts behind the config: ../shared/SLURM.md (no cgroups, no systemd, no accounting daemon).
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/tmp/rft-bench-slurm}
CONF=$DIR/slurm.conf
HOST=$(hostname)

log() { echo "slurm-local: $*" >&2; }

need_root() {
    if [ "$(id -u)" != 0 ]; then log "must run as root (slurmd and munged need it)"; exit 2; fi
}

alive() {  # alive PIDFILE -> 0 when the pid in it runs
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

cmd_install() {
    need_root
    if command -v slurmctld >/dev/null && command -v munged >/dev/null; then log "already installed"; return; fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_conf() {
    local cpus mem
    cpus=$(nproc)
    mem=$(slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -1)
    mem=$(( ${mem:-4096} * 9 / 10 ))
    cat > "$CONF" <<EOF
# Written by scripts/slurm-local.sh: a one-node cluster for tests.
ClusterName=rftbench
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
SlurmctldPort=${SLURM_LOCAL_CTLD_PORT:-6817}
SlurmdPort=${SLURM_LOCAL_D_PORT:-6818}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/backfill
# Sweeps submit big arrays: 10,000 jobs must fit in one array and in the queue.
MaxArraySize=20001
MaxJobCount=50000
# Requeued / cancelled jobs die quickly (tests requeue a job half-way).
KillWait=2
MinJobAge=60
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$HOST CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
}

munge_works() { command -v munge >/dev/null && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

cmd_start() {
    need_root
    for c in slurmctld slurmd munged sinfo; do
        command -v "$c" >/dev/null || { log "$c not found: run '$0 install' (apt-get install slurm-wlm munge)"; exit 3; }
    done
    if alive "$DIR/slurmctld.pid" || alive "$DIR/slurmd.pid"; then
        log "already running (stop it with '$0 stop')"; return
    fi
    rm -rf "$DIR/state" "$DIR/spool"
    mkdir -p "$DIR/state" "$DIR/spool"
    : > "$DIR/started"                               # what this start owns, one line each
    write_conf
    if [ ! -e /etc/slurm/slurm.conf ]; then
        mkdir -p /etc/slurm
        ln -s "$CONF" /etc/slurm/slurm.conf
        echo "link /etc/slurm/slurm.conf" >> "$DIR/started"
    fi
    if munge_works; then
        log "munged already answers; using it"
    else
        mkdir -p /run/munge /var/lib/munge /var/log/munge
        chown munge:munge /run/munge /var/lib/munge /var/log/munge
        chmod 0755 /run/munge
        [ -s /etc/munge/munge.key ] || { log "/etc/munge/munge.key missing: reinstall munge"; exit 3; }
        su -s /bin/sh munge -c "/usr/sbin/munged --pid-file=/run/munge/rftbench-munged.pid"
        for _ in $(seq 50); do munge_works && break; sleep 0.1; done
        munge_works || { log "munged did not start (see /var/log/munge/munged.log)"; exit 4; }
        echo "munged $(cat /run/munge/rftbench-munged.pid)" >> "$DIR/started"
    fi
    export SLURM_CONF=$CONF
    slurmctld -f "$CONF"
    for _ in $(seq 100); do alive "$DIR/slurmctld.pid" && break; sleep 0.1; done
    alive "$DIR/slurmctld.pid" || { log "slurmctld did not start; see $DIR/slurmctld.log"; exit 4; }
    echo "slurmctld $(cat "$DIR/slurmctld.pid")" >> "$DIR/started"
    slurmd -f "$CONF"
    for _ in $(seq 100); do alive "$DIR/slurmd.pid" && break; sleep 0.1; done
    alive "$DIR/slurmd.pid" || { log "slurmd did not start; see $DIR/slurmd.log"; exit 4; }
    echo "slurmd $(cat "$DIR/slurmd.pid")" >> "$DIR/started"
    for _ in $(seq 120); do
        state=$(sinfo -h -o %T 2>/dev/null | head -1 || true)
        if [ "$state" = idle ]; then log "up: node $HOST idle (SLURM_CONF=$CONF)"; return; fi
        sleep 0.5
    done
    log "node not idle after 60 s (state: ${state:-none}); see $DIR/slurmctld.log and $DIR/slurmd.log"
    exit 4
}

stop_pid() {  # stop_pid NAME PID: TERM, wait, KILL
    local name=$1 pid=$2
    kill -0 "$pid" 2>/dev/null || return 0
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || { log "stopped $name ($pid)"; return 0; }; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    log "killed $name ($pid)"
}

cmd_stop() {
    [ -f "$DIR/started" ] || { log "nothing started by this script"; return 0; }
    export SLURM_CONF=$CONF
    # Job steps left running belong to this cluster: cancel them first (only if our slurmctld answers).
    if alive "$DIR/slurmctld.pid"; then scancel --quiet --user="$(id -un)" 2>/dev/null || true; sleep 1; fi
    # Reverse order: slurmd, slurmctld, munged, then the link.
    tac "$DIR/started" | while read -r what arg; do
        case $what in
            slurmd|slurmctld|munged) stop_pid "$what" "$arg" ;;
            link) [ -L "$arg" ] && [ "$(readlink "$arg")" = "$CONF" ] && rm -f "$arg" && log "removed $arg" ;;
        esac
    done
    rm -f "$DIR/started"
}

cmd_status() {
    export SLURM_CONF=$CONF
    if [ -f "$CONF" ] && sinfo -h -o "%N %T" 2>/dev/null; then exit 0; fi
    log "not running"; exit 1
}

case ${1:-} in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 install|start|stop|status|env" >&2; exit 2 ;;
esac
