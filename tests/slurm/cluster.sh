# shellcheck shell=bash
# A real single-node SLURM from Debian's packages, for testing the cluster path.
# Sourced by tests/slurm/run.sh: a single-node SLURM from Debian's packages (docs/cluster.md).
#
#   source tests/slurm/cluster.sh
#   trap slurm_down EXIT      # always: stops only the daemons slurm_up started, by PID
#   slurm_up /tmp/some/dir    # config, state, logs and PID files go there
#
# State, logs and PID files live in the given directory. The config must be the default
# /etc/slurm/slurm.conf: the plugin's job step drops SLURM_CONF (and every other SLURM_*
# variable) before its inner srun, which then finds no config. An existing slurm.conf is
# moved aside and put back by slurm_down. Needs root (daemons run as root, slurm and munge).

SLURM_PACKAGES=(slurmctld slurmd slurm-client munge)
SLURM_STARTED_PIDS=()  # "name:pidfile" of the daemons this shell started
SLURM_CONF_FILE=/etc/slurm/slurm.conf
SLURM_CONF_BACKUP=""  # where slurm_up moved a slurm.conf it found
SLURM_CONF_WRITTEN=0  # 1 once slurm_up wrote SLURM_CONF_FILE
SLURM_CPU_OVERCOMMIT=${SLURM_CPU_OVERCOMMIT:-4}  # CPUs the node declares per real core
# a name of this bring-up alone: its jobs carry it as SLURM_CLUSTER_NAME, which tells their
# processes apart from any others on the machine
SLURM_TEST_CLUSTER=citest$$

slurm_log() { echo "[slurm $(date +%T)] $*" >&2 || true; }

# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND every half second until it succeeds
wait_for() {
  local seconds=$1 what=$2
  shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      slurm_log "gave up after ${seconds}s waiting for: $what"
      return 1
    fi
    sleep 0.5
  done
}

slurm_install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null; then
    return 0
  fi
  slurm_log "installing ${SLURM_PACKAGES[*]} from Debian"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${SLURM_PACKAGES[@]}" >/dev/null
}

# slurm_write_conf DIR FILE: a one-node cluster with this machine's CPUs and memory
slurm_write_conf() {
  local dir=$1 file=$2 host cpus memory_mb
  host=$(hostname -s)
  # more job slots than cores: the smoke jobs mostly wait (start-up, status polling), so
  # running the DAG's independent jobs side by side shortens the test a lot
  cpus=$((SLURM_CPU_OVERCOMMIT * $(nproc)))
  memory_mb=$(($(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo) - 1024))
  mkdir -p "$(dirname "$file")"
  cat >"$file" <<EOF
ClusterName=$SLURM_TEST_CLUSTER
SlurmctldHost=$host
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobAcctGatherType=jobacct_gather/none
# no slurmdbd: sacct cannot answer, so the profiles use squeue for job status
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
# squeue forgets finished jobs after MinJobAge; the plugin needs >= 3x its first status delay
MinJobAge=300
KillWait=10
Waittime=0
# accept the declared CPUs although the machine has fewer
SlurmdParameters=config_overrides
NodeName=$host CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

slurm_munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
slurm_ctld_up() { scontrol ping | grep -q UP; }
slurm_node_idle() { [[ $(sinfo -h -N -o %T) == idle* ]]; }
slurm_no_jobs() { [[ -z $(squeue -h -o %i) ]]; }

# PIDs of processes started by this cluster's jobs (their environment names the cluster)
slurm_job_pids() {
  local environ pid
  for environ in /proc/[0-9]*/environ; do
    pid=${environ#/proc/}
    pid=${pid%/environ}
    if tr '\0' '\n' 2>/dev/null <"$environ" | grep -qx "SLURM_CLUSTER_NAME=$SLURM_TEST_CLUSTER"; then
      echo "$pid"
    fi
  done
}

slurm_up() {
  local dir=$1
  if [[ $EUID -ne 0 ]]; then
    slurm_log "must run as root (it installs packages and starts the SLURM daemons)"
    return 1
  fi
  slurm_install
  if pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null; then
    slurm_log "a SLURM daemon is already running here (PIDs $(pgrep -d ' ' -x 'slurmctld|slurmd')); stop it first"
    return 1
  fi
  mkdir -p "$dir/state" "$dir/spool"
  # the slurm user must reach its state directory
  chmod 755 "$dir"
  chown slurm:slurm "$dir/state"
  if ! runuser -u slurm -- test -w "$dir/state"; then
    slurm_log "user slurm cannot write $dir/state: make its parent directories world-readable (chmod 755)"
    return 1
  fi
  if [[ -e $SLURM_CONF_FILE ]]; then
    SLURM_CONF_BACKUP=$dir/slurm.conf.found
    mv "$SLURM_CONF_FILE" "$SLURM_CONF_BACKUP"
    slurm_log "moved the existing $SLURM_CONF_FILE to $SLURM_CONF_BACKUP until the test ends"
  fi
  slurm_write_conf "$dir" "$SLURM_CONF_FILE"
  SLURM_CONF_WRITTEN=1

  if slurm_munge_works; then
    slurm_log "munged already running; using it"
  else
    mkdir -p /run/munge
    chown munge:munge /run/munge
    [[ -s /etc/munge/munge.key ]] || runuser -u munge -- mungekey --create
    runuser -u munge -- /usr/sbin/munged
    SLURM_STARTED_PIDS+=("munged:/run/munge/munged.pid")
    wait_for 20 "munged" slurm_munge_works
  fi

  # -c: start with an empty job state
  /usr/sbin/slurmctld -c
  SLURM_STARTED_PIDS+=("slurmctld:$dir/slurmctld.pid")
  wait_for 30 "slurmctld (scontrol ping)" slurm_ctld_up || {
    tail -n 20 "$dir/slurmctld.log" >&2
    return 1
  }
  /usr/sbin/slurmd
  SLURM_STARTED_PIDS+=("slurmd:$dir/slurmd.pid")
  if ! wait_for 30 "node idle" slurm_node_idle; then
    scontrol update NodeName="$(hostname -s)" State=RESUME || true
    wait_for 30 "node idle after resume" slurm_node_idle
  fi
  timeout 60 srun -N1 -t 1 hostname >/dev/null
  slurm_log "up: $(sinfo -h -N -o '%N %c CPUs %m MB %T')"
}

# stop the daemons this shell started, newest first, by the PIDs in their PID files
slurm_down() {
  local i entry name pidfile pid
  if ((${#SLURM_STARTED_PIDS[@]})); then
    # cancel the jobs left (the test cluster runs only the test's), and let SLURM end them
    # (SIGTERM, then SIGKILL after KillWait) before its daemons go
    timeout 10 squeue -h -o %i 2>/dev/null | xargs -r timeout 10 scancel >/dev/null 2>&1 || true
    wait_for 30 "the cancelled jobs to end" slurm_no_jobs || true
  fi
  for ((i = ${#SLURM_STARTED_PIDS[@]} - 1; i >= 0; i--)); do
    entry=${SLURM_STARTED_PIDS[i]}
    name=${entry%%:*}
    pidfile=${entry#*:}
    pid=$(cat "$pidfile" 2>/dev/null || true)
    [[ -n $pid ]] || continue
    kill "$pid" 2>/dev/null || continue
    for _ in $(seq 40); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.25
    done
    if kill -0 "$pid" 2>/dev/null; then
      slurm_log "$name ($pid) ignored SIGTERM; killing it"
      kill -9 "$pid" 2>/dev/null || true
    fi
    slurm_log "stopped $name ($pid)"
  done
  SLURM_STARTED_PIDS=()
  # whatever a job left running once its daemons were gone
  for pid in $(slurm_job_pids); do
    slurm_log "killing $pid, left over from a job: $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | cut -c1-120)"
    kill -9 "$pid" 2>/dev/null || true
  done
  if ((SLURM_CONF_WRITTEN)); then
    rm -f "$SLURM_CONF_FILE"
    [[ -z $SLURM_CONF_BACKUP ]] || mv "$SLURM_CONF_BACKUP" "$SLURM_CONF_FILE"
    SLURM_CONF_WRITTEN=0 SLURM_CONF_BACKUP=""
  fi
}
