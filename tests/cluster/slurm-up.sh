#!/usr/bin/env bash
# Bring up (or confirm) a real single-machine Slurm cluster for mrlora's integration tests and demos.
#
# Why a real cluster and not a mock: the launcher's job graph (job arrays, afterok dependencies,
# kill-on-invalid-dep, requeue, multi-node tasks, sacct states) is exactly the part a fake would get wrong.
# This runs Debian's slurm-wlm as root without systemd: munged, mariadb, slurmdbd, slurmctld and four
# `slurmd -N nodeN` on 127.0.0.1, each node with 4 CPUs, 4000 MB and 2 fake GPUs (docs/local-cluster.md).
#
# All state lives under ${MRLORA_SLURM_HOME:-/var/tmp/mrlora-slurm}. Running it again is cheap and leaves
# one healthy cluster: daemons already running are kept, dead ones are restarted, and daemons whose config
# changed are restarted. Stop it with tests/cluster/slurm-down.sh.
#
# Environment:
#   MRLORA_SLURM_HOME     state directory (default /var/tmp/mrlora-slurm)
#   MRLORA_SLURM_TIMEOUT  seconds to wait for the cluster to become ready (default 90)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tests/cluster/slurm-common.sh
source "$HERE/slurm-common.sh"

TIMEOUT="${MRLORA_SLURM_TIMEOUT:-90}"
CLUSTER_NAME=mrlora
ACCOUNT=mrlora
CTLD_PORT=17817
DBD_PORT=17819
DB_PORT=17306
DB_NAME=slurm_acct_db
DB_USER=slurm
T0=$SECONDS
export PATH="$PATH:/usr/sbin:/sbin"

require_root

# ---------------------------------------------------------------------------------------------- packages
install_packages() {
    local -A need=(
        [slurmctld]=slurm-wlm [slurmd]=slurm-wlm [sbatch]=slurm-wlm [sacctmgr]=slurm-wlm
        [slurmdbd]=slurmdbd [munged]=munge [mungekey]=munge
        [mariadbd]=mariadb-server [mariadb-install-db]=mariadb-server [mariadb]=mariadb-server
    )
    local bin missing=()
    for bin in "${!need[@]}"; do
        command -v "$bin" >/dev/null 2>&1 || missing+=("${need[$bin]}")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    local pkgs
    pkgs=$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')
    say "installing missing packages: $pkgs"
    command -v apt-get >/dev/null 2>&1 ||
        die "packages missing ($pkgs) and no apt-get on this machine; install Slurm 22.05+, slurmdbd, munge and mariadb by hand"
    export DEBIAN_FRONTEND=noninteractive
    # policy-rc.d keeps the packages from starting their own system services (we run our own instances).
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && created_policy=1
    fi
    local rc=0
    {
        apt-get update -q &&
            apt-get install -y -q --no-install-recommends -o Dpkg::Options::=--force-confdef \
                -o Dpkg::Options::=--force-confold slurm-wlm slurmdbd munge mariadb-server
    } </dev/null >"$S/apt.log" 2>&1 || rc=$?
    [[ $created_policy -eq 1 ]] && rm -f "$policy"
    [[ $rc -eq 0 ]] || die "apt-get failed (exit $rc); read $S/apt.log"
    say "packages installed ($((SECONDS - T0)) s)"
}

# ---------------------------------------------------------------------------------------------- helpers
# write_if_changed PATH MODE: write stdin to PATH atomically; succeed (0) only if the content changed.
write_if_changed() {
    local path=$1 mode=$2 tmp
    tmp=$(mktemp "$path.XXXXXX")
    cat >"$tmp"
    chmod "$mode" "$tmp"
    if [[ -f $path ]] && cmp -s "$tmp" "$path"; then
        rm -f "$tmp"
        return 1
    fi
    mv -f "$tmp" "$path"
    return 0
}

fail_with_log() {
    local what=$1 log=$2
    {
        printf '[mrlora-slurm] ERROR: %s\n' "$what"
        if [[ -f $log ]]; then
            printf '[mrlora-slurm] last lines of %s:\n' "$log"
            tail -n 20 "$log" | sed 's/^/    /'
        fi
        printf '[mrlora-slurm] read %s for the full story; logs of every daemon are in %s\n' "$log" "$LOG"
    } >&2
    exit 1
}

# start_daemon LABEL COMM PIDFILE LOGFILE CMD...: run CMD unless the daemon is alive, then wait for its
# pid file. CMD must daemonize itself (or be wrapped with `background`).
start_daemon() {
    local label=$1 comm=$2 pidfile=$3 log=$4 i
    shift 4
    if pid_alive "$pidfile" "$comm"; then
        return 0
    fi
    rm -f "$pidfile"
    "$@" </dev/null >>"$LOG/$label.stdout" 2>&1 9>&- ||
        fail_with_log "$label failed to start (exit $?): $*" "$log"
    for ((i = 0; i < 200; i++)); do
        pid_alive "$pidfile" "$comm" && {
            say "started $label (pid $(tr -dc '0-9' <"$pidfile"))"
            return 0
        }
        sleep 0.1
    done
    fail_with_log "$label did not come up within 20 s" "$log"
}

# background CMD...: for daemons that stay in the foreground (mariadbd writes its own pid file).
background() {
    setsid "$@" </dev/null >/dev/null 2>&1 9>&- &
    disown
}

# wait_until SECONDS DESCRIPTION LOG CMD...: poll CMD every 0.2 s.
wait_until() {
    local limit=$1 what=$2 log=$3 deadline
    shift 3
    deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || fail_with_log "timed out after ${limit} s waiting for $what" "$log"
        sleep 0.2
    done
}

# ---------------------------------------------------------------------------------------------- setup
mkdir -p "$S"
chmod 0755 "$S"
take_lock
install_packages
mkdir -p "$ETC" "$RUN" "$LOG" "$SPOOL/slurmctld" "$S/munge" "$S/dev" "$S/mysql"
for n in "${NODES[@]}"; do mkdir -p "$SPOOL/slurmd-$n"; done
chmod 0755 "$ETC" "$RUN" "$LOG" "$SPOOL" "$S/munge" "$S/dev"

# Node names must resolve: torch.distributed uses the first node's hostname as the master address.
hosts_ok=1
for n in "${NODES[@]}"; do
    [[ $(getent ahostsv4 "$n" 2>/dev/null | awk 'NR == 1 {print $1}') == 127.0.0.1 ]] || hosts_ok=0
done
if [[ $hosts_ok -eq 0 ]]; then
    printf '127.0.0.1 %s  # mrlora local slurm cluster\n' "${NODES[*]}" >>/etc/hosts ||
        die "cannot append node names to /etc/hosts; add: 127.0.0.1 ${NODES[*]}"
    say "added '127.0.0.1 ${NODES[*]}' to /etc/hosts"
fi

# Fake GPUs: Slurm's gres/gpu plugin wants one character device per GPU. 195 is the NVIDIA major number;
# nothing opens them (task/none does not constrain devices). Fall back to /dev/null symlinks where mknod is
# not permitted (some containers).
for g in 0 1; do
    dev="$S/dev/gpu$g"
    if [[ ! -c $dev ]]; then
        rm -f "$dev"
        mknod "$dev" c 195 "$g" 2>/dev/null || ln -s /dev/null "$dev"
    fi
done

# Munge with its own key and socket, so a system munge (if any) is left alone.
MUNGE_KEY="$S/munge/munge.key"
MUNGE_SOCKET="$RUN/munge.socket"
if [[ ! -s $MUNGE_KEY ]]; then
    mungekey --create --bits=1024 --keyfile="$MUNGE_KEY" 2>/dev/null ||
        { umask 077 && head -c 128 /dev/urandom >"$MUNGE_KEY"; }
    say "created munge key $MUNGE_KEY"
fi
chown root:root "$MUNGE_KEY"
chmod 0600 "$MUNGE_KEY"

DB_PASS_FILE="$ETC/db.password"
if [[ ! -s $DB_PASS_FILE ]]; then
    (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -dc '0-9a-f' | head -c 24 >"$DB_PASS_FILE")
fi
DB_PASS=$(<"$DB_PASS_FILE")

CTLD_HOST=$(hostname -s 2>/dev/null || hostname)

# ---------------------------------------------------------------------------------------------- configs
slurm_conf_changed=0
write_if_changed "$ETC/slurm.conf" 0644 <<EOF && slurm_conf_changed=1
# Written by tests/cluster/slurm-up.sh; edits are overwritten. See docs/local-cluster.md.
ClusterName=$CLUSTER_NAME
SlurmctldHost=$CTLD_HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=10: a requeued job can start again after ~12 s instead of ~2 min.
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
StateSaveLocation=$SPOOL/slurmctld
SlurmdSpoolDir=$SPOOL/slurmd-%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
MpiDefault=none
SwitchType=switch/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=500
GresTypes=gpu
# The nodes claim more CPUs and memory than the machine has; trust slurm.conf, not the hardware.
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,bf_interval=1
# A job whose afterok parent failed is cancelled instead of pending forever.
DependencyParameters=kill_invalid_depend
ReturnToService=2
MinJobAge=30
KillWait=5
InactiveLimit=0
Waittime=0
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
# Connections to slurmdbd take the munge socket from here, not from AuthInfo.
AccountingStoragePass=$MUNGE_SOCKET
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
NodeName=node[1-4] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[17001-17004] CPUs=4 RealMemory=4000 Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=node[1-4] Default=YES MaxTime=INFINITE State=UP
PartitionName=cpu Nodes=node[1-4] Default=NO MaxTime=INFINITE State=UP
EOF

write_if_changed "$ETC/gres.conf" 0644 <<EOF && slurm_conf_changed=1
# Written by tests/cluster/slurm-up.sh: two fake GPUs per node (character devices, never opened).
AutoDetect=off
NodeName=node[1-4] Name=gpu File=$S/dev/gpu[0-1]
EOF

dbd_conf_changed=0
write_if_changed "$ETC/slurmdbd.conf" 0600 <<EOF && dbd_conf_changed=1
# Written by tests/cluster/slurm-up.sh; edits are overwritten.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=$DB_USER
StoragePass=$DB_PASS
StorageLoc=$DB_NAME
EOF

write_if_changed "$S/env.sh" 0644 <<EOF || true
# Source this to use the local mrlora Slurm cluster: . $S/env.sh
export SLURM_CONF=$ETC/slurm.conf
EOF

# A daemon whose config changed since it started must be restarted to see it.
if [[ $slurm_conf_changed -eq 1 ]] && pid_alive "$RUN/slurmctld.pid" slurmctld; then
    say "slurm.conf changed: restarting slurmctld and slurmd"
    for n in "${NODES[@]}"; do stop_daemon "slurmd-$n" slurmd "$RUN/slurmd-$n.pid"; done
    stop_daemon slurmctld slurmctld "$RUN/slurmctld.pid"
fi
if [[ $dbd_conf_changed -eq 1 ]]; then
    stop_daemon slurmdbd slurmdbd "$RUN/slurmdbd.pid"
fi

# ---------------------------------------------------------------------------------------------- daemons
start_daemon munged munged "$RUN/munged.pid" "$LOG/munged.log" \
    munged --socket="$MUNGE_SOCKET" --key-file="$MUNGE_KEY" --pid-file="$RUN/munged.pid" \
    --log-file="$LOG/munged.log" --seed-file="$S/munge/munged.seed" --num-threads=10

DB_DATA="$S/mysql/data"
DB_SOCKET="$RUN/mariadb.sock"
if [[ ! -d $DB_DATA/mysql ]]; then
    rm -rf "$DB_DATA"
    mariadb-install-db --no-defaults --datadir="$DB_DATA" --user=root --auth-root-authentication-method=socket \
        --skip-test-db >"$LOG/mariadb-install.log" 2>&1 9>&- ||
        fail_with_log "mariadb-install-db failed" "$LOG/mariadb-install.log"
    say "initialised mariadb datadir $DB_DATA"
fi
# Small buffers: the accounting database of a test cluster is tiny, and the machine is shared.
start_daemon mariadb mariadbd "$RUN/mariadb.pid" "$LOG/mariadb.log" \
    background mariadbd --no-defaults --datadir="$DB_DATA" --socket="$DB_SOCKET" --port=$DB_PORT \
    --bind-address=127.0.0.1 --pid-file="$RUN/mariadb.pid" --log-error="$LOG/mariadb.log" --user=root \
    --skip-name-resolve --skip-log-bin --performance-schema=OFF --innodb-buffer-pool-size=64M \
    --innodb-log-file-size=16M --innodb-lock-wait-timeout=900 --max-connections=100
wait_until 30 "mariadb to accept connections" "$LOG/mariadb.log" \
    mariadb-admin --no-defaults --socket="$DB_SOCKET" -u root ping
mariadb --no-defaults --socket="$DB_SOCKET" -u root 9>&- <<EOF || fail_with_log "creating $DB_NAME failed" "$LOG/mariadb.log"
CREATE DATABASE IF NOT EXISTS $DB_NAME;
CREATE USER IF NOT EXISTS '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
ALTER USER '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
ALTER USER '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'127.0.0.1';
GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'localhost';
EOF

start_daemon slurmdbd slurmdbd "$RUN/slurmdbd.pid" "$LOG/slurmdbd.log" slurmdbd
wait_until 30 "slurmdbd to answer sacctmgr" "$LOG/slurmdbd.log" sacctmgr -n -P show cluster

# Register the cluster, a default account and the calling user(s) before slurmctld registers.
sacctmgr -n -P show cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER_NAME" ||
    sacctmgr -i add cluster "$CLUSTER_NAME" >/dev/null || die "sacctmgr add cluster failed; read $LOG/slurmdbd.log"
sacctmgr -n -P show account format=account 2>/dev/null | grep -qx "$ACCOUNT" ||
    sacctmgr -i add account "$ACCOUNT" cluster="$CLUSTER_NAME" description="mrlora local cluster" \
        organization=mrlora >/dev/null || die "sacctmgr add account failed; read $LOG/slurmdbd.log"
for user in root ${SUDO_USER:-}; do
    sacctmgr -n -P show user "$user" format=user 2>/dev/null | grep -qx "$user" ||
        sacctmgr -i add user "$user" account="$ACCOUNT" defaultaccount="$ACCOUNT" cluster="$CLUSTER_NAME" \
            >/dev/null || die "sacctmgr add user $user failed; read $LOG/slurmdbd.log"
done

start_daemon slurmctld slurmctld "$RUN/slurmctld.pid" "$LOG/slurmctld.log" slurmctld
wait_until 30 "slurmctld to answer" "$LOG/slurmctld.log" scontrol ping
for n in "${NODES[@]}"; do
    start_daemon "slurmd-$n" slurmd "$RUN/slurmd-$n.pid" "$LOG/slurmd-$n.log" slurmd -N "$n"
done

# ---------------------------------------------------------------------------------------------- ready?
# Ready = every node responding and schedulable (idle, or busy with someone's jobs), and sacct answers.
deadline=$((SECONDS + TIMEOUT))
declare -A resumed=()
while :; do
    not_ready=()
    while IFS='|' read -r node state; do
        [[ -z $node ]] && continue
        case $state in
        idle | mixed | allocated | completing | planned | reserved) ;;
        *)
            not_ready+=("$node=$state")
            # A responding node left drained/down by an earlier run: ReturnToService only revives DOWN.
            if [[ $state != *'*' && $state =~ drain|down|fail && -z ${resumed[$node]:-} ]]; then
                scontrol update nodename="$node" state=resume 2>/dev/null || true
                resumed[$node]=1
            fi
            ;;
        esac
    done < <(sinfo -h -N -p debug -o '%N|%T' 2>/dev/null || true)
    seen=$(sinfo -h -N -p debug -o '%N' 2>/dev/null | sort -u | wc -l || true)
    if [[ ${#not_ready[@]} -eq 0 && $seen -eq ${#NODES[@]} ]] && sacct -n -X -a -S now-1minutes -o JobID >/dev/null 2>&1; then
        break
    fi
    if ((SECONDS >= deadline)); then
        fail_with_log "cluster not ready after ${TIMEOUT} s (nodes seen: $seen; not ready: ${not_ready[*]:-none}); read $LOG/slurmd-<node>.log for a node that stays down" \
            "$LOG/slurmctld.log"
    fi
    sleep 0.2
done

say "cluster '$CLUSTER_NAME' ready: ${#NODES[@]} nodes x (4 CPUs, 4000 MB, 2 fake GPUs), partitions debug (default) and cpu; took $((SECONDS - T0)) s"
say "to use it in your shell (or: source $S/env.sh):"
echo "export SLURM_CONF=$ETC/slurm.conf"
