#!/usr/bin/env bash
# A real single-node SLURM cluster with accounting on this machine, for the integration tests and for trying
# the SLURM launcher locally.
#
#   slurm/local-cluster.sh up       install Debian's packages when missing, start munged (unless one already
#                                   answers), MariaDB, slurmdbd, slurmctld and slurmd; the last line on stdout is
#                                   `export SLURM_CONF=...` (progress goes to stderr), so
#                                       slurm_env=$(slurm/local-cluster.sh up) || exit 1; eval "$slurm_env"
#   slurm/local-cluster.sh down     stop exactly the daemons `up` started (pids recorded in the state directory)
#   slurm/local-cluster.sh status   print what runs; exit 0 when the cluster is up and healthy, 3 otherwise
#
# State (configs, spool, logs, pid files, MariaDB data): $VQBENCH_SLURM_DIR, default /tmp/vqbench-slurm.
# The daemons use fixed ports: slurmctld 6817, slurmd 6818, slurmdbd 6819, MariaDB 3306 (all on loopback
# except where Slurm itself cannot be told so). `up` on a cluster that is already running:
#   - ours (pid files in this state directory match live daemons), healthy and with an unchanged config: reused;
#   - ours but unhealthy or partial or with a changed config: stopped and started again (accounting kept);
#   - a port held by a cluster that this script started from another state directory: that cluster is
#     stopped (its own `down`), then ours starts;
#   - a port held by anything else: `up` refuses and names the process; it never kills what it did not start.
# Needs root (packages, daemons, SlurmUser=root). Debian/Ubuntu with apt. Environment knobs:
#   VQBENCH_SLURM_DIR       state directory (default /tmp/vqbench-slurm)
#   VQBENCH_SLURM_TIMEOUT   seconds to wait for each daemon to become ready (default 60)
set -euo pipefail

STATE=$(realpath -m -- "${VQBENCH_SLURM_DIR:-/tmp/vqbench-slurm}")
TIMEOUT=${VQBENCH_SLURM_TIMEOUT:-60}
CLUSTER_NAME=vqbench
NODE=localhost
PORT_CTLD=6817 PORT_SLURMD=6818 PORT_DBD=6819 PORT_DB=3306
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)   # start order; stopped in reverse
DB_NAME=vqbench_slurm_acct
DB_USER=vqbench_slurm

ETC=$STATE/etc RUN=$STATE/run LOG=$STATE/log SPOOL=$STATE/spool DBDIR=$STATE/mysql MUNGEDIR=$STATE/munge
CONF=$ETC/slurm.conf
DB_SOCK=$DBDIR/mysqld.sock
MUNGE_SOCKDIR=/run/munge
# Set in every daemon's environment: tells which state directory a process on our ports belongs to.
OWNER_VAR=VQBENCH_SLURM_OWNER

# ---------------------------------------------------------------------------------------------------- helpers
T0=${_VQBENCH_SLURM_T0:-${EPOCHREALTIME//[.,]/}}
export _VQBENCH_SLURM_T0=$T0   # a nested call (stopping another state directory's cluster) logs on the same clock
log() {
    local t=$(( (${EPOCHREALTIME//[.,]/} - T0) / 100000 ))
    printf '[local-cluster %3d.%ds] %s\n' $((t / 10)) $((t % 10)) "$*" >&2
}
die() { log "ERROR: $*"; exit 1; }
need_root() { [[ $(id -u) -eq 0 ]] || die "run as root (it installs packages and starts daemons as SlurmUser=root)"; }

port_of() {
    case $1 in
        mariadbd) echo $PORT_DB ;; slurmdbd) echo $PORT_DBD ;; slurmctld) echo $PORT_CTLD ;; slurmd) echo $PORT_SLURMD ;;
        *) echo - ;;
    esac
}

# A process is running when /proc has it and it is not a zombie.
running() {
    local st
    st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $st && $st != Z && $st != X ]]
}
comm_of() { cat "/proc/$1/comm" 2>/dev/null || true; }
owner_of() { { tr '\0' '\n' <"/proc/$1/environ"; } 2>/dev/null | sed -n "s/^$OWNER_VAR=//p" | head -1; }

# The recorded pid of daemon $1 when it is alive and really ours (name and owner match), else fails.
our_pid() {
    local name=$1 f=$RUN/$1.pid p c
    [[ -s $f ]] || return 1
    read -r p <"$f" || true
    [[ $p =~ ^[0-9]+$ ]] && running "$p" || return 1
    c=$(comm_of "$p")
    [[ $c == "$name" || ($name == mariadbd && $c == mysqld) ]] || return 1
    [[ $(owner_of "$p") == "$STATE" ]] || return 1
    echo "$p"
}

listen_pids() { ss -Hltnp "sport = :$1" 2>/dev/null | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u || true; }
port_busy() { [[ -n $(ss -Hltn "sport = :$1" 2>/dev/null) ]]; }

# Stop pid $2 (daemon name $1): SIGTERM, wait up to $3 s, then SIGKILL.
stop_pid() {
    local name=$1 p=$2 limit=${3:-20} i
    kill -TERM "$p" 2>/dev/null || true
    for ((i = 0; i < limit * 10; i++)); do running "$p" || break; sleep 0.1; done
    if running "$p"; then
        log "$name (pid $p) ignored SIGTERM for ${limit}s; sending SIGKILL"
        kill -KILL "$p" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do running "$p" || break; sleep 0.1; done
    fi
    wait "$p" 2>/dev/null || true   # reap it when this shell started it
    running "$p" && die "$name (pid $p) does not exit"
    return 0
}

# Start daemon $1 in the foreground of its own session (so $! is its pid), record the pid.
launch() {
    local name=$1; shift
    (
        cd "$STATE"
        export "$OWNER_VAR=$STATE" SLURM_CONF=$CONF
        exec setsid "$@" </dev/null >>"$LOG/$name.out" 2>&1 9>&-   # fd 9 is the state lock
    ) &
    echo $! >"$RUN/$name.pid"
}

fail_start() {   # daemon name, message, its log files
    local name=$1 msg=$2; shift 2
    log "ERROR: $name: $msg"
    local f
    for f in "$@"; do
        [[ -s $f ]] || continue
        log "---- last lines of $f"
        tail -n 25 "$f" >&2
    done
    log "stopping what this run started"
    stop_all >/dev/null 2>&1 || true
    exit 1
}

# Wait until "$@" succeeds, while daemon $1's recorded pid stays alive.
wait_ready() {
    local name=$1 what=$2; shift 2
    local p deadline=$(( ${EPOCHREALTIME//[.,]/} + TIMEOUT * 1000000 )) logs=("$LOG/$name.out")
    case $name in mariadbd) logs+=("$DBDIR/mysqld.err") ;; slurm*) logs+=("$LOG/$name.log") ;; esac
    read -r p <"$RUN/$name.pid"
    while ! "$@" >/dev/null 2>&1; do
        running "$p" || fail_start "$name" "exited during start-up" "${logs[@]}"
        (( ${EPOCHREALTIME//[.,]/} < deadline )) || fail_start "$name" "not $what after ${TIMEOUT}s" "${logs[@]}"
        sleep 0.1
    done
}

listens_as() { [[ " $(listen_pids "$2" | tr '\n' ' ') " == *" $1 "* ]]; }   # pid, port
munge_works() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }
db() { mariadb --no-defaults --protocol=socket --socket="$DB_SOCK" -uroot --batch --skip-column-names "$@"; }
slurm_env() { SLURM_CONF=$CONF "$@"; }
node_state() { slurm_env sinfo -h -n "$NODE" -o %t 2>/dev/null | head -1; }
node_usable() { [[ $(node_state) =~ ^(idle|mix|mixed|alloc|allocated|comp|completing)$ ]]; }
accounting_works() { slurm_env sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER_NAME"; }

# ---------------------------------------------------------------------------------------------------- packages
POLICY_RC=/usr/sbin/policy-rc.d
POLICY_RC_OURS=
cleanup_policy() { [[ -z $POLICY_RC_OURS ]] || rm -f "$POLICY_RC"; }

ensure_packages() {
    local missing=() p installed
    installed=" $({ dpkg-query -W -f='${Package}=${Status}\n' "${PACKAGES[@]}" 2>/dev/null || true; } \
        | sed -n 's/=install ok installed$//p' | tr '\n' ' ') "
    for p in "${PACKAGES[@]}"; do [[ $installed == *" $p "* ]] || missing+=("$p"); done
    command -v ss >/dev/null || missing+=(iproute2)
    [[ ${#missing[@]} -eq 0 ]] && return 0
    command -v apt-get >/dev/null || die "missing packages ${missing[*]} and no apt-get to install them"
    log "installing ${missing[*]} (apt-get update + install)"
    local t=${EPOCHREALTIME//[.,]/}
    # Keep the packages' maintainer scripts from starting their own daemons (a packaged MariaDB on 3306, a
    # slurmctld with /etc/slurm/slurm.conf): policy-rc.d exit 101 forbids service starts during the install.
    if [[ ! -e $POLICY_RC ]]; then
        printf '#!/bin/sh\n# temporary, written by vqbench slurm/local-cluster.sh\nexit 101\n' >"$POLICY_RC"
        chmod 755 "$POLICY_RC"
        POLICY_RC_OURS=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    local out=$LOG/apt.out
    install -d -m 0755 "$LOG"
    apt-get -o DPkg::Lock::Timeout=120 update -qq >"$out" 2>&1 || { tail -n 20 "$out" >&2; die "apt-get update failed (log: $out)"; }
    apt-get -o DPkg::Lock::Timeout=120 install -y -qq --no-install-recommends "${missing[@]}" >>"$out" 2>&1 </dev/null \
        || { tail -n 30 "$out" >&2; die "apt-get install ${missing[*]} failed (log: $out)"; }
    cleanup_policy
    POLICY_RC_OURS=
    log "installed in $(( (${EPOCHREALTIME//[.,]/} - t) / 1000000 ))s"
}

# ---------------------------------------------------------------------------------------------------- configs
write_configs() {   # into directory $1
    local out=$1 cpus mem headroom realmem defmem pass
    cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)   # nproc obeys OMP_NUM_THREADS: not the machine's
    # A data-parallel job of 2 tasks (1 CPU each) needs 2 CPUs on the node: on a 1-core machine, declare 2 and let
    # slurmd accept more CPUs than it finds (config_overrides); the 2 ranks then share the core.
    local overrides=
    (( cpus >= 2 )) || { cpus=2; overrides="SlurmdParameters=config_overrides"; }
    mem=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
    headroom=$(( mem / 10 )); (( headroom >= 512 )) || headroom=512
    realmem=$(( mem - headroom )); (( realmem >= mem / 2 )) || realmem=$(( mem / 2 ))
    defmem=$(( realmem / cpus )); (( defmem <= 1024 )) || defmem=1024
    # slurmctld binds to SlurmctldHost's address (loopback) with NoCtldInAddrAny. The other daemons can only bind
    # to any address or, with NoInAddrAny, to the address the host name resolves to: use that only when it is a
    # loopback address (else slurmd would not be reachable at NodeAddr=127.0.0.1). Munge authenticates every
    # message either way.
    local comm=NoCtldInAddrAny
    if getent ahostsv4 "$(hostname)" 2>/dev/null | awk '{print $1}' | sort -u | grep -qv '^127\.'; then :; else
        getent ahostsv4 "$(hostname)" >/dev/null 2>&1 && comm+=,NoInAddrAny
    fi
    pass=$(<"$ETC/db.pass")
    cat >"$out/slurm.conf" <<EOF
# Generated by slurm/local-cluster.sh (rewritten by every \`up\`): a single-node test cluster.
ClusterName=$CLUSTER_NAME
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$PORT_CTLD
SlurmdPort=$PORT_SLURMD
CommunicationParameters=$comm
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire (default 120 s) before it may start again; 10 s keeps requeue tests short.
AuthInfo=cred_expire=10
StateSaveLocation=$SPOOL/slurmctld
SlurmdSpoolDir=$SPOOL/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
ReturnToService=2
# Batch jobs are requeueable by default (scontrol requeue, submitit's preemption/timeout handling).
JobRequeue=1
# Short timings for tests: jobs get 5 s between SIGTERM and SIGKILL; finished jobs leave squeue after 30 s
# (sacct keeps them).
KillWait=5
MinJobAge=30
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=10
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2,batch_sched_delay=0,sched_min_interval=0
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$NODE
AccountingStoragePort=$PORT_DBD
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
DefMemPerCPU=$defmem
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$cpus RealMemory=$realmem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
# Same node under another name, for trying --partition gpu (no GRES: this machine has no GPUs).
PartitionName=gpu Nodes=$NODE Default=NO MaxTime=INFINITE State=UP
EOF
    [[ -z $overrides ]] || echo "$overrides" >>"$out/slurm.conf"
    cat >"$out/slurmdbd.conf" <<EOF
# Generated by slurm/local-cluster.sh (rewritten by every \`up\`).
AuthType=auth/munge
DbdHost=$NODE
DbdAddr=127.0.0.1
DbdPort=$PORT_DBD
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$PORT_DB
StorageUser=$DB_USER
StoragePass=$pass
StorageLoc=$DB_NAME
$( [[ $comm == *NoInAddrAny* ]] && echo "CommunicationParameters=NoInAddrAny" )
EOF
    chmod 600 "$out/slurmdbd.conf"
    # MariaDB's options, one a line (no config file: --no-defaults keeps /etc/mysql out); innodb values are those
    # slurmdbd checks (it warns below half of 1 GiB buffer pool / 900 s lock wait).
    printf '%s\n' --no-defaults --user=mysql --datadir="$DBDIR/data" --socket="$DB_SOCK" \
        --pid-file="$DBDIR/mysqld.pid" --log-error="$DBDIR/mysqld.err" --bind-address=127.0.0.1 \
        --port=$PORT_DB --skip-name-resolve --innodb-buffer-pool-size=512M --innodb-log-file-size=64M \
        --innodb-lock-wait-timeout=900 --innodb-flush-log-at-trx-commit=2 --max-connections=64 \
        >"$out/mariadbd.args"
}

prepare_dirs() {
    id munge >/dev/null 2>&1 || die "user munge missing (package munge not installed?)"
    id mysql >/dev/null 2>&1 || die "user mysql missing (package mariadb-server not installed?)"
    install -d -m 0755 "$STATE" "$ETC" "$RUN" "$LOG" "$SPOOL"
    install -d -m 0700 "$SPOOL/slurmctld" "$SPOOL/slurmd"
    install -d -m 0750 -o mysql -g mysql "$DBDIR"
    install -d -m 0700 -o munge -g munge "$MUNGEDIR"
    if [[ ! -s $ETC/db.pass ]]; then
        (umask 077; od -An -N16 -tx1 /dev/urandom | tr -d ' \n' >"$ETC/db.pass"; echo >>"$ETC/db.pass")
    fi
}

# ---------------------------------------------------------------------------------------------------- start
start_munged() {
    local p
    if p=$(our_pid munged) && munge_works; then log "munged: reusing ours (pid $p)"; return; fi
    if munge_works; then log "munged: one already answers on $MUNGE_SOCKDIR (not ours; used, never stopped)"; return; fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "munged: creating /etc/munge/munge.key"
        mungekey --create --keyfile=/etc/munge/munge.key >&2
        chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
    fi
    install -d -m 0755 -o munge -g munge "$MUNGE_SOCKDIR"
    rm -f "$MUNGE_SOCKDIR/munge.socket.2" "$MUNGE_SOCKDIR/munge.socket.2.lock"
    launch munged setpriv --reuid=munge --regid=munge --init-groups \
        munged --foreground --pid-file="$MUNGEDIR/munged.pid"
    wait_ready munged "answering" munge_works
    log "munged: started (pid $(cat "$RUN/munged.pid"))"
}

start_mariadb() {
    local bin
    bin=$(command -v mariadbd || command -v mysqld || true)
    [[ -n $bin ]] || bin=/usr/sbin/mariadbd
    if [[ ! -d $DBDIR/data/mysql ]]; then
        log "mariadb: initialising $DBDIR/data"
        rm -rf "$DBDIR/data"
        mariadb-install-db --no-defaults --user=mysql --datadir="$DBDIR/data" --skip-test-db \
            --skip-name-resolve >"$LOG/mariadb-install-db.out" 2>&1 \
            || { tail -n 25 "$LOG/mariadb-install-db.out" >&2; die "mariadb-install-db failed"; }
    fi
    local args; mapfile -t args <"$ETC/mariadbd.args"
    launch mariadbd "$bin" "${args[@]}"
    wait_ready mariadbd "answering" db -e 'SELECT 1'
    local pass; pass=$(<"$ETC/db.pass")
    db -e "CREATE DATABASE IF NOT EXISTS $DB_NAME;
CREATE USER IF NOT EXISTS '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$pass';
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$pass';
ALTER USER '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$pass';
ALTER USER '$DB_USER'@'localhost' IDENTIFIED BY '$pass';
GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'127.0.0.1';
GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'localhost';" \
        || fail_start mariadbd "could not create the accounting database and user" "$DBDIR/mysqld.err"
    log "mariadb: started (pid $(cat "$RUN/mariadbd.pid"), 127.0.0.1:$PORT_DB)"
}

start_slurm() {
    launch slurmdbd slurmdbd -D
    wait_ready slurmdbd "listening on $PORT_DBD" listens_as "$(cat "$RUN/slurmdbd.pid")" $PORT_DBD
    log "slurmdbd: started (pid $(cat "$RUN/slurmdbd.pid"))"
    if ! accounting_works; then
        slurm_env sacctmgr -i add cluster "$CLUSTER_NAME" >/dev/null \
            || fail_start slurmdbd "sacctmgr add cluster failed" "$LOG/slurmdbd.log"
        log "slurmdbd: registered cluster $CLUSTER_NAME"
    fi
    launch slurmctld slurmctld -D -f "$CONF"
    wait_ready slurmctld "answering" slurm_env scontrol ping
    log "slurmctld: started (pid $(cat "$RUN/slurmctld.pid"))"
    launch slurmd slurmd -D -N "$NODE" -f "$CONF"
    wait_ready slurmd "registered with node $NODE usable" node_usable
    log "slurmd: started (pid $(cat "$RUN/slurmd.pid")), node $NODE $(node_state)"
}

# ---------------------------------------------------------------------------------------------------- stop
cancel_jobs() {
    our_pid slurmctld >/dev/null || return 0
    local ids
    ids=$(slurm_env squeue -h -o %A 2>/dev/null | tr '\n' ' ') || return 0
    [[ -n ${ids// } ]] || return 0
    log "cancelling jobs: $ids"
    # shellcheck disable=SC2086
    slurm_env scancel $ids 2>/dev/null || true
    local i
    for ((i = 0; i < 200; i++)); do   # KillWait is 5 s; give them 20 s to leave the node
        [[ -z $(slurm_env squeue -h -t PD,CF,R,S,CG,RQ,RS,SO,ST -o %A 2>/dev/null) ]] && break
        sleep 0.1
    done
}

stop_all() {
    cancel_jobs
    local i name p
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        name=${DAEMONS[i]}
        if p=$(our_pid "$name"); then
            log "stopping $name (pid $p)"
            stop_pid "$name" "$p" "$([[ $name == mariadbd ]] && echo 60 || echo 20)"
        fi
        rm -f "$RUN/$name.pid"
    done
    rm -f "$DBDIR/mysqld.pid" "$MUNGEDIR/munged.pid" 2>/dev/null || true
}

# Make the fixed ports free: stop unrecorded daemons of this state directory (their pid files lost) and clusters
# of other state directories; refuse when anything else holds a port.
free_ports() {
    local port p owner name
    for name in slurmd slurmctld slurmdbd mariadbd mysqld munged; do
        for p in $(pgrep -x "$name" || true); do
            running "$p" && [[ $(owner_of "$p") == "$STATE" ]] || continue
            log "$name (pid $p) was started for $STATE but is not recorded; stopping it"
            stop_pid "$name" "$p" 60
        done
    done
    for port in $PORT_CTLD $PORT_SLURMD $PORT_DBD $PORT_DB; do
        for p in $(listen_pids "$port"); do
            running "$p" || continue
            owner=$(owner_of "$p")
            if [[ $owner == "$STATE" ]]; then
                log "port $port: $(comm_of "$p") (pid $p) is ours but unrecorded; stopping it"
                stop_pid "$(comm_of "$p")" "$p" 60
            elif [[ -n $owner && -d $owner ]]; then
                log "port $port: held by the vqbench cluster of $owner; stopping that cluster"
                VQBENCH_SLURM_DIR=$owner "$BASH" "$0" down
            elif [[ -n $owner ]]; then
                log "port $port: $(comm_of "$p") (pid $p) was started by this script for $owner, now deleted; stopping it"
                stop_pid "$(comm_of "$p")" "$p" 60
            else
                die "port $port is held by pid $p ($(comm_of "$p"): $({ tr '\0' ' ' <"/proc/$p/cmdline"; } 2>/dev/null | cut -c1-120)), which this script did not start; stop it, then run up again"
            fi
        done
        local i
        for ((i = 0; i < 50; i++)); do port_busy "$port" || break; sleep 0.1; done
        port_busy "$port" && die "port $port is still in use: $(ss -Hltnp "sport = :$port")"
    done
    return 0
}

# ---------------------------------------------------------------------------------------------------- commands
lock_state() {
    install -d -m 0755 "$STATE"
    exec 9>"$STATE/.lock"
    flock -w 120 9 || die "another local-cluster.sh holds $STATE/.lock"
}

cmd_up() {
    need_root
    lock_state
    trap cleanup_policy EXIT
    ensure_packages
    prepare_dirs
    local tmp changed=0 n_ours=0 name
    rm -rf "$ETC"/.new.*
    tmp=$(mktemp -d "$ETC/.new.XXXXXX")
    write_configs "$tmp"
    for name in slurm.conf slurmdbd.conf mariadbd.args; do cmp -s "$tmp/$name" "$ETC/$name" || changed=1; done
    for name in mariadbd slurmdbd slurmctld slurmd; do our_pid "$name" >/dev/null && n_ours=$((n_ours + 1)); done
    if (( n_ours == 4 && changed == 0 )) && munge_works && node_usable && accounting_works; then
        rm -rf "$tmp"
        log "cluster already running and healthy (state $STATE); reusing it"
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    if (( n_ours > 0 )) || our_pid munged >/dev/null; then
        if (( changed )); then log "configuration changed; restarting the running cluster"
        else log "running cluster is partial or unhealthy (node: $(node_state || true)); restarting it"; fi
        stop_all
    fi
    free_ports
    for name in slurm.conf slurmdbd.conf mariadbd.args; do mv -f "$tmp/$name" "$ETC/$name"; done
    rmdir "$tmp"
    start_munged
    start_mariadb
    start_slurm
    accounting_works || fail_start slurmdbd "sacctmgr does not list cluster $CLUSTER_NAME" "$LOG/slurmdbd.log"
    slurm_env sacct -n -X -S now-1minute >/dev/null 2>&1 || fail_start slurmdbd "sacct does not answer" "$LOG/slurmdbd.log"
    log "cluster ready (state $STATE, partitions debug [default] and gpu)"
    echo "export SLURM_CONF=$CONF"
}

cmd_down() {
    need_root
    [[ -d $STATE ]] || { log "nothing to stop ($STATE does not exist)"; return 0; }
    lock_state
    local any=0 name
    for name in "${DAEMONS[@]}"; do our_pid "$name" >/dev/null && any=1; done
    stop_all
    (( any )) && log "cluster stopped" || log "nothing was running"
    return 0
}

cmd_status() {
    local name p port ok=1 state
    echo "state directory: $STATE"
    for name in "${DAEMONS[@]}"; do
        port=$(port_of "$name")
        if p=$(our_pid "$name"); then
            printf '  %-10s running  pid %-8s port %s\n' "$name" "$p" "$port"
        elif [[ $name == munged ]] && munge_works; then
            printf '  %-10s running  (not started by this script)\n' "$name"
        else
            printf '  %-10s stopped\n' "$name"; ok=0
        fi
    done
    for name in "${DAEMONS[@]}" mysqld; do
        for p in $(pgrep -x "$name" || true); do
            running "$p" && [[ $(owner_of "$p") == "$STATE" && $(our_pid "${name/mysqld/mariadbd}" || true) != "$p" ]] \
                || continue
            printf '  %-10s running  pid %-8s started for this state directory but not recorded (up stops it)\n' "$name" "$p"
        done
    done
    for port in $PORT_CTLD $PORT_SLURMD $PORT_DBD $PORT_DB; do
        for p in $(listen_pids "$port"); do
            [[ $(owner_of "$p") == "$STATE" ]] && continue
            printf '  port %s held by pid %s (%s), not of this state directory\n' "$port" "$p" "$(comm_of "$p")"
        done
    done
    if (( ok )) && [[ -f $CONF ]]; then
        state=$(node_state || true)
        echo "node $NODE: ${state:-no answer}"
        SLURM_CONF=$CONF sinfo 2>&1 | sed 's/^/  /'
        node_usable && accounting_works || ok=0
        (( ok )) && echo "healthy; to use it: export SLURM_CONF=$CONF"
    fi
    (( ok )) && return 0 || return 3
}

case ${1:-} in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *) echo "usage: $0 up|down|status   (state directory: \$VQBENCH_SLURM_DIR, default /tmp/vqbench-slurm)" >&2; exit 2 ;;
esac
