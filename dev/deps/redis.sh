#!/usr/bin/env bash
# Redis for tests: Debian's redis-server binary running our own instances (not the Debian
# service), with no persistence; the `default` user stays enabled without a password and ACL
# SETUSER/ACL SAVE work:
#   - a single Redis on 127.0.0.1:$MERIDIAN_REDIS_PORT, config and ACL file in
#     $MERIDIAN_STATE_DIR/redis;
#   - a Redis Cluster of three masters (no replicas) on 127.0.0.1:$MERIDIAN_REDIS_CLUSTER_PORT and
#     the next two ports (cluster bus: each port + 10000), one directory per node in
#     $MERIDIAN_STATE_DIR/redis-cluster/<port> (config, ACL file, nodes.conf). nodes.conf keeps the
#     membership and the slot map across restarts, so a restarted cluster comes back formed
#     (empty); `up` forms it with redis-cli --cluster create when it is not.
#
#   dev/deps/redis.sh up|down|status|reset
# shellcheck source-path=SCRIPTDIR source=../lib.sh
source "$(dirname "$0")/../lib.sh"

NAME=redis
PORT=$MERIDIAN_REDIS_PORT
REDIS_DIR=$MERIDIAN_STATE_DIR/redis
CONF=$REDIS_DIR/redis.conf
ACLFILE=$REDIS_DIR/users.acl

CLUSTER_PORT=$MERIDIAN_REDIS_CLUSTER_PORT
CLUSTER_DIR=$MERIDIAN_STATE_DIR/redis-cluster
CLUSTER_WAIT=20   # seconds for the nodes to agree on cluster_state:ok
# The bus ports (+ 10000) must be valid ports too. (A leading 0 would make bash read it as octal.)
if ! [[ $CLUSTER_PORT =~ ^[1-9][0-9]*$ ]] || ((CLUSTER_PORT + 2 + 10000 > 65535)); then
  die "MERIDIAN_REDIS_CLUSTER_PORT=$CLUSTER_PORT: expected a port from 1 to 55533 (it and the next two, plus 10000 for the cluster bus)"
fi
CLUSTER_PORTS=("$CLUSTER_PORT" "$((CLUSTER_PORT + 1))" "$((CLUSTER_PORT + 2))")
CLUSTER_RANGE=127.0.0.1:$CLUSTER_PORT-$((CLUSTER_PORT + 2))

# redis_pid [NAME]: prints the pid of *our* redis-server NAME (default: the single Redis; pid
# file from start_bg, process alive and really a redis-server; a zombie or a recycled pid after
# a reboot does not count).
redis_pid() {
  local pid
  pid=$(cat "$(pidfile "${1:-$NAME}")" 2>/dev/null) || return 1
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

# Debian's redis-server and redis-tools, for the single Redis and the cluster.
ensure_redis() {
  if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
    apt_install_nostart redis-server redis-tools
    disable_debian_redis
  fi
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

  ensure_redis

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

# --- Redis Cluster: three masters, no replicas ------------------------------------------------

node_name() { echo "redis-cluster-$1"; }
# redis-cli 7.0 has no reply timeout (-t came in 7.2): a stopped (SIGSTOP) or wedged node would
# hang every check, as the kernel still accepts the connection.
ncli() { local port=$1; shift; timeout 5 redis-cli -h 127.0.0.1 -p "$port" "$@"; }
node_ping() { [ "$(ncli "$1" ping 2>/dev/null)" = PONG ]; }
# node_info PORT FIELD: one field of CLUSTER INFO (whose lines end in \r).
node_info() { ncli "$1" cluster info 2>/dev/null | tr -d '\r' | sed -n "s/^$2://p"; }
# node_fresh PORT: the node never joined a cluster (it knows only itself and owns no slot), so
# `redis-cli --cluster create` accepts it.
node_fresh() { [ "$(node_info "$1" cluster_known_nodes)" = 1 ] && [ "$(node_info "$1" cluster_slots_assigned)" = 0 ]; }

# cluster_formed: every node says cluster_state:ok with three known nodes, all three of them
# masters serving slots, and the three agree on who the members are (their own node ids). A node
# that lost its nodes.conf gets a new id, which the others do not know even while they still say ok.
cluster_formed() {
  local port info nodes ids members='' mine=''
  for port in "${CLUSTER_PORTS[@]}"; do
    info=$(ncli "$port" cluster info 2>/dev/null | tr -d '\r') || return 1
    grep -qx cluster_state:ok <<<"$info" && grep -qx cluster_known_nodes:3 <<<"$info" &&
      grep -qx cluster_size:3 <<<"$info" || return 1
    nodes=$(ncli "$port" cluster nodes 2>/dev/null) || return 1
    ids=$(awk '{print $1}' <<<"$nodes" | sort | tr '\n' ' ')
    if [ -z "$members" ]; then members=$ids; fi
    [ "$ids" = "$members" ] || return 1
    mine+="$(awk '$3 ~ /myself/ {print $1}' <<<"$nodes")"$'\n'
  done
  [ "$(sort <<<"${mine%$'\n'}" | tr '\n' ' ')" = "$members" ]
}

# cluster_wait SECONDS: poll cluster_formed quietly (a timeout is handled by the caller).
cluster_wait() {
  local start=$SECONDS
  until cluster_formed; do
    ((SECONDS - start < $1)) || return 1
    sleep 0.5
  done
}

write_node_config() {
  local port=$1 dir=$CLUSTER_DIR/$1
  mkdir -p "$dir"
  cat >"$dir/redis.conf" <<CONF
# Written by dev/deps/redis.sh on every start; edits are lost.
bind 127.0.0.1
port $port
protected-mode yes
daemonize no
supervised no
logfile ""
loglevel notice
dir $dir
# Tests only: no persistence at all (a restarted node comes back empty, still owning its slots).
save ""
appendonly no
cluster-enabled yes
# Relative to dir. Redis rewrites it on every membership, slot or epoch change and reads it at
# start: it is what lets the restarted nodes find each other again without a new create.
cluster-config-file nodes.conf
cluster-node-timeout 5000
# As the single Redis: users live here so that ACL SETUSER + ACL SAVE work (per node: ACLs are
# not propagated through the cluster); the default user stays nopass.
aclfile $dir/users.acl
CONF
  [ -s "$dir/users.acl" ] || echo 'user default on nopass sanitize-payload ~* &* +@all' >"$dir/users.acl"
}

# cluster_start_nodes: start the nodes that are not running (restart one that does not answer),
# then wait until all three answer PING. Sets STARTED (the ports it started).
STARTED=()
cluster_start_nodes() {
  local port name pid p owner
  STARTED=()
  for port in "${CLUSTER_PORTS[@]}"; do
    name=$(node_name "$port")
    if pid=$(redis_pid "$name"); then
      node_ping "$port" && continue
      warn "$name (pid $pid) is running but does not answer on port $port; restarting it"
      stop_bg "$name" 10
    fi
    STARTED+=("$port")
  done
  [ ${#STARTED[@]} -eq 0 ] && return 0
  # All ports first, so that a taken one does not leave the other nodes running. The cluster bus
  # (port + 10000) must be free as well, or the node exits right after its start.
  for port in "${STARTED[@]}"; do
    for p in "$port" "$((port + 10000))"; do
      if port_open "$p"; then
        owner=$(port_owner "$p")
        die "port $p (for $(node_name "$port")) is already in use by ${owner:-another process}; stop it or set MERIDIAN_REDIS_CLUSTER_PORT to the first of three free ports"
      fi
    done
  done
  for port in "${STARTED[@]}"; do
    write_node_config "$port"
    start_bg "$(node_name "$port")" redis-server "$CLUSTER_DIR/$port/redis.conf"
  done
  step "redis-cluster nodes ${STARTED[*]} on 127.0.0.1 (config: $CLUSTER_DIR/<port>/redis.conf)"
  for port in "${STARTED[@]}"; do
    name=$(node_name "$port")
    wait_for "$name" 20 node_ping "$port" || { cluster_down >/dev/null; die "$name did not start; see $MERIDIAN_LOG_DIR/$name.log"; }
  done
  ok "started (logs $MERIDIAN_LOG_DIR/redis-cluster-<port>.log)"
}

cluster_create() {
  local hosts=() port log=$MERIDIAN_LOG_DIR/redis-cluster-create.log
  for port in "${CLUSTER_PORTS[@]}"; do hosts+=("127.0.0.1:$port"); done
  step "forming the cluster: ${hosts[*]}, 3 masters, no replicas"
  # TERM=dumb: redis-cli colours its --cluster output whenever TERM says xterm, even into a file.
  TERM=dumb timeout 60 redis-cli --cluster create "${hosts[@]}" --cluster-replicas 0 --cluster-yes >"$log" 2>&1 ||
    { tail -n 20 "$log" >&2; die "redis-cli --cluster create failed; see $log"; }
  # create returns once the nodes know each other; each then turns cluster_state ok on its own.
  wait_for "$(node_name "$CLUSTER_PORT")" "$CLUSTER_WAIT" cluster_formed ||
    die "the cluster did not reach cluster_state:ok within ${CLUSTER_WAIT}s; see $log and $MERIDIAN_LOG_DIR/redis-cluster-<port>.log"
}

cluster_up() {
  local port fresh=0 start=$SECONDS
  ensure_redis
  cluster_start_nodes
  if cluster_formed; then
    if [ ${#STARTED[@]} -eq 0 ]; then ok "redis-cluster already running on $CLUSTER_RANGE (cluster_state ok)"; else ok "redis-cluster formed"; fi
    return 0
  fi
  for port in "${CLUSTER_PORTS[@]}"; do
    if node_fresh "$port"; then fresh=$((fresh + 1)); fi
  done
  if ((fresh == 0)); then
    # Nodes started from their nodes.conf reconnect by themselves; a master waits ~2 s after a
    # restart before it calls the cluster ok again.
    if cluster_wait "$CLUSTER_WAIT"; then
      ok "redis-cluster formed again from nodes.conf in $((SECONDS - start))s: redis://127.0.0.1:$CLUSTER_PORT"
      return 0
    fi
    warn "the nodes did not re-form one cluster from their nodes.conf within ${CLUSTER_WAIT}s (on $CLUSTER_PORT: cluster_state $(node_info "$CLUSTER_PORT" cluster_state), $(node_info "$CLUSTER_PORT" cluster_known_nodes) known nodes)"
  fi
  if ((fresh != ${#CLUSTER_PORTS[@]})); then
    # Some nodes remember a cluster the others do not (a lost or stale nodes.conf): start over.
    ((fresh == 0)) || warn "$fresh of the ${#CLUSTER_PORTS[@]} nodes have no nodes.conf (new ids); the others remember an older cluster"
    warn "wiping the nodes' nodes.conf and forming the cluster again (it holds no data)"
    cluster_down >/dev/null
    for port in "${CLUSTER_PORTS[@]}"; do rm -f "$CLUSTER_DIR/$port/nodes.conf"; done
    cluster_start_nodes
  fi
  cluster_create
  ok "ready in $((SECONDS - start))s: redis://127.0.0.1:$CLUSTER_PORT (seed; clients discover $CLUSTER_RANGE)"
}

# cluster_down: stops every node we started, also those of an earlier MERIDIAN_REDIS_CLUSTER_PORT.
cluster_down() {
  local f name pid names=() pids=() stops=()
  for f in "$MERIDIAN_STATE_DIR"/pids/redis-cluster-*.pid; do
    [ -e "$f" ] || continue
    name=$(basename "$f" .pid)
    if pid=$(redis_pid "$name"); then names+=("$name") pids+=("$pid"); else rm -f "$f"; fi
  done
  if [ ${#names[@]} -eq 0 ]; then
    ok "redis-cluster is not running"
    return 0
  fi
  step "stopping redis-cluster (pids ${pids[*]})"
  # In parallel: a node exits at once, but stop_bg waits until the pid is gone, and an exited
  # process whose parent is gone stays a zombie until init reaps it (~1.5 s per node on some VMs).
  # Wait for these jobs only: the redis-servers this script started are background jobs too.
  for name in "${names[@]}"; do
    stop_bg "$name" 15 &
    stops+=("$!")
  done
  wait "${stops[@]}"
  ok "stopped (nodes.conf kept)"
}

cluster_status() {
  local port name pid why=()
  for port in "${CLUSTER_PORTS[@]}"; do
    name=$(node_name "$port")
    if pid=$(redis_pid "$name"); then
      node_ping "$port" || why+=("$port: pid $pid not answering")
    elif port_open "$port"; then
      why+=("$port: port taken by $(port_owner "$port" | grep . || echo 'another process')")
    else
      why+=("$port: not running")
    fi
  done
  if [ ${#why[@]} -eq 0 ]; then
    if cluster_formed; then
      echo "redis-cluster up $CLUSTER_RANGE (3 masters, cluster_state ok)"
      return 0
    fi
    why=("not formed: on $CLUSTER_PORT cluster_state $(node_info "$CLUSTER_PORT" cluster_state), $(node_info "$CLUSTER_PORT" cluster_known_nodes) known nodes" "run dev/deps/redis.sh up")
  elif [ "${why[*]}" = "${CLUSTER_PORTS[*]/%/: not running}" ]; then
    why=("not running")
  fi
  local msg
  msg=$(printf '%s; ' "${why[@]}")
  echo "redis-cluster down $CLUSTER_RANGE (${msg%; })"
  return 1
}

# The single Redis and the cluster must not take each other's ports (cluster bus: port + 10000).
check_ports() {
  local port
  for port in "${CLUSTER_PORTS[@]}"; do
    if [ "$PORT" = "$port" ] || [ "$PORT" = "$((port + 10000))" ]; then
      die "MERIDIAN_REDIS_PORT=$PORT collides with the Redis Cluster ($CLUSTER_RANGE, bus ports +10000); change MERIDIAN_REDIS_PORT or MERIDIAN_REDIS_CLUSTER_PORT"
    fi
  done
}

case "${1:-}" in
  up)
    check_ports
    up
    cluster_up
    ;;
  down)
    down
    cluster_down
    ;;
  status)
    rc=0
    status || rc=1
    cluster_status || rc=1
    exit "$rc"
    ;;
  # Stop (nothing is persisted), forget the ACL users and the cluster (nodes.conf: the next
  # `up` forms a new one), start again.
  reset)
    check_ports
    down
    cluster_down
    rm -rf "$ACLFILE" "$CLUSTER_DIR"
    up
    cluster_up
    ;;
  *) die "usage: $0 up|down|status|reset" ;;
esac
