#!/usr/bin/env bash
# A real two-node SLURM cluster on localhost, for the tests in tests/test_slurm.py.
#
#   bash .ci/slurm.sh start    install slurm + munge if missing, start munged, slurmctld and two
#                              slurmd (nodes n1, n2), wait until both nodes are up (idle)
#   bash .ci/slurm.sh stop     cancel all jobs, stop the daemons by their pid files
#   bash .ci/slurm.sh status   print the daemons and `sinfo`; exit 0 only if the cluster answers
#
# Runs as root on Debian 12 without systemd or cgroups: proctrack/linuxproc, task/none.
# `start` is idempotent (a running, healthy cluster is left alone) and recovers from a crash (stale
# pid files and sockets are cleared, the controller starts with empty state and fresh job ids).
# No accounting (slurmdbd): the tests poll with deadlines instead of relying on `sacct`.
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
LOG_DIR=/var/log/slurm
CTLD_PIDFILE=/run/slurmctld.pid
MUNGE_PIDFILE=/run/munge/munged.pid
NODES=(n1 n2)
CTLD_PORT=6817
declare -A SLURMD_PORT=([n1]=6818 [n2]=6819)

log() { echo "slurm.sh: $*" >&2; }

# pid from a pid file, printed only if that process is alive and runs the expected program.
live_pid() {
    local pidfile=$1 program=$2 pid
    [[ -r $pidfile ]] || return 1
    pid=$(tr -dc '0-9' <"$pidfile")
    [[ -n $pid && -r /proc/$pid/comm ]] || return 1
    [[ $(cat "/proc/$pid/comm") == "$program"* ]] || return 1
    echo "$pid"
}

# Stop one daemon by its pid file: SIGTERM, then SIGKILL after 10 s.
stop_pid() {
    local pidfile=$1 program=$2 pid
    if pid=$(live_pid "$pidfile" "$program"); then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 100); do
            [[ -d /proc/$pid ]] || break
            sleep 0.1
        done
        if [[ -d /proc/$pid ]]; then
            log "$program ($pid) ignored SIGTERM, killing"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$pidfile"
}

install_packages() {
    local missing=()
    for pkg in slurm-wlm slurmctld slurmd slurm-client munge; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        log "installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

start_munge() {
    if live_pid "$MUNGE_PIDFILE" munged >/dev/null && munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        return
    fi
    stop_pid "$MUNGE_PIDFILE" munged
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    # munged refuses to run as root; --force removes a socket left by a crashed munged.
    runuser -u munge -- /usr/sbin/munged --force
    for _ in $(seq 50); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.1
    done
    log "munged did not start"; exit 1
}

write_config() {
    local host cpus mem_mb node_mem_mb first_job_id
    host=$(hostname -s)
    cpus=$(nproc)
    mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
    # Both nodes live on this machine: each gets 40% of its memory, leaving room for the daemons.
    node_mem_mb=$((mem_mb * 2 / 5))
    # slurmctld -c forgets old jobs and would hand out their ids again; a clock-based first id keeps
    # ids unique across restarts (10 per second, below MaxJobId 67043328, wraps every 69 days).
    first_job_id=$(( ($(date +%s) % 6000000) * 10 + 1000 ))
    mkdir -p "$CONF_DIR"
    cat >"$CONF" <<EOF
# Written by .ci/slurm.sh: a two-node test cluster on one host. Do not edit; it is rewritten on start.
ClusterName=llama3gen-ci
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# Step credentials expire after 10 s instead of 120 s: a requeued job restarts that much sooner.
AuthInfo=cred_expire=10
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=$CTLD_PIDFILE
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
# No systemd, no cgroups: track job processes through /proc and bind no tasks to cores.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=2
# Trust the node lines below rather than the hardware slurmd detects (two nodes share one host).
SlurmdParameters=config_overrides
ReturnToService=2
FirstJobId=$first_job_id
JobRequeue=1
KillWait=5
MinJobAge=600
MailProg=/bin/true
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=${SLURMD_PORT[n1]} CPUs=$cpus RealMemory=$node_mem_mb State=UNKNOWN
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=${SLURMD_PORT[n2]} CPUs=$cpus RealMemory=$node_mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP DefMemPerCPU=$((node_mem_mb / cpus))
EOF
}

# Job steps reach nodes by name (torchrun rendezvous on n1): resolve both to this host.
add_hosts_entry() {
    # Append in place: /etc/hosts is often a bind mount that `sed -i` cannot replace.
    grep -Eq '^127\.0\.0\.1[[:space:]].*\bn1\b.*\bn2\b' /etc/hosts || echo "127.0.0.1 n1 n2" >>/etc/hosts
}

cluster_healthy() {
    live_pid "$CTLD_PIDFILE" slurmctld >/dev/null || return 1
    for node in "${NODES[@]}"; do
        live_pid "/run/slurmd-$node.pid" slurmd >/dev/null || return 1
    done
    timeout 10 sinfo -h >/dev/null 2>&1
}

# Both nodes up: idle after a fresh start; mix/alloc when an already running cluster has jobs.
wait_until_up() {
    local states
    for _ in $(seq 120); do
        states=$(timeout 5 sinfo -h -N -o '%N=%t' 2>/dev/null | sort -u | tr '\n' ' ' || true)
        if [[ $states =~ ^n1=(idle|mix|alloc)\ n2=(idle|mix|alloc)\ $ ]]; then
            log "cluster up: $states"
            return
        fi
        sleep 0.5
    done
    log "nodes not up after 60 s: ${states:-no answer from slurmctld}"
    log "see $LOG_DIR/slurmctld.log and $LOG_DIR/slurmd-n*.log"
    exit 1
}

stop_daemons() {
    for node in "${NODES[@]}"; do
        stop_pid "/run/slurmd-$node.pid" slurmd
    done
    stop_pid "$CTLD_PIDFILE" slurmctld
}

cmd_start() {
    install_packages
    start_munge
    if cluster_healthy; then
        log "already running"
        wait_until_up
        return
    fi
    stop_daemons  # whatever is left of a previous, crashed cluster
    write_config
    add_hosts_entry
    mkdir -p "$LOG_DIR" /var/spool/slurmctld
    for node in "${NODES[@]}"; do
        mkdir -p "/var/spool/slurmd/$node"
    done
    # -c: start with empty state (no jobs from an earlier run).
    /usr/sbin/slurmctld -c
    for node in "${NODES[@]}"; do
        /usr/sbin/slurmd -N "$node"
    done
    wait_until_up
}

cmd_stop() {
    if live_pid "$CTLD_PIDFILE" slurmctld >/dev/null; then
        # Cancel the jobs first, so that no job step outlives its slurmd.
        local jobs
        mapfile -t jobs < <(timeout 5 squeue -h -o %i 2>/dev/null || true)
        if ((${#jobs[@]})); then
            timeout 10 scancel "${jobs[@]}" 2>/dev/null || true
        fi
        for _ in $(seq 30); do
            [[ -z $(timeout 5 squeue -h -o %i 2>/dev/null) ]] && break
            sleep 0.5
        done
    fi
    stop_daemons
    stop_pid "$MUNGE_PIDFILE" munged
    log "stopped"
}

cmd_status() {
    local ok=0 pid pidfile program
    while read -r pidfile program; do
        if pid=$(live_pid "$pidfile" "$program"); then
            echo "$program running (pid $pid, $pidfile)"
        else
            echo "$program not running ($pidfile)"
            ok=1
        fi
    done <<EOF
$MUNGE_PIDFILE munged
$CTLD_PIDFILE slurmctld
/run/slurmd-n1.pid slurmd
/run/slurmd-n2.pid slurmd
EOF
    timeout 10 sinfo -N 2>&1 || ok=1
    return $ok
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
