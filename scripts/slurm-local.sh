#!/usr/bin/env bash
# A real single-node SLURM cluster on 127.0.0.1 for tests, CI and trying the submit script locally.
#
#   scripts/slurm-local.sh start    install slurm-wlm + munge if missing (apt, needs root), write the config,
#                                   start munged, slurmctld, slurmd; wait until the node is idle
#   scripts/slurm-local.sh stop     stop the daemons this script started
#   scripts/slurm-local.sh status   sinfo + squeue
#
# Two partitions share the node: "low" (default; PreemptMode=REQUEUE, GraceTime) and "high" (higher
# PriorityTier). A job in "high" that needs the node preempts a "low" job: SLURM sends it SIGTERM, SIGKILL after
# GraceTime, and requeues it. Requeued jobs wait ~120 s (BeginTime); `scontrol update JobId=N StartTime=now`
# releases one at once.
#
# It writes /etc/slurm/slurm.conf only when that file is absent or was written by this script; a config of
# another origin is left alone and the script stops with a message.
set -euo pipefail

STATE=/var/lib/telepathy-slurm
CONF=/etc/slurm/slurm.conf
MARKER="# written by telepathy scripts/slurm-local.sh"
GRACE_TIME=${SLURM_LOCAL_GRACE_TIME:-30}

die() { echo "slurm-local: $*" >&2; exit 1; }

install_packages() {
    command -v slurmctld >/dev/null && command -v munged >/dev/null && return
    [ "$(id -u)" = 0 ] || die "slurm-wlm/munge missing and not root: install them (apt-get install slurm-wlm munge)"
    command -v apt-get >/dev/null || die "slurm-wlm/munge missing and no apt-get: install SLURM and munge by hand"
    echo "slurm-local: installing slurm-wlm and munge with apt"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_config() {
    if [ -e "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
        die "$CONF exists and was not written by this script; not touching it (move it away to use this script)"
    fi
    local host cpus
    host=$(hostname -s)
    cpus=$(nproc)
    mkdir -p /etc/slurm "$STATE/state" "$STATE/spool" "$STATE/log" /run/slurm-local
    cat >"$CONF.tmp" <<EOF
$MARKER
ClusterName=telepathy-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=/run/slurm-local/slurmctld.pid
SlurmdPidFile=/run/slurm-local/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
JobRequeue=1
ReturnToService=2
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
KillWait=10
MinJobAge=600
SlurmdTimeout=60
InactiveLimit=0
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=low Nodes=$host Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=$GRACE_TIME
PartitionName=high Nodes=$host MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
    mv "$CONF.tmp" "$CONF"
}

start_munge() {
    pgrep -x munged >/dev/null && return
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 0755 /run/munge
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    if command -v runuser >/dev/null; then
        runuser -u munge -- /usr/sbin/munged
    else
        su -s /bin/sh munge -c /usr/sbin/munged
    fi
}

wait_idle() {
    for _ in $(seq 1 60); do
        if sinfo -h -N -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
            return
        fi
        scontrol update NodeName="$(hostname -s)" State=RESUME >/dev/null 2>&1 || true
        sleep 1
    done
    tail -n 20 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 || true
    die "the node did not become idle within 60 s (logs above)"
}

case "${1:-}" in
start)
    install_packages
    write_config
    start_munge
    pgrep -x slurmctld >/dev/null || slurmctld
    pgrep -x slurmd >/dev/null || slurmd
    wait_idle
    echo "slurm-local: up ($(sinfo -h -o '%P %a %D %T' | tr '\n' ';'))"
    ;;
stop)
    scontrol shutdown >/dev/null 2>&1 || true
    pkill -x slurmd 2>/dev/null || true
    pkill -x slurmctld 2>/dev/null || true
    echo "slurm-local: stopped"
    ;;
status)
    sinfo
    squeue
    ;;
*)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
