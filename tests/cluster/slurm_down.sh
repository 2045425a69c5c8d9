#!/usr/bin/env bash
# Stop the test cluster started by tests/cluster/slurm_up.sh (slurmd n1, n2, slurmctld, munged);
# its config, state and logs stay. Run as root.
set -uo pipefail
[ "$(id -u)" = 0 ] || { echo "slurm_down.sh: run as root (sudo bash $0)" >&2; exit 1; }
stop() {  # the daemon whose pid file is $1
  [ -s "$1" ] || return 0
  local pid
  pid=$(cat "$1")
  kill -0 "$pid" 2> /dev/null || return 0
  kill "$pid"
  for _ in $(seq 50); do kill -0 "$pid" 2> /dev/null || return 0; sleep 0.2; done
  kill -9 "$pid" 2> /dev/null || true
}
stop /run/slurmd-n1.pid
stop /run/slurmd-n2.pid
stop /run/slurmctld.pid
stop /run/munge/munged.pid
echo "slurm_down.sh: SLURM stopped"
