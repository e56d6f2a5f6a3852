# shellcheck shell=bash
# Shared by slurm-up.sh and slurm-down.sh: where the local cluster keeps its state, and how a daemon we
# started is found and stopped again.
#
# Why pid files plus /proc state: PID 1 on the machines we run on (CI containers, firecracker VMs) does not
# reap orphans, so a daemon that exited lingers as a zombie and `kill -0` still succeeds. A daemon counts as
# running only if its pid file names a process whose state is not Z/X and whose command name is the one we
# started (a recycled pid belongs to someone else).

MRLORA_SLURM_HOME="${MRLORA_SLURM_HOME:-/var/tmp/mrlora-slurm}"
S="$MRLORA_SLURM_HOME"
ETC="$S/etc"
RUN="$S/run"
LOG="$S/log"
SPOOL="$S/spool"
NODES=(node1 node2 node3 node4)
export SLURM_CONF="$ETC/slurm.conf"

say() { printf '[mrlora-slurm] %s\n' "$*"; }
die() {
    printf '[mrlora-slurm] ERROR: %s\n' "$*" >&2
    exit 1
}

require_root() {
    if [[ $(id -u) -ne 0 ]]; then
        die "$(basename "$0") must run as root (it starts munged, mariadb and the Slurm daemons as root and" \
            "edits /etc/hosts). Run: sudo bash $0"
    fi
}

# Serialise concurrent up/down calls (several pytest sessions may start at once). fd 9 must never leak
# into a daemon, or the daemon would hold the lock forever: every daemon start closes it (9>&-).
take_lock() {
    mkdir -p "$S"
    exec 9>"$S/.lock"
    flock -w 300 9 || die "another slurm-up/slurm-down has held $S/.lock for 300 s; is it stuck?"
}

# pid_alive PIDFILE COMM: true if PIDFILE names a live (non-zombie) process called COMM.
pid_alive() {
    local pidfile=$1 comm=$2 pid state
    [[ -s $pidfile ]] || return 1
    pid=$(tr -dc '0-9' 2>/dev/null <"$pidfile")
    [[ -n $pid && -r /proc/$pid/status ]] || return 1
    state=$(awk '/^State:/ {print $2}' "/proc/$pid/status" 2>/dev/null) || return 1
    [[ -n $state && $state != Z && $state != X ]] || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]]
}

# stop_daemon LABEL COMM PIDFILE: SIGTERM, wait up to 30 s, then SIGKILL. Only touches the pid in PIDFILE.
stop_daemon() {
    local label=$1 comm=$2 pidfile=$3 pid i
    if ! pid_alive "$pidfile" "$comm"; then
        rm -f "$pidfile"
        return 0
    fi
    pid=$(tr -dc '0-9' 2>/dev/null <"$pidfile")
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 300; i++)); do
        pid_alive "$pidfile" "$comm" || break
        sleep 0.1
    done
    if pid_alive "$pidfile" "$comm"; then
        say "$label (pid $pid) ignored SIGTERM for 30 s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            pid_alive "$pidfile" "$comm" || break
            sleep 0.1
        done
    fi
    pid_alive "$pidfile" "$comm" && die "$label (pid $pid) would not stop"
    rm -f "$pidfile"
    say "stopped $label (pid $pid)"
}

# The daemons in start order: label, command name, pid file.
daemon_table() {
    echo "munged munged $RUN/munged.pid"
    echo "mariadb mariadbd $RUN/mariadb.pid"
    echo "slurmdbd slurmdbd $RUN/slurmdbd.pid"
    echo "slurmctld slurmctld $RUN/slurmctld.pid"
    local n
    for n in "${NODES[@]}"; do
        echo "slurmd-$n slurmd $RUN/slurmd-$n.pid"
    done
}
