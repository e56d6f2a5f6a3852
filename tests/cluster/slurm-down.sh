#!/usr/bin/env bash
# Stop the local mrlora Slurm cluster started by tests/cluster/slurm-up.sh.
#
# Only the daemons named by the pid files under ${MRLORA_SLURM_HOME:-/var/tmp/mrlora-slurm}/run are
# stopped, in reverse start order (slurmd, slurmctld, slurmdbd, mariadb, munged), and each is waited for.
# State (job records, accounting database, munge key) is kept, so slurm-up.sh brings the same cluster back.
# To start from scratch, run this and then delete the state directory.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tests/cluster/slurm-common.sh
source "$HERE/slurm-common.sh"
T0=$SECONDS

require_root
if [[ ! -d $S ]]; then
    say "nothing to stop: $S does not exist"
    exit 0
fi
take_lock

if pid_alive "$RUN/slurmctld.pid" slurmctld; then
    running=$(squeue -h -t running,completing -o %i 2>/dev/null | wc -l || true)
    if [[ ${running:-0} -gt 0 ]]; then
        say "warning: $running job(s) still running; they end as NODE_FAIL when the cluster comes back"
    fi
fi

mapfile -t table < <(daemon_table | tac)
for row in "${table[@]}"; do
    read -r label comm pidfile <<<"$row"
    stop_daemon "$label" "$comm" "$pidfile"
done
say "cluster stopped in $((SECONDS - T0)) s (state kept in $S)"
