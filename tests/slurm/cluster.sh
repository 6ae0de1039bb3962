#!/usr/bin/env bash
# A single-node Slurm on this machine for tests/slurm/test_slurm.sh: munged and a generated
# slurm.conf on localhost (ports picked free), slurmctld and slurmd in the foreground of their
# own processes, stopped by pid. Sourced; defines cluster_up DIR and cluster_down.
# Needs Debian's slurm-wlm and munge (scripts/setup.sh installs them) and root (slurmd starts
# jobs as their user).

free_port() { /usr/bin/python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

cluster_up() {  # cluster_up DIR: everything the cluster writes goes under DIR
  local d="$1" host
  host="$(hostname -s)"
  mkdir -p "$d/state" "$d/spool" "$d/munge"
  chmod 700 "$d/munge"
  dd if=/dev/urandom of="$d/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$d/munge/munge.key"
  munged --force --key-file="$d/munge/munge.key" --socket="$d/munge/munge.sock" --pid-file="$d/munge/munged.pid" \
    --log-file="$d/munge/munged.log" --seed-file="$d/munge/munge.seed"
  for _ in $(seq 50); do [ -S "$d/munge/munge.sock" ] && break; sleep 0.1; done
  local cpus mem
  cpus="$(nproc)"
  mem="$(awk '/MemTotal/ {print int($2 / 1024 / 2)}' /proc/meminfo)"
  cat > "$d/slurm.conf" <<CONF
ClusterName=bnlabtest
SlurmctldHost=$host
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
AuthType=auth/munge
AuthInfo=socket=$d/munge/munge.sock
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$d/state
SlurmdSpoolDir=$d/spool
SlurmctldPidFile=$d/slurmctld.pid
SlurmdPidFile=$d/slurmd.pid
SlurmctldLogFile=$d/slurmctld.log
SlurmdLogFile=$d/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
  export SLURM_CONF="$d/slurm.conf"
  slurmctld -D -i -f "$SLURM_CONF" > "$d/slurmctld.out" 2>&1 &
  CLUSTER_PIDS="$!"
  slurmd -D -f "$SLURM_CONF" > "$d/slurmd.out" 2>&1 &
  CLUSTER_PIDS="$CLUSTER_PIDS $!"
  CLUSTER_DIR="$d"
  for _ in $(seq 300); do
    if sinfo -h -o '%T' 2>/dev/null | grep -qx idle; then return 0; fi
    sleep 0.2
  done
  echo "cluster_up: the node did not come up; logs:" >&2
  tail -n 20 "$d/slurmctld.log" "$d/slurmd.log" >&2 || true
  return 1
}

cluster_down() {  # stops every daemon cluster_up started, by pid
  local p
  for p in $CLUSTER_PIDS; do kill "$p" 2>/dev/null || true; done
  for p in $CLUSTER_PIDS; do wait "$p" 2>/dev/null || true; done
  [ -f "$CLUSTER_DIR/munge/munged.pid" ] && kill "$(cat "$CLUSTER_DIR/munge/munged.pid")" 2>/dev/null || true
  CLUSTER_PIDS=""
}
