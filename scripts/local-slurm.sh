#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, to try (and test) the harness's SLURM path without a real cluster.
#
#   eval "$(scripts/local-slurm.sh start)"   # install if missing, start, wait until the node is idle, set SLURM_CONF
#   scripts/local-slurm.sh status            # what runs, with pids; exit 1 if the cluster is not answering
#   eval "$(scripts/local-slurm.sh env)"     # SLURM_CONF for this shell (sinfo, sbatch and the harness need it)
#   scripts/local-slurm.sh stop              # cancel the cluster's jobs, end the daemons this script started
#
# Needs root (apt-get, the munge user, slurmd). Installs the Debian packages slurmctld, slurmd, munge and
# slurm-client when one is missing (apt-get update first if the package lists are empty). Everything it writes
# lives in $VQAKD_SLURM_DIR (default /tmp/vqakd-slurm): munge key and socket, slurm.conf (this host's name, CPUs
# and memory as `slurmd -C` reads them; one partition, $VQAKD_SLURM_PARTITION, default "debug"), state, logs,
# and the pids of the daemons it started; /etc/slurm is not touched. `start` on a running cluster does nothing;
# `stop` ends only the processes whose pids it recorded (after checking that each still runs that program).
# The cluster has no accounting (AccountingStorageType=accounting_storage/none): sacct does not work.
set -euo pipefail

DIR=${VQAKD_SLURM_DIR:-/tmp/vqakd-slurm}
PARTITION=${VQAKD_SLURM_PARTITION:-debug}
TIMEOUT=${VQAKD_SLURM_TIMEOUT:-60}  # seconds to wait for the node to be idle
CONF=$DIR/slurm.conf
RUN=$DIR/run
LOG=$DIR/log
MUNGE_DIR=$DIR/munge
SOCKET=$MUNGE_DIR/munge.socket
PACKAGES=(slurmctld slurmd munge slurm-client)
export SLURM_CONF=$CONF

say() { echo "local-slurm: $*" >&2; }
die() { say "error: $*"; exit 1; }

# pid of a daemon this script started, if it still runs that program (a recycled pid is not ours)
alive() {
  local name=$1 pidfile=$RUN/$1.pid pid
  [ -f "$pidfile" ] || return 1
  pid=$(cat "$pidfile")
  [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] || return 1
  [ "$(cat "/proc/$pid/comm")" = "$name" ] || return 1
  grep -q . "/proc/$pid/cmdline" 2>/dev/null || return 1  # a zombie has an empty command line
  echo "$pid"
}

answering() { sinfo -h >/dev/null 2>&1; }

install_packages() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || die "missing packages ${missing[*]} and no apt-get to install them"
  [ "$(id -u)" -eq 0 ] || die "missing packages ${missing[*]}: run as root to install them with apt-get"
  say "installing ${missing[*]} (apt-get)"
  if ! apt-cache show "${missing[0]}" >/dev/null 2>&1; then
    apt-get update -qq >&2 || die "apt-get update failed"
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 \
    || die "apt-get install ${missing[*]} failed"
}

write_config() {
  local node node_line cpus mem
  node=$(hostname -s)
  # this machine as slurmd sees it: CPUs, sockets, cores, threads, RealMemory (MiB)
  node_line=$(slurmd -C | head -1) || die "slurmd -C failed"
  [[ $node_line == NodeName=* ]] || die "unexpected output of slurmd -C: $node_line"
  cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$node_line")
  mem=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$node_line")
  [ -n "$cpus" ] && [ -n "$mem" ] || die "no CPUs or RealMemory in the output of slurmd -C: $node_line"
  mkdir -p "$DIR/state" "$DIR/spool"
  cat >"$CONF.tmp" <<EOF
# written by scripts/local-slurm.sh: a one-node cluster on $node
ClusterName=vqakd-local
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job (a run requeued at its time limit) waits cred_expire seconds to start again (default 120; 5 is
# ample for jobs of this one machine)
AuthInfo=socket=$SOCKET,cred_expire=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$RUN/slurmctld.daemon.pid
SlurmdPidFile=$RUN/slurmd.daemon.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
# look at pending jobs every second (default 60 and 30): a requeued job starts again as soon as it may
SchedulerParameters=sched_interval=1,bf_interval=1
MpiDefault=none
ReturnToService=2
KillWait=5
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
Waittime=0
NodeName=$node NodeAddr=127.0.0.1 ${node_line#NodeName=* } State=UNKNOWN
PartitionName=$PARTITION Nodes=$node Default=YES MaxTime=INFINITE DefMemPerCPU=$((mem / cpus)) State=UP
EOF
  mv "$CONF.tmp" "$CONF"
}

# start NAME CMD...: run CMD in its own session, detached from this shell's output, and record its pid
launch() {
  local name=$1 pid
  shift
  setsid "$@" </dev/null >>"$LOG/$name.out" 2>&1 &
  pid=$!
  echo "$pid" >"$RUN/$name.pid"
  sleep 0.5
  alive "$name" >/dev/null || die "$name did not start: $(tail -5 "$LOG/$name.out" 2>/dev/null)"
}

start() {
  install_packages
  [ "$(id -u)" -eq 0 ] || die "run as root: munged runs as the munge user and slurmd as root"
  mkdir -p "$DIR" "$RUN" "$LOG"
  if alive munged >/dev/null && alive slurmctld >/dev/null && alive slurmd >/dev/null && answering; then
    say "already running (SLURM_CONF=$CONF)"
    echo "export SLURM_CONF=$CONF"
    return 0
  fi
  if ! alive slurmctld >/dev/null && ! alive slurmd >/dev/null; then
    write_config
  fi
  if ! alive munged >/dev/null; then
    install -d -o munge -g munge -m 0755 "$MUNGE_DIR"
    if [ ! -s "$MUNGE_DIR/munge.key" ]; then
      dd if=/dev/urandom of="$MUNGE_DIR/munge.key.tmp" bs=1024 count=1 status=none
      mv "$MUNGE_DIR/munge.key.tmp" "$MUNGE_DIR/munge.key"
    fi
    chown munge:munge "$MUNGE_DIR/munge.key"
    chmod 0400 "$MUNGE_DIR/munge.key"
    launch munged setpriv --reuid=munge --regid=munge --init-groups \
      munged --foreground --force --socket="$SOCKET" --key-file="$MUNGE_DIR/munge.key" \
      --pid-file="$MUNGE_DIR/munged.pid" --log-file="$MUNGE_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed"
    local i
    for i in $(seq 50); do
      munge -n -S "$SOCKET" 2>/dev/null | unmunge -S "$SOCKET" >/dev/null 2>&1 && break
      sleep 0.2
    done
    munge -n -S "$SOCKET" | unmunge -S "$SOCKET" >/dev/null || die "munged does not answer on $SOCKET (log: $MUNGE_DIR/munged.log)"
  fi
  # -c: no jobs from an earlier session; -D: in the foreground, so the pid recorded is the daemon's
  alive slurmctld >/dev/null || launch slurmctld slurmctld -D -c -f "$CONF"
  alive slurmd >/dev/null || launch slurmd slurmd -D -f "$CONF"
  local node deadline state=""
  node=$(hostname -s)
  deadline=$((SECONDS + TIMEOUT))
  while [ $SECONDS -lt $deadline ]; do
    state=$(sinfo -h -N -n "$node" -o %T 2>/dev/null || true)
    [ "$state" = idle ] && break
    alive slurmctld >/dev/null || die "slurmctld exited: $(tail -5 "$LOG/slurmctld.log" "$LOG/slurmctld.out" 2>/dev/null)"
    alive slurmd >/dev/null || die "slurmd exited: $(tail -5 "$LOG/slurmd.log" "$LOG/slurmd.out" 2>/dev/null)"
    sleep 0.5
  done
  if [ "$state" != idle ]; then
    die "node $node is not idle after ${TIMEOUT}s (sinfo says: ${state:-nothing}); logs in $LOG:
$(tail -5 "$LOG/slurmctld.log" "$LOG/slurmd.log" 2>/dev/null)"
  fi
  say "node $node idle in partition $PARTITION ($(sinfo -h -o '%c CPUs, %m MiB' -n "$node")); state and logs in $DIR"
  echo "export SLURM_CONF=$CONF"
}

# end a recorded daemon: TERM, then KILL after 10 s
end() {
  local name=$1 pid i
  if pid=$(alive "$name"); then
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 100); do
      alive "$name" >/dev/null || break
      sleep 0.1
    done
    if alive "$name" >/dev/null; then
      say "$name ($pid) did not end on SIGTERM: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    say "stopped $name ($pid)"
  fi
  rm -f "$RUN/$name.pid"
}

stop() {
  if alive slurmctld >/dev/null && answering; then
    local jobs i
    jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
    if [ -n "${jobs// /}" ]; then
      say "cancelling jobs $jobs"
      # shellcheck disable=SC2086
      scancel $jobs || true
      for i in $(seq 60); do  # until their processes are gone (KillWait=5)
        [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break
        sleep 0.5
      done
    fi
  fi
  end slurmd
  end slurmctld
  end munged
}

status() {
  local name pid rc=0
  for name in munged slurmctld slurmd; do
    if pid=$(alive "$name"); then echo "$name: running (pid $pid)"; else echo "$name: not running"; rc=1; fi
  done
  if answering; then
    sinfo
    squeue
  else
    echo "sinfo does not answer (SLURM_CONF=$CONF)"
    rc=1
  fi
  return $rc
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
