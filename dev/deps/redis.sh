#!/usr/bin/env bash
# Redis for tests: Debian's redis-server binary running our own instance (not the Debian
# service) on 127.0.0.1:$MERIDIAN_REDIS_PORT, config and ACL file in $MERIDIAN_STATE_DIR/redis.
# No persistence; the `default` user stays enabled without a password; ACL SETUSER/ACL SAVE work.
#
#   dev/deps/redis.sh up|down|status
# shellcheck source-path=SCRIPTDIR source=../lib.sh
source "$(dirname "$0")/../lib.sh"

NAME=redis
PORT=$MERIDIAN_REDIS_PORT
REDIS_DIR=$MERIDIAN_STATE_DIR/redis
CONF=$REDIS_DIR/redis.conf
ACLFILE=$REDIS_DIR/users.acl

# redis_pid: prints the pid of *our* redis-server (pid file from start_bg, process alive and
# really a redis-server; a zombie or a recycled pid after a reboot does not count).
redis_pid() {
  local pid
  pid=$(cat "$(pidfile "$NAME")" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  { tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null | grep -q 'redis-server' || return 1
  echo "$pid"
}

cli() { redis-cli -h 127.0.0.1 -p "$PORT" "$@"; }
redis_ping() { [ "$(cli ping 2>/dev/null)" = PONG ]; }

port_owner() {
  ss -ltnpH "sport = :$1" 2>/dev/null |
    sed -n 's/.*users:(("\([^"]*\)",pid=\([0-9]*\).*/\1 (pid \2)/p' | head -n 1
}

# apt-get install without letting the package start its service (policy-rc.d exit 101).
apt_install_nostart() {
  local policy=/usr/sbin/policy-rc.d rc=0
  if [ -e "$policy" ]; then apt_install "$@"; return; fi
  # shellcheck disable=SC2064 # expand $policy now
  trap "as_root rm -f '$policy'" EXIT
  printf '#!/bin/sh\n# temporary, from meridian dev/deps: do not start services during apt-get install\nexit 101\n' |
    as_root tee "$policy" >/dev/null
  as_root chmod 755 "$policy"
  apt_install "$@" || rc=$?
  as_root rm -f "$policy"
  trap - EXIT
  return $rc
}

# The redis-server package ships a service (systemd unit and init.d script) that listens on
# 6379 and starts at boot. Stop it if it runs and disable it, so it never holds our port.
debian_redis_pid() {
  local pid
  pid=$(cat /run/redis/redis-server.pid 2>/dev/null) || return 1
  kill -0 "$pid" 2>/dev/null && [ "$pid" != "$(redis_pid || true)" ] && echo "$pid"
}
debian_redis_enabled() {
  compgen -G '/etc/rc[2-5].d/S*redis-server' >/dev/null ||
    [ -e /etc/systemd/system/multi-user.target.wants/redis-server.service ]
}
disable_debian_redis() {
  [ -e /etc/init.d/redis-server ] || [ -e /lib/systemd/system/redis-server.service ] || return 0
  local pid
  if [ -d /run/systemd/system ]; then
    as_root systemctl disable --now redis-server.service >/dev/null 2>&1 || true
  else
    as_root systemctl disable redis-server.service >/dev/null 2>&1 || true
    if debian_redis_pid >/dev/null; then as_root service redis-server stop >/dev/null 2>&1 || true; fi
  fi
  as_root update-rc.d redis-server disable >/dev/null 2>&1 || true
  if pid=$(debian_redis_pid); then
    as_root kill -TERM "$pid" 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  fi
}

write_config() {
  cat >"$CONF" <<CONF
# Written by dev/deps/redis.sh on every start; edits are lost.
bind 127.0.0.1
port $PORT
protected-mode yes
daemonize no
supervised no
logfile ""
loglevel notice
dir $REDIS_DIR
# Tests only: no persistence at all.
save ""
appendonly no
# Users live here so that ACL SETUSER + ACL SAVE work; the default user stays nopass.
aclfile $ACLFILE
CONF
  # Kept across restarts (ACL SAVE rewrites it); created once with the development default.
  [ -s "$ACLFILE" ] || echo 'user default on nopass sanitize-payload ~* &* +@all' >"$ACLFILE"
}

up() {
  local pid owner
  if pid=$(redis_pid); then
    if redis_ping; then
      ok "redis already running on 127.0.0.1:$PORT (pid $pid)"
      return 0
    fi
    warn "redis (pid $pid) is running but does not answer on port $PORT; restarting it"
    stop_bg "$NAME" 10
  fi

  if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
    apt_install_nostart redis-server redis-tools
    disable_debian_redis
  fi

  # Debian's service would take 6379 at the next boot even if it is stopped now.
  if [ "$PORT" = 6379 ] && debian_redis_enabled && ! debian_redis_pid >/dev/null; then
    warn "disabling Debian's redis-server service (it would take port 6379 at boot)"
    disable_debian_redis
  fi
  if port_open "$PORT"; then
    if [ "$PORT" = 6379 ] && debian_redis_pid >/dev/null; then
      warn "Debian's redis-server service holds port 6379; stopping and disabling it"
      disable_debian_redis
    fi
    if port_open "$PORT"; then
      owner=$(port_owner "$PORT")
      die "port $PORT is already in use by ${owner:-another process} (not our redis); stop it or set MERIDIAN_REDIS_PORT to a free port"
    fi
  fi

  step "redis $(redis-server --version | sed -n 's/.* v=\([^ ]*\).*/\1/p') on 127.0.0.1:$PORT (config: $CONF)"
  mkdir -p "$REDIS_DIR"
  write_config
  start_bg "$NAME" redis-server "$CONF"
  wait_for "$NAME" 20 redis_ping || { stop_bg "$NAME" 5; die "redis did not start; see $MERIDIAN_LOG_DIR/$NAME.log"; }
  ok "started (pid $(redis_pid || cat "$(pidfile "$NAME")"), log $MERIDIAN_LOG_DIR/$NAME.log)"
  ok "ready: redis://127.0.0.1:$PORT"
}

down() {
  local pid
  if ! pid=$(redis_pid); then
    rm -f "$(pidfile "$NAME")"
    ok "redis is not running"
    return 0
  fi
  step "stopping redis (pid $pid)"
  stop_bg "$NAME" 15
  ok "stopped"
}

status() {
  local pid ver
  if pid=$(redis_pid) && ver=$(cli info server 2>/dev/null | tr -d '\r' | sed -n 's/^redis_version://p') &&
    [ -n "$ver" ]; then
    printf '%-11s%-5s%s\n' redis up "127.0.0.1:$PORT (Redis $ver, no persistence, acl $ACLFILE)"
    return 0
  fi
  local why="not running"
  if [ -n "${pid:-}" ]; then
    why="pid $pid alive but not answering on the port"
  elif port_open "$PORT"; then
    why="port taken by $(port_owner "$PORT" | grep . || echo 'another process')"
  fi
  printf '%-11s%-5s%s\n' redis down "127.0.0.1:$PORT ($why)"
  return 1
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  # Stop (nothing is persisted), forget the ACL users, start again.
  reset) down && rm -f "$ACLFILE" && up ;;
  *) die "usage: $0 up|down|status|reset" ;;
esac
