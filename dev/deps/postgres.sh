#!/usr/bin/env bash
# PostgreSQL for tests: Debian's server binaries, our own cluster (not the Debian
# pg_ctlcluster one) in $MERIDIAN_STATE_DIR/postgres, listening on 127.0.0.1:$MERIDIAN_PG_PORT.
# Superuser postgres/postgres (scram-sha-256), database `middleware`. TLS is offered (not
# required: plaintext connections work as before) with a certificate for 127.0.0.1/localhost
# from a local CA, $MERIDIAN_STATE_DIR/postgres/tls/ca.crt (made once with openssl; `reset`
# keeps it). `up` reloads a running server whose configuration differs from what it would write.
#
#   dev/deps/postgres.sh up|down|status|bindir
# shellcheck source-path=SCRIPTDIR source=../lib.sh
source "$(dirname "$0")/../lib.sh"

NAME=postgres
PORT=$MERIDIAN_PG_PORT
PG_DIR=$MERIDIAN_STATE_DIR/postgres
PG_DATA=$PG_DIR/data
PG_RUN=$PG_DIR/run            # unix socket directory
PG_READY=$PG_DIR/.initialized # written once initdb and the first configuration succeeded
PG_LOG=$MERIDIAN_LOG_DIR/$NAME.log
PG_TLS=$PG_DIR/tls            # ca.crt, ca.key, server.crt, server.key (the server's, mode 600)
PG_SUPERUSER=postgres
PG_PASSWORD=postgres
PG_DB=middleware

# PostgreSQL refuses to run as root: as root, everything touching the cluster runs as the
# `postgres` OS user (from / so that an unreadable current directory does not matter).
if [ "$(id -u)" = 0 ]; then
  as_pg() { (cd / && runuser -u postgres -- "$@"); }
  pg_own() { chown postgres:postgres "$@"; }
else
  as_pg() { "$@"; }
  pg_own() { :; }
fi

# bindir: the server binaries matching an existing cluster, else the newest installed.
bindir() {
  local v
  if [ -s "$PG_DATA/PG_VERSION" ]; then
    v=$(cat "$PG_DATA/PG_VERSION")
    [ -x "/usr/lib/postgresql/$v/bin/postgres" ] ||
      die "$PG_DATA was created by PostgreSQL $v, which is not installed (apt-get install postgresql-$v, or delete $PG_DIR)"
    echo "/usr/lib/postgresql/$v/bin"
  else
    find /usr/lib/postgresql -mindepth 3 -maxdepth 3 -path '*/bin/postgres' 2>/dev/null |
      sort -V | tail -n 1 | xargs -r dirname
  fi
}

# pg_pid: prints the postmaster's pid when *our* cluster is running. The pid in
# postmaster.pid must be alive, be a postgres process and serve our data directory
# (after a reboot the pid may belong to something else).
pg_pid() {
  local pid
  pid=$(head -n 1 "$PG_DATA/postmaster.pid" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = postgres ] || return 1
  { tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null | grep -qF -- "$PG_DATA" || return 1
  echo "$pid"
}

psql_tcp() {
  PGPASSWORD=$PG_PASSWORD PGCONNECT_TIMEOUT=5 "$(bindir)/psql" -X -q -v ON_ERROR_STOP=1 \
    -h 127.0.0.1 -p "$PORT" -U "$PG_SUPERUSER" "$@"
}

# port_owner PORT: "name (pid N)" of the listening process, when ss can tell.
port_owner() {
  ss -ltnpH "sport = :$1" 2>/dev/null |
    sed -n 's/.*users:(("\([^"]*\)",pid=\([0-9]*\).*/\1 (pid \2)/p' | head -n 1
}

# Debian clusters (pg_lsclusters) configured on our port: "version name status" lines.
debian_clusters_on_port() {
  command -v pg_lsclusters >/dev/null || return 0
  pg_lsclusters -h 2>/dev/null | awk -v p="$PORT" '$3 == p { print $1, $2, $4 }'
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

# After we installed the server package: Debian creates a default cluster on 5432 and may
# start it. Stop it and set it to manual start so it never takes our port (now or after a reboot).
tame_debian_clusters() {
  local v c st
  while read -r v c st; do
    [ -n "$v" ] || continue
    if [ "$st" = online ]; then as_root pg_ctlcluster "$v" "$c" stop || true; fi
    echo manual | as_root tee "/etc/postgresql/$v/$c/start.conf" >/dev/null
    warn "stopped Debian's default cluster $v/$c on port $PORT and set it to manual start"
  done < <(debian_clusters_on_port)
}

# ensure_tls: the local CA and the server's certificate (IP:127.0.0.1, DNS:localhost), made once
# in $PG_TLS; the key belongs to the user the server runs as (PostgreSQL refuses a key others
# can read). Sets TLS_NEW=1 when it made them (a running server must then reload).
TLS_NEW=
ensure_tls() {
  [ -s "$PG_TLS/server.crt" ] && [ -s "$PG_TLS/server.key" ] && [ -s "$PG_TLS/ca.crt" ] && return 0
  step "generating a local CA and a certificate for 127.0.0.1/localhost in $PG_TLS"
  local_tls "$PG_TLS" PostgreSQL "$MERIDIAN_LOG_DIR/$NAME.tools.log"
  pg_own "$PG_TLS/server.key"
  TLS_NEW=1
  ok "CA $PG_TLS/ca.crt (valid 10 years), server certificate $PG_TLS/server.crt"
}

# write_config: meridian.conf and pg_hba.conf as this script wants them; returns 1 when both
# already were (a running server then has nothing to reload).
write_config() {
  local conf hba changed=
  conf=$(render_conf) hba=$(render_hba)
  [ "$conf" = "$(cat "$PG_DATA/meridian.conf" 2>/dev/null)" ] || { printf '%s\n' "$conf" >"$PG_DATA/meridian.conf"; changed=1; }
  [ "$hba" = "$(cat "$PG_DATA/pg_hba.conf" 2>/dev/null)" ] || { printf '%s\n' "$hba" >"$PG_DATA/pg_hba.conf"; changed=1; }
  pg_own "$PG_DATA/meridian.conf" "$PG_DATA/pg_hba.conf"
  [ -n "$changed" ]
}

render_conf() {
  cat <<CONF
# Written by dev/deps/postgres.sh on every start; edits are lost.
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$PG_RUN'
unix_socket_permissions = 0770
max_connections = 400
shared_buffers = 256MB
# Durability stays on: benchmarks against this database claim durable writes.
fsync = on
synchronous_commit = on
full_page_writes = on
# Checkpoints by time, not by WAL volume: with the default max_wal_size (1 GB) the pipeline
# benchmark forced a checkpoint every 45-60 s, and each one makes the next write of every
# page log a full page image. Common production settings for a write-heavy database.
max_wal_size = 8GB
checkpoint_timeout = 15min
wal_compression = lz4
password_encryption = 'scram-sha-256'
logging_collector = off
log_destination = 'stderr'
log_line_prefix = '%m [%p] %q%u@%d '
log_timezone = 'UTC'
timezone = 'UTC'
# TLS for the clients that ask for it; the host lines of pg_hba.conf accept both kinds.
ssl = on
ssl_cert_file = '$PG_TLS/server.crt'
ssl_key_file = '$PG_TLS/server.key'
CONF
}

render_hba() {
  cat <<'HBA'
# Written by dev/deps/postgres.sh on every start; edits are lost.
# TYPE  DATABASE     USER  ADDRESS        METHOD
local   all          all                  scram-sha-256
host    all          all   127.0.0.1/32   scram-sha-256
host    all          all   ::1/128        scram-sha-256
local   replication  all                  scram-sha-256
host    replication  all   127.0.0.1/32   scram-sha-256
HBA
}

init_cluster() {
  local bin=$1 pwfile
  if [ -d "$PG_DATA" ]; then
    warn "removing the unfinished cluster in $PG_DATA (initdb did not complete)"
    rm -rf "$PG_DATA"
  fi
  mkdir -p "$PG_DATA"
  pwfile=$PG_DIR/.pwfile
  (umask 077 && printf '%s\n' "$PG_PASSWORD" >"$pwfile")
  pg_own "$PG_DIR" "$PG_DATA" "$pwfile"
  chmod 700 "$PG_DATA"
  spin "postgres initdb" as_pg "$bin/initdb" -D "$PG_DATA" -U "$PG_SUPERUSER" --pwfile="$pwfile" \
    --auth-local=scram-sha-256 --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 \
    --no-instructions || { rm -f "$pwfile"; die "initdb failed"; }
  rm -f "$pwfile"
  printf "\n# Meridian test settings (port, sockets, limits)\ninclude 'meridian.conf'\n" >>"$PG_DATA/postgresql.conf"
}

start_cluster() {
  local bin=$1 attempt
  for attempt in 1 2 3 4 5; do
    # pg_ctl's own complaints land in the server log too.
    # shellcheck disable=SC2094
    if as_pg "$bin/pg_ctl" start -D "$PG_DATA" -l "$PG_LOG" -w -t 60 -s >>"$PG_LOG" 2>&1; then
      return 0
    fi
    # After a kill -9 of the postmaster its children need a moment to notice and exit;
    # until then PostgreSQL refuses to start ("pre-existing shared memory block is still in use").
    if tail -n 20 "$PG_LOG" | grep -qE 'still in use|lock file .* already exists' && [ "$attempt" -lt 5 ]; then
      warn "old server processes are still exiting; retrying in 2s"
      sleep 2
      continue
    fi
    break
  done
  warn "pg_ctl start failed; last lines of $PG_LOG:"
  tail -n 20 "$PG_LOG" >&2
  die "postgres did not start"
}

# tls_works: a verify-full connection to 127.0.0.1 trusting the local CA uses TLS.
tls_works() {
  [ "$(PGSSLMODE=verify-full PGSSLROOTCERT=$PG_TLS/ca.crt psql_tcp -d postgres -tAc \
    'select ssl from pg_stat_ssl where pid = pg_backend_pid()' 2>/dev/null)" = t ]
}

# reload: a running server takes the written configuration (TLS included) without a restart,
# so the connections of whoever uses it now survive; settings that need a restart are named.
reload() {
  local bin=$1 pending
  as_pg "$bin/pg_ctl" reload -D "$PG_DATA" -s >>"$PG_LOG" 2>&1 || die "pg_ctl reload failed; see $PG_LOG"
  wait_for "$NAME" 10 tls_works || die "postgres does not offer TLS after the reload; see $PG_LOG"
  pending=$(psql_tcp -d postgres -tAc "select string_agg(name, ' ') from pg_settings where pending_restart")
  [ -z "$pending" ] ||
    warn "changed settings that take effect only after a restart ($pending): bash dev/deps.sh down postgres && bash dev/deps.sh up postgres"
}

up() {
  local pid bin just_installed=
  if pid=$(pg_pid); then
    if port_open "$PORT"; then
      ensure_tls
      if write_config || [ -n "$TLS_NEW" ]; then
        step "postgres's configuration changed (dev/deps/postgres.sh or the TLS files); reloading it (pid $pid)"
        reload "$(bindir)"
      fi
      ok "postgres already running on 127.0.0.1:$PORT (pid $pid, TLS CA $PG_TLS/ca.crt)"
      return 0
    fi
    warn "postgres (pid $pid) is running but not on port $PORT; restarting it with the current settings"
    down
  fi

  if [ -z "$(bindir)" ]; then
    apt_install_nostart postgresql
    just_installed=1
  fi
  bin=$(bindir)
  [ -n "$bin" ] || die "no PostgreSQL server found in /usr/lib/postgresql/*/bin after installing postgresql"
  [ -n "$just_installed" ] && tame_debian_clusters

  if port_open "$PORT"; then
    local deb owner
    deb=$(debian_clusters_on_port | awk '$3 == "online" { print $1 "/" $2 }' | head -n 1)
    if [ -n "$deb" ]; then
      die "port $PORT is taken by Debian's PostgreSQL cluster $deb (not ours). Stop it with" \
        "'pg_ctlcluster ${deb%/*} ${deb#*/} stop' (and 'echo manual > /etc/postgresql/$deb/start.conf'" \
        "to keep it stopped), or set MERIDIAN_PG_PORT to a free port"
    fi
    owner=$(port_owner "$PORT")
    die "port $PORT is already in use by ${owner:-another process} (not our postgres); stop it or set MERIDIAN_PG_PORT to a free port"
  fi

  step "postgres $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$PORT (data: $PG_DATA)"
  mkdir -p "$PG_DIR" "$PG_RUN"
  touch "$PG_LOG"
  pg_own "$PG_DIR" "$PG_RUN" "$PG_LOG"
  as_pg test -w "$PG_DIR" -a -w "$PG_LOG" ||
    die "the postgres user cannot write $PG_DIR or $PG_LOG; make $MERIDIAN_STATE_DIR and its parents traversable (chmod o+x) or choose another MERIDIAN_STATE_DIR"

  if [ ! -f "$PG_READY" ]; then
    init_cluster "$bin"
    ok "initialized a new cluster"
  fi

  # A postmaster.pid whose process is gone (kill -9, machine restart) is stale. PostgreSQL would
  # usually cope, but not when the pid now belongs to another postgres process.
  # The same goes for the socket lock file, whose dead pid may linger as a zombie for a moment.
  if [ -f "$PG_DATA/postmaster.pid" ]; then
    warn "removing stale postmaster.pid (pid $(head -n 1 "$PG_DATA/postmaster.pid") is not our server)"
    rm -f "$PG_DATA/postmaster.pid"
  fi
  rm -f "$PG_RUN"/.s.PGSQL.*.lock

  ensure_tls
  write_config || true
  start_cluster "$bin"
  pid=$(pg_pid) || die "postgres started but its postmaster.pid is missing; see $PG_LOG"
  ok "started (pid $pid, log $PG_LOG)"
  tls_works || die "postgres started but does not offer TLS; see $PG_LOG"

  if [ "$(psql_tcp -d postgres -tAc "select 1 from pg_database where datname = '$PG_DB'")" != 1 ]; then
    psql_tcp -d postgres -c "create database $PG_DB" || die "could not create database $PG_DB"
    ok "created database $PG_DB"
  fi
  touch "$PG_READY"
  ok "ready: postgres://$PG_SUPERUSER:$PG_PASSWORD@127.0.0.1:$PORT/$PG_DB (TLS optional, CA $PG_TLS/ca.crt)"
}

down() {
  local pid bin
  if ! pid=$(pg_pid); then
    ok "postgres is not running"
    return 0
  fi
  bin=$(bindir)
  step "stopping postgres (pid $pid)"
  # "fast" mode (SIGINT): disconnect clients, checkpoint, exit. Smart mode (SIGTERM) would
  # wait for the tests' connection pools to go away.
  if ! as_pg "$bin/pg_ctl" stop -D "$PG_DATA" -m fast -w -t 30 -s >>"$PG_LOG" 2>&1; then
    warn "fast shutdown timed out; forcing an immediate shutdown"
    as_pg "$bin/pg_ctl" stop -D "$PG_DATA" -m immediate -w -t 10 -s >>"$PG_LOG" 2>&1 ||
      kill -KILL "$pid" 2>/dev/null || true
  fi
  ok "stopped (data kept in $PG_DATA)"
}

status() {
  local pid ver
  if pid=$(pg_pid) && port_open "$PORT" &&
    ver=$(psql_tcp -d "$PG_DB" -tAc 'show server_version' 2>/dev/null); then
    printf '%-11s%-5s%s\n' postgres up "127.0.0.1:$PORT (PostgreSQL ${ver%% *}, db $PG_DB)"
    return 0
  fi
  local why="not running"
  if [ -n "${pid:-}" ]; then
    why="pid $pid alive but not answering on the port"
  elif port_open "$PORT"; then
    why="port taken by $(port_owner "$PORT" | grep . || echo 'another process')"
  fi
  printf '%-11s%-5s%s\n' postgres down "127.0.0.1:$PORT ($why)"
  return 1
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  # The server's binaries (pgbench for the pipeline benchmark's peer).
  bindir) bindir ;;
  # Stop, delete the cluster (every database, role and setting), start a fresh one. The TLS
  # files stay.
  reset) down && rm -rf "$PG_DATA" "$PG_RUN" "$PG_READY" && up ;;
  *) die "usage: $0 up|down|status|reset" ;;
esac
