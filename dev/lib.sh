#!/usr/bin/env bash
# Shared helpers for the dev-environment scripts under dev/ (and the e2e scripts under e2e/).
# Source it; do not run it.
#
# Layout (all overridable, so two copies can coexist):
#   MERIDIAN_CACHE_DIR  downloads and builds, keyed by version   (default ~/.cache/meridian)
#   MERIDIAN_STATE_DIR  data directories, pid files, kubeconfig  (default /var/tmp/meridian-$USER)
#   MERIDIAN_LOG_DIR    one log file per process                 (default $MERIDIAN_STATE_DIR/logs)
# The state directory lives outside $HOME because PostgreSQL refuses to run as root and its
# data directory must be reachable by the unprivileged `postgres` user.

set -euo pipefail

: "${MERIDIAN_CACHE_DIR:=${XDG_CACHE_HOME:-$HOME/.cache}/meridian}"
: "${MERIDIAN_STATE_DIR:=/var/tmp/meridian-${USER:-$(id -un)}}"
: "${MERIDIAN_LOG_DIR:=$MERIDIAN_STATE_DIR/logs}"
export MERIDIAN_CACHE_DIR MERIDIAN_STATE_DIR MERIDIAN_LOG_DIR

# Ports of the local dependencies.
: "${MERIDIAN_PG_PORT:=5432}"
: "${MERIDIAN_REDIS_PORT:=6379}"
: "${MERIDIAN_REDIS_CLUSTER_PORT:=7001}"  # Redis Cluster: masters on it and the next 2 ports (bus: +10000)
: "${MERIDIAN_KAFKA_PORT:=9092}"
: "${MERIDIAN_KAFKA_CONTROLLER_PORT:=9093}"
: "${MERIDIAN_KAFKA_SASL_PORT:=9094}"   # SASL_PLAINTEXT (PLAIN admin, SCRAM-SHA-512 tenants)
: "${MERIDIAN_KAFKA_SSL_PORT:=9095}"    # SASL_SSL, the same over TLS (CA: $MERIDIAN_STATE_DIR/kafka/tls)
: "${MERIDIAN_ETCD_PORT:=2379}"
: "${MERIDIAN_ETCD_PEER_PORT:=2380}"
: "${MERIDIAN_APISERVER_PORT:=6443}"
export MERIDIAN_PG_PORT MERIDIAN_REDIS_PORT MERIDIAN_REDIS_CLUSTER_PORT \
  MERIDIAN_KAFKA_PORT MERIDIAN_KAFKA_CONTROLLER_PORT MERIDIAN_KAFKA_SASL_PORT MERIDIAN_KAFKA_SSL_PORT \
  MERIDIAN_ETCD_PORT MERIDIAN_ETCD_PEER_PORT MERIDIAN_APISERVER_PORT
# Password of the local Kafka broker's SASL superuser `admin` (mechanism PLAIN); local only.
: "${MERIDIAN_KAFKA_ADMIN_PASSWORD:=meridian-kafka-admin}"
export MERIDIAN_KAFKA_ADMIN_PASSWORD

DEV_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$DEV_DIR/.." && pwd)"
export DEV_DIR REPO_ROOT

mkdir -p "$MERIDIAN_CACHE_DIR" "$MERIDIAN_STATE_DIR" "$MERIDIAN_LOG_DIR" "$MERIDIAN_STATE_DIR/pids"

if [ -t 1 ]; then _B=$'\e[1m'; _G=$'\e[32m'; _Y=$'\e[33m'; _R=$'\e[31m'; _N=$'\e[0m'; else _B='' _G='' _Y='' _R='' _N=''; fi

# step "message": announce a stage; ok/warn/die: report its outcome.
step() { printf '%s==>%s %s\n' "$_B" "$_N" "$*"; }
ok()   { printf '    %sok%s   %s\n' "$_G" "$_N" "$*"; }
warn() { printf '    %swarn%s %s\n' "$_Y" "$_N" "$*" >&2; }
die()  { printf '%serror:%s %s\n' "$_R" "$_N" "$*" >&2; exit 1; }

# as_root CMD...: run CMD as root (directly, or through sudo when we are not root).
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# apt_install PKG...: install Debian packages that are missing; runs `apt-get update` once.
apt_install() {
  local missing=() p
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  step "installing Debian packages: ${missing[*]}"
  if [ ! -f "$MERIDIAN_STATE_DIR/.apt-updated" ]; then
    as_root apt-get update -qq && touch "$MERIDIAN_STATE_DIR/.apt-updated"
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# port_open PORT: is something listening on 127.0.0.1:PORT?
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_for NAME TIMEOUT_SECONDS CMD...: poll CMD until it succeeds; fail with the log's tail.
wait_for() {
  local name=$1 timeout=$2 start=$SECONDS; shift 2
  until "$@" >/dev/null 2>&1; do
    if (( SECONDS - start >= timeout )); then
      warn "$name not ready after ${timeout}s; last lines of $MERIDIAN_LOG_DIR/$name.log:"
      tail -n 30 "$MERIDIAN_LOG_DIR/$name.log" >&2 2>/dev/null || true
      return 1
    fi
    sleep 0.5
  done
}

# pidfile NAME / is_running NAME: pid bookkeeping for processes started with `start_bg`.
pidfile() { echo "$MERIDIAN_STATE_DIR/pids/$1.pid"; }
# A pid counts as running unless it is gone or a zombie (a reaped-late child or a recycled
# pid after a restart would otherwise look alive).
is_running() {
  local f pid state
  f=$(pidfile "$1"); [ -f "$f" ] || return 1
  pid=$(cat "$f"); kill -0 "$pid" 2>/dev/null || return 1
  state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
  [ "$state" != Z ]
}

# start_bg NAME CMD...: start CMD detached (own session), stdout+stderr to $MERIDIAN_LOG_DIR/NAME.log.
start_bg() {
  local name=$1; shift
  setsid "$@" >>"$MERIDIAN_LOG_DIR/$name.log" 2>&1 < /dev/null &
  echo $! > "$(pidfile "$name")"
}

# stop_bg NAME [TIMEOUT]: SIGTERM the process (and its session), SIGKILL after TIMEOUT seconds.
stop_bg() {
  local name=$1 timeout=${2:-20} f pid i
  f=$(pidfile "$name")
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < timeout * 10; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

# spin MSG CMD...: run a long step with a spinner on a terminal, plain lines otherwise;
# output goes to $MERIDIAN_LOG_DIR/<MSG as a file name>.log and is shown on failure.
spin() {
  local msg=$1 log; shift
  log="$MERIDIAN_LOG_DIR/$(printf %s "$msg" | tr -cs 'A-Za-z0-9' '-' | cut -c1-40 | sed 's/-*$//').log"
  if [ -t 1 ]; then
    "$@" >"$log" 2>&1 &
    # shellcheck disable=SC1003 # a backslash frame, not an escaped quote
    local pid=$! frames='|/-\' i=0 start=$SECONDS
    while kill -0 "$pid" 2>/dev/null; do
      printf '\r    %s %s (%ss)' "${frames:i++%4:1}" "$msg" "$((SECONDS - start))"; sleep 0.2
    done
    printf '\r\e[K'
    wait "$pid" || { warn "$msg failed; see $log"; tail -n 40 "$log" >&2; return 1; }
  else
    local start=$SECONDS
    echo "    ... $msg (log: $log)"
    "$@" >"$log" 2>&1 || { warn "$msg failed after $((SECONDS - start))s; see $log"; tail -n 40 "$log" >&2; return 1; }
    echo "    ... $msg done in $((SECONDS - start))s"
  fi
}

# local_tls DIR WHAT LOG [CMD...]: a local CA ("meridian local WHAT CA", ca.crt and ca.key) and
# a server certificate for IP:127.0.0.1 and DNS:localhost it signed (server.crt, server.key:
# PKCS#8, unencrypted, mode 600), valid ten years, made in a fresh directory that then replaces
# DIR. CMD runs in that directory first (to derive other files from these). openssl's output
# goes to LOG; dies when a step fails.
local_tls() {
  local dir=$1 what=$2 log=$3 tmp; shift 3
  command -v openssl >/dev/null || apt_install openssl
  tmp=$(mktemp -d "$dir.XXXXXX")
  # Own config files, so the system's openssl.cnf adds nothing.
  if ! (
    cd "$tmp" && umask 077 &&
      printf '%s\n' '[req]' 'prompt=no' 'distinguished_name=dn' 'x509_extensions=ext' \
        '[dn]' "CN=meridian local $what CA" '[ext]' 'basicConstraints=critical,CA:TRUE' \
        'keyUsage=critical,keyCertSign,cRLSign' 'subjectKeyIdentifier=hash' >ca.cnf &&
      printf '%s\n' 'subjectAltName=IP:127.0.0.1,DNS:localhost' 'basicConstraints=critical,CA:FALSE' \
        'keyUsage=critical,digitalSignature,keyEncipherment' 'extendedKeyUsage=serverAuth' \
        'subjectKeyIdentifier=hash' 'authorityKeyIdentifier=keyid' >server.ext &&
      openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out ca.key &&
      openssl req -x509 -config ca.cnf -key ca.key -sha256 -days 3650 -out ca.crt &&
      openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out server.key &&
      openssl req -new -key server.key -subj /CN=localhost -out server.csr &&
      openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -set_serial "0x$(openssl rand -hex 16)" \
        -sha256 -days 3650 -extfile server.ext -out server.crt &&
      rm server.csr server.ext ca.cnf && chmod 644 ca.crt server.crt && chmod 755 . &&
      { [ $# -eq 0 ] || "$@"; }
  ) >>"$log" 2>&1; then
    rm -rf "$tmp"
    die "could not generate the TLS files in $dir with openssl; see $log"
  fi
  rm -rf "$dir"
  mv "$tmp" "$dir"
}
