#!/usr/bin/env bash
# A real single-node SLURM cluster (with accounting) on this machine, for tests of the SLURM launch path.
#
#   bash launch/slurm_local.sh up       install (if missing) and start munge, MariaDB, slurmdbd, slurmctld, slurmd
#   bash launch/slurm_local.sh down     cancel every job, then stop the daemons in reverse order
#   bash launch/slurm_local.sh status   daemon states and `sinfo`
#
# The recipe (measured in launch/README.md): Debian 12 packages (Slurm 22.05, MariaDB 10.11,
# munge), daemons started by hand as root (no systemd), one node called `localhost` in partition `debug`,
# accounting through slurmdbd (without `sacct` submitit cannot see that a job was killed and waits forever).
# Every wait is bounded; a daemon whose pid file names a live process is left alone, so `up` is idempotent.
# State, spool, pid files and logs live in /tmp/slurm (override with SLURM_LOCAL_DIR).
set -euo pipefail

readonly RUN_DIR="${SLURM_LOCAL_DIR:-/tmp/slurm}"
readonly SLURM_CONF=/etc/slurm/slurm.conf
readonly DBD_CONF=/etc/slurm/slurmdbd.conf
readonly MUNGE_KEY=/etc/munge/munge.key
readonly MUNGE_PID=/run/munge/munged.pid
readonly MARIADB_PID=/run/mysqld/mysqld.pid   # set by Debian's /etc/mysql/mariadb.conf.d/50-server.cnf
readonly MARIADB_LOG="$RUN_DIR/mariadb.log"
readonly WAIT_S="${SLURM_LOCAL_WAIT_S:-60}"   # bound on every wait
# The packages of the recipe; --no-install-recommends keeps it to 28 packages instead of 89.
readonly PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)
# Accounting database credentials (local test cluster only, reachable through localhost only).
readonly DB_NAME=slurm_acct_db DB_USER=slurm DB_PASS=slurmpw
CONFIG_CHANGED=0   # set by write_if_changed when a config file is (re)written

[[ $WAIT_S =~ ^[1-9][0-9]*$ ]] \
  || { echo "[slurm_local] ERROR: SLURM_LOCAL_WAIT_S must be a positive number of seconds, got '$WAIT_S'" >&2; exit 2; }
T0_US=${EPOCHREALTIME/./}   # microseconds since the epoch (bash >= 5)

# log MESSAGE: print MESSAGE with the seconds since the script started.
log() {
  local us=$(( ${EPOCHREALTIME/./} - T0_US ))
  printf '[slurm_local %3d.%01ds] %s\n' $((us / 1000000)) $((us % 1000000 / 100000)) "$*"
}

# die MESSAGE [LOGFILE...]: print the message and the last lines of each log, exit 1.
die() {
  local msg=$1; shift
  echo "[slurm_local] ERROR: $msg" >&2
  local f
  for f in "$@"; do
    if [[ -s $f ]]; then
      echo "----- last 25 lines of $f -----" >&2
      tail -n 25 "$f" >&2
    fi
  done
  exit 1
}

# wait_for DESCRIPTION COMMAND: poll COMMAND every 0.2 s for at most WAIT_S seconds.
# DESCRIPTION only documents the call site (the caller prints the error with the right log).
wait_for() {
  local cmd=$2
  timeout "$WAIT_S" bash -c "until $cmd; do sleep 0.2; done"
}

# alive PIDFILE NAME: true when PIDFILE names a live (non-zombie) process whose command is NAME.
# Checking the name guards against a stale pid file whose pid was reused by another program.
alive() {
  local pidfile=$1 name=$2 pid stat comm
  pid=$(cat "$pidfile" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  stat=$(ps -o stat= -p "$pid" 2>/dev/null) || return 1
  [[ $stat != Z* ]] || return 1
  comm=$(ps -o comm= -p "$pid" 2>/dev/null) || return 1
  [[ $comm == "$name" ]]
}

require_root() {
  [[ $(id -u) -eq 0 ]] || die "must run as root (the daemons run as root/munge/mysql; uid is $(id -u))"
}

# ---------------------------------------------------------------------------------------------- install
install_packages() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if [[ ${#missing[@]} -eq 0 ]]; then
    log "packages already installed ($(dpkg-query -W -f='${Version}' slurmctld) slurm)"
    return
  fi
  command -v apt-get >/dev/null || die "apt-get not found: this script needs Debian/Ubuntu packages"
  log "installing ${missing[*]} (apt-get; about 15 s)"
  mkdir -p "$RUN_DIR"
  local apt_log="$RUN_DIR/apt.log"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update >"$apt_log" 2>&1 || die "apt-get update failed" "$apt_log"
  apt-get install -y --no-install-recommends "${PACKAGES[@]}" >>"$apt_log" 2>&1 \
    || die "apt-get install failed" "$apt_log"
  log "installed slurm $(dpkg-query -W -f='${Version}' slurmctld)"
}

# ---------------------------------------------------------------------------------------------- configs
# write_if_changed PATH MODE: write stdin to PATH (root:root, MODE) unless PATH already has that content.
write_if_changed() {
  local path=$1 mode=$2 tmp
  tmp=$(mktemp)
  cat >"$tmp"
  if [[ -f $path ]] && cmp -s "$tmp" "$path"; then
    rm -f "$tmp"
  else
    install -D -o root -g root -m "$mode" "$tmp" "$path" || die "could not write $path"
    rm -f "$tmp"
    CONFIG_CHANGED=1
    log "wrote $path"
  fi
  # slurmdbd exits ("should be 600") when its config is readable by others: enforce the mode every time.
  chown root:root "$path"
  chmod "$mode" "$path"
}

write_configs() {
  local cpus mem line
  # `slurmd -C` prints the host's hardware, e.g. "NodeName=x CPUs=2 Boards=1 ... RealMemory=24104".
  line=$(slurmd -C 2>/dev/null | head -n 1) || die "slurmd -C failed"
  cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$line")
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$line")
  [[ -n $cpus && -n $mem ]] || die "could not read CPUs/RealMemory from 'slurmd -C' output: $line"
  mem=$((mem * 9 / 10))   # ~90%: slurmd drains a node that reports less memory than configured
  # The node declares at least 4 CPUs (config_overrides: slurmd trusts the config, not the hardware), so that a
  # job of 3 or 4 one-CPU tasks (the ranks of one run, tests/test_slurm_ranks.py) fits on a 2-core machine:
  # its processes then share the cores.
  local declared=$(( cpus < 4 ? 4 : cpus ))

  write_if_changed "$SLURM_CONF" 644 <<EOF
# Written by launch/slurm_local.sh: a single-node test cluster. RealMemory from 'slurmd -C'; CPUs that too, but
# at least 4 (SlurmdParameters=config_overrides).
ClusterName=local
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
StateSaveLocation=$RUN_DIR/state
SlurmdSpoolDir=$RUN_DIR/spool
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$RUN_DIR/slurmctld.log
SlurmdLogFile=$RUN_DIR/slurmd.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
MailProg=/bin/true
ReturnToService=2
SlurmdParameters=config_overrides
NodeName=localhost CPUs=$declared RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF

  write_if_changed "$DBD_CONF" 600 <<EOF
# Written by launch/slurm_local.sh.
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=$DB_USER
StoragePass=$DB_PASS
StorageLoc=$DB_NAME
PidFile=$RUN_DIR/slurmdbd.pid
LogFile=$RUN_DIR/slurmdbd.log
EOF
  log "node localhost: CPUs=$declared (hardware: $cpus) RealMemory=${mem}MB"
  if [[ $CONFIG_CHANGED -eq 1 ]] && { alive "$RUN_DIR/slurmctld.pid" slurmctld || alive "$RUN_DIR/slurmd.pid" slurmd; }; then
    echo "[slurm_local] WARNING: the config changed while Slurm is running; the running daemons keep the" \
      "old one until 'bash $0 down && bash $0 up'" >&2
  fi
}

# ---------------------------------------------------------------------------------------------- daemons
start_munge() {
  if alive "$MUNGE_PID" munged; then log "munged already running (pid $(cat "$MUNGE_PID"))"; return; fi
  [[ -s $MUNGE_KEY ]] || mungekey -c -k "$MUNGE_KEY" || die "could not create $MUNGE_KEY"
  chown munge:munge "$MUNGE_KEY"
  chmod 600 "$MUNGE_KEY"
  # Without systemd nothing creates the socket directory; munged fails with "/run/munge: No such file".
  install -d -o munge -g munge -m 755 /run/munge
  local munge_log=/var/log/munge/munged.log
  runuser -u munge -- /usr/sbin/munged || die "munged did not start" "$munge_log"
  munge -n | unmunge >/dev/null || die "munge round trip (munge -n | unmunge) failed" "$munge_log"
  log "munged started"
}

start_mariadb() {
  if alive "$MARIADB_PID" mariadbd; then
    log "mariadbd already running (pid $(cat "$MARIADB_PID"))"
  else
    [[ -d /var/lib/mysql/mysql ]] || die "/var/lib/mysql is not initialised (reinstall mariadb-server)"
    # As root mariadbd refuses to start without --user=mysql. It does not fork: detach it ourselves.
    install -d -o mysql -g root -m 755 /run/mysqld
    setsid /usr/sbin/mariadbd --user=mysql >>"$MARIADB_LOG" 2>&1 </dev/null &
    wait_for "mariadb-admin" "mariadb-admin --silent ping >/dev/null 2>&1" \
      || die "mariadbd did not answer within ${WAIT_S}s" "$MARIADB_LOG"
    log "mariadbd started"
  fi
  # Idempotent: root logs in through the unix socket.
  mariadb -e "CREATE DATABASE IF NOT EXISTS $DB_NAME;
    CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
    GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'localhost';" \
    || die "could not create the accounting database/user" "$MARIADB_LOG"
}

start_slurmdbd() {
  if alive "$RUN_DIR/slurmdbd.pid" slurmdbd; then log "slurmdbd already running"; return; fi
  slurmdbd || die "slurmdbd did not start" "$RUN_DIR/slurmdbd.log"
  wait_for "slurmdbd port" "(: </dev/tcp/127.0.0.1/6819) 2>/dev/null" \
    || die "slurmdbd is not listening on 6819 after ${WAIT_S}s" "$RUN_DIR/slurmdbd.log"
  log "slurmdbd started"
}

start_slurmctld() {
  if alive "$RUN_DIR/slurmctld.pid" slurmctld; then log "slurmctld already running"; return; fi
  slurmctld || die "slurmctld did not start" "$RUN_DIR/slurmctld.log"
  wait_for "scontrol ping" "scontrol ping >/dev/null 2>&1" \
    || die "slurmctld does not answer 'scontrol ping' after ${WAIT_S}s" "$RUN_DIR/slurmctld.log"
  log "slurmctld started"
}

start_slurmd() {
  if alive "$RUN_DIR/slurmd.pid" slurmd; then log "slurmd already running"; return; fi
  slurmd -N localhost || die "slurmd did not start" "$RUN_DIR/slurmd.log"
  log "slurmd started"
}

cmd_up() {
  require_root
  install_packages
  mkdir -p "$RUN_DIR/state" "$RUN_DIR/spool" || die "could not create $RUN_DIR/state and $RUN_DIR/spool"
  write_configs
  start_munge
  start_mariadb
  start_slurmdbd
  start_slurmctld
  start_slurmd
  # mix/alloc: jobs left running by an earlier stop were recovered.
  wait_for "node ready" "sinfo -h -n localhost -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)\$'" \
    || die "node localhost is not ready after ${WAIT_S}s (state: $(sinfo -h -n localhost -o %t 2>&1))" \
      "$RUN_DIR/slurmd.log" "$RUN_DIR/slurmctld.log"
  log "cluster up:"
  sinfo
}

# ---------------------------------------------------------------------------------------------- down
# stop_daemon PIDFILE NAME: SIGTERM the daemon and wait until it is gone (or a zombie: PID 1 reaps late here).
stop_daemon() {
  local pidfile=$1 name=$2 pid
  if ! alive "$pidfile" "$name"; then log "$name not running"; return 0; fi
  pid=$(cat "$pidfile")
  kill "$pid" 2>/dev/null || true
  local _
  for _ in $(seq $((WAIT_S * 5))); do
    ps -o stat= -p "$pid" 2>/dev/null | grep -qv '^Z' || { log "$name stopped"; return 0; }
    sleep 0.2
  done
  echo "[slurm_local] ERROR: $name (pid $pid) still running ${WAIT_S}s after SIGTERM" >&2
  return 1
}

cmd_down() {
  require_root
  local rc=0
  # Jobs outlive slurmd (their slurmstepd keeps running), so cancel them while the controller is up.
  if command -v scontrol >/dev/null && scontrol ping >/dev/null 2>&1; then
    local n
    n=$(squeue -h | wc -l)
    if [[ $n -gt 0 ]]; then
      log "cancelling $n job(s)"
      scancel -p debug || true
      # shellcheck disable=SC2016  # expanded by the inner bash of wait_for, on every poll
      if ! wait_for "queue empty" '[ -z "$(squeue -h)" ]'; then
        echo "[slurm_local] WARNING: jobs still in the queue after ${WAIT_S}s:" >&2
        squeue >&2 || true
        rc=1
      fi
    fi
  fi
  stop_daemon "$RUN_DIR/slurmd.pid" slurmd || rc=1
  stop_daemon "$RUN_DIR/slurmctld.pid" slurmctld || rc=1
  stop_daemon "$RUN_DIR/slurmdbd.pid" slurmdbd || rc=1
  stop_daemon "$MARIADB_PID" mariadbd || rc=1
  stop_daemon "$MUNGE_PID" munged || rc=1
  if [[ $rc -eq 0 ]]; then log "cluster down"; else log "cluster down, with errors (see above)"; fi
  return "$rc"
}

# ---------------------------------------------------------------------------------------------- status
cmd_status() {
  local rc=0 entry pidfile name
  for entry in "$MUNGE_PID:munged" "$MARIADB_PID:mariadbd" "$RUN_DIR/slurmdbd.pid:slurmdbd" \
               "$RUN_DIR/slurmctld.pid:slurmctld" "$RUN_DIR/slurmd.pid:slurmd"; do
    pidfile=${entry%%:*} name=${entry##*:}
    if alive "$pidfile" "$name"; then
      printf '  %-10s running (pid %s)\n' "$name" "$(cat "$pidfile")"
    else
      printf '  %-10s stopped\n' "$name"
      rc=1
    fi
  done
  if command -v sinfo >/dev/null && scontrol ping >/dev/null 2>&1; then
    sinfo
  else
    echo "  controller not reachable: run 'bash launch/slurm_local.sh up'"
    rc=1
  fi
  return "$rc"
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *)
    echo "usage: bash $0 up|down|status   (got '${1:-}'; allowed: up, down, status)" >&2
    exit 2
    ;;
esac
