#!/usr/bin/env bash
# The process lifecycle behind `make run`, `make stop` and `make clean` (a development
# convenience; production runs under systemd, see deploy/README.md).
#
#   run-local.sh run    a memcached on $MEMCACHED_ADDR (started here if nothing listens
#                       there), then gunicorn in the foreground. When gunicorn exits (Ctrl-C,
#                       make stop, a crash), the memcached this command started stops too.
#   run-local.sh up     only the memcached part; it keeps running until `make stop`.
#   run-local.sh stop   stop what `run`/`up` started, and nothing else.
#
# What "we started" means is recorded in $RUNDIR: memcached.pid (memcached -P) and
# gunicorn.pid (gunicorn --pid), both given as absolute paths on the command line.
# gunicorn's own temporary files (the metrics directory, the settings snapshot) go to
# $RUNDIR/tmp (its TMPDIR), never to the system's temp directory; gunicorn removes them
# when it exits, and `make clean` removes $RUNDIR. Once the service answers, `run` prints
# where the demo, the admin page and the command line are, and how to turn the admin on. A pid is
# only ever signalled when /proc/PID/cmdline still names the program and that pid file: a
# stale file whose pid was recycled by an unrelated process is removed, never acted on.
# A memcached that was already listening (somebody else's) is used and left alone.
#
# Environment: MEMCACHED_ADDR (127.0.0.1:11211), RUNDIR (.run), BIN (.venv/bin, where
# gunicorn is), STOP_TIMEOUT (seconds gunicorn may take to stop gracefully, 40: its
# graceful_timeout is 30). gunicorn's own GUNICORN_CMD_ARGS is honoured (--bind=...).

set -u

MEMCACHED_ADDR=${MEMCACHED_ADDR:-127.0.0.1:11211}
RUNDIR=${RUNDIR:-.run}
BIN=${BIN:-.venv/bin}
STOP_TIMEOUT=${STOP_TIMEOUT:-40}

# Absolute, so that the pid-file paths on the processes' command lines are unambiguous.
RUNDIR_ABS=$(realpath -m -- "$RUNDIR")
MEMCACHED_PIDFILE=$RUNDIR_ABS/memcached.pid
GUNICORN_PIDFILE=$RUNDIR_ABS/gunicorn.pid
HOST=${MEMCACHED_ADDR%:*}
PORT=${MEMCACHED_ADDR##*:}

say() { printf '>>> %s\n' "$*"; }
shout() { printf '!!!%s\n' "${*:+ $*}"; }

# ---- processes ------------------------------------------------------------------------------

# alive PID: the process exists and is not a zombie (an exited child not yet reaped by its
# parent still has a /proc entry, and `kill -0` succeeds on it).
alive() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  case ${stat%% *} in Z | X | '') return 1 ;; esac
  return 0
}

cmdline() { tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null; }

# read_pid FILE: the pid in FILE, or nothing when it is missing or not a number.
read_pid() {
  local pid
  pid=$(head -c 32 "$1" 2>/dev/null | tr -dc '0-9')
  [ -n "$pid" ] && printf '%s' "$pid"
}

# is_ours_memcached PID: a live memcached that was told to write our pid file.
is_ours_memcached() {
  alive "$1" || return 1
  case $(cmdline "$1") in *memcached*" -P $MEMCACHED_PIDFILE"*) return 0 ;; esac
  return 1
}

# is_ours_gunicorn PID: a live gunicorn master started with our pid file. With setproctitle
# installed, gunicorn renames itself "gunicorn: master [...]" and the arguments are gone;
# then it must at least run in this directory.
is_ours_gunicorn() {
  alive "$1" || return 1
  case $(cmdline "$1") in
    *gunicorn*" --pid $GUNICORN_PIDFILE "*) return 0 ;;
    "gunicorn: master "*) [ "$(readlink "/proc/$1/cwd")" = "$(pwd -P)" ] && return 0 ;;
  esac
  return 1
}

# wait_gone PID SECONDS: poll (every 0.1 s) until PID is gone; false if it is still there.
wait_gone() {
  local ticks=$(($2 * 10))
  while alive "$1"; do
    [ "$ticks" -le 0 ] && return 1
    ticks=$((ticks - 1))
    sleep 0.1
  done
  return 0
}

# terminate NAME PID SECONDS: SIGTERM, wait, SIGKILL if needed. False if it survived that.
terminate() {
  kill -TERM "$2" 2>/dev/null
  wait_gone "$2" "$3" && return 0
  shout "$1 (pid $2) did not stop within $3 s: sending SIGKILL"
  kill -KILL "$2" 2>/dev/null
  wait_gone "$2" 5 && return 0
  shout "$1 (pid $2) is still running"
  return 1
}

# stop_one NAME PIDFILE CHECK SECONDS: stop the process of PIDFILE if CHECK says it is ours.
# Status 0: stopped it; 1: nothing of ours was running; 2: it would not stop.
stop_one() {
  local name=$1 pidfile=$2 check=$3 seconds=$4 pid
  [ -e "$pidfile" ] || return 1
  if [ ! -r /proc/self/cmdline ]; then
    # Without /proc nothing can be checked: keep the pid file rather than orphan the process.
    shout "cannot check pid $(read_pid "$pidfile") of $pidfile without /proc: stop it by hand"
    return 2
  fi
  pid=$(read_pid "$pidfile")
  if [ -z "$pid" ] || ! "$check" "$pid"; then
    # A pid that is gone: it exited (make run's own clean-up may just have stopped it).
    # A pid that is alive but not ours: the number was recycled. Either way the file is
    # stale, and the process it names is never signalled.
    if [ -n "$pid" ] && alive "$pid"; then
      say "removing the stale $pidfile (pid $pid is not the $name make run started; left alone)"
    fi
    rm -f "$pidfile"
    return 1
  fi
  say "stopping $name (pid $pid)"
  terminate "$name" "$pid" "$seconds" || return 2
  rm -f "$pidfile"
  return 0
}

stop_memcached() { stop_one memcached "$MEMCACHED_PIDFILE" is_ours_memcached 5; }

# ---- memcached --------------------------------------------------------------------------------

# answers: a memcached answers `version` on $MEMCACHED_ADDR. bash's /dev/tcp, bounded by
# timeout(1); the inner scripts are single-quoted on purpose (they get HOST and PORT as $1
# and $2).
# shellcheck disable=SC2016
answers() {
  timeout 2 bash -c '
    exec 3<>"/dev/tcp/$1/$2" || exit 1
    printf "version\r\n" >&3
    read -r reply <&3 && [ "${reply#VERSION }" != "$reply" ]' _ "$HOST" "$PORT" 2>/dev/null
}

# wait_answers SECONDS: poll until memcached answers; false when the time is up.
wait_answers() {
  local ticks=$(($1 * 10))
  until answers; do
    [ "$ticks" -le 0 ] && return 1
    ticks=$((ticks - 1))
    sleep 0.1
  done
}

# listening: something accepts TCP connections there (maybe not a memcached).
# shellcheck disable=SC2016
listening() { timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$HOST" "$PORT" 2>/dev/null; }

# memcached_up: sets STARTED_MEMCACHED=1 when it started one.
STARTED_MEMCACHED=0
memcached_up() {
  local pid
  pid=$(read_pid "$MEMCACHED_PIDFILE")
  if [ -n "$pid" ] && is_ours_memcached "$pid"; then
    say "using the memcached an earlier make run started on $MEMCACHED_ADDR (pid $pid; make stop stops it)"
    return
  fi
  if [ -e "$MEMCACHED_PIDFILE" ]; then
    say "removing the stale $MEMCACHED_PIDFILE (pid ${pid:-?} is not a memcached make run started)"
    rm -f "$MEMCACHED_PIDFILE"
  fi
  if answers; then
    say "using the memcached already listening on $MEMCACHED_ADDR (not started by make run; make stop will leave it alone)"
    return
  fi
  if listening; then
    shout "something listens on $MEMCACHED_ADDR but does not answer as a memcached:"
    shout "running on the IN-PROCESS TIER ONLY. Free the port, or choose another with"
    shout "MEMCACHED_ADDR=127.0.0.1:PORT (and the same address in settings.toml [cache] servers)."
    return
  fi
  if ! command -v memcached >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing memcached with apt-get"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq memcached >/dev/null
  fi
  if ! command -v memcached >/dev/null 2>&1; then
    shout
    shout "NO MEMCACHED on $MEMCACHED_ADDR and none installed."
    shout "Running on the IN-PROCESS TIER ONLY: workers do not share entries, leases"
    shout "and counters are per worker. Install it: sudo apt-get install memcached"
    shout
    return
  fi
  say "starting memcached on $MEMCACHED_ADDR (pid file $MEMCACHED_PIDFILE)"
  # -d: it detaches (its own session, so a Ctrl-C in this terminal does not reach it);
  # whoever started it stops it through the pid file.
  if ! memcached -d -u "$(id -un)" -l "$HOST" -p "$PORT" -U 0 -m 64 -c 4096 \
      -P "$MEMCACHED_PIDFILE"; then
    shout "memcached did not start: running on the in-process tier only"
    return
  fi
  STARTED_MEMCACHED=1
  if ! wait_answers 5; then
    shout "memcached did not come up on $MEMCACHED_ADDR: running on the in-process tier only"
  fi
}

# ---- the banner: where things are, once the service answers ------------------------------

# bind_address: gunicorn's --bind as the config will see it (GUNICORN_CMD_ARGS wins over
# SERVICE_BIND, whose default is deploy/gunicorn.conf.py's).
bind_address() {
  local args prev="" arg bind=${SERVICE_BIND:-127.0.0.1:8000}
  read -r -a args <<<"${GUNICORN_CMD_ARGS:-}"
  for arg in "${args[@]}"; do
    case $arg in
      --bind=*) bind=${arg#--bind=} ;;
      -b?*) bind=${arg#-b} ;;
    esac
    case $prev in --bind | -b) bind=$arg ;; esac
    prev=$arg
  done
  printf '%s' "$bind"
}

# http_ok HOST PORT: GET /healthz answers 200 (bash's /dev/tcp, bounded by timeout(1)).
# shellcheck disable=SC2016
http_ok() {
  timeout 2 bash -c '
    exec 3<>"/dev/tcp/$1/$2" || exit 1
    printf "GET /healthz HTTP/1.0\r\nHost: %s\r\n\r\n" "$1" >&3
    read -r status <&3 && [ "${status#HTTP/* 200}" != "$status" ]' _ "$1" "$2" 2>/dev/null
}

# banner GUNICORN_PID: in the background, poll /healthz (up to 60 s, while gunicorn runs)
# and then say where things are.
banner() {
  local bind host port base ticks=600
  bind=$(bind_address)
  case $bind in
    unix:*) return ;;  # no URL to print for a unix socket
  esac
  host=${bind%:*}
  port=${bind##*:}
  case $host in '' | 0.0.0.0 | '[::]') host=127.0.0.1 ;; esac
  base="http://$host:$port"
  until http_ok "$host" "$port"; do
    [ "$ticks" -le 0 ] && return
    alive "$1" || return
    ticks=$((ticks - 1))
    sleep 0.1
  done
  say "the demo:       curl -i $base/v1/primes   (a MISS computes it, the next answer is a HIT)"
  if [ -n "${SERVICE_ADMIN_TOKEN:-}" ]; then
    say "the admin page: $base/admin/   (any user name, the token SERVICE_ADMIN_TOKEN as the password)"
  else
    say "the admin page: off. Turn it on with a secret of your own:"
    say "                SERVICE_ADMIN_TOKEN=\$(openssl rand -hex 16) make run   then open $base/admin/"
  fi
  say "the CLI:        $BIN/flask --app wsgi swr stats   (entries, show, invalidate, refresh, warm; no token: see docs/ADMIN.md)"
}

# ---- commands -----------------------------------------------------------------------------------

cmd_up() {
  mkdir -p "$RUNDIR_ABS"
  memcached_up
}

GUNICORN_PID=
BANNER_PID=
cleanup() {
  if [ -n "$BANNER_PID" ]; then kill "$BANNER_PID" 2>/dev/null; fi
  if [ "$STARTED_MEMCACHED" = 1 ]; then
    # Only the memcached this very command started: an earlier run's, or somebody else's,
    # stays. stop_one re-checks the pid file, as make stop may have stopped it already.
    stop_memcached
  fi
}

forward() {
  # Ctrl-C reaches gunicorn directly (same process group); a signal sent to make or to this
  # script alone does not, hence the forwarding. gunicorn then stops its workers and exits.
  # Before gunicorn started there is nothing to wait for: exit (cleanup runs on EXIT).
  if [ -z "$GUNICORN_PID" ]; then exit $((128 + $2)); fi
  kill "-$1" "$GUNICORN_PID" 2>/dev/null
}

# daemonized: GUNICORN_CMD_ARGS has --daemon (or -D), so the process that exited was only
# the launcher; true once the detached master has written our pid file (up to 10 s).
daemonized() {
  local pid ticks=100
  case " ${GUNICORN_CMD_ARGS:-} " in *" --daemon "* | *" -D "*) ;; *) return 1 ;; esac
  while [ "$ticks" -gt 0 ]; do
    pid=$(read_pid "$GUNICORN_PIDFILE")
    if [ -n "$pid" ] && is_ours_gunicorn "$pid"; then return 0; fi
    ticks=$((ticks - 1))
    sleep 0.1
  done
  return 1
}

cmd_run() {
  local pid status
  mkdir -p "$RUNDIR_ABS"
  pid=$(read_pid "$GUNICORN_PIDFILE")
  if [ -n "$pid" ] && is_ours_gunicorn "$pid"; then
    shout "a gunicorn started by make run is already running (pid $pid): make stop stops it"
    exit 1
  fi
  if [ -e "$GUNICORN_PIDFILE" ]; then
    say "removing the stale $GUNICORN_PIDFILE (pid ${pid:-?} is not a gunicorn make run started)"
    rm -f "$GUNICORN_PIDFILE"
  fi
  trap cleanup EXIT
  trap 'forward INT 2' INT
  trap 'forward TERM 15' TERM
  trap 'forward HUP 1' HUP
  memcached_up
  if [ "$STARTED_MEMCACHED" = 1 ]; then
    say "serving with gunicorn; Ctrl-C (or make stop) stops it and the memcached it started"
  else
    say "serving with gunicorn; Ctrl-C (or make stop) stops it"
  fi
  # In the background so that this shell keeps handling signals while gunicorn runs; its
  # output still goes to the terminal. --pid on the command line wins over a --pid in
  # GUNICORN_CMD_ARGS, which stays honoured for everything else (--bind, --workers, ...).
  mkdir -p "$RUNDIR_ABS/tmp"
  TMPDIR="$RUNDIR_ABS/tmp" "$BIN/gunicorn" -c deploy/gunicorn.conf.py --pid "$GUNICORN_PIDFILE" \
    wsgi:app &
  GUNICORN_PID=$!
  banner "$GUNICORN_PID" &
  BANNER_PID=$!
  # `wait` returns early (status > 128) when a trapped signal arrives; keep waiting until
  # gunicorn itself has exited. bash remembers a reaped child's status, so the last `wait`
  # gives gunicorn's exit status, which becomes ours.
  while alive "$GUNICORN_PID"; do
    wait "$GUNICORN_PID"
  done
  wait "$GUNICORN_PID"
  status=$?
  if [ "$status" = 0 ] && daemonized; then
    say "gunicorn detached (pid $(read_pid "$GUNICORN_PIDFILE")): make stop stops it and the memcached make run started"
    STARTED_MEMCACHED=0
  fi
  exit "$status"
}

cmd_stop() {
  local any=0 failed=0 rc
  # gunicorn first: its workers may still be talking to memcached while they drain.
  stop_one gunicorn "$GUNICORN_PIDFILE" is_ours_gunicorn "$STOP_TIMEOUT"
  rc=$?
  [ "$rc" = 0 ] && any=1
  [ "$rc" = 2 ] && failed=1
  stop_memcached
  rc=$?
  [ "$rc" = 0 ] && any=1
  [ "$rc" = 2 ] && failed=1
  if [ "$failed" = 1 ]; then
    shout "some processes did not stop (see above)"
    exit 1
  fi
  if [ "$any" = 0 ]; then
    say "nothing to stop: no gunicorn or memcached started by make run is running ($RUNDIR_ABS)"
  fi
  exit 0
}

case ${1:-} in
  run) cmd_run ;;
  up) cmd_up ;;
  stop) cmd_stop ;;
  *)
    echo "usage: $0 run|up|stop" >&2
    exit 2
    ;;
esac
