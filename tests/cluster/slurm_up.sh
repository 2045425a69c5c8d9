#!/usr/bin/env bash
# A real SLURM cluster on this one machine, for the tests marked `slurm` (run as root; idempotent):
#
#   sudo bash tests/cluster/slurm_up.sh     # then: make test PYTEST_ARGS='-m slurm'
#   sudo bash tests/cluster/slurm_down.sh   # stops the daemons
#
# Debian's SLURM 22.05 (slurmctld, slurmd, slurm-client) with munge authentication; two virtual
# nodes n1 and n2 (one slurmd each, ports 17001-17002, both on 127.0.0.1) with this machine's CPUs
# and no GPU, in one default partition `debug`. Finished jobs stay visible to `scontrol show job`
# for an hour (no accounting, no sacct); a requeued job starts again after 30 s (SLURM's default:
# 120 s). Daemon logs: /var/log/slurm/.
# Re-running it reuses what is installed and running; a changed slurm.conf restarts the daemons.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "slurm_up.sh: run as root (sudo bash $0)" >&2; exit 1; }

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
HOST=$(hostname)
CPUS=$(nproc)
# RealMemory: 90% of this machine's memory in MiB (memory is not a consumable: CR_Core)
MEM=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
TIMEOUT=${SLURM_UP_TIMEOUT:-60}

missing=()
for pkg_cmd in slurmctld:slurmctld slurmd:slurmd slurm-client:sbatch munge:munged; do
  command -v "${pkg_cmd#*:}" > /dev/null || missing+=("${pkg_cmd%%:*}")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "slurm_up.sh: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge
fi

# munge: a key owned by munge, munged running as munge
if [ ! -s /etc/munge/munge.key ]; then
  mungekey -c -f -k /etc/munge/munge.key 2> /dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
chmod 755 /run/munge
if ! munge -n 2> /dev/null | unmunge > /dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged --force
  for _ in $(seq 20); do munge -n 2> /dev/null | unmunge > /dev/null 2>&1 && break; sleep 0.5; done
  munge -n | unmunge > /dev/null || { echo "slurm_up.sh: munged does not answer (see /var/log/munge/munged.log)" >&2; exit 1; }
fi

mkdir -p "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd-n1 /var/spool/slurmd-n2 /var/log/slurm
new_conf=$(cat << EOF
# written by lep-megatron tests/cluster/slurm_up.sh: two virtual nodes on this machine
ClusterName=lep-test
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
# credential lifetime; also how long a requeued job waits before it starts again (default 120 s)
AuthInfo=cred_expire=30
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
StateSaveLocation=/var/spool/slurmctld
SlurmctldPidFile=/run/slurmctld.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdPidFile=/run/slurmd-%n.pid
SlurmdSpoolDir=/var/spool/slurmd-%n
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
ReturnToService=2
# finished jobs stay in scontrol show job (JobState, Restarts) for an hour
MinJobAge=3600
KillWait=5
JobRequeue=1
InactiveLimit=0
SlurmdTimeout=60
NodeName=n[1-2] NodeHostname=$HOST NodeAddr=127.0.0.1 Port=17001-17002 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
EOF
)

running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2> /dev/null; }
restart=0
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$new_conf" ]; then
  printf '%s\n' "$new_conf" > "$CONF"
  restart=1
fi
grep -qE '^127\.0\.0\.1([[:space:]].*)?[[:space:]]n1([[:space:]]|$)' /etc/hosts || echo "127.0.0.1 n1 n2" >> /etc/hosts

stop() {  # the daemon whose pid file is $1
  if running "$1"; then
    local pid
    pid=$(cat "$1")
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2> /dev/null || break; sleep 0.2; done
  fi
}
if [ "$restart" = 1 ]; then
  stop /run/slurmd-n1.pid
  stop /run/slurmd-n2.pid
  stop /run/slurmctld.pid
fi
running /run/slurmctld.pid || slurmctld
for node in n1 n2; do
  running "/run/slurmd-$node.pid" || slurmd -N "$node"
done

# both nodes idle (a node left down by an earlier run is resumed)
deadline=$((SECONDS + TIMEOUT))
while :; do
  states=$(sinfo -h -N -o '%N %t' 2> /dev/null | sort -u || true)
  if [ "$(echo "$states" | grep -cE '^n[12] idle$')" = 2 ]; then break; fi
  if echo "$states" | grep -qE ' (down|drain|drng|fail)'; then
    scontrol update nodename=n1,n2 state=resume 2> /dev/null || true
  fi
  if [ $SECONDS -ge $deadline ]; then
    echo "slurm_up.sh: nodes not idle after ${TIMEOUT}s; sinfo says:" >&2
    sinfo -N -l >&2 || true
    echo "see /var/log/slurm/slurmctld.log and /var/log/slurm/slurmd-n1.log" >&2
    exit 1
  fi
  sleep 1
done
echo "slurm_up.sh: SLURM $(sinfo -V | awk '{print $2}') up: nodes n1 n2 idle, $CPUS CPUs each, partition debug"
